// write_journal.hh — the on-disk ring of first writes that are acknowledged
// before their chunks' old data is preserved (see first_write_queue.hh).
//
// File JOURNAL_DIR/<id>.journal, format 2 (little-endian). Which journal a
// volume has pending is recorded in IMAGE.nbd/journal.state
// (journal_state.hh); a journal whose id is not the one recorded there is
// never replayed.
//   0, 2048   two superblock slots, 512 bytes each; the valid one with the
//             higher generation wins, so a torn superblock write falls back
//             to the previous checkpoint:
//               0  magic "NBDJRNL1"     8  version (2)    12 chunk size
//               16 volume size          24 ring size     32 generation
//               40 replay_seq: sequence number of the oldest entry that may
//                  still have to be applied to the live image
//               48 replay_off: where that entry starts
//               56 epoch: random, new whenever the ring restarts empty
//               64 the journal's id (16 bytes; journal_state.hh)
//               80 CRC-32C of bytes 0..79
//   1024      owner record, written once at creation: "NBDJOWNR", u32 length,
//             the owning image's path, CRC-32C of the preceding bytes (so a
//             journal left behind can be traced to its volume).
//   4096      the ring of entries, ring size bytes (sparse until written). An entry:
//               0 u32 magic 0x544e454a ("JENT")   4 u16 type   6 u16 flags
//               8 u64 seq      16 u64 volume offset      24 u32 length
//               28 u32 data length   32 u32 CRC-32C, seeded with the epoch,
//               of bytes 0..31 and the data;  36 u32 zero; then the data,
//               padded to 8 bytes.
//             Types: 1 WRITE (data = the bytes written), 2 ZERO (no data;
//             flag 1: may punch a hole), 3 WRAP (the next entry is at the
//             start of the ring). Fewer than 40 bytes left before the end of
//             the ring also mean "continue at the start"; so does a position
//             exactly at the end of the ring (an entry that ended there).
//
// Replay starts at replay_off expecting replay_seq and follows consecutive
// sequence numbers; the first entry that is torn, fails its CRC or carries
// another number (a stale entry from an earlier lap) ends it. Sequence
// numbers only grow within an epoch; after a crash the next ones may repeat
// numbers of lost entries, so replaying starts a new epoch (reset()), whose
// seed no stale entry's CRC matches. Entries are
// appended one at a time under the caller's lock, so after a crash of the
// process every entry before the last complete one is complete too.
//
// Appends are memcpy into a shared mapping of the file (its page cache, so
// they survive the process; no system call per entry). The ring is allocated
// when the journal is created, so a full filesystem cannot fault an append.
// Appends are not synced (the journal only has to outlive the process;
// FLUSH and FUA are made durable through the live image); checkpoint()
// writes and syncs a superblock.
#pragma once

#include <array>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

namespace nbd {

struct JournalRecord {
  uint16_t type = 0;
  uint16_t flags = 0;
  uint64_t seq = 0;
  uint64_t offset = 0;
  uint32_t length = 0;
  std::vector<uint8_t> data;
};

class WriteJournal {
 public:
  static constexpr uint16_t kWrite = 1;
  static constexpr uint16_t kZero = 2;
  static constexpr uint16_t kWrap = 3;
  static constexpr uint16_t kFlagMayTrim = 1;
  static constexpr uint64_t kRingBase = 4096;
  static constexpr uint32_t kEntryHeader = 40;

  static constexpr size_t kIdSize = 16;
  using Id = std::array<uint8_t, kIdSize>;

  // Opens an existing journal, which must carry `id`. Returns null and sets
  // `code`: ENOENT (no such file), ESTALE (another journal: its id differs),
  // EINVAL (damaged or impossible metadata), or another errno; err says why.
  static std::unique_ptr<WriteJournal> open(const std::string& path, const Id& id, uint64_t volume_size,
                                            uint32_t chunk_size, int& code, std::string& err);
  // Creates and preallocates a new, empty journal (replacing any file at
  // path), its superblock and owner record synced.
  static std::unique_ptr<WriteJournal> create(const std::string& path, const Id& id, const std::string& owner,
                                              uint64_t volume_size, uint32_t chunk_size, uint64_t ring_size,
                                              std::string& err);
  // What a journal file says about itself, for listing journals that
  // belong to no volume: its id (all zero when no superblock is valid: then
  // it never held an entry) and owner ("" if unknown); false if it is not a
  // journal of this build.
  static bool inspect(const std::string& path, Id& id, std::string& owner);
  ~WriteJournal();

  // Entries to replay, oldest first (see the header note). Sets next_seq().
  int read_pending(std::vector<JournalRecord>& out, std::string& err);

  uint64_t ring_size() const { return ring_size_; }
  // Bytes an entry of `data_len` takes at the current head, including any
  // skipped tail of the ring before it.
  uint64_t span_of(uint32_t data_len) const;
  // Appends an entry numbered next_seq() at the head (caller serialises);
  // sets `at` to where it starts.
  int append(uint16_t type, uint16_t flags, uint64_t offset, uint32_t length, const uint8_t* data, uint32_t dlen,
             uint64_t& at);
  uint64_t next_seq() const { return next_seq_; }
  // The data of the entry that starts at `at` (in the mapping; valid while
  // the entry's ring space is not reused).
  const uint8_t* data_at(uint64_t at) const { return map_ + at + kEntryHeader; }
  // Durably records that replay must start at entry `seq` found at `off`.
  int checkpoint(uint64_t seq, uint64_t off);
  // Empties the journal (everything applied): the next entry starts the
  // ring, in a new epoch. Also done by the first append after open(), so an
  // open that writes nothing leaves the file as it was.
  int reset();
  uint64_t head() const { return head_; }
  const std::string& path() const { return path_; }
  // Keeps `h` (a memory reservation) until the journal is closed.
  void hold(std::shared_ptr<void> h) { hold_ = std::move(h); }

 private:
  WriteJournal(uint64_t volume_size, uint32_t chunk_size, uint64_t ring_size);
  int write_super(std::string* err);
  uint64_t ring_end() const { return kRingBase + ring_size_; }
  uint32_t epoch_seed() const;
  int map(std::string& err);
  int load_super(int& code, std::string& err);

  Id id_{};
  std::shared_ptr<void> hold_;
  std::string path_;
  const uint64_t volume_size_;
  const uint32_t chunk_size_;
  uint64_t ring_size_;
  int fd_ = -1;
  uint8_t* map_ = nullptr;  // the file up to the end of the ring, MAP_SHARED
  bool new_epoch_due_ = false;  // opened from disk: reset() before appending
  uint64_t gen_ = 0;
  uint64_t epoch_ = 0;
  uint64_t replay_seq_ = 1;
  uint64_t replay_off_ = kRingBase;
  uint64_t next_seq_ = 1;
  uint64_t head_ = kRingBase;
};

}  // namespace nbd
