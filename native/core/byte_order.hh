// byte_order.hh — big-endian load/store helpers for the wire format.
#pragma once

#include <cstdint>
#include <cstring>
#include <endian.h>

namespace nbd {

inline uint16_t be16(uint16_t v) { return htobe16(v); }
inline uint32_t be32(uint32_t v) { return htobe32(v); }
inline uint64_t be64(uint64_t v) { return htobe64(v); }
inline uint16_t from_be16(uint16_t v) { return be16toh(v); }
inline uint32_t from_be32(uint32_t v) { return be32toh(v); }
inline uint64_t from_be64(uint64_t v) { return be64toh(v); }

// Append big-endian values to a byte buffer (used to build option replies).
template <typename Buf>
void put_be16(Buf& b, uint16_t v) { v = be16(v); auto p = reinterpret_cast<const uint8_t*>(&v); b.insert(b.end(), p, p + 2); }
template <typename Buf>
void put_be32(Buf& b, uint32_t v) { v = be32(v); auto p = reinterpret_cast<const uint8_t*>(&v); b.insert(b.end(), p, p + 4); }
template <typename Buf>
void put_be64(Buf& b, uint64_t v) { v = be64(v); auto p = reinterpret_cast<const uint8_t*>(&v); b.insert(b.end(), p, p + 8); }

inline uint32_t load_be32(const uint8_t* p) { uint32_t v; std::memcpy(&v, p, 4); return from_be32(v); }
inline uint16_t load_be16(const uint8_t* p) { uint16_t v; std::memcpy(&v, p, 2); return from_be16(v); }
inline uint64_t load_be64(const uint8_t* p) { uint64_t v; std::memcpy(&v, p, 8); return from_be64(v); }

}  // namespace nbd
