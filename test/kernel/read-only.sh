#!/bin/sh
# A read-only export: the image gets an ext4 filesystem and files in an
# earlier (read-write) step; served with --read-only, the device is read-only,
# mounts with -o ro, the files match, writing through the filesystem fails with
# EROFS/EPERM, dd to the raw device fails, and the image is unchanged.
. "$KT_ROOT/test/kernel/lib.sh"

IMG="$R/disk.img"
ERR_RO='Read-only file system|Operation not permitted'

# mounted_ro: $MNT is mounted, and read-only.
mounted_ro() {
  awk -v m="$MNT" '$2 == m { print; found = 1; split($4, o, ","); ro = (o[1] == "ro") } END { exit !(found && ro) }' /proc/mounts
}

# 1. Prepare the image read-write.
# shellcheck disable=SC2046
step "start server (read-write)" start_server serve "$IMG" --size "$KT_SIZE" $(serve_args)
step "stage files" make_stage
step "attach" nbd_attach
step "mkfs.ext4" mkfs_dev
step "mount" mount_dev
step "write file tree" write_tree
step "umount" umount "$MNT"
step "detach" nbd_detach
step "stop server (SIGTERM, exit 0)" stop_server
step "checksum the image" sh -c 'sha256sum "$0" | tee "$1"' "$IMG" "$RUN/image.sha256"

# 2. Serve it read-only.
# shellcheck disable=SC2046
step "start server --read-only" start_server serve "$IMG" --read-only $(serve_args)
step "attach" nbd_attach
step "device is read-only" sh -c '[ "$(cat /sys/block/nbd0/ro)" = 1 ] && [ "$(blockdev --getro /dev/nbd0)" = 1 ]'
step "mount -o ro" mount_dev -o ro
step "compare checksums" verify_tree
expect_fail "create a file" "$ERR_RO" sh -c 'echo x >"$0/new-file"' "$MNT"
expect_fail "append to a file" "$ERR_RO" sh -c 'echo x >>"$0/tree/a/rand-4096"' "$MNT"
expect_fail "remount read-write" '' mount -o remount,rw "$MNT"
step "still mounted read-only" mounted_ro
step "umount" umount "$MNT"
expect_fail "dd to the raw device" "$ERR_RO|Permission denied|Input/output error" \
  dd if=/dev/zero of="$DEV" bs=4096 count=1 oflag=direct conv=fsync
# mount(8) falls back to read-only on a write-protected device; the kernel
# must never give us a read-write mount.
step "plain mount falls back to read-only" mount -t ext4 "$DEV" "$MNT"
step "mounted read-only" mounted_ro
step "umount" umount "$MNT"
step "fsck (read-only check)" fsck_dev
step "detach" nbd_detach
step "stop server (SIGTERM, exit 0)" stop_server
step "image unchanged" sha256sum -c "$RUN/image.sha256"
pass
