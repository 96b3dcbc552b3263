// first_write_queue.hh — acknowledges first writes before their chunks' old
// data is preserved, without giving up crash safety.
//
// Why: a write to a chunk not yet preserved must wait until the chunk's old
// data is durable in the snapshot (one fdatasync) before the live image may
// change. Done inline, every such write waits for a sync: with QD32 about
// 10k writes/s on this class of disk, a tenth of a write that needs none.
//
// How: such a write (and any later write to a chunk that still has queued
// entries) is appended to a journal file (write_journal.hh; no sync) and to
// an in-memory FIFO, and acknowledged. A background thread takes the oldest
// entries as a batch and calls `apply`, which preserves the old data of
// every chunk they touch (one snapshot commit for the batch), then writes
// the entries to the live image in order (page cache). Then the journal's
// checkpoint moves past the batch (synced) and the entries leave the queue.
// Reads of queued chunks are served from the live image with the queued
// entries laid over it in order (overlay_in()).
//
// The journal is there for crashes of the server process (SIGKILL, OOM
// killer, a fault): it lives in memory-backed storage by default
// (/dev/shm), which survives the process but not the machine. Durability
// across power loss comes from the live image, as without a queue: FLUSH
// waits until everything queued before it is applied (settle()), then
// flushes live; a FUA write waits until it is applied, then flushes live.
// Measured: on ext4, appends to a journal file stall for milliseconds while
// the preserver's fdatasyncs commit the filesystem journal, and every writer
// queues behind the stalled append; on tmpfs they do not (bench numbers in
// docs/architecture.md).
//
// Invariants (docs/architecture.md, "First writes"):
//   - the live image holds, for every chunk, its old data until that data is
//     durable in the snapshot: entries reach live only through apply(), which
//     preserves first;
//   - a chunk with queued entries is never written directly: every write to
//     it is queued behind them (JournalDevice routes by touches());
//   - entries leave the queue only after they are applied to live (page
//     cache) and the checkpoint past them is durable, so a replay never
//     re-applies an entry over a later direct write; live itself is made
//     durable by FLUSH and FUA (settle, then the image's fdatasync, whose
//     failure is sticky: file_device.hh), not per batch;
//   - process crash (SIGKILL): acknowledged entries are in the journal, and
//     replay at the next open preserves, then applies them;
//   - power loss: a completed FLUSH or FUA write is in the flushed live
//     image; unflushed writes may be lost, as the protocol allows; the
//     snapshots are exact because live never changed before preservation.
//     A journal on a disk that survives the power loss is replayed too, and
//     that is safe: the checkpoint is synced before entries leave the queue.
// Bounds: the journal ring and the number of chunks queued; a full queue
// makes writers wait for the thread (backpressure), so memory stays bounded.
// Pacing: a batch preserves at most 1024 chunks and 16 MiB of old data, so
// under sustained first writes a writer without room waits for one batch of
// bounded work. The depth is the static bound given at construction: a
// burst up to it is acknowledged at journal speed. A drain (shrink_to,
// before a snapshot create, delete or rollback pauses writes) lowers the
// bound step by step from what is queued, writers getting a quarter of the
// room each batch frees, so they keep moving while the queue empties,
// instead of waiting for all of it (before: the whole drain, over a
// second under sustained first writes). Measured: bench-pauses
// (docs/architecture.md).
// Writers without room are admitted in arrival order (admission_): room
// appears a batch at a time, and while a drain shrinks the queue the bound
// may be smaller than one entry (up to 257 chunks), which then fits only
// into an empty queue; a newcomer with a small entry must not overtake it,
// or a steady stream of small first writes would keep it waiting for as
// long as the stream lasts.
//
// Locking: mu_ guards the FIFO, the index, the accounting and journal
// appends (appends are serialised so the journal is a prefix of complete
// entries). The thread runs apply() and the checkpoint without mu_. Lock
// order: the volume gate (VolumeLocks) → mu_; apply() takes the stripe locks without
// holding mu_.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#include "write_journal.hh"

