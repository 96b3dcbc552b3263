// record_log.cc — see record_log.hh for the record layout and replay rules.
#include "record_log.hh"

#include <endian.h>
#include <sys/stat.h>

#include <cerrno>
#include <cstring>

#include "crc32c.hh"
#include "file_io.hh"

namespace nbd {

namespace {

struct RecordHeader {
  uint32_t magic;
  uint16_t type;
  uint16_t zero;
  uint32_t length;
  uint32_t crc;
};
static_assert(sizeof(RecordHeader) == 16, "layout");

uint32_t record_crc(const RecordHeader& h, const void* payload) {
  RecordHeader c = h;
  uint32_t crc = crc32c(0, reinterpret_cast<const uint8_t*>(&c) + 4, 8);
  return crc32c(crc, payload, le32toh(h.length));
}

}  // namespace

int append_record(int fd, uint64_t& end, uint16_t type, const void* payload, uint32_t len) {
  std::vector<uint8_t> buf(sizeof(RecordHeader) + len);
  RecordHeader r{htole32(kRecordMagic), htole16(type), 0, htole32(len), 0};
  r.crc = htole32(record_crc(r, payload));
  std::memcpy(buf.data(), &r, sizeof r);
  if (len) std::memcpy(buf.data() + sizeof r, payload, len);
  if (int e = pwrite_all(fd, buf.data(), buf.size(), end)) return e;
  end += buf.size();
  return 0;
}

int replay_records(int fd, uint64_t base,
                   const std::function<int(uint16_t, std::vector<uint8_t>&, uint64_t)>& fn, uint64_t& end,
                   std::string& err) {
  struct stat st;
  if (fstat(fd, &st) != 0) {
    err = strerror(errno);
    return errno;
  }
  const uint64_t file_end = static_cast<uint64_t>(st.st_size);
  uint64_t off = base;
  std::vector<uint8_t> payload;
  while (off < file_end) {
    RecordHeader r;
    bool ok = file_end - off >= sizeof r && pread_all(fd, &r, sizeof r, off) == 0;
    uint32_t len = ok ? le32toh(r.length) : 0;
    ok = ok && le32toh(r.magic) == kRecordMagic && len <= kMaxRecord && file_end - off - sizeof r >= len;
    if (ok) {
      payload.resize(len);
      ok = pread_all(fd, payload.data(), len, off + sizeof r) == 0 && record_crc(r, payload.data()) == le32toh(r.crc);
    }
    if (!ok) {
      // Torn tail or damage in the middle: only the last record can be torn,
      // so a valid record anywhere after this point means damage.
      std::vector<uint8_t> rest(file_end - off > (64u << 20) ? (64u << 20) : file_end - off);
      pread_all(fd, rest.data(), rest.size(), off);
      for (size_t i = 1; i + sizeof(RecordHeader) <= rest.size(); ++i) {
        RecordHeader c;
        std::memcpy(&c, rest.data() + i, sizeof c);
        uint32_t clen = le32toh(c.length);
        if (le32toh(c.magic) == kRecordMagic && clen <= rest.size() - i - sizeof c &&
            record_crc(c, rest.data() + i + sizeof c) == le32toh(c.crc)) {
          err = "log record at offset " + std::to_string(off) + " fails its checksum (corrupt metadata)";
          return EINVAL;
        }
      }
      break;
    }
    if (int e = fn(le16toh(r.type), payload, off)) return e;
    off += sizeof r + len;
  }
  end = off;
  return 0;
}

}  // namespace nbd
