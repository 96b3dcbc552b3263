// snapshot_store.cc — see snapshot_store.hh for the crash invariant.
//
// File layout, format 2 (all integers little-endian):
//   0     8  magic "NBDSNAP2"
//   8     4  format version (2)
//   12    4  chunk size
//   16    8  volume size
//   24    8  snapshot id
//   32    8  data_base (1 MiB)
//   40    8  log_base (data_base + volume size rounded up to 1 MiB)
//   48    4  CRC-32C of bytes 0..47
//   52..4095 zero, except the failure marker at 1024
//   data_base + c * chunk size: the preserved data of chunk c
//   log_base: records, each: u32 magic 0x5245434e ("NCER"), u16 type, u16
//         zero, u32 payload length, u32 CRC-32C of (type, zero, length,
//         payload), then the payload.
// Record types: 1 CHUNKS (payload: entries of u64 chunk number, u32 CRC-32C
// of the chunk's data, u32 zero). Unknown types are skipped.
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

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstring>

#include "errors.hh"
#include "crc32c.hh"
#include "file_io.hh"
#include "io_hint.hh"
#include "record_log.hh"

namespace nbd {

namespace {

constexpr char kMagic[8] = {'N', 'B', 'D', 'S', 'N', 'A', 'P', '2'};
constexpr uint32_t kVersion = 2;
constexpr uint64_t kHeaderSize = 4096;
constexpr uint64_t kAlign = 1u << 20;  // data_base; the largest chunk size
constexpr uint16_t kRecChunks = 1;
constexpr uint32_t kEntrySize = 16;
constexpr uint64_t kFailOffset = 1024;
constexpr uint32_t kFailMagic = 0x4c494146;
constexpr uint32_t kMaxReason = 2048;


void put_chunk_entry(uint8_t* p, const ChunkSum& e) {
  uint64_t c = htole64(e.chunk);
  uint32_t crc = htole32(e.crc), zero = 0;
  std::memcpy(p, &c, 8);
  std::memcpy(p + 8, &crc, 4);
  std::memcpy(p + 12, &zero, 4);
}

ChunkSum get_chunk_entry(const uint8_t* p) {
  uint64_t c;
  uint32_t crc;
  std::memcpy(&c, p, 8);
  std::memcpy(&crc, p + 8, 4);
  return {le64toh(c), le32toh(crc)};
}

uint64_t now_ms() {
  return static_cast<uint64_t>(
      std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::system_clock::now().time_since_epoch()).count());
}

}  // namespace

SnapshotStore::SnapshotStore(uint64_t id, uint64_t volume_size, uint32_t chunk_size)
    : id_(id),
      volume_size_(volume_size),
      chunk_size_(chunk_size),
      data_base_(kAlign),
      log_base_(kAlign + (volume_size + kAlign - 1) / kAlign * kAlign),
      map_((volume_size + chunk_size - 1) / chunk_size) {}

SnapshotStore::~SnapshotStore() {
  if (fd_ >= 0) ::close(fd_);
}

uint64_t SnapshotStore::chunk_len(uint64_t c) const {
  return std::min<uint64_t>(chunk_size_, volume_size_ - c * chunk_size_);
}

