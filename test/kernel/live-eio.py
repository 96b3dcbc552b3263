#!/usr/bin/python3
# NBD client side of test/kernel/live-eio.sh (runs inside user-mode Linux
# with /usr/bin/python3 and python3-libnbd): writes, flushes and reads
# through a unix socket with libnbd, against a model of what the export
# must hold.
#
# The model has two views of every 512-byte sector:
#   live  what reads of the export must show while the image is healthy:
#         the newest acknowledged write (the page cache holds it);
#   disk  what the image holds once the server stopped without a successful
#         final flush (or its image latched a write-back error): a sector
#         written since the last successful FLUSH (and not by a successful
#         FUA write) holds its value at that FLUSH or any value written since.
# A successful FLUSH makes the disk view the live view. A write that failed
# leaves the old value or the new one (the NBD protocol allows anything; the
# server's design, docs/architecture.md "Shutdown", allows only these: a
# write refused by the latch or a stalled queue changes nothing, one that
# failed in its sync or half-way through may have landed). "stop MODEL
# failed" turns the disk view into the live view (what a restart reads); a
# read that sees one of several allowed values can pin it (--pin), so later
# checks (a remount, O_DIRECT) must see the same value: nothing reverts.
#
# Files: MODEL.img (the newest value), MODEL.mask (one byte per sector of
# the live view: 0 = MODEL.img exactly, 1 = anything (a partial sector of a
# failed write), 2 = one of the values listed in MODEL.cand), MODEL.cand (a
# pickle: {'live': {sector: [values]}, 'disk': {sector: [values]}}, a value
# None meaning anything; a sector not in 'disk' has the live view there) and
# MODEL.log (one line per write: tag, offset, length, result; to name the
# writes a mismatch concerns).
#
# Every command prints what it did and exits 0 when the outcome is the
# expected one, 1 when not, 2 on a usage error. The calling shell wraps each
# call in timeout(1): a command that does not return is a hang.
#
#   init MODEL FILE                       model = FILE's bytes, all known and durable
#   snap MODEL NAME                       MODEL@NAME = MODEL's live view (a snapshot's point in time)
#   assign MODEL FROM                     MODEL's views = FROM's live view (a rollback); MODEL's log stays
#   write SOCK EXPORT MODEL TAG OFF LEN ok|error|any [fua]
#   flush SOCK EXPORT MODEL ok|error|any  (any: exit 0 if it succeeded, 3 if it failed)
#   verify SOCK EXPORT MODEL [OFF LEN] [--errors-ok] [--pin]
#       read the export: the live view where known; with --errors-ok a read
#       that fails is fine (the device cannot be read), wrong data never is
#   verify-fails SOCK EXPORT [OFF LEN]    every read fails with EIO (a latched image: never stale data)
#   verify-file FILE MODEL [--pin]        the file read with O_DIRECT (what the disk holds) vs the disk view
#   kept MODEL OFF LEN                    the range's acknowledged writes are kept in the journal:
#                                         the next start replays them (disk view = live view there)
#   stop MODEL ok|failed                  the server stopped; its final flush succeeded, or failed
#   rewrite-failed SOCK EXPORT MODEL TAG ok|error
#       new data over every range a write failed on and every sector whose
#       value is not known exactly; each write must get that result
import errno
import mmap
import os
import pickle
import shutil
import sys

import nbd

SECTOR = 512
PIECE = 4 << 20


def num(s):
    s = s.strip()
    mult = {'K': 1 << 10, 'M': 1 << 20, 'G': 1 << 30}.get(s[-1:].upper(), 1)
    return int(s[:-1] if mult != 1 else s) * mult


def human(n):
    if n % (1 << 20) == 0:
        return '%dM' % (n >> 20)
    if n % 1024 == 0:
        return '%dK' % (n >> 10)
    return str(n)


def merged(values):
    """A candidate list without duplicates; [None] if anything goes."""
    if None in values:
        return [None]
    out = []
    for v in values:
        if v not in out:
            out.append(v)
    return out


