// volume_locks.hh — the coordination every layer of one volume's device
// chain shares: the write gate and the chunk stripe mutexes. One object per
// volume, made by Volume (volume.hh) and handed to each layer; no layer has a
// gate or stripes of its own.
//
// The write gate (write_gate.hh): every modifying request enters it once, at
// the top of the chain (JournalDevice::pwrite/trim/zero), and so does a
// rollback merge step (RollbackDevice::merge_step); the layers below run
// inside it and never enter it again. The control plane (Volume) closes it to
// change the snapshot chain, drain the first-write queue or start a rollback,
// so every write sees one chain, one queue and one merge job from start to end.
//
// The stripes: kStripes mutexes, chunk c maps to stripe c % kStripes. They
// serialise what is done to one chunk beyond a plain write: preserving its
// old data into a snapshot (CowDevice), merging it back from a snapshot
// (RollbackDevice) and handing it down when a snapshot is deleted. A caller
// takes the stripes of all its chunks at once, in ascending stripe order
// (StripeLock), and calls the layer below through its `*_locked` entry points,
// which take no stripes themselves (std::mutex is not recursive).
//
// Lock order (the one order for the whole volume):
//     gate  →  stripes (ascending)  →  SnapshotStore::mu_
// The gate is not a mutex held across the request, but closing it waits for
// every request inside, so nobody may close it while holding a stripe.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <mutex>
#include <vector>

#include "write_gate.hh"

namespace nbd {

struct VolumeLocks {
  static constexpr size_t kStripes = 1024;

  WriteGate gate;
  std::mutex stripes[kStripes];

  // The distinct stripes of `chunks`, ascending: the order to take them in.
  static std::vector<size_t> stripes_of(const std::vector<uint64_t>& chunks) {
    std::vector<size_t> s;
    s.reserve(chunks.size());
    for (uint64_t c : chunks) s.push_back(c % kStripes);
    std::sort(s.begin(), s.end());
    s.erase(std::unique(s.begin(), s.end()), s.end());
    return s;
  }
  std::mutex& stripe_of(uint64_t chunk) { return stripes[chunk % kStripes]; }
};

// Holds the stripes of a set of chunks for its lifetime (ascending order).
class StripeLock {
 public:
  StripeLock(VolumeLocks& locks, const std::vector<uint64_t>& chunks)
      : locks_(locks), held_(VolumeLocks::stripes_of(chunks)) {
    for (size_t i : held_) locks_.stripes[i].lock();  // ascending: the lock order
  }
  ~StripeLock() {
    for (size_t i : held_) locks_.stripes[i].unlock();
  }
  StripeLock(const StripeLock&) = delete;
  StripeLock& operator=(const StripeLock&) = delete;

 private:
  VolumeLocks& locks_;
  std::vector<size_t> held_;
};

}  // namespace nbd
