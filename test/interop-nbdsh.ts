// Interop: libnbd (the python3-libnbd binding that nbdsh is built on, and
// nbdsh itself) against the real CLI server.
//
// Each subtest runs a python script that records what libnbd observed into a
// JSON object; the assertions are made here, so a failure names the exact
// request and the value seen. libnbd itself also validates every reply it
// parses (chunk overlap, coverage, cookies, magic), so a malformed reply
// fails the script.
//
// libnbd 1.14 (Debian 12) has no nbd_opt_structured_reply/nbd_opt_set_meta_context:
// there STRUCTURED_REPLY is sent during connect, and SET_META_CONTEXT right
// before GO (from add_meta_context). Newer libnbd's explicit calls are used
// when present.
import t from 'tap';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { CLI, makeTempDir, type RunningServer, serverFor } from './fixtures/server';
import { exec, pyNbd } from './fixtures/exec';
import { requireTools } from './fixtures/tools';


const MiB = 1024 * 1024;

const EPERM = 1;
const ENOENT = 2; // libnbd's errno for NBD_REP_ERR_UNKNOWN
const EINVAL = 22;
const ENOSPC = 28;
const EOVERFLOW = 75;
const ENOTSUP = 95;

const PRELUDE = String.raw`
import nbd, sys, os, json, errno, random
URI = sys.argv[1]
SOCK = URI.split('socket=', 1)[1]
DIR = os.path.dirname(SOCK)
R = {}
def uri(name=''):
    return 'nbd+unix:///%s?socket=%s' % (name, SOCK)
def err(f, *a, **k):
    """0 on success, else the errno libnbd reports (-1 if none)."""
    try:
        f(*a, **k)
        return 0
    except nbd.Error as e:
        return e.errnum if e.errnum else -1
def serr(f, *a, **k):
    """Like err(), but only for errors the SERVER returned: a client-side
    refusal by libnbd comes back as a string so it cannot pass for one."""
    try:
        f(*a, **k)
        return 0
    except nbd.Error as e:
        if 'command failed' not in (e.string or ''):
            return 'client-side: %s' % e.string
        return e.errnum if e.errnum else -1
def connect(name='', strict=None, meta=True, structured=True):
    h = nbd.NBD()
    if not structured:
        h.set_request_structured_replies(False)
    if meta:
        h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    if strict is not None:
        h.set_strict_mode(strict)
    h.connect_uri(uri(name))
    return h
def extents(h, count, offset, flags=0):
    out = []
    def cb(ctx, off, ents, e):
        out.append([ctx, off, list(ents)])
        return 0
    h.block_status(count, offset, cb, flags)
    return out
def chunks(h, count, offset, flags=0):
    """pread_structured: returns (data, [[offset, length, status], ...])."""
    out = []
    def cb(buf, off, st, e):
        out.append([off, len(buf), st])
        return 0
    data = h.pread_structured(count, offset, cb, flags)
    return bytes(data), out
def flags(h):
    return dict(ro=h.is_read_only(), flush=h.can_flush(), fua=h.can_fua(), trim=h.can_trim(),
                zero=h.can_zero(), fast_zero=h.can_fast_zero(), df=h.can_df(),
                multi_conn=h.can_multi_conn(), cache=h.can_cache(), rotational=h.is_rotational())
def blocks(name='disk.img'):
    return os.stat(os.path.join(DIR, name)).st_blocks * 512
def done():
    print('RESULT ' + json.dumps(R))
`;

/** Runs `body` (python, column 0) with the prelude; returns the R dict it filled. */
async function run(srv: RunningServer, body: string, exportName = ''): Promise<Record<string, any>> {
  const r = await pyNbd(srv.dir, `${PRELUDE}\n${body}\ndone()\n`, srv.uri(exportName), 120_000);
  const line = r.stdout.split('\n').find((l) => l.startsWith('RESULT '));
  if (r.code !== 0 || !line) {
    throw new Error(`python-libnbd script failed (exit ${r.code}, signal ${r.signal}):\n${r.stderr.slice(-3000)}\n${r.stdout.slice(-1000)}`);
  }
  return JSON.parse(line.slice('RESULT '.length));
}

function sparse(dir: string, name: string, size: number): void {
  const p = path.join(dir, name);
  fs.writeFileSync(p, '');
  fs.truncateSync(p, size);
}

// ---------------------------------------------------------------------------
// Option haggling
// ---------------------------------------------------------------------------

t.test('options: LIST, INFO, GO, unknown exports, ABORT', async (t) => {
  if (!requireTools(t, ['python3-libnbd'])) return;
  const dir = makeTempDir();
  sparse(dir, 'a.img', 64 * MiB);
  sparse(dir, 'b.img', 32 * MiB);
  const srv = await serverFor(t, { dir, images: ['a.img', 'b.img'] });
  const R = await run(
    srv,
    String.raw`
h = nbd.NBD()
h.set_opt_mode(True)
h.set_full_info(True)
h.connect_uri(uri(''))
R['negotiating'] = h.aio_is_negotiating()
R['structured'] = h.get_structured_replies_negotiated()
names = []
R['list_count'] = h.opt_list(lambda n, d: names.append([n, d]))
R['list'] = names
def info():
    return dict(size=h.get_size(), name=h.get_canonical_export_name(),
                min=h.get_block_size(nbd.SIZE_MINIMUM), pref=h.get_block_size(nbd.SIZE_PREFERRED),
                max=h.get_block_size(nbd.SIZE_MAXIMUM), flags=flags(h))
h.set_export_name('')
h.opt_info()
R['info_default'] = info()
h.set_export_name('b')
h.opt_info()
R['info_b'] = info()
h.set_export_name('nosuch')
R['info_unknown'] = err(h.opt_info)
R['after_info_unknown'] = h.aio_is_negotiating()
R['go_unknown'] = err(h.opt_go)
R['after_go_unknown'] = h.aio_is_negotiating()
again = []
h.opt_list(lambda n, d: again.append(n))
R['list_again'] = again
h.set_export_name('b')
h.opt_info()
before = info()
h.opt_go()
R['ready'] = h.aio_is_ready()
R['go_b'] = info()
R['go_same_as_info'] = (before == R['go_b'])
R['read_b'] = h.pread(4096, 32 * 1024 * 1024 - 4096) == bytes(4096)
h.shutdown()

h2 = nbd.NBD()
h2.set_opt_mode(True)
h2.connect_uri(uri())
h2.opt_abort()
R['abort_closed'] = h2.aio_is_closed()

h3 = connect('a')
R['after_abort_size'] = h3.get_size()
h3.shutdown()
`,
  );
  t.equal(R.negotiating, true, 'opt mode: still negotiating after connect');
  t.equal(R.structured, true, 'NBD_OPT_STRUCTURED_REPLY acked');
  t.equal(R.list_count, 2, 'opt_list returns 2');
  t.same(R.list, [['a', ''], ['b', '']], 'NBD_REP_SERVER for each export, in order, no description');
  const fl = { ro: false, flush: true, fua: true, trim: true, zero: true, fast_zero: true, df: true, multi_conn: true, cache: true, rotational: false };
  t.same(R.info_default, { size: 64 * MiB, name: 'a', min: 1, pref: 4096, max: 32 * MiB, flags: fl }, 'INFO on "" = first image, canonical name a');
  t.same(R.info_b, { size: 32 * MiB, name: 'b', min: 1, pref: 4096, max: 32 * MiB, flags: fl }, 'INFO on b');
  t.equal(R.info_unknown, ENOENT, 'INFO on an unknown export: NBD_REP_ERR_UNKNOWN');
  t.equal(R.after_info_unknown, true, 'negotiation continues after a failed INFO');
  t.equal(R.go_unknown, ENOENT, 'GO on an unknown export: NBD_REP_ERR_UNKNOWN');
  t.equal(R.after_go_unknown, true, 'negotiation continues after a failed GO');
  t.same(R.list_again, ['a', 'b'], 'LIST still works after errors');
  t.equal(R.ready, true, 'GO enters transmission');
  t.equal(R.go_b.size, 32 * MiB);
  t.equal(R.go_same_as_info, true, 'GO replies with the same information as the preceding INFO');
  t.equal(R.read_b, true, 'read the last block of b');
  t.equal(R.abort_closed, true, 'NBD_OPT_ABORT closes the connection');
  t.equal(R.after_abort_size, 64 * MiB, 'server keeps serving after an abort');
  t.notMatch(srv.stderr(), /"level":50|error/i, 'no server errors logged');
});

