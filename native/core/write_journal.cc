// write_journal.cc — see write_journal.hh for the format and its rules.
#include "write_journal.hh"

#include <endian.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstring>
#include <random>

#include "crash_point.hh"
#include "crc32c.hh"
#include "errors.hh"
#include "file_io.hh"

namespace nbd {

namespace {

constexpr char kMagic[8] = {'N', 'B', 'D', 'J', 'R', 'N', 'L', '1'};
constexpr uint32_t kVersion = 2;
constexpr uint32_t kEntryMagic = 0x544e454a;
constexpr uint64_t kSlot[2] = {0, 2048};
constexpr size_t kSuperSize = 84;
constexpr char kOwnerMagic[8] = {'N', 'B', 'D', 'J', 'O', 'W', 'N', 'R'};
constexpr uint64_t kOwnerAt = 1024;
constexpr uint32_t kOwnerMax = 1024 - 16;

template <typename T>
void put(uint8_t* p, T v) {
  if constexpr (sizeof(T) == 2) v = htole16(v);
  else if constexpr (sizeof(T) == 4) v = htole32(v);
  else v = htole64(v);
  std::memcpy(p, &v, sizeof v);
}

template <typename T>
T get(const uint8_t* p) {
  T v;
  std::memcpy(&v, p, sizeof v);
  if constexpr (sizeof(T) == 2) return le16toh(v);
  else if constexpr (sizeof(T) == 4) return le32toh(v);
  else return le64toh(v);
}

uint64_t pad8(uint64_t n) { return (n + 7) & ~uint64_t{7}; }

uint64_t new_epoch() {
  std::random_device rd;
  return (static_cast<uint64_t>(rd()) << 32) ^ rd() ^ static_cast<uint64_t>(std::chrono::steady_clock::now().time_since_epoch().count());
}

}  // namespace

WriteJournal::WriteJournal(uint64_t volume_size, uint32_t chunk_size, uint64_t ring_size)
    : volume_size_(volume_size), chunk_size_(chunk_size), ring_size_(ring_size) {}

WriteJournal::~WriteJournal() {
  if (map_) munmap(map_, ring_end());
  if (fd_ >= 0) ::close(fd_);
}

int WriteJournal::map(std::string& err) {
  // Populated now: a page fault per new page would otherwise be taken under
  // the queue lock by the first lap of appends.
  void* p = mmap(nullptr, ring_end(), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd_, 0);
  if (p == MAP_FAILED) {
    int e = errno;
    err = errstr("map " + path_, e);
    return e;
  }
  map_ = static_cast<uint8_t*>(p);
  return 0;
}

int WriteJournal::load_super(int& code, std::string& err) {
  struct stat st;
  if (fstat(fd_, &st) != 0) {
    code = errno;
    err = errstr("stat " + path_, code);
    return code;
  }
  code = EINVAL;
  // Pick the valid superblock with the higher generation.
  bool found = false, any_magic = false;
  for (uint64_t slot : kSlot) {
    uint8_t s[kSuperSize];
    size_t got = 0;
    if (pread_all(fd_, s, sizeof s, slot, &got) != 0 || got < sizeof s) continue;
    if (std::memcmp(s, kMagic, 8) != 0) continue;
    any_magic = true;
    // The CRC first: a damaged slot (the older one, say) is skipped, never
    // read as a verdict on the journal.
    if (get<uint32_t>(s + kSuperSize - 4) != crc32c(0, s, kSuperSize - 4)) continue;
    if (get<uint32_t>(s + 8) != kVersion) {
      err = path_ + ": journal format version " + std::to_string(get<uint32_t>(s + 8)) + ", this build reads " +
            std::to_string(kVersion);
      return code;
    }
    if (get<uint32_t>(s + 12) != chunk_size_ || get<uint64_t>(s + 16) != volume_size_) {
      err = path_ + ": the journal does not match the volume (chunk size or size differ)";
      return code;
    }
    uint64_t gen = get<uint64_t>(s + 32);
    if (found && gen <= gen_) continue;
    found = true;
    gen_ = gen;
    ring_size_ = get<uint64_t>(s + 24);
    replay_seq_ = get<uint64_t>(s + 40);
    replay_off_ = get<uint64_t>(s + 48);
    epoch_ = get<uint64_t>(s + 56);
    std::memcpy(id_.data(), s + 64, kIdSize);
  }
  if (!found) {
    err = path_ + (any_magic ? ": both journal superblocks fail their checksums" : ": not a journal (no superblock)");
    return code;
  }
  // replay_off == ring end is an entry that ended exactly at the end of the
  // ring: the next one starts the ring again (read_pending wraps).
  if (ring_size_ < 4096 || (ring_size_ & 7) || replay_off_ < kRingBase || replay_off_ > ring_end() ||
      ((replay_off_ - kRingBase) & 7) || static_cast<uint64_t>(st.st_size) < ring_end()) {
    err = path_ + ": the journal superblock describes an impossible layout (ring " + std::to_string(ring_size_) +
          " bytes, replay from " + std::to_string(replay_off_) + ", file " + std::to_string(st.st_size) + " bytes)";
    return code;
  }
  code = 0;
  return 0;
}

std::unique_ptr<WriteJournal> WriteJournal::open(const std::string& path, const Id& id, uint64_t volume_size,
                                                 uint32_t chunk_size, int& code, std::string& err) {
  std::unique_ptr<WriteJournal> j(new WriteJournal(volume_size, chunk_size, 0));
  j->path_ = path;
  j->fd_ = ::open(path.c_str(), O_RDWR | O_CLOEXEC | O_NOFOLLOW);
  if (j->fd_ < 0) {
    code = errno;
    err = errstr("open " + path, code);
    return nullptr;
  }
  if (j->load_super(code, err) != 0) return nullptr;
  if (j->id_ != id) {
    code = ESTALE;
    err = path + ": this journal is not the one the volume recorded (another journal id)";
    return nullptr;
  }
  j->next_seq_ = j->replay_seq_;
  j->head_ = j->replay_off_;
  j->new_epoch_due_ = true;  // see reset(): before the first append of this run
  if (j->map(err) != 0) {
    code = EIO;
    return nullptr;
  }
  return j;
}

bool WriteJournal::inspect(const std::string& path, Id& id, std::string& owner) {
  WriteJournal j(0, 0, 0);
  j.path_ = path;
  j.fd_ = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
  if (j.fd_ < 0) return false;
  uint8_t s[kSuperSize];
  size_t got = 0;
  id.fill(0);  // no valid superblock: it never held an entry (the first is synced before any append)
  for (uint64_t slot : kSlot) {
    if (pread_all(j.fd_, s, sizeof s, slot, &got) != 0 || got < sizeof s) continue;
    if (std::memcmp(s, kMagic, 8) != 0 || get<uint32_t>(s + 8) != kVersion) continue;
    if (get<uint32_t>(s + kSuperSize - 4) != crc32c(0, s, kSuperSize - 4)) continue;
    std::memcpy(id.data(), s + 64, kIdSize);
  }
  uint8_t h[12];
  owner.clear();
  if (pread_all(j.fd_, h, sizeof h, kOwnerAt, &got) == 0 && got == sizeof h && std::memcmp(h, kOwnerMagic, 8) == 0) {
    uint32_t n = get<uint32_t>(h + 8);
    if (n <= kOwnerMax) {
      std::vector<uint8_t> b(sizeof h + n + 4);
      if (pread_all(j.fd_, b.data(), b.size(), kOwnerAt, &got) == 0 && got == b.size() &&
          get<uint32_t>(b.data() + sizeof h + n) == crc32c(0, b.data(), sizeof h + n))
        owner.assign(reinterpret_cast<const char*>(b.data() + sizeof h), n);
    }
  }
  // A journal of this build has its owner record (written first at creation).
  return !owner.empty() || id != Id{};
}

std::unique_ptr<WriteJournal> WriteJournal::create(const std::string& path, const Id& id, const std::string& owner,
                                                   uint64_t volume_size, uint32_t chunk_size, uint64_t ring_size,
                                                   std::string& err) {
  std::unique_ptr<WriteJournal> j(new WriteJournal(volume_size, chunk_size, ring_size & ~uint64_t{7}));
  j->path_ = path;
  j->id_ = id;
  if (j->ring_size_ < 4096) {
    err = "journal ring of " + std::to_string(ring_size) + " bytes is too small";
    return nullptr;
  }
  ::unlink(path.c_str());
  j->fd_ = ::open(path.c_str(), O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW, 0600);
  if (j->fd_ < 0) {
    err = errstr("create " + path, errno);
    return nullptr;
  }
  fchmod(j->fd_, 0600);  // whatever the umask: it holds the volume's data
  j->epoch_ = new_epoch();
  // A zeroed ring, allocated now, so that appends through the mapping never
  // meet a full filesystem (that would be a SIGBUS). If there is no room,
  // the caller preserves first writes inline.
  auto fail = [&](const std::string& what, int e) {
    err = errstr(what, e);
    ::unlink(path.c_str());
    return nullptr;
  };
  if (int e = posix_fallocate(j->fd_, 0, static_cast<off_t>(j->ring_end())))
    return fail("allocate " + std::to_string(j->ring_end() >> 20) + " MiB for " + path, e);
  std::string o = owner.substr(0, kOwnerMax);
  std::vector<uint8_t> rec(12 + o.size() + 4);
  std::memcpy(rec.data(), kOwnerMagic, 8);
  put<uint32_t>(rec.data() + 8, static_cast<uint32_t>(o.size()));
  std::memcpy(rec.data() + 12, o.data(), o.size());
  put<uint32_t>(rec.data() + 12 + o.size(), crc32c(0, rec.data(), 12 + o.size()));
  if (int e = pwrite_all(j->fd_, rec.data(), rec.size(), kOwnerAt)) return fail("write " + path, e);
  if (j->map(err) != 0) {
    ::unlink(path.c_str());
    return nullptr;
  }
  if (j->write_super(&err) != 0) {  // synced: the file is complete before anyone records it
    err = path + ": " + err;
    ::unlink(path.c_str());
    return nullptr;
  }
  return j;
}

int WriteJournal::write_super(std::string* err) {
  ++gen_;
  uint8_t s[kSuperSize] = {};
  std::memcpy(s, kMagic, 8);
  put<uint32_t>(s + 8, kVersion);
  put<uint32_t>(s + 12, chunk_size_);
  put<uint64_t>(s + 16, volume_size_);
  put<uint64_t>(s + 24, ring_size_);
  put<uint64_t>(s + 32, gen_);
  put<uint64_t>(s + 40, replay_seq_);
  put<uint64_t>(s + 48, replay_off_);
  put<uint64_t>(s + 56, epoch_);
  std::memcpy(s + 64, id_.data(), kIdSize);
  put<uint32_t>(s + kSuperSize - 4, crc32c(0, s, kSuperSize - 4));
  crash_point_torn("journal.super.torn", fd_, s, sizeof s / 2, kSlot[gen_ % 2]);
  int e = pwrite_all(fd_, s, sizeof s, kSlot[gen_ % 2]);
  crash_point("journal.super.unsynced");
  if (!e && fdatasync(fd_) != 0) e = errno;
  if (e && err) *err = errstr("write journal superblock", e);
  return e;
}

int WriteJournal::read_pending(std::vector<JournalRecord>& out, std::string& err) {
  uint64_t pos = replay_off_, seq = replay_seq_, walked = 0;
  uint8_t h[kEntryHeader];
  while (walked <= ring_size_) {
    if (pos + kEntryHeader > ring_end()) {
      walked += ring_end() - pos;
      pos = kRingBase;
    }
    if (pread_all(fd_, h, sizeof h, pos) != 0) break;
    if (get<uint32_t>(h) != kEntryMagic || get<uint64_t>(h + 8) != seq) break;
    JournalRecord r;
    r.type = get<uint16_t>(h + 4);
    r.flags = get<uint16_t>(h + 6);
    r.seq = seq;
    r.offset = get<uint64_t>(h + 16);
    r.length = get<uint32_t>(h + 24);
    uint32_t dlen = get<uint32_t>(h + 28);
    if (pos + kEntryHeader + dlen > ring_end()) break;
    r.data.resize(dlen);
    if (dlen && pread_all(fd_, r.data.data(), dlen, pos + kEntryHeader) != 0) break;
    uint32_t crc = crc32c(crc32c(epoch_seed(), h, 32), r.data.data(), dlen);
    if (crc != get<uint32_t>(h + 32)) break;  // torn or never completed: the end
    if (r.type == kWrap) {
      walked += ring_end() - pos;
      pos = kRingBase;
      continue;
    }
    if ((r.type != kWrite && r.type != kZero) || r.offset > volume_size_ || r.length > volume_size_ - r.offset ||
        (r.type == kWrite && dlen != r.length)) {
      err = "journal entry " + std::to_string(seq) + " has a valid checksum but impossible contents (corrupt metadata)";
      return EINVAL;
    }
    uint64_t span = pad8(kEntryHeader + dlen);
    pos += span;
    walked += span;
    ++seq;
    out.push_back(std::move(r));
  }
  next_seq_ = seq;
  head_ = pos;
  return 0;
}

uint64_t WriteJournal::span_of(uint32_t data_len) const {
  uint64_t need = pad8(kEntryHeader + data_len);
  if (new_epoch_due_) return need;  // the append restarts the ring
  return head_ + need > ring_end() ? (ring_end() - head_) + need : need;
}

int WriteJournal::append(uint16_t type, uint16_t flags, uint64_t offset, uint32_t length, const uint8_t* data,
                         uint32_t dlen, uint64_t& at) {
  if (new_epoch_due_)
    if (int e = reset()) return e;
  const uint64_t need = pad8(kEntryHeader + dlen);
  auto header = [&](uint8_t* h, uint16_t t, uint16_t f, uint64_t off, uint32_t len, const uint8_t* d, uint32_t n) {
    std::memset(h, 0, kEntryHeader);
    put<uint32_t>(h, kEntryMagic);
    put<uint16_t>(h + 4, t);
    put<uint16_t>(h + 6, f);
    put<uint64_t>(h + 8, next_seq_);
    put<uint64_t>(h + 16, off);
    put<uint32_t>(h + 24, len);
    put<uint32_t>(h + 28, n);
    put<uint32_t>(h + 32, crc32c(crc32c(epoch_seed(), h, 32), d, n));
  };
  uint8_t h[kEntryHeader];
  if (head_ + need > ring_end()) {
    if (head_ + kEntryHeader <= ring_end()) {
      header(h, kWrap, 0, 0, 0, nullptr, 0);
      std::memcpy(map_ + head_, h, kEntryHeader);
      crash_point("journal.append.wrap");
    }
    head_ = kRingBase;
  }
  header(h, type, flags, offset, length, data, dlen);
  if (dlen) std::memcpy(map_ + head_ + kEntryHeader, data, dlen);
  crash_point("journal.append.torn");
  std::memcpy(map_ + head_, h, kEntryHeader);
  at = head_;
  head_ += need;
  ++next_seq_;
  if (head_ == ring_end()) crash_point("journal.append.ring-end");
  crash_point("journal.append.done");
  return 0;
}

uint32_t WriteJournal::epoch_seed() const {
  uint8_t e[8];
  put<uint64_t>(e, epoch_);
  return crc32c(0, e, 8);
}


int WriteJournal::checkpoint(uint64_t seq, uint64_t off) {
  replay_seq_ = seq;
  replay_off_ = off;
  crash_point("journal.checkpoint.before-super");
  int e = write_super(nullptr);
  if (!e && off == ring_end()) crash_point("journal.checkpoint.at-ring-end");
  return e;
}

int WriteJournal::reset() {
  new_epoch_due_ = false;
  epoch_ = new_epoch();  // entries of earlier epochs can never be read as current
  replay_seq_ = next_seq_;
  replay_off_ = kRingBase;
  head_ = kRingBase;
  return write_super(nullptr);
}

}  // namespace nbd
