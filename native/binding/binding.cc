// binding.cc — module entry point: registers NativeServer.
#include <napi.h>

#include "server_wrap.hh"

namespace {
Napi::Object Init(Napi::Env env, Napi::Object exports) {
  exports.Set("NativeServer", nbd::binding::ServerWrap::Init(env));
  exports.Set("abiVersion", Napi::Number::New(env, 1));
  return exports;
}
}  // namespace

NODE_API_MODULE(nbd_native, Init)