t.test('options: EXPORT_NAME (non-fixed newstyle client), with and without NO_ZEROES', async (t) => {
  if (!requireTools(t, ['python3-libnbd'])) return;
  const dir = makeTempDir();
  sparse(dir, 'a.img', 64 * MiB);
  sparse(dir, 'b.img', 16 * MiB);
  const srv = await serverFor(t, { dir, images: ['a.img', 'b.img'] });
  const R = await run(
    srv,
    String.raw`
w = connect('b')
w.pwrite(b'\xb0' * 4096 + b'\xb1' * 4096, 0)
w.flush()
w.shutdown()
R['modes'] = []
for fl in (0, nbd.HANDSHAKE_FLAG_NO_ZEROES):
    for name in ('', 'b'):
        h = nbd.NBD()
        h.set_handshake_flags(fl)
        h.connect_uri(uri(name))
        m = dict(flags=fl, name=name, proto=h.get_protocol(), structured=h.get_structured_replies_negotiated(),
                 size=h.get_size(), ro=h.is_read_only(), fua=h.can_fua())
        # If the server sent the wrong amount of zero padding after
        # EXPORT_NAME, this reply would be misframed.
        m['read'] = h.pread(8192, 0).hex()[:4] + h.pread(4096, 4096).hex()[:4]
        h.pwrite(b'\xcc' * 512, 1024 * 1024)
        m['write_back'] = h.pread(512, 1024 * 1024) == b'\xcc' * 512
        h.shutdown()
        R['modes'].append(m)
h = nbd.NBD()
h.set_handshake_flags(0)
R['unknown'] = err(h.connect_uri, uri('nosuch'))
h = connect('b')
R['after'] = h.get_size()
`,
  );
  t.equal(R.modes.length, 4);
  for (const m of R.modes) {
    const label = `flags=${m.flags} export="${m.name}"`;
    t.equal(m.proto, 'newstyle', `${label}: plain newstyle`);
    t.equal(m.structured, false, `${label}: simple replies`);
    t.equal(m.size, m.name === 'b' ? 16 * MiB : 64 * MiB, `${label}: size`);
    t.equal(m.ro, false);
    t.equal(m.fua, true);
    if (m.name === 'b') t.equal(m.read, 'b0b0b1b1', `${label}: reads are framed correctly`);
    else t.equal(m.read, '00000000', `${label}: default export is a`);
    t.equal(m.write_back, true, `${label}: write then read`);
  }
  t.not(R.unknown, 0, 'EXPORT_NAME with an unknown export ends the session');
  t.equal(R.after, 16 * MiB, 'server keeps serving');
});

t.test('options: LIST_META_CONTEXT and SET_META_CONTEXT', async (t) => {
  if (!requireTools(t, ['python3-libnbd'])) return;
  const srv = await serverFor(t);
  const R = await run(
    srv,
    String.raw`
def lmc(queries, name='disk'):
    h = nbd.NBD()
    msgs = []
    h.set_debug(True)
    h.set_debug_callback(lambda ctx, msg: msgs.append(msg))
    h.set_opt_mode(True)
    h.connect_uri(uri())
    h.set_export_name(name)
    for q in queries:
        h.add_meta_context(q)
    got = []
    try:
        n = h.opt_list_meta_context(lambda c: got.append(c))
    except nbd.Error as e:
        # libnbd 1.14 reports every LIST_META_CONTEXT error as ENOTSUP;
        # the server's message shows which error it was.
        server_msgs = [m for m in msgs if 'server error message' in m]
        still = h.aio_is_negotiating()
        more = []
        h.opt_list(lambda n, d: more.append(n))
        return dict(err=e.errnum, server_msgs=server_msgs, still_negotiating=still, list_after=more)
    h.opt_abort()
    return dict(n=n, got=got)
R['all'] = lmc([])
R['base_wild'] = lmc(['base:'])
R['base_alloc'] = lmc(['base:allocation'])
R['base_unknown_leaf'] = lmc(['base:nosuchleaf'])
R['unknown_ns'] = lmc(['x-nosuch:foo'])
R['mixed'] = lmc(['x-nosuch:foo', 'base:allocation', 'qemu:dirty-bitmap:x'])
R['default_export'] = lmc(['base:allocation'], '')
R['unknown_export'] = lmc(['base:allocation'], 'nosuch')

def go(queries, name='disk'):
    h = nbd.NBD()
    h.set_strict_mode(0)
    for q in queries:
        h.add_meta_context(q)
    h.connect_uri(uri(name))
    r = dict(can=h.can_meta_context('base:allocation'))
    r['bs'] = serr(extents, h, 4096, 0)
    h.shutdown()
    return r
R['set_alloc'] = go(['base:allocation'])
R['set_alloc_default'] = go(['base:allocation'], '')
R['set_wild'] = go(['base:'])            # MUST be ignored by SET
R['set_unknown'] = go(['x-nosuch:foo'])
R['set_none'] = go([])

R['has_opt_set'] = hasattr(nbd.NBD, 'opt_set_meta_context')
if R['has_opt_set']:
    h = nbd.NBD()
    h.set_opt_mode(True)
    h.connect_uri(uri('disk'))
    h.add_meta_context('base:allocation')
    got = []
    R['opt_set'] = h.opt_set_meta_context(lambda c: got.append(c))
    R['opt_set_got'] = got
    h.opt_go()
    R['opt_set_bs'] = serr(extents, h, 4096, 0)
`,
  );
  t.same(R.all, { n: 1, got: ['base:allocation'] }, 'no queries: every context (base:allocation)');
  t.same(R.base_wild, { n: 1, got: ['base:allocation'] }, '"base:" wildcard lists base:allocation');
  t.same(R.base_alloc, { n: 1, got: ['base:allocation'] });
  t.same(R.base_unknown_leaf, { n: 0, got: [] }, 'unknown base: leaf is ignored, not an error');
  t.same(R.unknown_ns, { n: 0, got: [] }, 'unknown namespace is ignored');
  t.same(R.mixed, { n: 1, got: ['base:allocation'] }, 'mixed queries');
  t.same(R.default_export, { n: 1, got: ['base:allocation'] }, 'default export name ""');
  t.not(R.unknown_export.err ?? 0, 0, 'LIST_META_CONTEXT on an unknown export fails');
  t.match(R.unknown_export.server_msgs?.join('\n') ?? '', /unknown export 'nosuch'/, 'server explains: unknown export');
  t.equal(R.unknown_export.still_negotiating, true, 'negotiation continues');
  t.same(R.unknown_export.list_after, ['disk'], 'and the next option works');
  t.same(R.set_alloc, { can: true, bs: 0 }, 'SET base:allocation then GO: block status works');
  t.same(R.set_alloc_default, { can: true, bs: 0 }, 'same through the default export');
  t.same(R.set_wild, { can: false, bs: EINVAL }, 'SET "base:" selects nothing; BLOCK_STATUS then EINVAL');
  t.same(R.set_unknown, { can: false, bs: EINVAL }, 'SET of an unknown context selects nothing');
  t.same(R.set_none, { can: false, bs: EINVAL }, 'BLOCK_STATUS without SET_META_CONTEXT: EINVAL');
  if (R.has_opt_set) {
    t.equal(R.opt_set, 1);
    t.same(R.opt_set_got, ['base:allocation']);
    t.equal(R.opt_set_bs, 0);
  } else {
    t.comment('libnbd has no opt_set_meta_context (< 1.16): SET_META_CONTEXT covered through add_meta_context + GO');
  }
});