std::unique_ptr<SnapshotStore> SnapshotStore::create(uint64_t id, const std::string& path, uint64_t volume_size,
                                                     uint32_t chunk_size, std::string& err) {
  std::unique_ptr<SnapshotStore> s(new SnapshotStore(id, volume_size, chunk_size));
  // 0600: a store holds the disk's old data, private to the server's user (src/volume-meta.ts).
  s->fd_ = ::open(path.c_str(), O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
  if (s->fd_ < 0) { err = errstr("create " + path, errno); return nullptr; }
  uint8_t h[kHeaderSize] = {};
  std::memcpy(h, kMagic, 8);
  uint32_t v = htole32(kVersion), cs = htole32(chunk_size), crc;
  uint64_t vs = htole64(volume_size), sid = htole64(id), db = htole64(s->data_base_), lb = htole64(s->log_base_);
  std::memcpy(h + 8, &v, 4);
  std::memcpy(h + 12, &cs, 4);
  std::memcpy(h + 16, &vs, 8);
  std::memcpy(h + 24, &sid, 8);
  std::memcpy(h + 32, &db, 8);
  std::memcpy(h + 40, &lb, 8);
  crc = htole32(crc32c(0, h, 48));
  std::memcpy(h + 48, &crc, 4);
  if (int e = pwrite_all(s->fd_, h, sizeof h, 0)) { err = errstr("write " + path, e); return nullptr; }
  if (ftruncate(s->fd_, static_cast<off_t>(s->log_base_)) != 0) { err = errstr("size " + path, errno); return nullptr; }
  if (fdatasync(s->fd_) != 0) { err = errstr("sync " + path, errno); return nullptr; }
  s->log_end_ = s->log_base_;
  return s;
}

std::unique_ptr<SnapshotStore> SnapshotStore::open(uint64_t id, const std::string& path, uint64_t volume_size,
                                                   uint32_t chunk_size, std::string& err) {
  std::unique_ptr<SnapshotStore> s(new SnapshotStore(id, volume_size, chunk_size));
  s->fd_ = ::open(path.c_str(), O_RDWR | O_CLOEXEC);
  if (s->fd_ < 0) { err = errstr("open " + path, errno); return nullptr; }
  if (s->load(err) != 0) {
    err = path + ": " + err;
    return nullptr;
  }
  return s;
}

int SnapshotStore::load(std::string& err) {
  uint8_t h[kHeaderSize];
  size_t got = 0;
  if (int e = pread_all(fd_, h, sizeof h, 0, &got)) { err = strerror(e); return e; }
  if (got >= 8 && std::memcmp(h, "NBDSNAP1", 8) == 0) {
    err = "snapshot format 1 (from a development build) is not supported; delete the snapshot with that build";
    return EINVAL;
  }
  if (got < 52 || std::memcmp(h, kMagic, 8) != 0) { err = "not a snapshot file (bad magic)"; return EINVAL; }
  uint32_t v, cs, crc;
  uint64_t vs, sid, db, lb;
  std::memcpy(&v, h + 8, 4);
  std::memcpy(&cs, h + 12, 4);
  std::memcpy(&vs, h + 16, 8);
  std::memcpy(&sid, h + 24, 8);
  std::memcpy(&db, h + 32, 8);
  std::memcpy(&lb, h + 40, 8);
  std::memcpy(&crc, h + 48, 4);
  if (le32toh(crc) != crc32c(0, h, 48)) { err = "header checksum mismatch (corrupt metadata)"; return EINVAL; }
  if (le32toh(v) != kVersion) { err = "unsupported snapshot format version " + std::to_string(le32toh(v)); return EINVAL; }
  if (le32toh(cs) != chunk_size_ || le64toh(vs) != volume_size_ || le64toh(sid) != id_) {
    err = "header does not match the volume (chunk size, size or id differ)";
    return EINVAL;
  }
  if (le64toh(db) != data_base_ || le64toh(lb) != log_base_) { err = "header has an unexpected layout (corrupt metadata)"; return EINVAL; }
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
  if (fstat(fd_, &st) != 0) { err = strerror(errno); return errno; }
  const uint64_t file_end = static_cast<uint64_t>(st.st_size);
  if (file_end < log_base_) { err = "snapshot file is truncated (corrupt metadata)"; return EINVAL; }
  // The newest CHUNKS record is applied only once its data is verified (see
  // the crash invariant in the header).
  std::vector<uint8_t> last;
  uint64_t last_off = 0, off = 0;
  auto apply = [&](const std::vector<uint8_t>& p) {
    for (size_t i = 0; i < p.size(); i += kEntrySize) map_.set(get_chunk_entry(p.data() + i).chunk);
  };
  int e = replay_records(
      fd_, log_base_,
      [&](uint16_t type, std::vector<uint8_t>& payload, uint64_t at) {
        if (type != kRecChunks) return 0;  // unknown record types from newer versions are skipped
        if (payload.size() % kEntrySize) { err = "CHUNKS record of odd length (corrupt metadata)"; return EINVAL; }
        for (size_t i = 0; i < payload.size(); i += kEntrySize)
          if (get_chunk_entry(payload.data() + i).chunk >= map_.size()) {
            err = "chunk number beyond the volume (corrupt metadata)";
            return EINVAL;
          }
        apply(last);
        last.swap(payload);
        last_off = at;
        return 0;
      },
      off, err);
  if (e) return e;
  if (!last.empty() && !data_matches(last)) off = last_off;  // its sync never completed: drop it
  else apply(last);
  if (off < file_end && ftruncate(fd_, static_cast<off_t>(off)) != 0) { err = strerror(errno); return errno; }
  log_end_ = off;
  return 0;
}

bool SnapshotStore::data_matches(const std::vector<uint8_t>& payload) {
  std::vector<uint8_t> buf(chunk_size_);
  for (size_t i = 0; i < payload.size(); i += kEntrySize) {
    ChunkSum e = get_chunk_entry(payload.data() + i);
    uint64_t len = chunk_len(e.chunk);
    if (pread_all(fd_, buf.data(), len, data_base_ + e.chunk * chunk_size_) != 0) return false;
    if (crc32c(0, buf.data(), len) != e.crc) return false;
  }
  return true;
}

bool SnapshotStore::failed() const { return failed_.load(); }

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
  if (pwrite_all(fd_, m, 20 + n, kFailOffset) == 0) fdatasync(fd_);  // best effort: the disk may be failing
}

