// snapshot_methods.cc — NativeServer methods for volumes with snapshots.
//
// The control plane (TypeScript) owns names, the manifest and file paths;
// these methods own the data path: opening snapshot stores, adding them to a
// volume's copy-on-write chain, handing chunks down, exporting views.
// Blocking work (fdatasync, copying chunks) runs on libuv workers and
// resolves promises; inputs are copied into plain structs first.
#include <napi.h>

#include <climits>
#include <cstdlib>

#include "../core/volume.hh"
#include "errors.hh"
#include "server_wrap.hh"
#include "task.hh"

namespace nbd::binding {

namespace {

std::string path_of(const Napi::Object& o) {
  if (!o.Get("file").IsString()) throw Napi::TypeError::New(o.Env(), "snapshot needs a file path");
  return o.Get("file").As<Napi::String>().Utf8Value();
}

}  // namespace

std::shared_ptr<nbd::Device> ServerWrap::open_volume(Napi::Env env, const std::string& name,
                                                     std::shared_ptr<nbd::Device> live, const Napi::Object& o,
                                                     Napi::Array& info) {
  uint32_t cs = o.Get("chunkSize").ToNumber().Uint32Value();
  if (cs < 4096 || cs > (1u << 20) || (cs & (cs - 1)))
    throw Napi::RangeError::New(env, "chunkSize must be a power of two from 4 KiB to 1 MiB");
  std::weak_ptr<EventBridge> events = events_;
  auto vol = std::make_shared<nbd::Volume>(live, cs, [events, name](uint64_t id, const std::string& reason) {
    if (auto ev = events.lock()) ev->on_event({"snapshot-failed", id, name, {}, reason});
  });
  if (o.Has("snapshots") && o.Get("snapshots").IsArray()) {
    Napi::Array arr = o.Get("snapshots").As<Napi::Array>();
    for (uint32_t i = 0; i < arr.Length(); ++i) {
      Napi::Object so = arr.Get(i).As<Napi::Object>();
      uint64_t id = id_of(so.Get("id"));
      std::string err;
      auto store = nbd::SnapshotStore::open(id, path_of(so), live->size(), cs, err);
      if (!store) throw coded_error(env, "SNAPSHOT_CORRUPT", "snapshot " + std::to_string(id) + ": " + err);
      // The manifest says it failed, though its own marker may be missing
      // (written to a device that was failing): never serve it as data.
      if (so.Has("failure") && so.Get("failure").IsString() && !store->failed())
        store->mark_failed(so.Get("failure").As<Napi::String>().Utf8Value());
      Napi::Object st = Napi::Object::New(env);
      st.Set("id", Napi::Number::New(env, static_cast<double>(id)));
      st.Set("failed", store->failed());
      st.Set("failure", store->failure());
      st.Set("failedAt", Napi::Number::New(env, static_cast<double>(store->failed_at_ms())));
      info.Set(i, st);
      vol->load_snapshot(std::shared_ptr<nbd::SnapshotStore>(std::move(store)));
    }
  }
  if (o.Has("journalState") && o.Get("journalState").IsString()) {
    // Before a merge resumes: queued first writes are older than anything it does.
    nbd::Volume::JournalConfig cfg;
    cfg.state_file = o.Get("journalState").As<Napi::String>().Utf8Value();
    if (o.Has("journalDir") && o.Get("journalDir").IsString()) cfg.dir = o.Get("journalDir").As<Napi::String>().Utf8Value();
    // The owner record names the image by its absolute, resolved path: a
    // journal must be traceable to its volume from any directory.
    cfg.owner = o.Get("path").IsString() ? o.Get("path").As<Napi::String>().Utf8Value() : std::string();
    if (char* real = ::realpath(cfg.owner.c_str(), nullptr)) {
      cfg.owner = real;
      free(real);
    }
    cfg.ring_size = o.Has("journalSize") && o.Get("journalSize").IsNumber()
                        ? static_cast<uint64_t>(o.Get("journalSize").As<Napi::Number>().DoubleValue())
                        : 0;
    if (cfg.dir.empty()) cfg.ring_size = 0;
    cfg.read_only = o.Has("readOnly") && o.Get("readOnly").ToBoolean().Value();
    cfg.budget = journal_budget_;
    uint64_t replayed = 0;
    std::string err, note;
    nbd::Volume::JournalError kind;
    if (int e = vol->open_journal(cfg, replayed, note, kind, err)) {
      using K = nbd::Volume::JournalError;
      const char* code = kind == K::kPending   ? "JOURNAL_PENDING"
                         : kind == K::kMissing ? "JOURNAL_MISSING"
                         : kind == K::kCorrupt ? "JOURNAL_CORRUPT"
                                               : "JOURNAL_IO_ERROR";
      throw coded_error(env, code, err, e);
    }
    journal_replayed_[name] = replayed;
    if (!note.empty()) journal_notes_[name] = note;
  }
  if (o.Has("rollbackJob") && o.Get("rollbackJob").IsString()) {
    std::string err;
    if (vol->resume_rollback(o.Get("rollbackJob").As<Napi::String>().Utf8Value(), err) != 0)
      throw coded_error(env, "METADATA_CORRUPT", "rollback merge: " + err);
  }
  volumes_[name] = vol;
  return vol->device();
}

std::shared_ptr<nbd::Volume> ServerWrap::volume(Napi::Env env, const Napi::Value& name) {
  if (!name.IsString()) throw Napi::TypeError::New(env, "export name must be a string");
  auto it = volumes_.find(name.As<Napi::String>().Utf8Value());
  if (it == volumes_.end())
    throw coded_error(env, "VOLUME_NOT_FOUND", "no volume export named '" + name.As<Napi::String>().Utf8Value() + "'");
  return it->second;
}

Napi::Value ServerWrap::PrepareSnapshot(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  auto vol = volume(env, info[0]);
  if (info.Length() < 2 || !info[1].IsObject()) throw Napi::TypeError::New(env, "snapshot {id, file} required");
  Napi::Object so = info[1].As<Napi::Object>();
  uint64_t id = id_of(so.Get("id"));
  std::string path = path_of(so);
  uint64_t size = vol->size();
  auto made = std::make_shared<std::shared_ptr<nbd::SnapshotStore>>();
  auto* t = new Task(
      env,
      [vol, id, path, size, made](std::string& what) {
        auto store = nbd::SnapshotStore::create(id, path, size, vol->chunk_size(), what);
        if (!store) return EIO;
        *made = std::move(store);
        return 0;
      },
      [this, id, made](Napi::Env e) {  // main thread
        pending_[id] = *made;
        return e.Undefined();
      },
      "SNAPSHOT_CREATE_FAILED");
  return queue(t);
}

// Pauses writes, applies queued first writes and flushes the volume; writes
// stay paused until addSnapshot() or resumeWrites() (see Volume::begin_add).
Napi::Value ServerWrap::BeginSnapshot(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  auto vol = volume(env, info[0]);
  auto* t = new Task(
      env,
      [vol](std::string& what, const char*& code) {
        int e = vol->begin_add(what);
        if (e == EBUSY) code = "ROLLBACK_RUNNING";
        else if (e && vol->queued_writes() > 0) code = "QUEUE_STALLED";
        return e;
      },
      nullptr, "SNAPSHOT_CREATE_FAILED");
  return queue(t);
}

// After beginSnapshot() and the manifest: the prepared snapshot joins the
// chain and writes resume.
Napi::Value ServerWrap::AddSnapshot(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  auto vol = volume(env, info[0]);
  uint64_t id = id_of(info[1]);
  auto it = pending_.find(id);
  if (it == pending_.end()) throw coded_error(env, "SNAPSHOT_NOT_FOUND", "no prepared snapshot with id " + std::to_string(id));
  auto store = it->second;
  pending_.erase(it);
  vol->commit_add(store);
  return env.Undefined();
}

Napi::Value ServerWrap::DiscardSnapshot(const Napi::CallbackInfo& info) {
  return Napi::Boolean::New(info.Env(), pending_.erase(id_of(info[0])) > 0);
}

Napi::Value ServerWrap::ResumeWrites(const Napi::CallbackInfo& info) {
  volume(info.Env(), info[0])->resume_writes();
  return info.Env().Undefined();
}

Napi::Value ServerWrap::RemoveSnapshot(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  auto vol = volume(env, info[0]);
  uint64_t id = id_of(info[1]);
  auto* t = new Task(
      env,
      [vol, id](std::string& what, const char*& code) {
        int e = vol->finish_remove(id, what);
        if (e && vol->queued_writes() > 0) code = "QUEUE_STALLED";
        return e;
      },
      nullptr, "SNAPSHOT_DELETE_FAILED");
  return queue(t);
}

Napi::Value ServerWrap::DropSnapshot(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  auto vol = volume(env, info[0]);
  return Napi::Boolean::New(env, vol->drop_removed(id_of(info[1])));
}

Napi::Value ServerWrap::HandDown(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  auto vol = volume(env, info[0]);
  uint64_t id = id_of(info[1]);
  uint64_t from = static_cast<uint64_t>(info[2].ToNumber().DoubleValue());
  uint64_t max = static_cast<uint64_t>(info[3].ToNumber().DoubleValue());
  auto next = std::make_shared<uint64_t>(0);
  auto total = std::make_shared<uint64_t>(0);
  auto* t = new Task(
      env,
      [vol, id, from, max, next, total](std::string& what) {
        auto s = vol->find(id);
        if (s) *total = s->chunks();
        return vol->hand_down(id, from, max, *next, what);
      },
      [next, total](Napi::Env e) {
        Napi::Object r = Napi::Object::New(e);
        r.Set("next", Napi::Number::New(e, static_cast<double>(*next)));
        r.Set("total", Napi::Number::New(e, static_cast<double>(*total)));
        return r;
      },
      "SNAPSHOT_DELETE_FAILED");
  return queue(t);
}

Napi::Value ServerWrap::SnapshotStatus(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  auto vol = volume(env, info[0]);
  auto chain = vol->chain();
  Napi::Array out = Napi::Array::New(env, chain->size());
  for (size_t i = 0; i < chain->size(); ++i) {
    auto& s = (*chain)[i];
    Napi::Object o = Napi::Object::New(env);
    o.Set("id", Napi::Number::New(env, static_cast<double>(s->id())));
    o.Set("failed", s->failed());
    o.Set("failure", s->failure());
    o.Set("failedAt", Napi::Number::New(env, static_cast<double>(s->failed_at_ms())));
    o.Set("preservedChunks", Napi::Number::New(env, static_cast<double>(s->map().count())));
    o.Set("chunks", Napi::Number::New(env, static_cast<double>(s->chunks())));
    o.Set("mapBytes", Napi::Number::New(env, static_cast<double>(s->map_bytes())));
    out.Set(static_cast<uint32_t>(i), o);
  }
  return out;
}

Napi::Value ServerWrap::Settle(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  auto vol = volume(env, info[0]);
  auto* t = new Task(
      env,
      [vol](std::string&) {
        vol->settle();
        return 0;
      },
      nullptr, "IO_ERROR");
  return queue(t);
}

Napi::Value ServerWrap::FirstWrites(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  auto vol = volume(env, info[0]);
  Napi::Object o = Napi::Object::New(env);
  o.Set("mode", vol->first_write_mode());
  o.Set("queued", Napi::Number::New(env, static_cast<double>(vol->queued_writes())));
  o.Set("lastPauseMs", Napi::Number::New(env, static_cast<double>(vol->last_pause_us()) / 1000.0));
  o.Set("maxPauseMs", Napi::Number::New(env, static_cast<double>(vol->max_pause_us()) / 1000.0));
  o.Set("lastDrainMs", Napi::Number::New(env, static_cast<double>(vol->last_drain_us()) / 1000.0));
  o.Set("lastPreflushMs", Napi::Number::New(env, static_cast<double>(vol->last_preflush_us()) / 1000.0));
  const std::string name = info[0].As<Napi::String>().Utf8Value();
  auto it = journal_replayed_.find(name);
  o.Set("replayedAtOpen", Napi::Number::New(env, it == journal_replayed_.end() ? 0.0 : static_cast<double>(it->second)));
  auto note = journal_notes_.find(name);
  if (note != journal_notes_.end()) o.Set("note", note->second);
  std::string kept = vol->kept_journal();
  if (!kept.empty()) o.Set("kept", kept);
  return o;
}

Napi::Value ServerWrap::AddSnapshotExport(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  auto vol = volume(env, info[0]);
  uint64_t id = id_of(info[1]);
  if (info.Length() < 3 || !info[2].IsString()) throw Napi::TypeError::New(env, "export name required");
  auto dev = vol->view(id);
  if (!dev) throw coded_error(env, "SNAPSHOT_NOT_FOUND", "no snapshot with id " + std::to_string(id));
  auto e = std::make_shared<nbd::Export>();
  e->name = info[2].As<Napi::String>().Utf8Value();
  if (info.Length() > 3 && info[3].IsString()) e->description = info[3].As<Napi::String>().Utf8Value();
  e->device = dev;
  e->changes = vol;  // qemu:dirty-bitmap:NAME: changes from NAME to this snapshot
  e->changes_at = id;
  if (!server_->exports().add(e)) throw coded_error(env, "EXPORT_EXISTS", "an export named '" + e->name + "' already exists");
  return env.Undefined();
}

}  // namespace nbd::binding
