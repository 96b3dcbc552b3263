// write_gate.hh — lets the control plane pause writes and wait for in-flight
// ones to drain (snapshot create/delete, rollback start), at the cost of two
// atomic operations per write when nobody is pausing. A volume has one, in
// its VolumeLocks (volume_locks.hh), shared by its device layers.
//
// enter()/leave() bracket every modifying request on the data path.
// close() waits for the gate to be open, closes it, and waits until no
// request is inside; open() lets the waiting requests in again.
// Memory order is seq_cst on active_ and closed_ (a Dekker-style handshake:
// a writer announces itself, then checks closed_; the closer sets closed_,
// then checks active_).
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <mutex>

namespace nbd {

class WriteGate {
 public:
  void enter() {
    for (;;) {
      active_.fetch_add(1);
      if (!closed_.load()) return;
      leave();
      std::unique_lock<std::mutex> lk(mu_);
      cv_.wait(lk, [this] { return !closed_.load(); });
    }
  }
  void leave() {
    if (active_.fetch_sub(1) == 1 && closed_.load()) {
      std::lock_guard<std::mutex> lk(mu_);
      cv_.notify_all();
    }
  }
  void close() {
    std::unique_lock<std::mutex> lk(mu_);
    cv_.wait(lk, [this] { return !closed_.load(); });  // one closer at a time
    closed_.store(true);
    closed_at_ = std::chrono::steady_clock::now();
    cv_.wait(lk, [this] { return active_.load() == 0; });
  }
  void open() {
    std::lock_guard<std::mutex> lk(mu_);
    if (closed_.load()) {
      auto us = std::chrono::duration_cast<std::chrono::microseconds>(std::chrono::steady_clock::now() - closed_at_).count();
      last_pause_us_.store(static_cast<uint64_t>(us));
      if (static_cast<uint64_t>(us) > max_pause_us_.load()) max_pause_us_.store(static_cast<uint64_t>(us));
    }
    closed_.store(false);
    cv_.notify_all();
  }
  // How long writes were paused (close() to open()), for status: the last
  // pause and the longest since the volume was opened, in microseconds.
  uint64_t last_pause_us() const { return last_pause_us_.load(); }
  uint64_t max_pause_us() const { return max_pause_us_.load(); }

 private:
  std::atomic<int> active_{0};
  std::atomic<bool> closed_{false};
  std::mutex mu_;  // leaf lock
  std::condition_variable cv_;
  std::chrono::steady_clock::time_point closed_at_;  // guarded by mu_
  std::atomic<uint64_t> last_pause_us_{0}, max_pause_us_{0};
};

// RAII for WriteGate::enter/leave.
class GateGuard {
 public:
  explicit GateGuard(WriteGate& g) : g_(g) { g_.enter(); }
  ~GateGuard() { g_.leave(); }
  GateGuard(const GateGuard&) = delete;
  GateGuard& operator=(const GateGuard&) = delete;

 private:
  WriteGate& g_;
};

}  // namespace nbd
