// journal_state.hh — which first-write journal a volume has pending.
//
// A volume's first-write journal (write_journal.hh) lives outside the volume
// (by default in memory-backed /dev/shm), so the volume's own metadata
// records which journal may hold acknowledged writes: IMAGE.nbd/journal.state.
// The journal is named by a random id kept there, never by anything that can
// change between runs (a directory setting, a file time).
//
// File format (text, one "key=value" per line, replaced atomically: temp file,
// fsync, rename, fsync of the directory):
//   node-nbd-server journal state 1
//   id=<32 hex digits>          the journal's id (also in its superblock)
//   path=<absolute path>        where the journal file is
//   boot=<kernel boot id>       /proc/sys/kernel/random/boot_id at creation
//   volatile=0|1                the journal's filesystem is memory-backed
//   created=<unix ms>
//   crc=<CRC-32C of every byte before this line, 8 hex digits>
//
// Rules (crash invariants in docs/architecture.md, "First writes"):
//   - the journal file is complete and synced before the state names it, so
//     a crash in between leaves an unnamed journal that held nothing;
//   - entries are appended only while the state names the journal;
//   - at a clean stop, the state goes (removed, directory synced) before the
//     journal file, so a crash in between leaves an unnamed, drained journal;
//   - at open, a journal the state names is replayed from where the state
//     says, whatever the journal directory setting is now; one that cannot be
//     found is an error unless it was memory-backed and the machine has
//     rebooted since (then it was lost with the page cache, like any write
//     not yet flushed); a journal whose id differs is never replayed.
#pragma once

#include <cstdint>
#include <optional>
#include <string>

#include "write_journal.hh"

namespace nbd {

struct JournalState {
  WriteJournal::Id id{};
  std::string path;
  std::string boot;
  bool is_volatile = false;
  uint64_t created_ms = 0;
};

// Reads the state file: 0 with `out` empty if there is none; EINVAL with
// err if it is damaged; another errno if it cannot be read.
int load_journal_state(const std::string& file, std::optional<JournalState>& out, std::string& err);
// Writes it atomically and durably. Returns 0 or an errno (err says what).
int save_journal_state(const std::string& file, const JournalState& s, std::string& err);
// Removes it durably (no journal pending). Returns 0 or an errno.
int clear_journal_state(const std::string& file, std::string& err);

std::string current_boot_id();
bool memory_backed(const std::string& dir);
WriteJournal::Id new_journal_id();
std::string id_hex(const WriteJournal::Id& id);

}  // namespace nbd
