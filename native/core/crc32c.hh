// crc32c.hh — CRC-32C (Castagnoli): the checksum of every metadata record and
// of every preserved snapshot chunk.
#pragma once

#include <cstddef>
#include <cstdint>

namespace nbd {

// Continues a CRC over `len` bytes; start with crc = 0.
uint32_t crc32c(uint32_t crc, const void* data, size_t len);

}  // namespace nbd