t.test('options: STARTTLS is refused and negotiation continues', async (t) => {
  if (!requireTools(t, ['python3-libnbd'])) return;
  const srv = await serverFor(t);
  const R = await run(
    srv,
    String.raw`
R['supports_tls'] = nbd.NBD().supports_tls()
if R['supports_tls']:
    h = nbd.NBD()
    h.set_tls(nbd.TLS_ALLOW)
    h.connect_uri(uri('disk'))
    R['allow'] = dict(tls=h.get_tls_negotiated(), structured=h.get_structured_replies_negotiated(),
                      size=h.get_size(), read=h.pread(512, 0) == bytes(512))
    h.shutdown()
    h = nbd.NBD()
    h.set_tls(nbd.TLS_REQUIRE)
    try:
        h.connect_uri(uri('disk'))
        R['require'] = 'connected'
    except nbd.Error as e:
        R['require'] = e.string
h = connect('disk')
R['after'] = h.get_size()
`,
  );
  if (!R.supports_tls) {
    t.comment('libnbd built without TLS: cannot send STARTTLS');
  } else {
    t.same(R.allow, { tls: false, structured: true, size: 64 * MiB, read: true }, 'TLS_ALLOW: STARTTLS refused, plain session continues');
    t.match(R.require, /refused TLS|TLS/i, 'TLS_REQUIRE: client gives up because the server refused STARTTLS');
  }
  t.equal(R.after, 64 * MiB);
});

// ---------------------------------------------------------------------------
// Data commands
// ---------------------------------------------------------------------------

t.test('pread/pwrite/zero/flush: random unaligned I/O matches a model and the file', async (t) => {
  if (!requireTools(t, ['python3-libnbd'])) return;
  const srv = await serverFor(t, { size: '16M' });
  const R = await run(
    srv,
    String.raw`
SEED = 20240611
rnd = random.Random(SEED)
SIZE = 16 * 1024 * 1024
h = connect('disk')
model = bytearray(SIZE)
ops = dict(write=0, write_fua=0, zero=0, zero_nohole=0, fast_zero=0, fast_zero_enotsup=0, flush=0)
for i in range(400):
    op = rnd.random()
    off = rnd.randrange(0, SIZE - 1)
    ln = min(rnd.choice([1, 7, 511, 512, 4096, 4097, 65536, 100000, 300000]), SIZE - off)
    if op < 0.55:
        data = rnd.randbytes(ln)
        fl = nbd.CMD_FLAG_FUA if rnd.random() < 0.2 else 0
        h.pwrite(data, off, fl)
        model[off:off + ln] = data
        ops['write_fua' if fl else 'write'] += 1
    elif op < 0.8:
        fl = rnd.choice([0, nbd.CMD_FLAG_NO_HOLE, nbd.CMD_FLAG_FUA])
        h.zero(ln, off, fl)
        model[off:off + ln] = bytes(ln)
        ops['zero_nohole' if fl == nbd.CMD_FLAG_NO_HOLE else 'zero'] += 1
    elif op < 0.9:
        fl = nbd.CMD_FLAG_FAST_ZERO | rnd.choice([0, nbd.CMD_FLAG_NO_HOLE])
        e = err(h.zero, ln, off, fl)
        if e == 0:
            model[off:off + ln] = bytes(ln)
            ops['fast_zero'] += 1
        elif e == errno.ENOTSUP:
            ops['fast_zero_enotsup'] += 1   # must leave the data alone; checked below
        else:
            raise Exception('fast zero failed with errno %d' % e)
    else:
        h.flush()
        ops['flush'] += 1
R['ops'] = ops

bad_reads = []
bad_chunks = []
holes_seen = 0
for i in range(300):
    off = rnd.randrange(0, SIZE - 1)
    ln = min(rnd.choice([1, 100, 4096, 4095, 65536, 65537, 262144, 1000000]), SIZE - off)
    if i % 2:
        got = h.pread(ln, off)
        if got != model[off:off + ln]:
            bad_reads.append([off, ln])
        continue
    data, cks = chunks(h, ln, off)
    if data != model[off:off + ln]:
        bad_reads.append([off, ln])
    # Chunks must tile [off, off+ln) exactly; hole chunks only over zeroes.
    cks.sort()
    pos = off
    for (co, cl, st) in cks:
        if co != pos or cl <= 0:
            bad_chunks.append(['gap/overlap', off, ln, co, cl]); break
        if st == nbd.READ_HOLE:
            holes_seen += 1
            if any(model[co:co + cl]):
                bad_chunks.append(['hole over data', off, ln, co, cl])
        pos = co + cl
    if pos != off + ln:
        bad_chunks.append(['short', off, ln, pos])
R['bad_reads'] = bad_reads[:10]
R['bad_chunks'] = bad_chunks[:10]
R['holes_seen'] = holes_seen
R['whole'] = h.pread(SIZE, 0) == model
h.flush()
h.shutdown()
with open(os.path.join(DIR, 'disk.img'), 'rb') as f:
    disk = f.read()
R['file_size'] = len(disk)
R['file_matches'] = disk == model
if disk != model:
    R['first_diff'] = next(i for i in range(SIZE) if disk[i] != model[i])
`,
  );
  t.comment(`ops: ${JSON.stringify(R.ops)}`);
  t.ok(R.ops.write > 100 && R.ops.zero > 20, 'enough operations ran');
  t.same(R.bad_reads, [], 'every read matches the model');
  t.same(R.bad_chunks, [], 'structured read chunks tile the request; holes only over zeroes');
  t.ok(R.holes_seen > 0, 'some reads came back with hole chunks');
  t.equal(R.whole, true, 'a 16 MiB read matches the model');
  t.equal(R.file_size, 16 * MiB, 'image size unchanged');
  t.equal(R.file_matches, true, `the image file matches the model${R.first_diff !== undefined ? ` (first diff at ${R.first_diff})` : ''}`);
});

