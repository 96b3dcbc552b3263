// merge_job.hh — the persistent state of one rollback merge.
//
// Rolling a volume back to snapshot S makes the live export show S at once;
// a background merge then copies S's content into the live image, chunk by
// chunk. The set of chunks still to copy ("pending") must survive a crash
// exactly: a chunk merged and then overwritten by the host must never be
// merged again, and a chunk not merged yet must keep reading as S.
//
// File (path chosen by the control plane, beside the image), little-endian:
//   header   4 KiB: "NBDMERG1", u32 version 1, u32 chunk size, u64 volume
//            size, u64 snapshot id, u64 pending at start, u64 bitmap_base
//            (4096), u64 log_base (past the bitmap, 4 KiB aligned), u32
//            CRC-32C of bytes 0..55.
//   bitmap   the pending set at the start, one bit per chunk (u64 words);
//            all-zero pages are never written, so it costs disk space only
//            where the volume changed since S.
//   log      records (record_log.hh) of type 1 MERGED: u64 pairs (first
//            chunk, count) now merged.
// Written once and synced before the job is announced (manifest) and
// activated. commit() makes a MERGED record durable before the bits clear,
// and callers make the copied data durable in the live image before they
// commit, so "merged" on disk always means "live holds S's data, durably".
// A torn last record only means some merged chunks are merged again.
#pragma once

#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "bitmap.hh"

namespace nbd {

class MergeJob {
 public:
  // Writes the job file (which must not exist) with `pending` and syncs it.
  static std::unique_ptr<MergeJob> create(const std::string& path, uint64_t snapshot_id, uint64_t volume_size,
                                          uint32_t chunk_size, std::unique_ptr<Bitmap> pending, std::string& err);
  // Opens a job file, checks it, replays the merged log.
  static std::unique_ptr<MergeJob> open(const std::string& path, uint64_t volume_size, uint32_t chunk_size,
                                        std::string& err);
  ~MergeJob();

  uint64_t snapshot_id() const { return snapshot_id_; }
  uint64_t total() const { return total_; }
  uint64_t remaining() const;
  uint64_t chunks() const { return pending_->size(); }
  bool pending(uint64_t c) const { return pending_->test(c); }
  // The pending set itself (bits only ever clear), for change maps.
  const Bitmap& pending_map() const { return *pending_; }
  // The first pending chunk >= c, or chunks() if there is none.
  uint64_t next_pending(uint64_t c) const;
  // Durably records `chunks` (ascending) as merged, then clears their bits.
  int commit(const std::vector<uint64_t>& chunks);

 private:
  MergeJob(uint64_t snapshot_id, uint64_t volume_size, uint32_t chunk_size, std::unique_ptr<Bitmap> pending);
  int load(std::string& err);

  uint64_t snapshot_id_;  // set once, by create() or load()
  const uint64_t volume_size_;
  const uint32_t chunk_size_;
  std::unique_ptr<Bitmap> pending_;
  const uint64_t log_base_;
  uint64_t total_ = 0;
  int fd_ = -1;
  mutable std::mutex mu_;  // serialises commits; leaf lock
  uint64_t log_end_ = 0;
  uint64_t remaining_ = 0;
};

}  // namespace nbd
