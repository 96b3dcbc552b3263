// connection.cc — thread model of one connection.
//
// Threads: the first thread runs the handshake alone. It then becomes a
// worker. Workers take turns holding recv_mu_ to read exactly one request
// (header + WRITE payload) through the shared SocketReader, release it, and
// execute the request and send its reply concurrently with the others, so a
// connection has many requests in flight and replies complete out of order
// (the same model as nbdkit's parallel thread model). When a worker takes a
// request and no other thread is queued for recv_mu_, it may spawn another
// worker: for reads up to the number of CPUs, and beyond that (up to
// threads_per_connection) only while requests have recently had to wait for
// storage (io_hint.hh: reads the page cache could not serve, syncs), where
// more threads add I/O parallelism. Requests served from the page cache are
// CPU bound, and extra threads would only add context switches and cache
// misses. An idle connection costs one thread.
//
// Shutdown: any thread that sees end of stream, NBD_CMD_DISC, a corrupt
// stream or a failed send sets closing_. Threads notice it at their next turn
// for recv_mu_ and exit; requests already read still finish and reply. The
// last thread out closes the socket and tells the server (which may then
// destroy nothing of ours: the threads hold shared_ptrs to the Connection).
//
// Locking: recv_mu_ (request framing) and sender_.mu (reply framing) are
// never held together except recv_mu_ -> sender_.mu, which does not happen
// today (replies are sent after recv_mu_ is released).
#include "connection.hh"

#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <ctime>
#include <thread>

#include "io_hint.hh"
#include "nbd_protocol.hh"
#include "server.hh"

