// task.hh — helpers shared by the binding's method files: a promise-returning
// AsyncWorker for blocking native work, and argument checks.
#pragma once

#include <napi.h>

#include <cstdint>
#include <functional>
#include <string>

#include "errors.hh"

namespace nbd::binding {

inline uint64_t id_of(const Napi::Value& v) {
  if (!v.IsNumber()) throw Napi::TypeError::New(v.Env(), "snapshot id must be a number");
  double d = v.As<Napi::Number>().DoubleValue();
  if (d < 1 || d > 9007199254740991.0 || d != static_cast<double>(static_cast<uint64_t>(d)))
    throw Napi::RangeError::New(v.Env(), "snapshot id must be a positive integer");
  return static_cast<uint64_t>(d);
}

// Runs `fn` on a libuv worker (inputs must be copied into the lambda first); resolves with `result(env)` or rejects with a coded error.
class Task : public Napi::AsyncWorker {
 public:
  Task(Napi::Env env, std::function<int(std::string&)> fn, std::function<Napi::Value(Napi::Env)> result, const char* code)
      : Task(env, [fn = std::move(fn)](std::string& what, const char*&) { return fn(what); }, std::move(result), code) {}
  // `fn` may replace the error code (a string literal) for the failure it reports.
  Task(Napi::Env env, std::function<int(std::string&, const char*&)> fn, std::function<Napi::Value(Napi::Env)> result,
       const char* code)
      : Napi::AsyncWorker(env), fn_(std::move(fn)), result_(std::move(result)), code_(code),
        deferred_(Napi::Promise::Deferred::New(env)) {}
  void Execute() override { err_ = fn_(what_, code_); }
  void OnOK() override {
    if (err_) deferred_.Reject(coded_error(Env(), code_, what_, err_).Value());
    else deferred_.Resolve(result_ ? result_(Env()) : Env().Undefined());
  }
  Napi::Promise Promise() { return deferred_.Promise(); }

 private:
  std::function<int(std::string&, const char*&)> fn_;
  std::function<Napi::Value(Napi::Env)> result_;
  const char* code_;
  int err_ = 0;
  std::string what_;
  Napi::Promise::Deferred deferred_;
};

// Queues `t` and returns its promise.
inline Napi::Value queue(Task* t) {
  auto p = t->Promise();
  t->Queue();
  return p;
}

}  // namespace nbd::binding