class Model:
    # .img and .mask are mapped and changed in place; .cand is loaded and saved whole.
    def __init__(self, base):
        self.base = base
        self._f = [open(base + ext, 'r+b') for ext in ('.img', '.mask')]
        self.data = mmap.mmap(self._f[0].fileno(), 0)
        self.mask = mmap.mmap(self._f[1].fileno(), 0)
        try:
            with open(base + '.cand', 'rb') as f:
                c = pickle.load(f)
        except FileNotFoundError:
            c = {'live': {}, 'disk': {}}
        self.live = c['live']
        self.disk = c['disk']

    def save(self):
        self.data.flush()
        self.mask.flush()
        with open(self.base + '.cand.tmp', 'wb') as f:
            pickle.dump({'live': self.live, 'disk': self.disk}, f)
        os.rename(self.base + '.cand.tmp', self.base + '.cand')

    def log(self, line):
        with open(self.base + '.log', 'a') as f:
            f.write(line + '\n')

    def writes(self):
        out = []
        try:
            with open(self.base + '.log') as f:
                for line in f:
                    p = line.split()
                    if len(p) >= 4:
                        out.append((p[0], int(p[1]), int(p[2]), ' '.join(p[3:])))
        except FileNotFoundError:
            pass
        return out

    # -- the two views of one sector

    def sector(self, s):
        return bytes(self.data[s * SECTOR:(s + 1) * SECTOR])

    def live_set(self, s):
        m = self.mask[s]
        if m == 0:
            return [self.sector(s)]
        if m == 1:
            return [None]
        return list(self.live[s])

    def disk_set(self, s):
        return list(self.disk[s]) if s in self.disk else self.live_set(s)

    def set_live(self, s, values):
        values = merged(values)
        self.live.pop(s, None)
        if values == [None]:
            self.mask[s] = 1
        elif len(values) == 1:
            self.data[s * SECTOR:(s + 1) * SECTOR] = values[0]
            self.mask[s] = 0
        else:
            self.mask[s] = 2
            self.live[s] = values

    def set_disk(self, s, values):
        values = merged(values)
        if values == self.live_set(s):
            self.disk.pop(s, None)
        else:
            self.disk[s] = values

    # -- events

    def wrote(self, off, buf, ok, fua):
        """A write of buf at off: acknowledged (ok), with FUA or not; or failed."""
        first, last = off // SECTOR, (off + len(buf) - 1) // SECTOR
        for s in range(first, last + 1):
            a, b = max(off, s * SECTOR), min(off + len(buf), (s + 1) * SECTOR)
            if a != s * SECTOR or b != (s + 1) * SECTOR:
                new = None  # a partial sector: the model does not merge bytes
            else:
                new = bytes(buf[a - off:b - off])
            before_disk = self.disk_set(s)
            if ok:
                self.set_live(s, [new])
                self.set_disk(s, [new] if fua else before_disk + [new])
            else:
                self.set_live(s, self.live_set(s) + [new])
                self.set_disk(s, before_disk + [new])

    def flushed(self):
        self.disk.clear()

    def restarted(self):
        """The server stopped without a successful final flush: reads now show the disk."""
        for s, values in list(self.disk.items()):
            self.set_live(s, values)
        self.disk.clear()

    def pin(self, s, value, view):
        """A read of that view saw value (one of those allowed): from now on it is that value."""
        if view == 'live':
            if self.mask[s] == 2:
                d = self.disk_set(s)  # the disk may still hold another (no FLUSH since)
                self.set_live(s, [value])
                self.set_disk(s, d)
        else:
            self.set_disk(s, [value])

    # -- comparing

    def check(self, got, off, view, pin=False):
        """Runs [(start, end)] of bytes in [off, off+len(got)) that no allowed value explains."""
        n = len(got)
        first, end = off // SECTOR, (off + n) // SECTOR
        special = {s: v for s, v in self.live.items() if first <= s < end}
        if view == 'disk':
            for s, v in self.disk.items():
                if first <= s < end:
                    special[s] = v
        bad = []
        want = self.data[off:off + n]
        if want != bytes(got):
            step = 4096
            for i in range(0, n, step):
                j = min(n, i + step)
                if want[i:j] == got[i:j]:
                    continue
                for p in range(i, j, SECTOR):
                    s = (off + p) // SECTOR
                    if s in special or self.mask[s] == 1:
                        continue
                    if want[p:p + SECTOR] != got[p:p + SECTOR]:
                        bad.append(s)
        for s, values in special.items():
            if None in values:
                continue
            p = s * SECTOR - off
            v = bytes(got[p:p + SECTOR])
            if v not in values:
                bad.append(s)
            elif pin:
                self.pin(s, v, view)
        runs = []
        for s in sorted(bad):
            if runs and runs[-1][1] == s * SECTOR:
                runs[-1] = (runs[-1][0], (s + 1) * SECTOR)
            else:
                runs.append((s * SECTOR, (s + 1) * SECTOR))
        return runs

    def uncertain(self, off, length):
        """Bytes in the range whose live value is not one known value."""
        first, end = off // SECTOR, (off + length) // SECTOR
        return sum(1 for s in range(first, end) if self.mask[s]) * SECTOR

    def explain(self, runs):
        writes = self.writes()
        lines = []
        for a, b in runs[:12]:
            tags = []
            for tag, o, l, res in writes:
                if o < b and a < o + l:
                    tags.append(tag if res == 'ok' else '%s (%s)' % (tag, res))
            who = ('writes over it: ' + ', '.join(dict.fromkeys(tags))) if tags else 'no write since the model began (original data)'
            lines.append('  differs at %s..%s (%d bytes): %s' % (human(a), human(b), b - a, who))
        if len(runs) > 12:
            lines.append('  ... and %d more runs' % (len(runs) - 12))
        return lines


