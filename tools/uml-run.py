#!/usr/bin/python3
# uml-run.py LINUX.UML ARGS...: runs user-mode Linux for the power-loss
# scenario (tools/kernel-power-loss.js) so that it can be cut like a power
# supply and leaves nothing behind.
#
# UML is several host processes (the kernel, its I/O helper threads, one
# process per guest address space). This wrapper makes itself a child
# subreaper, starts UML in a process group of its own, and on SIGUSR1 (the
# power cut) or SIGTERM sends SIGKILL to that whole group at once. It exits
# only when every UML process is gone and reaped (the helpers are reparented
# to it, not to an init that may never reap them), so the disk file is no
# longer written when it exits. Exit status: UML's own, or 137 after a cut.
import ctypes
import os
import signal
import sys

PR_SET_CHILD_SUBREAPER = 36

libc = ctypes.CDLL(None, use_errno=True)
libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)

pid = os.fork()
if pid == 0:
    os.setpgid(0, 0)
    signal.signal(signal.SIGUSR1, signal.SIG_DFL)
    try:
        os.execvp(sys.argv[1], sys.argv[1:])
    finally:
        os._exit(127)
try:
    os.setpgid(pid, pid)
except OSError:
    pass  # the child did it first (or already exec'd)

cut = False


def kill_group():
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def on_cut(signum, frame):
    global cut
    cut = True
    kill_group()


signal.signal(signal.SIGUSR1, on_cut)
signal.signal(signal.SIGTERM, on_cut)

status = None
while True:
    try:
        p, st = os.waitpid(-1, 0)
    except ChildProcessError:
        break
    if p == pid:
        status = st
        # UML exited by itself (halt): stop whatever helper is left.
        kill_group()
if cut:
    sys.exit(137)
sys.exit(os.waitstatus_to_exitcode(status) if status is not None else 1)
