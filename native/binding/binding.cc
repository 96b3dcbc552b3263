// binding.cc — module entry point: registers NativeServer and the module functions.
#include <napi.h>

#include "../core/kernel_device.hh"
#include "errors.hh"
#include "journal_functions.hh"
#include "server_wrap.hh"

namespace {
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
  return exports;
}
}  // namespace

NODE_API_MODULE(nbd_native, Init)
