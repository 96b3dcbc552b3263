#!/bin/sh
# Failure isolation of copy-on-write snapshots when the snapshot store gets
# I/O errors, through the real kernel client.
#
# The volume disk.img (32 MiB of random data) keeps its metadata directory on
# a device-mapper device: $R/disk.img.nbd is a symlink to a directory of an
# ext4 (no fs journal, errors=continue) on dm device "snapeio" (linear over a
# loop device over $R/meta.bin). A second volume, other.img, keeps its
# metadata on the healthy host fs. Both are served by one server (unix
# socket); first writes go through the journal (NBD_JOURNAL_DIR on tmpfs).
#
#   s0 created, region A (MiB 0-4) rewritten: s0 holds all of A.
#   s1 created, MiB 0-2 rewritten: s1 holds those 2 MiB (s0 needs nothing
#   from s1: every chunk s1 holds, s0 holds too).
#   other.img: b1 created, written now and in both failure stages.
#   Stage 1: dm table -> flakey error_writes (reads pass, writes fail EIO).
#     Writes to MiB 2-4: s1 (the newest) must preserve them and cannot:
#     every write succeeds; s1 failed with an I/O-error reason, logged, its
#     export reads EIO; s0 already held those chunks: it stays active and
#     exact (read back after dropping caches: from its store on the device).
#     (s0 deliberately reads nothing through s1: s1's store file took
#     failed writes, and its ext4 metadata can no longer be trusted, e.g. an
#     extent block that never reached the disk reads back as zeros once the
#     cache is dropped.)
#   Stage 2: dm table -> error (every I/O fails).
#     Writes to region B (MiB 8-16): now s0 is the newest healthy snapshot
#     and cannot preserve: every write succeeds, s0 failed + logged, reads
#     EIO. Further writes (nothing left to protect) succeed.
#   Throughout: live data (O_DIRECT reads) = every write; b1 exact, active;
#   no kernel I/O error on the live devices. SIGTERM: exit 0, raw images
#   hold every write; other's journal removed. disk's journal (drained) may
#   stay: a journal file is deleted only after the state naming it
#   (IMAGE.nbd/journal.state) is removed and its directory synced, and
#   disk.img.nbd is on the failing device (so a crash can never leave a
#   state that names a missing journal). Nothing else may be left.
# Finally, after the verdict is written (observation only, not a check), the
# store device is healed and the volume looked at again: what the disk says
# after the failure.
. "$KT_ROOT/test/kernel/lib.sh"

export NBD_JOURNAL_DIR="$RUN/journal"
IMG="$R/disk.img"
IMG2="$R/other.img"
EXPORT2=other
MIB=1048576
SIZE_MIB=32
SIZE2_MIB=16
KMOD="/usr/lib/uml/modules/$(uname -r)/kernel"
META_FILE="$R/meta.bin"
META_MIB=64
DM=snapeio
DMDEV="/dev/mapper/$DM"
META_MNT="$RUN/meta"
STORE="$META_MNT/disknbd"
SNAP_DEV=/dev/nbd1
DEV2=/dev/nbd2
EXP="$RUN/expect-disk.img"  # what the live volume must hold
EXP2="$RUN/expect-other.img"
ORIG="$RUN/orig-disk.img"   # disk.img at s0
ORIG2="$RUN/orig-other.img" # other.img at b1
AT_S1="$RUN/at-s1.img"      # disk.img at s1
DISK_JOURNAL=               # disk.img's journal file (made by its first first write)
EIO_RE='Input/output error|EIO'
LOOP=
mkdir -p "$NBD_JOURNAL_DIR" "$META_MNT"

cli() { "$KT_NODE" "$KT_CLI" "$@"; }

# ------------------------------------------------------------ store device


meta_sectors() { echo $((META_MIB * 2048)); }