t.test('trim, write zeroes (NO_HOLE, FAST_ZERO), cache: data, allocation, block status', async (t) => {
  if (!requireTools(t, ['python3-libnbd'])) return;
  const srv = await serverFor(t);
  const R = await run(
    srv,
    String.raw`
M = 1024 * 1024
h = connect('disk')
def st(off, ln=M):
    return extents(h, ln, off)[0][2]
def fill(off, b, ln=M):
    h.pwrite(bytes([b]) * ln, off)
    h.flush()

fill(M, 0xaa)
R['written_status'] = st(M)
b0 = blocks()
R['trim'] = h.trim(M, M) is None
h.flush()
R['trim_status'] = st(M)
R['trim_freed'] = b0 - blocks()
R['trim_reads_zero'] = h.pread(M, M) == bytes(M)

fill(M, 0xab)
b0 = blocks()
h.zero(M, M)
h.flush()
R['zero_reads_zero'] = h.pread(M, M) == bytes(M)
R['zero_status'] = st(M)
R['zero_freed'] = b0 - blocks()

fill(M, 0xac)
h.zero(M, M, nbd.CMD_FLAG_NO_HOLE)
h.flush()
R['nohole_reads_zero'] = h.pread(M, M) == bytes(M)

# NO_HOLE on a hole must provision the range.
b0 = blocks()
h.zero(M, 8 * M, nbd.CMD_FLAG_NO_HOLE)
h.flush()
R['nohole_provisioned'] = blocks() - b0
R['nohole_hole_reads_zero'] = h.pread(M, 8 * M) == bytes(M)

# FAST_ZERO: either done (reads zero) or ENOTSUP with the data untouched.
R['fast'] = []
for fl in (nbd.CMD_FLAG_FAST_ZERO, nbd.CMD_FLAG_FAST_ZERO | nbd.CMD_FLAG_NO_HOLE):
    fill(12 * M, 0xad)
    e = err(h.zero, M, 12 * M, fl)
    data = h.pread(M, 12 * M)
    R['fast'].append(dict(flags=fl, err=e, zero=data == bytes(M), intact=data == b'\xad' * M))

# FUA on trim and write zeroes is accepted.
R['trim_fua'] = err(h.trim, M, 20 * M, nbd.CMD_FLAG_FUA)
R['zero_fua'] = err(h.zero, M, 20 * M, nbd.CMD_FLAG_FUA)
R['zero_fua_nohole'] = err(h.zero, M, 20 * M, nbd.CMD_FLAG_FUA | nbd.CMD_FLAG_NO_HOLE)

# Unaligned trim/zero must not touch bytes outside the range.
fill(30 * M, 0xee)
h.zero(1000, 30 * M + 100)
d = h.pread(8192, 30 * M)
R['zero_unaligned'] = d[:100] == b'\xee' * 100 and d[100:1100] == bytes(1000) and d[1100:] == b'\xee' * (8192 - 1100)
fill(31 * M, 0xef)
h.trim(5000, 31 * M + 3000)
d = h.pread(16384, 31 * M)
R['trim_unaligned_neighbours'] = d[:3000] == b'\xef' * 3000 and d[8000:] == b'\xef' * (16384 - 8000)

# CACHE.
R['cache'] = err(h.cache, M, 0)
R['cache_all'] = err(h.cache, 64 * M, 0)
R['cache_unaligned'] = err(h.cache, 12345, 678)
`,
  );
  t.same(R.written_status, [MiB, 0], 'written range: data (flags 0)');
  t.equal(R.trim, true);
  t.same(R.trim_status, [MiB, 3], 'TRIM punches a hole: hole|zero');
  t.ok(R.trim_freed >= MiB, `TRIM freed ${R.trim_freed} bytes of allocation`);
  t.equal(R.trim_reads_zero, true, 'trimmed range reads as zeroes');
  t.equal(R.zero_reads_zero, true, 'WRITE_ZEROES reads back zero');
  t.same(R.zero_status, [MiB, 3], 'WRITE_ZEROES without NO_HOLE may punch: hole|zero');
  t.ok(R.zero_freed >= MiB, 'WRITE_ZEROES without NO_HOLE deallocated');
  t.equal(R.nohole_reads_zero, true, 'WRITE_ZEROES with NO_HOLE reads back zero');
  t.ok(R.nohole_provisioned >= MiB, `NO_HOLE on a hole provisions it (+${R.nohole_provisioned} bytes)`);
  t.equal(R.nohole_hole_reads_zero, true);
  for (const f of R.fast) {
    if (f.err === 0) t.ok(f.zero, `FAST_ZERO flags=${f.flags} succeeded and reads zero`);
    else {
      t.equal(f.err, ENOTSUP, `FAST_ZERO flags=${f.flags} may only fail with ENOTSUP`);
      t.ok(f.intact, 'a refused fast zero leaves the data alone');
    }
  }
  t.equal(R.trim_fua, 0, 'TRIM+FUA');
  t.equal(R.zero_fua, 0, 'WRITE_ZEROES+FUA');
  t.equal(R.zero_fua_nohole, 0, 'WRITE_ZEROES+FUA+NO_HOLE');
  t.equal(R.zero_unaligned, true, 'unaligned WRITE_ZEROES zeroes exactly its range');
  t.equal(R.trim_unaligned_neighbours, true, 'unaligned TRIM leaves neighbouring bytes alone');
  t.equal(R.cache, 0, 'CACHE');
  t.equal(R.cache_all, 0, 'CACHE of the whole export (larger than the max payload)');
  t.equal(R.cache_unaligned, 0, 'unaligned CACHE');
});

t.test('block status: extents, REQ_ONE, unaligned ranges', async (t) => {
  if (!requireTools(t, ['python3-libnbd'])) return;
  const srv = await serverFor(t);
  const R = await run(
    srv,
    String.raw`
M = 1024 * 1024
K = 1024
h = connect('disk')
h.pwrite(b'\x01' * (64 * K), M)
h.pwrite(b'\x02' * M, 3 * M)
h.flush()
R['full'] = extents(h, 64 * M, 0)
R['one_0'] = extents(h, 64 * M, 0, nbd.CMD_FLAG_REQ_ONE)
R['one_data'] = extents(h, 63 * M, M, nbd.CMD_FLAG_REQ_ONE)
R['one_clip'] = extents(h, 8 * K, M + 4 * K, nbd.CMD_FLAG_REQ_ONE)
R['one_hole_clip'] = extents(h, 4 * K, 0, nbd.CMD_FLAG_REQ_ONE)
R['edge'] = extents(h, 8 * K, M + 60 * K)
R['unaligned'] = extents(h, 1000, M + 100)
R['tail'] = extents(h, 4 * K, 64 * M - 4 * K)
R['mid'] = extents(h, 2 * M, 2 * M + 512)
`,
  );
  const ctx = 'base:allocation';
  t.same(R.full, [[ctx, 0, [MiB, 3, 64 * 1024, 0, 2 * MiB - 64 * 1024, 3, MiB, 0, 60 * MiB, 3]]], 'whole-export map');
  t.same(R.one_0, [[ctx, 0, [MiB, 3]]], 'REQ_ONE: exactly one extent (leading hole)');
  t.same(R.one_data, [[ctx, MiB, [64 * 1024, 0]]], 'REQ_ONE from the data');
  t.same(R.one_clip, [[ctx, MiB + 4096, [8192, 0]]], 'REQ_ONE extent never longer than the request');
  t.same(R.one_hole_clip, [[ctx, 0, [4096, 3]]], 'REQ_ONE hole clipped to the request');
  t.same(R.edge, [[ctx, MiB + 60 * 1024, [4096, 0, 4096, 3]]], 'data/hole boundary inside the request');
  t.same(R.unaligned, [[ctx, MiB + 100, [1000, 0]]], 'unaligned request inside data');
  t.same(R.tail, [[ctx, 64 * MiB - 4096, [4096, 3]]], 'last block of the export');
  t.same(R.mid, [[ctx, 2 * MiB + 512, [MiB - 512, 3, MiB, 0, 512, 3]]], 'hole, data, hole; unaligned start and end');
});

