// file_io.hh — whole-buffer pread/pwrite that retry on EINTR and short
// transfers, for the metadata files (snapshot stores, merge jobs).
#pragma once

#include <unistd.h>

#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstring>

namespace nbd {

// Returns 0 or an errno.
inline int pwrite_all(int fd, const void* buf, size_t len, uint64_t off) {
  const auto* p = static_cast<const char*>(buf);
  while (len) {
    ssize_t r = ::pwrite(fd, p, len, static_cast<off_t>(off));
    if (r < 0) {
      if (errno == EINTR) continue;
      return errno;
    }
    p += r;
    len -= static_cast<size_t>(r);
    off += static_cast<uint64_t>(r);
  }
  return 0;
}

// Returns 0 or an errno. Past end of file: with `got`, stops and reports how
// much was read; without, fills the rest with zeroes (a sparse file's hole).
inline int pread_all(int fd, void* buf, size_t len, uint64_t off, size_t* got = nullptr) {
  auto* p = static_cast<char*>(buf);
  size_t total = 0;
  while (len) {
    ssize_t r = ::pread(fd, p, len, static_cast<off_t>(off));
    if (r < 0) {
      if (errno == EINTR) continue;
      return errno;
    }
    if (r == 0) break;
    p += r;
    len -= static_cast<size_t>(r);
    off += static_cast<uint64_t>(r);
    total += static_cast<size_t>(r);
  }
  if (got) *got = total;
  else if (len) std::memset(p, 0, len);
  return 0;
}

}  // namespace nbd