make_store_device() {
  rm -f "$META_FILE"
  dd if=/dev/zero of="$META_FILE" bs=1M count="$META_MIB" 2>/dev/null || return 1
  LOOP=$(losetup -f --show "$META_FILE") || return 1
  log "loop device $LOOP over $META_FILE"
  dmset create "$DM" --table "0 $(meta_sectors) linear $LOOP 0" || return 1
  [ -b "$DMDEV" ] || { log "$DMDEV missing"; return 1; }
  dmset table "$DM"
  # No fs journal (a failed jbd2 commit would abort the fs and turn later
  # errors into EROFS); errors=continue: the fs keeps going on I/O errors.
  mkfs.ext4 -q -F -b 4096 -O ^has_journal "$DMDEV" || return 1
  mount -t ext4 -o errors=continue "$DMDEV" "$META_MNT" || return 1
  mkdir -p "$STORE" || return 1
  ln -s "$STORE" "$IMG.nbd" || return 1
}

# set_table NAME TABLE [suspend options]: swap the dm table under the mounted fs.
set_table() {
  _what=$1
  _table=$2
  shift 2
  dmset suspend "$@" "$DM" || return 1
  dmset load "$DM" --table "$_table" || { dmset resume "$DM"; return 1; }
  dmset resume "$DM" || return 1
  log "dm $DM is now $_what: $(dmset table "$DM")"
}

# The injection itself must work, or the server would be blamed for nothing.
store_writes_fail() {
  _out=$(dd if=/dev/urandom of="$META_MNT/probe-$1" bs=4096 count=4 conv=fsync 2>&1)
  _rc=$?
  echo "$_out"
  [ $_rc -ne 0 ] || { log "a synced write to the store fs succeeded: no fault injected"; return 1; }
  echo "$_out" | grep -Eq "$EIO_RE" || { log "the store fs write failed, but not with EIO"; return 1; }
}
# Reads are probed on s0's store file with O_DIRECT (from the device, and
# only that file's own writeback state counts: a read of the raw dm device
# would first flush the bdev's dirty superblock page and fail for that).
# s0 is snap-1.snap; its first chunk sits at 1 MiB (docs: data_base).
S0_FILE="$STORE/snap-1.snap"
store_reads_pass() { dd if="$S0_FILE" of=/dev/null bs=16384 skip=64 count=1 iflag=direct 2>&1; }
store_reads_fail() {
  _out=$(dd if="$S0_FILE" of=/dev/null bs=16384 skip=64 count=1 iflag=direct 2>&1)
  _rc=$?
  echo "$_out"
  [ $_rc -ne 0 ] || { log "a read from the store succeeded: no fault injected"; return 1; }
  echo "$_out" | grep -Eq "$EIO_RE" || { log "the store read failed, but not with EIO"; return 1; }
}

# ---------------------------------------------------------------- images

make_images() {
  head -c $((SIZE_MIB * MIB)) /dev/urandom >"$IMG" || return 1
  head -c $((SIZE2_MIB * MIB)) /dev/urandom >"$IMG2" || return 1
  cp "$IMG" "$EXP" && cp "$IMG" "$ORIG" && cp "$IMG2" "$EXP2" && cp "$IMG2" "$ORIG2" || return 1
  log "disk.img $(sha256sum <"$IMG" | cut -c1-16)…, other.img $(sha256sum <"$IMG2" | cut -c1-16)…"
}

# put DEV EXPECT BS SEEK COUNT: random data to DEV (O_DIRECT, then fsync:
# an NBD FLUSH), which must succeed; the same data into the expected image.
PUT_N=0
put() {
  PUT_N=$((PUT_N + 1))
  head -c $(($3 * $5)) /dev/urandom >"$RUN/put.dat" || return 1
  _out=$(dd if="$RUN/put.dat" of="$1" bs="$3" seek="$4" count="$5" oflag=direct conv=notrunc,fsync 2>&1)
  _rc=$?
  if [ $_rc -ne 0 ]; then
    echo "$_out"
    log "write #$PUT_N to $1 (bs=$3 seek=$4 count=$5) FAILED (dd exit $_rc)"
    return 1
  fi
  dd if="$RUN/put.dat" of="$2" bs="$3" seek="$4" count="$5" conv=notrunc 2>/dev/null || return 1
  log "write #$PUT_N: $1 bs=$3 seek=$4 count=$5 ok"
}

