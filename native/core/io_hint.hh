// io_hint.hh — lets the device chain tell the connection that a request had
// to wait for storage (not just for a CPU).
//
// Devices set io_waited when an operation could not be served from memory
// (a read that RWF_NOWAIT refused, fdatasync, FUA). The connection thread
// that executed the request reads and clears it; while storage waits are
// being seen, the connection may run more threads than there are CPUs.
// Thread-local: each flag belongs to the connection thread running the
// request, so no synchronisation is needed.
#pragma once

namespace nbd {

inline thread_local bool io_waited = false;

}  // namespace nbd
