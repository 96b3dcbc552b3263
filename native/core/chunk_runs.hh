// chunk_runs.hh — walks a byte range as runs of chunks in the same state, so
// a layer issues one call per run (coalescing), not one per chunk.
#pragma once

#include <algorithm>
#include <cstdint>

namespace nbd {

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

}  // namespace nbd