# same_as DEV EXPECT: DEV, read with O_DIRECT (no page cache), equals EXPECT.
same_as() {
  _out=$(dd if="$1" of="$RUN/read.img" bs=1M iflag=direct 2>&1)
  _rc=$?
  [ $_rc -eq 0 ] || { echo "$_out"; log "reading $1 failed (dd exit $_rc)"; return 1; }
  if ! cmp -s "$RUN/read.img" "$2"; then
    log "$1 differs from ${2##*/}: $(cmp "$RUN/read.img" "$2" 2>&1)"
    log "first differing 16 KiB blocks (offset/16384): $(cmp -l "$RUN/read.img" "$2" | head -n 200000 |
      awk '{ print int(($1 - 1) / 16384) }' | uniq | head -n 20 | tr '\n' ' ')"
    return 1
  fi
  log "$1 matches ${2##*/} ($(sha256sum <"$RUN/read.img" | cut -c1-16)…)"
}

file_same_as() {
  cmp "$1" "$2" || return 1
  log "${1##*/} matches ${2##*/}"
}

# ------------------------------------------------------------ nbd devices

dev_up() { [ -e "/sys/block/$1/pid" ] && [ "$(cat "/sys/block/$1/size")" != 0 ]; }
dev_down() { [ ! -e "/sys/block/$1/pid" ] && [ "$(cat "/sys/block/$1/size")" = 0 ]; }

