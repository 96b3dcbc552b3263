#!/usr/bin/python3
# uml-run.py [--limit SECONDS] LINUX.UML ARGS...: runs user-mode Linux for the
# power-loss scenarios (tools/kernel-power-loss.js) so that it can be cut
# like a power supply and leaves nothing behind.
#
# UML is several host processes (the kernel, its I/O helper threads, one
# process per guest address space). This wrapper makes itself a child
# subreaper, starts UML in a process group of its own, and on SIGUSR1 (the
# power cut), SIGTERM, the end of --limit, or the death of its parent (the
# test harness) sends SIGKILL to that whole group at once. It exits only
# when every UML process is gone and reaped (the helpers are reparented to
# it, not to an init that may never reap them), so the disk file is no
# longer written once it has exited. Exit status: UML's own, or 137 after a
# cut.
import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36

args = sys.argv[1:]
limit = 0
if args[:1] == ['--limit']:
    limit = int(args[1])
    args = args[2:]

cut = False
pid = 0


def kill_group():
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def on_cut(signum, frame):
    global cut
    cut = True
    if pid:
        kill_group()


for sig in (signal.SIGUSR1, signal.SIGTERM, signal.SIGALRM):
    signal.signal(sig, on_cut)
libc = ctypes.CDLL(None, use_errno=True)
libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
libc.prctl(PR_SET_PDEATHSIG, signal.SIGUSR1, 0, 0, 0)
if os.getppid() == 1:
    sys.exit(137)  # the parent is already gone

pid = os.fork()
if pid == 0:
    os.setpgid(0, 0)
    for sig in (signal.SIGUSR1, signal.SIGTERM, signal.SIGALRM):
        signal.signal(sig, signal.SIG_DFL)
    try:
        os.execvp(args[0], args)
    finally:
        os._exit(127)
try:
    os.setpgid(pid, pid)
except OSError:
    pass  # the child did it first (or has exec'd)
if cut:
    kill_group()  # a signal came before the child existed
if limit:
    signal.alarm(limit)

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