int SnapshotStore::write_chunks(const void* buf, uint64_t first, uint64_t len, std::vector<ChunkSum>& sums) {
  const auto* p = static_cast<const uint8_t*>(buf);
  for (uint64_t done = 0, c = first; done < len; ++c) {
    uint64_t n = std::min<uint64_t>(chunk_len(c), len - done);
    sums.push_back({c, crc32c(0, p + done, n)});
    done += n;
  }
  return pwrite_all(fd_, buf, len, data_base_ + first * chunk_size_);
}

int SnapshotStore::read_data(void* buf, uint32_t count, uint64_t offset) const {
  return pread_all(fd_, buf, count, data_base_ + offset);
}

int SnapshotStore::commit(const std::vector<ChunkSum>& chunks) {
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
    // Lead one batch: everything queued so far shares one record and one sync.
    leading_ = true;
    std::deque<std::shared_ptr<Pending>> batch;
    size_t n = 0;
    while (!queue_.empty() && (batch.empty() || n + queue_.front()->chunks.size() <= kMaxRecord / kEntrySize)) {
      n += queue_.front()->chunks.size();
      batch.push_back(std::move(queue_.front()));
      queue_.pop_front();
    }
    lk.unlock();
    std::vector<uint8_t> payload(n * kEntrySize);
    size_t at = 0;
    for (auto& p : batch)
      for (const ChunkSum& e : p->chunks) put_chunk_entry(payload.data() + kEntrySize * at++, e);
    const uint64_t start = log_end_;
    int r = append_record(fd_, log_end_, kRecChunks, payload.data(), static_cast<uint32_t>(payload.size()));
    if (!r && fdatasync(fd_) != 0) r = errno;
    if (r) log_end_ = start;  // a failed record is overwritten by the next one (if any)
    if (!r)
      for (auto& p : batch)
        for (const ChunkSum& e : p->chunks) map_.set(e.chunk);
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
  return fstat(fd_, &st) == 0 && static_cast<uint64_t>(st.st_size) > log_base_ ? static_cast<uint64_t>(st.st_size) - log_base_ : 0;
}

}  // namespace nbd
