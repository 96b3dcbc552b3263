// cow_device.hh — copy-on-write into a volume's snapshot chain: the layer
// just above the live image.
//
//     RollbackDevice ─► CowDevice ─► FileDevice (live raw image)
//                           │ preserves old data into the newest healthy snapshot
//                           ▼
//     snapshot export ─► SnapshotView(i) ─► reads chunk c from the first
//                           snapshot j >= i whose bitmap has c, else from live
//
// Snapshots form a chain, oldest first. A write (or TRIM / WRITE_ZEROES)
// touching chunk c first copies c's old content into the newest healthy
// snapshot T, unless T or a snapshot newer than T already holds c — so write
// cost does not grow with the number of snapshots. The per-chunk check is a
// bitmap test on the hot path; only first writes take a chunk stripe. Reads
// are not this layer's concern: they go straight to the image
// (FilterDevice::pread).
//
// Failure isolation: if preserving fails (snapshot store full, I/O error),
// the host write still goes ahead. T is marked failed, and so is every older
// snapshot that needed T for one of those chunks; failures are reported
// through the callback. Later writes preserve into the newest snapshot still
// healthy, so healthy snapshots stay exact.
//
// Deleting snapshot i hands its chunks down (hand_down) to the older
// snapshots that read them through i, then drops i from the chain.
//
// What the layers above use (narrow, documented entry points, no friends):
// needs_preserving() (a first write? no locks), preserve_chunks() (the
// first-write queue preserves a whole batch with one commit),
// preserve_locked() + raw_pwrite() (a rollback merge preserves and writes
// with the stripes already held), raw_pwrite()/raw_zero() (writes whose
// chunks the caller has preserved), read_snapshot()/snapshot_extents()
// (snapshot views and rollback redirection).
//
// Invariants:
//  - The chain is an immutable vector swapped atomically: readers never lock.
//    It changes (load_snapshot, drop) only with the gate closed, or before
//    the volume is served, so every write sees one chain from start to end.
//  - A chunk's bit is set in a snapshot's map only once its old data is
//    durably committed there, and before the live write that replaces it.
//  - Bits of snapshots older than the target change only in hand_down.
//
// Locking: writes arrive inside the WriteGate (entered by the top layer,
// volume_locks.hh). Preservation of a chunk takes its stripe; the lock order
// is gate → stripes (ascending) → SnapshotStore::mu_. chain_mu_ only
// serialises chain swaps and is a leaf.
#pragma once

#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "device.hh"
#include "snapshot_store.hh"
#include "volume_locks.hh"

namespace nbd {

class CowDevice : public FilterDevice {
 public:
  // (snapshot id, reason): called on the data-path thread that saw the failure.
  using FailureCallback = std::function<void(uint64_t, const std::string&)>;
  using Chain = std::vector<std::shared_ptr<SnapshotStore>>;

  CowDevice(std::shared_ptr<Device> live, uint32_t chunk_size, std::shared_ptr<VolumeLocks> locks,
            FailureCallback on_failure);

  uint32_t chunk_size() const { return chunk_size_; }

  // Host writes (inside the gate): preserve what the target still needs, then write.
  int pwrite(const void* buf, uint32_t count, uint64_t offset, IoFlags flags) override;
  int trim(uint32_t count, uint64_t offset, IoFlags flags) override;
  int zero(uint32_t count, uint64_t offset, IoFlags flags) override;

  // The chain (lock-free snapshot of it) and lookups.
  std::shared_ptr<const Chain> chain() const { return std::atomic_load(&chain_); }
  std::shared_ptr<SnapshotStore> find(uint64_t id) const;
  static size_t index_of(const Chain& chain, uint64_t id);
  // Appends a snapshot (the newest). Gate closed, or before serving
  // (chain order = call order at start-up).
  void load_snapshot(std::shared_ptr<SnapshotStore> s);
  // Takes snapshot `id` out of the chain; false if it was not there. Gate closed.
  bool drop(uint64_t id);

  // True if some chunk of the range still has to be preserved (no locks taken).
  bool needs_preserving(uint64_t offset, uint64_t count) const;
  // Preserves, with one commit, those of `chunks` (any order, repeats
  // allowed) the target still needs; takes their stripes. Called by the
  // first-write queue's thread, outside the gate: the chain cannot change
  // while entries are queued. Failures mark snapshots failed.
  void preserve_chunks(std::vector<uint64_t> chunks);
  // The same with the stripes of `chunks` already held by the caller.
  void preserve_locked(const Chain& chain, std::vector<uint64_t> chunks);
  // Straight to the image, preserving nothing: for callers that preserved
  // the range's chunks first (preserve_chunks / preserve_locked).
  int raw_pwrite(const void* buf, uint32_t count, uint64_t offset, IoFlags flags) {
    return next_->pwrite(buf, count, offset, flags);
  }
  int raw_zero(uint32_t count, uint64_t offset, IoFlags flags) { return next_->zero(count, offset, flags); }

  // For chunks [from, from + max) held by snapshot `id`: gives each chunk
  // that older snapshots read through `id` to the nearest older HEALTHY
  // snapshot lacking it, past failed ones (which get nothing), unless a
  // snapshot on the way holds it; every older one then reads it through that
  // heir. Sets `next`. Fails (nothing marked failed) if a healthy heir cannot
  // take its copy. Takes each chunk's stripe while copying it.
  int hand_down(uint64_t id, uint64_t from, uint64_t max, uint64_t& next, std::string& err);

  // Reads [offset, offset+count) of snapshot index i of `chain`.
  int read_snapshot(const Chain& chain, size_t i, void* buf, uint32_t count, uint64_t offset);
  int snapshot_extents(const Chain& chain, size_t i, uint32_t count, uint64_t offset, uint32_t max,
                       std::vector<Extent>& out);

 private:
  static constexpr size_t kHandDownBatch = 65536;  // chunks per hand-down commit
  // The inline path of a host write: preserve the range's first writes.
  void preserve(uint64_t offset, uint64_t count);
  void fail(const Chain& chain, size_t t, const std::vector<uint64_t>& chunks, const std::string& reason);
  // Index of the snapshot a read of chunk c from snapshot i must use, or
  // chain.size() for the live volume.
  static size_t source_of(const Chain& chain, size_t i, uint64_t c);
  static size_t target_of(const Chain& chain);

  const uint32_t chunk_size_;
  const std::shared_ptr<VolumeLocks> locks_;
  FailureCallback on_failure_;
  mutable std::mutex chain_mu_;  // guards chain_ swaps (readers use atomic_load); leaf
  std::shared_ptr<const Chain> chain_;
};

}  // namespace nbd