namespace nbd {

namespace {
// How long one storage wait keeps the connection in "I/O-bound" mode.
constexpr int64_t kIoBoundWindowNs = 100 * 1000 * 1000;

int64_t now_ns() {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<int64_t>(ts.tv_sec) * 1000000000 + ts.tv_nsec;
}
}  // namespace

Connection::Connection(Server& server, int fd, uint64_t id, std::string peer)
    : server_(server),
      fd_(fd),
      id_(id),
      peer_(std::move(peer)),
      reader_(fd),
      max_threads_(static_cast<int>(server.config().threads_per_connection)) {
  sender_.fd = fd;
  base_threads_ = std::max(2, static_cast<int>(std::thread::hardware_concurrency()));
}

Connection::~Connection() = default;

void Connection::start() {
  threads_.fetch_add(1);
  auto self = shared_from_this();
  std::thread([self] { self->first_thread(); }).detach();
}

// A held export (export_table.hh, Admission) is released within
// milliseconds; the limit only keeps a lost release from wedging a client.
constexpr std::chrono::milliseconds kAdmissionLimit{60000};

void Connection::start_negotiated(const Session& session) {
  session_ = session;
  threads_.fetch_add(1);
  spawned_.fetch_add(1);
  auto self = shared_from_this();
  std::thread([self] {
    // On our own thread: a held export must not block the caller.
    self->session_.exp->admission.enter(kAdmissionLimit, [&] { return self->closing_.load(); });
    self->session_.exp->stats.connections_total.fetch_add(1, std::memory_order_relaxed);
    self->session_.exp->stats.connections_active.fetch_add(1, std::memory_order_relaxed);
    self->server_.emit({"connect", self->id_, self->session_.exp->name, self->peer_, "pre-negotiated (kernel device)"});
    self->serve();
  }).detach();
}

void Connection::stop_reading() { ::shutdown(fd_, SHUT_RD); }

void Connection::abort() {
  closing_.store(true);
  ::shutdown(fd_, SHUT_RDWR);
}

void Connection::first_thread() {
  const auto& cfg = server_.config();
  struct timeval tv = {static_cast<time_t>(cfg.handshake_timeout_ms / 1000),
                       static_cast<suseconds_t>((cfg.handshake_timeout_ms % 1000) * 1000)};
  setsockopt(fd_, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  HandshakeConfig hc{&server_.exports(), cfg.max_payload};
  HandshakeResult hr = run_handshake(fd_, reader_, hc, session_);
  if (hr.outcome != HandshakeOutcome::kTransmission) {
    if (hr.outcome == HandshakeOutcome::kRejected)
      server_.emit({"handshake-failed", id_, {}, peer_, hr.error});
    closing_.store(true);
    close_reason_ = hr.outcome == HandshakeOutcome::kRejected ? hr.error : "closed during handshake";
    thread_done();
    return;
  }
  struct timeval zero = {0, 0};
  setsockopt(fd_, SOL_SOCKET, SO_RCVTIMEO, &zero, sizeof zero);
  session_.exp->admission.enter(kAdmissionLimit, [this] { return closing_.load(); });
  session_.exp->stats.connections_total.fetch_add(1, std::memory_order_relaxed);
  session_.exp->stats.connections_active.fetch_add(1, std::memory_order_relaxed);
  server_.emit({"connect", id_, session_.exp->name, peer_,
                session_.structured ? "structured replies" : "simple replies"});
  spawned_.fetch_add(1);
  serve();
}

void Connection::spawn_worker() {
  threads_.fetch_add(1);
  spawned_.fetch_add(1);
  auto self = shared_from_this();
  std::thread([self] { self->serve(); }).detach();
}

// Called with recv_mu_ held, so spawned_ only grows under us here.
bool Connection::should_spawn(uint16_t request_type) {
  if (waiting_.load() != 0) return false;  // someone is already ready to read
  const int n = spawned_.load();
  if (n >= max_threads_) return false;
  if (now_ns() - last_io_wait_ns_.load(std::memory_order_relaxed) < kIoBoundWindowNs) return true;
  // CPU-bound: reads run in parallel up to the CPU count. Buffered writes to
  // one file serialise on its inode lock in the kernel, so a second thread
  // would only add switches; they get more threads when they wait for storage.
  const bool parallel = request_type == proto::kCmdRead || request_type == proto::kCmdBlockStatus ||
                        request_type == proto::kCmdCache;
  return parallel && n < base_threads_;
}

void Connection::serve() {
  IoBuffer buf;
  for (;;) {
    PendingRequest req;
    {
      waiting_.fetch_add(1);
      std::unique_lock<std::mutex> lk(recv_mu_);
      waiting_.fetch_sub(1);
      if (closing_.load()) break;
      RecvStatus st = receive_request(reader_, session_, buf, req);
      if (st != RecvStatus::kRequest) {
        closing_.store(true);
        if (st == RecvStatus::kCorrupt) {
          close_reason_ = "corrupt request stream (bad magic)";
          ::shutdown(fd_, SHUT_RD);
        } else {
          close_reason_ = st == RecvStatus::kDisconnect ? "client sent NBD_CMD_DISC" : "client closed the connection";
        }
        break;
      }
      if (should_spawn(req.type)) spawn_worker();
    }
    io_waited = false;
    int e = execute_request(sender_, session_, req, buf);
    if (io_waited) last_io_wait_ns_.store(now_ns(), std::memory_order_relaxed);
    buf.trim();
    if (e) {
      // The client is gone or wedged: wake whoever is blocked in recv.
      closing_.store(true);
      ::shutdown(fd_, SHUT_RDWR);
      break;
    }
  }
  thread_done();
}

void Connection::thread_done() {
  if (threads_.fetch_sub(1) != 1) return;
  // Last thread of this connection: no one else touches the socket now.
  bool negotiated = session_.exp != nullptr;
  if (negotiated) {
    session_.exp->stats.connections_active.fetch_sub(1, std::memory_order_relaxed);
    const bool last = session_.exp->admission.leave();
    server_.emit({"disconnect", id_, session_.exp->name, peer_, close_reason_});
    if (last) server_.emit({"last-disconnect", id_, session_.exp->name, peer_, "new sessions wait for releaseExport()"});
  }
  ::close(fd_);
  server_.connection_done(id_, !negotiated);
}

}  // namespace nbd
