// journal_device.cc — see journal_device.hh for the design, the threads and locking.
#include "journal_device.hh"

#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstring>

#include "chunk_runs.hh"
#include "crash_point.hh"
#include "journal_state.hh"

namespace nbd {

JournalDevice::JournalDevice(std::shared_ptr<RollbackDevice> rollback, std::shared_ptr<CowDevice> cow,
                             std::shared_ptr<VolumeLocks> locks)
    : FilterDevice(rollback),
      rollback_(std::move(rollback)),
      cow_(std::move(cow)),
      locks_(std::move(locks)),
      chunk_size_(cow_->chunk_size()) {}

JournalDevice::~JournalDevice() {
  // Stop the queue's thread before the members its apply() uses go away;
  // queued entries stay in the journal for the next open.
  std::atomic_store(&queue_, std::shared_ptr<FirstWriteQueue>());
}

int JournalDevice::pause_and_drain(std::string& err) {
  // Writes pause only for what is left: first shrink the queue to a few
  // chunks while writes still flow (they keep being admitted, at a share
  // of the preservation rate: FirstWriteQueue::shrink_to), write back the
  // image's dirty pages, and only then close the gate and drain (and the
  // caller flush) the rest. If the queue cannot be applied, that is found
  // out before the pause (and reported by the drain below at once).
  using clock = std::chrono::steady_clock;
  auto us = [](clock::time_point a, clock::time_point b) {
    return static_cast<uint64_t>(std::chrono::duration_cast<std::chrono::microseconds>(b - a).count());
  };
  const auto t0 = clock::now();
  auto q = queue();
  if (q && !q->empty()) q->shrink_to(kPauseDrainChunks);
  const auto t1 = clock::now();
  // Write back what is dirty now, so that the flush with writes paused
  // (begin_add) has only what was written meanwhile left to do. Its error
  // is the paused flush's to report (a failed sync is sticky).
  next_->flush();
  last_drain_us_.store(us(t0, t1));
  last_preflush_us_.store(us(t1, clock::now()));
  locks_->gate.close();  // in-flight writes drain; new ones wait
  int e = drain_queue(err);
  if (q) q->uncap();  // the gate holds writers back now
  return e;  // the gate stays closed, whatever the result
}

void JournalDevice::snapshot_added() {
  if (!queue() && journal_cfg_.ring_size > 0 && !journal_cfg_.read_only) start_queue();
}

int JournalDevice::pread(void* buf, uint32_t count, uint64_t offset) {
  auto q = queue();
  if (!q || q->empty()) return next_->pread(buf, count, offset);
  // Entries first, then what lies below: an entry that leaves the queue
  // meanwhile was applied to live before it left, and laying it over again
  // is harmless. (Never during a merge: the queue is empty then.)
  auto over = q->overlay_in(offset, count);
  int e = next_->pread(buf, count, offset);
  if (e == 0 && !over.empty()) FirstWriteQueue::lay(over, static_cast<uint8_t*>(buf), count, offset);
  return e;
}

int JournalDevice::extents(uint32_t count, uint64_t offset, uint32_t max, std::vector<Extent>& out) {
  // Chunks with queued first writes are data, whatever live says yet.
  std::vector<uint64_t> queued;
  auto q = queue();
  if (q && !q->empty()) queued = q->chunks_in(offset / chunk_size_, (offset + count - 1) / chunk_size_);
  if (queued.empty()) return next_->extents(count, offset, max, out);
  int r = for_runs(offset, count, chunk_size_, [&](uint64_t c) { return std::binary_search(queued.begin(), queued.end(), c); },
                   [&](uint64_t off, uint64_t len, bool is_queued) {
                     if (out.size() >= max) return -1;  // enough: stop (not an error)
                     if (is_queued) {
                       out.push_back({len, 0});
                       return 0;
                     }
                     size_t before = out.size();
                     int e = next_->extents(static_cast<uint32_t>(len), off, static_cast<uint32_t>(max - out.size()), out);
                     if (e) return e;
                     uint64_t covered = 0;
                     for (size_t i = before; i < out.size(); ++i) covered += out[i].length;
                     return covered < len ? -1 : 0;  // the lower layer stopped early: so do we
                   });
  return r > 0 ? r : 0;
}

// Writes: first writes (and writes to chunks with queued entries) go through
// the queue when there is one; the rest go on down the chain (the inline
// path: RollbackDevice merges, CowDevice preserves, then the image).
std::optional<int> JournalDevice::via_queue(const void* data, uint32_t count, uint64_t offset, bool may_trim, IoFlags flags) {
  auto q = queue();
  if (!q || rollback_->merging()) return std::nullopt;  // no queue during a merge: it was drained before it
  if (q->accepting()) {
    // The lock-free bitmap test first: a first write needs no look at the queue.
    if (!cow_->needs_preserving(offset, count) && !q->touches(offset, count)) return std::nullopt;
    rollback_->mark_dirty(offset, count);
    int e = q->submit(static_cast<const uint8_t*>(data), offset, count, may_trim, flags.fua);
    if (e == 0) return flags.fua ? next_->flush() : 0;
    if (e != ESHUTDOWN) return e;
  }
  // The journal failed: what it holds reaches live before anything writes
  // inline; if it cannot, this write fails too (it may touch a queued chunk).
  if (int e = q->drain()) return e;
  return std::nullopt;
}

int JournalDevice::pwrite(const void* buf, uint32_t count, uint64_t offset, IoFlags flags) {
  GateGuard g(locks_->gate);
  if (int e = next_->health()) return e;  // it cannot land: preserve nothing, queue nothing
  if (auto r = via_queue(buf, count, offset, false, flags)) return *r;
  return next_->pwrite(buf, count, offset, flags);
}

int JournalDevice::trim(uint32_t count, uint64_t offset, IoFlags flags) {
  GateGuard g(locks_->gate);
  if (int e = next_->health()) return e;  // it cannot land: preserve nothing, queue nothing
  // Queued as a zeroing that may punch a hole: what a trim does here.
  if (auto r = via_queue(nullptr, count, offset, true, flags)) return *r;
  return next_->trim(count, offset, flags);
}

int JournalDevice::zero(uint32_t count, uint64_t offset, IoFlags flags) {
  GateGuard g(locks_->gate);
  if (int e = next_->health()) return e;  // it cannot land: preserve nothing, queue nothing
  // A fast zero must not be queued (the queue copies old data first): refuse
  // at once if it would be. The layers below refuse it on the inline path
  // (a merge or a preservation needed).
  if (flags.fast_only) {
    auto q = queue();
    if (q && (q->touches(offset, count) || cow_->needs_preserving(offset, count))) return ENOTSUP;
  }
  if (auto r = via_queue(nullptr, count, offset, flags.may_trim, flags)) return *r;
  return next_->zero(count, offset, flags);
}

int JournalDevice::flush() {
  // Durability comes from the live image, not the journal: apply what is
  // queued (preserving first), then flush live.
  if (auto q = queue())
    if (int e = q->settle()) return e;
  return next_->flush();
}

void JournalDevice::drain() {
  // The server is stopping: apply everything, then retire the queue and its
  // journal. Nothing writes after this. If the queue cannot be applied (the
  // live image refuses writes), its entries stay in the journal, which the
  // volume's state still names: the next open replays them.
  auto q = queue();
  if (!q) return next_->drain();
  std::string err;
  if (drain_queue(err) != 0) {
    std::lock_guard<std::mutex> lk(mode_mu_);
    kept_journal_ = q->journal_path() + " keeps them for the next start: " + err;
  }
  q.reset();
  retire_queue();
  next_->drain();
}

std::vector<uint64_t> JournalDevice::queued_chunks(uint64_t first, uint64_t last) const {
  auto q = queue();
  if (!q) return {};
  return q->chunks_in(first, last);
}

std::string JournalDevice::kept_journal() const {
  std::lock_guard<std::mutex> lk(mode_mu_);
  return kept_journal_;
}

void JournalDevice::settle() {
  if (auto q = queue()) q->settle();  // its error is FLUSH's to report
}

int JournalDevice::drain_queue(std::string& err) {
  auto q = queue();
  if (!q) return 0;
  int e = q->drain();
  if (e)
    err = std::to_string(q->queued()) + " first writes queued for the volume cannot be applied to the image (" +
          strerror(e) + "); they are kept in the journal and applied as soon as the image can be written";
  return e;
}

void JournalDevice::retire_queue() {
  auto q = std::atomic_exchange(&queue_, std::shared_ptr<FirstWriteQueue>());
  if (!q) return;
  const bool empty = q->empty();
  const std::string path = q->journal_path();
  q.reset();  // the last reference at stop: its thread ends here
  if (!empty || path.empty()) return;  // still named: replayed at the next open; or none was made
  std::string err;
  // State first, then the file: a crash in between leaves an unnamed,
  // drained journal, never a named one that is missing.
  if (clear_journal_state(journal_cfg_.state_file, err) != 0) return;
  crash_point("journal.retire.cleared");
  ::unlink(path.c_str());
}

uint64_t JournalDevice::queued_writes() const {
  auto q = queue();
  return q ? q->queued() : 0;
}

std::string JournalDevice::first_write_mode() const {
  auto q = queue();
  if (q && q->accepting()) return "journal";
  if (q) return "inline (journal unavailable: " + q->journal_error() + ")";
  return "inline";
}

// Background batch of queued first writes: preserve every chunk they touch
// that the target still needs (one commit), then apply them in order (page
// cache; FLUSH and FUA flush live). Preservation failure marks snapshots failed, as inline; the
// writes are applied either way.
int JournalDevice::apply_queued(const FirstWriteQueue::Batch& batch) {
  // The image lost a write-back: nothing more lands (the entries stay
  // journalled for the next start, and no snapshot is failed for it).
  if (int e = next_->health()) return e;
  {
    std::vector<uint64_t> touched;
    for (auto& q : batch)
      for (uint64_t c = q->first_chunk; c <= q->last_chunk; ++c) touched.push_back(c);
    cow_->preserve_chunks(std::move(touched));  // one commit for the batch; takes the stripes
  }
  scoped_crash_point("apply.preserved");
  for (auto& q : batch) {
    if (crash_armed() && &q == &batch[batch.size() / 2]) scoped_crash_point("apply.half");
    IoFlags f;
    f.may_trim = q->may_trim;
    // Preserved above, and no merge runs while entries are queued: straight to the image.
    int e = q->type == WriteJournal::kWrite ? cow_->raw_pwrite(q->data, q->length, q->offset, IoFlags{})
                                            : cow_->raw_zero(q->length, q->offset, f);
    if (e) return e;
  }
  return 0;  // live is flushed by FLUSH (after settling) and FUA, not per batch
}

void JournalDevice::start_queue() {
  // The journal is made by the first first write (so a volume that gets
  // none pins no memory and leaves no file): complete and synced before
  // the state names it; entries are appended only after (journal_state.hh).
  auto open = [this](std::string& err) -> std::unique_ptr<WriteJournal> {
    std::shared_ptr<void> reserved;
    if (journal_cfg_.budget && !(reserved = journal_cfg_.budget->reserve(journal_cfg_.ring_size))) {
      err = "the server's journal memory (" + std::to_string(journal_cfg_.budget->limit() >> 20) +
            " MiB, --journal-memory) is taken by other volumes' journals";
      return nullptr;
    }
    JournalState st;
    st.id = new_journal_id();
    st.path = journal_cfg_.dir + "/" + id_hex(st.id) + ".journal";
    st.boot = current_boot_id();
    st.is_volatile = memory_backed(journal_cfg_.dir);
    st.created_ms = static_cast<uint64_t>(std::chrono::duration_cast<std::chrono::milliseconds>(
                                              std::chrono::system_clock::now().time_since_epoch())
                                              .count());
    auto journal = WriteJournal::create(st.path, st.id, journal_cfg_.owner, size(), chunk_size_, journal_cfg_.ring_size, err);
    if (journal) crash_point("journal.create.made");
    if (journal && save_journal_state(journal_cfg_.state_file, st, err) != 0) {
      // The state may be on disk already (the failure can come after the
      // rename): forget it first; if even that fails, keep the (empty)
      // journal it may name rather than leave a named journal missing.
      journal.reset();
      std::string ignored;
      if (clear_journal_state(journal_cfg_.state_file, ignored) == 0) ::unlink(st.path.c_str());
    }
    if (journal) crash_point("journal.create.recorded");
    if (journal) journal->hold(std::move(reserved));
    return journal;
  };
  const uint64_t max_chunks = std::max<uint64_t>(1024, (256u << 20) / chunk_size_);
  std::atomic_store(&queue_, std::make_shared<FirstWriteQueue>(open, journal_cfg_.ring_size, chunk_size_, max_chunks,
                                                               [this](const FirstWriteQueue::Batch& b) { return apply_queued(b); }));
}

int JournalDevice::open_journal(const JournalConfig& cfg, uint64_t& replayed, std::string& note, JournalError& kind,
                            std::string& err) {
  journal_cfg_ = cfg;
  replayed = 0;
  kind = JournalError::kNone;
  auto failed = [&](JournalError k, int e) {
    kind = k;
    return e ? e : EINVAL;
  };
  std::optional<JournalState> st;
  if (int e = load_journal_state(cfg.state_file, st, err)) return failed(e == EINVAL ? JournalError::kCorrupt : JournalError::kIo, e);
  if (st) {
    int code = 0;
    auto journal = WriteJournal::open(st->path, st->id, size(), chunk_size_, code, err);
    if (!journal && code == ENOENT && st->is_volatile && !st->boot.empty() && st->boot != current_boot_id()) {
      // Memory-backed and the machine restarted since: it went with the page
      // cache, and so did nothing a completed FLUSH or FUA covered (those
      // wait until the entries are applied to the live image).
      note = "the first-write journal " + st->path + " was in memory and the machine has restarted since: " +
             "writes acknowledged after the last completed FLUSH before the restart are lost, as on a disk with a volatile cache";
      if (!cfg.read_only && clear_journal_state(cfg.state_file, err) != 0) return failed(JournalError::kIo, EIO);
    } else if (!journal && code == ENOENT) {
      err = "the volume's first-write journal " + st->path + " (id " + id_hex(st->id) +
            ") is missing; it may hold acknowledged writes. Make the file available at that path again (was its " +
            "directory removed, or is it on a filesystem that is not mounted?), or, to accept losing those writes, " +
            "run: node-nbd-server journal discard IMAGE";
      return failed(JournalError::kMissing, ENOENT);
    } else if (!journal) {
      err = "the volume's first-write journal cannot be used: " + err + ". Do not delete it: it may hold acknowledged " +
            "writes. To accept losing them, run: node-nbd-server journal discard IMAGE";
      return failed(code == EINVAL || code == ESTALE ? JournalError::kCorrupt : JournalError::kIo, code);
    } else {
      std::vector<JournalRecord> pending;
      if (int e = journal->read_pending(pending, err)) {
        err = "the volume's first-write journal " + st->path + ": " + err;
        return failed(JournalError::kCorrupt, e);
      }
      if (!pending.empty() && cfg.read_only) {
        err = "the volume has " + std::to_string(pending.size()) + " acknowledged writes in its first-write journal " +
              st->path + " that are not applied to the image yet; a read-only open cannot apply them. Serve it " +
              "read-write once (or run: node-nbd-server info IMAGE), then read-only";
        return failed(JournalError::kPending, EROFS);
      }
      if (!cfg.read_only) {
        // Applied and flushed before the journal is reset and forgotten.
        auto apply = [this](const FirstWriteQueue::Batch& b) {
          int e = apply_queued(b);
          return e ? e : next_->flush();
        };
        if (int e = FirstWriteQueue::replay(*journal, chunk_size_, apply, replayed, err)) return failed(JournalError::kIo, e);
        const std::string path = journal->path();
        journal.reset();
        if (clear_journal_state(cfg.state_file, err) != 0) return failed(JournalError::kIo, EIO);
        crash_point("replay.cleared");
        ::unlink(path.c_str());
      }
    }
  }
  if (!cow_->chain()->empty() && cfg.ring_size > 0 && !cfg.read_only) start_queue();
  return 0;
}
}  // namespace nbd
