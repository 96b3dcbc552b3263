#!/bin/sh
# kill -9 of the server while its device is mounted and busy. Files written
# and synced before the kill must survive; the I/O in flight must fail within
# the request timeout (nbd-client -t 10) instead of hanging (limit:
# KT_IO_LIMIT seconds); after a restart and re-attach the filesystem is
# consistent (journal replayed by mounting, then e2fsck -fn clean) and every
# synced file matches its checksum.
. "$KT_ROOT/test/kernel/lib.sh"

IMG="$R/disk.img"
: "${KT_IO_LIMIT:=60}"
BG_RC="$RUN/bg-io.rc"
BG_LOG="$R/bg-io.log"

# bg_io: write 2 MiB files with O_DIRECT + fsync in a loop until one fails.
bg_io() {
  mkdir -p "$MNT/bg" || return 1
  (
    i=0
    while dd if=/dev/urandom of="$MNT/bg/f$i" bs=64k count=32 oflag=direct conv=fsync 2>>"$BG_LOG"; do
      i=$((i + 1))
    done
    echo "dd failed after $i files" >>"$BG_LOG"
    echo 1 >"$BG_RC"
  ) &
  BG_PID=$!
}
bg_done() { [ -s "$BG_RC" ]; }
bg_files() { find "$MNT/bg" -type f 2>/dev/null | wc -l; }

# shellcheck disable=SC2046
step "start server" start_server serve "$IMG" --size "$KT_SIZE" $(serve_args)
step "stage files" make_stage
step "attach ($KT_TRANSPORT, -C $KT_CONNS, -t 10)" nbd_attach
step "mkfs.ext4" mkfs_dev
step "mount" mount_dev
step "write file tree" write_tree
step "sync" sync
step "start background I/O (dd oflag=direct conv=fsync loop)" bg_io
step "background I/O is running" wait_for 20 sh -c '[ "$(find "$0" -type f | wc -l)" -ge 3 ]' "$MNT/bg"
bg_done && fail "background I/O stopped before the kill: $(tail -n 3 "$BG_LOG")"
log "background I/O has written $(bg_files) files"

log "=== kill -9 server pid $SRV_PID"
kill -KILL "$SRV_PID" || fail "kill -9 failed"
T_KILL=$(now)
if ! wait_for "$KT_IO_LIMIT" bg_done; then
  log "background I/O still running $KT_IO_LIMIT s after the kill"
  cat "$BG_LOG"
  fail "I/O hangs: still running $KT_IO_LIMIT s after kill -9 of the server"
fi
log "--- background I/O failed $(since "$T_KILL")s after the kill"
tail -n 3 "$BG_LOG"
step "server process is gone" wait_for 10 server_exited
log "server exit status: $(cat "$SRV_RC") (137 = SIGKILL)"
T_RD=$(now)
expect_fail "direct read from the dead device" '' timeout "$KT_IO_LIMIT" dd if="$DEV" of=/dev/null bs=4096 count=1 iflag=direct
log "(read failed after $(since "$T_RD")s)"
step "umount the dead filesystem" timeout 60 umount "$MNT"
step "detach" nbd_detach

# shellcheck disable=SC2046
step "restart server" start_server serve "$IMG" $(serve_args)
step "re-attach" nbd_attach
# The image is what a power cut leaves: the journal may need replaying.
log "=== e2fsck -fn before journal replay (informational)"
e2fsck -fn "$DEV"
log "--- e2fsck exit $?"
step "mount (replays the journal)" mount_dev
step "compare checksums of the files synced before the kill" verify_tree
step "umount" umount "$MNT"
step "fsck after journal replay must be clean" fsck_dev
step "mount again" mount_dev
step "compare checksums again" verify_tree
step "write after restart" sh -c 'dd if=/dev/urandom of="$0/after" bs=64k count=16 oflag=direct conv=fsync' "$MNT"
step "umount" umount "$MNT"
step "fsck" fsck_dev
step "detach" nbd_detach
step "stop server (SIGTERM, exit 0)" stop_server
pass
