// rollback_methods.cc — NativeServer methods for rollback merges.
//
// The control plane (TypeScript) owns the manifest, the job file's path,
// history and policies; these methods drive the volume's rollback (Volume, rollback_device.hh):
//   prepareRollback(export, snapshotId, jobPath)  writes the job file, pauses
//                                                 writes (async)
//   activateRollback(export) / abortRollback(export)  resume writes, with or
//                                                 without the rollback
//   mergeStep(export, from, max) -> {next, chunks, total, remaining}  (async)
//   finishRollback(export)                        drops a finished job (async)
//   mergeStatus(export) -> {snapshotId, total, remaining} | null
//   setDisconnectHold(export, on)  arms the admission hold for the
//                                  on-disconnect auto-rollback (export_table.hh)
//   releaseHold(export)            lets held sessions start
#include <napi.h>

#include <cerrno>

#include "../core/volume.hh"
#include "server_wrap.hh"
#include "task.hh"

namespace nbd::binding {

namespace {

Napi::Value status_of(Napi::Env env, const std::shared_ptr<nbd::MergeJob>& job) {
  if (!job) return env.Null();
  Napi::Object o = Napi::Object::New(env);
  o.Set("snapshotId", Napi::Number::New(env, static_cast<double>(job->snapshot_id())));
  o.Set("total", Napi::Number::New(env, static_cast<double>(job->total())));
  o.Set("remaining", Napi::Number::New(env, static_cast<double>(job->remaining())));
  o.Set("chunks", Napi::Number::New(env, static_cast<double>(job->chunks())));
  return o;
}

}  // namespace

Napi::Value ServerWrap::PrepareRollback(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  auto vol = volume(env, info[0]);
  uint64_t id = id_of(info[1]);
  if (info.Length() < 3 || !info[2].IsString()) throw Napi::TypeError::New(env, "job file path required");
  std::string path = info[2].As<Napi::String>().Utf8Value();
  return queue(new Task(
      env,
      [vol, id, path](std::string& what, const char*& code) {
        int e = vol->prepare_rollback(id, path, what);
        if (e && vol->queued_writes() > 0) code = "QUEUE_STALLED";
        return e;
      },
      nullptr,
      "ROLLBACK_FAILED"));
}

Napi::Value ServerWrap::ActivateRollback(const Napi::CallbackInfo& info) {
  volume(info.Env(), info[0])->activate_rollback();
  return info.Env().Undefined();
}

Napi::Value ServerWrap::AbortRollback(const Napi::CallbackInfo& info) {
  volume(info.Env(), info[0])->abort_rollback();
  return info.Env().Undefined();
}

Napi::Value ServerWrap::MergeStep(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  auto vol = volume(env, info[0]);
  uint64_t from = static_cast<uint64_t>(info[1].ToNumber().DoubleValue());
  uint64_t max = static_cast<uint64_t>(info[2].ToNumber().DoubleValue());
  auto next = std::make_shared<uint64_t>(0);
  return queue(new Task(
      env, [vol, from, max, next](std::string& what) { return vol->merge_step(from, max ? max : 1, *next, what); },
      [vol, next](Napi::Env e) {
        Napi::Value st = status_of(e, vol->merge_job());
        Napi::Object r = st.IsNull() ? Napi::Object::New(e) : st.As<Napi::Object>();
        r.Set("next", Napi::Number::New(e, static_cast<double>(*next)));
        return r;
      },
      "MERGE_FAILED"));
}

Napi::Value ServerWrap::FinishRollback(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  auto vol = volume(env, info[0]);
  return queue(new Task(env, [vol](std::string& what) { return vol->finish_rollback(what); }, nullptr, "MERGE_FAILED"));
}

Napi::Value ServerWrap::SetDisconnectHold(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!info[0].IsString()) throw Napi::TypeError::New(env, "export name must be a string");
  auto e = server_->exports().find(info[0].As<Napi::String>().Utf8Value());
  if (!e || info[0].As<Napi::String>().Utf8Value().empty()) throw coded_error(env, "EXPORT_NOT_FOUND", "no such export");
  e->admission.arm(info[1].ToBoolean().Value());
  return env.Undefined();
}

Napi::Value ServerWrap::ReleaseHold(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!info[0].IsString()) throw Napi::TypeError::New(env, "export name must be a string");
  auto e = server_->exports().find(info[0].As<Napi::String>().Utf8Value());
  if (e) e->admission.release();
  return env.Undefined();
}

Napi::Value ServerWrap::MergeStatus(const Napi::CallbackInfo& info) {
  return status_of(info.Env(), volume(info.Env(), info[0])->merge_job());
}

}  // namespace nbd::binding
