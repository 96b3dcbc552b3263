// errors.hh — JavaScript errors with stable `code` properties.
#pragma once

#include <napi.h>

#include <string>

namespace nbd::binding {

inline Napi::Error coded_error(Napi::Env env, const char* code, const std::string& message, int err = 0) {
  Napi::Error e = Napi::Error::New(env, message);
  e.Set("code", Napi::String::New(env, code));
  if (err) e.Set("errno", Napi::Number::New(env, err));
  return e;
}

}  // namespace nbd::binding