# attach_dev DEV EXPORT MIB [-readonly]
attach_dev() {
  _d=$1
  _e=$2
  _mib=$3
  shift 3
  nbd-client -unix "$SOCK" "$_d" -N "$_e" -b 4096 -t 10 "$@" || return 1
  wait_for 10 dev_up "${_d##*/}" || { log "$_d not connected"; return 1; }
  _got=$(($(cat "/sys/block/${_d##*/}/size") * 512))
  [ "$_got" = $((_mib * MIB)) ] || { log "$_d size $_got, expected $((_mib * MIB))"; return 1; }
  if [ "$1" = -readonly ]; then
    [ "$(cat "/sys/block/${_d##*/}/ro")" = 1 ] || { log "$_d is not read-only"; return 1; }
  fi
  log "attached $_d: export $_e, $_got bytes $*"
}

detach_dev() {
  nbd-client -d "$1" || return 1
  wait_for 30 dev_down "${1##*/}" || { log "$1 still connected 30 s after nbd-client -d"; return 1; }
}

# snapshot_exact EXPORT EXPECT: attach EXPORT read-only, compare, detach.
snapshot_exact() {
  attach_dev "$SNAP_DEV" "$1" "$3" -readonly || return 1
  same_as "$SNAP_DEV" "$2"
  _rc=$?
  detach_dev "$SNAP_DEV" || return 1
  return $_rc
}

# snapshot_reads_eio EXPORT: every read of the export fails with EIO (at
# offsets in s0's and s1's chunks and in data no snapshot holds).
snapshot_reads_eio() {
  attach_dev "$SNAP_DEV" "$1" "$SIZE_MIB" -readonly || return 1
  _bad=
  for _off in 0 5 20 31; do
    _out=$(dd if="$SNAP_DEV" of=/dev/null bs=1M skip=$_off count=1 iflag=direct 2>&1)
    _rc=$?
    if [ $_rc -eq 0 ]; then
      log "reading MiB $_off of $1 succeeded: a failed snapshot must not serve data"
      _bad=1
    elif ! echo "$_out" | grep -Eq "$EIO_RE"; then
      echo "$_out"
      log "reading MiB $_off of $1 failed, but not with EIO"
      _bad=1
    else
      log "reading MiB $_off of $1: EIO, as expected"
    fi
  done
  detach_dev "$SNAP_DEV" || return 1
  [ -z "$_bad" ]
}

# ------------------------------------------------------------- snapshots

create_snapshot() {
  _out=$(cli snapshot create "$1" "$2" 2>&1)
  _rc=$?
  echo "$_out"
  [ $_rc -eq 0 ] || return 1
  grep -q "\"snapshot\":\"$2\".*\"msg\":\"snapshot created\"" "$SRV_LOG" || { log "the server did not log snapshot $2 (not created online?)"; return 1; }
}

# snap_is IMAGE NAME STATE [PRESERVED_CHUNKS] [REASON_ERE]: `snapshot list
# --json` (online: waits until queued first writes are preserved) shows
# NAME in STATE; active: no failure; failed: a reason matching REASON_ERE.
snap_is() {
  cli snapshot list "$1" --json >"$RUN/list.json" || { log "snapshot list $1 failed"; return 1; }
  _line=$("$KT_NODE" -e '
    const l = JSON.parse(require("fs").readFileSync(process.argv[1], "utf8"));
    const s = l.find((x) => x.name === process.argv[2]);
    if (!s) { console.error("no snapshot " + process.argv[2] + " in " + JSON.stringify(l)); process.exit(1); }
    console.log([s.state, s.preservedChunks, s.chunkSize, s.failure ? s.failure.reason : ""].join("|"));' "$RUN/list.json" "$2") || return 1
  _st=$(echo "$_line" | cut -d'|' -f1)
  _pc=$(echo "$_line" | cut -d'|' -f2)
  _why=$(echo "$_line" | cut -d'|' -f4-)
  log "snapshot ${1##*/} $2: state=$_st preservedChunks=$_pc chunkSize=$(echo "$_line" | cut -d'|' -f3) failure=${_why:-none}"
  [ "$_st" = "$3" ] || { log "expected state $3"; return 1; }
  if [ -n "$4" ] && [ "$_pc" != "$4" ]; then
    log "expected $4 preserved chunks"
    return 1
  fi
  if [ "$3" = active ]; then
    [ -z "$_why" ] || { log "an active snapshot with a failure reason"; return 1; }
  else
    [ -n "$_why" ] || { log "a failed snapshot without a reason"; return 1; }
    if [ -n "$5" ] && ! echo "$_why" | grep -Eq "$5"; then
      log "the reason does not match /$5/"
      return 1
    fi
  fi
}

# chunks MIB: how many chunks MIB MiB are, at the volume's chunk size.
chunks() {
  _cs=$("$KT_NODE" -e 'console.log(JSON.parse(require("fs").readFileSync(process.argv[1], "utf8"))[0].chunkSize)' "$RUN/list.json")
  echo $(($1 * MIB / _cs))
}

failed_logged() { grep "\"snapshot\":\"$1\"" "$SRV_LOG" | grep -q '"msg":"snapshot failed'; }
logged_failed() {
  failed_logged "$1" || { log "no 'snapshot failed' log line for $1"; return 1; }
  grep "\"snapshot\":\"$1\"" "$SRV_LOG" | grep '"msg":"snapshot failed'
}
not_logged_failed() {
  if failed_logged "$1"; then
    grep "\"snapshot\":\"$1\"" "$SRV_LOG" | grep '"msg":"snapshot failed'
    log "$1 was logged as failed"
    return 1
  fi
}

first_writes_journal() {
  cli info "$IMG" --json >"$RUN/info.json" || return 1
  _mode=$("$KT_NODE" -e 'const i = JSON.parse(require("fs").readFileSync(process.argv[1], "utf8")); console.log(i.firstWrites && i.firstWrites.mode)' "$RUN/info.json")
  log "first writes: mode $_mode; journal dir: $(ls "$NBD_JOURNAL_DIR" | tr '\n' ' ')"
  [ "$_mode" = journal ] || { log "expected first writes through the journal"; return 1; }
  [ -n "$(ls "$NBD_JOURNAL_DIR")" ] || { log "no journal file in $NBD_JOURNAL_DIR"; return 1; }
  # Only disk.img has had first writes yet: the one journal is its own.
  DISK_JOURNAL=$(ls "$NBD_JOURNAL_DIR")
  [ "$(echo "$DISK_JOURNAL" | wc -l)" = 1 ] || { log "more than one journal: $DISK_JOURNAL"; return 1; }
}

store_in_place() {
  ls -l "$STORE"
  [ -f "$STORE/manifest.json" ] || { log "no manifest.json in $STORE: the store is not on $DMDEV"; return 1; }
  [ -f "$S0_FILE" ] || { log "no $S0_FILE"; return 1; }
}

# No kernel error on the live devices (nbd0: disk, nbd2: other).
DMESG_N=0
live_devices_clean() {
  DMESG_N=$((DMESG_N + 1))
  dmesg >"$R/dmesg-$DMESG_N.txt" 2>&1
  _e=$(grep -E 'nbd[02]([^0-9]|$)' "$R/dmesg-$DMESG_N.txt" | grep -Ei 'error|fail|timed out|dead|reset')
  if [ -n "$_e" ]; then
    echo "$_e"
    log "kernel errors on a live NBD device"
    return 1
  fi
  log "no kernel errors for nbd0/nbd2; store device messages so far: $(grep -Ec 'dm-0|EXT4-fs.*dm-' "$R/dmesg-$DMESG_N.txt")"
}

server_alive() {
  if server_exited; then
    tail -n 30 "$SRV_LOG"
    log "the server exited (status $(cat "$SRV_RC"))"
    return 1
  fi
  kill -0 "$SRV_PID" || return 1
}

# After the stop: other's journal is gone; disk's may be left (its state, on
# the failing device, could not be removed: see the top); nothing else.
journals_after_stop() {
  _left=$(ls -A "$NBD_JOURNAL_DIR")
  case "$_left" in
    "") log "every journal removed" ;;
    "$DISK_JOURNAL") log "disk.img's journal $DISK_JOURNAL kept (its state on the failing device could not be removed)" ;;
    *)
      log "left in $NBD_JOURNAL_DIR: $_left (disk.img's journal: $DISK_JOURNAL)"
      return 1
      ;;
  esac
}

