// change_map.hh — which chunks of a volume may have changed between two
// points of its history: snapshot A (older) and snapshot B, or A and the live
// volume. Backups and diffs read only these chunks.
//
// Rule (every write, TRIM and WRITE_ZEROES preserves the chunks it touches
// into the newest healthy snapshot T, unless a snapshot from T on already
// holds them: cow_device.hh): a chunk whose content differs between A and B
// was written while one of A .. B-1 was the newest snapshot, so it is in the
// union of the bitmaps of A up to, but not including, B. For "live since A"
// the union runs through the newest snapshot, plus what has not reached a
// bitmap yet: chunks whose first writes are still queued (first_write_queue.hh)
// and chunks still pending in a rollback merge (rollback_device.hh). Volume
// (volume.cc, changed_chunks) gathers these in an order that never misses a
// chunk moving from one to the other; this file holds the union and the rules
// for which ranges have an exact answer. The invariants and the tests that
// check them: docs/architecture.md, "Change maps".
//
// When the answer is refused (kUnavailable): A failed, or B failed. A failed
// snapshot lost a chunk (its preservation failed) without a bit for it, so a
// change to that chunk may be in no bitmap from A on. While A is healthy
// every lost chunk is held by a snapshot in [A, failed one) (CowDevice::fail
// marks every older snapshot that lacked it failed), and writes after a
// failure preserve into the nearest older healthy snapshot, which is A or
// newer: so failed snapshots strictly between A and B leave the union a
// cover. B failed: its content is lost, there is nothing to diff against.
//
// Threads and locking: none here; plain data. The caller reads the bitmaps
// (lock-free, Bitmap::word is an acquire load).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "bitmap.hh"
#include "snapshot_store.hh"

namespace nbd {

// `count` chunks from chunk `start`.
struct ChunkRun {
  uint64_t start;
  uint64_t count;
};

// A set of chunks (one bit each, in 64-bit words) that only grows.
class ChangeSet {
 public:
  explicit ChangeSet(uint64_t chunks) : chunks_(chunks), w_((chunks + 63) / 64, 0) {}
  uint64_t chunks() const { return chunks_; }
  // ORs in a bitmap over the same chunks (a snapshot's map, a merge's pending set).
  void add(const Bitmap& b);
  // Adds chunk indexes (any order, repeats allowed; indexes past the end are ignored).
  void add_chunks(const std::vector<uint64_t>& chunks);
  uint64_t count() const;
  // Ascending, disjoint, maximal runs.
  std::vector<ChunkRun> runs() const;

 private:
  uint64_t chunks_;
  std::vector<uint64_t> w_;
};

enum class ChangeError { kNone, kNotFound, kRangeInvalid, kUnavailable };

using SnapshotChain = std::vector<std::shared_ptr<SnapshotStore>>;

// Places the range (snapshot `from`, snapshot `to` or 0 for the live volume)
// in `chain` (oldest first): on success the union runs over chain[first, end)
// (end = chain.size() for the live volume). Otherwise the error kind and a
// message: an unknown id (kNotFound), `from` not older than `to`
// (kRangeInvalid), or a range whose union cannot be exact (kUnavailable,
// with the failure's reason; see the top of this file).
ChangeError change_range(const SnapshotChain& chain, uint64_t from, uint64_t to, size_t& first, size_t& end,
                         std::string& err);

}  // namespace nbd
