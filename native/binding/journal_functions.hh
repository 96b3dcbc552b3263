// journal_functions.hh — see journal_functions.cc.
#pragma once

#include <napi.h>

namespace nbd::binding {

void register_journal_functions(Napi::Env env, Napi::Object exports);

}  // namespace nbd::binding
