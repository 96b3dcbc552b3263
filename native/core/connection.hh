// connection.hh — one client connection: handshake, then a pool of threads
// that take turns reading requests and execute them concurrently.
#pragma once

#include <atomic>
#include <climits>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>

#include "handshake.hh"
#include "socket_io.hh"
#include "transmission.hh"

namespace nbd {

class Server;

class Connection : public std::enable_shared_from_this<Connection> {
 public:
  Connection(Server& server, int fd, uint64_t id, std::string peer);
  ~Connection();

  // Starts the first thread, which negotiates and then serves.
  void start();
  // Starts serving a socket whose negotiation happened elsewhere (the kernel
  // NBD driver after NBD_SET_SOCK speaks transmission phase at once).
  void start_negotiated(const Session& session);
  // Graceful stop: no new requests are read; in-flight ones finish and reply.
  void stop_reading();
  // Hard stop: the socket is shut in both directions.
  void abort();

  uint64_t id() const { return id_; }

 private:
  void first_thread();
  void serve();
  void spawn_worker();
  bool should_spawn(uint16_t request_type);
  void thread_done();

  Server& server_;
  const int fd_;
  const uint64_t id_;
  const std::string peer_;
  Session session_;
  ReplySender sender_;

  std::mutex recv_mu_;  // guards reader_; lock order: recv_mu_ before sender_.mu, never the reverse
  SocketReader reader_;
  std::atomic<bool> closing_{false};
  std::atomic<int> waiting_{0};  // threads blocked on recv_mu_
  std::atomic<int> threads_{0};  // live threads of this connection
  // Worker threads ever started, and when a request last waited for storage:
  // threads beyond base_threads_ (the CPU count) are spawned only while that
  // is recent (see connection.cc).
  std::atomic<int> spawned_{0};
  std::atomic<int64_t> last_io_wait_ns_{INT64_MIN / 2};
  const int max_threads_;
  int base_threads_;
  std::string close_reason_;     // written once under recv_mu_
};

}  // namespace nbd
