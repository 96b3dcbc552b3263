// crash_point.hh — a test hook: die on the spot at a named point of a
// crash-sensitive sequence (journal appends and checkpoints, the first-write
// thread, replay at open, journal creation and retirement, snapshot create and
// delete), so a test can crash the server at every structurally distinct
// point instead of at random moments (test/journal-crash-points.ts; the
// points are listed in docs/architecture.md, "Crash invariants").
//
// NBD_TEST_CRASH_AT=NAME or NAME:N arms the point NAME; its N-th hit (default
// the first) writes one line "crash-point NAME[:N]" to stderr and raises
// SIGKILL: nothing is flushed, unmapped or cleaned up, exactly like kill -9
// (the page cache and memory-backed files survive, as they do then). The
// environment is read once, when the addon is loaded; unset, a point costs
// one predictable branch on a constant. The TypeScript control plane has the
// same hook (src/crash-point.ts) for its steps.
//
// Points named relative to a scope (scoped_crash_point) are prefixed with the
// calling thread's CrashScope, so one code path shared by two callers (the
// batch apply, used by the first-write thread and by replay at open) has a
// separate name under each: "queue.apply.half", "replay.apply.half".
//
// No N-API, no allocation unless armed. Hits are counted per process with an
// atomic counter, so the N-th hit is exactly one thread's.
#pragma once

#include <signal.h>
#include <unistd.h>

#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>

namespace nbd {

namespace crash_detail {

// Read once at load: the only cost of a point when unset is testing this.
inline const bool armed = std::getenv("NBD_TEST_CRASH_AT") != nullptr;
inline thread_local const char* scope = nullptr;

struct Target {
  std::string spec;  // as given: NAME or NAME:N
  std::string name;
  uint64_t nth = 1;
  std::atomic<uint64_t> hits{0};
  Target() {
    const char* v = std::getenv("NBD_TEST_CRASH_AT");
    spec = v ? v : "";
    name = spec;
    auto colon = spec.rfind(':');
    if (colon != std::string::npos) {
      name = spec.substr(0, colon);
      nth = std::strtoull(spec.c_str() + colon + 1, nullptr, 10);
    }
  }
};

inline Target& target() {
  static Target t;
  return t;
}

// True when this hit of `name` is the armed one.
[[gnu::noinline, gnu::cold]] inline bool due(const std::string& name) {
  Target& t = target();
  return name == t.name && t.hits.fetch_add(1) + 1 == t.nth;
}

[[noreturn, gnu::noinline, gnu::cold]] inline void die() {
  const std::string line = "crash-point " + target().spec + "\n";
  ssize_t r = ::write(2, line.data(), line.size());
  (void)r;
  ::raise(SIGKILL);
  for (;;) ::pause();
}

}  // namespace crash_detail

inline bool crash_armed() { return __builtin_expect(crash_detail::armed, false); }

// Dies here if NBD_TEST_CRASH_AT names this point (and this is its N-th hit).
inline void crash_point(const char* name) {
  if (crash_armed() && crash_detail::due(name)) crash_detail::die();
}

// The same, named "<scope>.<name>" with the calling thread's CrashScope.
inline void scoped_crash_point(const char* name) {
  if (crash_armed() &&
      crash_detail::due(crash_detail::scope ? std::string(crash_detail::scope) + "." + name : std::string(name)))
    crash_detail::die();
}

// A torn write: when armed, writes only the first `part` bytes of buf at
// `off` (as a crash in the middle of the write would leave them), then dies.
inline void crash_point_torn(const char* name, int fd, const void* buf, size_t part, uint64_t off) {
  if (!crash_armed() || !crash_detail::due(name)) return;
  ssize_t r = ::pwrite(fd, buf, part, static_cast<off_t>(off));
  (void)r;
  crash_detail::die();
}

// Names the scoped points this thread hits while it lives (restores the outer one).
class CrashScope {
 public:
  explicit CrashScope(const char* s) : prev_(crash_detail::scope) { crash_detail::scope = s; }
  ~CrashScope() { crash_detail::scope = prev_; }
  CrashScope(const CrashScope&) = delete;
  CrashScope& operator=(const CrashScope&) = delete;

 private:
  const char* prev_;
};

}  // namespace nbd
