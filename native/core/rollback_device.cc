// rollback_device.cc — see rollback_device.hh for the design and locking.
#include "rollback_device.hh"

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "chunk_runs.hh"

namespace nbd {

RollbackDevice::RollbackDevice(std::shared_ptr<CowDevice> cow, std::shared_ptr<VolumeLocks> locks)
    : FilterDevice(cow), cow_(std::move(cow)), locks_(std::move(locks)), chunk_size_(cow_->chunk_size()) {}

int RollbackDevice::copy_locked(MergeJob& job, const CowDevice::Chain& chain, std::vector<uint64_t>& chunks, bool fua) {
  chunks.erase(std::remove_if(chunks.begin(), chunks.end(), [&](uint64_t c) { return !job.pending(c); }), chunks.end());
  if (chunks.empty()) return 0;
  const size_t k = CowDevice::index_of(chain, job.snapshot_id());
  if (k == chain.size()) return EIO;  // cannot happen: deletes are refused while a merge runs
  cow_->preserve_locked(chain, chunks);  // the old live data, for the newer snapshots
  const uint64_t vol = size();
  std::vector<uint8_t> buf;
  for (size_t i = 0; i < chunks.size();) {
    size_t e = i + 1;
    while (e < chunks.size() && chunks[e] == chunks[e - 1] + 1 && (e - i + 1) * static_cast<uint64_t>(chunk_size_) <= (4u << 20))
      ++e;
    uint64_t off = chunks[i] * chunk_size_;
    uint32_t len = static_cast<uint32_t>(std::min<uint64_t>((chunks[e - 1] + 1) * chunk_size_, vol) - off);
    buf.resize(len);
    if (int err = cow_->read_snapshot(chain, k, buf.data(), len, off)) return err;
    IoFlags f;
    f.fua = fua;
    if (int err = cow_->raw_pwrite(buf.data(), len, off, f)) return err;  // preserved above
    i = e;
  }
  return 0;
}

int RollbackDevice::merge_locked(MergeJob& job, const CowDevice::Chain& chain, std::vector<uint64_t> chunks) {
  if (int err = copy_locked(job, chain, chunks, true)) return err;
  return job.commit(chunks);  // durable "merged" only once live durably holds the data (FUA)
}

int RollbackDevice::merge_range(uint64_t offset, uint64_t count) {
  auto job = merge_job();
  if (!job || count == 0) return 0;
  std::vector<uint64_t> pending;
  for (uint64_t c = offset / chunk_size_; c <= (offset + count - 1) / chunk_size_; ++c)
    if (job->pending(c)) pending.push_back(c);
  if (pending.empty()) return 0;
  auto chain_ptr = cow_->chain();
  StripeLock lk(*locks_, pending);
  return merge_locked(*job, *chain_ptr, std::move(pending));
}

bool RollbackDevice::needs_merging(uint64_t offset, uint64_t count) const {
  auto job = merge_job();
  if (!job || count == 0) return false;
  for (uint64_t c = offset / chunk_size_; c <= (offset + count - 1) / chunk_size_; ++c)
    if (job->pending(c)) return true;
  return false;
}

int RollbackDevice::merge_step(uint64_t from, uint64_t max, uint64_t& next, std::string& err) {
  GateGuard g(locks_->gate);
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
  auto chain_ptr = cow_->chain();
  const size_t piece = std::max<size_t>(1, (4u << 20) / chunk_size_);
  std::vector<uint64_t> copied;
  int e = 0;
  for (size_t i = 0; i < batch.size() && !e; i += piece) {
    std::vector<uint64_t> part(batch.begin() + i, batch.begin() + std::min(batch.size(), i + piece));
    {
      StripeLock lk(*locks_, part);
      e = copy_locked(*job, *chain_ptr, part, false);
    }
    copied.insert(copied.end(), part.begin(), part.end());
  }
  if (!e) e = next_->flush();
  if (!e) e = job->commit(copied);  // durable "merged" only once live durably holds the data
  if (e) err = std::string("merging chunks into the volume failed: ") + strerror(e);
  return e;
}

int RollbackDevice::prepare(uint64_t snapshot_id, const std::string& job_path, std::string& err) {
  auto chain_ptr = cow_->chain();
  const CowDevice::Chain& chain = *chain_ptr;
  const size_t k = CowDevice::index_of(chain, snapshot_id);
  if (k == chain.size()) {
    err = "no snapshot with id " + std::to_string(snapshot_id);
    return ENOENT;
  }
  if (chain[k]->failed()) {
    err = "snapshot " + std::to_string(snapshot_id) + " failed: " + chain[k]->failure();
    return EIO;
  }
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
  if (!job) return EIO;
  prepared_ = std::shared_ptr<MergeJob>(std::move(job));
  return 0;
}

void RollbackDevice::activate() {
  if (prepared_) {
    // Writes from now on are what will differ from the snapshot once merged.
    dirty_ = std::make_unique<Bitmap>(prepared_->chunks());
    std::atomic_store(&job_, std::move(prepared_));
    clean_of_ = 0;
  }
  prepared_.reset();
}

void RollbackDevice::abort() { prepared_.reset(); }

void RollbackDevice::mark_dirty(uint64_t offset, uint64_t count) {
  Bitmap* d = dirty_.get();  // replaced only with writes drained (gate closed)
  if (!d || count == 0) return;
  for (uint64_t c = offset / chunk_size_; c <= (offset + count - 1) / chunk_size_; ++c)
    if (!d->test(c)) d->set(c);
}

int RollbackDevice::resume(const std::string& job_path, std::string& err) {
  auto job = MergeJob::open(job_path, size(), chunk_size_, err);
  if (!job) return EINVAL;
  auto chain_ptr = cow_->chain();
  if (CowDevice::index_of(*chain_ptr, job->snapshot_id()) == chain_ptr->size()) {
    err = job_path + ": the merge names snapshot " + std::to_string(job->snapshot_id()) + ", which the volume does not have";
    return EINVAL;
  }
  std::atomic_store(&job_, std::shared_ptr<MergeJob>(std::move(job)));
  return 0;
}

int RollbackDevice::finish(std::string& err) {
  auto job = merge_job();
  if (job && job->remaining() > 0) {
    err = std::to_string(job->remaining()) + " chunks are still to be merged";
    return EAGAIN;
  }
  std::atomic_store(&job_, std::shared_ptr<MergeJob>());
  if (job) clean_of_ = job->snapshot_id();  // live = that snapshot, except dirty_
  return 0;
}

int RollbackDevice::pread(void* buf, uint32_t count, uint64_t offset) {
  auto job = merge_job();
  if (!job) return next_->pread(buf, count, offset);
  // A rollback is merging: pending chunks still read as its snapshot.
  auto chain_ptr = cow_->chain();
  const size_t k = CowDevice::index_of(*chain_ptr, job->snapshot_id());
  auto* out = static_cast<uint8_t*>(buf);
  return for_runs(offset, count, chunk_size_, [&](uint64_t c) { return job->pending(c); },
                  [&](uint64_t off, uint64_t len, bool pending) {
                    uint8_t* dst = out + (off - offset);
                    if (pending && k < chain_ptr->size())
                      return cow_->read_snapshot(*chain_ptr, k, dst, static_cast<uint32_t>(len), off);
                    return next_->pread(dst, static_cast<uint32_t>(len), off);
                  });
}

int RollbackDevice::extents(uint32_t count, uint64_t offset, uint32_t max, std::vector<Extent>& out) {
  auto job = merge_job();
  if (!job) return next_->extents(count, offset, max, out);
  auto chain_ptr = cow_->chain();
  const size_t k = CowDevice::index_of(*chain_ptr, job->snapshot_id());
  int r = for_runs(offset, count, chunk_size_, [&](uint64_t c) { return job->pending(c); },
                   [&](uint64_t off, uint64_t len, bool pending) {
                     if (out.size() >= max) return -1;  // enough: stop (not an error)
                     size_t before = out.size();
                     int e = pending && k < chain_ptr->size()
                                 ? cow_->snapshot_extents(*chain_ptr, k, static_cast<uint32_t>(len), off,
                                                          static_cast<uint32_t>(max - out.size()), out)
                                 : next_->extents(static_cast<uint32_t>(len), off, static_cast<uint32_t>(max - out.size()), out);
                     if (e) return e;
                     uint64_t covered = 0;
                     for (size_t i = before; i < out.size(); ++i) covered += out[i].length;
                     return covered < len ? -1 : 0;  // the lower layer stopped early: so do we
                   });
  return r > 0 ? r : 0;
}

// Host writes: merge what a running rollback still has pending in the range
// (so the write lands on the snapshot's data and wins), then go on down
// (CowDevice preserves, then writes). The range is marked dirty after the
// layer below returns (dirty_ is read only with the gate closed, so before or
// after makes no difference), unless a fast zero was refused: then nothing
// changed.
int RollbackDevice::pwrite(const void* buf, uint32_t count, uint64_t offset, IoFlags flags) {
  if (int e = merge_range(offset, count)) return e;
  int e = next_->pwrite(buf, count, offset, flags);
  mark_dirty(offset, count);
  return e;
}

int RollbackDevice::trim(uint32_t count, uint64_t offset, IoFlags flags) {
  if (int e = merge_range(offset, count)) return e;
  int e = next_->trim(count, offset, flags);
  mark_dirty(offset, count);
  return e;
}

int RollbackDevice::zero(uint32_t count, uint64_t offset, IoFlags flags) {
  // A fast zero must not copy the snapshot's data first: refuse at once if it would.
  if (flags.fast_only && needs_merging(offset, count)) return ENOTSUP;
  if (int e = merge_range(offset, count)) return e;
  int e = next_->zero(count, offset, flags);
  if (!(flags.fast_only && e == ENOTSUP)) mark_dirty(offset, count);
  return e;
}

}  // namespace nbd
