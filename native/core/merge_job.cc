// merge_job.cc — see merge_job.hh for the file layout and its invariant.
#include "merge_job.hh"

#include <endian.h>
#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "errors.hh"
#include "crc32c.hh"
#include "file_io.hh"
#include "io_hint.hh"
#include "record_log.hh"

namespace nbd {

namespace {

constexpr char kMagic[8] = {'N', 'B', 'D', 'M', 'E', 'R', 'G', '1'};
constexpr uint32_t kVersion = 1;
constexpr uint64_t kHeaderSize = 4096;
constexpr uint64_t kPageWords = 4096 / 8;
constexpr uint16_t kRecMerged = 1;

uint64_t bitmap_bytes(uint64_t chunks) { return (chunks + 63) / 64 * 8; }
uint64_t log_base_for(uint64_t chunks) { return kHeaderSize + (bitmap_bytes(chunks) + 4095) / 4096 * 4096; }


void put64(uint8_t* p, uint64_t v) {
  v = htole64(v);
  std::memcpy(p, &v, 8);
}
uint64_t get64(const uint8_t* p) {
  uint64_t v;
  std::memcpy(&v, p, 8);
  return le64toh(v);
}

}  // namespace

MergeJob::MergeJob(uint64_t snapshot_id, uint64_t volume_size, uint32_t chunk_size, std::unique_ptr<Bitmap> pending)
    : snapshot_id_(snapshot_id),
      volume_size_(volume_size),
      chunk_size_(chunk_size),
      pending_(std::move(pending)),
      log_base_(log_base_for(pending_->size())) {}

MergeJob::~MergeJob() {
  if (fd_ >= 0) ::close(fd_);
}

std::unique_ptr<MergeJob> MergeJob::create(const std::string& path, uint64_t snapshot_id, uint64_t volume_size,
                                           uint32_t chunk_size, std::unique_ptr<Bitmap> pending, std::string& err) {
  std::unique_ptr<MergeJob> j(new MergeJob(snapshot_id, volume_size, chunk_size, std::move(pending)));
  j->total_ = j->remaining_ = j->pending_->count();
  j->fd_ = ::open(path.c_str(), O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);  // private, as all of IMAGE.nbd/
  if (j->fd_ < 0) { err = errstr("create " + path, errno); return nullptr; }
  uint8_t h[kHeaderSize] = {};
  std::memcpy(h, kMagic, 8);
  uint32_t v = htole32(kVersion), cs = htole32(chunk_size);
  std::memcpy(h + 8, &v, 4);
  std::memcpy(h + 12, &cs, 4);
  put64(h + 16, volume_size);
  put64(h + 24, snapshot_id);
  put64(h + 32, j->total_);
  put64(h + 40, kHeaderSize);
  put64(h + 48, j->log_base_);
  uint32_t crc = htole32(crc32c(0, h, 56));
  std::memcpy(h + 56, &crc, 4);
  if (int e = pwrite_all(j->fd_, h, sizeof h, 0)) { err = errstr("write " + path, e); return nullptr; }
  if (ftruncate(j->fd_, static_cast<off_t>(j->log_base_)) != 0) { err = errstr("size " + path, errno); return nullptr; }
  // Only pages of the bitmap with a bit set are written: the rest is a hole.
  const Bitmap& b = *j->pending_;
  std::vector<uint64_t> page(kPageWords);
  for (uint64_t w0 = 0; w0 < b.words(); w0 += kPageWords) {
    uint64_t n = std::min<uint64_t>(kPageWords, b.words() - w0);
    bool any = false;
    for (uint64_t i = 0; i < n; ++i) {
      page[i] = htole64(b.word(w0 + i));
      any = any || page[i];
    }
    if (!any) continue;
    if (int e = pwrite_all(j->fd_, page.data(), n * 8, kHeaderSize + w0 * 8)) { err = errstr("write " + path, e); return nullptr; }
  }
  if (fdatasync(j->fd_) != 0) { err = errstr("sync " + path, errno); return nullptr; }
  j->log_end_ = j->log_base_;
  return j;
}

std::unique_ptr<MergeJob> MergeJob::open(const std::string& path, uint64_t volume_size, uint32_t chunk_size,
                                         std::string& err) {
  uint64_t chunks = (volume_size + chunk_size - 1) / chunk_size;
  std::unique_ptr<MergeJob> j(new MergeJob(0, volume_size, chunk_size, std::make_unique<Bitmap>(chunks)));
  j->fd_ = ::open(path.c_str(), O_RDWR | O_CLOEXEC);
  if (j->fd_ < 0) { err = errstr("open " + path, errno); return nullptr; }
  if (j->load(err) != 0) {
    err = path + ": " + err;
    return nullptr;
  }
  return j;
}

int MergeJob::load(std::string& err) {
  uint8_t h[kHeaderSize];
  size_t got = 0;
  if (int e = pread_all(fd_, h, sizeof h, 0, &got)) { err = strerror(e); return e; }
  if (got < 60 || std::memcmp(h, kMagic, 8) != 0) { err = "not a merge job file (bad magic)"; return EINVAL; }
  uint32_t v, cs, crc;
  std::memcpy(&v, h + 8, 4);
  std::memcpy(&cs, h + 12, 4);
  std::memcpy(&crc, h + 56, 4);
  if (le32toh(crc) != crc32c(0, h, 56)) { err = "header checksum mismatch (corrupt metadata)"; return EINVAL; }
  if (le32toh(v) != kVersion) { err = "unsupported merge job version " + std::to_string(le32toh(v)); return EINVAL; }
  if (le32toh(cs) != chunk_size_ || get64(h + 16) != volume_size_ || get64(h + 40) != kHeaderSize ||
      get64(h + 48) != log_base_) {
    err = "header does not match the volume (corrupt metadata)";
    return EINVAL;
  }
  snapshot_id_ = get64(h + 24);
  total_ = get64(h + 32);
  std::vector<uint64_t> words(pending_->words());
  if (int e = pread_all(fd_, words.data(), words.size() * 8, kHeaderSize)) { err = strerror(e); return e; }
  for (uint64_t i = 0; i < words.size(); ++i) pending_->or_word(i, le64toh(words[i]));
  if (pending_->count() != total_) { err = "pending bitmap does not match its count (corrupt metadata)"; return EINVAL; }
  uint64_t end = 0;
  int e = replay_records(
      fd_, log_base_,
      [&](uint16_t type, std::vector<uint8_t>& p, uint64_t) {
        if (type != kRecMerged) return 0;
        if (p.size() % 16) { err = "MERGED record of odd length (corrupt metadata)"; return EINVAL; }
        for (size_t i = 0; i < p.size(); i += 16) {
          uint64_t first = get64(p.data() + i), n = get64(p.data() + i + 8);
          if (first > pending_->size() || n > pending_->size() - first) { err = "merged range beyond the volume (corrupt metadata)"; return EINVAL; }
          for (uint64_t c = first; c < first + n; ++c) pending_->clear(c);
        }
        return 0;
      },
      end, err);
  if (e) return e;
  if (ftruncate(fd_, static_cast<off_t>(end)) != 0) { err = strerror(errno); return errno; }
  log_end_ = end;
  remaining_ = pending_->count();
  return 0;
}

uint64_t MergeJob::remaining() const {
  std::lock_guard<std::mutex> lk(mu_);
  return remaining_;
}

uint64_t MergeJob::next_pending(uint64_t c) const {
  const uint64_t n = pending_->size();
  while (c < n) {
    uint64_t w = pending_->word(c >> 6) >> (c & 63);
    if (w) return std::min(n, c + static_cast<uint64_t>(__builtin_ctzll(w)));
    c = (c | 63) + 1;
  }
  return n;
}

int MergeJob::commit(const std::vector<uint64_t>& chunks) {
  if (chunks.empty()) return 0;
  io_waited = true;
  std::vector<uint8_t> payload;
  for (size_t i = 0; i < chunks.size();) {
    size_t e = i + 1;
    while (e < chunks.size() && chunks[e] == chunks[e - 1] + 1) ++e;
    uint8_t pair[16];
    put64(pair, chunks[i]);
    put64(pair + 8, e - i);
    payload.insert(payload.end(), pair, pair + 16);
    i = e;
  }
  std::lock_guard<std::mutex> lk(mu_);
  const uint64_t start = log_end_;
  int r = append_record(fd_, log_end_, kRecMerged, payload.data(), static_cast<uint32_t>(payload.size()));
  if (!r && fdatasync(fd_) != 0) r = errno;
  if (r) {
    log_end_ = start;
    return r;
  }
  for (uint64_t c : chunks)
    if (pending_->test(c)) {
      pending_->clear(c);
      --remaining_;
    }
  return 0;
}

}  // namespace nbd
