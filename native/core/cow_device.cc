// cow_device.cc — see cow_device.hh for the design, the chain rules and locking.
#include "cow_device.hh"

#include <algorithm>
#include <cerrno>
#include <cstring>

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

int CowDevice::add_snapshot(std::shared_ptr<SnapshotStore> s) {
  gate_.close();  // in-flight writes drain; new ones wait
  int e = next_->flush();
  if (e == 0) load_snapshot(std::move(s));
  gate_.open();
  return e;
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

bool CowDevice::remove_snapshot(uint64_t id) {
  gate_.close();
  bool found = drop_from_chain(id);
  gate_.open();
  return found;
}

int CowDevice::finish_remove(uint64_t id, std::string& err) {
  gate_.close();
  auto s = find(id);
  if (!s) {
    err = "no snapshot with id " + std::to_string(id);
    return ENOENT;
  }
  uint64_t next = 0;
  int e = hand_down(id, 0, s->chunks(), next, err);
  if (e) return e;  // still in the chain; writes stay paused until resume_writes()
  drop_from_chain(id);
  return 0;
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

int CowDevice::preserve(uint64_t offset, uint64_t count) {
  auto chain_ptr = chain();
  const Chain& chain = *chain_ptr;
  if (chain.empty() || count == 0) return 0;
  const size_t t = target_of(chain);
  if (t == chain.size()) return 0;  // every snapshot failed: nothing to protect
  const uint64_t c0 = offset / chunk_size_, c1 = (offset + count - 1) / chunk_size_;
  auto needed_now = [&](uint64_t c) { return source_of(chain, t, c) == chain.size(); };
  std::vector<uint64_t> needed;
  for (uint64_t c = c0; c <= c1; ++c)
    if (needed_now(c)) needed.push_back(c);
  if (needed.empty()) return 0;  // the hot path: every chunk already preserved

  std::vector<size_t> stripes;
  for (uint64_t c : needed) stripes.push_back(c % kStripes);
  std::sort(stripes.begin(), stripes.end());
  stripes.erase(std::unique(stripes.begin(), stripes.end()), stripes.end());
  for (size_t s : stripes) stripes_[s].lock();
  needed.erase(std::remove_if(needed.begin(), needed.end(), [&](uint64_t c) { return !needed_now(c); }), needed.end());

  std::string reason;
  const uint64_t vol = chain[t]->volume_size();
  std::vector<uint8_t> buf;
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
    if (err) reason = std::string("reading old data from the volume failed: ") + strerror(err);
    else if ((err = chain[t]->write_data(buf.data(), static_cast<uint32_t>(len), off)))
      reason = std::string("writing to the snapshot store failed: ") + strerror(err);
    k = e;
  }
  if (reason.empty()) {
    if (int err = chain[t]->commit(needed)) reason = std::string("committing to the snapshot store failed: ") + strerror(err);
  }
  if (!reason.empty()) fail(chain, t, needed, reason);
  for (size_t s : stripes) stripes_[s].unlock();
  return 0;  // the host write proceeds whatever happened to the snapshot
}

int CowDevice::pwrite(const void* buf, uint32_t count, uint64_t offset, IoFlags flags) {
  GateGuard g(gate_);
  preserve(offset, count);
  return next_->pwrite(buf, count, offset, flags);
}

int CowDevice::trim(uint32_t count, uint64_t offset, IoFlags flags) {
  GateGuard g(gate_);
  preserve(offset, count);
  return next_->trim(count, offset, flags);
}

int CowDevice::zero(uint32_t count, uint64_t offset, IoFlags flags) {
  GateGuard g(gate_);
  // A fast zero must not copy old data first: refuse at once if it would.
  if (flags.fast_only && needs_preserving(offset, count)) return ENOTSUP;
  preserve(offset, count);
  return next_->zero(count, offset, flags);
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
  if (i == 0 || chain[i - 1]->failed()) return 0;  // nobody older needs (or can use) its chunks
  SnapshotStore& src = *chain[i];
  SnapshotStore& dst = *chain[i - 1];
  std::vector<uint64_t> moved;
  std::vector<uint8_t> buf(chunk_size_);
  for (uint64_t c = from; c < next; ++c) {
    if (!src.map().test(c) || dst.map().test(c)) continue;
    std::lock_guard<std::mutex> lk(stripes_[c % kStripes]);
    uint64_t off = c * chunk_size_;
    uint32_t len = static_cast<uint32_t>(std::min<uint64_t>(chunk_size_, src.volume_size() - off));
    int e = src.read_data(buf.data(), len, off);
    if (!e) e = dst.write_data(buf.data(), len, off);
    if (e) {
      err = std::string("copying chunk ") + std::to_string(c) + " to the older snapshot failed: " + strerror(e);
      return e;
    }
    moved.push_back(c);
  }
  if (!moved.empty()) {
    if (int e = dst.commit(moved)) {
      err = std::string("committing handed-down chunks failed: ") + strerror(e);
      return e;
    }
  }
  return 0;
}

std::shared_ptr<Device> CowDevice::view(uint64_t id) {
  auto s = find(id);
  if (!s) return nullptr;
  return std::make_shared<SnapshotView>(shared_from_this(), s);
}

}  // namespace nbd
