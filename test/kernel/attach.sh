#!/bin/sh
# `node-nbd-server attach IMAGE /dev/nbdN [serve options]`: the server
# connects the kernel device itself (no nbd-client) and stays in the
# foreground until the device is detached or it gets SIGTERM.
#   1. attach (new image, --size): mkfs, mount, fio verify (libaio, psync),
#      files, umount; `node-nbd-server detach /dev/nbd0` exits 0, the attach
#      process exits 0 and the device is disconnected.
#   2. attach again (existing image, 4 connections, 10 s timeout): fsck
#      clean, files intact; SIGTERM to the attach process: it exits 0 and
#      the device is disconnected.
# tools/kernel-test.js runs this only once `attach --help` and `detach --help`
# print their own usage (until then: skipped, "attach: not implemented yet").
. "$KT_ROOT/test/kernel/lib.sh"

IMG="$R/disk.img"
ATT_N=0
ATT_PID=
ATT_LOG=
ATT_RC=

# start_attach [SERVE OPTIONS...]: node-nbd-server attach IMG /dev/nbd0 ...
# in the background; wait until the device is connected with the right size.
start_attach() {
  ATT_N=$((ATT_N + 1))
  ATT_LOG="$R/attach-$ATT_N.log"
  ATT_RC="$RUN/attach-$ATT_N.rc"
  _pidf="$RUN/attach-$ATT_N.pid"
  rm -f "$ATT_RC" "$_pidf"
  log "attach #$ATT_N: $KT_NODE $KT_CLI attach $IMG $DEV $* (log: $ATT_LOG)"
  (
    sh -c 'echo $$ >"$0"; exec "$@"' "$_pidf" "$KT_NODE" "$KT_CLI" attach "$IMG" "$DEV" "$@" >"$ATT_LOG" 2>&1 </dev/null
    echo $? >"$ATT_RC"
  ) &
  _t0=$(now)
  while ! nbd_connected; do
    if [ -s "$ATT_RC" ]; then
      cat "$ATT_LOG"
      log "attach exited with status $(cat "$ATT_RC") before $DEV was connected"
      return 1
    fi
    if awk -v a="$_t0" -v b="$(now)" 'BEGIN { exit !(b - a > 60) }'; then
      cat "$ATT_LOG"
      log "$DEV not connected 60 s after attach started"
      return 1
    fi
    sleep 0.2
  done
  ATT_PID=$(cat "$_pidf")
  _want=$(size_bytes "$KT_SIZE")
  _got=$(($(cat "$NBD_SYS/size") * 512))
  [ "$_got" = "$_want" ] || { log "device size $_got, expected $_want"; return 1; }
  log "attached after $(since "$_t0")s: $DEV $_got bytes (attach pid $ATT_PID)"
  # It must stay in the foreground while the device is attached.
  sleep 1
  if [ -s "$ATT_RC" ]; then
    log "attach exited with status $(cat "$ATT_RC") while $DEV is attached"
    return 1
  fi
}

attach_exited() { [ -s "$ATT_RC" ]; }

# attach_exits_0: the attach process ends within 30 s with status 0 and the
# device is disconnected.
attach_exits_0() {
  if ! wait_for 30 attach_exited; then
    log "attach process still running 30 s later"
    tail -n 20 "$ATT_LOG"
    return 1
  fi
  _st=$(cat "$ATT_RC")
  log "attach exited with status $_st"
  tail -n 5 "$ATT_LOG"
  [ "$_st" = 0 ] || return 1
  wait_for 10 nbd_disconnected || { log "$DEV still connected after attach exited"; return 1; }
}

sigterm_attach() { log "SIGTERM to attach pid $ATT_PID"; kill -TERM "$ATT_PID"; }

step "stage files" make_stage
step "attach (new image)" start_attach --size "$KT_SIZE"
step "mkfs.ext4" mkfs_dev
step "mount" mount_dev
step "fio randrw libaio iodepth=16 verify" run_fio libaio --iodepth=16
step "fio randrw psync verify" run_fio psync
step "write file tree" write_tree
step "sync" sync
step "umount" umount "$MNT"
step "node-nbd-server detach $DEV" "$KT_NODE" "$KT_CLI" detach "$DEV"
step "attach process exits 0, device disconnected" attach_exits_0

step "attach again (existing image, -C 4 -t 10)" start_attach --connections 4 --timeout 10
step "the server serves 4 kernel connections" wait_for 10 sh -c '[ "$(grep -c "\"msg\":\"client connected\"" "$0")" -ge 4 ]' "$ATT_LOG"
step "fsck (read-only check)" fsck_dev
step "mount" mount_dev
step "compare checksums" verify_tree
step "umount" umount "$MNT"
step "SIGTERM to the attach process" sigterm_attach
step "attach process exits 0, device disconnected" attach_exits_0
pass
