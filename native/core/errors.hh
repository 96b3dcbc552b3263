// errors.hh — the one place host errno values become NBD wire errors.
#pragma once

#include <cerrno>
#include <cstdint>

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

}  // namespace nbd
