// snapshot_store.hh — the on-disk store of one snapshot: one file holding the
// preserved chunk data and a checksummed log saying which chunks are preserved.
//
// File (path chosen by the control plane, beside the image), format 2:
//   header    4 KiB: identity, geometry, checksum; failure marker in place.
//   data      from data_base (1 MiB): chunk c lives at data_base + c * chunk
//             size. Sparse: only preserved chunks are ever written, so it
//             costs disk space only for what the snapshot had to keep.
//   log       from log_base (past the data region): append-only records, each
//             listing chunks with a CRC-32C of each chunk's data. Replaying
//             the log rebuilds the in-memory bitmap: one bit per chunk, the
//             only per-chunk memory a snapshot costs.
//
// Crash invariant (the ordering commit() enforces):
//   old data written to the data region and its CHUNKS record appended to
//   the log (both in the page cache) → ONE fdatasync of the file → bits set
//   in memory → (caller) live write.
// So the live image is never overwritten before the old data and its record
// are durable. One sync covers data and record, so after a power loss a
// record may be on disk while its data is not — but only for the newest
// record: commits are serialised, and the next record is written only after
// the previous sync returned. load() therefore verifies the CRCs of the
// newest record's chunks and drops that record if any differ; that is exact,
// because the live writes it protected were never issued (they wait for the
// sync). A torn tail record is dropped the same way; an invalid record
// followed by valid ones is corruption and fails the load with an error
// instead of serving bad data.
//
// Concurrency: commit() is group-committed. Callers queue their chunks; one
// caller at a time leads a batch (one record, one sync for everyone queued),
// the others wait for it. Locking: mu_ guards the queue, the leader role and
// the failed state; the log's end offset is touched only by the leader. mu_
// is held during I/O only by mark_failed(), which happens once per snapshot.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "bitmap.hh"

namespace nbd {

// A preserved chunk and the CRC-32C of its data, as its log record lists it.
struct ChunkSum {
  uint64_t chunk;
  uint32_t crc;
};

class SnapshotStore {
 public:
  // Creates new, empty files (they must not exist) and syncs them.
  static std::unique_ptr<SnapshotStore> create(uint64_t id, const std::string& path, uint64_t volume_size,
                                               uint32_t chunk_size, std::string& err);
  // Opens existing files, checks the header, replays the log.
  static std::unique_ptr<SnapshotStore> open(uint64_t id, const std::string& path, uint64_t volume_size,
                                             uint32_t chunk_size, std::string& err);
  ~SnapshotStore();

  uint64_t id() const { return id_; }
  uint32_t chunk_size() const { return chunk_size_; }
  uint64_t volume_size() const { return volume_size_; }
  uint64_t chunks() const { return map_.size(); }
  const Bitmap& map() const { return map_; }

  bool failed() const;
  std::string failure() const;
  uint64_t failed_at_ms() const;  // unix time of the failure, 0 if unknown
  // Stops all further preservation into this snapshot; records why, in place
  // in the map's header page, so it needs no free space (best effort).
  void mark_failed(const std::string& reason);

  // Writes the data of consecutive chunks first, first+1, ... (`len` bytes
  // from the start of chunk `first`; the volume's last chunk may be short)
  // into the data region, not yet committed; appends each chunk's sum to
  // `sums` for commit().
  int write_chunks(const void* buf, uint64_t first, uint64_t len, std::vector<ChunkSum>& sums);
  // Reads preserved data (only meaningful for committed chunks).
  int read_data(void* buf, uint32_t count, uint64_t offset) const;
  // Makes data written for `chunks` durable, records them, sets their bits.
  int commit(const std::vector<ChunkSum>& chunks);

  uint64_t map_bytes() const;  // size of the log, for info

 private:
  SnapshotStore(uint64_t id, uint64_t volume_size, uint32_t chunk_size);
  int load(std::string& err);
  // Whether the data on disk of the chunks in a CHUNKS payload matches its CRCs.
  bool data_matches(const std::vector<uint8_t>& payload);
  uint64_t chunk_len(uint64_t c) const;

  const uint64_t id_;
  const uint64_t volume_size_;
  const uint32_t chunk_size_;
  const uint64_t data_base_;
  const uint64_t log_base_;
  int fd_ = -1;
  Bitmap map_;
  uint64_t log_end_ = 0;  // leader only

  mutable std::mutex mu_;  // lock order: leaf
  std::condition_variable cv_;
  bool leading_ = false;
  struct Pending {
    std::vector<ChunkSum> chunks;
    int result = 0;
    bool done = false;
  };
  std::deque<std::shared_ptr<Pending>> queue_;
  std::atomic<bool> failed_{false};  // written under mu_; read lock-free on the write path
  std::string failure_;
  uint64_t failed_at_ms_ = 0;
};

}  // namespace nbd
