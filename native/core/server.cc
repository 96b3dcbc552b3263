// server.cc — listeners and the accept thread.
//
// Threads: one accept thread polls every listening socket plus an eventfd
// used to wake it for shutdown. It never does I/O on client sockets; each
// accepted connection gets its own threads (connection.cc). No thread here
// ever calls into JavaScript: events go to the EventSink.
//
// stop(): wake and join the accept thread, close the listeners, shut the
// read side of every connection (in-flight requests finish and reply), wait
// for all connections to end (forcing them after drain_timeout_ms), then
// flush every export so all acknowledged writes are durable.
#include "server.hh"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstring>

#include "connection.hh"
#include "errors.hh"

namespace nbd {

namespace {

std::string peer_name(const struct sockaddr_storage& ss) {
  char host[INET6_ADDRSTRLEN] = "?";
  if (ss.ss_family == AF_INET) {
    auto* a = reinterpret_cast<const sockaddr_in*>(&ss);
    inet_ntop(AF_INET, &a->sin_addr, host, sizeof host);
    return std::string(host) + ":" + std::to_string(ntohs(a->sin_port));
  }
  if (ss.ss_family == AF_INET6) {
    auto* a = reinterpret_cast<const sockaddr_in6*>(&ss);
    inet_ntop(AF_INET6, &a->sin6_addr, host, sizeof host);
    return "[" + std::string(host) + "]:" + std::to_string(ntohs(a->sin6_port));
  }
  return "unix";
}
// Large replies (1 MiB reads) go out in one sendmsg without blocking
// halfway when the send buffer can hold them; fewer wake-ups on both sides.
// SO_SNDBUFFORCE works for privileged processes beyond net.core.wmem_max.
void tune_socket_buffers(int fd) {
  int want = 4 << 20;
  if (setsockopt(fd, SOL_SOCKET, SO_SNDBUFFORCE, &want, sizeof want) != 0)
    setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &want, sizeof want);
}
}  // namespace

Server::Server(ServerConfig cfg, std::shared_ptr<EventSink> events) : cfg_(cfg), events_(std::move(events)) {
  wake_fd_ = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
}

Server::~Server() {
  stop();
  if (wake_fd_ >= 0) ::close(wake_fd_);
}

int Server::listen_tcp(const std::string& host, uint16_t port, uint16_t& bound_port, std::string& err) {
  struct addrinfo hints = {};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV;
  struct addrinfo* res = nullptr;
  std::string portstr = std::to_string(port);
  int g = getaddrinfo(host.empty() ? nullptr : host.c_str(), portstr.c_str(), &hints, &res);
  if (g != 0) {
    err = "cannot resolve listen address '" + host + "': " + gai_strerror(g);
    return EINVAL;
  }
  int bound = 0, last_err = 0;
  bound_port = port;
  for (auto* ai = res; ai; ai = ai->ai_next) {
    int fd = socket(ai->ai_family, ai->ai_socktype | SOCK_CLOEXEC, ai->ai_protocol);
    if (fd < 0) { last_err = errno; continue; }
    int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (ai->ai_family == AF_INET6) setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &one, sizeof one);
    if (bound_port != 0) {  // an ephemeral port chosen by the first bind is reused for the rest
      if (ai->ai_family == AF_INET) reinterpret_cast<sockaddr_in*>(ai->ai_addr)->sin_port = htons(bound_port);
      if (ai->ai_family == AF_INET6) reinterpret_cast<sockaddr_in6*>(ai->ai_addr)->sin6_port = htons(bound_port);
    }
    if (bind(fd, ai->ai_addr, ai->ai_addrlen) != 0 || listen(fd, 1024) != 0) {
      last_err = errno;
      ::close(fd);
      continue;
    }
    struct sockaddr_storage ss = {};
    socklen_t sl = sizeof ss;
    getsockname(fd, reinterpret_cast<sockaddr*>(&ss), &sl);
    bound_port = ntohs(ss.ss_family == AF_INET ? reinterpret_cast<sockaddr_in*>(&ss)->sin_port
                                               : reinterpret_cast<sockaddr_in6*>(&ss)->sin6_port);
    listen_fds_.push_back(fd);
    listen_is_tcp_.push_back(true);
    ++bound;
  }
  freeaddrinfo(res);
  if (!bound) {
    err = errstr("cannot listen on " + host + ":" + portstr, last_err);
    return last_err ? last_err : EINVAL;
  }
  return 0;
}

int Server::listen_unix(const std::string& path, std::string& err) {
  struct sockaddr_un sa = {};
  sa.sun_family = AF_UNIX;
  if (path.size() >= sizeof sa.sun_path) {
    err = "unix socket path too long (max " + std::to_string(sizeof sa.sun_path - 1) + " bytes): " + path;
    return ENAMETOOLONG;
  }
  std::memcpy(sa.sun_path, path.c_str(), path.size() + 1);
  int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) { err = errstr("socket", errno); return errno; }
  if (bind(fd, reinterpret_cast<sockaddr*>(&sa), sizeof sa) != 0) {
    int e = errno;
    if (e != EADDRINUSE) {
      err = errstr("bind " + path, e);
      ::close(fd);
      return e;
    }
    // A stale socket from a dead server may be replaced; a live one may not.
    struct stat st;
    int probe = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    bool live = probe >= 0 && connect(probe, reinterpret_cast<sockaddr*>(&sa), sizeof sa) == 0;
    if (probe >= 0) ::close(probe);
    if (live || stat(path.c_str(), &st) != 0 || !S_ISSOCK(st.st_mode)) {
      err = "cannot listen on " + path + ": " +
            (live ? "another server is listening there" : "the path exists and is not a socket");
      ::close(fd);
      return EADDRINUSE;
    }
    unlink(path.c_str());
    if (bind(fd, reinterpret_cast<sockaddr*>(&sa), sizeof sa) != 0) {
      e = errno;
      err = errstr("bind " + path, e);
      ::close(fd);
      return e;
    }
  }
  if (listen(fd, 1024) != 0) {
    int e = errno;
    err = errstr("listen " + path, e);
    ::close(fd);
    return e;
  }
  listen_fds_.push_back(fd);
  listen_is_tcp_.push_back(false);
  unix_paths_.push_back(path);
  return 0;
}

