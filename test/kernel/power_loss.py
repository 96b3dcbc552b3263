#!/usr/bin/python3
# Power-loss test, guest side: runs inside user-mode Linux, one process per
# boot (test/kernel/power-loss.sh starts it once the server is up). The host
# (tools/kernel-power-loss.js) kills the whole UML at a random moment while
# the workload runs; that is the power cut. The next boot checks what the cut
# left against a model of everything the previous boot did, then runs the
# workload again.
#
#   power_loss.py check-and-work   check the previous cut (boot > 0), then
#                                  run the workload until the power goes
#   power_loss.py check-and-stop   check the previous cut (the last boot)
#   power_loss.py classify --reason R   the verdict on the previous cut when
#                                  the check could not run (the server did
#                                  not start): failed with R, and where the
#                                  cut landed
#   power_loss.py verify-raw       after a clean stop: the raw image file
#                                  holds what the last check read
#   power_loss.py selftest         the model's rules on made-up logs (host)
#
# Files in PL_DIR (on the host filesystem: hostfs writes go straight to the
# host with write(2), so they survive the cut):
#   model-N.json   the volume as boot N found it, after its check and a FLUSH
#                  (so it is durable): live blocks and every snapshot's
#                  blocks (as write tags), the expected rollback basis
#   events-N.log   what boot N's workload did, one line per event, written
#                  BEFORE a request is sent and AFTER its reply is seen:
#                    S                    workload started
#                    W k h b tag flags    write k on handle h to 4 KiB block b
#                                         (flags: 1 FUA, 2 write-zeroes, 4 trim;
#                                         zeroes and trims have tag 0)
#                    A k | E k msg        write k acknowledged | failed
#                    F k h | FA k | FE k  FLUSH k issued | done | failed
#                    C name via ms        snapshot create issued (via ctl: the
#                                         control socket, or cli: the CLI), at
#                                         ms milliseconds into the workload
#                    CD name ok|err ms [message]   create returned
#                    D name via ms, DD ...          snapshot delete
#                    R name via ms, RD name ok ms SINCE | RD name err ms msg
#                                                   rollback (SINCE: its
#                                                   startedAt, the basedOn.since
#                                                   the manifest records)
#                    J n                  jobs poll: n chunks still to merge
#                                         (-1: no merge running)
#                    B n ms | BE ms       first-write burst of n writes right
#                                         after a create starts | its closing
#                                         FLUSH completed
#                    V ms | X message     after a merge finished, with no write
#                                         in flight, live read back exactly what
#                                         was acknowledged | it did not (a
#                                         failure, reported by the next check)
#   cut-N.json     the verdict on the cut that ended boot N, written by boot
#                  N+1: {"ok", "phases", "failures", ...}
#
# Block content: a 4 KiB block written with tag T (T > 0) is a 32-byte
# header (magic, block number, T, T ^ constant) repeated 128 times, so a read
# names the write it came from and a torn or misplaced block is recognised.
# Tag 0 is all zeroes (never written, write-zeroes, trim).
#
# The model (replayed from events-N.log over model-N.json), per block:
#   - durable: the values a power cut cannot lose: the newest write that was
#     acknowledged with FUA, or acknowledged before a FLUSH was issued that
#     then completed, or before a snapshot create was issued that completed
#     (create flushes the live volume with writes drained); with nothing
#     newer durable, the value the boot started with;
#   - after: writes issued after the durable one; each may or may not have
#     reached the disk (a volatile write cache loses them in any
#     combination), so the live block after the cut must be one of
#     durable ∪ after.
#   - A snapshot holds every write acknowledged before its create was
#     issued; a write still in flight then, or issued before the create
#     returned, is wholly in or out: per block, the snapshot's value is the
#     newest write acknowledged before the issue, or one of those.
#   - A confirmed rollback to S makes each block S's value; writes in flight
#     when the rollback was issued or issued before it returned are either
#     before the switch (replaced by S) or after it (on top of S). One in
#     flight at the cut took effect or not, as the manifest's basedOn says.
#   - A snapshot create or delete in flight at the cut: the snapshot is
#     listed and exact, or absent. One exception is accepted and counted: a
#     create whose manifest entry was written but which had not joined the
#     chain comes back showing the volume exactly as the cut left it
#     (documented in docs/architecture.md, crash invariants).
#   - Writes to one block are never in flight together (the workload keeps
#     them apart), so they are ordered by issue.
# After a check, what was read becomes the next boot's model (live and
# snapshots), made durable by a FLUSH before the workload starts.
import argparse
import json
import os
import random
import select
import socket
import struct
import subprocess
import sys
import time

import nbd

BS = 4096
MAGIC = b'PLW1'
TAG_KEY = 0x9E3779B97F4A7C15
F_FUA, F_ZERO, F_TRIM = 1, 2, 4
TAGS_PER_BOOT = 10_000_000


