// Interop: nbdcopy (libnbd's parallel copier) against the real CLI server:
// multi-connection (CAN_MULTI_CONN), many requests in flight, extents-driven
// sparse copying (BLOCK_STATUS + WRITE_ZEROES) and byte-exact round trips.
import t from 'tap';
import * as crypto from 'node:crypto';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { makeTempDir, serverFor, sparseImage } from './fixtures/server';
import { exec } from './fixtures/exec';
import { requireTools } from './fixtures/tools';


const MiB = 1024 * 1024;

const KiB = 1024;
const SIZE = 64 * MiB;

interface MapEntry {
  offset: number;
  length: number;
  type: number;
}

/** A sparse source: random data extents (some unaligned), allocated zeroes, holes. */
function makeSource(file: string): Buffer {
  return sparseImage(file, SIZE, (put) => {
    put(0, crypto.randomBytes(2 * MiB));
    put(5 * MiB + 100, crypto.randomBytes(333_333));
    put(9 * MiB, Buffer.alloc(3 * MiB)); // allocated, but zero
    put(13 * MiB, Buffer.concat([crypto.randomBytes(64 * KiB), Buffer.alloc(64 * KiB), crypto.randomBytes(64 * KiB)]));
    for (let off = 20 * MiB; off < SIZE - 2 * MiB; off += 3 * MiB + 4096) put(off, crypto.randomBytes(512 * KiB + 12_345));
    put(SIZE - 8192, crypto.randomBytes(8192));
  });
}

function sparse(dir: string, name: string, size = SIZE): string {
  const p = path.join(dir, name);
  fs.writeFileSync(p, '');
  fs.truncateSync(p, size);
  return p;
}

async function nbdcopy(args: string[]) {
  return exec('nbdcopy', args, { timeoutMs: 90_000 });
}

/** Index of the first differing byte, or -1. */
function firstDiff(a: Buffer, b: Buffer): number {
  if (a.length !== b.length) return Math.min(a.length, b.length);
  if (a.equals(b)) return -1;
  for (let i = 0; i < a.length; i++) if (a[i] !== b[i]) return i;
  return -1;
}

t.test('nbdcopy file -> export -> file with 4 connections', async (t) => {
  if (!requireTools(t, ['nbdcopy', 'nbdinfo'])) return;
  const dir = makeTempDir();
  sparse(dir, 'disk.img');
  const srv = await serverFor(t, { dir, images: ['disk.img'] });
  const src = path.join(dir, 'source.raw');
  const expect = makeSource(src);

  const up = await nbdcopy(['--connections=4', '--requests=16', src, srv.uri('disk')]);
  t.equal(up.code, 0, `upload: ${up.stderr}`);
  const disk = fs.readFileSync(path.join(dir, 'disk.img'));
  t.equal(firstDiff(disk, expect), -1, 'the export image equals the source');

  // Sparseness: nbdcopy zeroes what is zero in the source (WRITE_ZEROES
  // without NO_HOLE), which this server turns into holes. So block status
  // must show data exactly where the source has non-zero 4 KiB blocks.
  const m = await exec('nbdinfo', ['--map', '--json', srv.uri('disk')]);
  t.equal(m.code, 0);
  const map = JSON.parse(m.stdout) as MapEntry[];
  const mismatches: string[] = [];
  for (const e of map) {
    for (let off = e.offset; off < e.offset + e.length; off += 4096) {
      const nonzero = !expect.subarray(off, off + 4096).every((b) => b === 0);
      if (nonzero && e.type !== 0) mismatches.push(`${off}: data reported as ${e.type}`);
      if (!nonzero && e.type !== 3) mismatches.push(`${off}: zero block reported as ${e.type}`);
    }
  }
  t.same(mismatches.slice(0, 10), [], 'map: data where the source has data, hole,zero elsewhere');

  const out = path.join(dir, 'back.raw');
  const down = await nbdcopy(['--connections=4', '--requests=16', srv.uri('disk'), out]);
  t.equal(down.code, 0, `download: ${down.stderr}`);
  t.equal(firstDiff(fs.readFileSync(out), expect), -1, 'round trip is byte-identical');
});