namespace nbd {

struct QueuedWrite {
  uint64_t seq = 0;
  uint16_t type = WriteJournal::kWrite;  // or kZero
  bool may_trim = false;
  uint64_t offset = 0;
  uint32_t length = 0;
  // kWrite: the bytes. While the entry is queued they are read in place from
  // the journal's mapping (its ring space is not reused before the entry
  // leaves the queue), so queued data is not held twice; replayed entries
  // own theirs (`owned`). Only the first-write thread and the owner of a
  // Batch use it: readers get copies (overlay_in()).
  const uint8_t* data = nullptr;
  std::vector<uint8_t> owned;
  uint64_t journal_at = 0;    // where the entry starts in the journal
  uint64_t span = 0;          // journal bytes it holds (with any skipped ring tail)
  uint64_t first_chunk = 0, last_chunk = 0;
};

class FirstWriteQueue {
 public:
  using Batch = std::vector<std::shared_ptr<const QueuedWrite>>;
  // Preserves what the batch's chunks need, writes the entries to the live
  // image in order and flushes it. Returns 0 or an errno.
  using Apply = std::function<int(const Batch&)>;

  // Creates the journal (and records it: journal_state.hh) when the first
  // entry is queued, so a volume that receives no first write pins no
  // memory and leaves no file. Null: it cannot (err says why).
  using OpenJournal = std::function<std::unique_ptr<WriteJournal>(std::string& err)>;

  // The journal and the thread are made by the first submit.
  FirstWriteQueue(OpenJournal open, uint64_t ring_size, uint32_t chunk_size, uint64_t max_chunks, Apply apply);
  // Stops the thread; queued entries stay in the journal, whose file is
  // never deleted here (JournalDevice retires it with the volume's journal state).
  ~FirstWriteQueue();

  // Replays what a journal holds (at open, before serving): apply, then an
  // empty journal in a new epoch.
  static int replay(WriteJournal& journal, uint32_t chunk_size, const Apply& apply, uint64_t& entries, std::string& err);

  // Queues a write (data != nullptr) or a zeroing, in pieces of bounded size,
  // waiting for room; with fua, waits until it is applied. Returns 0; or
  // ESHUTDOWN when the queue cannot take it (the journal failed: accepting()
  // turns false; or the queue is stopping), and the caller then writes
  // inline; or the error of a background apply that keeps failing, which
  // the caller reports, as an inline write would fail.
  int submit(const uint8_t* data, uint64_t offset, uint64_t length, bool may_trim, bool fua);
  bool accepting() const { return !broken_.load(); }
  // True when some chunk of the range has queued entries.
  bool touches(uint64_t offset, uint64_t length);
  // What queued entries put over [offset, offset + length): the overlapping
  // parts, oldest first, COPIED under the lock (an entry's bytes in the ring
  // may be reused once it has left the queue). Take it before reading live,
  // then lay() it over what live returned: an entry that left the queue
  // meanwhile was applied to live before it left, so laying it over again
  // changes nothing.
  struct OverlayPiece {
    uint64_t offset = 0;
    uint32_t length = 0;
    bool zero = false;
    std::vector<uint8_t> bytes;
  };
  using Overlay = std::vector<OverlayPiece>;
  Overlay overlay_in(uint64_t offset, uint64_t length);
  static void lay(const Overlay& o, uint8_t* buf, uint32_t count, uint64_t offset);
  // Sorted chunks of [first, last] with queued entries.
  std::vector<uint64_t> chunks_in(uint64_t first, uint64_t last);
  bool empty() const { return count_.load() == 0; }
  // Waits until the queue is empty (callers stop new submits first): 0; or,
  // when an apply attempted after the call fails (the live image cannot be
  // written), that error at once: the entries stay queued and journalled,
  // and the thread keeps retrying them.
  int drain();
  // Waits until everything queued before the call has been applied (FLUSH,
  // status); returns the error of a background apply that keeps failing.
  int settle();
  // Lowers the bound on queued chunks step by step towards `chunks` (see
  // Pacing above; writers that would pass it wait for room) and waits until
  // the queue holds no more than `chunks`: so a drain with writes paused
  // that follows is short. 0, or the error of an apply that fails
  // meanwhile. uncap() restores the bound.
  int shrink_to(uint64_t chunks);
  void uncap();
  uint64_t queued() const { return count_.load(); }
  // The journal's file ("" while none was needed yet).
  std::string journal_path();
  // Why the journal could not be created or written ("" if it works).
  std::string journal_error();

