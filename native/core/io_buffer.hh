// io_buffer.hh — a page-aligned, reusable per-thread buffer for request payloads.
#pragma once

#include <cstdint>
#include <cstdlib>

namespace nbd {

class IoBuffer {
 public:
  // Keep at most this much between requests; larger buffers are freed after use.
  static constexpr size_t kRetain = 4 << 20;
  IoBuffer() = default;
  IoBuffer(const IoBuffer&) = delete;
  IoBuffer& operator=(const IoBuffer&) = delete;
  ~IoBuffer() { std::free(p_); }

  // Returns a buffer of at least n bytes, or nullptr if memory is short.
  uint8_t* get(size_t n) {
    if (n <= cap_) return p_;
    std::free(p_);
    p_ = nullptr;
    cap_ = 0;
    void* q = nullptr;
    size_t want = (n + 4095) & ~size_t{4095};
    if (posix_memalign(&q, 4096, want) != 0) return nullptr;
    p_ = static_cast<uint8_t*>(q);
    cap_ = want;
    return p_;
  }
  void trim() {
    if (cap_ > kRetain) { std::free(p_); p_ = nullptr; cap_ = 0; }
  }

 private:
  uint8_t* p_ = nullptr;
  size_t cap_ = 0;
};

}  // namespace nbd
