#!/bin/sh
# Power loss: one boot of the power-loss scenario (the host side,
# tools/kernel-power-loss.js, boots the guest again and again on the same
# disk and kills the whole user-mode Linux — kill -9 of its process group —
# at a random moment of each boot's workload: that is the power cut).
#
# The server's files are on a guest block device, not on hostfs: /dev/ubda
# is backed by the host file $KT_PL_DIR/disk.raw, ext4 made on the first
# boot, mounted on every boot (ext4 replays its journal after a cut). So a
# cut loses what the guest had not written to the device: its page cache
# (writes not flushed) and its tmpfs, including /dev/shm where the server
# keeps the journal of first writes (the default place, as designed).
#
# Each boot, with no manual step:
#   1. mount, `serve IMAGE --socket --merge-rate` (the volume must open:
#      a stale lock, a half-written manifest, a rollback merge left running
#      or an empty journal directory must not stop it);
#   2. power_loss.py checks what the previous cut left (snapshot list,
#      every snapshot export and the live volume against the model replayed
#      from the previous boot's event log) and writes the verdict on that
#      cut to $KT_PL_DIR/cut-N.json; every 10th boot also `snapshot list`
#      through the CLI;
#   3. the workload runs until the power goes: random 4 KiB writes on two
#      connections (some FUA, some write-zeroes and trims), FLUSHes, snapshot
#      create (each followed by a burst of first writes), delete and
#      rollback (through the control socket as the CLI sends them, or the
#      CLI itself), with merges slowed by --merge-rate so that they run at
#      cuts; every event is logged to the host before the request is sent
#      and after its reply is seen.
# The last boot (PL_MODE=final) checks the last cut, waits for merges
# (`jobs --wait`), stops the server with SIGTERM (exit 0, the journal file
# gone) and compares the raw image with the live volume it served.
# Parameters (from the host): KT_PL_DIR, PL_BOOT, PL_MODE (work|final),
# PL_SEED, PL_SIZE_MIB, PL_MERGE_RATE, PL_CLI_SHARE, PL_PID_SHIFT, PL_WRITEBACK,
# PL_CLEAR_LOCK.
. "$KT_ROOT/test/kernel/lib.sh"

PL="$KT_PL_DIR"
DATA="$RUN/data"
IMG="$DATA/disk.img"
PREV=$((PL_BOOT - 1))
# The inode locks go to TMPDIR: the guest's own tmpfs, as on a machine whose
# /tmp does not survive a reboot (not the host's /tmp through hostfs).
export TMPDIR="$RUN/tmp"
mkdir -p "$TMPDIR" "$DATA"

cli() { "$KT_NODE" "$KT_CLI" "$@"; }
py() {
  _mode=$1
  shift
  /usr/bin/python3 "$KT_ROOT/test/kernel/power_loss.py" "$_mode" --dir "$PL" --boot "$PL_BOOT" --image "$IMG" \
    --socket "$SOCK" --server-log "$SRV_LOG" --node "$KT_NODE" --cli "$KT_CLI" --seed "$PL_SEED" \
    --cli-share "$PL_CLI_SHARE" --chunk-size 16384 "$@"
}

# cut_failed REASON: the verdict on the previous cut when the checker could
# not run or did not finish (it writes its own otherwise), then fail.
cut_failed() {
  if [ "$PREV" -ge 0 ] && [ ! -s "$PL/cut-$PREV.json" ]; then
    py classify --reason "$1" || echo "{\"cut\":$PREV,\"ok\":false,\"phases\":[\"unknown\"],\"failures\":[\"$1\"]}" >"$PL/cut-$PREV.json"
  fi
  fail "$1"
}

shm() { mkdir -p /dev/shm && mount -t tmpfs -o mode=1777 tmpfs /dev/shm; }
make_image() { dd if=/dev/zero of="$IMG" bs=1M count="$PL_SIZE_MIB" conv=fsync 2>&1; }

# Writeback: with PL_WRITEBACK=fast the guest writes dirty pages older than
# 1 s back within 0.2 s, so at a cut some unflushed writes have reached the
# disk and others not (and files written a second before, like the PID in
# IMAGE.nbd/lock, are on it); otherwise the default 30 s, so nothing
# unflushed written during the boot survives.
fast_writeback() { echo 100 >/proc/sys/vm/dirty_expire_centisecs && echo 20 >/proc/sys/vm/dirty_writeback_centisecs; }

log "power-loss boot $PL_BOOT ($PL_MODE), seed $PL_SEED, writeback $PL_WRITEBACK"
[ "$PL_WRITEBACK" = fast ] && step "fast writeback (dirty pages older than 1 s)" fast_writeback
step "tmpfs on /dev/shm (the journal's default directory; lost at a cut)" shm
if [ "$PL_BOOT" = 0 ]; then
  step "mkfs.ext4 on /dev/ubda ($KT_PL_DIR/disk.raw)" mkfs.ext4 -q -F /dev/ubda
fi
mount -t ext4 /dev/ubda "$DATA" || cut_failed "mount /dev/ubda failed after the cut"
log "mounted /dev/ubda: $(ls -A "$DATA" "$DATA/disk.img.nbd" 2>/dev/null | tr '\n' ' ')"
if [ "$PL_BOOT" = 0 ]; then
  step "image: $PL_SIZE_MIB MiB of zeroes, allocated and synced" make_image
fi
# PIDs differ from boot to boot on a real machine; here the boot sequence is
# the same every time, so the server would always get the same PID and its
# stale IMAGE.nbd/lock would always name the new server itself. Start
# PL_PID_SHIFT short processes first (chosen by the host per boot).
step "shift PIDs by $PL_PID_SHIFT" sh -c 'i=0; while [ $i -lt "$0" ]; do /bin/true; i=$((i + 1)); done' "$PL_PID_SHIFT"
log "IMAGE.nbd/lock from the last boot: $(cat "$IMG.nbd/lock" 2>/dev/null || echo none)"
if [ "$PL_CLEAR_LOCK" = 1 ]; then
  # A manual step, only to look past a stale lock whose PID another process
  # of this boot has (NBD_POWER_CLEAR_LOCK=1 on the host); never by default.
  log "MANUAL STEP (NBD_POWER_CLEAR_LOCK=1): rm $IMG.nbd/lock"
  rm -f "$IMG.nbd/lock"
fi
SRV_LOG="$R/server-1.log" # start_server's first log name, known before it starts
start_server serve "$IMG" --socket "$SOCK" --merge-rate "$PL_MERGE_RATE" ||
  cut_failed "the volume does not open after the cut: serve did not start: $(grep -v '^{' "$SRV_LOG" | tail -n 1)"
sync_log

if [ "$PL_MODE" = final ] || [ $((PL_BOOT % 10)) = 1 ]; then
  step "snapshot list (CLI)" cli snapshot list "$IMG"
fi

if [ "$PL_MODE" = final ]; then
  py check-and-stop
  rc=$?
  [ $rc = 0 ] || cut_failed "checking cut $PREV failed (exit $rc)"
  step "jobs --wait (merges finish)" cli jobs "$IMG" --wait
  step "snapshot list (CLI) after the merges" cli snapshot list "$IMG"
  step "stop server (SIGTERM, exit 0)" stop_server
  step "journal file removed at stop" sh -c '[ -z "$(ls -A /dev/shm/node-nbd-server 2>/dev/null)" ]'
  step "raw image = the live volume the last check read" py verify-raw
  pass
fi

log "check cut $PREV, then the workload until the power goes"
sync_log
py check-and-work
rc=$?
cut_failed "power_loss.py exited ($rc) before the cut: the check failed or the workload stopped"
