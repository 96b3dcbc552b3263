// cow_device.cc — see cow_device.hh for the design, the chain rules and locking.
#include "cow_device.hh"

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "crash_point.hh"

namespace nbd {

CowDevice::CowDevice(std::shared_ptr<Device> live, uint32_t chunk_size, std::shared_ptr<VolumeLocks> locks,
                     FailureCallback on_failure)
    : FilterDevice(std::move(live)),
      chunk_size_(chunk_size),
      locks_(std::move(locks)),
      on_failure_(std::move(on_failure)),
      chain_(std::make_shared<const Chain>()) {}

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

bool CowDevice::drop(uint64_t id) {
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

size_t CowDevice::index_of(const Chain& chain, uint64_t id) {
  for (size_t i = 0; i < chain.size(); ++i)
    if (chain[i]->id() == id) return i;
  return chain.size();
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

int CowDevice::pwrite(const void* buf, uint32_t count, uint64_t offset, IoFlags flags) {
  preserve(offset, count);  // the host write proceeds whatever happened to the snapshot
  return next_->pwrite(buf, count, offset, flags);
}

int CowDevice::trim(uint32_t count, uint64_t offset, IoFlags flags) {
  preserve(offset, count);
  return next_->trim(count, offset, flags);
}

int CowDevice::zero(uint32_t count, uint64_t offset, IoFlags flags) {
  // A fast zero must not copy old data first: refuse at once if it would.
  if (flags.fast_only && needs_preserving(offset, count)) return ENOTSUP;
  preserve(offset, count);
  return next_->zero(count, offset, flags);
}

void CowDevice::preserve(uint64_t offset, uint64_t count) {
  auto chain_ptr = chain();
  const Chain& chain = *chain_ptr;
  if (chain.empty() || count == 0) return;
  const size_t t = target_of(chain);
  if (t == chain.size()) return;  // every snapshot failed: nothing to protect
  std::vector<uint64_t> needed;
  for (uint64_t c = offset / chunk_size_; c <= (offset + count - 1) / chunk_size_; ++c)
    if (source_of(chain, t, c) == chain.size()) needed.push_back(c);
  if (needed.empty()) return;  // the hot path: every chunk already preserved
  StripeLock lk(*locks_, needed);
  preserve_locked(chain, std::move(needed));
}

void CowDevice::preserve_chunks(std::vector<uint64_t> chunks) {
  auto chain_ptr = chain();
  const Chain& chain = *chain_ptr;
  const size_t t = target_of(chain);
  if (t == chain.size()) return;
  std::vector<uint64_t> needed;
  for (uint64_t c : chunks)
    if (source_of(chain, t, c) == chain.size()) needed.push_back(c);
  std::sort(needed.begin(), needed.end());
  needed.erase(std::unique(needed.begin(), needed.end()), needed.end());
  if (needed.empty()) return;
  StripeLock lk(*locks_, needed);
  preserve_locked(chain, std::move(needed));
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
// marked failed by a hand-down. (Volume refuses it while a rollback merges:
// the merge preserves into the chain too.)
int CowDevice::hand_down(uint64_t id, uint64_t from, uint64_t max, uint64_t& next, std::string& err) {
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
      std::lock_guard<std::mutex> lk(locks_->stripe_of(c));
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

}  // namespace nbd
