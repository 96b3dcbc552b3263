// export_table.hh — the named exports a server offers, and their counters.
//
// Exports can be added and removed while the server runs (snapshot exports
// come and go). Connections hold a shared_ptr<Export> for their lifetime, so
// removing an export only stops new connections from choosing it.
//
// Locking: one shared_mutex; lookups take it shared. Never held while doing I/O.
#pragma once

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <shared_mutex>
#include <string>
#include <vector>

#include "device.hh"

namespace nbd {

// Counters polled by the control plane; the data path never logs per request.
struct ExportStats {
  std::atomic<uint64_t> reads{0}, writes{0}, flushes{0}, trims{0}, zeroes{0}, caches{0}, block_status{0};
  std::atomic<uint64_t> bytes_read{0}, bytes_written{0};
  std::atomic<uint64_t> errors{0};
  std::atomic<uint64_t> connections_total{0};
  std::atomic<int64_t> connections_active{0};
};

// Session admission. With the hold armed (a volume whose snapshot carries
// the on-disconnect auto-rollback), the last session to leave starts a hold:
// new sessions finish negotiating but wait before their first request until
// the control plane releases the export (after the rollback is visible), so
// no session can see the volume between the disconnect and the rollback.
class Admission {
 public:
  // Waits while held (at most `limit`, or until `give_up()`), then counts the session in.
  template <typename GiveUp>
  void enter(std::chrono::milliseconds limit, GiveUp give_up) {
    std::unique_lock<std::mutex> lk(mu_);
    const auto until = std::chrono::steady_clock::now() + limit;
    while (held_ && !give_up() && std::chrono::steady_clock::now() < until) cv_.wait_for(lk, std::chrono::milliseconds(100));
    ++sessions_;
  }
  // Counts a session out; true if it was the last one and a hold began.
  bool leave() {
    std::lock_guard<std::mutex> lk(mu_);
    if (--sessions_ > 0 || !armed_) return false;
    held_ = true;
    return true;
  }
  void release() {
    std::lock_guard<std::mutex> lk(mu_);
    held_ = false;
    cv_.notify_all();
  }
  void arm(bool on) {
    std::lock_guard<std::mutex> lk(mu_);
    armed_ = on;
    if (!on) {
      held_ = false;
      cv_.notify_all();
    }
  }

 private:
  std::mutex mu_;  // leaf
  std::condition_variable cv_;
  int64_t sessions_ = 0;
  bool armed_ = false;
  bool held_ = false;
};

class ChangeSource;  // change_map.hh

struct Export {
  std::string name;
  std::string description;
  std::shared_ptr<Device> device;
  // For a volume's exports: the change maps behind qemu:dirty-bitmap:NAME
  // (null: none offered), from snapshot NAME to this export's point
  // (changes_at: a snapshot id, 0 for the live volume). Set before add().
  std::shared_ptr<ChangeSource> changes;
  uint64_t changes_at = 0;
  ExportStats stats;
  Admission admission;
};

class ExportTable {
 public:
  // Returns false if the name is taken. The first export added becomes the
  // default export (""), unless set_default() chooses another.
  bool add(std::shared_ptr<Export> e) {
    std::unique_lock lk(mu_);
    if (exports_.count(e->name)) return false;
    if (default_name_.empty() && order_.empty()) default_name_ = e->name;
    order_.push_back(e->name);
    exports_.emplace(e->name, std::move(e));
    return true;
  }
  bool remove(const std::string& name) {
    std::unique_lock lk(mu_);
    if (!exports_.erase(name)) return false;
    order_.erase(std::remove(order_.begin(), order_.end(), name), order_.end());
    if (default_name_ == name) default_name_ = order_.empty() ? std::string() : order_.front();
    return true;
  }
  bool set_default(const std::string& name) {
    std::unique_lock lk(mu_);
    if (!exports_.count(name)) return false;
    default_name_ = name;
    return true;
  }
  // "" means the default export.
  std::shared_ptr<Export> find(const std::string& name) const {
    std::shared_lock lk(mu_);
    auto it = exports_.find(name.empty() ? default_name_ : name);
    return it == exports_.end() ? nullptr : it->second;
  }
  std::vector<std::shared_ptr<Export>> list() const {
    std::shared_lock lk(mu_);
    std::vector<std::shared_ptr<Export>> out;
    for (auto& n : order_) out.push_back(exports_.at(n));
    return out;
  }

 private:
  mutable std::shared_mutex mu_;
  std::map<std::string, std::shared_ptr<Export>> exports_;
  std::vector<std::string> order_;
  std::string default_name_;
};

}  // namespace nbd
