#!/bin/sh
# Rollback to a snapshot, through the real kernel client, and the
# on-disconnect auto-rollback policy.
#
# Part 1, `rollback` by command, online: the server serves the image;
# /dev/nbd0 holds an ext4 with a tree of files of known checksums; after sync,
# `snapshot create golden` runs while it is mounted (frozen for that moment).
# Then files are overwritten, appended to, truncated, deleted and new ones
# added, 60% of the device filled, synced, and the filesystem unmounted — the
# device stays attached and the server keeps serving — and `rollback IMAGE
# golden` runs (the server does it: the CLI reaches it through the control
# socket). At once, while the merge copies the snapshot's data back, 1 MiB is
# written straight to the device at two places the merge has to copy (blocks
# free in the snapshot's filesystem): those writes must survive the merge.
# The kernel's page cache of /dev/nbd0 may still hold blocks read before the
# rollback, so it is flushed (blockdev --flushbufs), as it must be whenever a
# device's content changes under the kernel. Then e2fsck -fn must be clean and
# the old files back with their old checksums and nothing else (the new files
# gone), while the merge may still run. After `jobs --wait`: `history --json`
# holds the rollback (trigger "command") and its merge-finished entry; the
# writes made during the merge read back intact; fsck and every file again.
#
# Part 2, auto-rollback=on-disconnect: `snapshot set IMAGE golden
# auto-rollback=on-disconnect`; change the files, umount, detach the device
# (nbd-client -d): the volume's last client leaving rolls it back. Re-attach:
# fsck clean, the golden content is back, history has trigger
# "policy:on-disconnect". Then `auto-rollback=off`: a detach keeps the changes.
# Parameters: KT_TRANSPORT (tcp|unix), KT_CONNS, KT_SIZE (ext4 only).
. "$KT_ROOT/test/kernel/lib.sh"

IMG="$R/disk.img"
SNAP=golden
NEW_SUMS="$RUN/new.sha256"         # files made after the snapshot (must be gone after a rollback)
# Part 1 fills 60% of the device after the snapshot, so the merge has enough
# to copy to still run while the next steps write.
BIG_FILL=$(($(size_bytes "$KT_SIZE") / 1048576 * 6 / 10))

cli() { "$KT_NODE" "$KT_CLI" "$@"; }

# json EXPR CMD...: runs CMD (a CLI command printing JSON), evaluates EXPR
# (JavaScript, `j` = the parsed output) and prints the result.
json() {
  _expr=$1
  shift
  cli "$@" >"$RUN/out.json" || return 1
  "$KT_NODE" -e 'const j = JSON.parse(require("fs").readFileSync(process.argv[1], "utf8"));
    console.log(String(eval(process.argv[2])));' "$RUN/out.json" "$_expr"
}

# count_history EVENT [TRIGGER]: entries of `history --json` with that event (and trigger).
count_history() {
  json "j.filter((e) => e.event === '$1' && ('$2' === '' || e.trigger === '$2') && e.snapshot === '$SNAP').length" history "$IMG" --json
}

show_history() { cli history "$IMG"; }

# history_has EVENT TRIGGER N: at least N such entries.
history_has() {
  _n=$(count_history "$1" "$2") || return 1
  [ "$_n" -ge "$3" ]
}

count_rolled_back() { grep -c '"msg":"rolled back' "$SRV_LOG" 2>/dev/null; }

# create_snapshot: online, while $MNT stays mounted; the server must do it.
# The filesystem is frozen around it (fsfreeze flushes the ext4 journal and
# clears needs_recovery), so the snapshot is a clean filesystem that
# e2fsck -fn must pass as it is, before any mount replays a journal.
create_snapshot() {
  fsfreeze -f "$MNT" || return 1
  _out=$(cli snapshot create "$IMG" "$SNAP" 2>&1)
  _rc=$?
  fsfreeze -u "$MNT" || return 1
  echo "$_out"
  [ $_rc -eq 0 ] || return 1
  [ "$_out" = "created snapshot $SNAP (export $EXPORT@$SNAP)" ] || { log "unexpected output"; return 1; }
  grep -q "\"snapshot\":\"$SNAP\".*\"msg\":\"snapshot created\"" "$SRV_LOG" || { log "the server did not log the snapshot (not created online?)"; return 1; }
  mountpoint -q "$MNT" || { log "$MNT is no longer mounted"; return 1; }
}

# add_new_files TAG: new files (and a new directory) that the snapshot does not
# have; their checksums go to $NEW_SUMS.
add_new_files() {
  mkdir -p "$MNT/new-$1/deeper" || return 1
  head -c 5000000 /dev/urandom >"$MNT/new-$1/big" || return 1
  echo "new file $1" >"$MNT/new-$1/deeper/small" || return 1
  head -c 70000 /dev/urandom >"$MNT/tree/a/added-$1" || return 1
  (cd "$MNT" && sha256sum "new-$1/big" "new-$1/deeper/small" "tree/a/added-$1") >>"$NEW_SUMS" || return 1
}

