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
  return cow_->read_snapshot(*chain, i, buf, count, offset);
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
