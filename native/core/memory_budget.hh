// memory_budget.hh — one server-wide bound on memory that volumes pin.
//
// Each volume's first-write journal is a preallocated, memory-backed ring
// (write_journal.hh): with many volumes those add up. Every journal reserves
// its ring from the server's budget when it is made (the first first write
// of a run) and gives it back when it is closed; a volume that finds the
// budget spent preserves its first writes inline instead (slower, never
// unsafe). Lock-free; any thread.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>

namespace nbd {

class MemoryBudget : public std::enable_shared_from_this<MemoryBudget> {
 public:
  explicit MemoryBudget(uint64_t limit) : limit_(limit) {}
  uint64_t limit() const { return limit_; }
  uint64_t used() const { return used_.load(); }
  // A reservation of n bytes, released when the returned handle goes; null
  // if the budget cannot take n more.
  std::shared_ptr<void> reserve(uint64_t n) {
    uint64_t cur = used_.load();
    do {
      if (n > limit_ || cur > limit_ - n) return nullptr;
    } while (!used_.compare_exchange_weak(cur, cur + n));
    auto self = shared_from_this();
    // Non-null (a null shared_ptr would read as "no reservation").
    return std::shared_ptr<void>(this, [self, n](void*) { self->used_.fetch_sub(n); });
  }

 private:
  const uint64_t limit_;
  std::atomic<uint64_t> used_{0};
};

}  // namespace nbd
