#!/bin/sh
# PID 1 inside user-mode Linux for one kernel-test scenario.
#
# tools/kernel-test.js boots `linux.uml ... init=$KT_RESULTS/init`, a small
# wrapper that sources $KT_RESULTS/config.sh and execs this script. We set up
# the guest (proc, sys, /run, loopback, nbd.ko), run the scenario script
# ($KT_ROOT/test/kernel/$KT_SCRIPT) as a child with its output in
# $KT_RESULTS/steps.log, make sure a verdict file exists, clean up and halt.
# The guest's exit status means nothing: the verdict file is the result.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root LANG=C LC_ALL=C

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t tmpfs -o mode=755 tmpfs /run
mkdir -p /run/kt
busybox ifconfig lo 127.0.0.1 up

LOG="$KT_RESULTS/steps.log"
VERDICT="$KT_RESULTS/verdict"
{
  echo "[$(cut -d' ' -f1 /proc/uptime)] guest up: kernel $(uname -r), scenario $KT_SCENARIO ($KT_SCRIPT)"
  echo "    fs=$KT_FS transport=$KT_TRANSPORT conns=$KT_CONNS size=$KT_SIZE node=$KT_NODE"
} >>"$LOG"

MOD="/usr/lib/uml/modules/$(uname -r)/kernel/drivers/block/nbd.ko"
if ! busybox insmod "$MOD" nbds_max=8 >>"$LOG" 2>&1; then
  echo "fail: cannot load $MOD" >"$VERDICT"
elif [ ! -b /dev/nbd0 ]; then
  echo "fail: /dev/nbd0 missing after loading nbd.ko" >"$VERDICT"
else
  /bin/sh "$KT_ROOT/test/kernel/$KT_SCRIPT" >>"$LOG" 2>&1 </dev/null
  rc=$?
  if [ ! -s "$VERDICT" ]; then
    echo "fail: scenario script exited $rc without a verdict" >"$VERDICT"
  fi
fi

# Cleanup, best effort (nothing here may hang the guest for long).
{
  echo "[$(cut -d' ' -f1 /proc/uptime)] cleanup"
  for m in $(awk '$2 ~ "^/run/kt/" { print $2 }' /proc/mounts); do timeout 20 umount -l "$m"; done
  for d in /sys/block/nbd*; do
    [ -e "$d/pid" ] && timeout 20 nbd-client -d "/dev/${d##*/}"
  done
  # After a failure, stop whatever node-nbd-server processes are left (they
  # belong to this guest only) so their logs are complete.
  [ "$(cat "$VERDICT")" = ok ] || for p in /proc/[0-9]*; do
    pid=${p#/proc/}
    [ "$pid" = 1 ] && continue
    if tr '\0' ' ' <"$p/cmdline" 2>/dev/null | grep -q 'node-nbd-server'; then kill -TERM "$pid" 2>/dev/null; fi
  done
  [ "$(cat "$VERDICT")" = ok ] || sleep 1
  echo "[$(cut -d' ' -f1 /proc/uptime)] halt"
} >>"$LOG" 2>&1
# fsync only our two files: a global sync could block on a dead device.
sync "$LOG" "$VERDICT" 2>/dev/null
halt -f
