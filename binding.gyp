{
  "targets": [
    {
      "target_name": "nbd_native",
      "sources": [
        "native/core/protocol_names.cc",
        "native/core/file_device.cc",
        "native/core/socket_io.cc",
        "native/core/handshake.cc",
        "native/core/transmission.cc",
        "native/core/connection.cc",
        "native/core/server.cc",
        "native/core/kernel_device.cc",
        "native/core/crc32c.cc",
        "native/core/record_log.cc",
        "native/core/merge_job.cc",
        "native/core/snapshot_store.cc",
        "native/core/cow_device.cc",
        "native/core/rollback_device.cc",
        "native/core/journal_device.cc",
        "native/core/snapshot_view.cc",
        "native/core/volume.cc",
        "native/core/change_map.cc",
        "native/core/first_write_queue.cc",
        "native/core/write_journal.cc",
        "native/core/journal_state.cc",
        "native/core/file_lock.cc",
        "native/binding/event_bridge.cc",
        "native/binding/server_wrap.cc",
        "native/binding/snapshot_methods.cc",
        "native/binding/rollback_methods.cc",
        "native/binding/change_methods.cc",
        "native/binding/journal_functions.cc",
        "native/binding/binding.cc"
      ],
      "include_dirs": ["<!(node -p \"require('node-addon-api').include_dir\")"],
      "defines": ["NAPI_VERSION=9", "NAPI_CPP_EXCEPTIONS", "NODE_ADDON_API_DISABLE_DEPRECATED"],
      "cflags!": ["-fno-exceptions"],
      # Hardened as distributions build packages (issue 15): bounds-checked
      # std containers, fortified libc calls, stack protector. The shipped
      # build and the test suite use the same flags.
      "cflags": ["-U_FORTIFY_SOURCE", "-D_FORTIFY_SOURCE=2", "-D_GLIBCXX_ASSERTIONS", "-fstack-protector-strong"],
      "cflags_cc!": ["-fno-exceptions", "-std=gnu++17"],
      "cflags_cc": ["-std=c++17", "-fexceptions", "-O2", "-Wall", "-Wextra", "-Wno-unused-parameter", "-Wno-missing-field-initializers"],
      "libraries": ["-lpthread"]
    }
  ]
}
