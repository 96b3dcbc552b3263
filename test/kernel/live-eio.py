#!/usr/bin/python3
# NBD client side of test/kernel/live-eio.sh (runs inside user-mode Linux
# with /usr/bin/python3 and python3-libnbd): writes, flushes and reads
# through a unix socket with libnbd, against a model of what the export
# must hold.
#
# A model is three files: MODEL.img (the expected bytes), MODEL.mask (one
# byte per 512-byte sector: 1 = unknown, because a write there got an error
# and the NBD protocol leaves the range unspecified) and MODEL.log (one line
# per write: tag, offset, length, result; to name the writes a mismatch
# lost). The model follows the acknowledged writes only.
#
# Every command prints what it did and exits 0 when the outcome is the
# expected one, 1 when not, 2 on a usage error. The calling shell wraps each
# call in timeout(1): a command that does not return is a hang.
#
#   init MODEL FILE                         model = FILE's bytes, all known
#   snap MODEL NAME                         MODEL@NAME = a copy (a snapshot's point in time)
#   write SOCK EXPORT MODEL TAG OFF LEN ok|error|any [fua]
#   flush SOCK EXPORT ok|error|any       (any: exit 0 if it succeeded, 3 if it failed)
#   verify SOCK EXPORT MODEL [OFF LEN] [--errors-ok]
#       read the export: equal to the model where known; with --errors-ok
#       a read that fails is fine (the device cannot be read), wrong data
#       never is
#   verify-file FILE MODEL                  the file read with O_DIRECT (what the disk holds)
#   rewrite-unknown SOCK EXPORT MODEL TAG   new data over every unknown range (must succeed)
import errno
import mmap
import os
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


