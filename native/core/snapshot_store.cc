// snapshot_store.cc — see snapshot_store.hh for the crash invariant.
//
// Map file layout (all integers little-endian):
//   0     8  magic "NBDSNAP1"
//   8     4  format version (1)
//   12    4  chunk size
//   16    8  volume size
//   24    8  snapshot id
//   32    4  CRC-32C of bytes 0..31
//   36..4095 zero
//   4096  records, each: u32 magic 0x5245434e ("NCER"), u16 type, u16 zero,
//         u32 payload length, u32 CRC-32C of (type, zero, length, payload),
//         then the payload.
// Record types: 1 CHUNKS (payload: u64 chunk numbers), 2 FAILED (payload:
// u64 unix time in ms, then the reason in UTF-8; read for compatibility).
//
// Failure marker: 1024 in the header page: u32 magic 0x4c494146 ("FAIL"),
// u32 reason length (<= 2048), u64 unix time in ms, the reason, then a
// CRC-32C of all of that. It is written in place, into blocks allocated when
// the snapshot was created, so recording a failure needs no free space — the
// usual cause of failure is a full disk.
#include "snapshot_store.hh"

#include <endian.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstring>

#include "crc32c.hh"
#include "io_hint.hh"

namespace nbd {

namespace {

constexpr char kMagic[8] = {'N', 'B', 'D', 'S', 'N', 'A', 'P', '1'};
constexpr uint32_t kVersion = 1;
constexpr uint64_t kHeaderSize = 4096;
constexpr uint32_t kRecordMagic = 0x5245434e;
constexpr uint16_t kRecChunks = 1;
constexpr uint16_t kRecFailed = 2;
constexpr uint32_t kMaxRecord = 64u << 20;
constexpr uint64_t kFailOffset = 1024;
constexpr uint32_t kFailMagic = 0x4c494146;
constexpr uint32_t kMaxReason = 2048;

struct RecordHeader {
  uint32_t magic;
  uint16_t type;
  uint16_t zero;
  uint32_t length;
  uint32_t crc;
};
static_assert(sizeof(RecordHeader) == 16, "layout");

std::string errstr(const std::string& what, int e) { return what + ": " + strerror(e); }

int pwrite_all(int fd, const void* buf, size_t len, uint64_t off) {
  const auto* p = static_cast<const char*>(buf);
  while (len) {
    ssize_t r = ::pwrite(fd, p, len, static_cast<off_t>(off));
    if (r < 0) {
      if (errno == EINTR) continue;
      return errno;
    }
    p += r;
    len -= static_cast<size_t>(r);
    off += static_cast<uint64_t>(r);
  }
  return 0;
}

int pread_all(int fd, void* buf, size_t len, uint64_t off, size_t* got = nullptr) {
  auto* p = static_cast<char*>(buf);
  size_t total = 0;
  while (len) {
    ssize_t r = ::pread(fd, p, len, static_cast<off_t>(off));
    if (r < 0) {
      if (errno == EINTR) continue;
      return errno;
    }
    if (r == 0) break;
    p += r;
    len -= static_cast<size_t>(r);
    off += static_cast<uint64_t>(r);
    total += static_cast<size_t>(r);
  }
  if (got) *got = total;
  else if (len) std::memset(p, 0, len);  // beyond EOF of a sparse file: zeroes
  return 0;
}

uint32_t record_crc(const RecordHeader& h, const void* payload) {
  RecordHeader c = h;
  c.magic = 0;
  c.crc = 0;
  uint32_t crc = crc32c(0, reinterpret_cast<const uint8_t*>(&c) + 4, 8);
  return crc32c(crc, payload, le32toh(h.length));
}

uint64_t now_ms() {
  return static_cast<uint64_t>(
      std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::system_clock::now().time_since_epoch()).count());
}

}  // namespace

SnapshotStore::SnapshotStore(uint64_t id, uint64_t volume_size, uint32_t chunk_size)
    : id_(id), volume_size_(volume_size), chunk_size_(chunk_size), map_((volume_size + chunk_size - 1) / chunk_size) {}

SnapshotStore::~SnapshotStore() {
  if (data_fd_ >= 0) ::close(data_fd_);
  if (map_fd_ >= 0) ::close(map_fd_);
}

