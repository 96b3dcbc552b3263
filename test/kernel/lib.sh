# Shared helpers for the kernel-path scenarios (sourced by the scenario
# scripts, which run inside user-mode Linux, started by test/kernel/init.sh).
#
# Environment (written by tools/kernel-test.js into the scenario's config.sh):
#   KT_ROOT       project root (the guest sees the host filesystem via hostfs)
#   KT_NODE       absolute path of the host's node binary
#   KT_RESULTS    per-scenario results dir on the host: steps.log, verdict,
#                 server logs, images
#   KT_TRANSPORT  tcp | tcp-default | unix   KT_CONNS  nbd-client -C value
#   KT_FS         ext4 | xfs                 KT_SIZE   export size (e.g. 256M)
#
# Everything a scenario prints lands in $KT_RESULTS/steps.log. A scenario ends
# with `pass` (verdict "ok") or `fail MSG` (verdict "fail: MSG").

# KT_CLI may be preset to try the scenarios against another CLI script.
KT_CLI="${KT_CLI:-$KT_ROOT/bin/node-nbd-server.js}"
R="$KT_RESULTS"
RUN=/run/kt
DEV=/dev/nbd0
NBD_SYS=/sys/block/nbd0
SOCK="$RUN/nbd.sock"
PORT=10809
MNT="$RUN/mnt"
STAGE="$RUN/stage"
MANIFEST="$RUN/manifest.sha256"
EXPORT=disk
: "${KT_TRANSPORT:=tcp}" "${KT_CONNS:=1}" "${KT_FS:=ext4}" "${KT_SIZE:=256M}"
mkdir -p "$RUN" "$MNT" "$STAGE"

now() { cut -d' ' -f1 /proc/uptime; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }
log() { echo "[$(now)] $*"; }
# hostfs writes go through the guest's page cache: push the log to the host
# after every step so a hung or killed guest still leaves it behind.
sync_log() { sync "$R/steps.log" 2>/dev/null || true; }

fail() {
  log "FAIL: $*"
  echo "fail: $*" >"$R/verdict"
  sync "$R/verdict" 2>/dev/null
  sync_log
  exit 1
}

pass() {
  log "PASS"
  echo ok >"$R/verdict"
  sync "$R/verdict" 2>/dev/null
  sync_log
  exit 0
}

# step NAME CMD [ARGS...]: run CMD (a command or a function of this shell),
# log it with its duration, and fail the scenario when it exits non-zero.
step() {
  # (names unique to step: sh has no locals, and the functions it runs use _t0 etc.)
  __step_name=$1
  shift
  __step_t0=$(now)
  log "=== $__step_name: $*"
  "$@"
  __step_rc=$?
  if [ $__step_rc -ne 0 ]; then
    log "--- $__step_name FAILED (exit $__step_rc, $(since "$__step_t0")s)"
    fail "$__step_name (exit $__step_rc)"
  fi
  log "--- $__step_name ok ($(since "$__step_t0")s)"
  sync_log
}

# expect_fail NAME PATTERN CMD [ARGS...]: CMD must fail, and its output must
# match the extended regex PATTERN (empty PATTERN: any failure is fine).
expect_fail() {
  _name=$1
  _pat=$2
  shift 2
  log "=== $_name (must fail): $*"
  _out=$("$@" 2>&1)
  _rc=$?
  printf '%s\n' "$_out"
  [ $_rc -ne 0 ] || fail "$_name: succeeded but must fail"
  if [ -n "$_pat" ] && ! printf '%s\n' "$_out" | grep -Eq "$_pat"; then
    fail "$_name: failed (exit $_rc) but not with /$_pat/"
  fi
  log "--- $_name failed as expected (exit $_rc)"
  sync_log
}

# wait_for SECONDS CMD...: poll CMD every 0.2 s until it succeeds.
wait_for() {
  _limit=$1
  shift
  _t0=$(now)
  while ! "$@"; do
    if awk -v a="$_t0" -v b="$(now)" -v l="$_limit" 'BEGIN { exit !(b - a > l) }'; then
      return 1
    fi
    sleep 0.2
  done
  return 0
}

# ---------------------------------------------------------------- server

SRV_N=0
SRV_PID=
SRV_LOG=
SRV_RC=