def block_data(b, tag):
    if tag == 0:
        return bytes(BS)
    return struct.pack('<4sIQQQ', MAGIC, b, tag, tag ^ TAG_KEY, 0) * (BS // 32)


def decode(data, b):
    """The tag of block b's content, or a string describing unknown content."""
    blk = data[b * BS:(b + 1) * BS]
    if blk.count(0) == BS:
        return 0
    head = blk[:32]
    magic, bb, tag, chk, _ = struct.unpack('<4sIQQQ', head)
    if magic != MAGIC or chk != tag ^ TAG_KEY:
        return 'unknown content (first bytes %s)' % head[:16].hex()
    if blk != head * (BS // 32):
        return 'torn block (starts as tag %d of block %d)' % (tag, bb)
    if bb != b:
        return 'content of block %d (tag %d) at block %d' % (bb, tag, b)
    return tag


def now():
    return time.monotonic()


# ------------------------------------------------------------------ control


class Ctl:
    """One connection to IMAGE.nbd/control.sock (JSON lines, as the CLI sends them)."""

    def __init__(self, path, timeout=120):
        self.s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.s.settimeout(timeout)
        self.s.connect(path)
        self.buf = b''

    def send(self, req):
        self.s.sendall(json.dumps(req).encode() + b'\n')

    def reply_ready(self):
        """Non-blocking: the parsed reply if a whole line has arrived, else None."""
        if b'\n' not in self.buf:
            self.s.setblocking(False)
            try:
                d = self.s.recv(65536)
                if not d:
                    raise ConnectionError('control socket closed')
                self.buf += d
            except BlockingIOError:
                pass
            finally:
                self.s.setblocking(True)
        if b'\n' not in self.buf:
            return None
        line, self.buf = self.buf.split(b'\n', 1)
        return json.loads(line)

    def call(self, req):
        self.send(req)
        while b'\n' not in self.buf:
            d = self.s.recv(65536)
            if not d:
                raise ConnectionError('control socket closed')
            self.buf += d
        line, self.buf = self.buf.split(b'\n', 1)
        r = json.loads(line)
        if not r.get('ok'):
            raise RuntimeError('%s: %s %s' % (req.get('op'), r.get('code'), r.get('message')))
        return r['result']

    def close(self):
        self.s.close()


def open_export(sock, name, timeout_s=60):
    h = nbd.NBD()
    h.set_export_name(name)
    h.connect_unix(sock)
    return h


# ------------------------------------------------------------------ events


def read_events(path):
    ev = []
    try:
        with open(path, 'rb') as f:
            raw = f.read().decode('utf-8', 'replace')
    except FileNotFoundError:
        return None
    lines = raw.split('\n')
    if lines and lines[-1] != '':
        lines.pop()  # a torn last line (cannot happen with write-through, but be safe)
    for ln in lines:
        if ln:
            ev.append(ln.split(' '))
    return ev


class Write:
    __slots__ = ('k', 'b', 'tag', 'fua', 'pos', 'acked', 'ambig', 'rb_base')

    def __init__(self, k, b, tag, fua, pos):
        self.k, self.b, self.tag, self.fua, self.pos = k, b, tag, fua, pos
        self.acked = None
        self.ambig = False
        self.rb_base = None


class Replay:
    """Replays one boot's events over the model it started from (see the top of the file)."""

    def __init__(self, model, events, observed_snaps, actual_basis):
        nb = model['blocks']
        self.nb = nb
        self.dur = [{t} for t in model['live']]
        self.cur = [{t} for t in model['live']]
        self.after = [[] for _ in range(nb)]
        self.W = {}
        self.wlist = []
        self.acked_nd = set()
        self.inflight = set()
        self.flushes = {}
        # name -> {'sets': per-block sets, 'status': 'must' | 'maybe', 'how': text}
        self.snaps = {}
        for s in model['snaps']:
            self.snaps[s['name']] = {'sets': [{t} for t in s['data']], 'status': 'must', 'how': 'existed at the start of the boot'}
        self.gone = {}
        self.observed = observed_snaps
        self.basis = model.get('basedOn')
        self.op = None
        self.burst_open = False
        self.errors = []
        self.counts = {'writes': 0, 'acked': 0, 'fua': 0, 'flushes': 0, 'creates': 0, 'deletes': 0, 'rollbacks': 0, 'bursts': 0}
        self.merge_polled = None
        self.op_ms = {}
        self.basis_or_none = False
        self.phases = []
        self.rb_landed = None
        for pos, e in enumerate(events):
            self.step(pos, e)
        self.finish(len(events), actual_basis)

    # -- helpers

    def target_sets(self, name):
        """S's per-block values for a rollback: as read after the cut when S is still there."""
        if name in self.observed:
            return [{t} for t in self.observed[name]]
        return self.snaps[name]['sets']

    def make_durable(self, k):
        w = self.W[k]
        lst = self.after[w.b]
        try:
            i = lst.index(k)
        except ValueError:
            return  # superseded by a newer durable write or a rollback
        self.dur[w.b] = (w.rb_base | {w.tag}) if w.ambig else {w.tag}
        for j in lst[:i + 1]:
            self.acked_nd.discard(j)
        self.after[w.b] = lst[i + 1:]

    def create_sets(self, op):
        sets = [set(x) for x in op['cur_at']]
        for k in op['inflight_at']:
            w = self.W[k]
            sets[w.b].add(w.tag)
        for k in op['conc']:
            w = self.W[k]
            sets[w.b].add(w.tag)
        return sets

    def apply_rollback(self, op):
        S = self.target_sets(op['name'])
        kept = [k for k in self.wlist if self.W[k].pos > op['pos'] or k in op['inflight_at']]
        for b in range(self.nb):
            self.dur[b] = set(S[b])
            self.cur[b] = set(S[b])
            self.after[b] = []
        for k in kept:
            w = self.W[k]
            w.ambig = True
            w.rb_base = set(S[w.b])
            self.after[w.b].append(k)
            if w.acked is not None:
                self.cur[w.b] = S[w.b] | {w.tag}
        ks = set(kept)
        self.acked_nd = {k for k in self.acked_nd if k in ks}

    def op_done(self, op, e):
        """Keeps how long each control operation took (ctl: the server's time, plus a socket round trip)."""
        self.op_ms.setdefault('%s-%s' % (op['kind'], op['via']), []).append(int(e[3]) - op['ms'])

    # -- events

    def step(self, pos, e):
        t = e[0]
        if t == 'W':
            k, b, tag, fl = int(e[1]), int(e[3]), int(e[4]), int(e[5])
            w = Write(k, b, tag, bool(fl & F_FUA), pos)
            self.W[k] = w
            self.wlist.append(k)
            self.after[b].append(k)
            self.inflight.add(k)
            self.counts['writes'] += 1
            if self.op and self.op['kind'] == 'C':
                self.op['conc'].append(k)
        elif t == 'A':
            k = int(e[1])
            w = self.W[k]
            w.acked = pos
            self.inflight.discard(k)
            self.counts['acked'] += 1
            self.cur[w.b] = (w.rb_base | {w.tag}) if w.ambig else {w.tag}
            if w.fua:
                self.counts['fua'] += 1
                self.make_durable(k)
            else:
                self.acked_nd.add(k)
        elif t == 'E':
            self.errors.append('write %s failed: %s' % (e[1], ' '.join(e[2:])))
            self.inflight.discard(int(e[1]))
        elif t == 'F':
            self.flushes[int(e[1])] = sorted(self.acked_nd, key=lambda k: self.W[k].pos)
        elif t == 'FA':
            self.counts['flushes'] += 1
            for k in self.flushes.pop(int(e[1])):
                self.make_durable(k)
        elif t == 'FE':
            self.errors.append('flush %s failed: %s' % (e[1], ' '.join(e[2:])))
        elif t in ('C', 'D', 'R'):
            op = {'kind': t, 'name': e[1], 'via': e[2], 'ms': int(e[3]), 'pos': pos, 'inflight_at': set(self.inflight), 'conc': []}
            if t == 'C':
                op['cur_at'] = [set(x) for x in self.cur]
                op['covers'] = list(self.acked_nd)
            self.op = op
        elif t == 'CD':
            op, self.op = self.op, None
            self.op_done(op, e)
            if e[2] == 'ok':
                self.counts['creates'] += 1
                self.snaps[op['name']] = {'sets': self.create_sets(op), 'status': 'must', 'how': 'created in the boot (confirmed, via %s)' % op['via']}
                for k in op['covers']:
                    self.make_durable(k)
            else:
                self.errors.append('snapshot create %s failed: %s' % (op['name'], ' '.join(e[4:])))
                self.snaps[op['name']] = {'sets': self.create_sets(op), 'status': 'maybe', 'how': 'create failed'}
        elif t == 'DD':
            op, self.op = self.op, None
            self.op_done(op, e)
            if e[2] == 'ok':
                self.counts['deletes'] += 1
                self.gone[op['name']] = self.snaps.pop(op['name'])
                if self.basis and self.basis['snapshot'] == op['name']:
                    self.basis = None
            else:
                self.errors.append('snapshot delete %s failed: %s' % (op['name'], ' '.join(e[4:])))
                self.snaps[op['name']]['status'] = 'maybe'
        elif t == 'RD':
            op, self.op = self.op, None
            self.op_done(op, e)
            if e[2] == 'ok':
                self.counts['rollbacks'] += 1
                self.apply_rollback(op)
                self.basis = {'snapshot': op['name'], 'since': e[4]}
            else:
                self.errors.append('rollback to %s failed: %s' % (op['name'], ' '.join(e[4:])))
                self.basis = 'unknown'
        elif t == 'J':
            self.merge_polled = int(e[1])
        elif t == 'B':
            self.burst_open = True
            self.counts['bursts'] += 1
        elif t == 'BE':
            self.burst_open = False
        elif t == 'X':
            self.errors.append('workload: ' + ' '.join(e[1:]))
        elif t == 'V':
            self.counts['verified'] = self.counts.get('verified', 0) + 1

    def finish(self, pos, actual_basis):
        op = self.op
        if op and op['kind'] == 'C':
            self.snaps[op['name']] = {'sets': self.create_sets(op), 'status': 'maybe', 'how': 'create in flight at the cut', 'inflight_create': True}
            self.phases.append('create')
        elif op and op['kind'] == 'D':
            self.snaps[op['name']]['status'] = 'maybe'
            self.snaps[op['name']]['how'] += '; delete in flight at the cut'
            self.phases.append('delete')
            if self.basis and self.basis != 'unknown' and self.basis['snapshot'] == op['name']:
                self.basis_or_none = True  # deleting the basis drops it
        elif op and op['kind'] == 'R':
            self.phases.append('rollback')
            before = self.basis
            self.rb_landed = not same_basis(before, actual_basis)
            if self.rb_landed:
                self.apply_rollback(op)
                self.basis = {'snapshot': op['name'], 'since': actual_basis['since'] if actual_basis else None}
        if self.burst_open:
            self.phases.append('first-write-burst')
        self.live = [self.dur[b] | {self.W[k].tag for k in self.after[b]} for b in range(self.nb)]
        self.unflushed = len(self.acked_nd)
        self.in_flight_writes = len(self.inflight)

    def describe_tag(self, tag):
        if tag == 0:
            return 'zeroes'
        if not isinstance(tag, int):
            return tag
        for w in self.W.values():
            if w.tag == tag:
                return 'write %d (tag %d, %s%s%s)' % (
                    w.k, tag, 'acked' if w.acked is not None else 'not acked', ', FUA' if w.fua else '',
                    ', concurrent with a rollback' if w.ambig else '')
        return 'tag %d (an earlier boot)' % tag


def same_basis(a, b):
    if a == 'unknown':
        return True
    if not a or not b:
        return not a and not b
    return a.get('snapshot') == b.get('snapshot') and a.get('since') == b.get('since')


# ------------------------------------------------------------------ check


def read_all(sock, name, size):
    h = open_export(sock, name)
    try:
        out = bytearray()
        step = 1 << 20
        for off in range(0, size, step):
            out += h.pread(min(step, size - off), off)
        return bytes(out)
    finally:
        h.shutdown()


def merge_resumed(server_log):
    try:
        with open(server_log, 'r', errors='replace') as f:
            return 'resuming an unfinished rollback merge' in f.read()
    except FileNotFoundError:
        return False


def check_cut(a, model, events):
    """Checks the state the cut that ended boot a.boot - 1 left. Returns (verdict dict, new model)."""
    fails = []
    ctl = Ctl(a.ctl)
    listing = ctl.call({'op': 'snapshot-list'})
    info = ctl.call({'op': 'info'})
    ctl.close()
    listed = {s['name']: s for s in listing}
    actual_basis = info.get('basedOn')
    size = model['blocks'] * BS
    observed = {}
    for name, s in listed.items():
        if s.get('state') != 'active':
            fails.append('snapshot %s is listed %s: %s' % (name, s.get('state'), (s.get('failure') or {}).get('reason')))
            continue
        data = read_all(a.socket, '%s@%s' % (a.export, name), size)
        observed[name] = [decode(data, b) for b in range(model['blocks'])]
    live_data = read_all(a.socket, a.export, size)
    live = [decode(live_data, b) for b in range(model['blocks'])]

    r = Replay(model, events, {n: v for n, v in observed.items() if all(isinstance(t, int) for t in v)}, actual_basis)
    phases = list(r.phases)
    if merge_resumed(a.server_log):
        phases.append('merge')
    for msg in r.errors:
        fails.append(msg)

    def mismatch(what, obs, sets, how):
        bad = [b for b in range(model['blocks']) if obs[b] not in sets[b]]
        if not bad:
            return
        lines = []
        for b in bad[:6]:
            lines.append('block %d (chunk %d): read %s; allowed: %s' % (
                b, b * BS // model['chunkSize'], r.describe_tag(obs[b]), ', '.join(r.describe_tag(t) for t in sorted(sets[b]))))
        fails.append('%s (%s): %d of %d blocks differ from the model: %s' % (what, how, len(bad), model['blocks'], '; '.join(lines)))

    notes = []
    for name, s in r.snaps.items():
        if name not in listed:
            if s['status'] == 'must':
                fails.append('snapshot %s (%s) is not listed after the cut' % (name, s['how']))
            else:
                notes.append('%s absent (%s)' % (name, s['how']))
            continue
        if name in observed:
            if s.get('inflight_create') and observed[name] == live and any(observed[name][b] not in s['sets'][b] for b in range(model['blocks'])):
                # The manifest listed it, the cut came before it joined the
                # chain: at open it joins and shows the volume as the cut
                # left it (docs/architecture.md, crash invariants). Not the
                # point in time the create would have given, but a
                # crash-consistent one, and the create never returned.
                notes.append('%s present, showing the volume as the cut left it (%s)' % (name, s['how']))
                continue
            mismatch('snapshot %s' % name, observed[name], s['sets'], s['how'])
            if s['status'] == 'maybe':
                notes.append('%s present (%s)' % (name, s['how']))
    for name in listed:
        if name in r.gone:
            fails.append('snapshot %s was deleted (confirmed) but is listed after the cut' % name)
        elif name not in r.snaps:
            fails.append('snapshot %s is listed but the workload never created it' % name)
    mismatch('live volume', live, r.live, 'writes acked before a completed FLUSH or with FUA must be there')

    if r.rb_landed is not None:
        notes.append('rollback in flight %s' % ('took effect' if r.rb_landed else 'did not take effect'))
        if r.rb_landed and actual_basis and actual_basis.get('snapshot') != r.basis.get('snapshot'):
            fails.append('the volume is based on %s after the cut, the rollback in flight was to %s' % (actual_basis.get('snapshot'), r.basis.get('snapshot')))
    elif r.basis != 'unknown' and not same_basis(r.basis, actual_basis) and not (r.basis_or_none and actual_basis is None):
        fails.append('rollback basis after the cut is %s, expected %s' % (json.dumps(actual_basis), json.dumps(r.basis)))
    if not phases:
        phases.append('writes')
    verdict = {
        'cut': model['boot'],
        'ok': not fails,
        'phases': phases,
        'failures': fails[:20],
        'notes': notes,
        'counts': r.counts,
        'unflushedAtCut': r.unflushed,
        'writesInFlightAtCut': r.in_flight_writes,
        'mergePolled': r.merge_polled,
        'opMs': r.op_ms,
        'snapshots': sorted(listed),
    }
    snaps_order = [n for n in [s['name'] for s in listing] if n in observed]
    new_model = {
        'boot': a.boot,
        'blocks': model['blocks'],
        'chunkSize': model['chunkSize'],
        'live': live,
        'snaps': [{'name': n, 'data': observed[n]} for n in snaps_order],
        'basedOn': {'snapshot': actual_basis['snapshot'], 'since': actual_basis['since']} if actual_basis else None,
    }
    return verdict, new_model


def classify_only(model, events, server_log):
    r = Replay(model, events, {}, None)
    phases = list(r.phases)
    if merge_resumed(server_log):
        phases.append('merge')
    return phases or ['writes']


def write_json(path, obj):
    tmp = path + '.tmp'
    with open(tmp, 'w') as f:
        json.dump(obj, f)
    os.rename(tmp, path)


# ------------------------------------------------------------------ workload


class Workload:
    QD = 8  # writes in flight (both connections together)
    BURST_QD = 16
    MAX_SNAPS = 4

    def __init__(self, a, model):
        self.a = a
        self.nb = model['blocks']
        self.rng = random.Random(a.seed * 1_000_003 + a.boot)
        self.fd = os.open(os.path.join(a.dir, 'events-%d.log' % a.boot), os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o644)
        self.pending_lines = []
        # two connections: a FLUSH on either covers writes acknowledged on both (multi-conn)
        self.h = [open_export(a.socket, a.export), open_export(a.socket, a.export)]
        self.inflight = {}  # (handle, cookie) -> (kind 'w' | 'f', id, block, buffer)
        self.nw = 0  # writes in flight
        self.busy = set()  # blocks with a write in flight
        self.k = 0
        self.tag = a.boot * TAGS_PER_BOOT
        self.snaps = [s['name'] for s in model['snaps']]
        self.snap_seq = 0
        self.op = None  # the control operation in flight
        self.burst_left = 0  # burst writes still to issue
        self.burst_ids = set()  # burst writes in flight
        self.in_burst = False
        self.burst_flush = None
        self.flush_k = None  # the periodic FLUSH in flight
        self.next_flush = now() + self.rng.uniform(0.05, 0.3)
        self.next_action = now() + self.rng.uniform(0.0, 0.25)
        self.merging = True  # until the first jobs poll says otherwise
        self.jobs = Ctl(a.ctl)
        self.jobs_pending = False
        self.next_jobs = 0.0
        self.model = model
        self.merge_seen = False
        self.verify_due = False

    def log(self, *lines):
        self.pending_lines.extend(lines)

    def ms(self):
        return int((now() - self.t0) * 1000)

    def flushlog(self):
        """Writes the pending lines to the host (hostfs: write(2) reaches the host file at once)."""
        if self.pending_lines:
            data = ('\n'.join(self.pending_lines) + '\n').encode()
            self.pending_lines = []
            while data:
                n = os.write(self.fd, data)
                data = data[n:]

    # -- NBD

    def reap(self):
        for key in list(self.inflight.keys()):
            hi, cookie = key
            kind, k, b, _ = self.inflight[key]
            try:
                done = self.h[hi].aio_command_completed(cookie)
                err = None
            except nbd.Error as e:
                done, err = True, (e.string or str(e)).replace('\n', ' ')
            if not done:
                continue
            del self.inflight[key]
            if kind == 'w':
                self.nw -= 1
                self.busy.discard(b)
                self.burst_ids.discard(k)
                self.log('A %d' % k if err is None else 'E %d %s' % (k, err))
                continue
            self.log('FA %d' % k if err is None else 'FE %d %s' % (k, err))
            if k == self.flush_k:
                self.flush_k = None
            if k == self.burst_flush:
                self.burst_flush = None
                self.in_burst = False
                self.log('BE %d' % self.ms())
                self.next_action = now() + self.rng.uniform(0.0, 0.3)

    def plan_writes(self):
        """Chooses the writes to send now and logs them (the log is written before they are sent)."""
        todo = []
        limit = self.BURST_QD if self.burst_left else self.QD
        tries = 0
        while self.nw + len(todo) < limit and tries < 64:
            tries += 1
            b = self.rng.randrange(self.nb)
            if b in self.busy:
                continue
            burst = self.burst_left > 0
            r = self.rng.random()
            if burst:
                flags = 0
                self.burst_left -= 1
            elif r < 0.03:
                flags = F_ZERO
            elif r < 0.05:
                flags = F_TRIM
            elif r < 0.15:
                flags = F_FUA
            else:
                flags = 0
            self.k += 1
            if flags & (F_ZERO | F_TRIM):
                tag = 0
            else:
                self.tag += 1
                tag = self.tag
            hi = self.rng.randrange(2)
            self.busy.add(b)
            if burst:
                self.burst_ids.add(self.k)
            todo.append((hi, self.k, b, tag, flags))
            self.log('W %d %d %d %d %d' % (self.k, hi, b, tag, flags))
        return todo

    def send_writes(self, todo):
        for hi, k, b, tag, flags in todo:
            h = self.h[hi]
            buf = None
            if flags & F_ZERO:
                cookie = h.aio_zero(BS, b * BS)
            elif flags & F_TRIM:
                cookie = h.aio_trim(BS, b * BS)
            else:
                buf = nbd.Buffer.from_bytearray(bytearray(block_data(b, tag)))
                cookie = h.aio_pwrite(buf, b * BS, flags=nbd.CMD_FLAG_FUA if flags & F_FUA else 0)
            self.inflight[(hi, cookie)] = ('w', k, b, buf)
            self.nw += 1

    def send_flush(self):
        hi = self.rng.randrange(2)
        self.k += 1
        self.log('F %d %d' % (self.k, hi))
        self.flushlog()
        cookie = self.h[hi].aio_flush()
        self.inflight[(hi, cookie)] = ('f', self.k, None, None)
        return self.k

    # -- control operations

    def start_op(self, kind, name):
        via = 'cli' if self.rng.random() < self.a.cli_share else 'ctl'
        self.log('%s %s %s %d' % (kind, name, via, self.ms()))
        self.flushlog()
        op = {'kind': kind, 'name': name, 'via': via}
        if via == 'ctl':
            # the request the CLI sends, without a node start-up in front of it
            c = Ctl(self.a.ctl)
            req = {'C': {'op': 'snapshot-create', 'name': name},
                   'D': {'op': 'snapshot-delete', 'name': name},
                   'R': {'op': 'rollback', 'name': name, 'by': 'power-loss test'}}[kind]
            c.send(req)
            op['ctl'] = c
        else:
            args = {'C': ['snapshot', 'create', self.a.image, name],
                    'D': ['snapshot', 'delete', self.a.image, name],
                    'R': ['rollback', self.a.image, name, '--json']}[kind]
            op['proc'] = subprocess.Popen([self.a.node, self.a.cli] + args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            op['out'] = b''
        self.op = op

    def op_fds(self):
        if not self.op:
            return []
        if 'ctl' in self.op:
            return [self.op['ctl'].s.fileno()]
        return [self.op['proc'].stdout.fileno()]

    def poll_op(self):
        """(ok, result or error text) once the operation finished, else None."""
        op = self.op
        if 'ctl' in op:
            try:
                r = op['ctl'].reply_ready()
            except (OSError, ValueError) as e:
                op['ctl'].close()
                return False, 'control socket: %s' % e
            if r is None:
                return None
            op['ctl'].close()
            if r.get('ok'):
                return True, r.get('result')
            return False, '%s %s' % (r.get('code'), r.get('message'))
        p = op['proc']
        fd = p.stdout.fileno()
        r, _, _ = select.select([fd], [], [], 0)
        if not r:
            return None
        d = os.read(fd, 65536)
        if d:
            op['out'] += d
            return None
        p.wait()
        out = op['out'].decode('utf-8', 'replace')
        if p.returncode != 0:
            return False, 'exit %d: %s' % (p.returncode, out.strip().replace('\n', ' | '))
        if op['kind'] == 'R':
            try:
                return True, json.loads(out)
            except ValueError:
                return False, 'unparsable rollback output: ' + out.strip().replace('\n', ' | ')
        return True, out

    def finish_op(self, ok, res):
        op, self.op = self.op, None
        kind, name = op['kind'], op['name']
        self.next_action = now() + self.rng.uniform(0.0, 0.4)
        ms = self.ms()
        if kind == 'C':
            if not ok:
                self.log('CD %s err %d %s' % (name, ms, res))
                return
            self.log('CD %s ok %d' % (name, ms))
            self.snaps.append(name)
            # first-write burst: right after the create no chunk is preserved
            self.burst_left = self.rng.randrange(64, 320)
            self.in_burst = True
            self.log('B %d %d' % (self.burst_left, ms))
        elif kind == 'D':
            self.log('DD %s %s' % (name, 'ok %d' % ms if ok else 'err %d %s' % (ms, res)))
            if ok:
                self.snaps.remove(name)
        elif ok:
            self.log('RD %s ok %d %s' % (name, ms, res['startedAt']))
            self.merging = True
            self.next_jobs = 0.0
        else:
            self.log('RD %s err %d %s' % (name, ms, res))

    def choose_action(self):
        if self.merging:
            # Create and delete are refused while a merge runs; now and then
            # another rollback replaces it (asked every 0.1 s).
            if self.snaps and self.rng.random() < 0.03:
                return 'R', self.rng.choice(self.snaps)
            return None
        r = self.rng.random()
        n = len(self.snaps)
        if n == 0 or (n < self.MAX_SNAPS and r < 0.45):
            self.snap_seq += 1
            return 'C', 'b%dn%d' % (self.a.boot, self.snap_seq)
        if r < 0.75:
            return 'D', self.rng.choice(self.snaps)
        return 'R', self.rng.choice(self.snaps)

    def verify_online(self):
        """After a merge, with no write in flight: live must read what was acknowledged (no power cut
        involved). Logs V (ok) or X (the mismatch, which fails the next boot's check)."""
        self.verify_due = False
        self.flushlog()
        data = self.h[0].pread(self.nb * BS, 0)
        events = read_events(os.path.join(self.a.dir, 'events-%d.log' % self.a.boot))
        r = Replay(self.model, events, {}, None)
        bad = [b for b in range(self.nb) if decode(data, b) not in r.cur[b]]
        if not bad:
            self.log('V %d' % self.ms())
            return
        what = '; '.join('block %d read %s, acked last: %s' % (b, r.describe_tag(decode(data, b)), ', '.join(r.describe_tag(t) for t in sorted(r.cur[b])))
                         for b in bad[:4])
        self.log('X online, after a merge finished and before any cut, %d blocks do not read what was acknowledged: %s' % (len(bad), what))

    # -- main loop: runs until the power goes

    def run(self):
        self.t0 = now()
        self.log('S')
        self.flushlog()
        while True:
            self.reap()
            t = now()
            # is a merge running? (jobs does not wait for queued first writes)
            if self.jobs_pending:
                r = self.jobs.reply_ready()
                if r is not None:
                    self.jobs_pending = False
                    jobs = r.get('result') or []
                    self.log('J %d' % (jobs[0]['total'] - jobs[0]['done'] if jobs else -1))
                    if self.merging and not jobs and self.merge_seen:
                        self.verify_due = True  # a merge just finished: does live read back right?
                    self.merge_seen = bool(jobs)
                    self.merging = bool(jobs)
                    self.next_jobs = t + 0.15
            elif self.merging and t >= self.next_jobs:
                self.jobs.send({'op': 'jobs'})
                self.jobs_pending = True
            if self.op:
                r = self.poll_op()
                if r is not None:
                    self.finish_op(*r)
            elif not self.in_burst and t >= self.next_action:
                act = self.choose_action()
                if act:
                    self.start_op(*act)
                else:
                    self.next_action = t + 0.1
            if self.verify_due and not self.op:
                if self.nw == 0:
                    self.verify_online()
                todo = []  # let the writes in flight drain first
            else:
                todo = self.plan_writes()
            self.flushlog()
            self.send_writes(todo)
            if self.in_burst:
                # FLUSH once the burst's writes are all acknowledged
                if not self.burst_left and not self.burst_ids and self.burst_flush is None:
                    self.burst_flush = self.send_flush()
            elif self.flush_k is None and t >= self.next_flush:
                self.flush_k = self.send_flush()
                self.next_flush = t + self.rng.uniform(0.05, 0.4)
            self.flushlog()
            self.pump(0.02)

    def pump(self, timeout):
        rfds, wfds, fdmap = [], [], {}
        for i, h in enumerate(self.h):
            fd = h.aio_get_fd()
            d = h.aio_get_direction()
            fdmap[fd] = i
            if d & nbd.AIO_DIRECTION_READ:
                rfds.append(fd)
            if d & nbd.AIO_DIRECTION_WRITE:
                wfds.append(fd)
        extra = self.op_fds()
        if self.jobs_pending:
            extra.append(self.jobs.s.fileno())
        r, w, _ = select.select(rfds + extra, wfds, [], timeout)
        for fd in r:
            if fd in fdmap:
                self.h[fdmap[fd]].aio_notify_read()
        for fd in w:
            if fd in fdmap:
                self.h[fdmap[fd]].aio_notify_write()


# ------------------------------------------------------------------ self-test


def selftest():
    """The model's rules on small made-up event logs (run on the host before any boot)."""
    base = {'boot': 1, 'blocks': 4, 'chunkSize': 16384, 'live': [0, 0, 0, 0], 'snaps': [], 'basedOn': None}

    def run(lines, observed=None, basis=None, model=None):
        return Replay(model or base, [ln.split(' ') for ln in lines], observed or {}, basis)

    cases = 0

    def expect(what, got, want):
        nonlocal cases
        cases += 1
        if got != want:
            raise AssertionError('%s: got %r, want %r' % (what, got, want))

    # FLUSH: covers writes acknowledged before it was issued, not after
    r = run(['S', 'W 1 0 0 11 0', 'A 1', 'W 2 1 1 12 0', 'F 3 1', 'A 2', 'FA 3'])
    expect('acked before FLUSH', r.live[0], {11})
    expect('acked after FLUSH issued', r.live[1], {0, 12})
    # a FLUSH that did not complete covers nothing; a write in flight may or may not be there
    r = run(['S', 'W 1 0 0 11 0', 'A 1', 'F 2 0', 'W 3 0 1 12 0'])
    expect('FLUSH not completed', r.live[0], {0, 11})
    expect('write in flight', r.live[1], {0, 12})
    # FUA: durable once acknowledged; a later write may be lost, the FUA one not
    r = run(['S', 'W 1 0 0 11 1', 'A 1', 'W 2 0 0 12 0', 'A 2'])
    expect('FUA then plain', r.live[0], {11, 12})
    # an older write's FLUSH after a newer FUA changes nothing
    r = run(['S', 'W 1 0 0 11 0', 'A 1', 'F 2 0', 'W 3 0 0 12 1', 'A 3', 'FA 2'])
    expect('FUA newer than flushed', r.live[0], {12})
    # zeroes and trims are writes of tag 0
    r = run(['S', 'W 1 0 0 11 1', 'A 1', 'W 2 0 0 0 2', 'A 2', 'F 3 0', 'FA 3'])
    expect('write-zeroes flushed', r.live[0], {0})
    # snapshot create: acked before the issue is in; in flight or issued before it returned: in or out;
    # issued after it returned: out; a confirmed create makes earlier acked writes durable
    r = run(['S', 'W 1 0 0 11 0', 'A 1', 'W 2 0 1 12 0', 'C s1 ctl 5', 'W 3 0 2 13 0', 'A 2', 'CD s1 ok 9',
             'W 4 0 3 14 0', 'A 3', 'A 4'])
    expect('create: acked before', r.snaps['s1']['sets'][0], {11})
    expect('create: in flight', r.snaps['s1']['sets'][1], {0, 12})
    expect('create: issued during', r.snaps['s1']['sets'][2], {0, 13})
    expect('create: issued after', r.snaps['s1']['sets'][3], {0})
    expect('create flushes live', r.live[0], {11})
    expect('create status', r.snaps['s1']['status'], 'must')
    # a create in flight at the cut: maybe there
    r = run(['S', 'W 1 0 0 11 0', 'A 1', 'C s1 ctl 5', 'W 2 0 0 12 0'])
    expect('create in flight', (r.snaps['s1']['status'], r.snaps['s1']['sets'][0], r.phases), ('maybe', {11, 12}, ['create']))
    expect('create in flight flushes nothing', r.live[0], {0, 11, 12})
    # rollback: live shows the snapshot, then writes issued while it ran (in or out) and after it
    m = dict(base, live=[21, 22, 0, 0], snaps=[{'name': 's1', 'data': [1, 2, 3, 4]}])
    r = run(['S', 'W 1 0 0 11 0', 'A 1', 'R s1 ctl 5', 'W 2 0 1 12 0', 'A 2', 'RD s1 ok 9 T1', 'W 3 0 2 13 0', 'A 3', 'F 4 0', 'FA 4'], model=m)
    expect('rollback: acked before', r.live[0], {1})
    expect('rollback: written during', r.live[1], {2, 12})
    expect('rollback: written after, flushed', r.live[2], {13})
    expect('rollback basis', r.basis, {'snapshot': 's1', 'since': 'T1'})
    # a write issued during the rollback, flushed after it: the snapshot's value or the write
    r = run(['S', 'R s1 ctl 5', 'W 1 0 0 11 0', 'A 1', 'RD s1 ok 9 T1', 'F 2 0', 'FA 2'], model=m)
    expect('rollback: ambiguous then flushed', r.live[0], {1, 11})
    # a rollback in flight at the cut: the basis says whether it took effect
    r = run(['S', 'R s1 ctl 5'], model=m, basis={'snapshot': 's1', 'since': 'T2'})
    expect('rollback in flight, took effect', (r.rb_landed, r.live[0]), (True, {1}))
    r = run(['S', 'R s1 ctl 5'], model=m, basis=None)
    expect('rollback in flight, no effect', (r.rb_landed, r.live[0]), (False, {21}))
    # a rollback uses the snapshot as read after the cut when it is still there
    m2 = dict(base, snaps=[])
    r = run(['S', 'W 1 0 0 11 0', 'C s2 ctl 1', 'A 1', 'CD s2 ok 2', 'R s2 ctl 3', 'RD s2 ok 4 T3'], model=m2, observed={'s2': [11, 0, 0, 0]})
    expect('rollback to a snapshot made in the boot', (r.snaps['s2']['sets'][0], r.live[0]), ({0, 11}, {11}))
    # delete: confirmed is gone; in flight is maybe (and may drop the basis)
    m3 = dict(base, snaps=[{'name': 's1', 'data': [1, 2, 3, 4]}], basedOn={'snapshot': 's1', 'since': 'T0'})
    r = run(['S', 'D s1 ctl 5', 'DD s1 ok 7'], model=m3)
    expect('delete confirmed', ('s1' in r.gone, r.basis), (True, None))
    r = run(['S', 'D s1 ctl 5'], model=m3)
    expect('delete in flight', (r.snaps['s1']['status'], r.basis_or_none, r.phases), ('maybe', True, ['delete']))
    # a burst whose closing FLUSH did not complete
    r = run(['S', 'C s1 ctl 1', 'CD s1 ok 2', 'B 2 2', 'W 1 0 0 11 0', 'A 1'], model=m2)
    expect('burst open at the cut', r.phases, ['first-write-burst'])
    # failed operations are failures
    r = run(['S', 'C s1 ctl 1', 'CD s1 err 2 SNAPSHOT_CREATE_FAILED no room'], model=m2)
    expect('failed create reported', len(r.errors), 1)
    print('%d cases ok' % cases)
    return 0


# ------------------------------------------------------------------ main


def initial_model(a):
    size = os.path.getsize(a.image)
    return {'boot': 0, 'blocks': size // BS, 'chunkSize': a.chunk_size, 'live': [0] * (size // BS), 'snaps': [], 'basedOn': None}


def main():
    p = argparse.ArgumentParser()
    if sys.argv[1:] == ['selftest']:
        return selftest()
    p.add_argument('mode', choices=['check-and-work', 'check-and-stop', 'classify', 'verify-raw'])
    p.add_argument('--dir', required=True)
    p.add_argument('--boot', type=int, required=True)
    p.add_argument('--image', required=True)
    p.add_argument('--socket', required=True)
    p.add_argument('--export', default='disk')
    p.add_argument('--server-log', required=True)
    p.add_argument('--node', default='node')
    p.add_argument('--cli', required=True)
    p.add_argument('--seed', type=int, default=1)
    p.add_argument('--cli-share', type=float, default=0.2)
    p.add_argument('--chunk-size', type=int, default=16384)
    p.add_argument('--reason', default='')
    a = p.parse_args()
    a.ctl = a.image + '.nbd/control.sock'
    prev = a.boot - 1

    if a.mode == 'classify':
        # The verdict on the previous cut when the check could not run.
        with open(os.path.join(a.dir, 'model-%d.json' % prev)) as f:
            model = json.load(f)
        events = read_events(os.path.join(a.dir, 'events-%d.log' % prev)) or []
        phases = classify_only(model, events, a.server_log)
        write_json(os.path.join(a.dir, 'cut-%d.json' % prev), {'cut': prev, 'ok': False, 'phases': phases, 'failures': [a.reason]})
        print('cut %d: FAIL (phases %s): %s' % (prev, phases, a.reason))
        return 0

    if a.mode == 'verify-raw':
        # After a clean stop with no merge left, the raw image is the live volume.
        with open(os.path.join(a.dir, 'model-%d.json' % a.boot)) as f:
            model = json.load(f)
        with open(a.image, 'rb') as f:
            data = f.read()
        raw = [decode(data, b) for b in range(model['blocks'])]
        bad = [b for b in range(model['blocks']) if raw[b] != model['live'][b]]
        if bad:
            print('FAIL: %d blocks of the raw image differ from the live volume, first: block %d raw %s live %s' % (
                len(bad), bad[0], raw[bad[0]], model['live'][bad[0]]))
            return 1
        print('raw image matches the live volume (%d blocks)' % model['blocks'])
        return 0

    t0 = now()
    if a.boot == 0:
        model = initial_model(a)
        data = read_all(a.socket, a.export, model['blocks'] * BS)
        if data.count(0) != len(data):
            print('FAIL: the new image is not all zeroes')
            return 1
    else:
        with open(os.path.join(a.dir, 'model-%d.json' % prev)) as f:
            old = json.load(f)
        events = read_events(os.path.join(a.dir, 'events-%d.log' % prev))
        if events is None:
            print('FAIL: boot %d left no events log' % prev)
            return 1
        verdict, model = check_cut(a, old, events)
        verdict['checkSeconds'] = round(now() - t0, 2)
        write_json(os.path.join(a.dir, 'cut-%d.json' % prev), verdict)
        print('cut %d: %s, phases %s, counts %s, notes %s' % (prev, 'ok' if verdict['ok'] else 'FAIL', verdict['phases'], verdict['counts'], verdict['notes']))
        for msg in verdict['failures']:
            print('  FAIL: ' + msg)
        if not verdict['ok']:
            return 1
    # What was read is now the base: make it durable before building on it.
    h = open_export(a.socket, a.export)
    h.flush()
    h.shutdown()
    model['boot'] = a.boot
    write_json(os.path.join(a.dir, 'model-%d.json' % a.boot), model)
    print('boot %d: model written (%d snapshots: %s), check took %.1fs' % (a.boot, len(model['snaps']), ' '.join(s['name'] for s in model['snaps']), now() - t0))
    sys.stdout.flush()
    if a.mode == 'check-and-stop':
        return 0
    Workload(a, model).run()
    return 0


if __name__ == '__main__':
    sys.exit(main())