std::unique_ptr<SnapshotStore> SnapshotStore::create(uint64_t id, const SnapshotPaths& paths, uint64_t volume_size,
                                                     uint32_t chunk_size, std::string& err) {
  std::unique_ptr<SnapshotStore> s(new SnapshotStore(id, volume_size, chunk_size));
  s->data_fd_ = ::open(paths.data.c_str(), O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
  if (s->data_fd_ < 0) { err = errstr("create " + paths.data, errno); return nullptr; }
  if (ftruncate(s->data_fd_, static_cast<off_t>(volume_size)) != 0) { err = errstr("size " + paths.data, errno); return nullptr; }
  s->map_fd_ = ::open(paths.map.c_str(), O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
  if (s->map_fd_ < 0) { err = errstr("create " + paths.map, errno); return nullptr; }
  uint8_t h[kHeaderSize] = {};
  std::memcpy(h, kMagic, 8);
  uint32_t v = htole32(kVersion), cs = htole32(chunk_size), crc;
  uint64_t vs = htole64(volume_size), sid = htole64(id);
  std::memcpy(h + 8, &v, 4);
  std::memcpy(h + 12, &cs, 4);
  std::memcpy(h + 16, &vs, 8);
  std::memcpy(h + 24, &sid, 8);
  crc = htole32(crc32c(0, h, 32));
  std::memcpy(h + 32, &crc, 4);
  if (int e = pwrite_all(s->map_fd_, h, sizeof h, 0)) { err = errstr("write " + paths.map, e); return nullptr; }
  if (fdatasync(s->map_fd_) != 0 || fdatasync(s->data_fd_) != 0) { err = errstr("sync snapshot files", errno); return nullptr; }
  s->log_end_ = kHeaderSize;
  return s;
}

std::unique_ptr<SnapshotStore> SnapshotStore::open(uint64_t id, const SnapshotPaths& paths, uint64_t volume_size,
                                                   uint32_t chunk_size, std::string& err) {
  std::unique_ptr<SnapshotStore> s(new SnapshotStore(id, volume_size, chunk_size));
  s->data_fd_ = ::open(paths.data.c_str(), O_RDWR | O_CLOEXEC);
  if (s->data_fd_ < 0) { err = errstr("open " + paths.data, errno); return nullptr; }
  s->map_fd_ = ::open(paths.map.c_str(), O_RDWR | O_CLOEXEC);
  if (s->map_fd_ < 0) { err = errstr("open " + paths.map, errno); return nullptr; }
  if (s->load(err) != 0) {
    err = paths.map + ": " + err;
    return nullptr;
  }
  return s;
}

int SnapshotStore::load(std::string& err) {
  uint8_t h[kHeaderSize];
  size_t got = 0;
  if (int e = pread_all(map_fd_, h, sizeof h, 0, &got)) { err = strerror(e); return e; }
  if (got < 36 || std::memcmp(h, kMagic, 8) != 0) { err = "not a snapshot map (bad magic)"; return EINVAL; }
  uint32_t v, cs, crc;
  uint64_t vs, sid;
  std::memcpy(&v, h + 8, 4);
  std::memcpy(&cs, h + 12, 4);
  std::memcpy(&vs, h + 16, 8);
  std::memcpy(&sid, h + 24, 8);
  std::memcpy(&crc, h + 32, 4);
  if (le32toh(crc) != crc32c(0, h, 32)) { err = "header checksum mismatch (corrupt metadata)"; return EINVAL; }
  if (le32toh(v) != kVersion) { err = "unsupported snapshot format version " + std::to_string(le32toh(v)); return EINVAL; }
  if (le32toh(cs) != chunk_size_ || le64toh(vs) != volume_size_ || le64toh(sid) != id_) {
    err = "header does not match the volume (chunk size, size or id differ)";
    return EINVAL;
  }
  uint32_t fmagic, flen;
  std::memcpy(&fmagic, h + kFailOffset, 4);
  std::memcpy(&flen, h + kFailOffset + 4, 4);
  if (le32toh(fmagic) == kFailMagic) {
    uint32_t n = le32toh(flen), fcrc;
    if (n > kMaxReason) { err = "failure marker is damaged (corrupt metadata)"; return EINVAL; }
    std::memcpy(&fcrc, h + kFailOffset + 16 + n, 4);
    if (le32toh(fcrc) != crc32c(0, h + kFailOffset, 16 + n)) { err = "failure marker fails its checksum (corrupt metadata)"; return EINVAL; }
    failed_ = true;
    failure_.assign(reinterpret_cast<const char*>(h + kFailOffset + 16), n);
    uint64_t at;
    std::memcpy(&at, h + kFailOffset + 8, 8);
    failed_at_ms_ = le64toh(at);
  }
  struct stat st;
  if (fstat(map_fd_, &st) != 0) { err = strerror(errno); return errno; }
  const uint64_t file_end = static_cast<uint64_t>(st.st_size);
  uint64_t off = kHeaderSize;
  std::vector<uint8_t> payload;
  for (;;) {
    if (off >= file_end) break;
    RecordHeader r;
    bool ok = file_end - off >= sizeof r;
    if (ok && pread_all(map_fd_, &r, sizeof r, off) != 0) ok = false;
    uint32_t len = ok ? le32toh(r.length) : 0;
    ok = ok && le32toh(r.magic) == kRecordMagic && len <= kMaxRecord && file_end - off - sizeof r >= len;
    if (ok) {
      payload.resize(len);
      ok = pread_all(map_fd_, payload.data(), len, off + sizeof r) == 0 && record_crc(r, payload.data()) == le32toh(r.crc);
    }
    if (!ok) {
      // Torn tail (the last append did not complete) or corruption? Only the
      // last record can be torn: if any valid record magic follows, the log
      // is damaged in the middle, which we refuse to guess about.
      std::vector<uint8_t> rest(file_end - off > (64u << 20) ? (64u << 20) : file_end - off);
      pread_all(map_fd_, rest.data(), rest.size(), off);
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
      if (ftruncate(map_fd_, static_cast<off_t>(off)) != 0) { err = strerror(errno); return errno; }
      break;
    }
    uint16_t type = le16toh(r.type);
    if (type == kRecChunks) {
      if (len % 8) { err = "CHUNKS record of odd length"; return EINVAL; }
      for (uint32_t i = 0; i < len; i += 8) {
        uint64_t c;
        std::memcpy(&c, payload.data() + i, 8);
        c = le64toh(c);
        if (c >= map_.size()) { err = "chunk number beyond the volume (corrupt metadata)"; return EINVAL; }
        map_.set(c);
      }
    } else if (type == kRecFailed) {
      failed_ = true;
      failure_ = len > 8 ? std::string(payload.begin() + 8, payload.end()) : "unknown";
      if (len >= 8) {
        uint64_t at;
        std::memcpy(&at, payload.data(), 8);
        failed_at_ms_ = le64toh(at);
      }
    }  // unknown record types from newer versions are skipped
    off += sizeof r + len;
  }
  log_end_ = off;
  return 0;
}

int SnapshotStore::append_record(uint16_t type, const void* payload, uint32_t len) {
  std::vector<uint8_t> buf(sizeof(RecordHeader) + len);
  RecordHeader r{htole32(kRecordMagic), htole16(type), 0, htole32(len), 0};
  r.crc = htole32(record_crc(r, payload));
  std::memcpy(buf.data(), &r, sizeof r);
  if (len) std::memcpy(buf.data() + sizeof r, payload, len);
  if (int e = pwrite_all(map_fd_, buf.data(), buf.size(), log_end_)) return e;
  if (fdatasync(map_fd_) != 0) return errno;
  log_end_ += buf.size();
  return 0;
}

bool SnapshotStore::failed() const {
  std::lock_guard<std::mutex> lk(mu_);
  return failed_;
}

uint64_t SnapshotStore::failed_at_ms() const {
  std::lock_guard<std::mutex> lk(mu_);
  return failed_at_ms_;
}

std::string SnapshotStore::failure() const {
  std::lock_guard<std::mutex> lk(mu_);
  return failure_;
}

void SnapshotStore::mark_failed(const std::string& reason) {
  std::lock_guard<std::mutex> lk(mu_);
  if (failed_) return;
  failed_ = true;
  failure_ = reason.substr(0, kMaxReason);
  failed_at_ms_ = now_ms();
  // In place in the header page (see the layout note): needs no free space.
  uint8_t m[16 + kMaxReason + 4];
  uint32_t magic = htole32(kFailMagic), n = static_cast<uint32_t>(failure_.size());
  uint32_t len = htole32(n);
  uint64_t t = htole64(failed_at_ms_);
  std::memcpy(m, &magic, 4);
  std::memcpy(m + 4, &len, 4);
  std::memcpy(m + 8, &t, 8);
  std::memcpy(m + 16, failure_.data(), n);
  uint32_t crc = htole32(crc32c(0, m, 16 + n));
  std::memcpy(m + 16 + n, &crc, 4);
  if (pwrite_all(map_fd_, m, 20 + n, kFailOffset) == 0) fdatasync(map_fd_);  // best effort: the disk may be failing
}

int SnapshotStore::write_data(const void* buf, uint32_t count, uint64_t offset) {
  return pwrite_all(data_fd_, buf, count, offset);
}

int SnapshotStore::read_data(void* buf, uint32_t count, uint64_t offset) const {
  return pread_all(data_fd_, buf, count, offset);
}

int SnapshotStore::commit(const std::vector<uint64_t>& chunks) {
  // A commit waits for storage: let the connection run more threads, so more
  // first writes queue up and share each group commit.
  io_waited = true;
  auto mine = std::make_shared<Pending>();
  mine->chunks = chunks;
  std::unique_lock<std::mutex> lk(mu_);
  if (failed_) return EIO;
  queue_.push_back(mine);
  while (!mine->done) {
    if (leading_) {
      cv_.wait(lk);
      continue;
    }
    // Lead one batch: everything queued so far shares the two syncs.
    leading_ = true;
    std::deque<std::shared_ptr<Pending>> batch;
    batch.swap(queue_);
    lk.unlock();
    std::vector<uint64_t> all;
    for (auto& p : batch)
      for (uint64_t c : p->chunks) all.push_back(htole64(c));
    int r = fdatasync(data_fd_) == 0 ? 0 : errno;
    if (!r) r = append_record(kRecChunks, all.data(), static_cast<uint32_t>(all.size() * 8));
    if (!r)
      for (auto& p : batch)
        for (uint64_t c : p->chunks) map_.set(c);
    lk.lock();
    for (auto& p : batch) {
      p->result = r;
      p->done = true;
    }
    leading_ = false;
    cv_.notify_all();
  }
  return mine->result;
}

uint64_t SnapshotStore::map_bytes() const {
  struct stat st;
  return fstat(map_fd_, &st) == 0 ? static_cast<uint64_t>(st.st_size) : 0;
}

}  // namespace nbd