# change_tree TAG FILLER_MB: overwrite in place, append, truncate, delete, add
# new files, reuse the freed blocks and fill FILLER_MB more; sync.
change_tree() {
  dd if=/dev/urandom of="$MNT/tree/a/rand-4194304" bs=4096 count=512 conv=notrunc,fsync 2>/dev/null || return 1
  dd if=/dev/urandom of="$MNT/tree/a/rand-1000000" bs=4096 seek=10 count=50 conv=notrunc,fsync 2>/dev/null || return 1
  echo "appended ($1)" >>"$MNT/tree/a/b/c/small-3" || return 1
  : >"$MNT/tree/zeros/zeros-2M" || return 1
  echo "changed after the snapshot ($1)" >"$MNT/tree/a/rand-0" || return 1
  rm -rf "$MNT/tree/a/b/c/small-1"* "$MNT/tree/bin" || return 1
  add_new_files "$1" || return 1
  dd if=/dev/urandom of="$MNT/filler-$1" bs=1M count="$2" conv=fsync 2>/dev/null || return 1
  sync
}

# tree_changed: the files must no longer match the manifest; the new ones are there.
tree_changed() {
  if (cd "$MNT" && sha256sum -c --quiet "$MANIFEST" >/dev/null 2>&1); then
    log "the tree still matches the old checksums: the changes did not happen"
    return 1
  fi
  [ ! -e "$MNT/tree/bin" ] || { log "tree/bin still there"; return 1; }
  (cd "$MNT" && sha256sum -c --quiet "$NEW_SUMS") || return 1
  log "tree changed; $(wc -l <"$NEW_SUMS") new files in place"
}

# verify_golden: exactly the snapshot's content: every file of the manifest
# with its old checksum, no other file, none of the new files.
verify_golden() {
  verify_tree || return 1
  (cd "$MNT" && find tree -type f | sort) >"$RUN/files.now" || return 1
  awk '{ print $2 }' "$MANIFEST" | sort >"$RUN/files.want" || return 1
  if ! cmp -s "$RUN/files.now" "$RUN/files.want"; then
    log "files under tree/ differ from the snapshot's:"
    diff "$RUN/files.want" "$RUN/files.now"
    return 1
  fi
  _top=$(cd "$MNT" && ls -A | tr '\n' ' ')
  [ "$_top" = "lost+found tree " ] || { log "top level: $_top (expected: lost+found tree)"; return 1; }
  while read -r _sum _f; do
    [ ! -e "$MNT/$_f" ] || { log "$_f (made after the snapshot) is still there"; return 1; }
  done <"$NEW_SUMS"
  log "exactly the snapshot's files; none of the $(wc -l <"$NEW_SUMS") new files"
}

# rollback_online: the server does it and keeps serving; the command returns
# with the merge running in the background (or already finished).
rollback_online() {
  _before=$(count_rolled_back)
  _out=$(cli rollback "$IMG" "$SNAP" 2>&1)
  _rc=$?
  echo "$_out"
  [ $_rc -eq 0 ] || return 1
  printf '%s\n' "$_out" | grep -Eq "^rolled back $IMG to snapshot $SNAP \(visible after [0-9.]+ ms\); merging [0-9]+ chunks in the background" ||
    { log "unexpected output (an offline rollback?)"; return 1; }
  [ "$(count_rolled_back)" -gt "$_before" ] || { log "the server did not log the rollback (not done online?)"; return 1; }
  grep '"msg":"rolled back' "$SRV_LOG" | tail -n 1
  server_exited && { log "the server exited"; return 1; }
  nbd_connected || { log "$DEV is no longer connected"; return 1; }
}

flush_dev() { blockdev --flushbufs "$DEV"; }

