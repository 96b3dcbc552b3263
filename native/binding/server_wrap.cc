// server_wrap.cc — argument checks and marshalling for NativeServer.
//
// Every method runs on the JS main thread. The only blocking operation,
// stop(), runs on a libuv worker (StopWorker) and resolves a promise. The
// wrapped nbd::Server is shared with that worker and with the env cleanup
// hook, so whichever finishes last frees it; nbd::Server::stop() is
// idempotent.
#include "server_wrap.hh"

#include "../core/file_device.hh"
#include "errors.hh"

#include <thread>

namespace nbd::binding {

namespace {

uint32_t opt_u32(const Napi::Object& o, const char* key, uint32_t def, uint32_t min, uint32_t max) {
  if (!o.Has(key) || o.Get(key).IsUndefined()) return def;
  Napi::Value v = o.Get(key);
  if (!v.IsNumber()) throw Napi::TypeError::New(o.Env(), std::string(key) + " must be a number");
  double d = v.As<Napi::Number>().DoubleValue();
  if (d < min || d > max || d != static_cast<double>(static_cast<uint32_t>(d)))
    throw Napi::RangeError::New(o.Env(), std::string(key) + " must be an integer from " + std::to_string(min) +
                                             " to " + std::to_string(max));
  return static_cast<uint32_t>(d);
}

std::string req_string(const Napi::Object& o, const char* key) {
  Napi::Value v = o.Get(key);
  if (!v.IsString()) throw Napi::TypeError::New(o.Env(), std::string(key) + " must be a string");
  return v.As<Napi::String>().Utf8Value();
}

// State of one stop() call, created and destroyed on the main thread.
struct StopCall {
  Napi::Promise::Deferred deferred;
  Napi::ObjectReference keep;  // keeps the ServerWrap alive while stop() runs
  ServerWrap* wrap;
  std::shared_ptr<EventBridge> events;
  std::vector<std::pair<std::string, int>> errors;  // set by the stop thread before the call
};

}  // namespace

Napi::Function ServerWrap::Init(Napi::Env env) {
  return DefineClass(env, "NativeServer",
                     {
                         InstanceMethod<&ServerWrap::AddExport>("addExport"),
                         InstanceMethod<&ServerWrap::RemoveExport>("removeExport"),
                         InstanceMethod<&ServerWrap::SetDefaultExport>("setDefaultExport"),
                         InstanceMethod<&ServerWrap::ListenTcp>("listenTcp"),
                         InstanceMethod<&ServerWrap::ListenUnix>("listenUnix"),
                         InstanceMethod<&ServerWrap::Start>("start"),
                         InstanceMethod<&ServerWrap::Stop>("stop"),
                         InstanceMethod<&ServerWrap::Stats>("stats"),
                         InstanceMethod<&ServerWrap::AttachDevice>("attachDevice"),
                         InstanceMethod<&ServerWrap::DisconnectDevice>("disconnectDevice"),
                         InstanceMethod<&ServerWrap::ReleaseDevice>("releaseDevice"),
                         InstanceMethod<&ServerWrap::PrepareSnapshot>("prepareSnapshot"),
                         InstanceMethod<&ServerWrap::BeginSnapshot>("beginSnapshot"),
                         InstanceMethod<&ServerWrap::AddSnapshot>("addSnapshot"),
                         InstanceMethod<&ServerWrap::DiscardSnapshot>("discardSnapshot"),
                         InstanceMethod<&ServerWrap::ResumeWrites>("resumeWrites"),
                         InstanceMethod<&ServerWrap::RemoveSnapshot>("removeSnapshot"),
                         InstanceMethod<&ServerWrap::DropSnapshot>("dropSnapshot"),
                         InstanceMethod<&ServerWrap::HandDown>("handDown"),
                         InstanceMethod<&ServerWrap::SnapshotStatus>("snapshotStatus"),
                         InstanceMethod<&ServerWrap::Settle>("settle"),
                         InstanceMethod<&ServerWrap::FirstWrites>("firstWrites"),
                         InstanceMethod<&ServerWrap::AddSnapshotExport>("addSnapshotExport"),
                         InstanceMethod<&ServerWrap::PrepareRollback>("prepareRollback"),
                         InstanceMethod<&ServerWrap::ActivateRollback>("activateRollback"),
                         InstanceMethod<&ServerWrap::AbortRollback>("abortRollback"),
                         InstanceMethod<&ServerWrap::MergeStep>("mergeStep"),
                         InstanceMethod<&ServerWrap::FinishRollback>("finishRollback"),
                         InstanceMethod<&ServerWrap::MergeStatus>("mergeStatus"),
                         InstanceMethod<&ServerWrap::SetDisconnectHold>("setDisconnectHold"),
                         InstanceMethod<&ServerWrap::ReleaseHold>("releaseHold"),
                         InstanceMethod<&ServerWrap::ChangedChunks>("changedChunks"),
                         InstanceMethod<&ServerWrap::SetSnapshotNames>("setSnapshotNames"),
                     });
}

ServerWrap::ServerWrap(const Napi::CallbackInfo& info) : Napi::ObjectWrap<ServerWrap>(info) {
  Napi::Env env = info.Env();
  if (info.Length() < 1 || !info[0].IsObject()) throw Napi::TypeError::New(env, "options object required");
  Napi::Object o = info[0].As<Napi::Object>();
  nbd::ServerConfig cfg;
  cfg.threads_per_connection = opt_u32(o, "threadsPerConnection", cfg.threads_per_connection, 1, 256);
  cfg.max_payload = opt_u32(o, "maxPayload", cfg.max_payload, 4096, 1u << 30);
  cfg.handshake_timeout_ms = opt_u32(o, "handshakeTimeoutMs", cfg.handshake_timeout_ms, 1, 3600 * 1000);
  cfg.max_connections = opt_u32(o, "maxConnections", cfg.max_connections, 1, 1u << 20);
  cfg.drain_timeout_ms = opt_u32(o, "drainTimeoutMs", cfg.drain_timeout_ms, 0, 3600 * 1000);
  const uint64_t budget_mib = opt_u32(o, "journalMemoryMiB", 1024, 0, 1u << 24);
  journal_budget_ = std::make_shared<nbd::MemoryBudget>(budget_mib << 20);
  Napi::Value cb = o.Get("onEvent");
  if (!cb.IsFunction()) throw Napi::TypeError::New(env, "onEvent must be a function");
  events_ = std::make_shared<EventBridge>(env, cb.As<Napi::Function>());
  server_ = std::make_shared<nbd::Server>(cfg, events_);
  napi_add_env_cleanup_hook(env, &ServerWrap::Cleanup, this);
}

ServerWrap::~ServerWrap() {
  napi_remove_env_cleanup_hook(Env(), &ServerWrap::Cleanup, this);
  Cleanup(this);
}

void ServerWrap::Cleanup(void* arg) {
  auto* self = static_cast<ServerWrap*>(arg);
  self->devices_.clear();  // disconnects and joins each NBD_DO_IT thread
  // Env teardown (process.exit, worker end): do not wait for slow clients.
  if (self->server_) self->server_->stop_now();
  if (self->events_) self->events_->release();
}

Napi::Value ServerWrap::AddExport(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() < 1 || !info[0].IsObject()) throw Napi::TypeError::New(env, "export options object required");
  Napi::Object o = info[0].As<Napi::Object>();
  auto e = std::make_shared<nbd::Export>();
  e->name = req_string(o, "name");
  std::string path = req_string(o, "path");
  bool read_only = o.Has("readOnly") && o.Get("readOnly").ToBoolean().Value();
  if (o.Has("description") && o.Get("description").IsString()) e->description = req_string(o, "description");
  if (e->name.size() > 4096) throw Napi::RangeError::New(env, "export name longer than 4096 bytes");
  if (e->description.size() > 4096) throw Napi::RangeError::New(env, "export description longer than 4096 bytes");
  int err = 0;
  std::string what;
  auto dev = nbd::FileDevice::open(path, read_only, err, what);
  if (!dev) throw coded_error(env, "IMAGE_OPEN_FAILED", what, err);
  uint64_t size = dev->size();
  if (server_->exports().find(e->name) && !e->name.empty())
    throw coded_error(env, "EXPORT_EXISTS", "an export named '" + e->name + "' already exists");
  Napi::Array snapshots = Napi::Array::New(env);
  std::shared_ptr<nbd::Device> top = dev;
  if (o.Has("chunkSize") && !o.Get("chunkSize").IsUndefined()) {
    top = open_volume(env, e->name, dev, o, snapshots);
    e->changes = volumes_[e->name];  // qemu:dirty-bitmap:NAME on the live export
  }
  if (read_only) e->device = std::make_shared<nbd::ReadOnlyDevice>(top);
  else e->device = top;
  if (!server_->exports().add(e)) {
    volumes_.erase(e->name);
    throw coded_error(env, "EXPORT_EXISTS", "an export named '" + e->name + "' already exists");
  }
  Napi::Object r = Napi::Object::New(env);
  r.Set("snapshots", snapshots);
  r.Set("name", e->name);
  r.Set("size", Napi::Number::New(env, static_cast<double>(size)));
  r.Set("readOnly", read_only);
  return r;
}

