#!/bin/sh
# Faults on the LIVE IMAGE (the snapshot stores stay healthy), through real
# NBD clients (python3-libnbd: test/kernel/live-eio.py), in user-mode Linux.
#
# Layout: the image file lives on an ext4 (no fs journal, errors=continue,
# no reserved blocks) on a device-mapper device over a loop device; it is
# bind-mounted onto $RUN/vol/NAME.img, on tmpfs, which is the path the server
# is given. IMAGE.nbd/ (metaDir: the image's real path + ".nbd") is then on
# the healthy tmpfs: snapshot stores, manifest, journal.state, control
# socket; and no path lookup ever touches the failing filesystem. The
# first-write journal is in NBD_JOURNAL_DIR, on tmpfs too. Faults are
# injected by swapping the dm table: flakey with error_writes (reads pass,
# every write fails EIO), the error target (every I/O fails EIO); ENOSPC by a
# small filesystem filled up with a ballast file. Healing: the linear table
# again.
#
# The server's contract (docs/architecture.md, "Shutdown" and "First writes
# through a journal"): the first failed fdatasync of the image LATCHES it:
# from then on every request to that image (read, write, FLUSH, FUA) fails
# with EIO until the server restarts (Linux forgets a write-back error once
# reported and keeps the failed pages as clean ones, so a later FLUSH would
# lie and the data would silently revert once they are evicted). A write to a
# latched image fails before it preserves anything, so no snapshot is failed
# for it; queued first writes are not applied (they stay in the journal and
# the next start replays them); a stop logs "the image could not be flushed"
# and exits 1. A write that fails at once (ENOSPC) does not latch. What must
# hold after a restart: every write a successful FLUSH or FUA covered, and
# every write kept in the journal; a write acknowledged after the last
# successful FLUSH (or one that failed) may hold its old or its new data,
# sector by sector (the model of live-eio.py follows this); healthy
# snapshots stay active and exact.
#
# KT_CASE picks one path (each is its own scenario, booted on its own):
#   queued-eio     first writes queued (default --cow-journal). Stage A
#                  (flakey): first writes acknowledged and applied (page
#                  cache), reads show them; the FLUSH fails and latches the
#                  image: a later FLUSH fails too, writes fail without
#                  failing a snapshot, reads fail with EIO (never stale
#                  data, also once clean pages are dropped), snapshot create
#                  fails; SIGTERM exits 1 and says so; healed, a restart
#                  serves old or new data there, and the failed ranges can
#                  be rewritten. Stage B (error target): a sub-page first
#                  write whose apply must read the page stalls the queue (no
#                  latch: FLUSH fails, create/delete/rollback fail
#                  QUEUE_STALLED); a direct write is acknowledged and a FUA
#                  write then latches the image; SIGTERM keeps the journal,
#                  exits 1; healed, a restart on the same kernel (the pages
#                  whose write-back failed still cached) replays the kept
#                  write and serves data that does not change when clean
#                  pages are dropped.
#   queued-enospc  first writes queued, the image's filesystem full: the
#                  queue stalls (ENOSPC, no latch: reads work); the same
#                  QUEUE_STALLED contract; freeing space drains it while the
#                  server runs; a second stall over a SIGTERM (exit 0: the
#                  final flush succeeds) is replayed by the next start.
#   inline         --cow-journal 0: the preserve copy succeeds (store
#                  healthy) and the live write fails (FUA under flakey: the
#                  image latches, also after the device heals, until a
#                  restart; ENOSPC on a second volume on a full filesystem:
#                  no latch, the failed ranges can be rewritten once there
#                  is room); the snapshots stay exact.
#   merge          a rollback merge (--merge-rate small, so it runs) while
#                  the live device fails: the merge's FUA fails and latches
#                  the image; the merge reports the error and retries,
#                  pending chunks still read the snapshot's data, the rest
#                  fails with EIO, nothing hangs; healed, the merge stays
#                  unfinished until a restart, after which it finishes and
#                  live = the snapshot + the writes that could land.
#   handdown       `snapshot delete` of the newer of two snapshots while every
#                  I/O to live fails (nothing flushed: no latch): the
#                  hand-down reads from the stores and succeeds; nothing is
#                  lost.
#
# Every check is recorded in $R/checks ("ok - NAME" / "not ok - NAME") and the
# scenario goes on after a failed one; the verdict lists the failed checks.
# Failures of the set-up are fatal (step). Every client call runs under
# timeout(1): no answer within its limit is a hang, and a failed check.
. "$KT_ROOT/test/kernel/lib.sh"

: "${KT_CASE:=queued-eio}"
export NBD_JOURNAL_DIR="$RUN/journal"
IO="$KT_ROOT/test/kernel/live-eio.py"
MIB=1048576
KMOD="/usr/lib/uml/modules/$(uname -r)/kernel"
VOLDIR="$RUN/vol"
MODELS="$RUN/models"
CHECKS="$R/checks"
EIO_RE='Input/output error|EIO'
mkdir -p "$NBD_JOURNAL_DIR" "$VOLDIR" "$MODELS"
: >"$CHECKS"
N_OK=0
N_BAD=0
BAD=

cli() { "$KT_NODE" "$KT_CLI" "$@"; }
img() { echo "$VOLDIR/$1.img"; }

# ---------------------------------------------------------------- checks

# check NAME CMD [ARGS...]: CMD must succeed; the outcome is recorded and the
# scenario goes on either way.
check() {
  __c_name=$1
  shift
  __c_t0=$(now)
  log "=== check: $__c_name"
  "$@"
  __c_rc=$?
  if [ $__c_rc -eq 0 ]; then
    N_OK=$((N_OK + 1))
    echo "ok - $__c_name" >>"$CHECKS"
    log "--- ok ($(since "$__c_t0")s)"
  else
    N_BAD=$((N_BAD + 1))
    echo "not ok - $__c_name" >>"$CHECKS"
    BAD="${BAD:+$BAD; }$__c_name"
    log "--- NOT OK (exit $__c_rc, $(since "$__c_t0")s)"
  fi
  sync "$CHECKS" 2>/dev/null
  sync_log
  return $__c_rc
}

