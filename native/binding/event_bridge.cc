// event_bridge.cc — see event_bridge.hh.
#include "event_bridge.hh"

namespace nbd::binding {

EventBridge::EventBridge(Napi::Env env, Napi::Function callback) {
  tsfn_ = Napi::ThreadSafeFunction::New(env, callback, "nbd-server-events", 0, 1);
  tsfn_.Unref(env);
}

EventBridge::~EventBridge() { release(); }

void EventBridge::on_event(const nbd::ServerEvent& ev) {
  std::lock_guard<std::mutex> lk(mu_);
  if (released_) return;
  auto* copy = new nbd::ServerEvent(ev);
  napi_status st = tsfn_.NonBlockingCall(copy, [](Napi::Env env, Napi::Function cb, nbd::ServerEvent* e) {
    if (env != nullptr && cb != nullptr) {
      Napi::Object o = Napi::Object::New(env);
      o.Set("type", e->type);
      o.Set("connection", Napi::Number::New(env, static_cast<double>(e->connection)));
      o.Set("export", e->export_name);
      o.Set("peer", e->peer);
      o.Set("message", e->message);
      cb.Call({o});
    }
    delete e;
  });
  if (st != napi_ok) delete copy;
}

void EventBridge::ref(Napi::Env env) {
  std::lock_guard<std::mutex> lk(mu_);
  if (!released_) tsfn_.Ref(env);
}

void EventBridge::unref(Napi::Env env) {
  std::lock_guard<std::mutex> lk(mu_);
  if (!released_) tsfn_.Unref(env);
}

void EventBridge::release() {
  std::lock_guard<std::mutex> lk(mu_);
  if (released_) return;
  released_ = true;
  tsfn_.Release();
}

}  // namespace nbd::binding
