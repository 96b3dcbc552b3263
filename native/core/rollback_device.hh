// rollback_device.hh — rollback of a live volume to one of its snapshots:
// redirects reads of chunks still to be merged, and merges them.
//
//     JournalDevice ─► RollbackDevice ─► CowDevice ─► FileDevice
//                       pending chunk c: reads come from snapshot S (through
//                       CowDevice::read_snapshot); a merge copies S's data
//                       into live (preserving live's old data first)
//
// Rollback to snapshot S (index k): the set of chunks where the live image
// may differ from S is exactly the union of the bitmaps of S and every newer
// snapshot (every change to live since S preserved its chunk into one of
// them). prepare() computes it, with writes drained, into a MergeJob
// (persisted); once activated, live reads of a pending chunk read S, and a
// merge copies S's data into live through CowDevice (preserving the old live
// data into the newest snapshot first, so every other snapshot stays exact).
// A host write to a pending chunk merges that chunk first (durably), then
// goes on down: writes during the merge win. Merge steps and host writes run
// inside the WriteGate, so a new rollback, which replaces the running one
// (its pending set includes the old one's), never races an old merge. The
// control plane (Volume) refuses to create or delete snapshots while a merge
// runs, and the first-write queue is drained before a rollback starts and
// not used while it merges (JournalDevice asks merging()).
//
// Writes since the last rollback began are tracked in memory (dirty_): a
// repeated rollback to the snapshot live equalled when the last merge
// finished (clean_of_) merges only those. After a restart the full pending
// set is used.
//
// Invariants:
//  - A chunk leaves the pending set (MergeJob::commit) only once live durably
//    holds S's data for it (FUA, or a flush before the commit).
//  - job_ changes only with the gate closed (activate, finish), or at open.
//  - dirty_ and clean_of_ are replaced only with the gate closed; writers
//    inside the gate only set bits.
//
// Locking: host writes arrive inside the gate (entered by JournalDevice);
// merge_step enters it itself. A merge holds the stripes of the chunks it
// copies (volume_locks.hh) and calls CowDevice::preserve_locked and
// raw_pwrite, which take none. Lock order: gate → stripes → SnapshotStore::mu_.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "bitmap.hh"
#include "cow_device.hh"
#include "device.hh"
#include "merge_job.hh"
#include "volume_locks.hh"

namespace nbd {

class RollbackDevice : public FilterDevice {
 public:
  RollbackDevice(std::shared_ptr<CowDevice> cow, std::shared_ptr<VolumeLocks> locks);

  int pread(void* buf, uint32_t count, uint64_t offset) override;
  int extents(uint32_t count, uint64_t offset, uint32_t max, std::vector<Extent>& out) override;
  // Host writes (inside the gate): merge what is still pending in the range, then go on down.
  int pwrite(const void* buf, uint32_t count, uint64_t offset, IoFlags flags) override;
  int trim(uint32_t count, uint64_t offset, IoFlags flags) override;
  int zero(uint32_t count, uint64_t offset, IoFlags flags) override;

  // The running merge, or null. merging(): one atomic load, for the layer above.
  std::shared_ptr<MergeJob> merge_job() const { return std::atomic_load(&job_); }
  bool merging() const { return merge_job() != nullptr; }
  // Records that [offset, offset+count) changes (inside the gate): a write
  // the layer above takes over (a queued first write) reports it here.
  void mark_dirty(uint64_t offset, uint64_t count);

  // Control plane. prepare() (gate closed, first-write queue drained)
  // computes the pending set and writes the job file; activate() or abort()
  // (gate still closed) follows. The caller reopens the gate.
  int prepare(uint64_t snapshot_id, const std::string& job_path, std::string& err);
  void activate();
  void abort();
  // At open: resumes a job recorded before a restart.
  int resume(const std::string& job_path, std::string& err);
  // Background merge (enters the gate): copies up to `max` pending chunks
  // from `from` on; sets `next` (chunks() when the scan reached the end).
  int merge_step(uint64_t from, uint64_t max, uint64_t& next, std::string& err);
  // Gate closed: drops a finished job (EAGAIN if chunks are still pending).
  int finish(std::string& err);

 private:
  // Keeps the still-pending of `chunks` and, stripes held, preserves them and
  // copies the job's snapshot data into live (with FUA if asked).
  int copy_locked(MergeJob& job, const CowDevice::Chain& chain, std::vector<uint64_t>& chunks, bool fua);
  // On-demand merge for a host write (stripes held): copy with FUA, commit.
  int merge_locked(MergeJob& job, const CowDevice::Chain& chain, std::vector<uint64_t> chunks);
  // Host writes: merge whatever of [offset, offset+count) is still pending.
  int merge_range(uint64_t offset, uint64_t count);
  bool needs_merging(uint64_t offset, uint64_t count) const;

  const std::shared_ptr<CowDevice> cow_;  // == next_, typed
  const std::shared_ptr<VolumeLocks> locks_;
  const uint32_t chunk_size_;
  std::shared_ptr<MergeJob> job_;       // running merge (atomic_load/store)
  std::shared_ptr<MergeJob> prepared_;  // between prepare and activate/abort (gate closed)
  // Chunks written since the last rollback began; with clean_of_ (the
  // snapshot live equalled when that rollback's merge finished, 0 if
  // unknown) a repeated rollback to the same snapshot merges only these.
  std::unique_ptr<Bitmap> dirty_;
  uint64_t clean_of_ = 0;  // changed with writes drained
};

}  // namespace nbd
