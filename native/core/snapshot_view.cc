// snapshot_view.cc — see snapshot_view.hh.
#include "snapshot_view.hh"

#include <cerrno>

namespace nbd {

size_t SnapshotView::index(const CowDevice::Chain& chain) const {
  for (size_t i = 0; i < chain.size(); ++i)
    if (chain[i] == snap_) return i;
  return chain.size();
}

int SnapshotView::pread(void* buf, uint32_t count, uint64_t offset) {
  auto chain = cow_->chain();
  size_t i = index(*chain);
  if (i == chain->size()) return ESHUTDOWN;  // deleted while exported
  if (snap_->failed()) return EIO;           // inexact: never serve it as data
  if (int e = cow_->read_snapshot(*chain, i, buf, count, offset)) return e;
  // Checked again after the read: a write whose preservation failed marks
  // the snapshot failed (CowDevice::fail) before it lands on the live
  // volume, but sets no bit, so read_snapshot's own re-check cannot see that
  // it read the new data. A failure after the check above and before our
  // read of live is seen here (failed_ is seq_cst): never new data as the
  // snapshot's.
  return snap_->failed() ? EIO : 0;
}

int SnapshotView::pwrite(const void*, uint32_t, uint64_t, IoFlags) { return EPERM; }
int SnapshotView::trim(uint32_t, uint64_t, IoFlags) { return EPERM; }
int SnapshotView::zero(uint32_t, uint64_t, IoFlags) { return EPERM; }

int SnapshotView::extents(uint32_t count, uint64_t offset, uint32_t max, std::vector<Extent>& out) {
  auto chain = cow_->chain();
  size_t i = index(*chain);
  if (i == chain->size()) return ESHUTDOWN;
  return cow_->snapshot_extents(*chain, i, count, offset, max, out);
}

}  // namespace nbd
