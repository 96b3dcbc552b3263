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
// Rollback to snapshot S (index k): the set of chunks where the live image
// may differ from S is exactly the union of the bitmaps of S and every newer
// snapshot (every change to live since S preserved its chunk into one of
// them). prepare_rollback() computes it with writes drained into a MergeJob
// (persisted); once activated, live reads of a pending chunk read S, and a
// merge copies S's data into live through the normal write path (preserving
// the old live data into the newest snapshot first, so every other snapshot
// stays exact). A host write to a pending chunk merges that chunk first
// (durably), then applies: writes during the merge win. Merges and host
// writes run inside the WriteGate, so a new rollback, which replaces the
// running one (its pending set includes the old one's), never races an old
// merge. Snapshots cannot be created or deleted while a merge runs.
//
// First writes (first_write_queue.hh): when the volume has a journal, a
// write, TRIM or WRITE_ZEROES that would have to preserve a chunk, or that
// touches a chunk with queued entries, is journalled and acknowledged at
// once; a background thread preserves the old data in large batches and
// then applies the entries to the live image (apply_queued). Reads lay the
// queued entries over the live image. Every operation that changes the chain
// or starts a rollback drains the queue with the gate closed, so the queue
// always works against the chain it was filled under, and never runs during
// a merge (writes then take the inline path above).
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
#include <optional>
#include <string>
#include <vector>

#include "device.hh"
#include "first_write_queue.hh"
#include "memory_budget.hh"
#include "merge_job.hh"
#include "snapshot_store.hh"
#include "write_gate.hh"

namespace nbd {

class CowDevice : public FilterDevice, public std::enable_shared_from_this<CowDevice> {
 public:
  // (snapshot id, reason): called on the data-path thread that saw the failure.
  using FailureCallback = std::function<void(uint64_t, const std::string&)>;
  using Chain = std::vector<std::shared_ptr<SnapshotStore>>;

  CowDevice(std::shared_ptr<Device> live, uint32_t chunk_size, FailureCallback on_failure);
  ~CowDevice() override;

  uint32_t chunk_size() const { return chunk_size_; }

  int pread(void* buf, uint32_t count, uint64_t offset) override;
  int extents(uint32_t count, uint64_t offset, uint32_t max, std::vector<Extent>& out) override;
  int pwrite(const void* buf, uint32_t count, uint64_t offset, IoFlags flags) override;
  int trim(uint32_t count, uint64_t offset, IoFlags flags) override;
  int zero(uint32_t count, uint64_t offset, IoFlags flags) override;
  int flush() override;
  // Applies every queued first write to the live image (server stop) and
  // retires the journal; if they cannot be applied, the journal stays for
  // the next open and kept_journal() says so.
  void drain() override;
  // After drain(): "" or what was kept ("N queued writes kept in PATH: why").
  std::string kept_journal() const;

  // Where a volume's first-write journal lives (journal_state.hh).
  struct JournalConfig {
    std::string state_file;  // IMAGE.nbd/journal.state
    std::string dir;         // where a new journal is created
    std::string owner;       // the image path, recorded in the journal
    uint64_t ring_size = 0;  // 0: first writes are preserved inline
    bool read_only = false;  // served read-only: nothing may be written
    std::shared_ptr<MemoryBudget> budget;  // the server's bound on journal memory (null: none)
  };
  // Why open_journal failed, for the control plane's error code.
  enum class JournalError { kNone, kPending, kMissing, kCorrupt, kIo };
  // At open, after the snapshots are loaded: replays what the volume's
  // pending journal holds (sets `replayed`; `note` says why a journal the
  // state named was not needed, e.g. lost with a reboot), retires it, and
  // starts the first-write queue if the volume has snapshots.
  int open_journal(const JournalConfig& cfg, uint64_t& replayed, std::string& note, JournalError& kind,
                   std::string& err);
  // Waits until the first writes queued before the call are applied (so
  // status shows their preservation and any failure).
  void settle();
  // "inline", "journal" or "inline (journal unavailable: ...)", and queued entries.
  std::string first_write_mode() const;
  uint64_t queued_writes() const;
  // Write pauses (create, delete, rollback): the last and the longest, µs.
  uint64_t last_pause_us() const { return gate_.last_pause_us(); }
  uint64_t max_pause_us() const { return gate_.max_pause_us(); }

  // Control plane (any thread). Creating a snapshot is two steps around the
  // manifest write: begin_add() pauses writes, applies every queued first
  // write and flushes the live volume (so the snapshot holds every
  // acknowledged write, durably) and LEAVES WRITES PAUSED; the control plane
  // records the snapshot; then commit_add() appends it to the chain (it
  // takes effect for every write that starts after) and resumes writes. On
  // any error after begin_add() succeeded, resume_writes() must follow.
  // So no first write queued under the old chain is still in the journal
  // once the manifest lists the new snapshot: a replay after a crash never
  // preserves an older write into a newer snapshot.
  int begin_add(std::string& err);
  void commit_add(std::shared_ptr<SnapshotStore> s);
  // Loads a snapshot at start-up (no flush; chain order = call order).
  void load_snapshot(std::shared_ptr<SnapshotStore> s);
  // Deleting, last steps: finish_remove closes the write gate and hands down
  // whatever older snapshots still read through it (chunks preserved since
  // the bulk hand-down), and LEAVES WRITES PAUSED with the snapshot still in
  // the chain, so the control plane can record the deletion durably first;
  // then drop_removed() takes it out of the chain (writes still paused). If
  // recording fails the snapshot simply stays, exact. resume_writes() must
  // follow, whatever happens.
  int finish_remove(uint64_t id, std::string& err);
  bool drop_removed(uint64_t id) { return drop_from_chain(id); }
  void resume_writes() { gate_.open(); }
  std::shared_ptr<const Chain> chain() const;
  std::shared_ptr<SnapshotStore> find(uint64_t id) const;
  // For chunks [from, from + max) held by snapshot `id`: gives each chunk
  // that older snapshots read through `id` to the nearest older HEALTHY
  // snapshot lacking it, past failed ones (which get nothing), unless a
  // snapshot on the way holds it; every older one then reads it through that
  // heir. Sets `next`. Fails (nothing marked failed) if a healthy heir cannot
  // take its copy. Deleting a snapshot is hand_down over all chunks, then
  // finish_remove and drop_removed.
  int hand_down(uint64_t id, uint64_t from, uint64_t max, uint64_t& next, std::string& err);

