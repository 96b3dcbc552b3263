// Interop: nbdinfo (libnbd's inspection tool) against the real CLI server.
// Covers NBD_OPT_LIST (--list), NBD_OPT_GO/INFO replies (--json, --size,
// --can/--is, which read the transmission flags and NBD_INFO_* replies) and
// base:allocation block status (--map) before and after writes and trims.
import t, { type Test } from 'tap';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { makeTempDir, type RunningServer, serverFor, removeDir } from './fixtures/server';
import { exec, pyNbd } from './fixtures/exec';
import { requireTools } from './fixtures/tools';

// requireTools() is typed against a structural Skippable whose skip() does not
// match tap's overloads; the runtime object is fine.
// Load the compiled package (the addon path is resolved relative to dist/).
import { NbdServer } from '../src/index';

const MiB = 1024 * 1024;

/** Starts the CLI server; stops it and removes its directory at the end of the test. */
interface MapEntry {
  offset: number;
  length: number;
  type: number;
  description: string;
}

async function nbdinfo(args: string[]) {
  return exec('nbdinfo', args, { timeoutMs: 60_000 });
}

async function mapOf(t: Test, uri: string): Promise<MapEntry[]> {
  const r = await nbdinfo(['--map', '--json', uri]);
  t.equal(r.code, 0, `nbdinfo --map --json exits 0 (${r.stderr.trim()})`);
  return JSON.parse(r.stdout) as MapEntry[];
}

/** Runs a small python-libnbd snippet against `uri` (`h` is a connected handle). */
async function withHandle(t: Test, srv: RunningServer, uri: string, body: string): Promise<void> {
  const script = `import nbd, sys\nh = nbd.NBD()\nh.connect_uri(sys.argv[1])\n${body}\nh.shutdown()\n`;
  const r = await pyNbd(srv.dir, script, uri);
  t.equal(r.code, 0, `python-libnbd helper ran (${r.stderr.trim()})`);
}

t.test('--list shows every export and the default export works', async (t) => {
  if (!requireTools(t, ['nbdinfo'])) return;
  const dir = makeTempDir();
  // Different sizes so the default export is distinguishable from the others.
  for (const [name, size] of [['alpha.img', 64 * MiB], ['beta.img', 32 * MiB], ['gamma.raw', 16 * MiB]] as const) {
    fs.writeFileSync(path.join(dir, name), '');
    fs.truncateSync(path.join(dir, name), size);
  }
  const srv = await serverFor(t, { dir, images: ['alpha.img', 'beta.img', 'gamma.raw'] });
  t.same(srv.ready.exports, ['alpha', 'beta', 'gamma']);

  const text = await nbdinfo(['--list', srv.uri()]);
  t.equal(text.code, 0, 'nbdinfo --list exits 0');
  for (const name of ['alpha', 'beta', 'gamma']) t.match(text.stdout, `export="${name}":`, `--list shows ${name}`);

  const js = await nbdinfo(['--list', '--json', srv.uri()]);
  t.equal(js.code, 0, 'nbdinfo --list --json exits 0');
  const doc = JSON.parse(js.stdout) as { protocol: string; structured: boolean; exports: Record<string, unknown>[] };
  t.equal(doc.protocol, 'newstyle-fixed');
  t.equal(doc.structured, true, 'structured replies negotiated');
  const byName = new Map(doc.exports.map((e) => [e['export-name'] as string, e]));
  t.same([...byName.keys()].sort(), ['alpha', 'beta', 'gamma'], 'every export listed exactly once');
  t.equal(byName.get('alpha')?.['export-size'], 64 * MiB);
  t.equal(byName.get('beta')?.['export-size'], 32 * MiB);
  t.equal(byName.get('gamma')?.['export-size'], 16 * MiB);

  // The default export ("") is the first image.
  const def = await nbdinfo(['--size', srv.uri('')]);
  t.equal(def.code, 0);
  t.equal(def.stdout.trim(), String(64 * MiB), 'default export is alpha (64 MiB)');
  const defJson = JSON.parse((await nbdinfo(['--json', srv.uri('')])).stdout) as { exports: Record<string, unknown>[] };
  t.equal(defJson.exports[0]!['export-name'], 'alpha', 'NBD_INFO_NAME gives the canonical name of the default export');
  for (const [name, size] of [['beta', 32 * MiB], ['gamma', 16 * MiB]] as const) {
    const r = await nbdinfo(['--size', srv.uri(name)]);
    t.equal(r.stdout.trim(), String(size), `--size of ${name}`);
  }

  // An unknown export is an error (NBD_REP_ERR_UNKNOWN), not a hang or crash.
  const bad = await nbdinfo(['--size', srv.uri('nosuch')]);
  t.not(bad.code, 0, 'unknown export fails');
  t.match(bad.stderr, /nosuch|unknown|No such/i, 'error names the problem');
  // ...and the server keeps serving.
  t.equal((await nbdinfo(['--size', srv.uri('beta')])).stdout.trim(), String(32 * MiB));
});