t.test('nbdcopy with different request sizes, queue sizes and modes', async (t) => {
  if (!requireTools(t, ['nbdcopy'])) return;
  const dir = makeTempDir();
  sparse(dir, 'disk.img');
  const srv = await serverFor(t, { dir, images: ['disk.img'] });
  const src = path.join(dir, 'source.raw');
  const expect = makeSource(src);
  const modes: [string, string[]][] = [
    ['32 MiB requests, 4 connections', ['--connections=4', '--requests=4', '--request-size=33554432']],
    ['small requests, deep queue', ['--connections=2', '--requests=64', '--request-size=65536']],
    ['synchronous', ['--synchronous']],
    ['no extents, flush', ['--no-extents', '--flush', '--connections=4']],
    ['allocated (write zeroes as data)', ['--allocated', '--connections=4']],
  ];
  for (const [name, flags] of modes) {
    // Dirty the export first so a copy that skips something is caught.
    const junk = path.join(dir, 'junk.raw');
    fs.writeFileSync(junk, Buffer.alloc(SIZE, 0xee));
    const pre = await nbdcopy(['--connections=4', junk, srv.uri('disk')]);
    t.equal(pre.code, 0, `${name}: prefill`);
    const up = await nbdcopy([...flags, src, srv.uri('disk')]);
    t.equal(up.code, 0, `${name}: upload ${up.stderr}`);
    t.equal(firstDiff(fs.readFileSync(path.join(dir, 'disk.img')), expect), -1, `${name}: export equals the source`);
    const out = path.join(dir, 'back.raw');
    fs.rmSync(out, { force: true });
    const down = await nbdcopy([...flags, srv.uri('disk'), out]);
    t.equal(down.code, 0, `${name}: download ${down.stderr}`);
    t.equal(firstDiff(fs.readFileSync(out), expect), -1, `${name}: download equals the source`);
  }
  // --allocated must leave the zero ranges allocated (WRITE_ZEROES with NO_HOLE or plain writes).
  const st = fs.statSync(path.join(dir, 'disk.img'));
  t.ok(st.blocks * 512 >= SIZE, `--allocated: the image is fully allocated (${st.blocks * 512} bytes)`);
});

t.test('nbdcopy between two exports of the same server', async (t) => {
  if (!requireTools(t, ['nbdcopy'])) return;
  const dir = makeTempDir();
  sparse(dir, 'a.img');
  sparse(dir, 'b.img');
  const srv = await serverFor(t, { dir, images: ['a.img', 'b.img'] });
  const src = path.join(dir, 'source.raw');
  const expect = makeSource(src);
  t.equal((await nbdcopy(['--connections=4', src, srv.uri('a')])).code, 0, 'fill a');
  fs.writeFileSync(path.join(dir, 'junk.raw'), crypto.randomBytes(SIZE));
  t.equal((await nbdcopy(['--connections=4', path.join(dir, 'junk.raw'), srv.uri('b')])).code, 0, 'fill b with junk');

  const r = await nbdcopy(['--connections=4', '--requests=32', srv.uri('a'), srv.uri('b')]);
  t.equal(r.code, 0, `a -> b: ${r.stderr}`);
  t.equal(firstDiff(fs.readFileSync(path.join(dir, 'b.img')), expect), -1, 'b equals the source');
  t.equal(firstDiff(fs.readFileSync(path.join(dir, 'a.img')), expect), -1, 'a unchanged');

  // And back the other way through the default export name ("" = a).
  fs.writeFileSync(path.join(dir, 'zero.raw'), '');
  fs.truncateSync(path.join(dir, 'zero.raw'), SIZE);
  t.equal((await nbdcopy([path.join(dir, 'zero.raw'), srv.uri('')])).code, 0, 'wipe a through the default export');
  t.ok(fs.readFileSync(path.join(dir, 'a.img')).every((b) => b === 0), 'a is all zero');
  const back = await nbdcopy(['--connections=4', srv.uri('b'), srv.uri('')]);
  t.equal(back.code, 0, `b -> "": ${back.stderr}`);
  t.equal(firstDiff(fs.readFileSync(path.join(dir, 'a.img')), expect), -1, 'a equals the source again');

  // Reading with many connections into null: (pure read load).
  const nul = await nbdcopy(['--connections=8', '--requests=64', srv.uri('a'), 'null:']);
  t.equal(nul.code, 0, 'read the export with 8 connections');
});

t.test('nbdcopy into a read-only export fails cleanly', async (t) => {
  if (!requireTools(t, ['nbdcopy'])) return;
  const dir = makeTempDir();
  const img = path.join(dir, 'ro.img');
  const content = crypto.randomBytes(4 * MiB);
  fs.writeFileSync(img, content);
  const srv = await serverFor(t, { dir, images: ['ro.img'], args: ['--read-only'] });
  const src = path.join(dir, 'src.raw');
  fs.writeFileSync(src, crypto.randomBytes(4 * MiB));
  const r = await nbdcopy([src, srv.uri('ro')]);
  t.not(r.code, 0, 'copy into a read-only export fails');
  t.match(r.stderr, /read-only|read only|Operation not permitted|EPERM/i, `reason given: ${r.stderr.trim()}`);
  t.ok(fs.readFileSync(img).equals(content), 'image untouched');
  const out = path.join(dir, 'out.raw');
  const d = await nbdcopy(['--connections=4', srv.uri('ro'), out]);
  t.equal(d.code, 0, 'reading it works');
  t.ok(fs.readFileSync(out).equals(content), 'and returns the file');
});
