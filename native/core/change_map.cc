// change_map.cc — see change_map.hh for the rule and the refusals.
#include "change_map.hh"

namespace nbd {

void ChangeSet::add(const Bitmap& b) {
  const uint64_t n = std::min<uint64_t>(b.words(), w_.size());
  for (uint64_t i = 0; i < n; ++i) w_[i] |= b.word(i);
}

void ChangeSet::add_chunks(const std::vector<uint64_t>& chunks) {
  for (uint64_t c : chunks)
    if (c < chunks_) w_[c >> 6] |= uint64_t{1} << (c & 63);
}

uint64_t ChangeSet::count() const {
  uint64_t n = 0;
  for (uint64_t v : w_) n += static_cast<uint64_t>(__builtin_popcountll(v));
  return n;
}

std::vector<ChunkRun> ChangeSet::runs() const {
  std::vector<ChunkRun> out;
  uint64_t c = 0;
  while (c < chunks_) {
    // Skip clear bits a word at a time, then find the run's end the same way.
    uint64_t v = w_[c >> 6] >> (c & 63);
    if (v == 0) {
      c = (c | 63) + 1;
      continue;
    }
    c += static_cast<uint64_t>(__builtin_ctzll(v));
    if (c >= chunks_) break;
    const uint64_t start = c;
    for (;;) {
      uint64_t inv = ~w_[c >> 6] >> (c & 63);
      if (inv == 0) {  // the rest of this word is set
        c = (c | 63) + 1;
        if (c >= chunks_) break;
        continue;
      }
      c += static_cast<uint64_t>(__builtin_ctzll(inv));
      break;
    }
    if (c > chunks_) c = chunks_;
    out.push_back({start, c - start});
  }
  return out;
}

ChangeError change_range(const SnapshotChain& chain, uint64_t from, uint64_t to, size_t& first, size_t& end,
                         std::string& err) {
  auto index = [&](uint64_t id) {
    size_t i = 0;
    while (i < chain.size() && chain[i]->id() != id) ++i;
    return i;
  };
  first = index(from);
  if (first == chain.size()) {
    err = "no snapshot with id " + std::to_string(from);
    return ChangeError::kNotFound;
  }
  end = chain.size();
  if (to != 0) {
    end = index(to);
    if (end == chain.size()) {
      err = "no snapshot with id " + std::to_string(to);
      return ChangeError::kNotFound;
    }
    if (end <= first) {
      err = end == first ? "the range starts and ends at the same snapshot (id " + std::to_string(from) + ")"
                         : "snapshot " + std::to_string(from) + " is not older than snapshot " + std::to_string(to);
      return ChangeError::kRangeInvalid;
    }
  }
  // A failed A lost chunks without a bit for them (the union may miss their
  // changes); a failed B has no content to compare with. Failed snapshots
  // strictly between them leave the union a cover (change_map.hh).
  if (chain[first]->failed()) {
    err = "snapshot " + std::to_string(from) + " failed, so its changes cannot be known: " + chain[first]->failure();
    return ChangeError::kUnavailable;
  }
  if (to != 0 && chain[end]->failed()) {
    err = "snapshot " + std::to_string(to) + " failed, so its content is lost: " + chain[end]->failure();
    return ChangeError::kUnavailable;
  }
  return ChangeError::kNone;
}

}  // namespace nbd