t.test('block status on a > 4 GiB sparse export', async (t) => {
  if (!requireTools(t, ['python3-libnbd'])) return;
  const dir = makeTempDir();
  sparse(dir, 'big.img', 8 * 1024 * MiB);
  const srv = await serverFor(t, { dir, images: ['big.img'] });
  const R = await run(
    srv,
    String.raw`
G = 1 << 30
h = connect('big', strict=0)
R['size'] = h.get_size()
R['max_hole'] = extents(h, 2**32 - 512, 0)
R['max_hole_one'] = extents(h, 2**32 - 1, 0, nbd.CMD_FLAG_REQ_ONE)
h.pwrite(b'\x07' * 65536, 5 * G)
R['around_data'] = extents(h, 2**32 - 512, 4 * G)
R['at_end'] = extents(h, 4096, 8 * G - 4096)
R['past_end'] = serr(extents, h, 4096, 8 * G - 2048)
R['read_high'] = h.pread(65536, 5 * G) == b'\x07' * 65536
`,
  );
  const G = 1024 * MiB;
  const ctx = 'base:allocation';
  t.equal(R.size, 8 * G);
  t.same(R.max_hole, [[ctx, 0, [2 ** 32 - 512, 3]]], 'largest request over a hole');
  t.same(R.max_hole_one, [[ctx, 0, [2 ** 32 - 1, 3]]], 'REQ_ONE with length 2^32-1');
  t.same(R.around_data, [[ctx, 4 * G, [G, 3, 65536, 0, 2 ** 32 - 512 - G - 65536, 3]]], 'data at 5 GiB');
  t.same(R.at_end, [[ctx, 8 * G - 4096, [4096, 3]]]);
  t.equal(R.past_end, EINVAL, 'BLOCK_STATUS past the end: EINVAL');
  t.equal(R.read_high, true, 'read above 4 GiB');
});

t.test('structured reads: holes as hole chunks, data as data chunks, DF', async (t) => {
  if (!requireTools(t, ['python3-libnbd'])) return;
  const srv = await serverFor(t);
  const R = await run(
    srv,
    String.raw`
M = 1024 * 1024
K = 1024
h = connect('disk')
pat = bytes(range(256)) * 256          # 64 KiB, no zero runs worth a hole
h.pwrite(pat, M)
R['can_df'] = h.can_df()
def summary(count, off, fl=0):
    data, cks = chunks(h, count, off, fl)
    cks.sort()
    return dict(chunks=cks, data_ok=None, data=data)
s = summary(M, 0)
R['hole_only'] = s['chunks']
R['hole_only_zero'] = s['data'] == bytes(M)
s = summary(64 * K, M)
R['data_only'] = s['chunks']
R['data_only_ok'] = s['data'] == pat
s = summary(256 * K, M - 64 * K)
R['mixed'] = s['chunks']
R['mixed_ok'] = s['data'] == bytes(64 * K) + pat + bytes(128 * K)
s = summary(256 * K, M - 64 * K, nbd.CMD_FLAG_DF)
R['mixed_df'] = s['chunks']
R['mixed_df_ok'] = s['data'] == bytes(64 * K) + pat + bytes(128 * K)
s = summary(64 * K, 8 * M, nbd.CMD_FLAG_DF)
R['hole_df'] = s['chunks']
R['hole_df_zero'] = s['data'] == bytes(64 * K)
s = summary(4096, M + 4096, nbd.CMD_FLAG_DF)
R['small_df'] = s['chunks']
big = os.urandom(32 * M)
h.pwrite(big, 16 * M)
s = summary(32 * M, 16 * M, nbd.CMD_FLAG_DF)
R['big_df'] = s['chunks']
R['big_df_ok'] = s['data'] == big
# A tiny read of zeroes (one block) still tiles correctly.
s = summary(1, 5 * M)
R['one_byte'] = s['chunks']
`,
  );
  const DATA = 1;
  const HOLE = 2;
  t.equal(R.can_df, true, 'NBD_FLAG_SEND_DF advertised with structured replies');
  t.ok(R.hole_only.length >= 1 && R.hole_only.every((c: number[]) => c[2] === HOLE), 'an unwritten MiB arrives as OFFSET_HOLE chunks only');
  t.equal(R.hole_only.reduce((a: number, c: number[]) => a + c[1], 0), MiB, 'hole chunks cover the request');
  t.equal(R.hole_only_zero, true);
  t.ok(R.data_only.length >= 1 && R.data_only.every((c: number[]) => c[2] === DATA), 'written data arrives as OFFSET_DATA chunks only');
  t.equal(R.data_only_ok, true);
  const types = R.mixed.map((c: number[]) => c[2]);
  t.same(
    R.mixed.map((c: number[]) => [c[0], c[1], c[2]]),
    [
      [MiB - 64 * 1024, 64 * 1024, HOLE],
      [MiB, 64 * 1024, DATA],
      [MiB + 64 * 1024, 128 * 1024, HOLE],
    ],
    `hole, data, hole (got types ${types})`,
  );
  t.equal(R.mixed_ok, true, 'mixed read reassembles correctly');
  t.same(R.mixed_df, [[MiB - 64 * 1024, 256 * 1024, DATA]], 'DF over data+hole: exactly one OFFSET_DATA chunk');
  t.equal(R.mixed_df_ok, true, 'DF data has the zeroes explicitly');
  t.equal(R.hole_df.length, 1, 'DF over a hole: one content chunk');
  t.equal(R.hole_df[0][1], 64 * 1024);
  t.equal(R.hole_df_zero, true);
  t.same(R.small_df, [[MiB + 4096, 4096, DATA]]);
  t.same(R.big_df, [[16 * MiB, 32 * MiB, DATA]], 'DF 32 MiB read: one chunk');
  t.equal(R.big_df_ok, true);
  t.same(R.one_byte, [[5 * MiB, 1, HOLE]], 'a 1-byte read of zero is a 1-byte hole chunk');
});

t.test('32 MiB requests (the advertised maximum)', async (t) => {
  if (!requireTools(t, ['python3-libnbd'])) return;
  const srv = await serverFor(t, { size: '128M' });
  const R = await run(
    srv,
    String.raw`
M = 1024 * 1024
h = connect('disk')
R['max'] = h.get_block_size(nbd.SIZE_MAXIMUM)
a = os.urandom(32 * M)
b = os.urandom(32 * M)
h.pwrite(a, 0)
h.pwrite(b, 96 * M, nbd.CMD_FLAG_FUA)     # ends exactly at the end of the export
R['read_a'] = h.pread(32 * M, 0) == a
R['read_b'] = h.pread(32 * M, 96 * M) == b
R['read_unaligned'] = h.pread(32 * M, 1) == a[1:] + bytes(1)
# Two 32 MiB writes and reads in flight at once.
bufs = [nbd.Buffer.from_bytearray(os.urandom(32 * M)) for _ in range(2)]
for i, buf in enumerate(bufs):
    h.aio_pwrite(buf, (32 + 32 * i) * M)
while h.aio_in_flight():
    h.poll(-1)
rb = [nbd.Buffer(32 * M) for _ in range(2)]
for i, buf in enumerate(rb):
    h.aio_pread(buf, (32 + 32 * i) * M)
while h.aio_in_flight():
    h.poll(-1)
R['aio'] = [rb[i].to_bytearray() == bufs[i].to_bytearray() for i in range(2)]
h.flush()
with open(os.path.join(DIR, 'disk.img'), 'rb') as f:
    f.seek(96 * M)
    R['file_b'] = f.read() == b
`,
  );
  t.equal(R.max, 32 * MiB);
  t.equal(R.read_a, true, '32 MiB write then read');
  t.equal(R.read_b, true, '32 MiB FUA write ending at the export end');
  t.equal(R.read_unaligned, true, 'unaligned 32 MiB read');
  t.same(R.aio, [true, true], 'two 32 MiB requests in flight');
  t.equal(R.file_b, true, 'the file holds the data');
});

