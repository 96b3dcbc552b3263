// cow_device.cc — see cow_device.hh for the design, the chain rules and locking.
#include "cow_device.hh"

#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cerrno>
#include <cstring>
#include <optional>

#include "crash_point.hh"
#include "journal_state.hh"
#include "nbd_protocol.hh"

namespace nbd {

namespace {

// The read-only export of one snapshot.
class SnapshotView final : public Device {
 public:
  SnapshotView(std::shared_ptr<CowDevice> cow, std::shared_ptr<SnapshotStore> snap)
      : cow_(std::move(cow)), snap_(std::move(snap)) {}
  uint64_t size() const override { return snap_->volume_size(); }
  bool can_write() const override { return false; }
  bool can_trim() const override { return false; }
  bool can_zero() const override { return false; }
  bool can_fast_zero() const override { return false; }
  bool can_fua() const override { return false; }
  bool can_cache() const override { return false; }
  int pread(void* buf, uint32_t count, uint64_t offset) override {
    auto chain = cow_->chain();
    size_t i = index(*chain);
    if (i == chain->size()) return ESHUTDOWN;  // deleted while exported
    if (snap_->failed()) return EIO;           // inexact: never serve it as data
    return cow_->read_snapshot(*chain, i, buf, count, offset);
  }
  int pwrite(const void*, uint32_t, uint64_t, IoFlags) override { return EPERM; }
  int flush() override { return 0; }
  int trim(uint32_t, uint64_t, IoFlags) override { return EPERM; }
  int zero(uint32_t, uint64_t, IoFlags) override { return EPERM; }
  int cache(uint32_t, uint64_t) override { return 0; }
  int extents(uint32_t count, uint64_t offset, uint32_t max, std::vector<Extent>& out) override {
    auto chain = cow_->chain();
    size_t i = index(*chain);
    if (i == chain->size()) return ESHUTDOWN;
    return cow_->snapshot_extents(*chain, i, count, offset, max, out);
  }