finish() {
  log "checks: $N_OK ok, $N_BAD not ok (listed in $CHECKS)"
  if [ "$N_BAD" -gt 0 ]; then
    fail "$N_BAD of $((N_OK + N_BAD)) checks failed: $BAD"
  fi
  pass
}

# --------------------------------------------------------------- clients

# io ARGS...: live-eio.py, 90 s at most (more is a hang).
io() {
  timeout 90 /usr/bin/python3 "$IO" "$@"
  __io_rc=$?
  [ $__io_rc -ne 124 ] || log "HANG: no answer within 90 s: live-eio.py $*"
  return $__io_rc
}
# w EXPORT TAG OFF LEN ok|error|any [fua]: a write of random data; the model follows.
w() { io write "$SOCK" "$1" "$MODELS/$1" "$2" "$3" "$4" "$5" $6; }
# fl VOLUME ok|error|any: a FLUSH; a successful one makes the model's disk view its live view.
fl() { io flush "$SOCK" "$1" "$MODELS/$1" "$2"; }
# verify EXPORT MODEL [OFF LEN] [--errors-ok]
verify() {
  __v_e=$1
  __v_m=$2
  shift 2
  io verify "$SOCK" "$__v_e" "$MODELS/$__v_m" "$@"
}
# verify_fails EXPORT [OFF LEN]: every read fails with EIO (a latched image).
verify_fails() { io verify-fails "$SOCK" "$@"; }
# on_disk NAME: the image file, read with O_DIRECT, matches the model's disk
# view: every write a FLUSH or FUA covered; old or new data where not.
on_disk() { io verify-file "$(img "$1")" "$MODELS/$1"; }
model_snap() { io snap "$MODELS/$1" "$2" >/dev/null; }
model_copy() { for __e in img mask cand log; do cp "$MODELS/$1.$__e" "$MODELS/$2.$__e" || return 1; done; }
# rewrite_failed VOLUME TAG ok|error: new data over every range a write failed
# on (and every sector not known exactly); each write must get that result.
rewrite_failed() { io rewrite-failed "$SOCK" "$1" "$MODELS/$1" "$2" "$3"; }

# cli_fails SECS CODES ARGS...: the CLI answers within SECS (more is a hang)
# and fails with one of CODES (an ERE of codes: the [CODE] ending its error
# line), QUEUE_STALLED with exit status 17.
cli_fails() {
  __f_secs=$1
  __f_codes=$2
  shift 2
  __f_out=$(timeout "$__f_secs" "$KT_NODE" "$KT_CLI" "$@" 2>&1)
  __f_rc=$?
  printf '%s\n' "$__f_out" | tail -n 2
  if [ $__f_rc -eq 124 ]; then
    log "HANG: no answer within $__f_secs s"
    return 1
  fi
  [ $__f_rc -ne 0 ] || { log "it succeeded; it must fail with [$__f_codes]"; return 1; }
  __f_last=$(printf '%s\n' "$__f_out" | tail -n 1)
  printf '%s\n' "$__f_last" | grep -Eq "\[($__f_codes)\]\$" || { log "exit $__f_rc, but not [$__f_codes]"; return 1; }
  if printf '%s\n' "$__f_last" | grep -q '\[QUEUE_STALLED\]$' && [ $__f_rc -ne 17 ]; then
    log "QUEUE_STALLED with exit $__f_rc, not 17"
    return 1
  fi
  log "failed as expected (exit $__f_rc)"
}

# cli_ok SECS ARGS...: the CLI succeeds within SECS.
cli_ok() {
  __o_secs=$1
  shift
  __o_out=$(timeout "$__o_secs" "$KT_NODE" "$KT_CLI" "$@" 2>&1)
  __o_rc=$?
  printf '%s\n' "$__o_out" | tail -n 3
  [ $__o_rc -ne 124 ] || { log "HANG: no answer within $__o_secs s"; return 1; }
  [ $__o_rc -eq 0 ] || { log "exit $__o_rc"; return 1; }
}

create_snapshot() {
  cli_ok 60 snapshot create "$(img "$1")" "$2" || return 1
  model_snap "$1" "$2"
}

# json IMAGE-ARGS... -- JS: run `node-nbd-server ARGS --json`, evaluate JS with `j` = its output.
json() {
  __j_js=$1
  shift
  __j_out=$(timeout 60 "$KT_NODE" "$KT_CLI" "$@" --json 2>"$RUN/json.err") || {
    cat "$RUN/json.err"
    log "$* --json failed"
    return 1
  }
  printf '%s' "$__j_out" | "$KT_NODE" -e '
    let s = ""; process.stdin.on("data", (d) => (s += d)).on("end", () => {
      const j = JSON.parse(s);
      const r = ('"$__j_js"');
      console.log(typeof r === "string" ? r : JSON.stringify(r));
    });'
}

# snap_state VOLUME NAME: "active", "failed: REASON", or "absent".
snap_state() {
  timeout 60 "$KT_NODE" "$KT_CLI" snapshot list "$(img "$1")" --json 2>/dev/null | "$KT_NODE" -e '
    let s = ""; process.stdin.on("data", (d) => (s += d)).on("end", () => {
      const x = JSON.parse(s).find((v) => v.name === process.argv[1]);
      console.log(!x ? "absent" : x.state + (x.failure ? ": " + x.failure.reason : ""));
    });' "$2"
}

snap_is() {
  __st=$(snap_state "$1" "$2")
  log "snapshot $1@$2: $__st"
  case "$__st" in "$3"*) return 0 ;; esac
  log "expected $3"
  return 1
}

# A snapshot is exact, or listed failed with a reason (never served as
# wrong data: a failed snapshot's export answers EIO).
exact_or_failed() {
  __st=$(snap_state "$1" "$2")
  log "snapshot $1@$2: $__st"
  case "$__st" in
    active) verify "$1@$2" "$1@$2" ;;
    "failed: "?*) return 0 ;;
    *) return 1 ;;
  esac
}

