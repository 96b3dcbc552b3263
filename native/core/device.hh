// device.hh — the block device chain every export is served from.
//
// A Device answers the NBD data commands for one volume. Devices stack: each
// layer wraps a `next` and changes what it must, forwarding the rest. The raw
// file is always at the bottom. A volume with snapshots (volume.hh) is this
// chain, one concern per layer:
//
//     connection ─► [ReadOnlyDevice] ─► JournalDevice ─► RollbackDevice ─► CowDevice ─► FileDevice (raw image)
//                    (serve -r)          first-write      redirect reads   preserve old   pread/pwrite,
//                                        queue (journal)  of pending       data into the  fdatasync (a failed
//                                        + its apply;     chunks; merge    newest healthy one latches:
//                                        the write gate   them back        snapshot;      health())
//                                                                          chain; hand-down
//     snapshot export ─► SnapshotView ─► CowDevice's chain, then FileDevice
//
// A plain export is FileDevice alone (or under ReadOnlyDevice). The layers
// share one VolumeLocks (write gate + chunk stripes, volume_locks.hh), and
// call each other below through narrow entry points (CowDevice::
// needs_preserving, preserve_locked, raw_pwrite, ...), never around them.
// Clone read-through will be another FilterDevice under the journal.
//
// Contract (all layers):
//  - Methods are called concurrently from many connection threads; a device
//    does its own locking. Callers have already validated that
//    offset + count <= size() and that count > 0, so devices may assert it.
//  - Methods return 0 or a positive host errno; map_errno() (errors.hh) turns
//    that into an NBD error. They never throw.
//  - flush() makes every write that completed before the call durable,
//    whichever connection issued it (this is what makes CAN_MULTI_CONN true).
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

namespace nbd {

// Flags passed down to devices (a subset of the NBD command flags, decoded).
struct IoFlags {
  bool fua = false;        // durable before reply
  bool may_trim = true;    // zero(): the range may be deallocated
  bool fast_only = false;  // zero(): fail with ENOTSUP unless it is cheap
};

// One base:allocation extent: a run of `length` bytes with the same state.
struct Extent {
  uint64_t length;
  uint32_t flags;  // proto::kStateHole | proto::kStateZero
};

class Device {
 public:
  virtual ~Device() = default;

  virtual uint64_t size() const = 0;
  virtual bool can_write() const = 0;
  virtual bool can_trim() const { return can_write(); }
  virtual bool can_zero() const { return can_write(); }
  virtual bool can_fast_zero() const { return can_write(); }
  virtual bool can_flush() const { return true; }
  virtual bool can_fua() const { return can_write(); }
  virtual bool can_cache() const { return true; }
  virtual bool can_extents() const { return true; }
  virtual bool can_multi_conn() const { return true; }

  virtual int pread(void* buf, uint32_t count, uint64_t offset) = 0;
  virtual int pwrite(const void* buf, uint32_t count, uint64_t offset, IoFlags flags) = 0;
  virtual int flush() = 0;
  virtual int trim(uint32_t count, uint64_t offset, IoFlags flags) = 0;
  virtual int zero(uint32_t count, uint64_t offset, IoFlags flags) = 0;
  virtual int cache(uint32_t count, uint64_t offset) = 0;
  // Finishes background work that writes to this device, for good (the
  // server calls it once when stopping, before the final flush; no request
  // follows). Default: nothing to do.
  virtual void drain() {}
  // 0, or the error that makes every request to this device fail from now on
  // (the bottom's sticky write-back error, file_device.hh): layers that do
  // work before forwarding a write (copy-on-write) check it first, so a
  // write that cannot land does not fail a snapshot on its way.
  virtual int health() const { return 0; }
  // Appends extents covering [offset, offset + count) in order (at most
  // max_extents of them; the last may end early). Must append at least one.
  virtual int extents(uint32_t count, uint64_t offset, uint32_t max_extents, std::vector<Extent>& out) = 0;
};

// A layer that forwards everything to `next`; subclasses override what they change.
class FilterDevice : public Device {
 public:
  explicit FilterDevice(std::shared_ptr<Device> next) : next_(std::move(next)) {}
  uint64_t size() const override { return next_->size(); }
  bool can_write() const override { return next_->can_write(); }
  bool can_trim() const override { return next_->can_trim(); }
  bool can_zero() const override { return next_->can_zero(); }
  bool can_fast_zero() const override { return next_->can_fast_zero(); }
  bool can_flush() const override { return next_->can_flush(); }
  bool can_fua() const override { return next_->can_fua(); }
  bool can_cache() const override { return next_->can_cache(); }
  bool can_extents() const override { return next_->can_extents(); }
  bool can_multi_conn() const override { return next_->can_multi_conn(); }
  int pread(void* buf, uint32_t count, uint64_t offset) override { return next_->pread(buf, count, offset); }
  int pwrite(const void* buf, uint32_t count, uint64_t offset, IoFlags f) override { return next_->pwrite(buf, count, offset, f); }
  int flush() override { return next_->flush(); }
  int trim(uint32_t count, uint64_t offset, IoFlags f) override { return next_->trim(count, offset, f); }
  int zero(uint32_t count, uint64_t offset, IoFlags f) override { return next_->zero(count, offset, f); }
  int cache(uint32_t count, uint64_t offset) override { return next_->cache(count, offset); }
  int health() const override { return next_->health(); }
  void drain() override { next_->drain(); }
  int extents(uint32_t count, uint64_t offset, uint32_t max, std::vector<Extent>& out) override {
    return next_->extents(count, offset, max, out);
  }

 protected:
  std::shared_ptr<Device> next_;
};

// A read-only view of any device: writes fail with EPERM, can_write() is false.
class ReadOnlyDevice : public FilterDevice {
 public:
  using FilterDevice::FilterDevice;
  bool can_write() const override { return false; }
  bool can_trim() const override { return false; }
  bool can_zero() const override { return false; }
  bool can_fast_zero() const override { return false; }
  bool can_fua() const override { return false; }
  int pwrite(const void*, uint32_t, uint64_t, IoFlags) override;
  int trim(uint32_t, uint64_t, IoFlags) override;
  int zero(uint32_t, uint64_t, IoFlags) override;
  int flush() override { return 0; }
};

}  // namespace nbd