 private:
  int append_locked(std::unique_lock<std::mutex>& lk, uint16_t type, const uint8_t* data, uint64_t offset,
                    uint32_t length, bool may_trim);
  void run();
  void set_urgent(bool urgent);  // mu_ held
  // Waits (mu_ held via lk) until done(), with the thread at ordinary priority.
  template <typename Pred>
  void wait_for_thread(std::unique_lock<std::mutex>& lk, Pred done);
  // Waits until entry `seq` is applied: 0, or the background error.
  int wait_applied(std::unique_lock<std::mutex>& lk, uint64_t seq);
  // Calls fn(chunk, entries) for each chunk of [first, last] with entries (mu_ held).
  template <typename Fn>
  void for_each_indexed(uint64_t first, uint64_t last, Fn fn) const;
  void remove_front(size_t n);
  // Pacing (mu_ held): records a batch's apply time; the current bounds.
  uint64_t depth_limit() const;
  uint64_t batch_limit() const;

  const OpenJournal open_journal_;
  const uint64_t ring_size_;
  std::unique_ptr<WriteJournal> journal_;  // set under mu_ by the first append, then never replaced
  std::string journal_error_;              // guarded by mu_
  const uint32_t chunk_size_;
  const uint64_t max_chunks_;
  const Apply apply_;
  const uint64_t pause_ms_;  // test hook: NBD_TEST_FIRST_WRITE_DELAY_MS
  // Test hook NBD_TEST_FIRST_WRITE_BATCH=N: the thread takes a batch only
  // once N entries are queued, or someone waits for it (FLUSH, FUA, a drain,
  // a writer without room, stop), so a test can make batches of a known
  // least size without timing. Default 1: any queued entry.
  const uint64_t min_batch_;
  // Test hook NBD_TEST_FIRST_WRITE_DEPTH=N: the bound on queued chunks is N
  // (so a test gets a small bound whatever the volume). 0 (default): static.
  const uint64_t fixed_depth_;

  std::mutex mu_;
  std::condition_variable cv_;  // entries queued / removed, stop
  std::deque<std::shared_ptr<const QueuedWrite>> fifo_;
  std::unordered_map<uint64_t, std::vector<std::shared_ptr<const QueuedWrite>>> index_;
  uint64_t used_ = 0;          // journal bytes held by queued entries
  uint64_t chunks_ = 0;        // chunk references held by queued entries
  uint64_t applied_seq_ = 0;   // newest entry applied and checkpointed
  int error_ = 0;              // outstanding background failure
  uint64_t failures_ = 0;      // failed applies so far (drain waits for a fresh one)
  uint64_t cap_ = UINT64_MAX;  // temporary lower bound on queued chunks (shrink_to; lowered per batch)
  uint64_t shrink_target_ = 0; // what shrink_to waits for
  uint64_t shrink_reached_ = 0; // batches after which the queue was at or under shrink_target_ (run())
  uint64_t next_ticket_ = 0;   // admission order of writers waiting for room
  std::deque<uint64_t> admission_;  // tickets of the writers waiting for room, oldest first
  int waiters_ = 0;            // threads waiting for the queue to make progress
  bool urgent_ = true;         // the thread's scheduling class (set_urgent)
  bool stop_ = false;
  std::atomic<uint64_t> count_{0};
  std::atomic<bool> broken_{false};
  std::thread thread_;
};

}  // namespace nbd
