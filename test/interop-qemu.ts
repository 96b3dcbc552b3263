// Interop: QEMU's NBD client (qemu-io, qemu-img) against the real CLI server.
// qemu-io exits non-zero when a command fails, including a `read -P`
// pattern mismatch; every test also checks the image file on disk.
import t, { type Test } from 'tap';
import * as crypto from 'node:crypto';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { makeTempDir, serverFor, sparseImage } from './fixtures/server';
import { exec } from './fixtures/exec';
import { requireTools } from './fixtures/tools';


const MiB = 1024 * 1024;

const KiB = 1024;

async function qemuIo(uri: string, cmds: string[], extra: string[] = []) {
  const args = extra.includes('--image-opts') ? [...extra] : ['-f', 'raw', ...extra];
  for (const c of cmds) args.push('-c', c);
  args.push(uri);
  return exec('qemu-io', args, { timeoutMs: 60_000 });
}

/** Runs qemu-io and asserts it succeeded with no pattern failure. */
async function qemuIoOk(t: Test, uri: string, cmds: string[], what: string, extra: string[] = []) {
  const r = await qemuIo(uri, cmds, extra);
  t.equal(r.code, 0, `${what}: qemu-io exits 0${r.code ? `\n${r.stdout}\n${r.stderr}` : ''}`);
  t.notMatch(r.stdout + r.stderr, /Pattern verification failed|error|failed/i, `${what}: no errors reported`);
  return r;
}

/** A sparse image with random data extents, an explicit zero extent and holes. */
function makeSource(file: string, size: number): Buffer {
  return sparseImage(file, size, (put) => {
    put(0, crypto.randomBytes(MiB)); // data at the start
    put(3 * MiB + 512, crypto.randomBytes(123_457)); // unaligned data
    put(8 * MiB, Buffer.alloc(2 * MiB)); // allocated zeroes
    for (let off = 16 * MiB; off < size - MiB; off += 5 * MiB) put(off, crypto.randomBytes(256 * KiB + (off % 7) * 4096));
    put(size - 4096, crypto.randomBytes(4096)); // data at the very end
  });
}

t.test('qemu-io: write/read patterns, zeroes, discard, FUA, vectored and aio I/O', async (t) => {
  if (!requireTools(t, ['qemu-io'])) return;
  const srv = await serverFor(t);
  const uri = srv.uri('disk');
  await qemuIoOk(
    t,
    uri,
    [
      'write -P 0xab 0 1M',
      'read -P 0xab 0 1M',
      'write -P 0x11 1048577 4095', // unaligned
      'read -P 0x11 1048577 4095',
      'read -P 0 1048576 1', // the byte before the unaligned write stays zero
      'read -P 0xab 1048575 1',
      'read -P 0x0 1052672 4096',
      'write -f -P 0x22 2M 64k', // FUA
      'read -P 0x22 2M 64k',
      'writev -P 0x33 3M 4k 8k 512',
      'readv -P 0x33 3M 12k 512',
    ],
    'patterns',
  );

  // A wrong pattern must fail: proves the checks above can fail.
  const wrong = await qemuIo(uri, ['read -P 0xac 0 1M']);
  t.not(wrong.code, 0, 'qemu-io read -P with the wrong pattern fails');
  t.match(wrong.stdout + wrong.stderr, /Pattern verification failed/);

  // Write zeroes: with NO_HOLE (default), with unmap allowed (-u), with FUA.
  await qemuIoOk(
    t,
    uri,
    [
      'write -P 0x44 4M 3M',
      'write -z 4M 1M',
      'write -z -u 5M 1M',
      'write -z -f 6M 64k',
      'read -P 0 4M 1M',
      'read -P 0 5M 1M',
      'read -P 0 6M 64k',
      'read -P 0x44 6356992 983040', // the rest of the 3 MiB block (6M+64K .. 7M)
    ],
    'write zeroes',
  );

  // Discard (NBD_CMD_TRIM): this server punches holes, so it reads zero.
  await qemuIoOk(t, uri, ['write -P 0x55 8M 2M', 'discard 8M 1M', 'read -P 0 8M 1M', 'read -P 0x55 9M 1M'], 'discard');

  // aio: many writes in flight, then flush, then verify.
  const aio: string[] = [];
  for (let i = 0; i < 32; i++) aio.push(`aio_write -P ${0x60 + i} ${16 * MiB + i * 64 * KiB} 64k`);
  aio.push('aio_flush');
  for (let i = 0; i < 32; i++) aio.push(`aio_read -P ${0x60 + i} ${16 * MiB + i * 64 * KiB} 64k`);
  aio.push('aio_flush');
  await qemuIoOk(t, uri, aio, 'aio_write/aio_read');

  // The image file agrees with everything above.
  const f = fs.readFileSync(path.join(srv.dir, 'disk.img'));
  const expect = Buffer.alloc(64 * MiB);
  expect.fill(0xab, 0, MiB);
  expect.fill(0x11, MiB + 1, MiB + 1 + 4095);
  expect.fill(0x22, 2 * MiB, 2 * MiB + 64 * KiB);
  expect.fill(0x33, 3 * MiB, 3 * MiB + 12 * KiB + 512);
  expect.fill(0x44, 6 * MiB + 64 * KiB, 7 * MiB);
  expect.fill(0x55, 9 * MiB, 10 * MiB);
  for (let i = 0; i < 32; i++) expect.fill(0x60 + i, 16 * MiB + i * 64 * KiB, 16 * MiB + (i + 1) * 64 * KiB);
  t.equal(f.length, 64 * MiB);
  t.ok(f.equals(expect), 'image file holds exactly what qemu-io wrote');
});

