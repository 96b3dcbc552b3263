// server_wrap.hh — the JavaScript class NativeServer around nbd::Server.
#pragma once

#include <napi.h>

#include <map>
#include <memory>

#include "../core/volume.hh"
#include "../core/kernel_device.hh"
#include "../core/memory_budget.hh"
#include "../core/server.hh"
#include "event_bridge.hh"

namespace nbd::binding {

class ServerWrap : public Napi::ObjectWrap<ServerWrap> {
 public:
  static Napi::Function Init(Napi::Env env);
  explicit ServerWrap(const Napi::CallbackInfo& info);
  ~ServerWrap() override;
  // Drops the self-reference taken by start() (main thread).
  void ReleaseSelf() {
    if (!self_ref_.IsEmpty()) self_ref_.Reset();
  }

 private:
  Napi::Value AddExport(const Napi::CallbackInfo& info);
  Napi::Value RemoveExport(const Napi::CallbackInfo& info);
  Napi::Value SetDefaultExport(const Napi::CallbackInfo& info);
  Napi::Value ListenTcp(const Napi::CallbackInfo& info);
  Napi::Value ListenUnix(const Napi::CallbackInfo& info);
  Napi::Value Start(const Napi::CallbackInfo& info);
  Napi::Value Stop(const Napi::CallbackInfo& info);
  Napi::Value Stats(const Napi::CallbackInfo& info);
  Napi::Value AttachDevice(const Napi::CallbackInfo& info);
  Napi::Value DisconnectDevice(const Napi::CallbackInfo& info);
  Napi::Value ReleaseDevice(const Napi::CallbackInfo& info);
  // snapshot_methods.cc
  Napi::Value PrepareSnapshot(const Napi::CallbackInfo& info);
  Napi::Value BeginSnapshot(const Napi::CallbackInfo& info);
  Napi::Value AddSnapshot(const Napi::CallbackInfo& info);
  Napi::Value DiscardSnapshot(const Napi::CallbackInfo& info);
  Napi::Value ResumeWrites(const Napi::CallbackInfo& info);
  Napi::Value RemoveSnapshot(const Napi::CallbackInfo& info);
  Napi::Value DropSnapshot(const Napi::CallbackInfo& info);
  Napi::Value HandDown(const Napi::CallbackInfo& info);
  Napi::Value SnapshotStatus(const Napi::CallbackInfo& info);
  Napi::Value Settle(const Napi::CallbackInfo& info);
  Napi::Value FirstWrites(const Napi::CallbackInfo& info);
  Napi::Value AddSnapshotExport(const Napi::CallbackInfo& info);
  // rollback_methods.cc
  Napi::Value PrepareRollback(const Napi::CallbackInfo& info);
  Napi::Value ActivateRollback(const Napi::CallbackInfo& info);
  Napi::Value AbortRollback(const Napi::CallbackInfo& info);
  Napi::Value MergeStep(const Napi::CallbackInfo& info);
  Napi::Value FinishRollback(const Napi::CallbackInfo& info);
  Napi::Value MergeStatus(const Napi::CallbackInfo& info);
  Napi::Value SetDisconnectHold(const Napi::CallbackInfo& info);
  Napi::Value ReleaseHold(const Napi::CallbackInfo& info);
  // change_methods.cc
  Napi::Value ChangedChunks(const Napi::CallbackInfo& info);
  Napi::Value SetSnapshotNames(const Napi::CallbackInfo& info);
  std::shared_ptr<nbd::Volume> volume(Napi::Env env, const Napi::Value& name);
  // Opens the snapshot chain of a volume export (addExport with chunkSize).
  std::shared_ptr<nbd::Device> open_volume(Napi::Env env, const std::string& name, std::shared_ptr<nbd::Device> live,
                                           const Napi::Object& o, Napi::Array& snapshot_info);

  static void Cleanup(void* arg);  // env teardown: stop synchronously

  std::shared_ptr<nbd::Server> server_;
  std::shared_ptr<EventBridge> events_;
  std::shared_ptr<nbd::MemoryBudget> journal_budget_;  // shared by every volume's journal
  // Kernel devices attached by this server, by id. Main thread only; the
  // NBD_DO_IT thread reports its end as a "device-detached" event.
  std::map<uint32_t, std::unique_ptr<nbd::KernelDevice>> devices_;
  // Strong reference to our own JS object while serving (start() until stop()
  // resolves), so a server nobody references is not collected mid-service.
  Napi::ObjectReference self_ref_;
  uint32_t next_device_id_ = 1;
  // Volumes with snapshots, by export name (main thread only).
  std::map<std::string, std::shared_ptr<nbd::Volume>> volumes_;
  // Snapshot stores created but not yet in a chain, by id (main thread only).
  std::map<uint64_t, std::shared_ptr<nbd::SnapshotStore>> pending_;
  std::map<std::string, uint64_t> journal_replayed_;  // journal entries replayed at open, per volume
  std::map<std::string, std::string> journal_notes_;  // why a recorded journal was not needed at open
};

}  // namespace nbd::binding