t.test('error numbers: past the end, zero length, oversize, bad flags', async (t) => {
  if (!requireTools(t, ['python3-libnbd'])) return;
  const srv = await serverFor(t);
  const R = await run(
    srv,
    String.raw`
M = 1024 * 1024
S = 64 * M
h = connect('disk', strict=0)
h.pwrite(b'\x42' * 8192, 0)
h.pwrite(b'\x43' * 4096, S - 4096)
E = {}
# Past the end.
E['read_past'] = serr(h.pread, 4096, S - 1024)
E['read_at_end'] = serr(h.pread, 1, S)
E['read_overflow'] = serr(h.pread, 512, 2**64 - 256)
E['write_past'] = serr(h.pwrite, b'x' * 4096, S - 1024)
E['write_at_end'] = serr(h.pwrite, b'x', S)
E['write_overflow'] = serr(h.pwrite, b'x' * 512, 2**64 - 256)
E['zero_past'] = serr(h.zero, 4096, S - 1024)
E['zero_beyond'] = serr(h.zero, 4096, S + M)
E['trim_past'] = serr(h.trim, 4096, S - 1024)
E['cache_past'] = serr(h.cache, 4096, S - 1024)
E['bs_past'] = serr(extents, h, 4096, S - 1024)
# Zero length.
E['read_0'] = serr(h.pread, 0, 0)
E['write_0'] = serr(h.pwrite, b'', 0)
E['trim_0'] = serr(h.trim, 0, 0)
E['zero_0'] = serr(h.zero, 0, 0)
E['cache_0'] = serr(h.cache, 0, 0)
E['bs_0'] = serr(extents, h, 0, 0)
# Larger than the 32 MiB maximum payload.
E['read_big'] = serr(h.pread, 32 * M + 4096, 0)
E['read_big_df'] = serr(h.pread, 32 * M + 4096, 0, nbd.CMD_FLAG_DF)
E['write_big'] = serr(h.pwrite, b'\x99' * (32 * M + 4096), 0)
# Flags that are not valid for the command.
E['read_req_one'] = serr(h.pread, 4096, 0, nbd.CMD_FLAG_REQ_ONE)
E['read_no_hole'] = serr(h.pread, 4096, 0, nbd.CMD_FLAG_NO_HOLE)
E['read_unknown'] = serr(h.pread, 4096, 0, 0x40)
E['read_unknown_hi'] = serr(h.pread, 4096, 0, 0x8000)
E['write_no_hole'] = serr(h.pwrite, b'y' * 512, 0, nbd.CMD_FLAG_NO_HOLE)
E['write_df'] = serr(h.pwrite, b'y' * 512, 0, nbd.CMD_FLAG_DF)
E['write_fast_zero'] = serr(h.pwrite, b'y' * 512, 0, nbd.CMD_FLAG_FAST_ZERO)
E['trim_no_hole'] = serr(h.trim, 4096, M, nbd.CMD_FLAG_NO_HOLE)
E['trim_fast_zero'] = serr(h.trim, 4096, M, nbd.CMD_FLAG_FAST_ZERO)
E['zero_req_one'] = serr(h.zero, 4096, M, nbd.CMD_FLAG_REQ_ONE)
E['zero_df'] = serr(h.zero, 4096, M, nbd.CMD_FLAG_DF)
E['cache_no_hole'] = serr(h.cache, 4096, 0, nbd.CMD_FLAG_NO_HOLE)
E['flush_no_hole'] = serr(h.flush, nbd.CMD_FLAG_NO_HOLE)
E['bs_df'] = serr(extents, h, 4096, 0, nbd.CMD_FLAG_DF)
R['E'] = E
# The connection survived all of that, and nothing was written by refused requests.
R['intact_start'] = h.pread(8192, 0) == b'\x42' * 8192
R['intact_end'] = h.pread(4096, S - 4096) == b'\x43' * 4096
R['size'] = h.get_size()
h.shutdown()
with open(os.path.join(DIR, 'disk.img'), 'rb') as f:
    R['file_size'] = len(f.read())
`,
  );
  const E = R.E;
  const expect: Record<string, number | number[]> = {
    read_past: EINVAL,
    read_at_end: EINVAL,
    read_overflow: EINVAL,
    write_past: ENOSPC,
    write_at_end: ENOSPC,
    write_overflow: ENOSPC,
    zero_past: ENOSPC,
    zero_beyond: ENOSPC,
    trim_past: EINVAL,
    cache_past: EINVAL,
    bs_past: EINVAL,
    read_0: EINVAL,
    write_0: EINVAL,
    trim_0: EINVAL,
    zero_0: EINVAL,
    cache_0: EINVAL,
    bs_0: EINVAL,
    // Structured READ larger than the maximum: the spec lets the server
    // split it or refuse it up front (EOVERFLOW); EINVAL is the issue's choice.
    read_big: [EINVAL, EOVERFLOW],
    read_big_df: EOVERFLOW,
    write_big: EINVAL,
    read_req_one: EINVAL,
    read_no_hole: EINVAL,
    read_unknown: EINVAL,
    read_unknown_hi: EINVAL,
    write_no_hole: EINVAL,
    write_df: EINVAL,
    write_fast_zero: EINVAL,
    trim_no_hole: EINVAL,
    trim_fast_zero: EINVAL,
    zero_req_one: EINVAL,
    zero_df: EINVAL,
    cache_no_hole: EINVAL,
    flush_no_hole: EINVAL,
    bs_df: EINVAL,
  };
  for (const [k, v] of Object.entries(expect)) {
    if (Array.isArray(v)) t.ok(v.includes(E[k]), `${k}: errno ${E[k]} is one of ${v}`);
    else t.equal(E[k], v, `${k}: errno ${v}`);
  }
  t.equal(R.intact_start, true, 'refused writes wrote nothing (oversize write payload was drained)');
  t.equal(R.intact_end, true, 'refused past-the-end writes wrote nothing');
  t.equal(R.size, 64 * MiB);
  t.equal(R.file_size, 64 * MiB, 'the image did not grow');
});

t.test('FUA is accepted on every command when SEND_FUA is advertised', async (t) => {
  // proto.md, "Command flags", bit 0 NBD_CMD_FLAG_FUA: "This flag is valid
  // for all commands, provided NBD_FLAG_SEND_FUA has been negotiated, in
  // which case the server MUST accept all commands with this bit set (even
  // by ignoring the bit)."
  if (!requireTools(t, ['python3-libnbd'])) return;
  const srv = await serverFor(t);
  const R = await run(
    srv,
    String.raw`
h = connect('disk', strict=0)
F = nbd.CMD_FLAG_FUA
R['can_fua'] = h.can_fua()
R['write'] = serr(h.pwrite, b'f' * 4096, 0, F)
R['trim'] = serr(h.trim, 4096, 65536, F)
R['zero'] = serr(h.zero, 4096, 65536, F)
R['read'] = serr(h.pread, 4096, 0, F)
R['read_df'] = serr(h.pread, 4096, 0, F | nbd.CMD_FLAG_DF)
R['flush'] = serr(h.flush, F)
R['cache'] = serr(h.cache, 4096, 0, F)
R['block_status'] = serr(extents, h, 4096, 0, F)
R['block_status_one'] = serr(extents, h, 4096, 0, F | nbd.CMD_FLAG_REQ_ONE)
R['still_ok'] = h.pread(4096, 0) == b'f' * 4096
`,
  );
  t.equal(R.can_fua, true);
  for (const k of ['write', 'trim', 'zero', 'read', 'read_df', 'flush', 'cache', 'block_status', 'block_status_one']) {
    t.equal(R[k], 0, `${k} with NBD_CMD_FLAG_FUA succeeds (got errno ${R[k]})`);
  }
  t.equal(R.still_ok, true);
});

