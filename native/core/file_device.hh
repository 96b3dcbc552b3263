// file_device.hh — the bottom of every device chain: a raw image file or block device.
#pragma once

#include <atomic>
#include <mutex>
#include <string>

#include "device.hh"

namespace nbd {

class FileDevice final : public Device {
 public:
  // Opens `path` (O_RDWR, or O_RDONLY when read_only). On failure returns
  // nullptr and sets `err` to the errno and `what` to a description.
  static std::shared_ptr<FileDevice> open(const std::string& path, bool read_only, int& err, std::string& what);
  ~FileDevice() override;

  uint64_t size() const override { return size_; }
  bool can_write() const override { return !read_only_; }
  bool can_extents() const override { return !is_block_; }

  int pread(void* buf, uint32_t count, uint64_t offset) override;
  int pwrite(const void* buf, uint32_t count, uint64_t offset, IoFlags flags) override;
  int flush() override;
  int trim(uint32_t count, uint64_t offset, IoFlags flags) override;
  int zero(uint32_t count, uint64_t offset, IoFlags flags) override;
  int cache(uint32_t count, uint64_t offset) override;
  int extents(uint32_t count, uint64_t offset, uint32_t max_extents, std::vector<Extent>& out) override;
  // At stop: if latched, the last write-back attempt and the cached pages dropped.
  void drain() override;

  int fd() const { return fd_; }
  // The write-back error that made the image untrustworthy (0: none).
  int health() const override { return lost_.load(); }

 private:
  FileDevice(int fd, uint64_t size, bool read_only, bool is_block)
      : fd_(fd), size_(size), read_only_(read_only), is_block_(is_block) {}
  int write_zero_buffer(uint32_t count, uint64_t offset);

  int fd_;
  uint64_t size_;
  bool read_only_;
  bool is_block_;
  // preadv2(RWF_NOWAIT) works here (cleared on the first EOPNOTSUPP). A
  // benign race: threads may each see the old value once.
  std::atomic<bool> nowait_reads_{true};
  // A failed fdatasync is sticky. Linux reports a write-back error once per
  // open file and marks the failed pages clean: a later fdatasync returns 0
  // although acknowledged writes never reached the disk, and once the pages
  // are evicted reads return the old data. So after the first failure every
  // request fails (EIO or that error) until the server restarts: never a
  // FLUSH that lies, never data that silently reverts. Syncs are serialised
  // (sync_mu_), so no concurrent fdatasync can swallow the error that
  // another one is about to latch.
  std::mutex sync_mu_;
  std::atomic<int> lost_{0};
  int sync();  // fdatasync under sync_mu_, latching a failure
  void forget_cached();  // drops the image's clean cached pages
};

}  // namespace nbd
