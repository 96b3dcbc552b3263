// first_write_queue.cc — see first_write_queue.hh for the design and invariants.
#include "first_write_queue.hh"

#include <pthread.h>
#include <sched.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <system_error>

#include "crash_point.hh"

namespace nbd {

namespace {

constexpr uint64_t kWritePiece = 1u << 20;    // data bytes per journal entry, at most
constexpr uint64_t kZeroPieceChunks = 256;    // chunks per zeroing entry, at most
constexpr uint64_t kRingSlack = 64;           // never fill the ring to the last byte
constexpr uint64_t kBatchChunks = 1024;       // chunks preserved per batch (one snapshot commit), at most
// Bounds (see "Bounds" and "Pacing" in the .hh): a batch preserves at most kBatchChunks
// chunks and kBatchBytes of old data, so a writer waiting for room waits
// for one batch of bounded work whatever the chunk size. While a drain
// shrinks the queue (shrink_to), writers get a quarter of the room each
// batch frees (kShrinkShare).
constexpr uint64_t kBatchBytes = 16u << 20;
constexpr uint64_t kShrinkShare = 4;

// A queued entry's fields, and the chunks it touches.
std::shared_ptr<QueuedWrite> make_entry(uint16_t type, bool may_trim, uint64_t offset, uint32_t length, uint32_t chunk_size) {
  auto q = std::make_shared<QueuedWrite>();
  q->type = type;
  q->may_trim = may_trim;
  q->offset = offset;
  q->length = length;
  q->first_chunk = offset / chunk_size;
  q->last_chunk = (offset + std::max<uint32_t>(length, 1) - 1) / chunk_size;
  return q;
}

uint64_t env_ms(const char* name) {
  const char* v = std::getenv(name);
  return v ? std::strtoull(v, nullptr, 10) : 0;
}

}  // namespace

FirstWriteQueue::FirstWriteQueue(OpenJournal open, uint64_t ring_size, uint32_t chunk_size, uint64_t max_chunks,
                                 Apply apply)
    : open_journal_(std::move(open)),
      ring_size_(ring_size & ~uint64_t{7}),
      chunk_size_(chunk_size),
      max_chunks_(std::max<uint64_t>(max_chunks, 2 * kZeroPieceChunks)),
      apply_(std::move(apply)),
      pause_ms_(env_ms("NBD_TEST_FIRST_WRITE_DELAY_MS")),
      min_batch_(std::max<uint64_t>(1, env_ms("NBD_TEST_FIRST_WRITE_BATCH"))),
      fixed_depth_(env_ms("NBD_TEST_FIRST_WRITE_DEPTH")) {}

FirstWriteQueue::~FirstWriteQueue() {
  {
    std::lock_guard<std::mutex> lk(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  if (thread_.joinable()) thread_.join();
  // The journal file stays: its owner (JournalDevice::retire_queue) removes it,
  // after the volume's journal state, once nothing in it is pending.
}

int FirstWriteQueue::replay(WriteJournal& journal, uint32_t chunk_size, const Apply& apply, uint64_t& entries,
                            std::string& err) {
  CrashScope scope("replay");  // names the batch apply's points "replay.*"
  std::vector<JournalRecord> recs;
  if (int e = journal.read_pending(recs, err)) return e;
  entries = recs.size();
  if (recs.empty()) return 0;  // nothing to do; the first append starts a new epoch
  Batch batch;
  for (auto& r : recs) {
    auto q = make_entry(r.type, r.flags & WriteJournal::kFlagMayTrim, r.offset, r.length, chunk_size);
    q->seq = r.seq;
    q->owned = std::move(r.data);
    q->data = q->owned.data();
    batch.push_back(std::move(q));
  }
  if (int e = apply(batch)) {
    err = std::string("applying ") + std::to_string(recs.size()) + " journalled writes failed: " + strerror(e);
    return e;
  }
  crash_point("replay.applied");
  if (int e = journal.reset()) {
    err = std::string("resetting the journal failed: ") + strerror(e);
    return e;
  }
  crash_point("replay.reset");
  return 0;
}

int FirstWriteQueue::append_locked(std::unique_lock<std::mutex>& lk, uint16_t type, const uint8_t* data,
                                   uint64_t offset, uint32_t length, bool may_trim) {
  if (!journal_ && !broken_.load()) {
    // The first entry of this run: the journal is made now (a one-time cost
    // for the volume, under mu_, so concurrent first writers wait for it).
    journal_ = open_journal_(journal_error_);
    if (!journal_) {
      broken_.store(true);  // writes are preserved inline from now on
      cv_.notify_all();
    } else {
      try {
        thread_ = std::thread([this] { run(); });
      } catch (const std::system_error& e) {  // no thread to be had (a task limit): preserve inline
        journal_error_ = std::string("cannot start the first-write thread: ") + e.what();
        broken_.store(true);
        cv_.notify_all();
      }
    }
  }
  if (broken_.load()) return ESHUTDOWN;
  auto q = make_entry(type, may_trim, offset, length, chunk_size_);
  const uint64_t nchunks = q->last_chunk - q->first_chunk + 1;
  const uint32_t dlen = data ? length : 0;
  auto failed = [&] { return broken_.load() || stop_ || error_ != 0; };
  // Room: in the ring, and under the bound on queued chunks (an entry larger
  // than the bound only into an empty queue).
  auto room = [&] {
    return used_ + journal_->span_of(dlen) + kRingSlack <= journal_->ring_size() &&
           (fifo_.empty() || chunks_ + nchunks <= std::min(depth_limit(), cap_));
  };
  // Writers without room are admitted in arrival order, and a newcomer never
  // overtakes one that waits: while a drain shrinks it, the bound can be
  // smaller than one entry (a 256-chunk zeroing, a 1 MiB write of 4 KiB
  // chunks), and such an entry only fits into an empty queue, which smaller
  // writes arriving all the time would otherwise never leave it.
  if (!failed() && !(admission_.empty() && room())) {
    const uint64_t ticket = next_ticket_++;
    admission_.push_back(ticket);
    wait_for_thread(lk, [&] { return failed() || (admission_.front() == ticket && room()); });
    admission_.erase(std::find(admission_.begin(), admission_.end(), ticket));
    if (!admission_.empty()) cv_.notify_all();  // the next in line: its turn (it sees this entry once mu_ is free)
  }
  if (broken_.load() || stop_) return ESHUTDOWN;
  // The background apply keeps failing (the live image cannot be written):
  // new writes get its error, as they would inline.
  if (error_) return error_;
  q->span = journal_->span_of(dlen);
  const uint64_t seq = journal_->next_seq();
  uint64_t at = 0;
  if (int e = journal_->append(type, may_trim ? WriteJournal::kFlagMayTrim : 0, offset, length, data, dlen, at)) {
    broken_.store(true);
    journal_error_ = std::string("appending to the journal failed: ") + strerror(e);
    cv_.notify_all();
    return e;
  }
  q->seq = seq;
  q->journal_at = at;
  if (data) q->data = journal_->data_at(at);
  used_ += q->span;
  chunks_ += nchunks;
  std::shared_ptr<const QueuedWrite> cq = q;
  for (uint64_t c = q->first_chunk; c <= q->last_chunk; ++c) index_[c].push_back(cq);
  fifo_.push_back(std::move(cq));
  count_.store(fifo_.size());
  // The thread sleeps only on an empty queue (or, under the test hook, a short one).
  if (fifo_.size() == 1 || fifo_.size() == min_batch_) cv_.notify_all();
  return 0;
}

int FirstWriteQueue::submit(const uint8_t* data, uint64_t offset, uint64_t length, bool may_trim, bool fua) {
  const uint64_t piece = data ? std::max<uint64_t>(kWritePiece, chunk_size_) : kZeroPieceChunks * chunk_size_;
  uint64_t last = 0;
  for (uint64_t done = 0; done < length;) {
    uint32_t n = static_cast<uint32_t>(std::min(piece, length - done));
    std::unique_lock<std::mutex> lk(mu_);
    int e = append_locked(lk, data ? WriteJournal::kWrite : WriteJournal::kZero, data ? data + done : nullptr,
                          offset + done, n, may_trim);
    if (e) return e;
    last = fifo_.back()->seq;
    done += n;
  }
  if (!fua) return 0;
  // FUA: durable through the live image, like FLUSH: wait until applied
  // (the caller then flushes live).
  std::unique_lock<std::mutex> lk(mu_);
  return wait_applied(lk, last);
}

bool FirstWriteQueue::touches(uint64_t offset, uint64_t length) {
  if (count_.load() == 0 || length == 0) return false;
  return !chunks_in(offset / chunk_size_, (offset + length - 1) / chunk_size_).empty();
}

template <typename Fn>
void FirstWriteQueue::for_each_indexed(uint64_t first, uint64_t last, Fn fn) const {
  // Walk whichever is shorter: the range, or the chunks that have entries.
  if (last - first + 1 <= index_.size()) {
    for (uint64_t c = first; c <= last; ++c) {
      auto it = index_.find(c);
      if (it != index_.end()) fn(c, it->second);
    }
  } else {
    for (auto& kv : index_)
      if (kv.first >= first && kv.first <= last) fn(kv.first, kv.second);
  }
}

std::vector<uint64_t> FirstWriteQueue::chunks_in(uint64_t first, uint64_t last) {
  std::vector<uint64_t> out;
  if (count_.load() == 0) return out;
  std::lock_guard<std::mutex> lk(mu_);
  for_each_indexed(first, last, [&](uint64_t c, auto&) { out.push_back(c); });
  std::sort(out.begin(), out.end());
  return out;
}

FirstWriteQueue::Overlay FirstWriteQueue::overlay_in(uint64_t offset, uint64_t length) {
  Overlay out;
  if (count_.load() == 0 || length == 0) return out;
  const uint64_t first = offset / chunk_size_, last = (offset + length - 1) / chunk_size_, end = offset + length;
  std::lock_guard<std::mutex> lk(mu_);
  Batch hits;
  for_each_indexed(first, last, [&](uint64_t, const std::vector<std::shared_ptr<const QueuedWrite>>& v) {
    for (auto& q : v)
      if (q->offset < end && offset < q->offset + q->length) hits.push_back(q);
  });
  std::sort(hits.begin(), hits.end(), [](auto& a, auto& b) { return a->seq < b->seq; });
  hits.erase(std::unique(hits.begin(), hits.end()), hits.end());
  for (auto& q : hits) {
    OverlayPiece p;
    p.offset = std::max<uint64_t>(offset, q->offset);
    p.length = static_cast<uint32_t>(std::min<uint64_t>(end, q->offset + q->length) - p.offset);
    p.zero = q->type != WriteJournal::kWrite;
    if (!p.zero) p.bytes.assign(q->data + (p.offset - q->offset), q->data + (p.offset - q->offset) + p.length);
    out.push_back(std::move(p));
  }
  return out;
}

void FirstWriteQueue::lay(const Overlay& o, uint8_t* buf, uint32_t count, uint64_t offset) {
  for (auto& p : o) {  // oldest first: later entries win
    // Each piece lies inside [offset, offset + count): overlay_in() clipped it.
    if (p.offset < offset || p.offset + p.length > offset + count) continue;
    if (p.zero) std::memset(buf + (p.offset - offset), 0, p.length);
    else std::memcpy(buf + (p.offset - offset), p.bytes.data(), p.length);
  }
}

template <typename Pred>
void FirstWriteQueue::wait_for_thread(std::unique_lock<std::mutex>& lk, Pred done) {
  ++waiters_;
  set_urgent(true);  // someone waits: the thread must not idle
  if (min_batch_ > 1) cv_.notify_all();  // test hook: a short queue is taken now
  cv_.wait(lk, done);
  --waiters_;
}

int FirstWriteQueue::wait_applied(std::unique_lock<std::mutex>& lk, uint64_t seq) {
  // An apply that keeps failing is reported instead of waited for forever.
  wait_for_thread(lk, [&] { return applied_seq_ >= seq || stop_ || error_; });
  return applied_seq_ >= seq ? 0 : (error_ ? error_ : EIO);
}

int FirstWriteQueue::shrink_to(uint64_t chunks) {
  std::unique_lock<std::mutex> lk(mu_);
  // Writers are not shut out while the queue shrinks (they would wait for
  // all of it): the cap starts at what is queued and each applied batch
  // lowers it by the part of the freed room writers do not get (run()).
  shrink_target_ = chunks;
  cap_ = std::max(chunks, std::min(cap_, chunks_));
  const uint64_t seen = failures_;
  // Done once a batch left the queue at or under the target, even if a writer
  // took mu_ first and queued an entry again (an entry larger than the cap
  // fits an empty queue): waiting for that one too could cost another batch
  // or two, and the paused drain that follows applies it anyway.
  const uint64_t reached = shrink_reached_;
  auto done = [&] { return chunks_ <= shrink_target_ || shrink_reached_ > reached; };
  wait_for_thread(lk, [&] { return done() || stop_ || failures_ > seen; });
  if (done()) return 0;
  return error_ ? error_ : ESHUTDOWN;
}

void FirstWriteQueue::uncap() {
  {
    std::lock_guard<std::mutex> lk(mu_);
    cap_ = UINT64_MAX;
  }
  cv_.notify_all();
}

std::string FirstWriteQueue::journal_path() {
  std::lock_guard<std::mutex> lk(mu_);
  return journal_ ? journal_->path() : std::string();
}

std::string FirstWriteQueue::journal_error() {
  std::lock_guard<std::mutex> lk(mu_);
  return journal_error_;
}

int FirstWriteQueue::drain() {
  std::unique_lock<std::mutex> lk(mu_);
  // Until empty, or until an apply attempted after this call has failed: a
  // queue that cannot be applied (the live image refuses writes) is
  // reported at once, not waited for until the disk recovers.
  const uint64_t seen = failures_;
  wait_for_thread(lk, [&] { return fifo_.empty() || stop_ || failures_ > seen; });
  if (fifo_.empty()) return 0;
  return error_ ? error_ : ESHUTDOWN;
}

int FirstWriteQueue::settle() {
  std::unique_lock<std::mutex> lk(mu_);
  return wait_applied(lk, fifo_.empty() ? 0 : fifo_.back()->seq);
}

void FirstWriteQueue::remove_front(size_t n) {
  for (size_t i = 0; i < n; ++i) {
    auto q = fifo_.front();
    fifo_.pop_front();
    for (uint64_t c = q->first_chunk; c <= q->last_chunk; ++c) {
      auto it = index_.find(c);
      if (it == index_.end()) continue;
      auto& v = it->second;
      v.erase(std::find(v.begin(), v.end(), q));  // the oldest: at the front
      if (v.empty()) index_.erase(it);
    }
    used_ -= q->span;
    chunks_ -= q->last_chunk - q->first_chunk + 1;
    applied_seq_ = q->seq;
  }
  count_.store(fifo_.size());
}

void FirstWriteQueue::set_urgent(bool urgent) {
  // Linux, per thread; best effort. Idle: runs only on CPU time nobody else
  // wants, like a destager behind a write cache. Urgent: someone waits for
  // it (FLUSH, FUA, a drain, a writer without room) or the queue is half
  // full: ordinary priority, so it is never starved.
  if (urgent == urgent_ || !thread_.joinable()) return;
  urgent_ = urgent;
  sched_param p{};
  pthread_setschedparam(thread_.native_handle(), urgent ? SCHED_OTHER : SCHED_IDLE, &p);
}

void FirstWriteQueue::run() {
  CrashScope scope("queue");  // names the batch apply's points "queue.*"
  std::unique_lock<std::mutex> lk(mu_);
  for (;;) {
    // (Test hook: with min_batch_ > 1, a batch is taken once that many
    // entries are queued, or as soon as someone waits for the thread.)
    cv_.wait(lk, [this] { return stop_ || fifo_.size() >= min_batch_ || (!fifo_.empty() && waiters_ > 0); });
    if (stop_) return;
    set_urgent(waiters_ > 0 || error_ || chunks_ * 2 > depth_limit() || used_ * 2 > ring_size_);
    // The oldest entries, up to a bound on the chunks they touch.
    Batch batch;
    size_t chunks = 0;
    const uint64_t limit = batch_limit();
    for (auto& q : fifo_) {
      size_t n = q->last_chunk - q->first_chunk + 1;
      // A bounded batch (batch_limit(): 1024 chunks and 16 MiB at most):
      // writers keep filling the rest while a batch is preserved, and a
      // writer waiting for room waits for one batch, not for everything.
      if (!batch.empty() && chunks + n > limit) break;
      batch.push_back(q);
      chunks += n;
    }
    lk.unlock();
    if (pause_ms_) std::this_thread::sleep_for(std::chrono::milliseconds(pause_ms_));
    int e = apply_(batch);
    if (!e) crash_point("queue.applied");
    uint64_t seq = 0, at = 0;
    if (!e) {
      lk.lock();
      if (fifo_.size() > batch.size()) {
        seq = fifo_[batch.size()]->seq;
        at = fifo_[batch.size()]->journal_at;
      } else {
        seq = journal_->next_seq();
        at = journal_->head();
      }
      lk.unlock();
      e = journal_->checkpoint(seq, at);
      if (!e) crash_point("queue.checkpointed");
    }
    lk.lock();
    if (e) {
      // The writes were acknowledged: keep them queued (reads still see them)
      // and retry; FLUSH reports the error meanwhile.
      error_ = e;
      ++failures_;
      cv_.notify_all();  // FLUSH, FUA and drain waiters report it
      cv_.wait_for(lk, std::chrono::milliseconds(100), [this] { return stop_; });
      continue;
    }
    error_ = 0;
    remove_front(batch.size());
    if (cap_ != UINT64_MAX) {  // shrinking: writers get 1/kShrinkShare of what the batch freed
      const uint64_t step = std::max<uint64_t>(1, chunks - chunks / kShrinkShare);
      cap_ = std::max(shrink_target_, cap_ > step ? cap_ - step : 0);
      if (chunks_ <= shrink_target_) ++shrink_reached_;
    }
    cv_.notify_all();
  }
}

uint64_t FirstWriteQueue::batch_limit() const {
  // A quarter of the depth, kBatchChunks and kBatchBytes of chunks at most;
  // the batch test hook's size always fits.
  const uint64_t lim = std::min<uint64_t>({max_chunks_ / 4, kBatchChunks, std::max<uint64_t>(1, kBatchBytes / chunk_size_)});
  return std::max<uint64_t>(lim, min_batch_);
}

uint64_t FirstWriteQueue::depth_limit() const {
  // The static bound (test hook NBD_TEST_FIRST_WRITE_DEPTH: a given one);
  // under the batch test hook, room for two hooked batches.
  const uint64_t lim = fixed_depth_ ? fixed_depth_ : max_chunks_;
  return std::max<uint64_t>(lim, std::min<uint64_t>(2 * min_batch_, max_chunks_));
}

}  // namespace nbd