class Model:
    # The files are mapped and changed in place: a write touches its range only.
    def __init__(self, base):
        self.base = base
        self._f = [open(base + ext, 'r+b') for ext in ('.img', '.mask')]
        self.data = mmap.mmap(self._f[0].fileno(), 0)
        self.mask = mmap.mmap(self._f[1].fileno(), 0)

    def save(self):
        self.data.flush()
        self.mask.flush()

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

    def set(self, off, buf):
        self.data[off:off + len(buf)] = buf
        first, last = off // SECTOR, (off + len(buf) - 1) // SECTOR
        # A sector partly written stays unknown if it was (the rest of it still is).
        for s in range(first, last + 1):
            if s * SECTOR >= off and (s + 1) * SECTOR <= off + len(buf):
                self.mask[s] = 0

    def unknown(self, off, length):
        for s in range(off // SECTOR, (off + length - 1) // SECTOR + 1):
            self.mask[s] = 1

    def diff(self, got, off):
        """Runs of known bytes in [off, off+len(got)) that differ: [(start, end)]."""
        runs = []
        want = self.data[off:off + len(got)]
        if want == bytes(got):
            return runs
        n = len(got)
        step = 4096
        i = 0
        while i < n:
            j = min(n, i + step)
            if want[i:j] != got[i:j]:
                # Sector-exact within the page, skipping unknown sectors.
                for s in range(i, j, SECTOR):
                    e = min(j, s + SECTOR)
                    if self.mask[(off + s) // SECTOR]:
                        continue
                    if want[s:e] != got[s:e]:
                        if runs and runs[-1][1] == off + s:
                            runs[-1] = (runs[-1][0], off + e)
                        else:
                            runs.append((off + s, off + e))
            i = j
        return runs

    def explain(self, runs):
        writes = self.writes()
        lines = []
        for a, b in runs[:12]:
            tags = []
            for tag, o, l, res in writes:
                if o < b and a < o + l and res == 'ok':
                    tags.append(tag)
            # The newest acknowledged write over the run is the one the data should show.
            who = ('acknowledged writes over it: ' + ', '.join(dict.fromkeys(tags))) if tags else 'no write since the model began (original data)'
            lines.append('  differs at %s..%s (%d bytes): %s' % (human(a), human(b), b - a, who))
        if len(runs) > 12:
            lines.append('  ... and %d more runs' % (len(runs) - 12))
        return lines


def connect(sock, export):
    h = nbd.NBD()
    h.set_export_name(export)
    h.connect_unix(sock)
    return h


def err_text(e):
    return '%s (%s)' % (e.errno or e.errnum, e.string)


def cmd_init(model, src):
    shutil.copyfile(src, model + '.img')
    size = os.path.getsize(src)
    with open(model + '.mask', 'wb') as f:
        f.write(bytes(size // SECTOR))
    open(model + '.log', 'w').close()
    print('model %s: %d bytes from %s' % (os.path.basename(model), size, src))
    return 0


def cmd_snap(model, name):
    for ext in ('.img', '.mask', '.log'):
        shutil.copyfile(model + ext, '%s@%s%s' % (model, name, ext))
    print('model %s@%s = %s now' % (os.path.basename(model), name, os.path.basename(model)))
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
    try:
        h.shutdown()
    except nbd.Error:
        pass
    if got == 'ok':
        m.set(off, buf)
        m.log('%s %d %d ok' % (tag, off, length))
        print('%s: ok (acknowledged)' % what)
    else:
        m.unknown(off, length)
        m.log('%s %d %d error %s' % (tag, off, length, detail.split()[0]))
        print('%s: NBD error %s' % (what, detail))
    m.save()
    if expect != 'any' and got != expect:
        print('  expected %s' % expect)
        return 1
    return 0


def cmd_flush(sock, export, expect):
    h = connect(sock, export)
    try:
        h.flush()
        got = 'ok'
        print('flush %s: ok' % export)
    except nbd.Error as e:
        got = 'error'
        print('flush %s: NBD error %s' % (export, err_text(e)))
    try:
        h.shutdown()
    except nbd.Error:
        pass
    if expect == 'any':
        return 0 if got == 'ok' else 3
    if got != expect:
        print('  expected %s' % expect)
        return 1
    return 0


def cmd_verify(sock, export, model, off, length, errors_ok):
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
            runs += m.diff(got, pos)
        except nbd.Error as e:
            failed.append('%s+%s: %s' % (human(pos), human(n), err_text(e)))
        pos += n
    try:
        h.shutdown()
    except nbd.Error:
        pass
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
        unknown = sum(m.mask[off // SECTOR:(off + length) // SECTOR]) * SECTOR
        print('%s: %s%s' % (what, 'matches' if not failed else 'every read that succeeded matches',
                            ' (%s unknown: writes that failed)' % human(unknown) if unknown else ''))
    return rc


def cmd_verify_file(path, model):
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
        runs += m.diff(buf[:n], pos)
    os.close(fd)
    if runs:
        print('%s (O_DIRECT: what the disk holds) vs %s: WRONG DATA in %d runs' % (path, os.path.basename(model), len(runs)))
        print('\n'.join(m.explain(runs)))
        return 1
    print('%s (O_DIRECT) matches %s' % (path, os.path.basename(model)))
    return 0


def cmd_rewrite_unknown(sock, export, model, tag):
    m = Model(model)
    runs = []
    s = 0
    n = len(m.mask)
    while s < n:
        if m.mask[s]:
            e = s
            while e < n and m.mask[e]:
                e += 1
            runs.append((s * SECTOR, (e - s) * SECTOR))
            s = e
        else:
            s += 1
    if not runs:
        print('%s: nothing unknown' % os.path.basename(model))
        return 0
    h = connect(sock, export)
    rc = 0
    for off, length in runs:
        buf = os.urandom(length)
        try:
            h.pwrite(buf, off)
            m.set(off, buf)
            m.log('%s %d %d ok' % (tag, off, length))
            print('rewrite %s+%s: ok' % (human(off), human(length)))
        except nbd.Error as e:
            print('rewrite %s+%s: NBD error %s' % (human(off), human(length), err_text(e)))
            rc = 1
    try:
        h.shutdown()
    except nbd.Error:
        pass
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
        if c == 'write' and len(a) in (8, 9):
            if a[7] not in ('ok', 'error', 'any') or (len(a) == 9 and a[8] != 'fua'):
                return usage()
            return cmd_write(a[1], a[2], a[3], a[4], num(a[5]), num(a[6]), a[7], len(a) == 9)
        if c == 'flush' and len(a) == 4 and a[3] in ('ok', 'error', 'any'):
            return cmd_flush(a[1], a[2], a[3])
        if c == 'verify' and len(a) >= 4:
            rest = [x for x in a[4:] if x != '--errors-ok']
            ok_err = '--errors-ok' in a[4:]
            if len(rest) == 2:
                return cmd_verify(a[1], a[2], a[3], num(rest[0]), num(rest[1]), ok_err)
            if not rest:
                return cmd_verify(a[1], a[2], a[3], 0, None, ok_err)
            return usage()
        if c == 'verify-file' and len(a) == 3:
            return cmd_verify_file(a[1], a[2])
        if c == 'rewrite-unknown' and len(a) == 5:
            return cmd_rewrite_unknown(a[1], a[2], a[3], a[4])
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