t.test('qemu-io: --image-opts, default export, unknown export, read-only export', async (t) => {
  if (!requireTools(t, ['qemu-io'])) return;
  const dir = makeTempDir();
  fs.writeFileSync(path.join(dir, 'first.img'), Buffer.alloc(MiB, 0x71));
  fs.writeFileSync(path.join(dir, 'second.img'), Buffer.alloc(2 * MiB, 0x72));
  const srv = await serverFor(t, { dir, images: ['first.img', 'second.img'] });
  await qemuIoOk(t, `driver=nbd,path=${srv.socket},export=second`, ['read -P 0x72 0 2M'], 'image-opts', ['--image-opts']);
  await qemuIoOk(t, srv.uri(''), ['read -P 0x71 0 1M'], 'default export is the first image');
  const bad = await qemuIo(srv.uri('nosuch'), ['read 0 512']);
  t.not(bad.code, 0, 'unknown export fails to open');
  t.match(bad.stderr, /unknown export 'nosuch'|not available/, 'server message reaches qemu');

  await srv.stop(); // one server per image at a time (the volume lock)
  const ro = await serverFor(t, { dir: makeTempDir(), images: [path.join(dir, 'first.img')], args: ['--read-only'] });
  await qemuIoOk(t, ro.uri('first'), ['read -P 0x71 0 1M'], 'read from a read-only export', ['-r']);
  const w = await qemuIo(ro.uri('first'), ['write -P 0 0 4k']);
  t.not(w.code, 0, 'qemu-io cannot write to a read-only export');
  t.ok(fs.readFileSync(path.join(dir, 'first.img')).equals(Buffer.alloc(MiB, 0x71)), 'read-only image untouched');
});