t.test('--map follows writes, trims and zeroes', async (t) => {
  if (!requireTools(t, ['nbdinfo', 'python3-libnbd'])) return;
  const srv = await serverFor(t, { size: '64M' });
  const uri = srv.uri('disk');

  t.same(await mapOf(t, uri), [{ offset: 0, length: 64 * MiB, type: 3, description: 'hole,zero' }], 'fresh sparse image is one hole');
  const text = await nbdinfo(['--map', uri]);
  t.match(text.stdout, /^\s*0\s+67108864\s+3\s+hole,zero\s*$/, 'text map of the sparse image');

  await withHandle(t, srv, uri, `h.pwrite(b"\\x5a" * ${2 * MiB}, ${4 * MiB})\nh.flush()`);
  t.same(
    await mapOf(t, uri),
    [
      { offset: 0, length: 4 * MiB, type: 3, description: 'hole,zero' },
      { offset: 4 * MiB, length: 2 * MiB, type: 0, description: 'data' },
      { offset: 6 * MiB, length: 58 * MiB, type: 3, description: 'hole,zero' },
    ],
    'written range shows as data',
  );

  // Trim the middle of the data: that part becomes a hole again.
  await withHandle(t, srv, uri, `h.trim(${MiB}, ${5 * MiB})`);
  t.same(
    await mapOf(t, uri),
    [
      { offset: 0, length: 4 * MiB, type: 3, description: 'hole,zero' },
      { offset: 4 * MiB, length: MiB, type: 0, description: 'data' },
      { offset: 5 * MiB, length: MiB, type: 3, description: 'hole,zero' },
      { offset: 6 * MiB, length: 58 * MiB, type: 3, description: 'hole,zero' },
    ].reduce<MapEntry[]>((acc, e) => {
      // nbdinfo merges neighbours of the same type
      const last = acc[acc.length - 1];
      if (last && last.type === e.type) last.length += e.length;
      else acc.push({ ...e });
      return acc;
    }, []),
    'trimmed range is a hole again',
  );

  // WRITE_ZEROES without NO_HOLE may punch: the rest of the data goes.
  await withHandle(t, srv, uri, `h.zero(${MiB}, ${4 * MiB})`);
  t.same(await mapOf(t, uri), [{ offset: 0, length: 64 * MiB, type: 3, description: 'hole,zero' }], 'zeroed range is a hole');

  // Totals add up to the export size.
  await withHandle(t, srv, uri, `h.pwrite(b"\\x01" * ${8 * MiB}, 0)`);
  const totals = JSON.parse((await nbdinfo(['--map', '--totals', '--json', uri])).stdout) as { size: number; type: number }[];
  t.same(
    totals.map((x) => [x.type, x.size]).sort(),
    [
      [0, 8 * MiB],
      [3, 56 * MiB],
    ],
    '--totals: 8 MiB data, 56 MiB hole',
  );

  // The map agrees with the file on disk: what is data must be our bytes.
  const file = fs.readFileSync(path.join(srv.dir, 'disk.img'));
  t.ok(file.subarray(0, 8 * MiB).every((b) => b === 1), 'file holds the written bytes');
  t.ok(file.subarray(8 * MiB).every((b) => b === 0), 'rest of the file is zero');
});

t.test('--map of an unaligned, larger sparse image', async (t) => {
  if (!requireTools(t, ['nbdinfo', 'python3-libnbd'])) return;
  const dir = makeTempDir();
  const size = 6 * 1024 * MiB + 12345; // 6 GiB + odd tail: exercises > 4 GiB offsets and a non-multiple-of-512 end
  const img = path.join(dir, 'odd.img');
  fs.writeFileSync(img, '');
  fs.truncateSync(img, size);
  const srv = await serverFor(t, { dir, images: ['odd.img'] });
  const uri = srv.uri('odd');
  t.equal((await nbdinfo(['--size', uri])).stdout.trim(), String(size));
  // Data at 5 GiB and in the last, partial block.
  await withHandle(t, srv, uri, `h.pwrite(b"D" * 65536, ${5 * 1024 * MiB})\nh.pwrite(b"E" * 100, ${size - 100})`);
  const map = await mapOf(t, uri);
  let pos = 0;
  for (const e of map) {
    t.equal(e.offset, pos, `extents are contiguous at ${pos}`);
    pos += e.length;
  }
  t.equal(pos, size, 'extents cover exactly the export');
  const data = map.filter((e) => e.type === 0);
  t.ok(
    data.some((e) => e.offset <= 5 * 1024 * MiB && e.offset + e.length >= 5 * 1024 * MiB + 65536),
    'data extent at 5 GiB',
  );
  t.ok(data.some((e) => e.offset + e.length === size), 'data extent at the tail');
  t.equal(map[0]!.type, 3, 'start is a hole');
});

