// kernel_device.hh — attach an export to a kernel /dev/nbdN without nbd-client.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <vector>

namespace nbd {

class Server;

struct AttachOptions {
  std::string device;          // /dev/nbdN
  std::string export_name;     // "" = default export
  uint32_t connections = 1;    // sockets handed to the kernel (multi-conn)
  uint32_t timeout_sec = 30;   // kernel request timeout (0: none)
  uint32_t block_size = 4096;  // logical block size of the device
};

// One kernel device bound to one export of a Server. The kernel speaks the
// transmission phase directly (NBD_SET_SOCK), so each socketpair end we keep
// is served by a pre-negotiated Connection with simple replies.
class KernelDevice {
 public:
  // Configures the device and starts the thread blocked in NBD_DO_IT.
  // `on_exit` runs on that thread when the device is disconnected, with an
  // errno (0: clean disconnect).
  static std::unique_ptr<KernelDevice> attach(Server& server, const AttachOptions& opts,
                                              std::function<void(int err, const std::string& what)> on_exit,
                                              int& err, std::string& what);
  ~KernelDevice();
  // Asks the kernel to disconnect (like `nbd-client -d`); NBD_DO_IT returns.
  void disconnect();
  // Waits for the NBD_DO_IT thread to finish.
  void join();

 private:
  KernelDevice() = default;
  int dev_fd_ = -1;
  std::thread thread_;
  std::shared_ptr<std::atomic<bool>> done_ = std::make_shared<std::atomic<bool>>(false);  // NBD_DO_IT returned
  std::string device_;
};

// Disconnects a device attached by any process (`node-nbd-server detach`).
int detach_kernel_device(const std::string& device, std::string& what);

}  // namespace nbd
