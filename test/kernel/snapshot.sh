#!/bin/sh
# An online snapshot of a mounted ext4 filesystem, read back through the real
# kernel client. The server serves the image; /dev/nbd0 holds a mounted ext4
# with a tree of files of known checksums; after sync, `snapshot create` runs
# while it stays mounted (the CLI reaches the server through the control
# socket). Then the live files are overwritten, deleted and their blocks
# reused, and synced. The snapshot export disk@NAME is attached read-only on
# /dev/nbd1 and mounted with -o ro,noload (its journal may be dirty: the
# snapshot is what a power cut at that moment would have left): every old file
# must match its checksum, also after more live writes, and the snapshot must
# refuse writes. Then the live filesystem must fsck clean, the server exits 0,
# and the snapshot is listed and deleted offline.
# Parameters: KT_TRANSPORT (tcp|unix), KT_CONNS (for the live device), KT_SIZE.
. "$KT_ROOT/test/kernel/lib.sh"

IMG="$R/disk.img"
SNAP=before-changes
SNAP_DEV=/dev/nbd1
SNAP_SYS=/sys/block/nbd1
SNAP_MNT="$RUN/snapmnt"
ERR_RO='Read-only file system|Operation not permitted|Permission denied|Input/output error'
mkdir -p "$SNAP_MNT"

cli() { "$KT_NODE" "$KT_CLI" "$@"; }

snap_connected() { [ -e "$SNAP_SYS/pid" ] && [ "$(cat "$SNAP_SYS/size")" != 0 ]; }
snap_disconnected() { [ ! -e "$SNAP_SYS/pid" ] && [ "$(cat "$SNAP_SYS/size")" = 0 ]; }

# create_snapshot: online, while $MNT stays mounted; the server must do it.
create_snapshot() {
  _out=$(cli snapshot create "$IMG" "$SNAP" 2>&1)
  _rc=$?
  echo "$_out"
  [ $_rc -eq 0 ] || return 1
  [ "$_out" = "created snapshot $SNAP (export $EXPORT@$SNAP)" ] || { log "unexpected output"; return 1; }
  grep -q "\"snapshot\":\"$SNAP\".*\"msg\":\"snapshot created\"" "$SRV_LOG" || { log "the server did not log the snapshot (not created online?)"; return 1; }
  mountpoint -q "$MNT" || { log "$MNT is no longer mounted"; return 1; }
}

# json_field EXPR: evaluates EXPR (JavaScript, `s` = snapshot $SNAP from
# `snapshot list --json`, or undefined) and prints the result.
json_field() {
  cli snapshot list "$IMG" --json >"$RUN/list.json" || return 1
  "$KT_NODE" -e 'const l = JSON.parse(require("fs").readFileSync(process.argv[1], "utf8"));
    const s = l.find((x) => x.name === process.argv[2]);
    console.log(String(eval(process.argv[3])));' "$RUN/list.json" "$SNAP" "$1"
}

# snapshot_state STATE: `snapshot list --json` shows $SNAP in STATE.
snapshot_state() {
  _st=$(json_field 's && s.state') || return 1
  log "snapshot $SNAP: state $_st"
  [ "$_st" = "$1" ]
}

# change_live_tree: overwrite in place, truncate, delete, and reuse the freed blocks.
change_live_tree() {
  dd if=/dev/urandom of="$MNT/tree/a/rand-4194304" bs=4096 count=512 conv=notrunc,fsync 2>/dev/null || return 1
  dd if=/dev/urandom of="$MNT/tree/a/rand-1000000" bs=4096 seek=10 count=50 conv=notrunc,fsync 2>/dev/null || return 1
  : >"$MNT/tree/zeros/zeros-2M" || return 1
  rm -rf "$MNT/tree/a/b" "$MNT/tree/bin" || return 1
  echo "changed after the snapshot" >"$MNT/tree/a/rand-0" || return 1
  dd if=/dev/urandom of="$MNT/filler" bs=1M count=96 conv=fsync 2>/dev/null || return 1
  sync
}

# live_tree_changed: the live files must no longer match the manifest.
live_tree_changed() {
  if (cd "$MNT" && sha256sum -c --quiet "$MANIFEST" >/dev/null 2>&1); then
    log "the live tree still matches the old checksums: the changes did not happen"
    return 1
  fi
  [ ! -e "$MNT/tree/a/b" ] || return 1
}

