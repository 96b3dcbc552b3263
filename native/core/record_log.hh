// record_log.hh — the append-only, checksummed record log used by snapshot
// stores and merge jobs.
//
// Record: u32 magic 0x5245434e ("NCER"), u16 type, u16 zero, u32 payload
// length, u32 CRC-32C of (type, zero, length, payload), then the payload
// (little-endian). Appends are not synced here: the caller orders its syncs.
//
// Replay reads records from `base` to end of file. An invalid record at the
// end is a torn tail (the last append did not complete): replay stops there
// and reports where the valid records end, so the caller can cut it off. An
// invalid record followed by a valid one is damage in the middle, which is
// refused (EINVAL with a message) instead of guessed about.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

namespace nbd {

constexpr uint32_t kRecordMagic = 0x5245434e;
constexpr uint32_t kMaxRecord = 64u << 20;  // largest payload accepted

// Appends one record at `end` and advances it. Returns 0 or an errno.
int append_record(int fd, uint64_t& end, uint16_t type, const void* payload, uint32_t len);

// Calls fn(type, payload, offset) for each valid record; fn returns 0 or an
// errno (with `err` set) to stop. `end` gets the end of the last valid record.
int replay_records(int fd, uint64_t base,
                   const std::function<int(uint16_t, std::vector<uint8_t>&, uint64_t)>& fn, uint64_t& end,
                   std::string& err);

}  // namespace nbd
