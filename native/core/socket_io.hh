// socket_io.hh — blocking socket reads and writes that never lose bytes.
//
// SocketReader buffers the receive side so that a burst of small requests
// (e.g. 32 pipelined 4 KiB reads) costs one recv(2) rather than one per
// header. It is not thread-safe: a connection uses it only while holding its
// receive mutex. Large payloads bypass the buffer and land directly in the
// caller's memory.
#pragma once

#include <sys/uio.h>

#include <cstddef>
#include <cstdint>
#include <memory>

namespace nbd {

// Result of an I/O helper: 0 on success, an errno value, or kEof when the peer
// closed the stream before all bytes arrived.
constexpr int kEof = -1;

class SocketReader {
 public:
  explicit SocketReader(int fd, size_t buffer_size = 256 * 1024);
  // Reads exactly `len` bytes into `dest`.
  int read_exact(void* dest, size_t len);
  // Reads and throws away `len` bytes (an oversized or refused payload).
  int discard(uint64_t len);
  // Bytes already received but not yet consumed.
  size_t buffered() const { return end_ - start_; }

 private:
  int fill();
  int fd_;
  std::unique_ptr<uint8_t[]> buf_;
  size_t cap_;
  size_t start_ = 0, end_ = 0;
};

// Writes every byte described by `iov` (which it may modify). MSG_NOSIGNAL:
// a vanished peer yields EPIPE, never SIGPIPE. `more` sets MSG_MORE.
int send_all(int fd, struct iovec* iov, int iovcnt, bool more = false);
int send_all(int fd, const void* buf, size_t len, bool more = false);

}  // namespace nbd
