// socket_io.cc — see socket_io.hh.
#include "socket_io.hh"

#include <sys/socket.h>

#include <algorithm>
#include <cerrno>
#include <climits>
#include <cstring>

namespace nbd {

SocketReader::SocketReader(int fd, size_t buffer_size)
    : fd_(fd), buf_(new uint8_t[buffer_size]), cap_(buffer_size) {}

int SocketReader::fill() {
  start_ = end_ = 0;
  for (;;) {
    ssize_t r = recv(fd_, buf_.get(), cap_, 0);
    if (r > 0) {
      end_ = static_cast<size_t>(r);
      return 0;
    }
    if (r == 0) return kEof;
    if (errno == EINTR) continue;
    return errno;
  }
}

int SocketReader::read_exact(void* dest, size_t len) {
  auto* out = static_cast<uint8_t*>(dest);
  while (len > 0) {
    if (start_ < end_) {
      size_t n = std::min(len, end_ - start_);
      std::memcpy(out, buf_.get() + start_, n);
      start_ += n;
      out += n;
      len -= n;
      continue;
    }
    if (len >= cap_ / 2) {  // big payload: straight into the destination
      ssize_t r = recv(fd_, out, len, MSG_WAITALL);
      if (r > 0) {
        out += r;
        len -= static_cast<size_t>(r);
        continue;
      }
      if (r == 0) return kEof;
      if (errno == EINTR) continue;
      return errno;
    }
    int e = fill();
    if (e) return e;
  }
  return 0;
}

int SocketReader::discard(uint64_t len) {
  while (len > 0) {
    if (start_ == end_) {
      int e = fill();
      if (e) return e;
    }
    size_t n = static_cast<size_t>(std::min<uint64_t>(len, end_ - start_));
    start_ += n;
    len -= n;
  }
  return 0;
}

int send_all(int fd, struct iovec* iov, int iovcnt, bool more) {
  while (iovcnt > 0) {
    struct msghdr msg = {};
    msg.msg_iov = iov;
    msg.msg_iovlen = static_cast<size_t>(std::min(iovcnt, IOV_MAX));
    ssize_t r = sendmsg(fd, &msg, MSG_NOSIGNAL | (more ? MSG_MORE : 0));
    if (r < 0) {
      if (errno == EINTR) continue;
      return errno;
    }
    size_t done = static_cast<size_t>(r);
    while (iovcnt > 0 && done >= iov->iov_len) {
      done -= iov->iov_len;
      ++iov;
      --iovcnt;
    }
    if (iovcnt > 0) {
      iov->iov_base = static_cast<char*>(iov->iov_base) + done;
      iov->iov_len -= done;
    }
  }
  return 0;
}

int send_all(int fd, const void* buf, size_t len, bool more) {
  struct iovec iov = {const_cast<void*>(buf), len};
  return send_all(fd, &iov, 1, more);
}

}  // namespace nbd