queued() { json 'j.firstWrites ? j.firstWrites.queued : -1' info "$(img "$1")"; }
queue_empty() { [ "$(queued "$1")" = 0 ]; }
first_write_mode() {
  __m=$(json 'j.firstWrites ? j.firstWrites.mode : "none"' info "$(img "$1")")
  log "first writes: $__m"
  [ "$__m" = "$2" ]
}

server_alive() {
  if server_exited; then
    tail -n 20 "$SRV_LOG"
    log "the server exited (status $(cat "$SRV_RC"))"
    return 1
  fi
  kill -0 "$SRV_PID"
}

# term_server: SIGTERM; the server must exit within 60 s (any status).
term_server() {
  log "SIGTERM to server pid $SRV_PID"
  kill -TERM "$SRV_PID" || return 1
  if ! wait_for 60 server_exited; then
    log "HANG: the server did not exit within 60 s of SIGTERM"
    tail -n 20 "$SRV_LOG"
    kill -KILL "$SRV_PID"
    return 1
  fi
  log "server exited with status $(cat "$SRV_RC")"
  grep -E '"level":(40|50|60)' "$SRV_LOG" | cut -c1-400 | tail -n 8
}

# The server's log says the queued writes were kept for the next start.
kept_logged() {
  grep 'could not be applied to the image' "$SRV_LOG" | grep -q 'keeps them for the next start' || {
    log "no 'queued first writes could not be applied to the image: ... keeps them for the next start' line"
    return 1
  }
  grep 'could not be applied to the image' "$SRV_LOG" | cut -c1-400
}

# flush_failed_logged EXPORT: the stop logged that EXPORT's image could not
# be flushed (an error-level line naming it).
flush_failed_logged() {
  grep '"msg":"the image could not be flushed' "$SRV_LOG" | grep -q "\"export\":\"$1\""
}

# stopped RC FAILED-VOLUMES OTHER-VOLUMES: SIGTERM; the server must exit
# within 60 s with status RC, having logged "the image could not be flushed"
# for each of FAILED-VOLUMES (space-separated) and for none of
# OTHER-VOLUMES. The models follow what the log says, whatever the check's
# outcome: a volume whose final flush failed keeps old or new data where no
# FLUSH covered its writes (io stop MODEL failed), the others are durable.
stopped() {
  __s_rc=$1
  __s_failed=$2
  __s_others=$3
  term_server || return 1
  __s_bad=
  [ "$(cat "$SRV_RC")" = "$__s_rc" ] || { log "exit status $(cat "$SRV_RC"), not $__s_rc"; __s_bad=1; }
  grep '"msg":"the image could not be flushed' "$SRV_LOG" | cut -c1-400
  for __s_v in $__s_failed $__s_others; do
    if flush_failed_logged "$__s_v"; then
      io stop "$MODELS/$__s_v" failed
      case " $__s_failed " in *" $__s_v "*) ;; *) log "the stop logged that $__s_v could not be flushed"; __s_bad=1 ;; esac
    else
      io stop "$MODELS/$__s_v" ok
      case " $__s_failed " in *" $__s_v "*) log "no 'the image could not be flushed' line for export $__s_v"; __s_bad=1 ;; esac
    fi
  done
  [ -z "$__s_bad" ]
}
# stopped_ok VOLUME...: exit 0, every final flush succeeded.
stopped_ok() { stopped 0 "" "$*"; }

# journal.state names a journal file that exists.
journal_named() {
  __jf="$(img "$1").nbd/journal.state"
  [ -f "$__jf" ] || { log "no $__jf"; return 1; }
  cat "$__jf"
  __jp=$(sed -n 's/^path=//p' "$__jf")
  [ -n "$__jp" ] && [ -f "$__jp" ] || { log "journal.state names $__jp, which does not exist"; return 1; }
}

# No journal is kept: journal.state names none, and NBD_JOURNAL_DIR is empty.
no_journal_kept() {
  __jf="$(img "$1").nbd/journal.state"
  [ ! -f "$__jf" ] || { cat "$__jf"; log "$__jf names a journal"; return 1; }
  __left=$(ls -A "$NBD_JOURNAL_DIR")
  [ -z "$__left" ] || { log "left in $NBD_JOURNAL_DIR: $__left"; return 1; }
}

replayed_logged() {
  grep '"msg":"applied first writes journalled before the last stop' "$SRV_LOG" | cut -c1-300 | grep . || {
    log "the server did not log a replay of the journal"
    return 1
  }
}

# -------------------------------------------------------- devices and fs


# make_fs NAME MIB: loop device over a tmpfs file, dm linear NAME over it,
# ext4 mounted at $RUN/NAME.fs. No fs journal (a failed jbd2 commit would
# abort the fs and turn every later error into EROFS), errors=continue,
# no reserved blocks (so "full" is full for everyone).
make_fs() {
  truncate -s "${2}M" "$RUN/$1.bin" || return 1
  _loop=$(losetup -f --show "$RUN/$1.bin") || return 1
  echo "$_loop" >"$RUN/$1.loop"
  dmset create "$1" --table "0 $(($2 * 2048)) linear $_loop 0" || return 1
  mkfs.ext4 -q -F -b 4096 -O ^has_journal -m 0 "/dev/mapper/$1" || return 1
  mkdir -p "$RUN/$1.fs"
  mount -t ext4 -o errors=continue "/dev/mapper/$1" "$RUN/$1.fs" || return 1
  # A probe file for the injection checks (allocated, synced).
  head -c 65536 /dev/urandom >"$RUN/$1.fs/probe" && sync
  log "fs $1: $2 MiB, $_loop, /dev/mapper/$1 on $RUN/$1.fs"
}

