// handshake.hh — fixed-newstyle negotiation, from NBDMAGIC to the chosen export.
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "export_table.hh"
#include "socket_io.hh"

namespace nbd {

// What the negotiation agreed on; the transmission phase obeys it.
struct Session {
  std::shared_ptr<Export> exp;
  std::string export_name;       // as the client asked for it
  bool structured = false;       // NBD_OPT_STRUCTURED_REPLY was accepted
  uint32_t base_allocation_id = 0;  // nonzero: base:allocation was selected
  uint32_t dirty_bitmap_id = 0;     // nonzero: qemu:dirty-bitmap:NAME was selected...
  uint64_t dirty_from = 0;          // ...the snapshot NAME's id (exp->changes)
  uint16_t tx_flags = 0;         // what we advertised
  uint32_t max_payload = 0;
};

enum class HandshakeOutcome {
  kTransmission,  // session is ready
  kClosed,        // client aborted or went away: not an error
  kRejected,      // protocol violation; `error` says what
};

struct HandshakeResult {
  HandshakeOutcome outcome;
  std::string error;
};

struct HandshakeConfig {
  const ExportTable* exports;
  uint32_t max_payload;
};

HandshakeResult run_handshake(int fd, SocketReader& reader, const HandshakeConfig& cfg, Session& session);

// Transmission flags for an export, given what was negotiated.
uint16_t transmission_flags(const Device& dev, bool structured);

}  // namespace nbd