Napi::Value ServerWrap::RemoveExport(const Napi::CallbackInfo& info) {
  if (info.Length() < 1 || !info[0].IsString()) throw Napi::TypeError::New(info.Env(), "export name required");
  std::string name = info[0].As<Napi::String>().Utf8Value();
  volumes_.erase(name);
  return Napi::Boolean::New(info.Env(), server_->exports().remove(name));
}

Napi::Value ServerWrap::SetDefaultExport(const Napi::CallbackInfo& info) {
  if (info.Length() < 1 || !info[0].IsString()) throw Napi::TypeError::New(info.Env(), "export name required");
  std::string name = info[0].As<Napi::String>().Utf8Value();
  if (!server_->exports().set_default(name))
    throw coded_error(info.Env(), "EXPORT_NOT_FOUND", "no export named '" + name + "'");
  return info.Env().Undefined();
}

Napi::Value ServerWrap::ListenTcp(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() < 2 || !info[0].IsString() || !info[1].IsNumber())
    throw Napi::TypeError::New(env, "listenTcp(host: string, port: number)");
  double p = info[1].As<Napi::Number>().DoubleValue();
  if (p < 0 || p > 65535 || p != static_cast<int>(p)) throw Napi::RangeError::New(env, "port must be 0..65535");
  uint16_t bound = 0;
  std::string err;
  int e = server_->listen_tcp(info[0].As<Napi::String>().Utf8Value(), static_cast<uint16_t>(p), bound, err);
  if (e) throw coded_error(env, "LISTEN_FAILED", err, e);
  return Napi::Number::New(env, bound);
}