# Observation, not a check (runs after the verdict is written): heal the
# store device and look at the volume again. Nothing could be written to the
# store while it failed, so the disk may not know that s0 and s1 failed.
observe_after_heal() {
  log "OBSERVATION (not a check): heal $DMDEV, list the snapshots offline, serve again, read disk@s1"
  timeout 30 umount "$META_MNT" || timeout 10 umount -l "$META_MNT"
  timeout 30 env DM_DISABLE_UDEV=1 dmsetup --noudevsync suspend --nolockfs "$DM"
  timeout 30 env DM_DISABLE_UDEV=1 dmsetup --noudevsync load "$DM" --table "0 $(meta_sectors) linear $LOOP 0"
  timeout 30 env DM_DISABLE_UDEV=1 dmsetup --noudevsync resume "$DM"
  timeout 60 e2fsck -fn "$DMDEV" 2>&1 | tail -n 3
  timeout 30 mount -t ext4 -o errors=continue "$DMDEV" "$META_MNT" || return 0
  ls -l "$STORE"
  [ -f "$STORE/journal.state" ] && log "journal.state after the heal: $(tr '\n' ' ' <"$STORE/journal.state" | cut -c1-200)"
  log "journals after the heal: $(ls -A "$NBD_JOURNAL_DIR" | tr '\n' ' ')"
  timeout 60 "$KT_NODE" "$KT_CLI" snapshot list "$IMG" 2>&1
  log "journals after an offline snapshot list: $(ls -A "$NBD_JOURNAL_DIR" | tr '\n' ' ')"
  start_server serve "$IMG" --socket "$SOCK" || return 0
  log "journals after the restart: $(ls -A "$NBD_JOURNAL_DIR" | tr '\n' ' ')"
  grep -i 'journal' "$SRV_LOG" | cut -c1-300
  timeout 60 "$KT_NODE" "$KT_CLI" snapshot list "$IMG" 2>&1
  if attach_dev "$SNAP_DEV" "$EXPORT@s1" "$SIZE_MIB" -readonly; then
    if same_as "$SNAP_DEV" "$AT_S1"; then
      log "OBSERVATION: after the heal, disk@s1 reads exactly its point in time"
    elif dd if="$SNAP_DEV" of=/dev/null bs=1M count=1 iflag=direct 2>/dev/null; then
      log "OBSERVATION: after the heal and a restart, disk@s1 is served as data but differs from its point in time (see above)"
    else
      log "OBSERVATION: after the heal, disk@s1 reads fail"
    fi
    detach_dev "$SNAP_DEV"
  fi
  stop_server
  timeout 30 umount "$META_MNT"
  return 0
}