# set_table NAME linear|flakey|error: swap the dm table under the mounted fs
# (--nolockfs: no freeze, so dirty pages stay as they are).
set_table() {
  _loop=$(cat "$RUN/$1.loop")
  _sz=$(blockdev --getsz "$_loop")
  case "$2" in
    linear) _t="0 $_sz linear $_loop 0" ;;
    flakey) _t="0 $_sz flakey $_loop 0 0 3600 1 error_writes" ;;
    error) _t="0 $_sz error" ;;
  esac
  dmset suspend --nolockfs "$1" || return 1
  dmset load "$1" --table "$_t" || { dmset resume "$1"; return 1; }
  dmset resume "$1" || return 1
  log "dm $1 is now: $(dmset table "$1")"
}

probe_writes_fail() {
  _out=$(dd if=/dev/zero of="$RUN/$1.fs/probe" bs=4096 count=1 oflag=direct conv=notrunc 2>&1)
  _rc=$?
  [ $_rc -ne 0 ] || { log "an O_DIRECT write on $1 succeeded: no fault injected"; return 1; }
  echo "$_out" | grep -Eq "$EIO_RE" || { echo "$_out"; log "the write failed, but not with EIO"; return 1; }
}
probe_reads_pass() { dd if="$RUN/$1.fs/probe" of=/dev/null bs=4096 count=1 iflag=direct 2>&1 | tail -n 1; }
probe_reads_fail() {
  _out=$(dd if="$RUN/$1.fs/probe" of=/dev/null bs=4096 count=1 skip=1 iflag=direct 2>&1)
  _rc=$?
  [ $_rc -ne 0 ] || { log "an O_DIRECT read on $1 succeeded: no fault injected"; return 1; }
  echo "$_out" | grep -Eq "$EIO_RE" || { echo "$_out"; log "the read failed, but not with EIO"; return 1; }
}

# Only the page cache (clean pages): dentries stay, so nothing needs a lookup
# on a failing fs.
drop_page_cache() { echo 1 >/proc/sys/vm/drop_caches; }

# make_volume FS NAME MIB random|sparse: the image on FS, bind-mounted onto
# $VOLDIR/NAME.img; its model starts as its content.
make_volume() {
  _src="$RUN/$1.fs/$2.img"
  if [ "$4" = random ]; then
    head -c $(($3 * MIB)) /dev/urandom >"$_src" || return 1
  else
    truncate -s "${3}M" "$_src" || return 1
  fi
  sync
  : >"$(img "$2")"
  mount --bind "$_src" "$(img "$2")" || return 1
  io init "$MODELS/$2" "$(img "$2")"
}

