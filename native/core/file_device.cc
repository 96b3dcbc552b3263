// file_device.cc — raw file I/O with pread/pwrite, fdatasync, fallocate and SEEK_DATA.
//
// Design: one shared fd per image, used concurrently by every connection
// thread with positioned I/O only (never lseek+read), so no locking is needed.
// The page cache does write-back; FLUSH is fdatasync on that fd, which covers
// writes from every connection (multi-conn). FUA is a write, then the same
// fdatasync. A failed fdatasync latches the device (see lost_ in the header):
// every later request fails, because the kernel has forgotten the error and
// may have dropped the data.
//
// Zeroing: without NO_HOLE we punch a hole (reads back as zero, frees space);
// with NO_HOLE we use FALLOC_FL_ZERO_RANGE; when the filesystem supports
// neither we write zeroes from a shared zero buffer, unless the client asked
// for a fast zero, which then fails with ENOTSUP as the spec requires.
#include "file_device.hh"

#include <fcntl.h>
#include <linux/falloc.h>
#include <linux/fs.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "io_hint.hh"
#include "nbd_protocol.hh"

namespace nbd {

namespace {
constexpr uint32_t kZeroBufSize = 1 << 20;
const char* zero_buffer() {
  static const char* buf = static_cast<const char*>(calloc(1, kZeroBufSize));
  return buf;
}
}  // namespace

int ReadOnlyDevice::pwrite(const void*, uint32_t, uint64_t, IoFlags) { return EPERM; }
int ReadOnlyDevice::trim(uint32_t, uint64_t, IoFlags) { return EPERM; }
int ReadOnlyDevice::zero(uint32_t, uint64_t, IoFlags) { return EPERM; }

std::shared_ptr<FileDevice> FileDevice::open(const std::string& path, bool read_only, int& err, std::string& what) {
  int fd = ::open(path.c_str(), (read_only ? O_RDONLY : O_RDWR) | O_CLOEXEC);
  if (fd < 0) {
    err = errno;
    what = "open " + path + ": " + strerror(err);
    return nullptr;
  }
  struct stat st;
  if (fstat(fd, &st) != 0) {
    err = errno;
    what = "stat " + path + ": " + strerror(err);
    ::close(fd);
    return nullptr;
  }
  uint64_t size = 0;
  bool is_block = S_ISBLK(st.st_mode);
  if (is_block) {
    if (ioctl(fd, BLKGETSIZE64, &size) != 0) {
      err = errno;
      what = "BLKGETSIZE64 " + path + ": " + strerror(err);
      ::close(fd);
      return nullptr;
    }
  } else if (S_ISREG(st.st_mode)) {
    size = static_cast<uint64_t>(st.st_size);
  } else {
    err = EINVAL;
    what = path + " is neither a regular file nor a block device";
    ::close(fd);
    return nullptr;
  }
  return std::shared_ptr<FileDevice>(new FileDevice(fd, size, read_only, is_block));
}

FileDevice::~FileDevice() { ::close(fd_); }

int FileDevice::pread(void* buf, uint32_t count, uint64_t offset) {
  if (int e = lost_.load()) return e;  // the page cache may hold data the disk lost, or old data
  auto* p = static_cast<char*>(buf);
  // First try the page cache alone: RWF_NOWAIT fails with EAGAIN instead of
  // waiting for the disk, which tells the connection that this load is
  // I/O-bound (see io_hint.hh). The data is then read the normal way.
  if (nowait_reads_) {
    struct iovec iov = {p, count};
    ssize_t r = ::preadv2(fd_, &iov, 1, static_cast<off_t>(offset), RWF_NOWAIT);
    if (r == static_cast<ssize_t>(count)) return 0;
    if (r < 0 && errno == EAGAIN) io_waited = true;
    else if (r < 0 && (errno == EOPNOTSUPP || errno == EINVAL || errno == ENOSYS)) nowait_reads_ = false;
    else if (r > 0) io_waited = true;  // partly cached; fall through for the rest
  }
  while (count > 0) {
    ssize_t r = ::pread(fd_, p, count, static_cast<off_t>(offset));
    if (r < 0) {
      if (errno == EINTR) continue;
      return errno;
    }
    if (r == 0) {  // file shrank under us: read as zeroes
      std::memset(p, 0, count);
      return 0;
    }
    p += r;
    count -= static_cast<uint32_t>(r);
    offset += static_cast<uint64_t>(r);
  }
  return 0;
}

int FileDevice::pwrite(const void* buf, uint32_t count, uint64_t offset, IoFlags flags) {
  if (read_only_) return EPERM;
  if (int e = lost_.load()) return e;
  const auto* p = static_cast<const char*>(buf);
  while (count > 0) {
    ssize_t r = ::pwrite(fd_, p, count, static_cast<off_t>(offset));
    if (r < 0) {
      if (errno == EINTR) continue;
      return errno;  // nothing of it is acknowledged: not a write-back error
    }
    p += r;
    count -= static_cast<uint32_t>(r);
    offset += static_cast<uint64_t>(r);
  }
  // FUA: the same serialised fdatasync as FLUSH (RWF_DSYNC would sync
  // concurrently, and a concurrent sync can swallow another's error).
  return flags.fua ? sync() : 0;
}

int FileDevice::sync() {
  io_waited = true;
  std::lock_guard<std::mutex> lk(sync_mu_);
  if (int e = lost_.load()) return e;
  if (::fdatasync(fd_) == 0) return 0;
  int e = errno;
  lost_.store(e == EINTR ? EIO : e);
  forget_cached();
  return lost_.load();
}

void FileDevice::forget_cached() {
  // The pages whose write-back failed are clean now but hold data the disk
  // does not: drop them, so that no later reader (this process is latched;
  // the next one, after a restart on the same kernel, is not) sees data
  // that would silently revert when they are evicted.
  posix_fadvise(fd_, 0, 0, POSIX_FADV_DONTNEED);
}

void FileDevice::drain() {
  // Stopping with the image latched: write back what is still dirty (it may
  // fail again: the error is already latched) and drop the pages, for the
  // same reason as above.
  if (read_only_ || lost_.load() == 0) return;
  std::lock_guard<std::mutex> lk(sync_mu_);
  (void)::fdatasync(fd_);
  forget_cached();
}

int FileDevice::flush() {
  if (read_only_) return 0;
  return sync();
}

int FileDevice::trim(uint32_t count, uint64_t offset, IoFlags flags) {
  if (read_only_) return EPERM;
  if (int e = lost_.load()) return e;
  int r;
  if (is_block_) {
    uint64_t range[2] = {offset, count};
    r = ioctl(fd_, BLKDISCARD, range);
  } else {
    r = fallocate(fd_, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, static_cast<off_t>(offset), count);
  }
  // Trim is advisory: a filesystem that cannot punch holes simply keeps the data.
  if (r != 0 && errno != EOPNOTSUPP && errno != ENOTTY && errno != EINVAL) return errno;
  return flags.fua ? flush() : 0;
}

int FileDevice::write_zero_buffer(uint32_t count, uint64_t offset) {
  while (count > 0) {
    uint32_t n = std::min(count, kZeroBufSize);
    int e = pwrite(zero_buffer(), n, offset, IoFlags{});
    if (e) return e;
    count -= n;
    offset += n;
  }
  return 0;
}

int FileDevice::zero(uint32_t count, uint64_t offset, IoFlags flags) {
  if (read_only_) return EPERM;
  if (int e = lost_.load()) return e;
  int e = -1;  // -1: not done yet
  if (is_block_) {
    uint64_t range[2] = {offset, count};
    if (ioctl(fd_, BLKZEROOUT, range) == 0) e = 0;
  } else {
    if (flags.may_trim &&
        fallocate(fd_, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, static_cast<off_t>(offset), count) == 0) {
      e = 0;
    } else if (fallocate(fd_, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, static_cast<off_t>(offset), count) == 0) {
      e = 0;
    }
  }
  if (e < 0) {
    if (errno != EOPNOTSUPP && errno != ENOTTY && errno != EINVAL && errno != ENOSYS) return errno;
    if (flags.fast_only) return ENOTSUP;
    e = write_zero_buffer(count, offset);
  }
  if (e == 0 && flags.fua) e = flush();
  return e;
}

int FileDevice::cache(uint32_t count, uint64_t offset) {
  int r = posix_fadvise(fd_, static_cast<off_t>(offset), count, POSIX_FADV_WILLNEED);
  return r == 0 || r == ESPIPE ? 0 : r;
}

int FileDevice::extents(uint32_t count, uint64_t offset, uint32_t max_extents, std::vector<Extent>& out) {
  const uint64_t end = offset + count;
  if (is_block_) {
    out.push_back({count, 0});
    return 0;
  }
  uint64_t pos = offset;
  uint32_t n = 0;
  while (pos < end && n < max_extents) {
    off_t data = lseek(fd_, static_cast<off_t>(pos), SEEK_DATA);
    if (data < 0) {
      if (errno == ENXIO) {  // only a hole from pos to EOF
        out.push_back({end - pos, proto::kStateHole | proto::kStateZero});
        return 0;
      }
      if (n == 0) {  // filesystem without SEEK_DATA: everything is data
        out.push_back({count, 0});
        return 0;
      }
      return 0;
    }
    uint64_t d = static_cast<uint64_t>(data);
    if (d > pos) {
      uint64_t len = std::min(d, end) - pos;
      out.push_back({len, proto::kStateHole | proto::kStateZero});
      ++n;
      pos += len;
      continue;
    }
    off_t hole = lseek(fd_, static_cast<off_t>(pos), SEEK_HOLE);
    uint64_t h = hole < 0 ? end : static_cast<uint64_t>(hole);
    if (h <= pos) h = end;  // defensive: never emit an empty extent
    uint64_t len = std::min(h, end) - pos;
    out.push_back({len, 0});
    ++n;
    pos += len;
  }
  return 0;
}

}  // namespace nbd