t.test('read-only export: writes refused with EPERM, reads work, file untouched', async (t) => {
  if (!requireTools(t, ['python3-libnbd'])) return;
  const dir = makeTempDir();
  const content = Buffer.alloc(4 * MiB);
  for (let i = 0; i < content.length; i++) content[i] = (i * 7 + (i >> 12)) & 0xff;
  content.fill(0, 2 * MiB, 3 * MiB); // a zero range
  fs.writeFileSync(path.join(dir, 'ro.img'), content);
  const srv = await serverFor(t, { dir, images: ['ro.img'], args: ['--read-only'] });
  const R = await run(
    srv,
    String.raw`
M = 1024 * 1024
h = connect('ro', strict=0)
R['flags'] = flags(h)
R['write'] = serr(h.pwrite, b'w' * 4096, 0)
R['write_past'] = serr(h.pwrite, b'w' * 4096, 4 * M)
R['trim'] = serr(h.trim, 4096, 0)
R['zero'] = serr(h.zero, 4096, 0)
R['zero_nohole'] = serr(h.zero, 4096, 0, nbd.CMD_FLAG_NO_HOLE)
R['write_fua'] = serr(h.pwrite, b'w' * 4096, 0, nbd.CMD_FLAG_FUA)
R['flush'] = serr(h.flush)
R['cache'] = serr(h.cache, M, 0)
R['bs'] = extents(h, 4 * M, 0)
with open(os.path.join(DIR, 'ro.img'), 'rb') as f:
    R['read_ok'] = h.pread(4 * M, 0) == f.read()
`,
  );
  t.same(
    R.flags,
    { ro: true, flush: true, fua: false, trim: false, zero: false, fast_zero: false, df: true, multi_conn: true, cache: true, rotational: false },
    'transmission flags: READ_ONLY, no FUA/TRIM/WRITE_ZEROES/FAST_ZERO',
  );
  t.equal(R.write, EPERM, 'WRITE: EPERM');
  t.ok([EPERM, ENOSPC].includes(R.write_past), 'WRITE past the end of a read-only export: EPERM (or ENOSPC)');
  t.equal(R.trim, EPERM, 'TRIM: EPERM');
  t.equal(R.zero, EPERM, 'WRITE_ZEROES: EPERM');
  t.equal(R.zero_nohole, EPERM, 'WRITE_ZEROES+NO_HOLE: EPERM');
  t.ok([EPERM, EINVAL].includes(R.write_fua), 'WRITE+FUA (FUA not advertised): EPERM or EINVAL');
  t.equal(R.flush, 0, 'FLUSH is harmless');
  t.equal(R.cache, 0, 'CACHE works');
  t.same(R.bs, [['base:allocation', 0, [4 * MiB, 0]]], 'block status works (fully allocated file)');
  t.equal(R.read_ok, true, 'reads return the file');
  t.ok(fs.readFileSync(path.join(dir, 'ro.img')).equals(content), 'image file unchanged');
});

t.test('simple replies (structured replies not requested)', async (t) => {
  if (!requireTools(t, ['python3-libnbd'])) return;
  const srv = await serverFor(t);
  const R = await run(
    srv,
    String.raw`
M = 1024 * 1024
h = connect('disk', strict=0, structured=False)
R['structured'] = h.get_structured_replies_negotiated()
R['flags'] = flags(h)
R['meta'] = h.can_meta_context('base:allocation')
a = os.urandom(32 * M)
h.pwrite(a, M)
R['big'] = h.pread(32 * M, M) == a
R['zeros'] = h.pread(M, 40 * M) == bytes(M)
E = {}
# Each error reply must carry no payload, or the next reply is misframed.
E['read_past'] = serr(h.pread, 65536, 64 * M - 4096)
E['write_past'] = serr(h.pwrite, b'x' * 4096, 64 * M - 1024)
E['zero_past'] = serr(h.zero, 4096, 64 * M)
E['read_df'] = serr(h.pread, 4096, M, nbd.CMD_FLAG_DF)
E['read_big'] = serr(h.pread, 32 * M + 4096, 0)
E['bs'] = serr(extents, h, 4096, 0)
E['read_0'] = serr(h.pread, 0, 0)
R['E'] = E
R['after_errors'] = h.pread(65536, M) == a[:65536]
# Many in flight with simple replies too.
bufs = [nbd.Buffer(65536) for _ in range(64)]
for i, b in enumerate(bufs):
    h.aio_pread(b, M + i * 65536)
while h.aio_in_flight():
    h.poll(-1)
R['aio'] = all(bufs[i].to_bytearray() == a[i * 65536:(i + 1) * 65536] for i in range(64))
h.trim(M, 40 * M)
h.zero(M, 41 * M, nbd.CMD_FLAG_NO_HOLE)
h.flush()
h.cache(M, 0)
R['cmds_ok'] = True
`,
  );
  t.equal(R.structured, false);
  t.equal(R.flags.df, false, 'no SEND_DF without structured replies');
  t.equal(R.meta, false, 'no meta context without structured replies');
  t.equal(R.big, true, '32 MiB simple read');
  t.equal(R.zeros, true);
  t.same(
    R.E,
    { read_past: EINVAL, write_past: ENOSPC, zero_past: ENOSPC, read_df: EINVAL, read_big: EINVAL, bs: EINVAL, read_0: EINVAL },
    'errors arrive as simple replies with the right errno',
  );
  t.equal(R.after_errors, true, 'stream still framed correctly after error replies');
  t.equal(R.aio, true, '64 reads in flight');
  t.equal(R.cmds_ok, true);
});

// ---------------------------------------------------------------------------
// Concurrency
// ---------------------------------------------------------------------------

t.test('many requests in flight; replies complete out of order', async (t) => {
  if (!requireTools(t, ['python3-libnbd'])) return;
  const srv = await serverFor(t);
  const R = await run(
    srv,
    String.raw`
M = 1024 * 1024
K = 1024
h = connect('disk')
# 256 writes of distinct patterns, all queued before any reply is read.
N = 256
wbufs = [nbd.Buffer.from_bytearray(bytes([i % 251 + 1]) * (64 * K)) for i in range(N)]
errs = []
def cb(e):
    if e.value if hasattr(e, 'value') else e:
        errs.append(e.value if hasattr(e, 'value') else e)
    return 1
for i in range(N):
    h.aio_pwrite(wbufs[i], i * 64 * K, cb, nbd.CMD_FLAG_FUA if i % 16 == 0 else 0)
R['max_in_flight'] = h.aio_in_flight()
while h.aio_in_flight():
    h.poll(-1)
rbufs = [nbd.Buffer(64 * K) for i in range(N)]
for i in range(N):
    h.aio_pread(rbufs[i], i * 64 * K, cb)
while h.aio_in_flight():
    h.poll(-1)
R['errs'] = errs
R['bad'] = [i for i in range(N) if rbufs[i].to_bytearray() != bytes([i % 251 + 1]) * (64 * K)][:10]

# Mixed commands in flight at once.
kinds = []
for i in range(64):
    off = 60 * M + (i % 16) * 4096
    k = i % 6
    if k == 0:
        h.aio_pwrite(nbd.Buffer.from_bytearray(b'm' * 4096), off, cb)
    elif k == 1:
        h.aio_pread(nbd.Buffer(4096), off, cb)
    elif k == 2:
        h.aio_flush(cb)
    elif k == 3:
        h.aio_cache(4096, off, cb)
    elif k == 4:
        h.aio_block_status(4096, off, lambda *a: 0, cb)
    else:
        h.aio_zero(4096, 62 * M, cb)
while h.aio_in_flight():
    h.poll(-1)
R['mixed_errs'] = errs
`,
  );
  t.ok(R.max_in_flight > 1, `requests were in flight together (${R.max_in_flight})`);
  t.same(R.errs, [], 'no request failed');
  t.same(R.bad, [], 'every read returned its block');
  t.same(R.mixed_errs, [], 'mixed commands in flight all succeeded');
});