# remount FS: unmount and mount again (every page of it leaves the cache:
# what is read after is what the disk holds). Bind mounts of its images too
# (those of images on other filesystems stay).
remount_fs() {
  for _b in "$VOLDIR"/*.img; do
    [ -f "$RUN/$1.fs/$(basename "$_b")" ] || continue
    grep -q " $_b " /proc/mounts && { umount "$_b" || return 1; }
  done
  umount "$RUN/$1.fs" || return 1
  mount -t ext4 -o errors=continue "/dev/mapper/$1" "$RUN/$1.fs" || return 1
  for _b in "$VOLDIR"/*.img; do
    _n=$(basename "$_b")
    [ -f "$RUN/$1.fs/$_n" ] && { mount --bind "$RUN/$1.fs/$_n" "$_b" || return 1; }
  done
  return 0
}

# ballast FS KIB: fill FS until KIB KiB are left.
fill_fs() {
  _avail=$(stat -f -c '%a %S' "$RUN/$1.fs" | awk '{ print $1 * $2 }')
  _want=$((_avail - $2 * 1024))
  fallocate -l "$_want" "$RUN/$1.fs/ballast" || return 1
  sync
  log "$1: $(stat -f -c '%a blocks of %S bytes' "$RUN/$1.fs") left"
}
free_fs() { rm -f "$RUN/$1.fs/ballast" && sync; }

serve() { start_server serve "$@" --socket "$SOCK" --log-level info; }

# ------------------------------------------------------------------ cases

case_queued_eio() {
  step "live fs (dm live, 96 MiB)" make_fs live 96
  step "volume disk: 16 MiB of random data on it" make_volume live disk 16 random
  step "start server (first writes queued: default --cow-journal)" serve "$(img disk)"
  step "snapshot create s0" create_snapshot disk s0
  step "healthy: rewrite R (MiB 0-2): s0 preserves it" w disk R 0 2M ok
  step "healthy: FLUSH" fl disk ok
  step "snapshot create s1 (holds nothing yet; s0 holds R)" create_snapshot disk s1
  check "healthy: the FLUSH made every acknowledged write durable" on_disk disk

  log "---- stage A: live device -> flakey error_writes (reads pass, writes fail): one failed FLUSH latches the image"
  step "flakey" set_table live flakey
  step "injection works: O_DIRECT writes fail with EIO" probe_writes_fail live
  step "injection works: reads pass" probe_reads_pass live
  check "A: first writes after a snapshot are acknowledged (into the journal)" w disk A1 8M 1M ok
  check "A: a 4 KiB first write is acknowledged" w disk A2 9437184 4K ok
  check "A: first writes go through the journal" first_write_mode disk journal
  check "A: reads show the acknowledged writes (no sync has failed yet)" verify disk disk
  check "A: FLUSH returns an NBD error" fl disk error
  # The original bug: Linux reported the write-back error once, and the
  # next fdatasync returned 0 although the data never reached the disk.
  check "A: a second FLUSH returns an NBD error too (a failed write-back is never forgotten)" fl disk error
  check "A: a FUA first write returns an NBD error" w disk A3 10M 4K error fua
  check "A: a write to a chunk s1 must preserve returns an NBD error (the image is latched)" w disk A4 0 4K error
  check "A: reads fail with EIO (never data the disk may not hold)" verify_fails disk
  if ! check "A: snapshot create fails within 60 s with [SNAPSHOT_CREATE_FAILED] or [QUEUE_STALLED] (the image cannot be flushed)" \
    cli_fails 60 'SNAPSHOT_CREATE_FAILED|QUEUE_STALLED' snapshot create "$(img disk)" sA; then
    if [ "$(snap_state disk sA)" = active ]; then
      log "sA was created: its point in time is the model now"
      model_snap disk sA
    fi
  fi
  check "A: s0 listed active" snap_is disk s0 active
  check "A: s1 listed active (a write refused by the latch preserves nothing and fails no snapshot)" snap_is disk s1 active
  check "A: disk@s0, the chunks in its store (R), exact" verify disk@s0 disk@s0 0 2M
  check "A: disk@s1, the chunks in its store (MiB 8-9 + 4 KiB, preserved before the apply), exact" verify disk@s1 disk@s1 8M 1M
  check "A: disk@s0 elsewhere reads the live image: fails with EIO" verify_fails disk@s0 4M 2M
  # Clean pages may leave the page cache at any time (memory pressure); a
  # page whose write-back failed is clean, and holds data the disk does not.
  step "drop clean pages" drop_page_cache
  check "A: after clean pages are dropped, reads still fail with EIO (never the old data)" verify_fails disk
  check "A: a third FLUSH, after clean pages are dropped, returns an NBD error" fl disk error
  check "A: the server runs" server_alive
  check "A: SIGTERM: exit 1, the log says the image could not be flushed" stopped 1 disk ""
  check "A: no journal is kept (every queued write was applied before the failed FLUSH)" no_journal_kept disk

  log "---- stage A, restart: live device -> linear (the pages whose write-back failed were dropped above)"
  step "heal" set_table live linear
  step "start server again" serve "$(img disk)"
  check "restart: reads show every write a FLUSH covered; the rest old or new (pinned as read)" verify disk disk --pin
  step "drop clean pages" drop_page_cache
  check "restart: after clean pages are dropped, reads show the same data (nothing reverts)" verify disk disk
  check "restart: s0 exact" verify disk@s0 disk@s0
  check "restart: s1 exact" verify disk@s1 disk@s1
  [ -f "$MODELS/disk@sA.img" ] && check "restart: sA (created after the failed FLUSH) exact, or listed failed with a reason" exact_or_failed disk sA
  check "restart: FLUSH succeeds" fl disk ok
  check "restart: the image (O_DIRECT) holds what reads showed" on_disk disk
  check "restart: the failed ranges can be rewritten" rewrite_failed disk A-again ok
  check "restart: FLUSH after the rewrite succeeds" fl disk ok
  check "restart: the image (O_DIRECT) holds every acknowledged write" on_disk disk

  log "---- stage B: live device -> error target (every I/O fails), clean pages dropped"
  step "snapshot create s2 (newest: first writes preserve into it)" create_snapshot disk s2
  step "error target" set_table live error
  step "drop clean pages" drop_page_cache
  step "injection works: reads fail with EIO" probe_reads_fail live
  # A 512-byte first write into chunk 128 (MiB 8: s1 holds it, s2 does
  # not): s2's preservation must read it (fails: s2 fails, s1 is not
  # involved), and its apply must read the page (not cached), which fails
  # at once: the queue stalls, nothing is synced, the image is not latched.
  check "B: a 512-byte first write (MiB 8 + 1 KiB) is acknowledged (into the journal)" w disk B1 8389632 512 ok
  check "B: FLUSH returns an NBD error (the queued write cannot be applied)" fl disk error
  log "queued first writes: $(queued disk)"
  check "B: snapshot create fails within 60 s with [QUEUE_STALLED] (exit 17) or [SNAPSHOT_CREATE_FAILED]" \
    cli_fails 60 'QUEUE_STALLED|SNAPSHOT_CREATE_FAILED' snapshot create "$(img disk)" sB
  check "B: snapshot delete s1 fails within 60 s with [QUEUE_STALLED] (exit 17)" \
    cli_fails 60 'QUEUE_STALLED' snapshot delete "$(img disk)" s1
  check "B: rollback to s0 fails within 60 s with [QUEUE_STALLED] (exit 17)" \
    cli_fails 60 'QUEUE_STALLED' rollback "$(img disk)" s0
  check "B: s0 listed active" snap_is disk s0 active
  check "B: s1 listed active" snap_is disk s1 active
  # A full-page write to chunk 130 (s1 holds it; s2 failed): no
  # preservation, not queued: it lands in the page cache.
  check "B: a full-page write that needs no preservation (MiB 8 + 128 KiB) is acknowledged" w disk D 8519680 4K ok
  check "B: a FUA write (MiB 8 + 192 KiB) returns an NBD error (its sync fails: the image latches)" w disk F 8585216 4K error fua
  check "B: FLUSH returns an NBD error" fl disk error
  check "B: a write elsewhere returns an NBD error (latched)" w disk B4 12M 4K error
  check "B: reads fail with EIO" verify_fails disk
  check "B: s0 listed active" snap_is disk s0 active
  check "B: s1 listed active" snap_is disk s1 active
  check "B: the server runs" server_alive
  # B1 is in the journal: the next start replays it.
  io kept "$MODELS/disk" 8389632 512
  check "B: SIGTERM: exit 1, the log says the image could not be flushed" stopped 1 disk ""
  check "B: the log says the queued writes were kept in the journal for the next start" kept_logged
  check "B: IMAGE.nbd/journal.state names the journal, which exists" journal_named disk

  # The restart runs on the same kernel, whose page cache still holds D's
  # and F's pages: their write-back failed, so they are clean and hold data
  # the disk does not. What the restarted server serves must not change
  # when they are evicted.
  log "---- stage B, recovery: live device -> linear, the same kernel (its page cache kept)"
  step "heal" set_table live linear
  step "start server again" serve "$(img disk)"
  check "recovery: the start replays the kept journal" replayed_logged
  # Pinned in a copy of the model, so that a revert fails this one check
  # and the model then follows what the disk holds.
  step "model: disk-seen = disk" model_copy disk disk-seen
  check "recovery: reads show every write a FLUSH covered and the replayed one; the rest old or new" verify disk disk-seen --pin
  check "recovery: FLUSH succeeds" fl disk ok
  step "drop clean pages" drop_page_cache
  check "recovery: after a successful FLUSH and dropping clean pages, reads show the same data (nothing reverts)" verify disk disk-seen
  check "recovery: reads (clean pages dropped) show every write a FLUSH covered and the replayed one; the rest old or new" verify disk disk --pin
  check "recovery: the image (O_DIRECT) holds what reads showed" on_disk disk
  check "recovery: s0 exact" verify disk@s0 disk@s0
  check "recovery: s1 exact" verify disk@s1 disk@s1
  check "recovery: s2 exact, or listed failed with a reason" exact_or_failed disk s2
  check "recovery: the failed ranges can be rewritten" rewrite_failed disk B-again ok
  check "recovery: FLUSH after the rewrite succeeds" fl disk ok
  check "recovery: SIGTERM, exit 0" stopped_ok disk
  step "remount the live fs (what the disk holds)" remount_fs live
  check "recovery: the raw image (after a remount) holds every acknowledged write" on_disk disk
}

case_queued_enospc() {
  step "small fs (dm small, 40 MiB)" make_fs small 40
  step "volume disk: 16 MiB sparse on it" make_volume small disk 16 sparse
  step "start server (first writes queued)" serve "$(img disk)"
  step "snapshot create s0" create_snapshot disk s0
  step "healthy: write MiB 0-1 (allocates it; s0 preserves it)" w disk H1 0 1M ok
  step "healthy: FLUSH" fl disk ok
  step "fill the fs (256 KiB left)" fill_fs small 256
  check "full: a 1 MiB first write into a hole is acknowledged (into the journal)" w disk E1 4M 1M ok
  check "full: reads show it" verify disk disk
  check "full: FLUSH returns an NBD error" fl disk error
  check "full: a second FLUSH returns an NBD error too" fl disk error
  check "full: a FUA first write returns an NBD error" w disk E2 6M 4K error fua
  check "full: snapshot create fails within 60 s with [QUEUE_STALLED] (exit 17) or [SNAPSHOT_CREATE_FAILED]" \
    cli_fails 60 'QUEUE_STALLED|SNAPSHOT_CREATE_FAILED' snapshot create "$(img disk)" s9
  check "full: snapshot delete s0 fails within 60 s with [QUEUE_STALLED] (exit 17)" \
    cli_fails 60 'QUEUE_STALLED' snapshot delete "$(img disk)" s0
  check "full: rollback to s0 fails within 60 s with [QUEUE_STALLED] (exit 17)" \
    cli_fails 60 'QUEUE_STALLED' rollback "$(img disk)" s0
  check "full: a new first write elsewhere gets an NBD error or succeeds (within 90 s)" w disk E3 12M 4K any
  check "full: an overwrite of allocated data s0 holds gets an NBD error or succeeds (within 90 s)" w disk E4 65536 4K any
  check "full: reads still show every acknowledged write (ENOSPC does not latch)" verify disk disk
  check "full: s0 listed active" snap_is disk s0 active
  step "free the space" free_fs small
  check "room again: the queue drains by itself (info: 0 queued, within 60 s)" wait_for 60 queue_empty disk
  check "room again: FLUSH succeeds" fl disk ok
  check "room again: every acknowledged write is on the disk" on_disk disk
  check "room again: snapshot create s1" create_snapshot disk s1

  step "fill the fs again (256 KiB left)" fill_fs small 256
  check "full again: a 1 MiB first write into a hole is acknowledged" w disk E5 8M 1M ok
  check "full again: FLUSH returns an NBD error" fl disk error
  # E5 is in the journal: the next start replays it.
  io kept "$MODELS/disk" 8M 1M
  check "full again: SIGTERM: exit 0 (ENOSPC does not latch: the final flush succeeds)" stopped 0 "" disk
  check "full again: the log says the queued writes were kept in the journal for the next start" kept_logged
  check "full again: IMAGE.nbd/journal.state names the journal, which exists" journal_named disk
  step "free the space" free_fs small
  step "start server again" serve "$(img disk)"
  check "next start: the kept journal is replayed" replayed_logged
  check "next start: the live export holds every acknowledged write" verify disk disk
  check "next start: s0 exact" verify disk@s0 disk@s0
  check "next start: s1 exact" verify disk@s1 disk@s1
  check "next start: SIGTERM, exit 0" stopped_ok disk
  step "remount the fs" remount_fs small
  check "the raw image (after a remount) holds every acknowledged write" on_disk disk
}

case_inline() {
  step "live fs (dm live, 96 MiB)" make_fs live 96
  step "small fs (dm small, 40 MiB)" make_fs small 40
  step "volume disk: 16 MiB random on live" make_volume live disk 16 random
  step "volume tiny: 16 MiB sparse on small" make_volume small tiny 16 sparse
  step "start server --cow-journal 0 (first writes preserved inline)" serve "$(img disk)" "$(img tiny)" --cow-journal 0
  step "snapshot create disk s0" create_snapshot disk s0
  step "snapshot create tiny t0" create_snapshot tiny t0
  step "healthy: write disk MiB 0-1 (s0 preserves it)" w disk H1 0 1M ok
  step "healthy: write tiny MiB 0-1" w tiny H2 0 1M ok
  step "healthy: FLUSH disk" fl disk ok
  step "healthy: FLUSH tiny" fl tiny ok
  check "healthy: first writes are inline" first_write_mode disk inline

  log "---- live device of disk -> flakey error_writes"
  step "flakey" set_table live flakey
  step "injection works: O_DIRECT writes fail with EIO" probe_writes_fail live
  step "injection works: reads pass" probe_reads_pass live
  check "EIO: a FUA first write gets an NBD error (its sync fails: the image latches)" w disk F1 4M 64K error fua
  check "EIO: a first write (no FUA) gets an NBD error (latched)" w disk F2 6M 64K error
  check "EIO: FLUSH returns an NBD error" fl disk error
  check "EIO: a second FLUSH returns an NBD error too (a failed write-back is never forgotten)" fl disk error
  check "EIO: s0 listed active (the old data was preserved before the live write; F2 preserved nothing)" snap_is disk s0 active
  check "EIO: disk@s0 MiB 0-1 (its store) exact" verify disk@s0 disk@s0 0 1M
  check "EIO: disk@s0 MiB 4 + 64 KiB (preserved for F1) exact" verify disk@s0 disk@s0 4M 64K
  check "EIO: disk@s0 elsewhere reads the live image: fails with EIO" verify_fails disk@s0 8M 2M
  check "EIO: reads of live fail with EIO (never stale data)" verify_fails disk
  step "drop clean pages" drop_page_cache
  check "EIO: after clean pages are dropped, reads of live still fail with EIO" verify_fails disk

  log "---- the fs of tiny full"
  step "fill small (256 KiB left)" fill_fs small 256
  check "ENOSPC: a 1 MiB first write into a hole gets an NBD error" w tiny N1 4M 1M error
  check "ENOSPC: a FUA first write into a hole gets an NBD error" w tiny N2 8M 64K error fua
  check "ENOSPC: t0 listed active" snap_is tiny t0 active
  check "ENOSPC: tiny@t0 exact" verify tiny@t0 tiny@t0
  check "ENOSPC: reads of live tiny work (no latch) and never return wrong data" verify tiny tiny
  step "free the space" free_fs small
  check "room again: the failed ranges of tiny can be rewritten" rewrite_failed tiny N-again ok
  check "room again: FLUSH tiny succeeds (ENOSPC did not latch)" fl tiny ok
  check "room again: the image of tiny (O_DIRECT) holds every acknowledged write" on_disk tiny
  check "room again: tiny@t0 exact" verify tiny@t0 tiny@t0

  log "---- live device -> linear, the same server: disk stays latched until a restart"
  step "heal" set_table live linear
  check "healed, same server: FLUSH disk returns an NBD error" fl disk error
  check "healed, same server: a rewrite of the failed ranges of disk gets NBD errors" rewrite_failed disk F-latched error
  check "healed, same server: reads of disk fail with EIO" verify_fails disk
  check "healed, same server: tiny works (the latch is per image)" w tiny T1 2M 4K ok
  check "healed, same server: FLUSH tiny succeeds" fl tiny ok
  check "SIGTERM: exit 1, the log says disk (not tiny) could not be flushed" stopped 1 disk tiny

  log "---- restart (the live fs remounted: reads show what the disk holds)"
  step "remount the live fs" remount_fs live
  step "start server again" serve "$(img disk)" "$(img tiny)" --cow-journal 0
  check "restart: disk holds every write a FLUSH covered; the failed ones old or new (pinned as read)" verify disk disk --pin
  check "restart: disk@s0 exact" verify disk@s0 disk@s0
  check "restart: tiny holds every acknowledged write" verify tiny tiny
  check "restart: tiny@t0 exact" verify tiny@t0 tiny@t0
  check "restart: the failed ranges of disk can be rewritten" rewrite_failed disk F-again ok
  check "restart: FLUSH disk succeeds" fl disk ok
  step "drop clean pages" drop_page_cache
  check "restart: the live export (clean pages dropped) holds every acknowledged write" verify disk disk
  check "restart: SIGTERM, exit 0" stopped_ok disk tiny
  step "remount the live fs" remount_fs live
  check "the raw image of disk (after a remount) holds every acknowledged write" on_disk disk
  step "remount the small fs" remount_fs small
  check "the raw image of tiny (after a remount) holds every acknowledged write" on_disk tiny
}

# merge_state: "DONE TOTAL ERROR" of the volume's running merge, or "none".
merge_state() {
  json 'j.length === 0 ? "none" : [j[0].done, j[0].total, j[0].error ? JSON.stringify(j[0].error) : "-"].join(" ")' jobs "$(img disk)"
}
merge_running() {
  __ms=$(merge_state)
  log "merge: $__ms"
  [ "$__ms" != none ] && [ "${__ms%% *}" != "$(echo "$__ms" | cut -d' ' -f2)" ]
}
merge_error_shown() {
  __ms=$(merge_state)
  case "$__ms" in none | *" -") return 1 ;; esac
  log "merge: $__ms"
}
merge_finished() { [ "$(merge_state)" = none ]; }
MERGE_DONE_AT_FAULT=
merge_frozen() {
  __ms=$(merge_state)
  log "merge: $__ms (done when the device failed: $MERGE_DONE_AT_FAULT)"
  [ "$__ms" != none ] || { log "the merge finished while the device failed"; return 1; }
  case "$__ms" in *" -") log "no error shown"; return 1 ;; esac
}
history_merge_finished() {
  cli history "$(img disk)" --json >"$RUN/history.json" || return 1
  grep -q 'merge-finished' "$RUN/history.json" || { cat "$RUN/history.json"; log "no merge-finished entry"; return 1; }
}

case_merge() {
  step "live fs (dm live, 96 MiB)" make_fs live 96
  step "volume disk: 16 MiB random" make_volume live disk 16 random
  # 128 KiB/s: the 3 MiB + 64 KiB to merge take at least 24 s (a throttle,
  # so the merge is surely running when the device fails).
  step "start server --merge-rate 128K" serve "$(img disk)" --merge-rate 128K
  step "snapshot create s0" create_snapshot disk s0
  step "healthy: rewrite MiB 4-7" w disk M1 4M 3M ok
  step "healthy: rewrite MiB 12 + 64 KiB (merged last: the merge goes in chunk order)" w disk M2 12M 64K ok
  step "healthy: FLUSH" fl disk ok
  step "rollback to s0 (online)" cli_ok 60 rollback "$(img disk)" s0
  # The live volume shows s0 now, and the merge makes the image s0 (its
  # steps write with FUA); the model follows (its log stays, to name writes).
  step "model: disk = disk@s0" io assign "$MODELS/disk" "$MODELS/disk@s0"
  step "flakey (reads pass, writes fail)" set_table live flakey
  step "injection works: O_DIRECT writes fail with EIO" probe_writes_fail live
  MERGE_DONE_AT_FAULT=$(merge_state)
  check "the merge was running when the device failed" merge_running
  # A merge step writes with FUA: its sync fails and latches the image.
  check "flakey: the merge reports the error (jobs --json, within 60 s)" wait_for 60 merge_error_shown
  check "flakey: chunks still pending (MiB 12 + 64 KiB) read the snapshot's data from its store" verify disk disk 12M 64K
  check "flakey: chunks not pending (MiB 0-1) read the live image: fail with EIO (latched)" verify_fails disk 0 1M
  check "flakey: reads never return wrong data" verify disk disk --errors-ok
  check "flakey: a write to a pending chunk gets an NBD error (latched)" w disk P1 5M 4K error
  check "flakey: a FUA write to a chunk not pending gets an NBD error" w disk P2 14M 4K error fua
  check "flakey: FLUSH returns an NBD error" fl disk error

  step "error target (every I/O fails)" set_table live error
  step "drop clean pages" drop_page_cache
  step "injection works: reads fail with EIO" probe_reads_fail live
  check "error: the merge has not finished, and shows an error" merge_frozen
  check "error: reads of chunks still pending (MiB 12 + 64 KiB) read the snapshot's data from its store" verify disk disk 12M 64K
  check "error: reads elsewhere never return wrong data" verify disk disk --errors-ok
  check "error: a write to a pending chunk gets an NBD error" w disk P3 12M 4K error
  check "error: the server runs" server_alive

  log "---- live device -> linear, the same server: the image stays latched until a restart"
  step "heal" set_table live linear
  check "healed, same server: the merge has not finished, and shows an error" merge_frozen
  check "healed, same server: FLUSH returns an NBD error" fl disk error
  check "healed, same server: a rewrite of the failed ranges gets NBD errors" rewrite_failed disk P-latched error
  check "healed, same server: pending chunks (MiB 12 + 64 KiB) still read the snapshot's data" verify disk disk 12M 64K
  check "SIGTERM: exit 1, the log says the image could not be flushed" stopped 1 disk ""

  log "---- restart (the live fs remounted: reads show what the disk holds)"
  step "remount the live fs" remount_fs live
  step "start server again --merge-rate 128K" serve "$(img disk)" --merge-rate 128K
  check "restart: the merge resumes and finishes (within 120 s)" wait_for 120 merge_finished
  check "restart: the history has merge-finished" history_merge_finished
  check "restart: the live export = s0; the failed writes old or new (pinned as read)" verify disk disk --pin
  check "restart: disk@s0 exact" verify disk@s0 disk@s0
  check "restart: the failed ranges can be rewritten" rewrite_failed disk P-again ok
  check "restart: FLUSH succeeds" fl disk ok
  check "restart: the live export = s0 + every acknowledged later write" verify disk disk
  check "restart: SIGTERM, exit 0" stopped_ok disk
  step "remount the live fs" remount_fs live
  check "the raw image (after a remount) holds s0 + every later write" on_disk disk
}

case_handdown() {
  step "live fs (dm live, 96 MiB)" make_fs live 96
  step "volume disk: 16 MiB random" make_volume live disk 16 random
  step "start server (first writes queued)" serve "$(img disk)"
  step "snapshot create s0" create_snapshot disk s0
  step "rewrite A (MiB 0-2): s0 preserves it" w disk A 0 2M ok
  step "snapshot create s1" create_snapshot disk s1
  step "rewrite B (MiB 4-6): s1 preserves it; s0 reads it through s1" w disk B 4M 2M ok
  step "rewrite MiB 1-1.5 (s1 preserves; s0 holds it already)" w disk A2 1M 512K ok
  step "FLUSH (every queued write applied)" fl disk ok
  step "s0 exact before" verify disk@s0 disk@s0
  step "s1 exact before" verify disk@s1 disk@s1

  log "---- live device -> error target (every I/O fails), clean pages dropped"
  step "error target" set_table live error
  step "drop clean pages" drop_page_cache
  step "injection works: reads fail with EIO" probe_reads_fail live
  check "error: snapshot delete s1 succeeds within 60 s (the hand-down reads the stores)" cli_ok 60 snapshot delete "$(img disk)" s1
  check "error: s1 is gone" snap_is disk s1 absent
  check "error: s0 listed active" snap_is disk s0 active
  check "error: disk@s0 MiB 0-2 (its own chunks) exact" verify disk@s0 disk@s0 0 2M
  check "error: disk@s0 MiB 4-6 (handed down from s1) exact" verify disk@s0 disk@s0 4M 2M
  check "error: disk@s0 elsewhere never returns wrong data" verify disk@s0 disk@s0 --errors-ok
  check "error: the live export never returns wrong data" verify disk disk --errors-ok
  check "error: the server runs" server_alive

  log "---- recovery: live device -> linear"
  step "heal" set_table live linear
  check "recovery: disk@s0 exact" verify disk@s0 disk@s0
  check "recovery: the live export holds every acknowledged write" verify disk disk
  check "recovery: SIGTERM, exit 0 (nothing was synced while the device failed: no latch)" stopped_ok disk
  step "start server again" serve "$(img disk)"
  check "restart: disk@s0 exact (the handed-down chunks are in its store)" verify disk@s0 disk@s0
  check "restart: SIGTERM, exit 0" stopped_ok disk
  step "remount the live fs" remount_fs live
  check "the raw image (after a remount) holds every acknowledged write" on_disk disk
}

# ------------------------------------------------------------------- run

step "load dm-mod, dm-flakey, loop" load_modules
case "$KT_CASE" in
  queued-eio) case_queued_eio ;;
  queued-enospc) case_queued_enospc ;;
  inline) case_inline ;;
  merge) case_merge ;;
  handdown) case_handdown ;;
  *) fail "unknown KT_CASE $KT_CASE" ;;
esac
finish
