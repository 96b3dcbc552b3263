// events.hh — what the core tells its embedder (the N-API binding, or a test).
//
// Emitted from server and connection threads. Implementations must be
// thread-safe and must not block for long (the binding queues to JS).
#pragma once

#include <cstdint>
#include <string>

namespace nbd {

struct ServerEvent {
  std::string type;         // "connect", "disconnect", "handshake-failed", "error"
  uint64_t connection = 0;  // connection id (0: not about a connection)
  std::string export_name;
  std::string peer;
  std::string message;
};

class EventSink {
 public:
  virtual ~EventSink() = default;
  virtual void on_event(const ServerEvent& ev) = 0;  // called on core threads
};

}  // namespace nbd
