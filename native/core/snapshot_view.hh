// snapshot_view.hh — the read-only export of one snapshot.
//
//     snapshot export ─► SnapshotView(i) ─► CowDevice::read_snapshot: chunk c
//                        from the first snapshot j >= i whose bitmap has c,
//                        else from the live image
//
// Invariants: a view never serves a failed snapshot as data (EIO), and a
// snapshot deleted while exported answers ESHUTDOWN. It keeps the store alive
// but looks it up in the current chain on every request (lock-free: the
// chain is an atomically swapped immutable vector), so a deletion takes
// effect at once. No locks of its own.
#pragma once

#include <memory>
#include <vector>

#include "cow_device.hh"
#include "device.hh"
#include "snapshot_store.hh"

namespace nbd {

class SnapshotView final : public Device {
 public:
  SnapshotView(std::shared_ptr<CowDevice> cow, std::shared_ptr<SnapshotStore> snap)
      : cow_(std::move(cow)), snap_(std::move(snap)) {}
  uint64_t size() const override { return snap_->volume_size(); }
  bool can_write() const override { return false; }
  bool can_trim() const override { return false; }
  bool can_zero() const override { return false; }
  bool can_fast_zero() const override { return false; }
  bool can_fua() const override { return false; }
  bool can_cache() const override { return false; }
  int pread(void* buf, uint32_t count, uint64_t offset) override;
  int pwrite(const void*, uint32_t, uint64_t, IoFlags) override;
  int flush() override { return 0; }
  int trim(uint32_t, uint64_t, IoFlags) override;
  int zero(uint32_t, uint64_t, IoFlags) override;
  int cache(uint32_t, uint64_t) override { return 0; }
  int extents(uint32_t count, uint64_t offset, uint32_t max, std::vector<Extent>& out) override;

 private:
  size_t index(const CowDevice::Chain& chain) const;
  std::shared_ptr<CowDevice> cow_;
  std::shared_ptr<SnapshotStore> snap_;
};

}  // namespace nbd
