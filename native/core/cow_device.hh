// cow_device.hh — copy-on-write snapshots over a live volume.
//
//     connection ─► CowDevice ─► FileDevice (live raw image)
//                       │ preserves old data into the newest healthy snapshot
//                       ▼
//     snapshot export ─► SnapshotView(i) ─► reads chunk c from the first
//                       snapshot j >= i whose bitmap has c, else from live
//
// Snapshots form a chain, oldest first. A write (or TRIM / WRITE_ZEROES)
// touching chunk c first copies c's old content into the newest healthy
// snapshot T, unless T or a snapshot newer than T already holds c — so write
// cost does not grow with the number of snapshots. The per-chunk check is a
// bitmap test on the hot path; only first writes take a chunk lock.
//
// Failure isolation: if preserving fails (snapshot store full, I/O error),
// the host write still goes ahead. T is marked failed, and so is every older
// snapshot that needed T for one of those chunks; failures are reported
// through the callback. Later writes preserve into the newest snapshot still
// healthy, so healthy snapshots stay exact.
//
// Locking: the chain is an immutable vector swapped atomically (readers never
// lock). Chain changes happen with the WriteGate closed, so every write sees
// one chain from start to end. Chunk stripes (kStripes mutexes, chunk %
// kStripes) serialise preservation of the same chunk; a write takes its
// stripes in ascending order. Lock order: gate → stripes → SnapshotStore::mu_.
#pragma once

#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "device.hh"
#include "snapshot_store.hh"
#include "write_gate.hh"

namespace nbd {

class CowDevice : public FilterDevice, public std::enable_shared_from_this<CowDevice> {
 public:
  // (snapshot id, reason): called on the data-path thread that saw the failure.
  using FailureCallback = std::function<void(uint64_t, const std::string&)>;
  using Chain = std::vector<std::shared_ptr<SnapshotStore>>;

  CowDevice(std::shared_ptr<Device> live, uint32_t chunk_size, FailureCallback on_failure);

  uint32_t chunk_size() const { return chunk_size_; }

  int pwrite(const void* buf, uint32_t count, uint64_t offset, IoFlags flags) override;
  int trim(uint32_t count, uint64_t offset, IoFlags flags) override;
  int zero(uint32_t count, uint64_t offset, IoFlags flags) override;

  // Control plane (any thread). add() pauses writes, flushes the live
  // volume (so the snapshot holds every acknowledged write, durably) and
  // appends the snapshot; it takes effect for every write that starts after.
  int add_snapshot(std::shared_ptr<SnapshotStore> s);
  // Loads a snapshot at start-up (no flush; chain order = call order).
  void load_snapshot(std::shared_ptr<SnapshotStore> s);
  bool remove_snapshot(uint64_t id);
  // Deleting, last step: closes the write gate, hands down whatever the
  // older neighbour still lacks (chunks preserved since the bulk hand-down),
  // drops the snapshot from the chain, and LEAVES WRITES PAUSED so the
  // control plane can record the deletion durably first; resume_writes()
  // must follow, whatever happens.
  int finish_remove(uint64_t id, std::string& err);
  void resume_writes() { gate_.open(); }
  std::shared_ptr<const Chain> chain() const;
  std::shared_ptr<SnapshotStore> find(uint64_t id) const;
  // Gives the older neighbour of snapshot `id` the chunks it reads through
  // `id`, for chunks [from, from + max); sets `next`. Deleting a snapshot is
  // hand_down over all chunks, then remove_snapshot.
  int hand_down(uint64_t id, uint64_t from, uint64_t max, uint64_t& next, std::string& err);

  // A read-only device showing snapshot `id` as it was created.
  std::shared_ptr<Device> view(uint64_t id);

  // Reads [offset, offset+count) of snapshot index i of `chain`.
  int read_snapshot(const Chain& chain, size_t i, void* buf, uint32_t count, uint64_t offset);
  int snapshot_extents(const Chain& chain, size_t i, uint32_t count, uint64_t offset, uint32_t max,
                       std::vector<Extent>& out);

 private:
  static constexpr size_t kStripes = 1024;
  int preserve(uint64_t offset, uint64_t count);
  // True if some chunk of the range still has to be preserved (no locks taken).
  bool needs_preserving(uint64_t offset, uint64_t count) const;
  void fail(const Chain& chain, size_t t, const std::vector<uint64_t>& chunks, const std::string& reason);
  // Index of the snapshot a read of chunk c from snapshot i must use, or
  // chain.size() for the live volume.
  static size_t source_of(const Chain& chain, size_t i, uint64_t c);
  bool drop_from_chain(uint64_t id);  // gate must be closed
  static size_t target_of(const Chain& chain);

  const uint32_t chunk_size_;
  FailureCallback on_failure_;
  WriteGate gate_;
  mutable std::mutex chain_mu_;  // guards chain_ swaps (readers use atomic_load)
  std::shared_ptr<const Chain> chain_;
  std::mutex stripes_[kStripes];
};

}  // namespace nbd