 private:
  size_t index(const CowDevice::Chain& chain) const {
    for (size_t i = 0; i < chain.size(); ++i)
      if (chain[i] == snap_) return i;
    return chain.size();
  }
  std::shared_ptr<CowDevice> cow_;
  std::shared_ptr<SnapshotStore> snap_;
};

}  // namespace

CowDevice::CowDevice(std::shared_ptr<Device> live, uint32_t chunk_size, FailureCallback on_failure)
    : FilterDevice(std::move(live)),
      chunk_size_(chunk_size),
      on_failure_(std::move(on_failure)),
      chain_(std::make_shared<const Chain>()) {}

CowDevice::~CowDevice() {
  // Stop the queue's thread before the members its apply() uses go away;
  // queued entries stay in the journal for the next open.
  std::atomic_store(&queue_, std::shared_ptr<FirstWriteQueue>());
}

std::shared_ptr<const CowDevice::Chain> CowDevice::chain() const { return std::atomic_load(&chain_); }

std::shared_ptr<SnapshotStore> CowDevice::find(uint64_t id) const {
  for (auto& s : *chain())
    if (s->id() == id) return s;
  return nullptr;
}

void CowDevice::load_snapshot(std::shared_ptr<SnapshotStore> s) {
  std::lock_guard<std::mutex> lk(chain_mu_);
  auto next = std::make_shared<Chain>(*chain_);
  next->push_back(std::move(s));
  std::atomic_store(&chain_, std::shared_ptr<const Chain>(next));
}

int CowDevice::pause_and_drain(std::string& err) {
  // Writes pause only for what is left: first apply what is queued while
  // writes still flow, then cap the queue small and wait until it is under
  // the cap, write back the image's dirty pages, and only then close the
  // gate and drain (and the caller flush) the rest. If the queue
  // cannot be applied, that is found out before the pause (and reported by
  // the drain below at once).
  auto q = queue();
  if (q && !q->empty() && q->settle() == 0) q->shrink_to(kPauseDrainChunks);
  // Write back what is dirty now, so that the flush with writes paused
  // (begin_add) has only what was written meanwhile left to do. Its error
  // is the paused flush's to report (a failed sync is sticky).
  next_->flush();
  gate_.close();  // in-flight writes drain; new ones wait
  int e = drain_queue(err);
  if (q) q->uncap();  // the gate holds writers back now
  return e;  // the gate stays closed, whatever the result
}

int CowDevice::begin_add(std::string& err) {
  int e = pause_and_drain(err);  // queued first writes reach live: the new snapshot holds them
  if (!e && merge_job()) {  // snapshot views read raw live, which a merge is still changing
    err = "a rollback merge is running";
    e = EBUSY;
  }
  if (!e && (e = next_->flush())) err = std::string("flushing the volume failed: ") + strerror(e);
  if (!e) crash_point("snapshot.create.begun");
  if (e) gate_.open();
  return e;  // on success writes stay paused until commit_add() or resume_writes()
}

void CowDevice::commit_add(std::shared_ptr<SnapshotStore> s) {
  load_snapshot(std::move(s));
  if (!queue() && journal_cfg_.ring_size > 0 && !journal_cfg_.read_only) start_queue();
  gate_.open();
  crash_point("snapshot.create.added");
}

bool CowDevice::drop_from_chain(uint64_t id) {
  std::lock_guard<std::mutex> lk(chain_mu_);
  bool found = false;
  auto next = std::make_shared<Chain>();
  for (auto& s : *chain_) {
    if (s->id() == id) found = true;
    else next->push_back(s);
  }
  std::atomic_store(&chain_, std::shared_ptr<const Chain>(next));
  return found;
}

int CowDevice::finish_remove(uint64_t id, std::string& err) {
  if (int e = pause_and_drain(err)) return e;  // writes stay paused until resume_writes(), as on every return
  if (merge_job()) {
    err = "a rollback merge is running";
    return EBUSY;  // writes stay paused until resume_writes(), as on every return
  }
  auto s = find(id);
  if (!s) {
    err = "no snapshot with id " + std::to_string(id);
    return ENOENT;
  }
  // The same walk as the bulk steps: a chunk handed down before stops the
  // walk at its heir (which holds it now), so only chunks preserved into the
  // snapshot since then are copied. A heir that failed since its copy keeps
  // it, which is harmless: the walk still stops there.
  uint64_t next = 0;
  return hand_down(id, 0, s->chunks(), next, err);  // writes stay paused until resume_writes()
}

// The snapshot first writes preserve into: the newest healthy one (or
// chain.size() if none). Newer, failed ones still serve the chunks they hold,
// so T needs chunk c only if no snapshot from T on holds it.
size_t CowDevice::target_of(const Chain& chain) {
  for (size_t t = chain.size(); t-- > 0;)
    if (!chain[t]->failed()) return t;
  return chain.size();
}

size_t CowDevice::source_of(const Chain& chain, size_t i, uint64_t c) {
  for (size_t j = i; j < chain.size(); ++j)
    if (chain[j]->map().test(c)) return j;
  return chain.size();
}

void CowDevice::fail(const Chain& chain, size_t t, const std::vector<uint64_t>& chunks, const std::string& reason) {
  chain[t]->mark_failed(reason);
  if (on_failure_) on_failure_(chain[t]->id(), reason);
  // Older snapshots that read these chunks through T lose them too.
  std::vector<uint64_t> lost = chunks;
  for (size_t j = t; j-- > 0 && !lost.empty();) {
    std::vector<uint64_t> still;
    for (uint64_t c : lost)
      if (!chain[j]->map().test(c)) still.push_back(c);
    if (!still.empty() && !chain[j]->failed()) {
      std::string why = "depended on snapshot " + std::to_string(chain[t]->id()) + " for chunk " +
                        std::to_string(still.front()) + ", which could not be preserved: " + reason;
      chain[j]->mark_failed(why);
      if (on_failure_) on_failure_(chain[j]->id(), why);
    }
    lost.swap(still);
  }
}

std::vector<size_t> CowDevice::stripes_of(const std::vector<uint64_t>& chunks) {
  std::vector<size_t> stripes;
  for (uint64_t c : chunks) stripes.push_back(c % kStripes);
  std::sort(stripes.begin(), stripes.end());
  stripes.erase(std::unique(stripes.begin(), stripes.end()), stripes.end());
  return stripes;
}

void CowDevice::lock_stripes(const std::vector<size_t>& s) {
  for (size_t i : s) stripes_[i].lock();  // ascending: the lock order
}

void CowDevice::unlock_stripes(const std::vector<size_t>& s) {
  for (size_t i : s) stripes_[i].unlock();
}

int CowDevice::preserve(uint64_t offset, uint64_t count) {
  auto chain_ptr = chain();
  const Chain& chain = *chain_ptr;
  if (chain.empty() || count == 0) return 0;
  const size_t t = target_of(chain);
  if (t == chain.size()) return 0;  // every snapshot failed: nothing to protect
  std::vector<uint64_t> needed;
  for (uint64_t c = offset / chunk_size_; c <= (offset + count - 1) / chunk_size_; ++c)
    if (source_of(chain, t, c) == chain.size()) needed.push_back(c);
  if (needed.empty()) return 0;  // the hot path: every chunk already preserved
  auto stripes = stripes_of(needed);
  lock_stripes(stripes);
  preserve_locked(chain, std::move(needed));
  unlock_stripes(stripes);
  return 0;  // the host write proceeds whatever happened to the snapshot
}

void CowDevice::preserve_locked(const Chain& chain, std::vector<uint64_t> needed) {
  const size_t t = target_of(chain);
  if (t == chain.size()) return;
  needed.erase(std::remove_if(needed.begin(), needed.end(), [&](uint64_t c) { return source_of(chain, t, c) != chain.size(); }),
               needed.end());
  if (needed.empty()) return;
  std::string reason;
  const uint64_t vol = chain[t]->volume_size();
  std::vector<uint8_t> buf;
  std::vector<ChunkSum> sums;
  for (size_t k = 0; k < needed.size() && reason.empty();) {
    // Coalesce consecutive chunks into one read and one write, 4 MiB at most.
    size_t e = k + 1;
    while (e < needed.size() && needed[e] == needed[e - 1] + 1 &&
           (e - k + 1) * static_cast<uint64_t>(chunk_size_) <= (4u << 20))
      ++e;
    uint64_t off = needed[k] * chunk_size_;
    uint64_t len = std::min<uint64_t>((needed[e - 1] + 1) * chunk_size_, vol) - off;
    buf.resize(len);
    int err = next_->pread(buf.data(), static_cast<uint32_t>(len), off);
    // The image lost a write-back meanwhile (a concurrent FLUSH latched it):
    // the write this preserves for cannot land either, so nothing is lost
    // and no snapshot is failed for it.
    if (err && next_->health()) return;
    if (err) reason = std::string("reading old data from the volume failed: ") + strerror(err);
    else if ((err = chain[t]->write_chunks(buf.data(), needed[k], len, sums)))
      reason = std::string("writing to the snapshot store failed: ") + strerror(err);
    k = e;
  }
  if (reason.empty()) {
    if (int err = chain[t]->commit(sums)) reason = std::string("committing to the snapshot store failed: ") + strerror(err);
  }
  if (!reason.empty()) fail(chain, t, needed, reason);
}

namespace {
size_t index_of(const CowDevice::Chain& chain, uint64_t id) {
  for (size_t i = 0; i < chain.size(); ++i)
    if (chain[i]->id() == id) return i;
  return chain.size();
}
}  // namespace

int CowDevice::copy_locked(MergeJob& job, const Chain& chain, std::vector<uint64_t>& chunks, bool fua) {
  chunks.erase(std::remove_if(chunks.begin(), chunks.end(), [&](uint64_t c) { return !job.pending(c); }), chunks.end());
  if (chunks.empty()) return 0;
  const size_t k = index_of(chain, job.snapshot_id());
  if (k == chain.size()) return EIO;  // cannot happen: deletes are refused while a merge runs
  preserve_locked(chain, chunks);  // the old live data, for the newer snapshots
  const uint64_t vol = size();
  std::vector<uint8_t> buf;
  for (size_t i = 0; i < chunks.size();) {
    size_t e = i + 1;
    while (e < chunks.size() && chunks[e] == chunks[e - 1] + 1 && (e - i + 1) * static_cast<uint64_t>(chunk_size_) <= (4u << 20))
      ++e;
    uint64_t off = chunks[i] * chunk_size_;
    uint32_t len = static_cast<uint32_t>(std::min<uint64_t>((chunks[e - 1] + 1) * chunk_size_, vol) - off);
    buf.resize(len);
    if (int err = read_snapshot(chain, k, buf.data(), len, off)) return err;
    IoFlags f;
    f.fua = fua;
    if (int err = next_->pwrite(buf.data(), len, off, f)) return err;
    i = e;
  }
  return 0;
}

int CowDevice::merge_locked(MergeJob& job, const Chain& chain, std::vector<uint64_t> chunks) {
  if (int err = copy_locked(job, chain, chunks, true)) return err;
  return job.commit(chunks);  // durable "merged" only once live durably holds the data (FUA)
}

int CowDevice::merge_range(uint64_t offset, uint64_t count) {
  auto job = merge_job();
  if (!job || count == 0) return 0;
  std::vector<uint64_t> pending;
  for (uint64_t c = offset / chunk_size_; c <= (offset + count - 1) / chunk_size_; ++c)
    if (job->pending(c)) pending.push_back(c);
  if (pending.empty()) return 0;
  auto chain_ptr = chain();
  auto stripes = stripes_of(pending);
  lock_stripes(stripes);
  int e = merge_locked(*job, *chain_ptr, std::move(pending));
  unlock_stripes(stripes);
  return e;
}

int CowDevice::merge_step(uint64_t from, uint64_t max, uint64_t& next, std::string& err) {
  GateGuard g(gate_);
  if (int e = next_->health()) {  // the image lost a write-back: merging would fail snapshots on the way
    err = std::string("the image cannot be written: ") + strerror(e);
    return e;
  }
  auto job = merge_job();
  if (!job) {
    err = "no rollback merge is running";
    return ENOENT;
  }
  std::vector<uint64_t> batch;
  uint64_t c = job->next_pending(from);
  while (c < job->chunks() && batch.size() < max) {
    batch.push_back(c);
    c = job->next_pending(c + 1);
  }
  next = c;
  if (batch.empty()) return 0;
  // Copy in pieces of about 4 MiB, each under its chunks' stripe locks, so a
  // host write waits for one piece, not the whole step. A chunk stays pending
  // until the step's commit: a host write meanwhile merges it again on its own
  // (same data) and commits it first, so nothing it writes is ever clobbered.
  auto chain_ptr = chain();
  const size_t piece = std::max<size_t>(1, (4u << 20) / chunk_size_);
  std::vector<uint64_t> copied;
  int e = 0;
  for (size_t i = 0; i < batch.size() && !e; i += piece) {
    std::vector<uint64_t> part(batch.begin() + i, batch.begin() + std::min(batch.size(), i + piece));
    auto stripes = stripes_of(part);
    lock_stripes(stripes);
    e = copy_locked(*job, *chain_ptr, part, false);
    unlock_stripes(stripes);
    copied.insert(copied.end(), part.begin(), part.end());
  }
  if (!e) e = next_->flush();
  if (!e) e = job->commit(copied);  // durable "merged" only once live durably holds the data
  if (e) err = std::string("merging chunks into the volume failed: ") + strerror(e);
  return e;
}

int CowDevice::prepare_rollback(uint64_t snapshot_id, const std::string& job_path, std::string& err) {
  // Live and the bitmaps must include every queued first write.
  int e = pause_and_drain(err);
  auto chain_ptr = chain();
  const Chain& chain = *chain_ptr;
  const size_t k = index_of(chain, snapshot_id);
  if (!e && k == chain.size()) {
    err = "no snapshot with id " + std::to_string(snapshot_id);
    e = ENOENT;
  } else if (!e && chain[k]->failed()) {
    err = "snapshot " + std::to_string(snapshot_id) + " failed: " + chain[k]->failure();
    e = EIO;
  } else if (!e) {
    auto pending = std::make_unique<Bitmap>(chain[k]->chunks());
    if (clean_of_ == snapshot_id && dirty_) {
      // Live was exactly this snapshot when its last merge finished (this
      // run): only the chunks written since differ.
      for (uint64_t w = 0; w < pending->words(); ++w)
        if (uint64_t v = dirty_->word(w)) pending->or_word(w, v);
    } else {
      // Every chunk changed since snapshot k was preserved into k or a newer one.
      for (size_t j = k; j < chain.size(); ++j)
        for (uint64_t w = 0; w < pending->words(); ++w)
          if (uint64_t v = chain[j]->map().word(w)) pending->or_word(w, v);
    }
    auto job = MergeJob::create(job_path, snapshot_id, size(), chunk_size_, std::move(pending), err);
    if (job) prepared_ = std::shared_ptr<MergeJob>(std::move(job));
    else e = EIO;
  }
  if (e) gate_.open();
  return e;  // on success writes stay paused until activate/abort
}

void CowDevice::activate_rollback() {
  if (prepared_) {
    // Writes from now on are what will differ from the snapshot once merged.
    dirty_ = std::make_unique<Bitmap>(prepared_->chunks());
    std::atomic_store(&job_, std::move(prepared_));
    clean_of_ = 0;
  }
  prepared_.reset();
  gate_.open();
}

void CowDevice::mark_dirty(uint64_t offset, uint64_t count) {
  Bitmap* d = dirty_.get();  // replaced only with writes drained (gate closed)
  if (!d || count == 0) return;
  for (uint64_t c = offset / chunk_size_; c <= (offset + count - 1) / chunk_size_; ++c)
    if (!d->test(c)) d->set(c);
}

void CowDevice::abort_rollback() {
  prepared_.reset();
  gate_.open();
}

int CowDevice::resume_rollback(const std::string& job_path, std::string& err) {
  auto job = MergeJob::open(job_path, size(), chunk_size_, err);
  if (!job) return EINVAL;
  auto chain_ptr = chain();
  if (index_of(*chain_ptr, job->snapshot_id()) == chain_ptr->size()) {
    err = job_path + ": the merge names snapshot " + std::to_string(job->snapshot_id()) + ", which the volume does not have";
    return EINVAL;
  }
  std::atomic_store(&job_, std::shared_ptr<MergeJob>(std::move(job)));
  return 0;
}

int CowDevice::finish_rollback(std::string& err) {
  gate_.close();
  auto job = merge_job();
  int e = 0;
  if (job && job->remaining() > 0) {
    err = std::to_string(job->remaining()) + " chunks are still to be merged";
    e = EAGAIN;
  } else {
    std::atomic_store(&job_, std::shared_ptr<MergeJob>());
    if (job) clean_of_ = job->snapshot_id();  // live = that snapshot, except dirty_
  }
  gate_.open();
  return e;
}

namespace {
// Splits [offset, offset+count) into runs of chunks for which pred(c) is the
// same, and calls fn(run offset, run length, pred) for each until it fails.
template <typename Pred, typename Fn>
int for_runs(uint64_t offset, uint64_t count, uint32_t chunk, Pred pred, Fn fn) {
  const uint64_t end = offset + count;
  uint64_t pos = offset;
  while (pos < end) {
    const bool p = pred(pos / chunk);
    uint64_t run_end = std::min<uint64_t>((pos / chunk + 1) * chunk, end);
    while (run_end < end && pred(run_end / chunk) == p) run_end = std::min<uint64_t>(run_end + chunk, end);
    if (int e = fn(pos, run_end - pos, p)) return e;
    pos = run_end;
  }
  return 0;
}
}  // namespace

int CowDevice::pread(void* buf, uint32_t count, uint64_t offset) {
  auto job = merge_job();
  if (!job) {
    auto q = queue();
    if (!q || q->empty()) return next_->pread(buf, count, offset);
    // Entries first, then live: an entry that leaves the queue meanwhile was
    // applied to live before it left, and laying it over again is harmless.
    auto over = q->overlay_in(offset, count);
    int e = next_->pread(buf, count, offset);
    if (e == 0 && !over.empty()) FirstWriteQueue::lay(over, static_cast<uint8_t*>(buf), count, offset);
    return e;
  }
  // A rollback is merging: pending chunks still read as its snapshot.
  auto chain_ptr = chain();
  const size_t k = index_of(*chain_ptr, job->snapshot_id());
  auto* out = static_cast<uint8_t*>(buf);
  return for_runs(offset, count, chunk_size_, [&](uint64_t c) { return job->pending(c); },
                  [&](uint64_t off, uint64_t len, bool pending) {
                    uint8_t* dst = out + (off - offset);
                    if (pending && k < chain_ptr->size())
                      return read_snapshot(*chain_ptr, k, dst, static_cast<uint32_t>(len), off);
                    return next_->pread(dst, static_cast<uint32_t>(len), off);
                  });
}

int CowDevice::extents(uint32_t count, uint64_t offset, uint32_t max, std::vector<Extent>& out) {
  auto job = merge_job();
  // Chunks with queued first writes are data, whatever live says yet.
  std::vector<uint64_t> queued;
  if (!job) {
    auto q = queue();
    if (q && !q->empty()) queued = q->chunks_in(offset / chunk_size_, (offset + count - 1) / chunk_size_);
    if (queued.empty()) return next_->extents(count, offset, max, out);
  }
  auto chain_ptr = chain();
  const size_t k = job ? index_of(*chain_ptr, job->snapshot_id()) : chain_ptr->size();
  auto special = [&](uint64_t c) {
    return job ? job->pending(c) : std::binary_search(queued.begin(), queued.end(), c);
  };
  int r = for_runs(offset, count, chunk_size_, special,
                  [&](uint64_t off, uint64_t len, bool pending) {
                    if (out.size() >= max) return -1;  // enough: stop (not an error)
                    size_t before = out.size();
                    if (pending && !job) {
                      out.push_back({len, 0});
                      return 0;
                    }
                    int e = pending && k < chain_ptr->size()
                                ? snapshot_extents(*chain_ptr, k, static_cast<uint32_t>(len), off,
                                                   static_cast<uint32_t>(max - out.size()), out)
                                : next_->extents(static_cast<uint32_t>(len), off, static_cast<uint32_t>(max - out.size()), out);
                    if (e) return e;
                    uint64_t covered = 0;
                    for (size_t i = before; i < out.size(); ++i) covered += out[i].length;
                    return covered < len ? -1 : 0;  // the lower layer stopped early: so do we
                  });
  return r > 0 ? r : 0;
}

// Writes: first writes (and writes to chunks with queued entries) go through
// the queue when there is one. Otherwise: merge what a running rollback still
// has pending in the range (so the write lands on the snapshot's data and
// wins), preserve, then write.
std::optional<int> CowDevice::via_queue(const void* data, uint32_t count, uint64_t offset, bool may_trim, IoFlags flags) {
  auto q = queue();
  if (!q || merge_job()) return std::nullopt;  // no queue during a merge: it was drained before it
  if (q->accepting()) {
    // The lock-free bitmap test first: a first write needs no look at the queue.
    if (!needs_preserving(offset, count) && !q->touches(offset, count)) return std::nullopt;
    mark_dirty(offset, count);
    int e = q->submit(static_cast<const uint8_t*>(data), offset, count, may_trim, flags.fua);
    if (e == 0) return flags.fua ? next_->flush() : 0;
    if (e != ESHUTDOWN) return e;
  }
  // The journal failed: what it holds reaches live before anything writes
  // inline; if it cannot, this write fails too (it may touch a queued chunk).
  if (int e = q->drain()) return e;
  return std::nullopt;
}

int CowDevice::pwrite(const void* buf, uint32_t count, uint64_t offset, IoFlags flags) {
  GateGuard g(gate_);
  if (int e = next_->health()) return e;  // it cannot land: preserve nothing, queue nothing
  if (auto r = via_queue(buf, count, offset, false, flags)) return *r;
  if (int e = merge_range(offset, count)) return e;
  preserve(offset, count);
  mark_dirty(offset, count);
  return next_->pwrite(buf, count, offset, flags);
}

int CowDevice::trim(uint32_t count, uint64_t offset, IoFlags flags) {
  GateGuard g(gate_);
  if (int e = next_->health()) return e;  // it cannot land: preserve nothing, queue nothing
  // Queued as a zeroing that may punch a hole: what a trim does here.
  if (auto r = via_queue(nullptr, count, offset, true, flags)) return *r;
  if (int e = merge_range(offset, count)) return e;
  preserve(offset, count);
  mark_dirty(offset, count);
  return next_->trim(count, offset, flags);
}

int CowDevice::zero(uint32_t count, uint64_t offset, IoFlags flags) {
  GateGuard g(gate_);
  if (int e = next_->health()) return e;  // it cannot land: preserve nothing, queue nothing
  // A fast zero must not copy old data first: refuse at once if it would.
  if (flags.fast_only) {
    auto q = queue();
    if (needs_preserving(offset, count) || needs_merging(offset, count) || (q && q->touches(offset, count)))
      return ENOTSUP;
  }
  if (auto r = via_queue(nullptr, count, offset, flags.may_trim, flags)) return *r;
  if (int e = merge_range(offset, count)) return e;
  preserve(offset, count);
  mark_dirty(offset, count);
  return next_->zero(count, offset, flags);
}

int CowDevice::flush() {
  // Durability comes from the live image, not the journal: apply what is
  // queued (preserving first), then flush live.
  if (auto q = queue())
    if (int e = q->settle()) return e;
  return next_->flush();
}

void CowDevice::drain() {
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

std::string CowDevice::kept_journal() const {
  std::lock_guard<std::mutex> lk(mode_mu_);
  return kept_journal_;
}

void CowDevice::settle() {
  if (auto q = queue()) q->settle();  // its error is FLUSH's to report
}

int CowDevice::drain_queue(std::string& err) {
  auto q = queue();
  if (!q) return 0;
  int e = q->drain();
  if (e)
    err = std::to_string(q->queued()) + " first writes queued for the volume cannot be applied to the image (" +
          strerror(e) + "); they are kept in the journal and applied as soon as the image can be written";
  return e;
}

void CowDevice::retire_queue() {
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

uint64_t CowDevice::queued_writes() const {
  auto q = queue();
  return q ? q->queued() : 0;
}

std::string CowDevice::first_write_mode() const {
  auto q = queue();
  if (q && q->accepting()) return "journal";
  if (q) return "inline (journal unavailable: " + q->journal_error() + ")";
  return "inline";
}

// Background batch of queued first writes: preserve every chunk they touch
// that the target still needs (one commit), then apply them in order (page
// cache; FLUSH and FUA flush live). Preservation failure marks snapshots failed, as inline; the
// writes are applied either way.
int CowDevice::apply_queued(const FirstWriteQueue::Batch& batch) {
  // The image lost a write-back: nothing more lands (the entries stay
  // journalled for the next start, and no snapshot is failed for it).
  if (int e = next_->health()) return e;
  auto chain_ptr = chain();
  const Chain& chain = *chain_ptr;
  const size_t t = target_of(chain);
  if (t < chain.size()) {
    std::vector<uint64_t> needed;
    for (auto& q : batch)
      for (uint64_t c = q->first_chunk; c <= q->last_chunk; ++c)
        if (source_of(chain, t, c) == chain.size()) needed.push_back(c);
    std::sort(needed.begin(), needed.end());
    needed.erase(std::unique(needed.begin(), needed.end()), needed.end());
    if (!needed.empty()) {
      auto stripes = stripes_of(needed);
      lock_stripes(stripes);
      preserve_locked(chain, std::move(needed));
      unlock_stripes(stripes);
    }
  }
  scoped_crash_point("apply.preserved");
  for (auto& q : batch) {
    if (crash_armed() && &q == &batch[batch.size() / 2]) scoped_crash_point("apply.half");
    IoFlags f;
    f.may_trim = q->may_trim;
    int e = q->type == WriteJournal::kWrite ? next_->pwrite(q->data, q->length, q->offset, IoFlags{})
                                            : next_->zero(q->length, q->offset, f);
    if (e) return e;
  }
  return 0;  // live is flushed by FLUSH (after settling) and FUA, not per batch
}

void CowDevice::start_queue() {
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

int CowDevice::open_journal(const JournalConfig& cfg, uint64_t& replayed, std::string& note, JournalError& kind,
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
  if (!chain()->empty() && cfg.ring_size > 0 && !cfg.read_only) start_queue();
  return 0;
}

bool CowDevice::needs_merging(uint64_t offset, uint64_t count) const {
  auto job = merge_job();
  if (!job || count == 0) return false;
  for (uint64_t c = offset / chunk_size_; c <= (offset + count - 1) / chunk_size_; ++c)
    if (job->pending(c)) return true;
  return false;
}

bool CowDevice::needs_preserving(uint64_t offset, uint64_t count) const {
  auto chain_ptr = chain();
  const Chain& chain = *chain_ptr;
  const size_t t = target_of(chain);
  if (t == chain.size() || count == 0) return false;
  for (uint64_t c = offset / chunk_size_; c <= (offset + count - 1) / chunk_size_; ++c)
    if (source_of(chain, t, c) == chain.size()) return true;
  return false;
}

int CowDevice::read_snapshot(const Chain& chain, size_t i, void* buf, uint32_t count, uint64_t offset) {
  auto* out = static_cast<uint8_t*>(buf);
  const uint64_t end = offset + count;
  uint64_t pos = offset;
  while (pos < end) {
    uint64_t c = pos / chunk_size_;
    size_t src = source_of(chain, i, c);
    // Extend the run while following chunks come from the same source.
    uint64_t run_end = std::min<uint64_t>((c + 1) * chunk_size_, end);
    while (run_end < end && source_of(chain, i, run_end / chunk_size_) == src)
      run_end = std::min<uint64_t>(run_end + chunk_size_, end);
    uint32_t len = static_cast<uint32_t>(run_end - pos);
    uint8_t* dst = out + (pos - offset);
    if (src < chain.size()) {
      if (int e = chain[src]->read_data(dst, len, pos)) return e;
    } else {
      if (int e = next_->pread(dst, len, pos)) return e;
      // A write may have preserved and overwritten a chunk while we read the
      // live volume. Preservation sets the bit before the live write, so a
      // chunk whose bit is still clear now was read before it changed.
      for (uint64_t cc = c; cc * chunk_size_ < run_end; ++cc) {
        size_t now = source_of(chain, i, cc);
        if (now == chain.size()) continue;
        uint64_t a = std::max<uint64_t>(cc * chunk_size_, pos), b = std::min<uint64_t>((cc + 1) * chunk_size_, run_end);
        if (int e = chain[now]->read_data(out + (a - offset), static_cast<uint32_t>(b - a), a)) return e;
      }
    }
    pos = run_end;
  }
  return 0;
}

int CowDevice::snapshot_extents(const Chain& chain, size_t i, uint32_t count, uint64_t offset, uint32_t max,
                                std::vector<Extent>& out) {
  // Chunks held by a snapshot are data; the rest is as the live volume says.
  const uint64_t end = offset + count;
  uint64_t pos = offset;
  uint32_t n = 0;
  while (pos < end && n < max) {
    uint64_t c = pos / chunk_size_;
    bool held = source_of(chain, i, c) < chain.size();
    uint64_t run_end = std::min<uint64_t>((c + 1) * chunk_size_, end);
    while (run_end < end && (source_of(chain, i, run_end / chunk_size_) < chain.size()) == held)
      run_end = std::min<uint64_t>(run_end + chunk_size_, end);
    if (held) {
      out.push_back({run_end - pos, 0});
      ++n;
    } else {
      size_t before = out.size();
      if (int e = next_->extents(static_cast<uint32_t>(run_end - pos), pos, max - n, out)) return e;
      uint64_t covered = 0;
      for (size_t k = before; k < out.size(); ++k) covered += out[k].length;
      n += static_cast<uint32_t>(out.size() - before);
      if (covered < run_end - pos) return 0;  // the live device stopped early: so do we
    }
    pos = run_end;
  }
  return 0;
}

namespace {
// The snapshot that must receive chunk c of snapshot i when i leaves the
// chain (chain.size(): none). Walking older from i: a snapshot that holds c
// ends the walk, since it and everything older read c from there. The first
// HEALTHY one that lacks c is the heir: it reads c through i, and once it
// holds c, every snapshot older than it reads c through it (or through a
// nearer holder), so one copy is enough. Failed snapshots passed on the way
// lack c and read it through i as well, but they are failed (their exports
// answer EIO, rollback to them is refused) and hold nothing anyone reads c
// from, so they get no copy: a failed store may be out of space, and a copy
// it cannot take must not stop the delete.
size_t heir_of(const CowDevice::Chain& chain, size_t i, uint64_t c) {
  for (size_t j = i; j-- > 0;) {
    if (chain[j]->map().test(c)) return chain.size();
    if (!chain[j]->failed()) return j;
  }
  return chain.size();
}
}  // namespace

// Bits of snapshots older than i change here only: preservation goes to the
// newest healthy snapshot T and only for chunks no snapshot from T on holds,
// so it never adds a chunk that i holds to a snapshot older than i (if T is
// older than i, i is "from T on"). Snapshots may fail meanwhile (writes flow
// during the bulk steps): a heir that failed before its copy was committed
// is passed over and the next heir gets the chunk. A copy into a heir that
// is still healthy failing (its store full, an I/O error) fails the step,
// so the delete fails with the reason and can be retried: i is still in the
// chain, the heir's committed copies are identical to what it read through
// i, and what was written but not committed is outside its map. Nothing is
// marked failed by a hand-down.
int CowDevice::hand_down(uint64_t id, uint64_t from, uint64_t max, uint64_t& next, std::string& err) {
  if (merge_job()) {
    err = "a rollback merge is running";
    return EBUSY;
  }
  auto chain_ptr = chain();
  const Chain& chain = *chain_ptr;
  size_t i = 0;
  while (i < chain.size() && chain[i]->id() != id) ++i;
  if (i == chain.size()) {
    err = "no snapshot with id " + std::to_string(id);
    return ENOENT;
  }
  const uint64_t total = chain[i]->chunks();
  next = std::min(total, from + max);
  if (i == 0) return 0;  // nobody older reads through it
  SnapshotStore& src = *chain[i];
  std::vector<std::vector<ChunkSum>> moved(i);  // written, not yet committed, per heir
  size_t uncommitted = 0;
  std::vector<uint8_t> buf(chunk_size_);
  std::vector<ChunkSum> sums;
  // Copies chunk c of i into its heir (if any) without committing it.
  auto give = [&](uint64_t c) -> int {
    for (;;) {
      const size_t h = heir_of(chain, i, c);
      if (h == chain.size()) return 0;
      std::lock_guard<std::mutex> lk(stripes_[c % kStripes]);
      uint64_t off = c * chunk_size_;
      uint32_t len = static_cast<uint32_t>(std::min<uint64_t>(chunk_size_, src.volume_size() - off));
      if (int e = src.read_data(buf.data(), len, off)) {
        err = "reading chunk " + std::to_string(c) + " of the snapshot being deleted failed: " + strerror(e);
        return e;
      }
      sums.clear();
      int e = chain[h]->write_chunks(buf.data(), c, len, sums);
      if (!e) {
        moved[h].insert(moved[h].end(), sums.begin(), sums.end());
        ++uncommitted;
        return 0;
      }
      if (!chain[h]->failed()) {
        err = "copying chunk " + std::to_string(c) + " to snapshot " + std::to_string(chain[h]->id()) +
              " (older, it reads the chunk through the one being deleted) failed: " + strerror(e);
        return e;
      }
      // The heir failed meanwhile: heir_of passes over it now.
    }
  };
  // Newest heir first: the chunks of a heir that failed before its commit
  // go to older heirs, whose commits come later in the same loop.
  auto commit = [&]() -> int {
    for (size_t h = i; h-- > 0;) {
      if (moved[h].empty()) continue;
      std::vector<ChunkSum> batch;
      batch.swap(moved[h]);
      int e = chain[h]->commit(batch);
      if (!e) crash_point("snapshot.delete.committed");
      if (!e) continue;
      if (!chain[h]->failed()) {
        err = "committing handed-down chunks to snapshot " + std::to_string(chain[h]->id()) + " failed: " + strerror(e);
        return e;
      }
      for (const ChunkSum& s : batch)
        if (int e2 = give(s.chunk)) return e2;
    }
    uncommitted = 0;
    return 0;
  };
  for (uint64_t c = from; c < next; ++c) {
    if (!src.map().test(c)) continue;
    if (int e = give(c)) return e;
    crash_point("snapshot.delete.copied");
    if (uncommitted >= kHandDownBatch)
      if (int e = commit()) return e;
  }
  return commit();
}

std::shared_ptr<Device> CowDevice::view(uint64_t id) {
  auto s = find(id);
  if (!s) return nullptr;
  return std::make_shared<SnapshotView>(shared_from_this(), s);
}

}  // namespace nbd
