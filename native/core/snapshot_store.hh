// snapshot_store.hh — the on-disk store of one snapshot: preserved chunk data
// plus a checksummed log saying which chunks are preserved.
//
// Files (paths chosen by the control plane, beside the image):
//   data  sparse file of the volume's size; chunk c lives at c * chunk_size.
//         Only preserved chunks are ever written, so it costs disk space only
//         for what the snapshot had to keep.
//   map   4 KiB header, then an append-only log of records (see .cc for the
//         byte layout). Replaying the log rebuilds the in-memory bitmap: one
//         bit per chunk, the only per-chunk memory a snapshot costs.
//
// Crash invariant (the ordering commit() enforces):
//   old data written to `data` → fdatasync(data) → CHUNKS record appended to
//   `map` → fdatasync(map) → bits set in memory → (caller) live write.
// So a bit that is set on disk always names data that is on disk, and the
// live image is never overwritten before the old data is durable. A crash
// can only tear the last record (nothing after it was ever acknowledged), and
// load() drops a torn tail; an invalid record followed by valid ones is
// corruption and fails the load with an error instead of serving bad data.
//
// Concurrency: commit() is group-committed. Callers queue their chunks; one
// caller at a time leads a batch (two syncs for everyone queued), the others
// wait for it. Locking: mu_ guards the queue, the leader role and the failed
// state; the log's end offset is touched only by the leader. mu_ is held
// during I/O only by mark_failed(), which happens once per snapshot.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "bitmap.hh"

namespace nbd {

struct SnapshotPaths {
  std::string data;
  std::string map;
};

class SnapshotStore {
 public:
  // Creates new, empty files (they must not exist) and syncs them.
  static std::unique_ptr<SnapshotStore> create(uint64_t id, const SnapshotPaths& paths, uint64_t volume_size,
                                               uint32_t chunk_size, std::string& err);
  // Opens existing files, checks the header, replays the log.
  static std::unique_ptr<SnapshotStore> open(uint64_t id, const SnapshotPaths& paths, uint64_t volume_size,
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

  // Writes preserved data at its volume offset (not yet committed).
  int write_data(const void* buf, uint32_t count, uint64_t offset);
  // Reads preserved data (only meaningful for committed chunks).
  int read_data(void* buf, uint32_t count, uint64_t offset) const;
  // Makes data written for `chunks` durable, records them, sets their bits.
  int commit(const std::vector<uint64_t>& chunks);

  uint64_t map_bytes() const;  // size of the log, for info

 private:
  SnapshotStore(uint64_t id, uint64_t volume_size, uint32_t chunk_size);
  int append_record(uint16_t type, const void* payload, uint32_t len);  // leader only
  int load(std::string& err);

  const uint64_t id_;
  const uint64_t volume_size_;
  const uint32_t chunk_size_;
  int data_fd_ = -1;
  int map_fd_ = -1;
  Bitmap map_;
  uint64_t log_end_ = 0;  // leader only

  mutable std::mutex mu_;  // lock order: leaf
  std::condition_variable cv_;
  bool leading_ = false;
  struct Pending {
    std::vector<uint64_t> chunks;
    int result = 0;
    bool done = false;
  };
  std::deque<std::shared_ptr<Pending>> queue_;
  bool failed_ = false;
  std::string failure_;
  uint64_t failed_at_ms_ = 0;
};

}  // namespace nbd
