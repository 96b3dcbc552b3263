// file_lock.cc — see file_lock.hh.
#include "file_lock.hh"

#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

namespace nbd {

namespace {

// Rounds of open / flock / "is it still the path's inode?" before giving up
// as busy. A round is lost only when a holder released (and unlinked) the
// file between our open and our flock, so losing many in a row means the
// volume keeps changing hands.
constexpr int kMaxRounds = 100;

int fail(std::string& what, const char* step, const std::string& path, int err) {
  what = std::string(step) + " " + path + ": " + strerror(err);
  return err;
}

int open_retry(const char* path, int flags, mode_t mode) {
  int fd;
  do fd = ::open(path, flags, mode);
  while (fd < 0 && errno == EINTR);
  return fd;
}

}  // namespace

int lock_file(const std::string& path, LockKind kind, int* fd_out, std::string& what) {
  const bool lock_file = kind == LockKind::lock_file;
  const int flags = lock_file ? O_RDWR | O_CREAT | O_NOFOLLOW | O_CLOEXEC | O_NOCTTY
                              : O_RDONLY | O_CLOEXEC | O_NOCTTY | O_NONBLOCK;
  for (int round = 0; round < kMaxRounds; ++round) {
    int fd = open_retry(path.c_str(), flags, 0600);
    if (fd < 0) return fail(what, "open", path, errno);
    struct stat st;
    if (fstat(fd, &st) != 0) {
      int e = errno;
      ::close(fd);
      return fail(what, "stat", path, e);
    }
    if (lock_file && !S_ISREG(st.st_mode)) {
      ::close(fd);
      return fail(what, "lock file is not a regular file:", path, EINVAL);
    }
    int r;
    do r = ::flock(fd, LOCK_EX | LOCK_NB);
    while (r != 0 && errno == EINTR);
    if (r != 0 && errno == EBADF && !lock_file) {
      // NFS emulates flock with a byte-range lock, whose exclusive form
      // needs a descriptor open for writing: lock through one (never written).
      int rw = open_retry(path.c_str(), O_RDWR | O_CLOEXEC | O_NOCTTY | O_NONBLOCK, 0);
      if (rw >= 0) {
        ::close(fd);
        fd = rw;
        do r = ::flock(fd, LOCK_EX | LOCK_NB);
        while (r != 0 && errno == EINTR);
      } else {
        errno = EBADF;
      }
    }
    if (r != 0) {
      int e = errno;
      ::close(fd);
      return fail(what, "flock", path, e);
    }
    if (lock_file) {
      // Still the file the path names? A holder that released it unlinked it
      // after we opened it (see file_lock.hh): start over on the current one.
      struct stat now;
      if (lstat(path.c_str(), &now) != 0 || now.st_dev != st.st_dev || now.st_ino != st.st_ino) {
        ::close(fd);
        continue;
      }
      // 0600 whatever the umask, also for a file an earlier version created:
      // anyone who can open it can flock it, so nobody else may open it.
      // Best effort: a file owned by someone else keeps its mode.
      if ((st.st_mode & 07777) != 0600 && st.st_uid == geteuid()) (void)fchmod(fd, 0600);
    }
    *fd_out = fd;
    return 0;
  }
  return fail(what, "flock", path, EWOULDBLOCK);
}

int unlock_file(int fd, const std::string& unlink_path) {
  int err = 0;
  if (!unlink_path.empty()) {
    struct stat mine, now;
    if (fstat(fd, &mine) == 0 && lstat(unlink_path.c_str(), &now) == 0 && mine.st_dev == now.st_dev &&
        mine.st_ino == now.st_ino && ::unlink(unlink_path.c_str()) != 0) {
      err = errno;
    }
  }
  ::close(fd);  // drops the lock
  return err;
}

}  // namespace nbd
