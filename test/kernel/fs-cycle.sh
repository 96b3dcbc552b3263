#!/bin/sh
# The full used-by cycle on one filesystem, transport and connection count:
# attach, mkfs, mount, fio verify (libaio iodepth 16, then psync), write a
# tree of files with known checksums, sync, umount, detach, re-attach, fsck
# (read-only) must be clean, mount and compare the checksums, detach, and the
# server exits 0 on SIGTERM.
# Parameters: KT_FS (ext4|xfs), KT_TRANSPORT (tcp|unix), KT_CONNS, KT_SIZE.
. "$KT_ROOT/test/kernel/lib.sh"

IMG="$R/disk.img"
# shellcheck disable=SC2046
step "start server" start_server serve "$IMG" --size "$KT_SIZE" $(serve_args)
step "stage files" make_stage
step "attach ($KT_TRANSPORT, -C $KT_CONNS)" nbd_attach
step "mkfs.$KT_FS" mkfs_dev
step "mount" mount_dev
step "fio randrw libaio iodepth=16 verify" run_fio libaio --iodepth=16
step "fio randrw psync verify" run_fio psync
step "write file tree" write_tree
step "sync" sync
step "umount" umount "$MNT"
step "detach" nbd_detach
step "re-attach" nbd_attach
step "fsck (read-only check)" fsck_dev
step "mount again" mount_dev
step "compare checksums" verify_tree
step "umount" umount "$MNT"
step "detach" nbd_detach
step "stop server (SIGTERM, exit 0)" stop_server
pass