# find_filler_ranges: two 1 MiB ranges of device blocks (4 KiB) that
# filler-one occupies now and that are free in the snapshot: the start of its
# lowest extent (merged first: the merge walks the device upwards) and the
# end of its highest (merged last).
find_filler_ranges() {
  filefrag -v -b4096 "$MNT/filler-one" >"$RUN/filefrag" || return 1
  # extent lines: "  N:   lstart..  lend:   pstart..   pend:  len: ..."
  _r=$(awk '$1 ~ /^[0-9]+:$/ { s = $4 + 0; e = $5 + 0; if (e - s + 1 < 256) next;
      if (lo == "" || s < lo) lo = s; if (hi == "" || e > hi) hi = e }
    END { if (lo != "" && hi - 255 > lo + 255) print lo, hi - 255 }' "$RUN/filefrag")
  [ -n "$_r" ] || { cat "$RUN/filefrag"; log "no two separate 1 MiB extents in filler-one"; return 1; }
  RANGE_LO=${_r% *}
  RANGE_HI=${_r#* }
  log "filler-one: $(grep -c '^ *[0-9]*:' "$RUN/filefrag") extents; ranges at blocks $RANGE_LO and $RANGE_HI"
}

# write_during_merge: right after the rollback returns, while the merge
# copies the snapshot's data back, write 1 MiB of new data straight to the
# device at each range (blocks the merge has to copy back, free in the
# snapshot's filesystem, so fsck does not mind). The merge must not overwrite
# them. Whether the writes really overlapped the merge depends on the
# machine's speed: merge_overlap logs it from the server log's timestamps
# (same clock: the server runs in this guest).
write_during_merge() {
  WRITE_T0=$(date +%s%3N)
  WRITTEN=
  for _b in $RANGE_HI $RANGE_LO; do
    head -c 1048576 /dev/urandom >"$RUN/range-$_b" || return 1
    dd if="$RUN/range-$_b" of="$DEV" bs=1M count=1 seek=$((_b * 4096)) oflag=direct,seek_bytes conv=notrunc,fsync 2>/dev/null || return 1
    WRITTEN="$WRITTEN $_b:$(date +%s%3N)"
  done
  log "wrote 1 MiB to $DEV at blocks$(echo "$WRITTEN" | sed 's/:[0-9]*//g') in $(($(date +%s%3N) - WRITE_T0)) ms"
}

# verify_ranges: read back (O_DIRECT) what write_during_merge wrote.
verify_ranges() {
  for _b in $RANGE_LO $RANGE_HI; do
    dd if="$DEV" of="$RUN/back-$_b" bs=1M count=1 skip=$((_b * 4096)) iflag=direct,skip_bytes 2>/dev/null || return 1
    cmp "$RUN/range-$_b" "$RUN/back-$_b" || { log "the 1 MiB written at block $_b during the merge is gone"; return 1; }
  done
  log "both ranges written during the merge read back intact"
}

merge_overlap() {
  _fin=$(grep '"msg":"rollback merge finished"' "$SRV_LOG" | tail -n 1 | sed 's/.*"time":\([0-9]*\).*/\1/')
  [ -n "$_fin" ] || { log "no 'rollback merge finished' in the server log"; return 1; }
  for _w in $WRITTEN; do
    _b=${_w%:*}
    _t=${_w#*:}
    if [ "$_fin" -gt "$_t" ]; then
      log "write at block $_b done $((_fin - _t)) ms before the merge finished: during the merge"
    else
      log "NOTE: write at block $_b done $((_t - _fin)) ms after the merge finished: not during the merge this time"
    fi
  done
}

jobs_done() {
  cli jobs "$IMG" --wait || return 1
  _n=$(json 'j.length' jobs "$IMG" --json) || return 1
  [ "$_n" = 0 ] || { log "$_n job(s) still listed after jobs --wait"; return 1; }
}

# check_last_rollback TRIGGER BY_REGEX: the newest rollback entry of the history.
check_last_rollback() {
  _got=$(json "(() => { const r = j.filter((e) => e.event === 'rollback'); const e = r[r.length - 1];
    return e ? [e.snapshot, e.trigger, e.by, typeof e.snapshotId, typeof e.chunks, isNaN(Date.parse(e.at))].join('|') : 'none'; })()" history "$IMG" --json) || return 1
  log "newest rollback entry: $_got"
  printf '%s\n' "$_got" | grep -Eq "^$SNAP\|$1\|$2\|number\|number\|false\$"
}

policy_is() {
  _p=$(cli snapshot get "$IMG" "$SNAP" auto-rollback) || return 1
  log "auto-rollback of $SNAP: $_p"
  [ "$_p" = "$1" ]
}

set_policy() {
  _out=$(cli snapshot set "$IMG" "$SNAP" "auto-rollback=$1" 2>&1)
  _rc=$?
  echo "$_out"
  [ $_rc -eq 0 ] && [ "$_out" = "$SNAP: auto-rollback=$1" ]
}

# detach_all: nbd-client -d, and the server saw all KT_CONNS connections go.
detach_all() {
  _want=$(($(count_disconnected) + KT_CONNS))
  nbd_detach || return 1
  wait_for 10 sh -c '[ "$(grep -c "\"msg\":\"client disconnected\"" "$0")" -ge "$1" ]' "$SRV_LOG" "$_want" ||
    { log "server logged $(count_disconnected) disconnections, expected $_want"; return 1; }
}

# ------------------------------------------------------------------ part 1

: >"$NEW_SUMS"
# shellcheck disable=SC2046
step "start server" start_server serve "$IMG" --size "$KT_SIZE" $(serve_args)
step "stage files" make_stage
step "attach ($KT_TRANSPORT, -C $KT_CONNS)" nbd_attach
step "mkfs.ext4" mkfs_dev
step "mount" mount_dev
step "write file tree" write_tree
step "sync" sync
step "snapshot create $SNAP (online, filesystem mounted and frozen)" create_snapshot
step "policy off by default" policy_is off
step "modify, truncate, delete, add files, fill $BIG_FILL MiB; sync" change_tree one "$BIG_FILL"
step "tree changed" tree_changed
step "where filler-one lies on the device" find_filler_ranges
step "umount" umount "$MNT"
step "no history yet" sh -c '[ "$("$0" "$1" history "$2")" = "no history" ]' "$KT_NODE" "$KT_CLI" "$IMG"
step "rollback $SNAP (online, device attached)" rollback_online
step "write to $DEV during the merge" write_during_merge
step "flush $DEV's page cache" flush_dev
step "fsck clean after the rollback" fsck_dev
step "mount" mount_dev
step "the snapshot's files are back, the new ones gone" verify_golden
step "jobs --wait finishes" jobs_done
merge_overlap || fail "merge_overlap"
step "history: rollback by command" check_last_rollback command "[^|]+@[^|]+ pid [0-9]+"
step "history: merge finished" history_has merge-finished "" 1
step "history: exactly one rollback" sh -c '[ "$0" = 1 ]' "$(count_history rollback)"
show_history
step "umount" umount "$MNT"
step "flush $DEV's page cache" flush_dev
step "the writes made during the merge are intact" verify_ranges
step "fsck clean after the merge" fsck_dev
step "mount" mount_dev
step "still exactly the snapshot's files after the merge" verify_golden

# ------------------------------------------------------------------ part 2

step "snapshot set auto-rollback=on-disconnect" set_policy on-disconnect
step "snapshot get: on-disconnect" policy_is on-disconnect
step "info shows the policy" sh -c '"$0" "$1" info "$2" | tee /dev/stderr | grep -qx "auto-rollback: on-disconnect to snapshot $3"' "$KT_NODE" "$KT_CLI" "$IMG" "$SNAP"
: >"$NEW_SUMS"
step "modify, truncate, delete, add files; sync" change_tree two 64
step "tree changed" tree_changed
step "umount" umount "$MNT"
ROLLBACKS=$(count_history rollback)
step "detach (the last client leaves)" detach_all
# The on-disconnect rollback starts asynchronously, a few ms after the last
# client left. A client attaching before it has happened would read the
# changed filesystem and then see it change under it: wait for the history
# entry (written once the snapshot is visible) before re-attaching.
step "history: on-disconnect rollback recorded" wait_for 30 history_has rollback policy:on-disconnect 1
step "history: one more rollback" sh -c '[ "$0" = $(($1 + 1)) ]' "$(count_history rollback)" "$ROLLBACKS"
step "history: newest rollback by policy:on-disconnect" check_last_rollback policy:on-disconnect "snapshot $SNAP"
step "re-attach" nbd_attach
step "fsck clean after the auto-rollback" fsck_dev
step "mount" mount_dev
step "the snapshot's files are back, the new ones gone" verify_golden
step "jobs --wait finishes" jobs_done
step "history: merge finished" history_has merge-finished "" 2
show_history

step "snapshot set auto-rollback=off" set_policy off
step "snapshot get: off" policy_is off
: >"$NEW_SUMS"
step "modify, truncate, delete, add files; sync" change_tree three 64
step "tree changed" tree_changed
step "umount" umount "$MNT"
ROLLBACKS=$(count_history rollback)
LOGGED=$(count_rolled_back)
step "detach (the last client leaves, policy off)" detach_all
# The rollback, when there was one, followed within a few ms: 3 s is plenty.
step "wait 3 s" sleep 3
step "history: no new rollback" sh -c '[ "$0" = "$1" ]' "$(count_history rollback)" "$ROLLBACKS"
step "server logged no new rollback" sh -c '[ "$0" = "$1" ]' "$(count_rolled_back)" "$LOGGED"
step "re-attach" nbd_attach
step "fsck clean" fsck_dev
step "mount" mount_dev
step "the changes are kept" tree_changed
step "umount" umount "$MNT"
step "detach" detach_all
step "stop server (SIGTERM, exit 0)" stop_server
step "offline: no jobs" sh -c '[ "$("$0" "$1" jobs "$2")" = "no jobs" ]' "$KT_NODE" "$KT_CLI" "$IMG"
step "offline: history has 2 rollbacks, 2 finished merges" sh -c '[ "$0 $1" = "2 2" ]' "$(count_history rollback)" "$(count_history merge-finished)"
show_history
pass
