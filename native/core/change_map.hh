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
// Also here: ChangeSource, what an export needs to offer the NBD meta
// context qemu:dirty-bitmap:NAME (implemented by Volume; handshake.cc lists
// and selects it, transmission.cc answers BLOCK_STATUS with it over the
// request's chunks only).
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

// A set of chunks (one bit each, in 64-bit words) that only grows, over a
// window [first, end) of a volume of `chunks` chunks (default: all of it),
// so a block-status request costs words of its range, not of the volume.
class ChangeSet {
 public:
  explicit ChangeSet(uint64_t chunks, uint64_t first = 0, uint64_t count = UINT64_MAX);
  // ORs in a bitmap over the volume's chunks (a snapshot's map, a merge's pending set).
  void add(const Bitmap& b);
  // Adds chunk indexes (any order, repeats allowed; those outside the window are ignored).
  void add_chunks(const std::vector<uint64_t>& chunks);
  uint64_t first() const { return first_; }
  uint64_t end() const { return end_; }
  // Ascending, disjoint, maximal runs inside the window.
  std::vector<ChunkRun> runs() const;

 private:
  bool test(uint64_t c) const { return (w_[(c >> 6) - base_] >> (c & 63)) & 1; }
  uint64_t first_, end_, base_;  // base_: the word of first_
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

// What an export needs to offer the meta context qemu:dirty-bitmap:NAME
// (handshake.cc, transmission.cc): snapshot names, and change maps over a
// range of chunks. Implemented by Volume. `at` is the export's own point:
// a snapshot id for a snapshot export, 0 for the live volume.
class ChangeSource {
 public:
  virtual ~ChangeSource() = default;
  virtual uint32_t chunk_size() const = 0;
  // The id of the snapshot named `name` if a change map from it to `at` can
  // be given (it exists, is healthy and older than `at`), else 0.
  virtual uint64_t bitmap_from(const std::string& name, uint64_t at) const = 0;
  // The names of every such snapshot, oldest first.
  virtual std::vector<std::string> bitmaps_at(uint64_t at) const = 0;
  // The change map from `from` to `at`, limited to `count` chunks from `first`.
  virtual int changed_chunks(uint64_t from, uint64_t at, std::vector<ChunkRun>& runs, ChangeError& kind,
                             std::string& err, uint64_t first, uint64_t count) = 0;
};

}  // namespace nbd
