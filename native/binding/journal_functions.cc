// journal_functions.cc — module functions for the first-write journal's
// files, used by the control plane without a server (journal discard,
// listing journals that belong to no volume):
//   inspectJournal(path) -> {id, owner} | null     what a journal says about itself
//   readJournalState(file) -> {id, path} | null    the journal a volume's state names
//   clearJournalState(file)                        forgets it (durably)
#include "journal_functions.hh"

#include <optional>

#include "../core/journal_state.hh"
#include "../core/write_journal.hh"
#include "errors.hh"

namespace nbd::binding {

namespace {

std::string path_arg(const Napi::CallbackInfo& info) {
  if (info.Length() < 1 || !info[0].IsString()) throw Napi::TypeError::New(info.Env(), "a file path is required");
  return info[0].As<Napi::String>().Utf8Value();
}

Napi::Value InspectJournal(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  nbd::WriteJournal::Id id{};
  std::string owner;
  if (!nbd::WriteJournal::inspect(path_arg(info), id, owner)) return env.Null();
  Napi::Object o = Napi::Object::New(env);
  o.Set("id", nbd::id_hex(id));
  o.Set("owner", owner);
  return o;
}

Napi::Value ReadJournalState(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  std::optional<nbd::JournalState> st;
  std::string err;
  if (int e = nbd::load_journal_state(path_arg(info), st, err))
    throw coded_error(env, e == EINVAL ? "JOURNAL_CORRUPT" : "JOURNAL_IO_ERROR", err, e);
  if (!st) return env.Null();
  Napi::Object o = Napi::Object::New(env);
  o.Set("id", nbd::id_hex(st->id));
  o.Set("path", st->path);
  return o;
}

Napi::Value ClearJournalState(const Napi::CallbackInfo& info) {
  std::string err;
  if (int e = nbd::clear_journal_state(path_arg(info), err)) throw coded_error(info.Env(), "JOURNAL_IO_ERROR", err, e);
  return info.Env().Undefined();
}

}  // namespace

void register_journal_functions(Napi::Env env, Napi::Object exports) {
  exports.Set("inspectJournal", Napi::Function::New(env, InspectJournal));
  exports.Set("readJournalState", Napi::Function::New(env, ReadJournalState));
  exports.Set("clearJournalState", Napi::Function::New(env, ClearJournalState));
}

}  // namespace nbd::binding
