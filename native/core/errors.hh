// errors.hh — the one place host errno values become NBD wire errors, and
// the one way errno values become control-plane messages.
#pragma once

#include <cerrno>
#include <cstdint>
#include <cstring>
#include <string>

#include "nbd_protocol.hh"

namespace nbd {

inline uint32_t map_errno(int err) {
  switch (err) {
    case 0: return 0;
    case EPERM: case EROFS: case EACCES: return proto::kEPERM;
    case ENOMEM: return proto::kENOMEM;
    case EINVAL: return proto::kEINVAL;
    case ENOSPC: case EFBIG: case EDQUOT: return proto::kENOSPC;
    case EOVERFLOW: return proto::kEOVERFLOW;
    case ENOTSUP: return proto::kENOTSUP;  // == EOPNOTSUPP on Linux
    case ESHUTDOWN: return proto::kESHUTDOWN;
    default: return proto::kEIO;
  }
}

// "what: strerror(e)", for error messages that reach the control plane.
inline std::string errstr(const std::string& what, int e) { return what + ": " + strerror(e); }

}  // namespace nbd
