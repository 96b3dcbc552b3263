// journal_state.cc — see journal_state.hh for the format and its rules.
#include "journal_state.hh"

#include <fcntl.h>
#include <linux/magic.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <random>
#include <sstream>

#include "crc32c.hh"
#include "errors.hh"
#include "file_io.hh"

namespace nbd {

namespace {

constexpr const char* kHeader = "node-nbd-server journal state 1\n";

std::string dir_of(const std::string& file) {
  auto slash = file.rfind('/');
  return slash == std::string::npos ? "." : (slash == 0 ? "/" : file.substr(0, slash));
}

int sync_dir(const std::string& dir) {
  int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) return errno;
  int e = fsync(fd) == 0 ? 0 : errno;
  ::close(fd);
  return e;
}

bool parse_hex_id(const std::string& s, WriteJournal::Id& id) {
  if (s.size() != 2 * id.size()) return false;
  for (size_t i = 0; i < id.size(); ++i) {
    unsigned v = 0;
    for (int k = 0; k < 2; ++k) {
      char c = s[2 * i + k];
      v <<= 4;
      if (c >= '0' && c <= '9') v |= c - '0';
      else if (c >= 'a' && c <= 'f') v |= c - 'a' + 10;
      else return false;
    }
    id[i] = static_cast<uint8_t>(v);
  }
  return true;
}

}  // namespace

std::string id_hex(const WriteJournal::Id& id) {
  static const char* digits = "0123456789abcdef";
  std::string s;
  for (uint8_t b : id) {
    s += digits[b >> 4];
    s += digits[b & 15];
  }
  return s;
}

WriteJournal::Id new_journal_id() {
  std::random_device rd;
  WriteJournal::Id id{};
  for (size_t i = 0; i < id.size(); i += 4) {
    uint32_t v = rd();
    for (size_t k = 0; k < 4; ++k) id[i + k] = static_cast<uint8_t>(v >> (8 * k));
  }
  return id;
}

std::string current_boot_id() {
  std::ifstream f("/proc/sys/kernel/random/boot_id");
  std::string s;
  std::getline(f, s);
  return s;
}

bool memory_backed(const std::string& dir) {
  struct statfs sf;
  if (statfs(dir.c_str(), &sf) != 0) return false;
  return sf.f_type == TMPFS_MAGIC || sf.f_type == RAMFS_MAGIC;
}

int load_journal_state(const std::string& file, std::optional<JournalState>& out, std::string& err) {
  out.reset();
  int fd = ::open(file.c_str(), O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
  if (fd < 0) {
    if (errno == ENOENT) return 0;
    int e = errno;
    err = errstr("open " + file, e);
    return e;
  }
  std::string text;
  char buf[4096];
  for (;;) {
    ssize_t r = ::read(fd, buf, sizeof buf);
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0 || text.size() > 65536) break;
    text.append(buf, static_cast<size_t>(r));
  }
  ::close(fd);
  auto bad = [&](const std::string& why) {
    err = file + ": " + why;
    return EINVAL;
  };
  const size_t crc_at = text.rfind("crc=");
  if (text.compare(0, std::string(kHeader).size(), kHeader) != 0 || crc_at == std::string::npos ||
      (crc_at > 0 && text[crc_at - 1] != '\n'))
    return bad("not a journal state file, or torn");
  uint32_t want = crc32c(0, reinterpret_cast<const uint8_t*>(text.data()), crc_at);
  char crc_text[16];
  std::snprintf(crc_text, sizeof crc_text, "%08x", want);
  if (text.compare(crc_at + 4, 8, crc_text) != 0) return bad("fails its checksum");
  JournalState s;
  bool have_id = false;
  std::istringstream in(text.substr(std::string(kHeader).size(), crc_at - std::string(kHeader).size()));
  std::string line;
  while (std::getline(in, line)) {
    auto eq = line.find('=');
    if (eq == std::string::npos) return bad("malformed line");
    std::string k = line.substr(0, eq), v = line.substr(eq + 1);
    if (k == "id") have_id = parse_hex_id(v, s.id);
    else if (k == "path") s.path = v;
    else if (k == "boot") s.boot = v;
    else if (k == "volatile") s.is_volatile = v == "1";
    else if (k == "created") s.created_ms = std::strtoull(v.c_str(), nullptr, 10);
  }
  if (!have_id || s.path.empty() || s.path[0] != '/') return bad("names no journal id or path");
  out = std::move(s);
  return 0;
}

int save_journal_state(const std::string& file, const JournalState& s, std::string& err) {
  std::string text = kHeader;
  text += "id=" + id_hex(s.id) + "\n";
  text += "path=" + s.path + "\n";
  text += "boot=" + s.boot + "\n";
  text += std::string("volatile=") + (s.is_volatile ? "1" : "0") + "\n";
  text += "created=" + std::to_string(s.created_ms) + "\n";
  char crc[24];
  std::snprintf(crc, sizeof crc, "crc=%08x\n", crc32c(0, reinterpret_cast<const uint8_t*>(text.data()), text.size()));
  text += crc;
  const std::string tmp = file + ".tmp";
  ::unlink(tmp.c_str());
  int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW, 0600);
  if (fd < 0) {
    int e = errno;
    err = errstr("create " + tmp, e);
    return e;
  }
  int e = pwrite_all(fd, text.data(), text.size(), 0);
  if (!e && fsync(fd) != 0) e = errno;
  ::close(fd);
  if (!e && ::rename(tmp.c_str(), file.c_str()) != 0) e = errno;
  if (!e) e = sync_dir(dir_of(file));
  if (e) {
    ::unlink(tmp.c_str());
    err = errstr("write " + file, e);
  }
  return e;
}

int clear_journal_state(const std::string& file, std::string& err) {
  if (::unlink(file.c_str()) != 0) {
    if (errno == ENOENT) return 0;
    int e = errno;
    err = errstr("remove " + file, e);
    return e;
  }
  int e = sync_dir(dir_of(file));
  if (e) err = errstr("sync the directory of " + file, e);
  return e;
}

}  // namespace nbd