def connect(sock, export):
    h = nbd.NBD()
    h.set_export_name(export)
    h.connect_unix(sock)
    return h


def close(h):
    try:
        h.shutdown()
    except nbd.Error:
        pass


def err_text(e):
    return '%s (%s)' % (e.errno or e.errnum, e.string)


def cmd_init(model, src):
    shutil.copyfile(src, model + '.img')
    size = os.path.getsize(src)
    with open(model + '.mask', 'wb') as f:
        f.write(bytes(size // SECTOR))
    with open(model + '.cand', 'wb') as f:
        pickle.dump({'live': {}, 'disk': {}}, f)
    open(model + '.log', 'w').close()
    print('model %s: %d bytes from %s' % (os.path.basename(model), size, src))
    return 0


def copy_live(src, dst):
    """dst's views = src's live view (disk = live)."""
    shutil.copyfile(src + '.img', dst + '.img')
    shutil.copyfile(src + '.mask', dst + '.mask')
    m = Model(src)
    with open(dst + '.cand', 'wb') as f:
        pickle.dump({'live': m.live, 'disk': {}}, f)


def cmd_snap(model, name):
    dst = '%s@%s' % (model, name)
    copy_live(model, dst)
    shutil.copyfile(model + '.log', dst + '.log')
    print('model %s@%s = %s now' % (os.path.basename(model), name, os.path.basename(model)))
    return 0


def cmd_assign(model, src):
    copy_live(src, model)
    print('model %s = %s' % (os.path.basename(model), os.path.basename(src)))
    return 0


def cmd_write(sock, export, model, tag, off, length, expect, fua):
    m = Model(model)
    buf = os.urandom(length)
    h = connect(sock, export)
    what = 'write %s %s+%s%s' % (tag, human(off), human(length), ' FUA' if fua else '')
    try:
        h.pwrite(buf, off, nbd.CMD_FLAG_FUA if fua else 0)
        got = 'ok'
    except nbd.Error as e:
        got = 'error'
        detail = err_text(e)
    close(h)
    m.wrote(off, buf, got == 'ok', fua)
    if got == 'ok':
        m.log('%s %d %d ok' % (tag, off, length))
        print('%s: ok (acknowledged)' % what)
    else:
        m.log('%s %d %d error %s' % (tag, off, length, detail.split()[0]))
        print('%s: NBD error %s' % (what, detail))
    m.save()
    if expect != 'any' and got != expect:
        print('  expected %s' % expect)
        return 1
    return 0


def cmd_flush(sock, export, model, expect):
    m = Model(model)
    h = connect(sock, export)
    try:
        h.flush()
        got = 'ok'
        print('flush %s: ok' % export)
    except nbd.Error as e:
        got = 'error'
        print('flush %s: NBD error %s' % (export, err_text(e)))
    close(h)
    if got == 'ok':
        m.flushed()
        m.save()
    if expect == 'any':
        return 0 if got == 'ok' else 3
    if got != expect:
        print('  expected %s' % expect)
        return 1
    return 0


def cmd_verify(sock, export, model, off, length, errors_ok, pin):
    m = Model(model)
    if length is None:
        off, length = 0, len(m.data)
    h = connect(sock, export)
    size = h.get_size()
    if size != len(m.data):
        print('%s: size %d, model %d' % (export, size, len(m.data)))
        return 1
    runs = []
    failed = []
    pos = off
    while pos < off + length:
        n = min(PIECE, off + length - pos)
        try:
            got = h.pread(n, pos)
            runs += m.check(got, pos, 'live', pin)
        except nbd.Error as e:
            failed.append('%s+%s: %s' % (human(pos), human(n), err_text(e)))
        pos += n
    close(h)
    what = '%s %s+%s vs %s' % (export, human(off), human(length), os.path.basename(model))
    rc = 0
    if failed:
        print('%s: %d reads failed%s: %s' % (what, len(failed), ' (allowed: the device cannot be read)' if errors_ok else '', '; '.join(failed[:4])))
        if not errors_ok:
            rc = 1
    if runs:
        print('%s: WRONG DATA in %d runs' % (what, len(runs)))
        print('\n'.join(m.explain(runs)))
        rc = 1
    if rc == 0:
        unsure = m.uncertain(off, length)
        print('%s: %s%s' % (what, 'matches' if not failed else 'every read that succeeded matches',
                            ' (%s not known exactly: writes that failed or were not flushed)' % human(unsure) if unsure else ''))
    if pin and not runs:
        m.save()
    return rc


def cmd_verify_fails(sock, export, off, length):
    h = connect(sock, export)
    size = h.get_size()
    if length is None:
        off, length = 0, size
    piece = 1 << 20
    served = []
    other = []
    n_eio = 0
    pos = off
    while pos < off + length:
        n = min(piece, off + length - pos)
        try:
            h.pread(n, pos)
            served.append('%s+%s' % (human(pos), human(n)))
        except nbd.Error as e:
            if e.errnum == errno.EIO:
                n_eio += 1
            else:
                other.append('%s+%s: %s' % (human(pos), human(n), err_text(e)))
        pos += n
    close(h)
    what = '%s %s+%s' % (export, human(off), human(length))
    if served:
        print('%s: %d reads returned data (they must fail: the image lost a write-back): %s' % (what, len(served), ', '.join(served[:8])))
    if other:
        print('%s: %d reads failed, but not with EIO: %s' % (what, len(other), '; '.join(other[:4])))
    if served or other:
        return 1
    print('%s: all %d reads failed with EIO' % (what, n_eio))
    return 0


def cmd_verify_file(path, model, pin):
    m = Model(model)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    size = os.fstat(fd).st_size
    if size != len(m.data):
        print('%s: size %d, model %d' % (path, size, len(m.data)))
        return 1
    buf = mmap.mmap(-1, 1 << 20)
    runs = []
    for pos in range(0, size, 1 << 20):
        n = os.preadv(fd, [buf], pos)
        if n != min(1 << 20, size - pos):
            print('%s: short read at %d' % (path, pos))
            return 1
        runs += m.check(buf[:n], pos, 'disk', pin)
    os.close(fd)
    if runs:
        print('%s (O_DIRECT: what the disk holds) vs %s: WRONG DATA in %d runs' % (path, os.path.basename(model), len(runs)))
        print('\n'.join(m.explain(runs)))
        return 1
    unsure = sum(1 for s in m.disk) * SECTOR
    print('%s (O_DIRECT) matches %s%s' % (path, os.path.basename(model),
                                          ' (%s written since the last successful FLUSH: old or new)' % human(unsure) if unsure else ''))
    if pin:
        m.save()
    return 0


def cmd_kept(model, off, length):
    m = Model(model)
    for s in range(off // SECTOR, (off + length) // SECTOR):
        m.disk.pop(s, None)
    m.save()
    print('model %s: %s+%s kept in the journal (replayed by the next start)' % (os.path.basename(model), human(off), human(length)))
    return 0


def cmd_stop(model, how):
    m = Model(model)
    unsure = len(m.disk) * SECTOR
    if how == 'ok':
        m.flushed()
    else:
        m.restarted()
    m.save()
    print('model %s: stopped, final flush %s%s' % (os.path.basename(model), how,
                                                   ' (%s written since the last successful FLUSH: old or new from now on)' % human(unsure)
                                                   if how != 'ok' and unsure else ''))
    return 0


def cmd_rewrite_failed(sock, export, model, tag, expect):
    m = Model(model)
    n = len(m.mask)
    todo = bytearray(n)
    for s in range(n):
        if m.mask[s]:
            todo[s] = 1
    for _, o, l, res in m.writes():
        if res != 'ok':
            for s in range(o // SECTOR, (o + l + SECTOR - 1) // SECTOR):
                todo[s] = 1
    runs = []
    s = 0
    while s < n:
        if todo[s]:
            e = s
            while e < n and todo[e]:
                e += 1
            runs.append((s * SECTOR, (e - s) * SECTOR))
            s = e
        else:
            s += 1
    if not runs:
        print('%s: nothing failed, nothing unknown' % os.path.basename(model))
        return 0
    h = connect(sock, export)
    rc = 0
    for off, length in runs:
        buf = os.urandom(length)
        try:
            h.pwrite(buf, off)
            m.wrote(off, buf, True, False)
            m.log('%s %d %d ok' % (tag, off, length))
            got = 'ok'
            print('rewrite %s+%s: ok' % (human(off), human(length)))
        except nbd.Error as e:
            m.wrote(off, buf, False, False)
            m.log('%s %d %d error %s' % (tag, off, length, err_text(e).split()[0]))
            got = 'error'
            print('rewrite %s+%s: NBD error %s' % (human(off), human(length), err_text(e)))
        if got != expect:
            print('  expected %s' % expect)
            rc = 1
    close(h)
    m.save()
    return rc


def main(a):
    if not a:
        return usage()
    c = a[0]
    try:
        if c == 'init' and len(a) == 3:
            return cmd_init(a[1], a[2])
        if c == 'snap' and len(a) == 3:
            return cmd_snap(a[1], a[2])
        if c == 'assign' and len(a) == 3:
            return cmd_assign(a[1], a[2])
        if c == 'write' and len(a) in (8, 9):
            if a[7] not in ('ok', 'error', 'any') or (len(a) == 9 and a[8] != 'fua'):
                return usage()
            return cmd_write(a[1], a[2], a[3], a[4], num(a[5]), num(a[6]), a[7], len(a) == 9)
        if c == 'flush' and len(a) == 5 and a[4] in ('ok', 'error', 'any'):
            return cmd_flush(a[1], a[2], a[3], a[4])
        if c == 'verify' and len(a) >= 4:
            flags = {'--errors-ok', '--pin'}
            rest = [x for x in a[4:] if x not in flags]
            ok_err = '--errors-ok' in a[4:]
            pin = '--pin' in a[4:]
            if len(rest) == 2:
                return cmd_verify(a[1], a[2], a[3], num(rest[0]), num(rest[1]), ok_err, pin)
            if not rest:
                return cmd_verify(a[1], a[2], a[3], 0, None, ok_err, pin)
            return usage()
        if c == 'verify-fails' and len(a) in (3, 5):
            if len(a) == 5:
                return cmd_verify_fails(a[1], a[2], num(a[3]), num(a[4]))
            return cmd_verify_fails(a[1], a[2], 0, None)
        if c == 'verify-file' and len(a) in (3, 4):
            if len(a) == 4 and a[3] != '--pin':
                return usage()
            return cmd_verify_file(a[1], a[2], len(a) == 4)
        if c == 'kept' and len(a) == 4:
            return cmd_kept(a[1], num(a[2]), num(a[3]))
        if c == 'stop' and len(a) == 3 and a[2] in ('ok', 'failed'):
            return cmd_stop(a[1], a[2])
        if c == 'rewrite-failed' and len(a) == 6 and a[5] in ('ok', 'error'):
            return cmd_rewrite_failed(a[1], a[2], a[3], a[4], a[5])
    except nbd.Error as e:
        print('%s: NBD error outside a request (connect?): %s' % (c, err_text(e)))
        return 1
    except OSError as e:
        print('%s: %s' % (c, e))
        return 1
    return usage()


def usage():
    sys.stderr.write(__doc__ if __doc__ else 'see the comment at the top of live-eio.py\n')
    return 2


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