# start_server ARGS...: run `node-nbd-server ARGS...` in the background and
# wait for its {"ready":true} line. Sets SRV_PID, SRV_LOG, SRV_RC (the file
# that receives its exit status).
start_server() {
  SRV_N=$((SRV_N + 1))
  SRV_LOG="$R/server-$SRV_N.log"
  SRV_RC="$RUN/server-$SRV_N.rc"
  _pidf="$RUN/server-$SRV_N.pid"
  rm -f "$SRV_RC" "$_pidf"
  log "server #$SRV_N: $KT_NODE $KT_CLI $* (log: $SRV_LOG)"
  (
    sh -c 'echo $$ >"$0"; exec "$@"' "$_pidf" "$KT_NODE" "$KT_CLI" "$@" >"$SRV_LOG" 2>&1 </dev/null
    echo $? >"$SRV_RC"
  ) &
  _t0=$(now)
  while ! grep -q '"ready":true' "$SRV_LOG" 2>/dev/null; do
    if [ -e "$SRV_RC" ]; then
      cat "$SRV_LOG"
      log "server exited with status $(cat "$SRV_RC") before it was ready"
      return 1
    fi
    if awk -v a="$_t0" -v b="$(now)" 'BEGIN { exit !(b - a > 60) }'; then
      cat "$SRV_LOG"
      log "server not ready after 60 s"
      return 1
    fi
    sleep 0.2
  done
  SRV_PID=$(cat "$_pidf")
  log "server ready after $(since "$_t0")s (pid $SRV_PID): $(grep '"ready":true' "$SRV_LOG")"
}

# serve_args: the listen options for KT_TRANSPORT.
# tcp-default: no option at all, the server's default (127.0.0.1:10809).
serve_args() {
  case "$KT_TRANSPORT" in
    unix) echo "--socket $SOCK" ;;
    tcp-default) ;;
    *) echo "--listen 127.0.0.1:$PORT" ;;
  esac
}

server_exited() { [ -s "$SRV_RC" ]; }

# stop_server: SIGTERM; the server must drain and exit 0 within 30 s.
stop_server() {
  log "SIGTERM to server pid $SRV_PID"
  kill -TERM "$SRV_PID" || return 1
  if ! wait_for 30 server_exited; then
    log "server did not exit within 30 s of SIGTERM"
    tail -n 20 "$SRV_LOG"
    return 1
  fi
  _st=$(cat "$SRV_RC")
  log "server exited with status $_st"
  tail -n 3 "$SRV_LOG"
  [ "$_st" = 0 ]
}

# Count of "client connected"/"client disconnected" lines in the current server log.
count_connected() { grep -c '"msg":"client connected"' "$SRV_LOG" 2>/dev/null; }
count_disconnected() { grep -c '"msg":"client disconnected"' "$SRV_LOG" 2>/dev/null; }

# ------------------------------------------------------------------ nbd

nbd_connected() { [ -e "$NBD_SYS/pid" ] && [ "$(cat "$NBD_SYS/size")" != 0 ]; }
nbd_disconnected() { [ ! -e "$NBD_SYS/pid" ] && [ "$(cat "$NBD_SYS/size")" = 0 ]; }

# size_bytes 256M -> 268435456
size_bytes() {
  echo "$1" | awk '{ n = $0 + 0; u = toupper(substr($0, length($0)));
    if (u == "K") n *= 1024; else if (u == "M") n *= 1048576; else if (u == "G") n *= 1073741824;
    printf "%d\n", n }'
}

# nbd_attach [EXTRA nbd-client ARGS...]: nbd-client to the running server,
# KT_CONNS connections, 4 KiB blocks, 10 s request timeout. Checks the device
# size and that the server saw KT_CONNS new connections.
nbd_attach() {
  _before=$(count_connected)
  if [ "$KT_TRANSPORT" = unix ]; then
    nbd-client -unix "$SOCK" "$DEV" -N "$EXPORT" -C "$KT_CONNS" -b 4096 -t 10 "$@" || return 1
  else
    nbd-client 127.0.0.1 "$PORT" "$DEV" -N "$EXPORT" -C "$KT_CONNS" -b 4096 -t 10 "$@" || return 1
  fi
  wait_for 10 nbd_connected || { log "device not connected"; return 1; }
  _want=$(size_bytes "$KT_SIZE")
  _got=$(($(cat "$NBD_SYS/size") * 512))
  [ "$_got" = "$_want" ] || { log "device size $_got, expected $_want"; return 1; }
  _wantc=$((_before + KT_CONNS))
  if ! wait_for 10 sh -c '[ "$(grep -c "\"msg\":\"client connected\"" "$0")" -ge "$1" ]' "$SRV_LOG" "$_wantc"; then
    log "server logged $(count_connected) client connections, expected $_wantc"
    return 1
  fi
  log "attached $DEV: $_got bytes, $KT_CONNS connection(s), ro=$(cat "$NBD_SYS/ro")"
}

# nbd_detach: nbd-client -d and wait until the device is gone.
nbd_detach() {
  nbd-client -d "$DEV" || return 1
  wait_for 30 nbd_disconnected || { log "device still connected 30 s after nbd-client -d"; return 1; }
}

# ------------------------------------------------------------ filesystem

