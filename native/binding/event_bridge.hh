// event_bridge.hh — carries core ServerEvents to one JavaScript callback.
//
// on_event() is called on core threads (accept and connection threads); it
// queues the event on a thread-safe function and returns without waiting
// for JavaScript (NonBlockingCall on an unbounded queue). The JS callback
// runs on the main thread.
#pragma once

#include <napi.h>

#include <mutex>

#include "../core/events.hh"

namespace nbd::binding {

class EventBridge : public nbd::EventSink {
 public:
  EventBridge(Napi::Env env, Napi::Function callback);
  ~EventBridge() override;
  void on_event(const nbd::ServerEvent& ev) override;  // any thread
  // Main thread: keep the event loop alive (while serving) or not.
  void ref(Napi::Env env);
  void unref(Napi::Env env);
  // Main thread: no more events will be delivered.
  void release();

 private:
  std::mutex mu_;  // guards released_ against concurrent on_event calls
  bool released_ = false;
  Napi::ThreadSafeFunction tsfn_;
};

}  // namespace nbd::binding