Napi::Value ServerWrap::ListenUnix(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() < 1 || !info[0].IsString()) throw Napi::TypeError::New(env, "listenUnix(path: string)");
  std::string err;
  int e = server_->listen_unix(info[0].As<Napi::String>().Utf8Value(), err);
  if (e) throw coded_error(env, "LISTEN_FAILED", err, e);
  return env.Undefined();
}

Napi::Value ServerWrap::Start(const Napi::CallbackInfo& info) {
  std::string err;
  int e = server_->start(err);
  if (e) throw coded_error(info.Env(), "START_FAILED", err, e);
  events_->ref(info.Env());  // a serving server keeps the process alive
  if (self_ref_.IsEmpty()) self_ref_ = Napi::Persistent(Value());
  return info.Env().Undefined();
}

Napi::Value ServerWrap::AttachDevice(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() < 1 || !info[0].IsObject()) throw Napi::TypeError::New(env, "attach options object required");
  Napi::Object o = info[0].As<Napi::Object>();
  nbd::AttachOptions opts;
  opts.device = req_string(o, "device");
  if (o.Has("export") && o.Get("export").IsString()) opts.export_name = req_string(o, "export");
  opts.connections = opt_u32(o, "connections", 1, 1, 64);
  opts.timeout_sec = opt_u32(o, "timeoutSec", 30, 0, 86400);
  opts.block_size = opt_u32(o, "blockSize", 4096, 512, 4096);
  uint32_t id = next_device_id_++;
  std::weak_ptr<EventBridge> events = events_;
  std::string device = opts.device;
  int err = 0;
  std::string what;
  auto kd = nbd::KernelDevice::attach(
      *server_, opts,
      [events, id, device](int e, const std::string& msg) {  // NBD_DO_IT thread
        if (auto ev = events.lock())
          ev->on_event({e ? "device-error" : "device-detached", id, {}, device, msg});
      },
      err, what);
  if (!kd) throw coded_error(env, "ATTACH_FAILED", what, err);
  devices_.emplace(id, std::move(kd));
  events_->ref(env);  // an attached device keeps the process alive until detached
  return Napi::Number::New(env, id);
}