mkfs_dev() {
  case "$KT_FS" in
    ext4) mkfs.ext4 -q -F -b 4096 "$DEV" ;;
    xfs) mkfs.xfs -q -f "$DEV" ;;
    *) log "unknown fs $KT_FS"; return 1 ;;
  esac
}

# fsck_dev: read-only check; exit 0 means clean.
fsck_dev() {
  case "$KT_FS" in
    ext4) e2fsck -fn "$DEV" ;;
    xfs) xfs_repair -n "$DEV" ;;
  esac
}

mount_dev() { mount -t "$KT_FS" "$@" "$DEV" "$MNT"; }

# run_fio ENGINE [FIO ARGS...]: randrw 4k over a 64 MiB file on the mounted
# filesystem with O_DIRECT, every written block verified (crc32c).
FIO_N=0
run_fio() {
  _engine=$1
  shift
  FIO_N=$((FIO_N + 1))
  _out="$R/fio-$FIO_N-$_engine.log"
  _file="$MNT/fio-$_engine.dat"
  fio --name="verify-$_engine" --filename="$_file" --rw=randrw --bs=4k --size=64M \
    --direct=1 --ioengine="$_engine" --verify=crc32c --verify_fatal=1 --do_verify=1 \
    --verify_state_save=0 --output="$_out" "$@"
  _rc=$?
  grep -E 'err=|IOPS=|verify|error|bad|mismatch' "$_out"
  if [ $_rc -ne 0 ]; then
    cat "$_out"
    return $_rc
  fi
  rm -f "$_file"
}

# make_stage: a tree of files with known checksums in tmpfs ($STAGE/tree),
# independent of the NBD path, and its manifest.
make_stage() {
  rm -rf "$STAGE/tree"
  _t="$STAGE/tree"
  mkdir -p "$_t/a/b/c" "$_t/zeros" "$_t/bin" "$_t/empty-dir"
  for _s in 0 1 511 512 4095 4096 4097 65536 131073 1000000 4194304; do
    head -c "$_s" /dev/urandom >"$_t/a/rand-$_s" || return 1
  done
  _i=0
  while [ $_i -lt 40 ]; do
    { echo "file $_i of the kernel test"; head -c $((_i * 97)) /dev/urandom; } >"$_t/a/b/c/small-$_i" || return 1
    _i=$((_i + 1))
  done
  head -c 2097152 /dev/zero >"$_t/zeros/zeros-2M" || return 1
  truncate -s 8M "$_t/zeros/sparse-8M" || return 1
  printf 'in the middle of a hole' | dd of="$_t/zeros/sparse-8M" bs=1 seek=4194304 conv=notrunc 2>/dev/null || return 1
  cp /usr/bin/fio "$_t/bin/fio-copy" || return 1
  (cd "$STAGE" && find tree -type f -exec sha256sum {} + | sort -k2) >"$MANIFEST" || return 1
  # A checksum known in advance: 2 MiB of zeros.
  grep -q '^5647f05ec18958947d32874eeb788fa396a05d0bab7c1b71f112ceb7e9b31eee  tree/zeros/zeros-2M$' "$MANIFEST" || {
    log "unexpected checksum for 2 MiB of zeros"
    return 1
  }
  log "staged $(wc -l <"$MANIFEST") files, $(du -sk "$_t" | cut -f1) KiB"
}

# write_tree [SUBDIR]: copy the staged tree onto the mounted filesystem.
write_tree() {
  [ -s "$MANIFEST" ] || make_stage || return 1
  cp -a "$STAGE/tree" "$MNT/" || return 1
}

# verify_tree: every file of the manifest is on the mounted filesystem with
# the same checksum.
verify_tree() {
  (cd "$MNT" && sha256sum -c --quiet "$MANIFEST") || return 1
  log "all $(wc -l <"$MANIFEST") files match their checksums"
}

# ------------------------------------------------ device-mapper fault injection

# dmsetup without udev (the guest runs none).
dmset() { DM_DISABLE_UDEV=1 dmsetup --noudevsync "$@"; }

# Loads dm-mod, dm-flakey and loop from the guest kernel's modules and checks
# that the flakey and error targets are there (live-eio.sh, snapshot-eio.sh).
load_modules() {
  for _m in drivers/md/dm-mod.ko drivers/md/dm-flakey.ko drivers/block/loop.ko; do
    [ -f "$KMOD/$_m" ] || { log "missing module $KMOD/$_m"; return 1; }
    busybox insmod "$KMOD/$_m" || { log "insmod $_m failed"; return 1; }
  done
  wait_for 10 test -c /dev/mapper/control || { log "no /dev/mapper/control"; return 1; }
  wait_for 10 test -e /dev/loop-control || { log "no /dev/loop-control"; return 1; }
  dmset targets | grep -q '^flakey' || { log "no flakey target"; return 1; }
  dmset targets | grep -q '^error' || { log "no error target"; return 1; }
}