int Server::start(std::string& err) {
  if (listen_fds_.empty()) {
    err = "no listening socket";
    return EINVAL;
  }
  if (started_.exchange(true)) {
    err = "already started";
    return EBUSY;
  }
  accept_thread_ = std::thread([this] { accept_loop(); });
  return 0;
}

void Server::accept_loop() {
  std::vector<struct pollfd> pfds;
  for (int fd : listen_fds_) pfds.push_back({fd, POLLIN, 0});
  pfds.push_back({wake_fd_, POLLIN, 0});
  while (!stopping_.load()) {
    int n = poll(pfds.data(), pfds.size(), -1);
    if (n < 0) {
      if (errno == EINTR) continue;
      emit({"error", 0, {}, {}, errstr("poll", errno)});
      break;
    }
    if (pfds.back().revents) break;
    for (size_t i = 0; i + 1 < pfds.size(); ++i) {
      if (!(pfds[i].revents & POLLIN)) continue;
      struct sockaddr_storage ss = {};
      socklen_t sl = sizeof ss;
      int cfd = accept4(pfds[i].fd, reinterpret_cast<sockaddr*>(&ss), &sl, SOCK_CLOEXEC);
      if (cfd < 0) {
        if (errno == EMFILE || errno == ENFILE) {
          emit({"error", 0, {}, {}, errstr("accept", errno)});
          usleep(100 * 1000);  // let connections drain rather than spin
        }
        continue;
      }
      if (listen_is_tcp_[i]) {
        int one = 1;
        setsockopt(cfd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
      }
      tune_socket_buffers(cfd);
      std::shared_ptr<Connection> conn;
      {
        std::lock_guard<std::mutex> lk(mu_);
        if (stats_.connections_active >= cfg_.max_connections) {
          ++stats_.connections_refused;
          ::close(cfd);
          continue;
        }
        uint64_t id = next_id_++;
        conn = std::make_shared<Connection>(*this, cfd, id, peer_name(ss));
        conns_.emplace(id, conn);
        ++stats_.connections_total;
        ++stats_.connections_active;
      }
      conn->start();
    }
  }
}

void Server::stop() {
  std::lock_guard<std::mutex> stop_lk(stop_mu_);
  if (stopped_.load()) return;
  stopping_.store(true);
  if (accept_thread_.joinable()) {
    uint64_t one = 1;
    (void)!write(wake_fd_, &one, sizeof one);
    accept_thread_.join();
  }
  for (int fd : listen_fds_) ::close(fd);
  listen_fds_.clear();
  for (auto& p : unix_paths_) unlink(p.c_str());
  unix_paths_.clear();
  {
    std::unique_lock<std::mutex> lk(mu_);
    for (auto& [id, c] : conns_) c->stop_reading();
    cv_.wait_for(lk, std::chrono::milliseconds(cfg_.drain_timeout_ms),
                 [this] { return conns_.empty() || force_.load(); });
    for (auto& [id, c] : conns_) c->abort();
    cv_.wait(lk, [this] { return conns_.empty(); });
  }
  for (auto& e : exports_.list()) {
    e->device->drain();  // queued first writes reach the image: it is current once stopped
    if (int err = e->device->flush()) {
      std::lock_guard<std::mutex> lk(mu_);
      stop_errors_.push_back({e->name, err});
    }
  }
  stopped_.store(true);
}

int Server::adopt(int fd, const Session& session, const std::string& peer, std::string& err) {
  std::shared_ptr<Connection> conn;
  {
    std::lock_guard<std::mutex> lk(mu_);
    if (stopping_.load()) {
      err = "server is stopping";
      ::close(fd);
      return ESHUTDOWN;
    }
    uint64_t id = next_id_++;
    conn = std::make_shared<Connection>(*this, fd, id, peer);
    conns_.emplace(id, conn);
    ++stats_.connections_total;
    ++stats_.connections_active;
  }
  conn->start_negotiated(session);
  return 0;
}

void Server::stop_now() {
  {
    std::lock_guard<std::mutex> lk(mu_);
    force_.store(true);
    for (auto& [id, c] : conns_) c->abort();
    cv_.notify_all();
  }
  stop();  // waits for a concurrent stop() to finish, which is now quick
}

ServerStats Server::stats() const {
  std::lock_guard<std::mutex> lk(mu_);
  return stats_;
}

void Server::emit(ServerEvent ev) {
  if (events_) events_->on_event(ev);
}

void Server::connection_done(uint64_t id, bool handshake_failed) {
  std::lock_guard<std::mutex> lk(mu_);
  conns_.erase(id);
  --stats_.connections_active;
  if (handshake_failed) ++stats_.handshakes_failed;
  cv_.notify_all();
}

}  // namespace nbd