attach_snapshot() {
  if [ "$KT_TRANSPORT" = unix ]; then
    nbd-client -unix "$SOCK" "$SNAP_DEV" -N "$EXPORT@$SNAP" -b 4096 -t 10 -readonly || return 1
  else
    nbd-client 127.0.0.1 "$PORT" "$SNAP_DEV" -N "$EXPORT@$SNAP" -b 4096 -t 10 -readonly || return 1
  fi
  wait_for 10 snap_connected || { log "$SNAP_DEV not connected"; return 1; }
  _want=$(size_bytes "$KT_SIZE")
  _got=$(($(cat "$SNAP_SYS/size") * 512))
  [ "$_got" = "$_want" ] || { log "$SNAP_DEV size $_got, expected $_want"; return 1; }
  [ "$(cat "$SNAP_SYS/ro")" = 1 ] || { log "$SNAP_DEV is not read-only"; return 1; }
  log "attached $SNAP_DEV: export $EXPORT@$SNAP, $_got bytes, read-only"
}

detach_snapshot() {
  nbd-client -d "$SNAP_DEV" || return 1
  wait_for 30 snap_disconnected || { log "$SNAP_DEV still connected 30 s after nbd-client -d"; return 1; }
}

verify_snapshot_tree() {
  (cd "$SNAP_MNT" && sha256sum -c --quiet "$MANIFEST") || return 1
  log "all $(wc -l <"$MANIFEST") files of the snapshot match their old checksums"
}

snapshot_files_gone() {
  _left=$(ls "$IMG.nbd" | grep '^snap-')
  [ -z "$_left" ] || { log "left behind: $_left"; return 1; }
}

# shellcheck disable=SC2046
step "start server" start_server serve "$IMG" --size "$KT_SIZE" $(serve_args)
step "stage files" make_stage
step "attach live device ($KT_TRANSPORT, -C $KT_CONNS)" nbd_attach
step "mkfs.ext4" mkfs_dev
step "mount" mount_dev
step "write file tree" write_tree
step "sync" sync
step "snapshot create (online, filesystem mounted)" create_snapshot
step "snapshot listed as active" snapshot_state active
step "overwrite, truncate, delete, refill the live files; sync" change_live_tree
step "live tree changed" live_tree_changed
PRESERVED=$(json_field 's && s.preservedChunks')
log "snapshot $SNAP preserved $PRESERVED chunks"
step "the snapshot preserved old data" test "${PRESERVED:-0}" -gt 0
step "attach $EXPORT@$SNAP read-only on $SNAP_DEV" attach_snapshot
step "mount the snapshot -o ro,noload" mount -t ext4 -o ro,noload "$SNAP_DEV" "$SNAP_MNT"
step "old files intact in the snapshot" verify_snapshot_tree
expect_fail "create a file on the snapshot" "$ERR_RO" sh -c 'echo x >"$0/new-file"' "$SNAP_MNT"
step "more live writes while the snapshot is mounted" sh -c 'dd if=/dev/urandom of="$0/filler2" bs=1M count=32 conv=fsync 2>/dev/null && rm -rf "$0/tree" && sync' "$MNT"
step "drop the snapshot's page cache" sh -c 'echo 3 >/proc/sys/vm/drop_caches'
step "old files still intact in the snapshot" verify_snapshot_tree
step "umount the snapshot" umount "$SNAP_MNT"
expect_fail "dd to the snapshot device" "$ERR_RO" dd if=/dev/zero of="$SNAP_DEV" bs=4096 count=1 oflag=direct conv=fsync
step "detach $SNAP_DEV" detach_snapshot
step "umount the live filesystem" umount "$MNT"
step "live fsck (read-only check) clean" fsck_dev
step "detach live device" nbd_detach
step "stop server (SIGTERM, exit 0)" stop_server
step "snapshot listed offline, still active" snapshot_state active
step "snapshot delete (offline)" cli snapshot delete "$IMG" "$SNAP"
step "snapshot files removed" snapshot_files_gone
step "no snapshots left" sh -c '[ "$("$0" "$1" snapshot list "$2" --json | tr -d " \n")" = "[]" ]' "$KT_NODE" "$KT_CLI" "$IMG"
pass
