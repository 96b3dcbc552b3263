// server.hh — listening sockets, the accept thread, the live connections.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "events.hh"
#include "export_table.hh"
#include "handshake.hh"
#include "nbd_protocol.hh"

namespace nbd {

class Connection;

struct ServerConfig {
  uint32_t threads_per_connection = 32;  // worker threads, spawned on demand
  uint32_t max_payload = proto::kDefaultMaxPayload;
  uint32_t handshake_timeout_ms = 30000;
  uint32_t max_connections = 4096;
  uint32_t drain_timeout_ms = 30000;     // stop(): wait this long for in-flight requests
};

struct ServerStats {
  uint64_t connections_total = 0;
  uint64_t connections_active = 0;
  uint64_t connections_refused = 0;
  uint64_t handshakes_failed = 0;
};

class Server {
 public:
  Server(ServerConfig cfg, std::shared_ptr<EventSink> events);
  ~Server();
  Server(const Server&) = delete;
  Server& operator=(const Server&) = delete;

  ExportTable& exports() { return exports_; }
  const ServerConfig& config() const { return cfg_; }

  // Bind before start(). Return 0 or an errno, with `err` set to a message.
  int listen_tcp(const std::string& host, uint16_t port, uint16_t& bound_port, std::string& err);
  int listen_unix(const std::string& path, std::string& err);
  int start(std::string& err);
  // Stops accepting, lets in-flight requests finish, flushes every export.
  // Blocking; safe to call more than once.
  void stop();
  // After stop(): the exports whose final flush failed, with the errno (their
  // acknowledged writes may not be on disk).
  std::vector<std::pair<std::string, int>> stop_errors() {
    std::lock_guard<std::mutex> lk(mu_);
    return stop_errors_;
  }
  // Like stop(), but does not wait for in-flight requests: connections are
  // shut at once, including those a concurrent stop() is still draining.
  void stop_now();
  ServerStats stats() const;
  bool started() const { return started_.load(); }
  // Serves an already-connected socket whose session was negotiated out of
  // band (kernel device attachment). Takes ownership of `fd`.
  int adopt(int fd, const Session& session, const std::string& peer, std::string& err);

  // Called by connections (any thread).
  void emit(ServerEvent ev);
  void connection_done(uint64_t id, bool handshake_failed);

 private:
  void accept_loop();

  ServerConfig cfg_;
  std::shared_ptr<EventSink> events_;
  ExportTable exports_;

  std::vector<int> listen_fds_;
  std::vector<bool> listen_is_tcp_;
  std::vector<std::string> unix_paths_;
  int wake_fd_ = -1;
  std::thread accept_thread_;
  std::atomic<bool> started_{false}, stopping_{false}, stopped_{false}, force_{false};
  std::mutex stop_mu_;  // serialises stop()
  std::vector<std::pair<std::string, int>> stop_errors_;  // guarded by mu_

  mutable std::mutex mu_;  // guards conns_ and stats_; lock order: leaf
  std::condition_variable cv_;
  std::map<uint64_t, std::shared_ptr<Connection>> conns_;
  ServerStats stats_;
  uint64_t next_id_ = 1;
};

}  // namespace nbd
