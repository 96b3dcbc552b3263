// journal_device.hh — the first-write journal layer: the top of a volume's
// live chain, where every write enters.
//
//     connection ─► [ReadOnlyDevice] ─► JournalDevice ─► RollbackDevice ─► CowDevice ─► FileDevice
//                                        first writes: journalled, acked,
//                                        applied in the background
//
// Every write, TRIM and WRITE_ZEROES enters the volume's WriteGate here (the
// layers below run inside it) and is refused at once if the image lost a
// write-back (health()): then nothing is preserved or queued for it.
//
// First writes (first_write_queue.hh): when the volume has a journal, a
// write, TRIM or WRITE_ZEROES that would have to preserve a chunk
// (CowDevice::needs_preserving), or that touches a chunk with queued
// entries, is journalled and acknowledged at once; a background thread
// preserves the old data in large batches (CowDevice::preserve_chunks) and
// then applies the entries to the image (apply_queued, through
// CowDevice::raw_pwrite/raw_zero). Reads lay the queued entries over what
// the layers below return. Other writes go on down the chain (the inline
// path). While a rollback merges (RollbackDevice::merging) the queue is not
// used: it was drained before the rollback started, and every write takes
// the inline path, which merges first.
//
// Invariants:
//  - The queue always works against the chain it was filled under: every
//    operation that changes the chain or starts a rollback first drains it
//    with the gate closed (pause_and_drain, called by Volume).
//  - A queued write is marked dirty for rollback (RollbackDevice::mark_dirty)
//    when it is queued.
//  - Durability comes from the image, not the journal: FLUSH and FUA apply
//    what is queued first. The journal file is named by the volume's journal
//    state only once complete; it is forgotten (state first, then file) only
//    once everything it held reached the image (journal_state.hh).
//
// Threads: data-path calls on connection threads; apply_queued on the queue's
// thread (outside the gate: the chain cannot change while entries are
// queued); the control-plane calls on libuv workers or the main thread.
// Locking: gate (entered here) → stripes (taken by CowDevice) →
// SnapshotStore::mu_; mode_mu_ is a leaf. queue_ is swapped atomically, with
// the gate closed (or at open and stop).
#pragma once

#include <atomic>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "cow_device.hh"
#include "device.hh"
#include "first_write_queue.hh"
#include "memory_budget.hh"
#include "rollback_device.hh"
#include "volume_locks.hh"

namespace nbd {

class JournalDevice : public FilterDevice {
 public:
  // `rollback` is next; `cow` is the copy-on-write layer under it, which the
  // queue asks and preserves through.
  JournalDevice(std::shared_ptr<RollbackDevice> rollback, std::shared_ptr<CowDevice> cow,
                std::shared_ptr<VolumeLocks> locks);
  ~JournalDevice() override;

  int pread(void* buf, uint32_t count, uint64_t offset) override;
  int extents(uint32_t count, uint64_t offset, uint32_t max, std::vector<Extent>& out) override;
  int pwrite(const void* buf, uint32_t count, uint64_t offset, IoFlags flags) override;
  int trim(uint32_t count, uint64_t offset, IoFlags flags) override;
  int zero(uint32_t count, uint64_t offset, IoFlags flags) override;
  int flush() override;
  // Applies every queued first write to the image (server stop) and retires
  // the journal; if they cannot be applied, the journal stays for the next
  // open and kept_journal() says so.
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
  // Gate closed, a snapshot just added: starts the queue if the volume has a
  // journal configured and none runs yet.
  void snapshot_added();
  // Waits until the first writes queued before the call are applied (so
  // status shows their preservation and any failure).
  void settle();
  // "inline", "journal" or "inline (journal unavailable: ...)", and queued entries.
  std::string first_write_mode() const;
  uint64_t queued_writes() const;
  // Sorted chunks of [first, last] with queued entries (taken under the queue's lock): their
  // writes are acknowledged but not yet preserved, so no bitmap has them.
  std::vector<uint64_t> queued_chunks(uint64_t first, uint64_t last) const;
  // Closes the gate with the queue drained, keeping the pause short (see the
  // .cc). Returns with the gate CLOSED, also on error (err says why).
  int pause_and_drain(std::string& err);
  // The last pause_and_drain's phases before the pause, µs: applying what
  // was queued while writes flowed (settle + shrink), and writing back the
  // image's dirty pages (the pre-flush). With the pause itself (the gate's
  // figure) they make up most of a create's latency.
  uint64_t last_drain_us() const { return last_drain_us_.load(); }
  uint64_t last_preflush_us() const { return last_preflush_us_.load(); }

 private:
  static constexpr uint64_t kPauseDrainChunks = 64;  // queued chunks left for the drain with writes paused
  std::shared_ptr<FirstWriteQueue> queue() const { return std::atomic_load(&queue_); }
  // Writes, TRIM and WRITE_ZEROES (data null): queues the request when it
  // must go through the queue (first writes, chunks with queued entries) and
  // returns its result; nullopt: take the inline path (no queue, a merge
  // running, or the journal failed: then what it holds is applied first).
  std::optional<int> via_queue(const void* data, uint32_t count, uint64_t offset, bool may_trim, IoFlags flags);
  // Background batch (the queue's thread): preserve, then apply.
  int apply_queued(const FirstWriteQueue::Batch& batch);
  void start_queue();  // gate closed (or at open); the journal is made by the first first write
  // Gate closed: no new entries. 0, or the error that keeps the queue from
  // being applied (err says so).
  int drain_queue(std::string& err);
  // Drops the queue (thread stopped); when it holds nothing, the volume's
  // journal state, then the journal file.
  void retire_queue();

  const std::shared_ptr<RollbackDevice> rollback_;  // == next_, typed
  const std::shared_ptr<CowDevice> cow_;
  const std::shared_ptr<VolumeLocks> locks_;
  const uint32_t chunk_size_;
  std::shared_ptr<FirstWriteQueue> queue_;  // atomic_load/store; set with the gate closed
  JournalConfig journal_cfg_;               // set at open
  mutable std::mutex mode_mu_;              // leaf
  std::string kept_journal_;                // guarded by mode_mu_
  std::atomic<uint64_t> last_drain_us_{0}, last_preflush_us_{0};
};

}  // namespace nbd