// Out of order on one connection: a FUA write that cannot finish yet, then
// small reads behind it that must not wait for it. The write is made slow by
// construction, not by its size: the volume has a snapshot, so the write is a
// first write, queued and acknowledged only once the first-write thread has
// applied it, and NBD_TEST_FIRST_WRITE_DELAY_MS holds that thread 2 s before
// each batch (the journal is large enough to take the whole write). A read
// goes first: a connection's worker threads are spawned when a thread takes a
// read (connection.cc, should_spawn), never for a write on a CPU-bound
// connection, and they stay; so a second worker exists to take the reads
// while the first waits for the write.
t.test('a small read overtakes a FUA write that is still being applied', async (t) => {
  if (!requireTools(t, ['python3-libnbd'])) return;
  const srv = await serverFor(t, { size: '64M', args: ['--cow-journal', '64M'], env: { NBD_TEST_FIRST_WRITE_DELAY_MS: '2000' } });
  const snap = await exec(process.execPath, [CLI, 'snapshot', 'create', path.join(srv.dir, 'disk.img'), 's'], { timeoutMs: 60_000 });
  t.equal(snap.code, 0, `snapshot create: ${snap.stderr}`);
  const R = await run(
    srv,
    String.raw`
M = 1024 * 1024
h = connect('disk')
h.pread(4096, 0)
order = []
def mk(tag):
    def c(e):
        order.append(tag)
        return 1
    return c
big = nbd.Buffer.from_bytearray(os.urandom(32 * M))
h.aio_pwrite(big, 20 * M, mk('big'), nbd.CMD_FLAG_FUA)
small = [nbd.Buffer(4096) for _ in range(32)]
for i, b in enumerate(small):
    h.aio_pread(b, i * 4096, mk(i))
while h.aio_in_flight():
    h.poll(-1)
R['big_position'] = order.index('big')
R['small_ok'] = all(b.to_bytearray() == bytes(4096) for b in small)
R['big_ok'] = h.pread(32 * M, 20 * M) == big.to_bytearray()
`,
  );
  t.ok(R.big_position > 0, `the small reads were answered before the FUA write (its reply came at position ${R.big_position} of 33)`);
  t.equal(R.small_ok, true, 'the small reads returned the (zero) data');
  t.equal(R.big_ok, true, 'the FUA write is in place once acknowledged');
});

t.test('multi-conn: write on one connection, flush on another, read on a third', async (t) => {
  if (!requireTools(t, ['python3-libnbd'])) return;
  const srv = await serverFor(t);
  const R = await run(
    srv,
    String.raw`
M = 1024 * 1024
hs = [connect('disk') for _ in range(3)]
R['multi_conn'] = [h.can_multi_conn() for h in hs]
w, f, r = hs
rnd = random.Random(7)
bad = []
for i in range(40):
    off = rnd.randrange(0, 63 * M)
    data = rnd.randbytes(rnd.choice([512, 4096, 65536, 1000]))
    w.pwrite(data, off)
    f.flush()
    if r.pread(len(data), off) != data:
        bad.append(off)
R['bad'] = bad
# The same with async writes on two connections to disjoint halves.
bufs = []
for i in range(64):
    h = hs[i % 2]
    b = nbd.Buffer.from_bytearray(bytes([i + 1]) * 65536)
    bufs.append(b)
    h.aio_pwrite(b, 32 * M + i * 65536)
for h in hs[:2]:
    while h.aio_in_flight():
        h.poll(-1)
f.flush()
R['async_bad'] = [i for i in range(64) if r.pread(65536, 32 * M + i * 65536) != bytes([i + 1]) * 65536]
for h in hs:
    h.shutdown()
# 200 simultaneous connections, each writing its own block; read back on another.
many = [connect('disk') for _ in range(200)]
wb = []
for i, h in enumerate(many):
    b = nbd.Buffer.from_bytearray(bytes([i % 255 + 1]) * 4096)
    wb.append(b)
    h.aio_pwrite(b, 48 * M + i * 4096)
for h in many:
    while h.aio_in_flight():
        h.poll(-1)
many[0].flush()
R['many_bad'] = [i for i in range(200) if many[(i + 1) % 200].pread(4096, 48 * M + i * 4096) != bytes([i % 255 + 1]) * 4096]
for h in many:
    h.shutdown()
`,
  );
  t.same(R.multi_conn, [true, true, true], 'NBD_FLAG_CAN_MULTI_CONN on every connection');
  t.same(R.bad, [], 'data written on connection 1 and flushed on 2 is read on 3');
  t.same(R.async_bad, [], 'async writes from two connections visible on a third after flush');
  t.same(R.many_bad, [], '200 simultaneous connections: every write visible from another connection');
});

t.test('NBD_CMD_DISC with requests in flight: they all complete', async (t) => {
  if (!requireTools(t, ['python3-libnbd'])) return;
  const srv = await serverFor(t);
  const R = await run(
    srv,
    String.raw`
h = connect('disk')
done_ = []
def mk(i):
    def c(e):
        done_.append([i, e.value if hasattr(e, 'value') else e])
        return 1
    return c
bufs = [nbd.Buffer.from_bytearray(bytes([i + 1]) * 65536) for i in range(64)]
for i in range(64):
    h.aio_pwrite(bufs[i], i * 65536, mk(i))
h.aio_disconnect()
while h.aio_in_flight():
    h.poll(-1)
R['completed'] = len(done_)
R['errors'] = [d for d in done_ if d[1]]
h2 = connect('disk')
R['bad'] = [i for i in range(64) if h2.pread(65536, i * 65536) != bytes([i + 1]) * 65536]
`,
  );
  t.equal(R.completed, 64, 'every request queued before DISC got its reply');
  t.same(R.errors, [], 'none failed');
  t.same(R.bad, [], 'and every write landed');
});

t.test('nbdsh command line', async (t) => {
  if (!requireTools(t, ['nbdsh', 'python3-libnbd'])) return;
  const srv = await serverFor(t);
  // nbdsh runs "python3 -m nbd" from PATH; put the system python first.
  const env = { ...process.env, PATH: `/usr/bin:${process.env.PATH ?? ''}` };
  const w = await exec('nbdsh', ['-u', srv.uri('disk'), '-c', 'h.pwrite(b"nbdsh!" * 100, 12345)', '-c', 'h.flush()'], { env });
  t.equal(w.code, 0, `nbdsh write (${w.stderr.trim()})`);
  const r = await exec('nbdsh', ['-u', srv.uri('disk'), '-c', 'print(h.get_size(), h.pread(6, 12345 + 594).decode())'], { env });
  t.equal(r.code, 0);
  t.equal(r.stdout.trim(), `${64 * MiB} nbdsh!`);
  const m = await exec(
    'nbdsh',
    [
      '--base-allocation',
      '-u',
      srv.uri('disk'),
      '-c',
      'e = []\nh.block_status(65536, 0, lambda c, o, x, err: e.extend(x))\nprint(e)',
    ],
    { env },
  );
  t.equal(m.code, 0, m.stderr);
  t.equal(m.stdout.trim(), '[12288, 3, 4096, 0, 49152, 3]', 'block status through nbdsh --base-allocation');
  const file = fs.readFileSync(path.join(srv.dir, 'disk.img'));
  t.equal(file.subarray(12345, 12345 + 600).toString(), 'nbdsh!'.repeat(100));
});
