// bitmap.hh — a fixed-size bitmap of 64-bit words, one bit per chunk.
//
// Readers need no lock: test() is an acquire load, set() a release fetch_or
// and clear() a release fetch_and. A snapshot's bitmap only ever gains bits
// (a chunk, once preserved, stays preserved); a merge job's pending bitmap
// only ever loses them. Words are C++-owned.
#pragma once

#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>

namespace nbd {

class Bitmap {
 public:
  explicit Bitmap(uint64_t bits) : bits_(bits), nwords_((bits + 63) / 64), w_(new std::atomic<uint64_t>[nwords_ ? nwords_ : 1]) {
    for (uint64_t i = 0; i < nwords_; ++i) w_[i].store(0, std::memory_order_relaxed);
  }
  uint64_t size() const { return bits_; }
  uint64_t words() const { return nwords_; }

  bool test(uint64_t i) const { return (w_[i >> 6].load(std::memory_order_acquire) >> (i & 63)) & 1; }
  void set(uint64_t i) { w_[i >> 6].fetch_or(uint64_t{1} << (i & 63), std::memory_order_release); }
  void clear(uint64_t i) { w_[i >> 6].fetch_and(~(uint64_t{1} << (i & 63)), std::memory_order_release); }

  uint64_t count() const {
    uint64_t n = 0;
    for (uint64_t i = 0; i < nwords_; ++i) n += static_cast<uint64_t>(__builtin_popcountll(w_[i].load(std::memory_order_relaxed)));
    return n;
  }
  uint64_t word(uint64_t i) const { return w_[i].load(std::memory_order_acquire); }
  void or_word(uint64_t i, uint64_t v) { w_[i].fetch_or(v, std::memory_order_release); }

  // Raw words for zero-copy export; valid as long as the Bitmap lives.
  std::atomic<uint64_t>* data() { return w_.get(); }

 private:
  uint64_t bits_;
  uint64_t nwords_;
  std::unique_ptr<std::atomic<uint64_t>[]> w_;
};

}  // namespace nbd
