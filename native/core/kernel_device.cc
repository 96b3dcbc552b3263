// kernel_device.cc — the NBD ioctl interface (linux/nbd.h), as nbd-client uses it.
//
// Sequence: open /dev/nbdN; SET_BLKSIZE; SET_SIZE_BLOCKS; SET_TIMEOUT;
// SET_FLAGS (our transmission flags, so the kernel sends FLUSH/FUA/TRIM and
// marks read-only exports read-only); for each connection a socketpair whose
// one end goes to SET_SOCK and the other to Server::adopt(); then NBD_DO_IT,
// which blocks (on our own thread) until NBD_DISCONNECT from anyone or a
// dead socket. Afterwards CLEAR_SOCK releases the device for reuse.
#include "kernel_device.hh"

#include <fcntl.h>
#include <linux/nbd.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "errors.hh"
#include "server.hh"

namespace nbd {

std::unique_ptr<KernelDevice> KernelDevice::attach(Server& server, const AttachOptions& opts,
                                                   std::function<void(int, const std::string&)> on_exit, int& err,
                                                   std::string& what) {
  auto exp = server.exports().find(opts.export_name);
  if (!exp) {
    err = ENOENT;
    what = "no export named '" + opts.export_name + "'";
    return nullptr;
  }
  std::unique_ptr<KernelDevice> kd(new KernelDevice());
  kd->device_ = opts.device;
  kd->dev_fd_ = ::open(opts.device.c_str(), O_RDWR | O_CLOEXEC);
  if (kd->dev_fd_ < 0) {
    err = errno;
    what = errstr("open " + opts.device, err) +
           (err == ENOENT ? " (is the nbd module loaded? modprobe nbd)" : "");
    return nullptr;
  }
  const uint64_t size = exp->device->size();
  uint32_t bs = opts.block_size;
  while (bs > 512 && size % bs) bs /= 2;  // the device size must be whole blocks
  if (size % bs) {
    err = EINVAL;
    what = "export size " + std::to_string(size) + " is not a multiple of 512 bytes";
    return nullptr;
  }
  Session s;
  s.exp = exp;
  s.export_name = exp->name;
  s.structured = false;  // the kernel client uses simple replies
  s.tx_flags = transmission_flags(*exp->device, false);
  s.max_payload = server.config().max_payload;
  auto fail = [&](const std::string& step) {
    err = errno;
    what = errstr(step + " on " + opts.device, err) + (err == EBUSY ? " (device already in use? detach it first)" : "");
    ioctl(kd->dev_fd_, NBD_CLEAR_SOCK);
    return nullptr;
  };
  if (ioctl(kd->dev_fd_, NBD_SET_BLKSIZE, static_cast<unsigned long>(bs)) < 0) return fail("NBD_SET_BLKSIZE");
  if (ioctl(kd->dev_fd_, NBD_SET_SIZE_BLOCKS, static_cast<unsigned long>(size / bs)) < 0)
    return fail("NBD_SET_SIZE_BLOCKS");
  if (ioctl(kd->dev_fd_, NBD_SET_TIMEOUT, static_cast<unsigned long>(opts.timeout_sec)) < 0)
    return fail("NBD_SET_TIMEOUT");
  if (ioctl(kd->dev_fd_, NBD_SET_FLAGS, static_cast<unsigned long>(s.tx_flags)) < 0) return fail("NBD_SET_FLAGS");
  for (uint32_t i = 0; i < std::max<uint32_t>(1, opts.connections); ++i) {
    int sv[2];
    if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) != 0) return fail("socketpair");
    if (ioctl(kd->dev_fd_, NBD_SET_SOCK, static_cast<unsigned long>(sv[0])) < 0) {
      int e = errno;
      ::close(sv[0]);
      ::close(sv[1]);
      errno = e;
      return fail("NBD_SET_SOCK");
    }
    ::close(sv[0]);  // the kernel holds its own reference now
    std::string aerr;
    if (server.adopt(sv[1], s, opts.device, aerr) != 0) {
      errno = ESHUTDOWN;
      return fail("serve (" + aerr + ")");
    }
  }
  int fd = kd->dev_fd_;
  std::string dev = opts.device;
  auto done = kd->done_;
  kd->thread_ = std::thread([fd, dev, on_exit, done] {
    int r = ioctl(fd, NBD_DO_IT);
    done->store(true);
    int e = r < 0 ? errno : 0;
    ioctl(fd, NBD_CLEAR_QUE);
    ioctl(fd, NBD_CLEAR_SOCK);
    // A disconnect requested through NBD_DISCONNECT returns 0 on new kernels
    // and EPIPE-like errors on some; both are a finished attachment.
    on_exit(e, e ? errstr("NBD_DO_IT on " + dev, e) : "disconnected");
  });
  return kd;
}

void KernelDevice::disconnect() {
  // Once NBD_DO_IT has returned the device is free: disconnecting again would
  // only make the kernel complain ("Send disconnect failed").
  if (dev_fd_ >= 0 && !done_->load()) ioctl(dev_fd_, NBD_DISCONNECT);
}

void KernelDevice::join() {
  if (thread_.joinable()) thread_.join();
}

KernelDevice::~KernelDevice() {
  if (thread_.joinable()) {
    disconnect();
    thread_.join();
  }
  if (dev_fd_ >= 0) ::close(dev_fd_);
}

int detach_kernel_device(const std::string& device, std::string& what) {
  int fd = ::open(device.c_str(), O_RDWR | O_CLOEXEC);
  if (fd < 0) {
    int e = errno;
    what = errstr("open " + device, e);
    return e;
  }
  int r = ioctl(fd, NBD_DISCONNECT);
  int e = r < 0 ? errno : 0;
  if (e) what = errstr("NBD_DISCONNECT on " + device, e);
  ioctl(fd, NBD_CLEAR_SOCK);
  ::close(fd);
  return e;
}

}  // namespace nbd
