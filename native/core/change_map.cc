// change_map.cc — see change_map.hh for the rule and the refusals.
#include "change_map.hh"

#include <algorithm>

namespace nbd {

ChangeSet::ChangeSet(uint64_t chunks, uint64_t first, uint64_t count)
    : first_(std::min(first, chunks)),
      end_(count > chunks - first_ ? chunks : first_ + count),
      base_(first_ >> 6),
      w_(end_ > first_ ? ((end_ + 63) >> 6) - base_ : 0, 0) {}

void ChangeSet::add(const Bitmap& b) {
  const uint64_t n = std::min<uint64_t>(w_.size(), b.words() > base_ ? b.words() - base_ : 0);
  for (uint64_t i = 0; i < n; ++i) w_[i] |= b.word(base_ + i);
}

void ChangeSet::add_chunks(const std::vector<uint64_t>& chunks) {
  for (uint64_t c : chunks)
    if (c >= first_ && c < end_) w_[(c >> 6) - base_] |= uint64_t{1} << (c & 63);
}

std::vector<ChunkRun> ChangeSet::runs() const {
  // Whole words at a time where they are all clear or all set; bit by bit at
  // the edges (the first and last words may hold bits outside the window).
  std::vector<ChunkRun> out;
  auto word = [&](uint64_t c) { return w_[(c >> 6) - base_]; };
  uint64_t c = first_;
  while (c < end_) {
    if ((c & 63) == 0 && word(c) == 0) {
      c += 64;
      continue;
    }
    if (!test(c)) {
      ++c;
      continue;
    }
    const uint64_t start = c;
    while (c < end_) {
      if ((c & 63) == 0 && end_ - c >= 64 && word(c) == ~uint64_t{0}) {
        c += 64;
        continue;
      }
      if (!test(c)) break;
      ++c;
    }
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