# ------------------------------------------------------------------- run

step "load dm-mod, dm-flakey, loop" load_modules
step "store device: loop + dm linear + ext4 (no fs journal), $IMG.nbd -> $STORE" make_store_device
step "images: disk.img ${SIZE_MIB} MiB, other.img ${SIZE2_MIB} MiB, random" make_images
step "start server (disk.img, other.img; unix socket; journal in $NBD_JOURNAL_DIR)" start_server serve "$IMG" "$IMG2" --socket "$SOCK"
step "snapshot create disk s0" create_snapshot "$IMG" s0
step "the store is on $DMDEV" store_in_place
step "snapshot create other b1 (metadata on the healthy host fs)" create_snapshot "$IMG2" b1
step "attach disk on $DEV (-C $KT_CONNS)" nbd_attach
step "attach other on $DEV2" attach_dev "$DEV2" "$EXPORT2" "$SIZE2_MIB"
step "rewrite region A (MiB 0-4): s0 preserves it" put "$DEV" "$EXP" "$MIB" 0 4
step "first writes go through the journal" first_writes_journal
step "s0 active" snap_is "$IMG" s0 active
A_CHUNKS=$(chunks 4)
step "s0 holds exactly region A ($A_CHUNKS chunks)" snap_is "$IMG" s0 active "$A_CHUNKS"
cp "$EXP" "$AT_S1" || fail "copy"
step "snapshot create disk s1" create_snapshot "$IMG" s1
step "rewrite MiB 0-2: s1 preserves it" put "$DEV" "$EXP" "$MIB" 0 2
step "s1 active, holds MiB 0-2 ($((A_CHUNKS / 2)) chunks)" snap_is "$IMG" s1 active "$((A_CHUNKS / 2))"
step "s0 unchanged" snap_is "$IMG" s0 active "$A_CHUNKS"
step "other: write MiB 0-2 (b1 preserves)" put "$DEV2" "$EXP2" "$MIB" 0 2
step "baseline: disk@s0 exact" snapshot_exact "$EXPORT@s0" "$ORIG" "$SIZE_MIB"
step "baseline: disk@s1 exact" snapshot_exact "$EXPORT@s1" "$AT_S1" "$SIZE_MIB"
step "baseline: live disk" same_as "$DEV" "$EXP"