t.test('--can / --is flags on a writable export', async (t) => {
  if (!requireTools(t, ['nbdinfo'])) return;
  const srv = await serverFor(t, { size: '64M' });
  const uri = srv.uri('disk');
  for (const what of ['connect', 'read', 'write', 'flush', 'fua', 'trim', 'zero', 'fast-zero', 'df', 'multi-conn', 'cache', 'structured-reply']) {
    const r = await nbdinfo(['--can', what, uri]);
    t.equal(r.code, 0, `--can ${what} is true (exit 0) ${r.stderr.trim()}`);
  }
  t.equal((await nbdinfo(['--is', 'read-only', uri])).code, 2, '--is read-only is false (exit 2)');
  t.equal((await nbdinfo(['--is', 'rotational', uri])).code, 2, '--is rotational is false');
  t.equal((await nbdinfo(['--is', 'tls', uri])).code, 2, '--is tls is false');
});

t.test('--can / --is flags on a read-only export', async (t) => {
  if (!requireTools(t, ['nbdinfo'])) return;
  const dir = makeTempDir();
  fs.writeFileSync(path.join(dir, 'ro.img'), Buffer.alloc(MiB, 7));
  const srv = await serverFor(t, { dir, images: ['ro.img'], args: ['--read-only'] });
  const uri = srv.uri('ro');
  const expect: Record<string, number> = {
    connect: 0,
    read: 0,
    write: 2,
    trim: 2,
    zero: 2,
    'fast-zero': 2,
    fua: 2,
    flush: 0, // harmless on a read-only export; the server advertises it
    df: 0,
    'multi-conn': 0,
    cache: 0,
  };
  for (const [what, code] of Object.entries(expect)) {
    const r = await nbdinfo(['--can', what, uri]);
    t.equal(r.code, code, `--can ${what} exits ${code}`);
  }
  t.equal((await nbdinfo(['--is', 'read-only', uri])).code, 0, '--is read-only is true');
  const info = JSON.parse((await nbdinfo(['--json', uri])).stdout) as { exports: Record<string, unknown>[] };
  t.equal(info.exports[0]!.is_read_only, true);
  t.equal(info.exports[0]!['export-size'], MiB);
});

t.test('--json: block sizes, flags, contexts, size', async (t) => {
  if (!requireTools(t, ['nbdinfo'])) return;
  const srv = await serverFor(t, { size: '64M' });
  const r = await nbdinfo(['--json', srv.uri('disk')]);
  t.equal(r.code, 0);
  const doc = JSON.parse(r.stdout) as { protocol: string; TLS: boolean; structured: boolean; exports: Record<string, unknown>[] };
  t.equal(doc.protocol, 'newstyle-fixed');
  t.equal(doc.TLS, false);
  t.equal(doc.structured, true);
  t.equal(doc.exports.length, 1);
  const e = doc.exports[0]!;
  t.equal(e['export-name'], 'disk');
  t.equal(e['export-size'], 64 * MiB);
  t.equal(e.block_size_minimum, 1, 'NBD_INFO_BLOCK_SIZE minimum');
  t.equal(e.block_size_preferred, 4096, 'NBD_INFO_BLOCK_SIZE preferred');
  t.equal(e.block_size_maximum, 32 * MiB, 'NBD_INFO_BLOCK_SIZE maximum payload');
  t.same(e.contexts, ['base:allocation'], 'exactly base:allocation is offered');
  t.notOk('description' in e, 'the CLI sets no description, so none is reported');
  for (const k of ['can_cache', 'can_df', 'can_fast_zero', 'can_flush', 'can_fua', 'can_multi_conn', 'can_trim', 'can_zero']) {
    t.equal(e[k], true, k);
  }
  t.equal(e.is_read_only, false);
  t.equal(e.is_rotational, false);
});

