// binding.cc — module entry point: registers NativeServer and the plain
// functions (detachDevice, lockFile, unlockFile, peerCredentials, and the
// journal's: see journal_functions.cc).
#include <napi.h>
#include <sys/socket.h>

#include <cerrno>
#include <cstring>

#include "../core/file_lock.hh"
#include "../core/kernel_device.hh"
#include "errors.hh"
#include "journal_functions.hh"
#include "server_wrap.hh"

namespace {

// lockFile(path, kind: 'lock-file' | 'existing') -> fd. The fd holds the lock
// until unlockFile(); errors carry code LOCK_FAILED and the errno
// (EWOULDBLOCK: held by someone else). See native/core/file_lock.hh.
Napi::Value LockFile(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() < 2 || !info[0].IsString() || !info[1].IsString())
    throw Napi::TypeError::New(env, "lockFile(path, kind) needs two strings");
  std::string kind = info[1].As<Napi::String>().Utf8Value();
  if (kind != "lock-file" && kind != "existing") throw Napi::TypeError::New(env, "kind must be 'lock-file' or 'existing'");
  int fd = -1;
  std::string what;
  int e = nbd::lock_file(info[0].As<Napi::String>().Utf8Value(),
                         kind == "lock-file" ? nbd::LockKind::lock_file : nbd::LockKind::existing, &fd, what);
  if (e) throw nbd::binding::coded_error(env, "LOCK_FAILED", what, e);
  return Napi::Number::New(env, fd);
}

// unlockFile(fd, unlinkPath?): unlinks unlinkPath if it still names the
// locked file, then closes fd. Errors of the unlink are thrown after the
// close (the lock is released either way).
Napi::Value UnlockFile(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() < 1 || !info[0].IsNumber()) throw Napi::TypeError::New(env, "unlockFile(fd, unlinkPath?) needs a descriptor");
  int fd = info[0].As<Napi::Number>().Int32Value();
  if (fd < 0) throw Napi::RangeError::New(env, "bad descriptor");
  std::string unlink_path;
  if (info.Length() > 1 && !info[1].IsUndefined()) {
    if (!info[1].IsString()) throw Napi::TypeError::New(env, "unlinkPath must be a string");
    unlink_path = info[1].As<Napi::String>().Utf8Value();
  }
  int e = nbd::unlock_file(fd, unlink_path);
  if (e) throw nbd::binding::coded_error(env, "LOCK_FAILED", "unlink " + unlink_path + ": " + strerror(e), e);
  return env.Undefined();
}

// peerCredentials(fd) -> {pid, uid, gid}: SO_PEERCRED of a connected unix
// socket, i.e. who the peer was when it connected (the kernel records it;
// the peer cannot forge it). Node has no API for it; the control socket
// (src/control.ts) uses it to serve only its own user and root. Errors carry
// code CONTROL_FAILED and the errno.
Napi::Value PeerCredentials(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() < 1 || !info[0].IsNumber()) throw Napi::TypeError::New(env, "peerCredentials(fd) needs a descriptor");
  int fd = info[0].As<Napi::Number>().Int32Value();
  if (fd < 0) throw Napi::RangeError::New(env, "bad descriptor");
  struct ucred cred{};
  socklen_t len = sizeof cred;
  if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) != 0 || len != sizeof cred) {
    int e = errno ? errno : EINVAL;
    throw nbd::binding::coded_error(env, "CONTROL_FAILED", std::string("SO_PEERCRED: ") + strerror(e), e);
  }
  Napi::Object o = Napi::Object::New(env);
  o.Set("pid", Napi::Number::New(env, cred.pid));
  o.Set("uid", Napi::Number::New(env, cred.uid));
  o.Set("gid", Napi::Number::New(env, cred.gid));
  return o;
}

Napi::Object Init(Napi::Env env, Napi::Object exports) {
  exports.Set("NativeServer", nbd::binding::ServerWrap::Init(env));
  exports.Set("abiVersion", Napi::Number::New(env, 1));
  exports.Set("detachDevice", Napi::Function::New(env, [](const Napi::CallbackInfo& info) -> Napi::Value {
    if (info.Length() < 1 || !info[0].IsString()) throw Napi::TypeError::New(info.Env(), "device path required");
    std::string what;
    int e = nbd::detach_kernel_device(info[0].As<Napi::String>().Utf8Value(), what);
    if (e) throw nbd::binding::coded_error(info.Env(), "DETACH_FAILED", what, e);
    return info.Env().Undefined();
  }));
  nbd::binding::register_journal_functions(env, exports);
  exports.Set("lockFile", Napi::Function::New(env, LockFile));
  exports.Set("unlockFile", Napi::Function::New(env, UnlockFile));
  exports.Set("peerCredentials", Napi::Function::New(env, PeerCredentials));
  return exports;
}
}  // namespace

NODE_API_MODULE(nbd_native, Init)