  // Rollback (see the design note above). prepare closes the write gate,
  // computes the pending set, writes the job file and keeps writes paused
  // until activate_rollback() or abort_rollback().
  int prepare_rollback(uint64_t snapshot_id, const std::string& job_path, std::string& err);
  void activate_rollback();
  void abort_rollback();
  // At open: resumes a job recorded before a restart.
  int resume_rollback(const std::string& job_path, std::string& err);
  // Background merge: copies up to `max` pending chunks from `from` on; sets
  // `next` (chunks() when the scan reached the end).
  int merge_step(uint64_t from, uint64_t max, uint64_t& next, std::string& err);
  // Drops a finished job (EAGAIN if chunks are still pending).
  int finish_rollback(std::string& err);
  std::shared_ptr<MergeJob> merge_job() const { return std::atomic_load(&job_); }

  // A read-only device showing snapshot `id` as it was created.
  std::shared_ptr<Device> view(uint64_t id);

  // Reads [offset, offset+count) of snapshot index i of `chain`.
  int read_snapshot(const Chain& chain, size_t i, void* buf, uint32_t count, uint64_t offset);
  int snapshot_extents(const Chain& chain, size_t i, uint32_t count, uint64_t offset, uint32_t max,
                       std::vector<Extent>& out);

 private:
  static constexpr size_t kStripes = 1024;
  std::shared_ptr<FirstWriteQueue> queue() const { return std::atomic_load(&queue_); }
  // Writes, TRIM and WRITE_ZEROES (data null): queues the request when it
  // must go through the queue (first writes, chunks with queued entries) and
  // returns its result; nullopt: take the inline path (no queue, a merge
  // running, or the journal failed: then what it holds is applied first).
  std::optional<int> via_queue(const void* data, uint32_t count, uint64_t offset, bool may_trim, IoFlags flags);
  int apply_queued(const FirstWriteQueue::Batch& batch);
  void start_queue();  // gate closed (or at open); the journal is made by the first first write
  // Closes the gate with the queue drained, keeping the pause short (see the
  // .cc). Returns with the gate CLOSED, also on error (err says why).
  int pause_and_drain(std::string& err);
  static constexpr uint64_t kPauseDrainChunks = 64;  // queued chunks left for the drain with writes paused
  // Gate closed: no new entries. 0, or the error that keeps the queue from
  // being applied (err says so).
  int drain_queue(std::string& err);
  // Drops the queue (thread stopped); when it holds nothing, the volume's
  // journal state, then the journal file.
  void retire_queue();
  static constexpr size_t kHandDownBatch = 65536;  // chunks per hand-down commit
  int preserve(uint64_t offset, uint64_t count);
  // Preserves those of `chunks` the target still needs; stripes held.
  void preserve_locked(const Chain& chain, std::vector<uint64_t> chunks);
  // Keeps the still-pending of `chunks` and, stripes held, preserves them and
  // copies the job's snapshot data into live (with FUA if asked).
  int copy_locked(MergeJob& job, const Chain& chain, std::vector<uint64_t>& chunks, bool fua);
  // On-demand merge for a host write (stripes held): copy with FUA, commit.
  int merge_locked(MergeJob& job, const Chain& chain, std::vector<uint64_t> chunks);
  // Host writes: merge whatever of [offset, offset+count) is still pending.
  int merge_range(uint64_t offset, uint64_t count);
  static std::vector<size_t> stripes_of(const std::vector<uint64_t>& chunks);
  void lock_stripes(const std::vector<size_t>& s);
  void unlock_stripes(const std::vector<size_t>& s);
  // True if some chunk of the range still has to be preserved (no locks taken).
  bool needs_preserving(uint64_t offset, uint64_t count) const;
  bool needs_merging(uint64_t offset, uint64_t count) const;
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
  std::shared_ptr<MergeJob> job_;       // running merge (atomic_load/store)
  std::shared_ptr<MergeJob> prepared_;  // between prepare and activate/abort (gate closed)
  void mark_dirty(uint64_t offset, uint64_t count);
  // Chunks written since the last rollback began; with clean_of_ (the
  // snapshot live equalled when that rollback's merge finished, 0 if
  // unknown) a repeated rollback to the same snapshot merges only these.
  // In memory only: after a restart the full pending set is used.
  std::unique_ptr<Bitmap> dirty_;
  uint64_t clean_of_ = 0;  // changed with writes drained
  std::mutex stripes_[kStripes];
  std::shared_ptr<FirstWriteQueue> queue_;  // atomic_load/store; set with the gate closed
  JournalConfig journal_cfg_;
  mutable std::mutex mode_mu_;
  std::string kept_journal_;  // guarded by mode_mu_
};

}  // namespace nbd