t.test('qemu-img info and map', async (t) => {
  if (!requireTools(t, ['qemu-img', 'qemu-io'])) return;
  const srv = await serverFor(t);
  const uri = srv.uri('disk');
  const info = await exec('qemu-img', ['info', '--output=json', '-f', 'raw', uri]);
  t.equal(info.code, 0, info.stderr);
  const doc = JSON.parse(info.stdout) as Record<string, unknown>;
  t.equal(doc['virtual-size'], 64 * MiB, 'virtual size');
  t.equal(doc.format, 'raw');
  const text = await exec('qemu-img', ['info', '-f', 'raw', uri]);
  t.match(text.stdout, /virtual size: 64 MiB \(67108864 bytes\)/);

  const map0 = JSON.parse((await exec('qemu-img', ['map', '--output=json', '-f', 'raw', uri])).stdout) as Record<string, unknown>[];
  t.same(
    map0.map((e) => [e.start, e.length, e.data, e.zero]),
    [[0, 64 * MiB, false, true]],
    'fresh export: one zero, unallocated extent',
  );

  await qemuIoOk(t, uri, ['write -P 1 1M 1M', 'write -P 2 10M 64k', 'write -P 3 63M 1M', 'write -z 20M 1M', 'discard 1M 512k'], 'setup');
  const map = JSON.parse((await exec('qemu-img', ['map', '--output=json', '-f', 'raw', uri])).stdout) as Record<string, unknown>[];
  // Check contiguity and exact data ranges; zero-with-NO_HOLE regions may show either way, so only data is pinned.
  let pos = 0;
  for (const e of map) {
    t.equal(e.start, pos, `extents are contiguous at ${pos}`);
    pos += e.length as number;
  }
  t.equal(pos, 64 * MiB, 'map covers the export');
  const data = map.filter((e) => e.data === true).map((e) => [e.start, e.length]);
  const dataNoZeroFill = data.filter(([s]) => s !== 20 * MiB);
  t.same(
    dataNoZeroFill,
    [
      [MiB + 512 * KiB, 512 * KiB],
      [10 * MiB, 64 * KiB],
      [63 * MiB, MiB],
    ],
    'data exactly where written (minus the discarded half)',
  );
  for (const e of map) {
    if (e.data === false) t.equal(e.zero, true, `unallocated extent at ${e.start} reads as zero`);
  }
});

t.test('qemu-img convert into the export and back, compare', async (t) => {
  if (!requireTools(t, ['qemu-img'])) return;
  const srv = await serverFor(t);
  const uri = srv.uri('disk');
  const src = path.join(srv.dir, 'source.raw');
  const expect = makeSource(src, 64 * MiB);

  const c1 = await exec('qemu-img', ['convert', '-n', '-W', '-m', '16', '-f', 'raw', '-O', 'raw', src, uri]);
  t.equal(c1.code, 0, `convert file -> export ${c1.stderr}`);
  const cmp1 = await exec('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', src, uri]);
  t.equal(cmp1.code, 0, `qemu-img compare source vs export: ${cmp1.stdout.trim()} ${cmp1.stderr.trim()}`);
  t.ok(fs.readFileSync(path.join(srv.dir, 'disk.img')).equals(expect), 'export image file equals the source');

  const out = path.join(srv.dir, 'back.raw');
  const c2 = await exec('qemu-img', ['convert', '-f', 'raw', '-O', 'raw', uri, out]);
  t.equal(c2.code, 0, `convert export -> file ${c2.stderr}`);
  t.ok(fs.readFileSync(out).equals(expect), 'round trip is byte-identical');
  const cmp2 = await exec('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', uri, out]);
  t.equal(cmp2.code, 0, 'qemu-img compare export vs copy');

  // Negative control: change one byte in the export; compare must notice.
  const r = await exec('qemu-io', ['-f', 'raw', '-c', `write -P 0x5a ${40 * MiB + 17} 1`, uri]);
  t.equal(r.code, 0);
  const cmp3 = await exec('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', src, uri]);
  t.equal(cmp3.code, 1, 'compare reports the difference');
  t.match(cmp3.stdout, new RegExp(`Content mismatch at offset ${40 * MiB}|${40 * MiB + 17}`));

  // Export to export through qemu-img (two connections to one server).
  const dir2 = makeTempDir();
  fs.writeFileSync(path.join(dir2, 'x.img'), '');
  fs.truncateSync(path.join(dir2, 'x.img'), 64 * MiB);
  fs.writeFileSync(path.join(dir2, 'y.img'), '');
  fs.truncateSync(path.join(dir2, 'y.img'), 64 * MiB);
  const two = await serverFor(t, { dir: dir2, images: ['x.img', 'y.img'] });
  t.equal((await exec('qemu-img', ['convert', '-n', '-f', 'raw', '-O', 'raw', src, two.uri('x')])).code, 0);
  const c3 = await exec('qemu-img', ['convert', '-n', '-W', '-f', 'raw', '-O', 'raw', two.uri('x'), two.uri('y')]);
  t.equal(c3.code, 0, `convert export x -> export y ${c3.stderr}`);
  t.equal((await exec('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', two.uri('x'), two.uri('y')])).code, 0, 'x == y');
  t.ok(fs.readFileSync(path.join(dir2, 'y.img')).equals(expect), 'y holds the source bytes');
});