Napi::Value ServerWrap::DisconnectDevice(const Napi::CallbackInfo& info) {
  if (info.Length() < 1 || !info[0].IsNumber()) throw Napi::TypeError::New(info.Env(), "device id required");
  auto it = devices_.find(info[0].As<Napi::Number>().Uint32Value());
  if (it != devices_.end()) it->second->disconnect();
  return Napi::Boolean::New(info.Env(), it != devices_.end());
}

Napi::Value ServerWrap::ReleaseDevice(const Napi::CallbackInfo& info) {
  if (info.Length() < 1 || !info[0].IsNumber()) throw Napi::TypeError::New(info.Env(), "device id required");
  bool erased = devices_.erase(info[0].As<Napi::Number>().Uint32Value()) > 0;
  if (erased && devices_.empty() && !server_->started()) events_->unref(info.Env());
  return Napi::Boolean::New(info.Env(), erased);
}

Napi::Value ServerWrap::Stop(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  devices_.clear();  // kernel devices first: their sockets are connections of ours
  // Draining may take as long as the slowest client, so it runs on a thread
  // of our own rather than the libuv pool: process.exit() joins the pool, and
  // must not wait for a drain (the env cleanup hook forces it instead).
  auto* call = new StopCall{Napi::Promise::Deferred::New(env), Napi::Persistent(Value()), this, events_, {}};
  Napi::Promise promise = call->deferred.Promise();
  auto done = Napi::ThreadSafeFunction::New(env, Napi::Function::New(env, [](const Napi::CallbackInfo&) {}),
                                            "nbd-server-stop", 0, 1);
  std::thread([server = server_, done, call]() mutable {
    server->stop();
    call->errors = server->stop_errors();
    done.BlockingCall(call, [](Napi::Env env, Napi::Function, StopCall* c) {  // main thread
      if (env != nullptr) {
        c->events->unref(env);
        c->wrap->ReleaseSelf();
        // [{export, error}] for exports whose final flush failed.
        Napi::Array failed = Napi::Array::New(env, c->errors.size());
        for (size_t i = 0; i < c->errors.size(); ++i) {
          Napi::Object o = Napi::Object::New(env);
          o.Set("export", c->errors[i].first);
          o.Set("error", strerror(c->errors[i].second));
          failed.Set(static_cast<uint32_t>(i), o);
        }
        c->deferred.Resolve(failed);
      }
      delete c;
    });
    done.Release();
  }).detach();
  return promise;
}

Napi::Value ServerWrap::Stats(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  auto st = server_->stats();
  auto num = [&](uint64_t v) { return Napi::Number::New(env, static_cast<double>(v)); };
  Napi::Object r = Napi::Object::New(env);
  r.Set("connectionsTotal", num(st.connections_total));
  r.Set("connectionsActive", num(st.connections_active));
  r.Set("connectionsRefused", num(st.connections_refused));
  r.Set("handshakesFailed", num(st.handshakes_failed));
  Napi::Object exps = Napi::Object::New(env);
  for (auto& e : server_->exports().list()) {
    auto& s = e->stats;
    Napi::Object x = Napi::Object::New(env);
    x.Set("size", num(e->device->size()));
    x.Set("readOnly", !e->device->can_write());
    x.Set("reads", num(s.reads));
    x.Set("writes", num(s.writes));
    x.Set("flushes", num(s.flushes));
    x.Set("trims", num(s.trims));
    x.Set("zeroes", num(s.zeroes));
    x.Set("caches", num(s.caches));
    x.Set("blockStatus", num(s.block_status));
    x.Set("bytesRead", num(s.bytes_read));
    x.Set("bytesWritten", num(s.bytes_written));
    x.Set("errors", num(s.errors));
    x.Set("connectionsTotal", num(s.connections_total));
    x.Set("connectionsActive", num(static_cast<uint64_t>(std::max<int64_t>(0, s.connections_active))));
    exps.Set(e->name, x);
  }
  r.Set("exports", exps);
  return r;
}

}  // namespace nbd::binding
