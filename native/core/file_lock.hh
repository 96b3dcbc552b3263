// file_lock.hh — exclusive whole-file locks that the kernel drops with their
// owner (flock(2)), for the volume lock (src/volume-meta.ts lockVolume).
//
// A lock is an open file description holding flock(LOCK_EX): it is released
// when its last descriptor is closed, which the kernel does when the owner
// exits or is killed, so a lock can never outlive its process (no stale
// locks, no PID guessing). Descriptors are opened O_CLOEXEC, so child
// processes never inherit (and keep alive) a lock. flock locks are
// independent of the fcntl/OFD byte-range locks other tools (qemu) take on
// Linux. Two opens of one file, even in one process, conflict.
//
// Lock files (LockKind::lock_file) may be unlinked by their holder on
// release. A process that opened the file before the unlink may then get the
// flock on the unlinked inode; so after taking it, lock_file() checks that
// the path still names the locked inode and otherwise starts over. Only a
// holder unlinks, and only while it holds the lock, so a verified holder's
// path keeps naming its inode: at most one process holds the lock of a path.
#pragma once

#include <string>

namespace nbd {

enum class LockKind {
  // A lock file: created if missing (mode 0600, whatever the umask), opened
  // read-write with O_NOFOLLOW (a symlink is refused, never written through),
  // must be a regular file; its mode is set to 0600 once locked.
  lock_file,
  // An existing file locked in place (the image: every hard link is the same
  // inode): opened read-only, symlinks followed, never created or changed.
  existing,
};

// Opens `path` and takes flock(LOCK_EX | LOCK_NB). Returns 0 with *fd set (the
// caller keeps it open for as long as it holds the lock), or an errno:
// EWOULDBLOCK another open file description holds the lock; ELOOP a lock
// file that is a symlink; EINVAL a lock file that is not a regular file;
// ENOENT the file (or a lock file's directory) does not exist; others from
// open(2) or flock(2). `what` describes a failure.
int lock_file(const std::string& path, LockKind kind, int* fd, std::string& what);

// Releases a lock taken by lock_file(): if `unlink_path` is not empty and
// still names the locked inode, unlinks it first (while still holding the
// lock, see above), then closes `fd`. Returns 0 or the errno of the unlink.
int unlock_file(int fd, const std::string& unlink_path);

}  // namespace nbd