t.test('qemu-img bench: many parallel requests', async (t) => {
  if (!requireTools(t, ['qemu-img', 'qemu-io'])) return;
  const srv = await serverFor(t);
  const uri = srv.uri('disk');
  const w = await exec('qemu-img', ['bench', '-f', 'raw', '-w', '-c', '4000', '-d', '64', '-s', '4k', '-S', '8k', '--pattern=0x7e', uri]);
  t.equal(w.code, 0, `write bench: ${w.stderr}`);
  const r = await exec('qemu-img', ['bench', '-f', 'raw', '-c', '4000', '-d', '64', '-s', '4k', '-S', '8k', uri]);
  t.equal(r.code, 0, `read bench: ${r.stderr}`);
  // bench wrote 4 KiB every 8 KiB from offset 0.
  const f = fs.readFileSync(path.join(srv.dir, 'disk.img'));
  let bad = -1;
  for (let i = 0; i < 4000 && bad < 0; i++) {
    const blk = f.subarray(i * 8192, i * 8192 + 4096);
    const gap = f.subarray(i * 8192 + 4096, i * 8192 + 8192);
    if (!blk.every((b) => b === 0x7e) || !gap.every((b) => b === 0)) bad = i;
  }
  t.equal(bad, -1, 'every benchmark write landed, and nothing else was written');
});

t.test('qemu-nbd --list: LIST, INFO and LIST_META_CONTEXT through QEMU\'s client', async (t) => {
  if (!requireTools(t, ['qemu-nbd'])) return;
  const dir = makeTempDir();
  for (const [name, size] of [['a.img', 64 * MiB], ['b.img', 32 * MiB]] as const) {
    fs.writeFileSync(path.join(dir, name), '');
    fs.truncateSync(path.join(dir, name), size);
  }
  const srv = await serverFor(t, { dir, images: ['a.img', 'b.img'] });
  const r = await exec('qemu-nbd', ['--list', '-k', srv.socket]);
  t.equal(r.code, 0, r.stderr);
  t.match(r.stdout, /exports available: 2/);
  // Parse "export: 'x'" blocks.
  const blocks = r.stdout.split(/\n(?= export: )/).slice(1);
  const parsed = blocks.map((b) => ({
    name: /export: '([^']*)'/.exec(b)?.[1],
    size: Number(/size:\s+(\d+)/.exec(b)?.[1]),
    flags: /flags: (0x[0-9a-f]+)/.exec(b)?.[1],
    min: Number(/min block: (\d+)/.exec(b)?.[1]),
    opt: Number(/opt block: (\d+)/.exec(b)?.[1]),
    max: Number(/max block: (\d+)/.exec(b)?.[1]),
    contexts: /available meta contexts: 1\s+base:allocation/.test(b),
  }));
  // HAS_FLAGS|SEND_FLUSH|SEND_FUA|SEND_TRIM|SEND_WRITE_ZEROES|SEND_DF|CAN_MULTI_CONN|SEND_CACHE|SEND_FAST_ZERO
  const rw = '0xded';
  t.same(parsed, [
    { name: 'a', size: 64 * MiB, flags: rw, min: 1, opt: 4096, max: 32 * MiB, contexts: true },
    { name: 'b', size: 32 * MiB, flags: rw, min: 1, opt: 4096, max: 32 * MiB, contexts: true },
  ]);

  await srv.stop(); // one server per image at a time (the volume lock)
  const ro = await serverFor(t, { dir: makeTempDir(), images: [path.join(dir, 'a.img')], args: ['--read-only'] });
  const r2 = await exec('qemu-nbd', ['--list', '-k', ro.socket]);
  t.equal(r2.code, 0);
  // HAS_FLAGS|READ_ONLY|SEND_FLUSH|SEND_DF|CAN_MULTI_CONN|SEND_CACHE
  t.match(r2.stdout, /flags: 0x587 \( readonly flush df multi cache \)/, 'read-only transmission flags');
});