t.test('--json and --list report an export description (embedded server)', async (t) => {
  if (!requireTools(t, ['nbdinfo'])) return;
  // The CLI has no description option; the embedding API does. The native
  // server runs on its own threads, so it serves while we await nbdinfo.
  const dir = makeTempDir();
  const img = path.join(dir, 'described.img');
  fs.writeFileSync(img, Buffer.alloc(MiB));
  const plain = path.join(dir, 'plain.img');
  fs.writeFileSync(plain, Buffer.alloc(2 * MiB));
  const server = new NbdServer();
  const description = 'Test disk: snowman ☃, 1 MiB';
  server.addImage({ path: img, description });
  server.addImage({ path: plain });
  const sock = path.join(dir, 'nbd.sock');
  server.listenUnix(sock);
  server.start();
  t.teardown(async () => {
    await server.close();
    removeDir(dir);
  });
  const uri = (name: string) => `nbd+unix:///${name}?socket=${sock}`;

  const one = JSON.parse((await nbdinfo(['--json', uri('described')])).stdout) as { exports: Record<string, unknown>[] };
  t.equal(one.exports[0]!.description, description, 'NBD_INFO_DESCRIPTION round-trips (UTF-8)');
  t.equal(one.exports[0]!['export-size'], MiB);

  const list = JSON.parse((await nbdinfo(['--list', '--json', uri('')])).stdout) as { exports: Record<string, unknown>[] };
  const byName = new Map(list.exports.map((e) => [e['export-name'] as string, e]));
  t.equal(byName.get('described')?.description, description, 'description in --list');
  t.notOk(byName.get('plain') && 'description' in byName.get('plain')!, 'no description for an export without one');
  t.equal(byName.get('plain')?.['export-size'], 2 * MiB);
  const text = await nbdinfo(['--list', uri('')]);
  t.match(text.stdout, `description: ${description}`);
});

t.test('export names with spaces and UTF-8', async (t) => {
  if (!requireTools(t, ['nbdinfo'])) return;
  const dir = makeTempDir();
  fs.writeFileSync(path.join(dir, 'my disk.img'), Buffer.alloc(MiB));
  fs.writeFileSync(path.join(dir, 'ünï☃.img'), Buffer.alloc(2 * MiB));
  const srv = await serverFor(t, { dir, images: ['my disk.img', 'ünï☃.img'] });
  t.same(srv.ready.exports, ['my disk', 'ünï☃']);
  const list = JSON.parse((await nbdinfo(['--list', '--json', srv.uri('')])).stdout) as { exports: Record<string, unknown>[] };
  t.same(
    list.exports.map((e) => [e['export-name'], e['export-size']]),
    [
      ['my disk', MiB],
      ['ünï☃', 2 * MiB],
    ],
    'names come back byte-exact from NBD_OPT_LIST',
  );
  t.equal((await nbdinfo(['--size', srv.uri(encodeURIComponent('my disk'))])).stdout.trim(), String(MiB));
  t.equal((await nbdinfo(['--size', srv.uri(encodeURIComponent('ünï☃'))])).stdout.trim(), String(2 * MiB));
});

t.test('--map of a fragmented image (131072 extents)', async (t) => {
  if (!requireTools(t, ['nbdinfo'])) return;
  // 4 KiB of data every 8 KiB over 512 MiB: more extents than one
  // BLOCK_STATUS reply carries, so nbdinfo must iterate.
  const dir = makeTempDir();
  const img = path.join(dir, 'frag.img');
  const fd = fs.openSync(img, 'w');
  fs.ftruncateSync(fd, 512 * MiB);
  const blk = Buffer.alloc(4096, 0x61);
  for (let i = 0; i < 65536; i++) fs.writeSync(fd, blk, 0, 4096, i * 8192);
  fs.closeSync(fd);
  const srv = await serverFor(t, { dir, images: ['frag.img'] });
  const r = await nbdinfo(['--map', '--json', srv.uri('frag')]);
  t.equal(r.code, 0);
  const map = JSON.parse(r.stdout) as MapEntry[];
  t.equal(map.length, 131072, 'one extent per 4 KiB run');
  let bad = -1;
  for (let i = 0; i < map.length && bad < 0; i++) {
    const e = map[i]!;
    if (e.offset !== i * 4096 || e.length !== 4096 || e.type !== (i % 2 ? 3 : 0)) bad = i;
  }
  t.equal(bad, -1, 'data and holes alternate every 4 KiB, contiguous');
  const totals = JSON.parse((await nbdinfo(['--map', '--totals', '--json', srv.uri('frag')])).stdout) as { size: number; type: number }[];
  t.same(
    totals.map((x) => [x.type, x.size]).sort(),
    [
      [0, 256 * MiB],
      [3, 256 * MiB],
    ],
  );
});