# ---- stage 1: the store fails writes, reads still work
step "sync the store fs" sync -f "$META_MNT/"
step "store device -> flakey error_writes" set_table "flakey, error_writes" "0 $(meta_sectors) flakey $LOOP 0 0 3600 1 error_writes"
step "injection works: synced write on the store fs fails with EIO" store_writes_fail 1
step "injection works: store reads pass (O_DIRECT read of s0's store file)" store_reads_pass
step "stage 1: 4 KiB write at MiB 2 + 16 KiB (s1 must preserve; cannot)" put "$DEV" "$EXP" 4096 516 1
step "stage 1: 1 MiB writes at MiB 2-4" put "$DEV" "$EXP" "$MIB" 2 2
step "stage 1: 4 KiB write at MiB 1 (s1 holds it)" put "$DEV" "$EXP" 4096 256 1
step "stage 1: other: write MiB 2-3 (b1 healthy)" put "$DEV2" "$EXP2" "$MIB" 2 1
step "server still running" server_alive
step "s1 failed with an I/O-error reason" snap_is "$IMG" s1 failed "" "$EIO_RE"
step "s0 (held every chunk written) still active, unchanged" snap_is "$IMG" s0 active "$A_CHUNKS"
step "b1 (other volume) active" snap_is "$IMG2" b1 active
step "server logged s1 failed" logged_failed s1
step "s0 not logged failed" not_logged_failed s0
step "b1 not logged failed" not_logged_failed b1
step "no kernel errors on nbd0/nbd2" live_devices_clean
step "disk@s1 reads fail with EIO" snapshot_reads_eio "$EXPORT@s1"
step "drop caches (store reads come from the device)" sh -c 'sync -f "$0/" 2>/dev/null; echo 3 >/proc/sys/vm/drop_caches' "$META_MNT"
step "disk@s0 exact (region A from its store, the rest from live)" snapshot_exact "$EXPORT@s0" "$ORIG" "$SIZE_MIB"
step "live disk holds every write" same_as "$DEV" "$EXP"
step "more writes in region A after the failure" put "$DEV" "$EXP" 4096 1000 3
step "s0 still active (no new preservation needed)" snap_is "$IMG" s0 active "$A_CHUNKS"
step "live disk holds every write" same_as "$DEV" "$EXP"

# ---- stage 2: every I/O to the store fails
step "store device -> error target" set_table error "0 $(meta_sectors) error" --nolockfs
step "injection works: store reads fail with EIO (O_DIRECT read of s0's store file)" store_reads_fail
step "stage 2: 1 MiB writes in region B (MiB 8-12): s0 must preserve; cannot" put "$DEV" "$EXP" "$MIB" 8 4
step "stage 2: 4 KiB writes in region B (MiB 12-16)" put "$DEV" "$EXP" 4096 3300 7
step "stage 2: other: write MiB 3-4" put "$DEV2" "$EXP2" "$MIB" 3 1
step "server still running" server_alive
step "s0 failed with an I/O-error reason" snap_is "$IMG" s0 failed "" "$EIO_RE"
step "s1 still failed" snap_is "$IMG" s1 failed "" "$EIO_RE"
step "server logged s0 failed" logged_failed s0
step "b1 active" snap_is "$IMG2" b1 active
step "b1 not logged failed" not_logged_failed b1
step "further writes (no snapshot left to protect): MiB 16-24" put "$DEV" "$EXP" "$MIB" 16 8
step "further writes over regions A and B" put "$DEV" "$EXP" 4096 100 2000
step "further 4 KiB writes at the end" put "$DEV" "$EXP" 4096 8191 1
step "no kernel errors on nbd0/nbd2" live_devices_clean
step "disk@s0 reads fail with EIO" snapshot_reads_eio "$EXPORT@s0"
step "disk@s1 reads fail with EIO" snapshot_reads_eio "$EXPORT@s1"
step "live disk holds every write" same_as "$DEV" "$EXP"
step "live other holds every write" same_as "$DEV2" "$EXP2"
step "other@b1 exact" snapshot_exact "$EXPORT2@b1" "$ORIG2" "$SIZE2_MIB"
step "server still running" server_alive
step "detach $DEV" nbd_detach
step "detach $DEV2" detach_dev "$DEV2"
step "stop server (SIGTERM, exit 0)" stop_server
log "server log, errors and warnings:"
grep -E '"level":(40|50|60)' "$SRV_LOG" | cut -c1-400
step "other's journal removed; only disk's may be left" journals_after_stop
step "raw disk.img holds every write" file_same_as "$IMG" "$EXP"
step "raw other.img holds every write" file_same_as "$IMG2" "$EXP2"
step "no kernel errors on nbd0/nbd2" live_devices_clean
log "all checks passed"
echo ok >"$R/verdict"
sync "$R/verdict" 2>/dev/null
sync_log
observe_after_heal
pass
