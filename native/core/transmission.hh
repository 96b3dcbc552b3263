// transmission.hh — receive, validate, execute and answer one NBD request.
#pragma once

#include <atomic>
#include <cstdint>
#include <mutex>
#include <string>

#include "handshake.hh"
#include "io_buffer.hh"
#include "socket_io.hh"

namespace nbd {

// The send half of a connection, shared by its threads. Replies are written
// whole under `mu` so chunks of different replies never interleave mid-chunk.
struct ReplySender {
  int fd;
  std::mutex mu;  // lock order: taken last; nothing else is acquired while held
  std::atomic<bool> broken{false};
  int send(struct iovec* iov, int n);
};

struct PendingRequest {
  uint16_t type = 0, flags = 0;
  uint64_t cookie = 0, offset = 0;
  uint32_t length = 0;
  uint32_t error = 0;           // nonzero: refuse with this NBD error, do not execute
  const char* why = nullptr;    // human text for a refused request
  uint8_t* payload = nullptr;   // WRITE data, in the thread's IoBuffer
};

enum class RecvStatus {
  kRequest,     // `req` is ready to execute (possibly as a refusal)
  kDisconnect,  // NBD_CMD_DISC
  kEof,         // clean or unclean end of stream
  kCorrupt,     // framing is lost: hard disconnect
};

// Called with the connection's receive mutex held: reads one request header
// and, for WRITE, its payload (into `buf`), and validates both.
RecvStatus receive_request(SocketReader& reader, const Session& s, IoBuffer& buf, PendingRequest& req);

// Called without the receive mutex: performs the request on the export's
// device and sends the reply. Returns 0, or the errno of a failed send.
int execute_request(ReplySender& out, const Session& s, PendingRequest& req, IoBuffer& buf);

}  // namespace nbd
