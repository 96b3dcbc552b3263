// change_methods.cc — NativeServer.changedChunks: a volume's change map
// (native/core/change_map.hh, Volume::changed_chunks) for backups and diffs.
//
// setSnapshotNames(exportName, [[name, id], ...]) tells the volume its
// snapshots' names (the control plane owns them), so NBD clients can ask for
// qemu:dirty-bitmap:NAME (handshake.cc); called after every manifest change.
//
// changedChunks(exportName, fromId, toId | null) resolves with a
// Float64Array of pairs [start, count, start, count, ...]: ascending,
// disjoint runs of chunk indexes (doubles hold any chunk index exactly, up
// to 2^53). Runs, not chunks, cross the boundary, so the answer's size
// follows the number of changed extents, not the volume's. The union is
// computed on a libuv worker; refusals reject with SNAPSHOT_NOT_FOUND,
// CHANGES_RANGE_INVALID or CHANGES_UNAVAILABLE (src/errors.ts).
#include <napi.h>

#include "../core/change_map.hh"
#include "../core/volume.hh"
#include "server_wrap.hh"
#include "task.hh"

namespace nbd::binding {

Napi::Value ServerWrap::ChangedChunks(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  auto vol = volume(env, info[0]);
  const uint64_t from = id_of(info[1]);
  const uint64_t to = info.Length() < 3 || info[2].IsNull() || info[2].IsUndefined() ? 0 : id_of(info[2]);
  auto runs = std::make_shared<std::vector<nbd::ChunkRun>>();
  auto* t = new Task(
      env,
      [vol, from, to, runs](std::string& what, const char*& code) {
        nbd::ChangeError kind = nbd::ChangeError::kNone;
        int e = vol->changed_chunks(from, to, *runs, kind, what);
        if (e) {
          code = kind == nbd::ChangeError::kNotFound       ? "SNAPSHOT_NOT_FOUND"
                 : kind == nbd::ChangeError::kRangeInvalid ? "CHANGES_RANGE_INVALID"
                                                           : "CHANGES_UNAVAILABLE";
        }
        return e;
      },
      [runs](Napi::Env e) {  // main thread
        auto out = Napi::Float64Array::New(e, runs->size() * 2);
        for (size_t i = 0; i < runs->size(); ++i) {
          out[2 * i] = static_cast<double>((*runs)[i].start);
          out[2 * i + 1] = static_cast<double>((*runs)[i].count);
        }
        return out;
      },
      "CHANGES_UNAVAILABLE");
  return queue(t);
}

Napi::Value ServerWrap::SetSnapshotNames(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  auto vol = volume(env, info[0]);
  if (info.Length() < 2 || !info[1].IsArray()) throw Napi::TypeError::New(env, "names must be an array of [name, id]");
  Napi::Array arr = info[1].As<Napi::Array>();
  std::vector<std::pair<std::string, uint64_t>> names;
  for (uint32_t i = 0; i < arr.Length(); ++i) {
    Napi::Value v = arr.Get(i);
    if (!v.IsArray() || v.As<Napi::Array>().Length() != 2 || !v.As<Napi::Array>().Get(0u).IsString())
      throw Napi::TypeError::New(env, "names must be an array of [name, id]");
    Napi::Array p = v.As<Napi::Array>();
    names.push_back({p.Get(0u).As<Napi::String>().Utf8Value(), id_of(p.Get(1u))});
  }
  vol->set_snapshot_names(std::move(names));
  return env.Undefined();
}

}  // namespace nbd::binding
