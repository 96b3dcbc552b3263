// volume.hh — one volume with snapshots: builds its device chain and runs
// the control-plane operations that span several layers.
//
//     device() ─► JournalDevice ─► RollbackDevice ─► CowDevice ─► live (FileDevice)
//     view(id) ─► SnapshotView ──────────────────────► CowDevice's chain, then live
//
// Each layer holds one concern (journal_device.hh, rollback_device.hh,
// cow_device.hh, snapshot_view.hh); they share one VolumeLocks (the write
// gate and the chunk stripes, volume_locks.hh). Volume owns the order of
// the steps that combine them: creating and deleting a snapshot and starting
// a rollback all close the gate with the first-write queue drained
// (JournalDevice::pause_and_drain), then act on the chain or the merge job,
// then reopen the gate. It keeps no state of its own beyond the layers.
//
// Threads: the control-plane methods run on libuv workers or the main thread;
// the data path reaches the layers through device() (connection threads) and
// view() (snapshot exports) only. Locking: see volume_locks.hh (gate → stripes →
// SnapshotStore::mu_); Volume takes no lock of its own.
#pragma once

#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "change_map.hh"
#include "cow_device.hh"
#include "journal_device.hh"
#include "rollback_device.hh"
#include "volume_locks.hh"

namespace nbd {

class Volume : public ChangeSource {
 public:
  using FailureCallback = CowDevice::FailureCallback;
  using Chain = CowDevice::Chain;
  using JournalConfig = JournalDevice::JournalConfig;
  using JournalError = JournalDevice::JournalError;

  Volume(std::shared_ptr<Device> live, uint32_t chunk_size, FailureCallback on_failure);

  // The top of the live chain: what the volume's export serves.
  std::shared_ptr<Device> device() const { return journal_; }
  uint32_t chunk_size() const override { return cow_->chunk_size(); }
  uint64_t size() const { return live_->size(); }

  // At open, in this order: load_snapshot() for each (chain order = call
  // order), open_journal(), resume_rollback().
  void load_snapshot(std::shared_ptr<SnapshotStore> s) { cow_->load_snapshot(std::move(s)); }
  int open_journal(const JournalConfig& cfg, uint64_t& replayed, std::string& note, JournalError& kind,
                   std::string& err) {
    return journal_->open_journal(cfg, replayed, note, kind, err);
  }
  int resume_rollback(const std::string& job_path, std::string& err) { return rollback_->resume(job_path, err); }

  // First writes and pauses, for status.
  void settle() { journal_->settle(); }
  std::string first_write_mode() const { return journal_->first_write_mode(); }
  uint64_t queued_writes() const { return journal_->queued_writes(); }
  std::string kept_journal() const { return journal_->kept_journal(); }
  // Write pauses (create, delete, rollback): the last and the longest, µs.
  uint64_t last_pause_us() const { return locks_->gate.last_pause_us(); }
  uint64_t max_pause_us() const { return locks_->gate.max_pause_us(); }
  uint64_t last_drain_us() const { return journal_->last_drain_us(); }
  uint64_t last_preflush_us() const { return journal_->last_preflush_us(); }

  // Creating a snapshot is two steps around the manifest write: begin_add()
  // pauses writes, applies every queued first write and flushes the live
  // volume (so the snapshot holds every acknowledged write, durably) and
  // LEAVES WRITES PAUSED; the control plane records the snapshot; then
  // commit_add() appends it to the chain (it takes effect for every write
  // that starts after) and resumes writes. On any error after begin_add()
  // succeeded, resume_writes() must follow. So no first write queued under
  // the old chain is still in the journal once the manifest lists the new
  // snapshot: a replay after a crash never preserves an older write into a
  // newer snapshot.
  int begin_add(std::string& err);
  void commit_add(std::shared_ptr<SnapshotStore> s);
  // Deleting, last steps: finish_remove closes the write gate and hands down
  // whatever older snapshots still read through it (chunks preserved since
  // the bulk hand-down), and LEAVES WRITES PAUSED with the snapshot still in
  // the chain, so the control plane can record the deletion durably first;
  // then drop_removed() takes it out of the chain (writes still paused). If
  // recording fails the snapshot simply stays, exact. resume_writes() must
  // follow, whatever happens.
  int finish_remove(uint64_t id, std::string& err);
  bool drop_removed(uint64_t id) { return cow_->drop(id); }
  void resume_writes() { locks_->gate.open(); }
  std::shared_ptr<const Chain> chain() const { return cow_->chain(); }
  std::shared_ptr<SnapshotStore> find(uint64_t id) const { return cow_->find(id); }
  // Bulk hand-down of a snapshot being deleted (CowDevice::hand_down),
  // refused while a rollback merges. Deleting a snapshot is hand_down over
  // all chunks, then finish_remove and drop_removed.
  int hand_down(uint64_t id, uint64_t from, uint64_t max, uint64_t& next, std::string& err);

  // Rollback (rollback_device.hh). prepare closes the write gate with the
  // queue drained, computes the pending set, writes the job file and keeps
  // writes paused until activate_rollback() or abort_rollback().
  int prepare_rollback(uint64_t snapshot_id, const std::string& job_path, std::string& err);
  void activate_rollback();
  void abort_rollback();
  int merge_step(uint64_t from, uint64_t max, uint64_t& next, std::string& err) {
    return rollback_->merge_step(from, max, next, err);
  }
  // Drops a finished job (EAGAIN if chunks are still pending).
  int finish_rollback(std::string& err);
  std::shared_ptr<MergeJob> merge_job() const { return rollback_->merge_job(); }

  // The chunks that may differ between snapshot `from` and snapshot `to`
  // (0: the live volume), as ascending disjoint runs (change_map.hh),
  // limited to `count` chunks from `first`. Never short of a real change:
  // for the live volume it includes chunks whose first writes are still
  // queued and chunks a rollback has still pending. EINVAL with `kind` and
  // `err` when the range is refused. Enters the write gate like a write
  // (the chain, the merge job and the queue stay put meanwhile); takes the
  // first-write queue's lock briefly; no stripes. Any thread.
  int changed_chunks(uint64_t from, uint64_t to, std::vector<ChunkRun>& runs, ChangeError& kind, std::string& err,
                     uint64_t first, uint64_t count) override;
  int changed_chunks(uint64_t from, uint64_t to, std::vector<ChunkRun>& runs, ChangeError& kind, std::string& err) {
    return changed_chunks(from, to, runs, kind, err, 0, UINT64_MAX);
  }
  // Snapshot names (the control plane owns them; it sets them after every
  // manifest change), for qemu:dirty-bitmap:NAME meta contexts.
  void set_snapshot_names(std::vector<std::pair<std::string, uint64_t>> names);
  uint64_t bitmap_from(const std::string& name, uint64_t at) const override;
  std::vector<std::string> bitmaps_at(uint64_t at) const override;

  // A read-only device showing snapshot `id` as it was created (null: no such snapshot).
  std::shared_ptr<Device> view(uint64_t id);

 private:
  const std::shared_ptr<Device> live_;
  const std::shared_ptr<VolumeLocks> locks_;
  const std::shared_ptr<CowDevice> cow_;
  const std::shared_ptr<RollbackDevice> rollback_;
  const std::shared_ptr<JournalDevice> journal_;
  mutable std::mutex names_mu_;  // leaf; guards names_
  std::vector<std::pair<std::string, uint64_t>> names_;
};

}  // namespace nbd
