// The rbd diff v1 stream (src/diff): the writer against an independent
// decoder and the applier (round trip, property test over random volumes,
// runs and zero chunks), backpressure, hostile input (every truncation point,
// bad fields), and `diff apply` on real volumes offline and online (the
// copy-on-write path keeps snapshots exact). Interop with the Ceph tools is
// in test/interop-rbd.ts.
import t from 'tap';
import { spawn } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { PassThrough, Writable } from 'node:stream';
import { randomBytes } from 'node:crypto';
import type { ChunkRun } from '../src/backup/source';
import { NbdClient } from '../src/backup/nbd-client';
import { applyRbdDiff, FileDiffTarget, parseRbdDiff, writeRbdDiff } from '../src/diff';
import { NbdError } from '../src/errors';
import { applyModel, asAsync, decodeModel, encodeModel, MemorySource, MemoryTarget, pieces, prng, runDiffApply, type Rec } from './fixtures/diff-stream';
import { CLI, serverFor, tempDirs } from './fixtures/server';
import { exec } from './fixtures/exec';
import { listenerUri as nbdUriFor } from '../src/control';

const KiB = 1024;
const makeTempDir = tempDirs(t);

async function streamOf(src: MemorySource, opts: { fromSnap: string | null; toSnap: string | null; segmentBytes?: number }): Promise<Buffer> {
  const out = new PassThrough();
  const parts: Buffer[] = [];
  out.on('data', (d: Buffer) => parts.push(d));
  await writeRbdDiff(src, out, opts);
  out.end();
  return Buffer.concat(parts);
}

function codeOf(p: Promise<unknown>): Promise<string> {
  return p.then(
    () => 'resolved',
    (e: unknown) => (e instanceof NbdError ? e.code : `not an NbdError: ${String(e)}`),
  );
}

/** Random chunk content: a third all-zero, some with a single non-zero byte at the end. */
function fillChunk(buf: Buffer, off: number, len: number, rnd: () => number): void {
  const k = rnd();
  if (k < 0.33) buf.fill(0, off, off + len);
  else if (k < 0.45) {
    buf.fill(0, off, off + len);
    buf[off + len - 1] = 1 + Math.floor(rnd() * 255);
  } else randomBytes(len).copy(buf, off);
}

t.test('round trip: random volumes, runs and zero chunks (property)', async (t) => {
  const seeds = 60;
  for (let seed = 1; seed <= seeds; seed++) {
    const rnd = prng(seed);
    const chunkSize = [4096, 8192, 16384][Math.floor(rnd() * 3)]!;
    const chunks = 1 + Math.floor(rnd() * 40);
    const tail = rnd() < 0.5 ? 0 : 1 + Math.floor(rnd() * (chunkSize - 1)); // a short last chunk
    const size = (tail ? chunks - 1 : chunks) * chunkSize + tail;
    const base = Buffer.alloc(size);
    for (let c = 0; c < chunks; c++) fillChunk(base, c * chunkSize, Math.min(chunkSize, size - c * chunkSize), rnd);
    // The new image: random chunks changed; runs cover every changed chunk and some unchanged ones.
    const next = Buffer.from(base);
    const inRun: boolean[] = [];
    const zeroRun: boolean[] = [];
    for (let c = 0; c < chunks; c++) {
      const len = Math.min(chunkSize, size - c * chunkSize);
      const r = rnd();
      if (r < 0.3) {
        fillChunk(next, c * chunkSize, len, rnd);
        inRun[c] = true;
      } else if (r < 0.4) {
        next.fill(0, c * chunkSize, c * chunkSize + len); // trimmed/zeroed: the source knows
        inRun[c] = true;
        zeroRun[c] = true;
      } else inRun[c] = r < 0.5; // listed but unchanged
    }
    if (seed === 1) {
      inRun.fill(false); // the empty diff
      base.copy(next);
    }
    if (seed === 2) inRun.fill(true); // everything, to the end of the volume
    const runs: ChunkRun[] = [];
    for (let c = 0; c < chunks; c++) {
      if (!inRun[c]) continue;
      const z = !!zeroRun[c];
      const last = runs.at(-1);
      // Adjacent runs of one kind are sometimes separate: the writer must coalesce 'z' across them.
      if (last && last.start + last.count === c && !!last.zero === z && rnd() < 0.7) last.count++;
      else runs.push(z ? { start: c, count: 1, zero: true } : { start: c, count: 1 });
    }
    const src = new MemorySource(next, chunkSize, runs);
    const segmentBytes = [chunkSize, 3 * chunkSize, 4 * 1024 * 1024][Math.floor(rnd() * 3)]!;
    const fromSnap = rnd() < 0.5 ? null : `a${seed}`;
    const toSnap = rnd() < 0.5 ? null : `b${seed}`;
    const bytes = await streamOf(src, { fromSnap, toSnap, segmentBytes });
    const recs = decodeModel(bytes);
    const where = `seed ${seed} (chunk ${chunkSize}, size ${size}, ${runs.length} runs)`;

    // Header exactly as rbd export-diff orders it.
    const head: Rec[] = [];
    if (fromSnap) head.push({ tag: 'f', name: fromSnap });
    if (toSnap) head.push({ tag: 't', name: toSnap });
    head.push({ tag: 's', size });
    t.same(recs.slice(0, head.length), head, `${where}: metadata f, t, s`);
    t.same(recs.at(-1), { tag: 'e' }, `${where}: ends with e`);
    const data = recs.slice(head.length, -1) as Extract<Rec, { tag: 'w' | 'z' }>[];
    // Ascending, disjoint, within the size, no empty record, no two adjacent 'z', no all-zero chunk in a 'w'.
    let prevEnd = 0;
    let prevTag = '';
    let bad = '';
    for (const r of data) {
      const len = r.tag === 'w' ? r.data.length : r.length;
      if (r.offset < prevEnd || len === 0 || r.offset + len > size) bad ||= `record ${r.tag} ${r.offset}+${len} after ${prevEnd}`;
      if (r.tag === 'z' && prevTag === 'z' && r.offset === prevEnd) bad ||= `adjacent z records at ${r.offset}`;
      if (r.tag === 'w') {
        if (r.offset % chunkSize || r.data.length > segmentBytes) bad ||= `w ${r.offset}+${len} not chunk-aligned or longer than a segment`;
        for (let o = 0; o < r.data.length; o += chunkSize) if (r.data.subarray(o, o + chunkSize).every((x) => x === 0)) bad ||= `an all-zero chunk at ${r.offset + o} in a w record`;
      }
      prevEnd = r.offset + len;
      prevTag = r.tag;
    }
    t.equal(bad, '', `${where}: records ascending, disjoint, coalesced, zero chunks as z`);
    // Zero runs are never read; everything else in a run is read once.
    const readBytes = src.reads.reduce((a, r) => a + r.length, 0);
    const expectRead = runs.filter((r) => !r.zero).reduce((a, r) => a + Math.min(size, (r.start + r.count) * chunkSize) - r.start * chunkSize, 0);
    t.equal(readBytes, expectRead, `${where}: reads exactly the non-zero runs`);
    t.ok(src.reads.every((r) => r.length <= Math.max(chunkSize, segmentBytes)), `${where}: reads are bounded by the segment`);

    // Apply: independent model and our applier agree and reproduce `next`.
    const model = Buffer.from(base);
    applyModel(model, recs);
    t.ok(model.equals(next), `${where}: the stream turns base into next (model)`);
    const target = new MemoryTarget(Buffer.from(base));
    const res = await applyRbdDiff(asAsync(pieces(bytes, rnd, 5000)), target, { pieceBytes: 1 + Math.floor(rnd() * 3 * chunkSize) });
    t.ok(target.data.equals(next) && target.flushed, `${where}: applyRbdDiff turns base into next and flushes`);
    t.same([res.fromSnap, res.toSnap, res.size], [fromSnap, toSnap, size], `${where}: the applier reports the metadata`);
  }
});

t.test('writer: the empty diff and a zero-size volume', async (t) => {
  const empty = await streamOf(new MemorySource(Buffer.alloc(8192), 4096, []), { fromSnap: 'a', toSnap: null });
  t.same(decodeModel(empty), [{ tag: 'f', name: 'a' }, { tag: 's', size: 8192 }, { tag: 'e' }]);
  const none = await streamOf(new MemorySource(Buffer.alloc(0), 4096, []), { fromSnap: null, toSnap: null });
  t.same(decodeModel(none), [{ tag: 's', size: 0 }, { tag: 'e' }]);
  const tgt = new MemoryTarget(Buffer.alloc(0));
  await applyRbdDiff(asAsync([none]), tgt);
  t.ok(tgt.flushed);
});

t.test('writer: honours backpressure (reads stop while the output is full)', async (t) => {
  const chunkSize = 4096;
  const data = randomBytes(64 * chunkSize);
  const src = new MemorySource(data, chunkSize, [{ start: 0, count: 64 }]);
  const held: (() => void)[] = [];
  const got: Buffer[] = [];
  const out = new Writable({
    highWaterMark: 1,
    write(chunk: Buffer, _enc, cb) {
      got.push(chunk);
      held.push(cb);
    },
  });
  const done = writeRbdDiff(src, out, { fromSnap: null, toSnap: null, segmentBytes: chunkSize });
  // Let every ready callback and promise run; nothing completes a write meanwhile.
  const settle = async () => {
    for (let i = 0; i < 50; i++) await new Promise((r) => setImmediate(r));
  };
  // Release one write at a time: reads may run ahead of the output by at most
  // the segment being written and one read-ahead.
  const dataWritten = () => got.filter((c) => c.length === chunkSize).length;
  let worst = 0;
  let steps = 0;
  await settle();
  while (held.length) {
    worst = Math.max(worst, src.reads.length - dataWritten());
    held.shift()!();
    steps++;
    await settle();
  }
  t.ok(steps > 64, `the output was full ${steps} times`);
  t.ok(worst <= 2, `reads ran at most 2 segments ahead of the output (worst ${worst})`);
  await done;
  t.ok(applyAndCompare(Buffer.concat(got), Buffer.alloc(data.length), data), 'the stream is complete after the output drained');
});

function applyAndCompare(bytes: Buffer, base: Buffer, expect: Buffer): boolean {
  const img = Buffer.from(base);
  applyModel(img, decodeModel(bytes));
  return img.equals(expect);
}

t.test('writer: cancel between segments leaves no end record', async (t) => {
  const ac = new AbortController();
  const src = new MemorySource(randomBytes(16 * 4096), 4096, [{ start: 0, count: 16 }]);
  const orig = src.read.bind(src);
  src.read = async (o, b) => {
    if (src.reads.length === 3) ac.abort();
    return orig(o, b);
  };
  const out = new PassThrough();
  const parts: Buffer[] = [];
  out.on('data', (d: Buffer) => parts.push(d));
  t.equal(await codeOf(writeRbdDiff(src, out, { fromSnap: null, toSnap: null, segmentBytes: 4096, signal: ac.signal })), 'JOB_CANCELED');
  const bytes = Buffer.concat(parts);
  t.not(bytes.at(-1), 0x65, 'no end record');
  t.equal(await codeOf(applyRbdDiff(asAsync([bytes]), new MemoryTarget(Buffer.alloc(16 * 4096)))), 'DIFF_FORMAT_INVALID', 'and the applier refuses it');
});

// A stream with every record kind; 'w' records short enough that one piece holds each.
const SIZE = 64 * KiB;
const HOSTILE: Rec[] = [
  { tag: 'f', name: 'snap-a' },
  { tag: 't', name: 'snap-b' },
  { tag: 's', size: SIZE },
  { tag: 'w', offset: 100, data: Buffer.alloc(40, 0xaa) },
  { tag: 'z', offset: 4096, length: 8192 },
  { tag: 'w', offset: SIZE - 33, data: Buffer.alloc(33, 0xbb) },
  { tag: 'w', offset: 120, data: Buffer.alloc(50, 0xcc) }, // overlaps the first: stream order wins
  { tag: 'z', offset: 0, length: 0 },
  { tag: 'w', offset: 9000, data: Buffer.alloc(0) },
  { tag: 'e' },
];

t.test('hostile: truncated at every byte, in any delivery pieces', async (t) => {
  const { bytes, ends } = encodeModel(HOSTILE);
  const base = Buffer.alloc(SIZE, 0x11);
  const full = Buffer.from(base);
  applyModel(full, HOSTILE);
  const rnd = prng(7);
  let bad = '';
  for (let cut = 0; cut < bytes.length; cut++) {
    const target = new MemoryTarget(Buffer.from(base));
    const code = await codeOf(applyRbdDiff(asAsync(pieces(bytes.subarray(0, cut), rnd, 7)), target));
    // Expected: every record that ended within the cut, nothing of the one cut short.
    const expect = Buffer.from(base);
    applyModel(
      expect,
      HOSTILE.filter((_, i) => ends[i]! <= cut),
    );
    if (code !== 'DIFF_FORMAT_INVALID') bad ||= `cut at ${cut}: ${code}`;
    else if (!target.data.equals(expect)) bad ||= `cut at ${cut}: the image is not the prefix of the complete records`;
    else if (target.flushed) bad ||= `cut at ${cut}: flushed as if complete`;
  }
  t.equal(bad, '', `all ${bytes.length} truncations refused with DIFF_FORMAT_INVALID, leaving exactly the complete records applied`);
  const target = new MemoryTarget(Buffer.from(base));
  await applyRbdDiff(asAsync(pieces(bytes, rnd, 3)), target);
  t.ok(target.data.equals(full), 'the whole stream applies');
});

t.test('hostile: a cut inside a long w record writes only its whole pieces', async (t) => {
  const data = randomBytes(100);
  const { bytes } = encodeModel([{ tag: 's', size: 1000 }, { tag: 'w', offset: 10, data }, { tag: 'e' }]);
  const headerEnd = 12 + 9 + 17;
  const target = new MemoryTarget(Buffer.alloc(1000));
  t.equal(await codeOf(applyRbdDiff(asAsync([bytes.subarray(0, headerEnd + 70)]), target, { pieceBytes: 32 })), 'DIFF_FORMAT_INVALID');
  const expect = Buffer.alloc(1000);
  data.copy(expect, 10, 0, 64);
  t.ok(target.data.equals(expect), 'the two whole 32-byte pieces were written, the partial third was not');
});

t.test('hostile: bad fields', async (t) => {
  const u64 = (v: bigint) => {
    const b = Buffer.alloc(8);
    b.writeBigUInt64LE(v);
    return b;
  };
  const banner = Buffer.from('rbd diff v1\n');
  const s = Buffer.concat([Buffer.from('s'), u64(BigInt(SIZE))]);
  const cases: [string, Buffer, string][] = [
    ['empty input', Buffer.alloc(0), 'DIFF_FORMAT_INVALID'],
    ['wrong banner', Buffer.from('rbd diff v0\ns'), 'DIFF_FORMAT_INVALID'],
    ['v2 banner', Buffer.from('rbd diff v2\n'), 'DIFF_FORMAT_INVALID'],
    ['unknown tag', Buffer.concat([banner, s, Buffer.from('p\x01e')]), 'DIFF_FORMAT_INVALID'],
    ['no size before data', Buffer.concat([banner, Buffer.from('z'), u64(0n), u64(1n), Buffer.from('e')]), 'DIFF_FORMAT_INVALID'],
    ['no size at all', Buffer.concat([banner, Buffer.from('e')]), 'DIFF_FORMAT_INVALID'],
    ['two size records', Buffer.concat([banner, s, s, Buffer.from('e')]), 'DIFF_FORMAT_INVALID'],
    ['metadata after data', Buffer.concat([banner, s, Buffer.from('z'), u64(0n), u64(1n), Buffer.from('t\x01\x00\x00\x00xe')]), 'DIFF_FORMAT_INVALID'],
    ['huge w length', Buffer.concat([banner, s, Buffer.from('w'), u64(0n), u64(0xffffffffffffffffn)]), 'DIFF_FORMAT_INVALID'],
    ['w length past the size', Buffer.concat([banner, s, Buffer.from('w'), u64(0n), u64(BigInt(SIZE) + 1n), Buffer.alloc(10)]), 'DIFF_FORMAT_INVALID'],
    ['z offset past the size', Buffer.concat([banner, s, Buffer.from('z'), u64(BigInt(SIZE)), u64(1n), Buffer.from('e')]), 'DIFF_FORMAT_INVALID'],
    ['offset + length overflowing 2^53', Buffer.concat([banner, s, Buffer.from('z'), u64(2n ** 53n - 1n), u64(2n ** 53n - 1n), Buffer.from('e')]), 'DIFF_FORMAT_INVALID'],
    ['size above 2^53', Buffer.concat([banner, Buffer.from('s'), u64(2n ** 60n), Buffer.from('e')]), 'DIFF_FORMAT_INVALID'],
    ['name length 4 GiB', Buffer.concat([banner, Buffer.from('f\xff\xff\xff\xff', 'latin1'), Buffer.from('abc')]), 'DIFF_FORMAT_INVALID'],
    ['name of 4097 bytes', Buffer.concat([banner, Buffer.from('f\x01\x10\x00\x00', 'latin1'), Buffer.alloc(4097, 0x61), s, Buffer.from('e')]), 'DIFF_FORMAT_INVALID'],
    ['name not UTF-8', Buffer.concat([banner, Buffer.from('f\x02\x00\x00\x00\xc3\x28', 'latin1'), s, Buffer.from('e')]), 'DIFF_FORMAT_INVALID'],
    ['bytes after the end', Buffer.concat([banner, s, Buffer.from('ee')]), 'DIFF_FORMAT_INVALID'],
    ['size differs from the image', Buffer.concat([banner, Buffer.from('s'), u64(BigInt(SIZE) * 2n), Buffer.from('z'), u64(0n), u64(10n), Buffer.from('e')]), 'DIFF_MISMATCH'],
  ];
  for (const [what, bytes, code] of cases) {
    const target = new MemoryTarget(Buffer.alloc(SIZE, 0x11));
    t.equal(await codeOf(applyRbdDiff(asAsync([bytes]), target)), code, `${what}: ${code}`);
    // The valid prefix is applied: only 'metadata after data' has a complete data record before the bad one.
    t.same(target.ops, what === 'metadata after data' ? ['z 0+1'] : [], `${what}: nothing written past the valid prefix`);
  }
  // A name of exactly 4096 bytes is accepted (rbd's limit).
  const ok = Buffer.concat([banner, Buffer.from('f\x00\x10\x00\x00', 'latin1'), Buffer.alloc(4096, 0x61), s, Buffer.from('e')]);
  const r = await applyRbdDiff(asAsync([ok]), new MemoryTarget(Buffer.alloc(SIZE)));
  t.equal(r.fromSnap?.length, 4096, 'a 4096-byte name is accepted');
  // checkHeader refuses before any write.
  const { bytes } = encodeModel(HOSTILE);
  const target = new MemoryTarget(Buffer.alloc(SIZE));
  const refused = applyRbdDiff(asAsync([bytes]), target, {
    checkHeader: (h) => {
      throw new NbdError('DIFF_MISMATCH', `no snapshot ${h.fromSnap}`);
    },
  });
  t.equal(await codeOf(refused), 'DIFF_MISMATCH', 'checkHeader can refuse');
  t.same(target.ops, [], 'before any write');
  // The parser yields the header before any extent.
  const kinds: string[] = [];
  for await (const ev of parseRbdDiff(asAsync([bytes]))) kinds.push(ev.kind);
  t.same(kinds, ['header', 'data', 'zero', 'data', 'data', 'zero', 'end']);
});

t.test('hostile: a target write error stops the apply after in-flight writes settle', async (t) => {
  const recs: Rec[] = [{ tag: 's', size: SIZE }];
  for (let i = 0; i < 16; i++) recs.push({ tag: 'w', offset: i * 4096, data: Buffer.alloc(4096, i + 1) });
  recs.push({ tag: 'e' });
  const target = new MemoryTarget(Buffer.alloc(SIZE));
  const w = target.write.bind(target);
  target.write = async (o, d) => {
    if (o === 5 * 4096) throw new NbdError('NBD_IO_ERROR', 'injected');
    return w(o, d);
  };
  t.equal(await codeOf(applyRbdDiff(asAsync([encodeModel(recs).bytes]), target, { maxInFlight: 4 })), 'NBD_IO_ERROR');
  t.notOk(target.flushed, 'not flushed');
  t.ok(target.ops.length < 16 && target.ops.length >= 5, `stopped early (${target.ops.length} writes)`);
});

t.test('apply: overlapping records land in stream order even when writes complete out of order', async (t) => {
  // A device that completes queued writes last-first, applying each at completion.
  const img = Buffer.alloc(SIZE);
  const queue: (() => void)[] = [];
  const later = (apply: () => void) =>
    new Promise<void>((resolve) => {
      queue.push(() => {
        apply();
        resolve();
      });
      if (queue.length === 1) setImmediate(() => queue.splice(0).reverse().forEach((f) => f()));
    });
  const target = {
    size: SIZE,
    write: (o: number, d: Buffer) => later(() => d.copy(img, o)),
    zero: (o: number, l: number) => later(() => img.fill(0, o, o + l)),
    flush: async () => undefined,
    close: async () => undefined,
  };
  const recs: Rec[] = [
    { tag: 's', size: SIZE },
    { tag: 'w', offset: 0, data: Buffer.alloc(8192, 1) },
    { tag: 'w', offset: 4096, data: Buffer.alloc(8192, 2) },
    { tag: 'z', offset: 6000, length: 100 },
    { tag: 'w', offset: 20000, data: Buffer.alloc(10, 3) },
    { tag: 'e' },
  ];
  await applyRbdDiff(asAsync([encodeModel(recs).bytes]), target, { maxInFlight: 8 });
  const expect = Buffer.alloc(SIZE);
  applyModel(expect, recs);
  t.ok(img.equals(expect), 'the result equals applying the records one by one');
});

t.test('FileDiffTarget: applies to a raw file in place', async (t) => {
  const dir = makeTempDir('nbd-rbddiff-');
  const file = path.join(dir, 'raw.img');
  fs.writeFileSync(file, Buffer.alloc(SIZE, 0x11));
  const { bytes } = encodeModel(HOSTILE.filter((r) => r.tag !== 'f' && r.tag !== 't'));
  const target = await FileDiffTarget.open(file);
  await applyRbdDiff(asAsync([bytes]), target);
  await target.close();
  const expect = Buffer.alloc(SIZE, 0x11);
  applyModel(expect, HOSTILE);
  t.ok(fs.readFileSync(file).equals(expect));
});

// --- diff apply (CLI) on real volumes -------------------------------------

const MiB = 1024 * KiB;
const VOL = 4 * MiB;

function makeImage(file: string, seed: number): Buffer {
  const rnd = prng(seed);
  const b = Buffer.alloc(VOL);
  for (let off = 0; off < VOL; off += 64 * KiB) if (rnd() < 0.5) randomBytes(64 * KiB).copy(b, off);
  fs.writeFileSync(file, b);
  return b;
}

/** Records that turn `from` into `to` (per 4 KiB: z when `to` is zero, w otherwise, only where they differ). */
function recordsBetween(from: Buffer, to: Buffer, fromSnap: string | null, toSnap: string | null): Rec[] {
  const recs: Rec[] = [];
  if (fromSnap) recs.push({ tag: 'f', name: fromSnap });
  if (toSnap) recs.push({ tag: 't', name: toSnap });
  recs.push({ tag: 's', size: to.length });
  for (let off = 0; off < to.length; off += 4096) {
    const a = from.subarray(off, off + 4096);
    const b = to.subarray(off, off + 4096);
    if (a.equals(b)) continue;
    if (b.every((x) => x === 0)) recs.push({ tag: 'z', offset: off, length: 4096 });
    else recs.push({ tag: 'w', offset: off, data: Buffer.from(b) });
  }
  recs.push({ tag: 'e' });
  return recs;
}

function mutate(b: Buffer, seed: number): Buffer {
  const rnd = prng(seed);
  const out = Buffer.from(b);
  for (let i = 0; i < 40; i++) {
    const off = Math.floor(rnd() * (VOL / 4096)) * 4096;
    if (rnd() < 0.3) out.fill(0, off, off + 4096 * (1 + Math.floor(rnd() * 8)));
    else randomBytes(4096).copy(out, off);
  }
  return out.subarray(0, VOL);
}

async function readExport(uri: string): Promise<Buffer> {
  const c = await NbdClient.connect(uri);
  try {
    const b = Buffer.alloc(c.size);
    await c.read(0, b);
    return b;
  } finally {
    await c.close();
  }
}

async function cli(args: string[]) {
  return exec(process.execPath, [CLI, ...args], { timeoutMs: 120_000 });
}

t.test('diff apply: offline volume with snapshots, a chain a -> b -> c', async (t) => {
  const dir = makeTempDir('nbd-rbddiff-vol-');
  const image = path.join(dir, 'disk.img');
  const s0 = makeImage(image, 11);
  t.equal((await cli(['snapshot', 'create', image, 'a'])).code, 0, 'snapshot a (offline)');
  const s1 = mutate(s0, 12);
  const s2 = mutate(s1, 13);
  const d1 = path.join(dir, 'a-b.diff');
  const d2 = path.join(dir, 'b-c.diff');
  fs.writeFileSync(d1, encodeModel(recordsBetween(s0, s1, 'a', 'b')).bytes);
  fs.writeFileSync(d2, encodeModel(recordsBetween(s1, s2, 'b', 'c')).bytes);

  // Out of order: b -> c needs snapshot b, which does not exist yet.
  let r = await runDiffApply([image], d2);
  t.equal(r.code, 35, `b -> c before a -> b: DIFF_MISMATCH (exit 35): ${r.stderr.trim()}`);
  t.match(r.stderr, /DIFF_MISMATCH/);
  t.ok(fs.readFileSync(image).equals(s0), 'nothing written');

  r = await runDiffApply([image, '--json'], d1); // stdin
  t.equal(r.code, 0, `a -> b applied from stdin: ${r.stderr}`);
  const sum = JSON.parse(r.stdout) as { createdSnapshot: string; fromSnap: string };
  t.same([sum.fromSnap, sum.createdSnapshot], ['a', 'b'], 'snapshot b created');
  t.ok(fs.readFileSync(image).equals(s1), 'the image is b');

  r = await runDiffApply([image, '--file', d1], null);
  t.equal(r.code, 9, `a -> b again: snapshot b exists (SNAPSHOT_EXISTS, exit 9): ${r.stderr.trim()}`);
  r = await runDiffApply([image, '--file', d2], null);
  t.equal(r.code, 0, `b -> c applied from --file: ${r.stderr}`);
  t.ok(fs.readFileSync(image).equals(s2), 'the image is c');

  // Snapshots are exact: they were written through the copy-on-write path.
  const srv = await serverFor(t, { images: [image], dir });
  t.ok((await readExport(srv.uri('disk@a'))).equals(s0), 'disk@a still reads a');
  t.ok((await readExport(srv.uri('disk@b'))).equals(s1), 'disk@b reads b');
  t.ok((await readExport(srv.uri('disk@c'))).equals(s2), 'disk@c reads c');
});

t.test('diff apply: online, through the serving server', async (t) => {
  const dir = makeTempDir('nbd-rbddiff-online-');
  const image = path.join(dir, 'disk.img');
  const s0 = makeImage(image, 21);
  const srv = await serverFor(t, { images: [image], dir });
  t.equal((await cli(['snapshot', 'create', image, 'a'])).code, 0, 'snapshot a (online)');
  const s1 = mutate(s0, 22);
  const d1 = path.join(dir, 'a-b.diff');
  fs.writeFileSync(d1, encodeModel(recordsBetween(s0, s1, 'a', 'b')).bytes);
  // A size mismatch is refused before any write.
  const dBig = path.join(dir, 'big.diff');
  fs.writeFileSync(dBig, encodeModel([{ tag: 's', size: VOL * 2 }, { tag: 'z', offset: 0, length: 4096 }, { tag: 'e' }]).bytes);
  let r = await runDiffApply([image], dBig);
  t.equal(r.code, 35, `size mismatch: DIFF_MISMATCH: ${r.stderr.trim()}`);
  // A truncated stream: DIFF_FORMAT_INVALID, no snapshot created.
  const dCut = path.join(dir, 'cut.diff');
  fs.writeFileSync(dCut, fs.readFileSync(d1).subarray(0, 200));
  r = await runDiffApply([image], dCut);
  t.equal(r.code, 34, `truncated: DIFF_FORMAT_INVALID (exit 34): ${r.stderr.trim()}`);

  r = await runDiffApply([image], d1);
  t.equal(r.code, 0, `applied online: ${r.stderr}`);
  t.ok((await readExport(srv.uri('disk'))).equals(s1), 'the live export reads b');
  t.ok((await readExport(srv.uri('disk@a'))).equals(s0), 'disk@a still reads a');
  t.ok((await readExport(srv.uri('disk@b'))).equals(s1), 'disk@b created by the apply');
  const list = await cli(['snapshot', 'list', image, '--json']);
  t.same((JSON.parse(list.stdout) as { name: string }[]).map((s) => s.name), ['a', 'b']);

  // Also through an explicit NBD URI (no snapshot handling there).
  const s2 = mutate(s1, 23);
  const d2 = path.join(dir, 'b-c.diff');
  fs.writeFileSync(d2, encodeModel(recordsBetween(s1, s2, 'nonexistent', 'c')).bytes);
  r = await runDiffApply([srv.uri('disk')], d2);
  t.equal(r.code, 0, `applied to an nbd+unix URI: ${r.stderr}`);
  t.ok((await readExport(srv.uri('disk'))).equals(s2), 'the live export reads c');
});

t.test('diff apply: the NBD address of a serving server', async (t) => {
  t.equal(nbdUriFor([{ kind: 'tcp', host: '0.0.0.0', port: 10809 }, { kind: 'unix', path: '/run/x y.sock' }], 'disk'), 'nbd+unix:///disk?socket=%2Frun%2Fx%20y.sock', 'a unix socket first');
  t.equal(nbdUriFor([{ kind: 'tcp', host: '0.0.0.0', port: 10809 }], 'd@a'), 'nbd://127.0.0.1:10809/d%40a', 'the wildcard address through loopback');
  t.equal(nbdUriFor([{ kind: 'tcp', host: '::', port: 1 }], 'd'), 'nbd://[::1]:1/d');
  t.equal(nbdUriFor([{ kind: 'tcp', host: '192.0.2.1', port: 2 }], 'd'), 'nbd://192.0.2.1:2/d');
  t.equal(nbdUriFor([], 'd'), null, 'no listener (attach only)');
});

// The whole user path: `diff IMAGE --from a --to b --format rbd` (change map
// from the server's own bitmaps, bytes read from disk@b) piped into
// `diff apply` on a copy at snapshot a. Online (the source is served) and
// offline (the source is not), each with writes, zeroes and a TRIM between
// the snapshots.
for (const mode of ['online', 'offline'] as const) {
  t.test(`diff --format rbd | diff apply: a copy at a becomes b (${mode})`, async (t) => {
    const dir = makeTempDir('nbd-rbddiff-e2e-');
    const image = path.join(dir, 'disk.img');
    const s0 = makeImage(image, 31);
    t.equal((await cli(['snapshot', 'create', image, 'a'])).code, 0, 'snapshot a');
    const replica = path.join(dir, 'replica.img');
    fs.writeFileSync(replica, s0);
    t.equal((await cli(['snapshot', 'create', replica, 'a'])).code, 0, 'the replica has a too');
    const srv = await serverFor(t, { images: [image], dir });
    const c = await NbdClient.connect(srv.uri('disk'));
    const s1 = Buffer.from(s0);
    for (const [off, len] of [[0, 70_000], [1_500_000, 4096], [VOL - 10_000, 10_000]] as const) {
      const d = randomBytes(len);
      await c.write(off, d);
      d.copy(s1, off);
    }
    await c.zero(2 * 1024 * KiB, 256 * KiB);
    s1.fill(0, 2 * 1024 * KiB, 2 * 1024 * KiB + 256 * KiB);
    await c.flush();
    await c.close();
    t.equal((await cli(['snapshot', 'create', image, 'b'])).code, 0, 'snapshot b');
    if (mode === 'offline') await srv.stop();

    const d = path.join(dir, 'a-b.rbd');
    const out = fs.openSync(d, 'w');
    const r0 = await new Promise<number | null>((resolve, reject) => {
      const p = spawn(process.execPath, [CLI, 'diff', image, '--from', 'a', '--to', 'b', '--format', 'rbd'], { stdio: ['ignore', out, 'pipe'] });
      p.on('error', reject);
      p.on('close', resolve);
    });
    fs.closeSync(out);
    t.equal(r0, 0, 'diff --format rbd exits 0');
    // Only what changed travels: well under the volume's size.
    t.ok(fs.statSync(d).size < 200 * KiB, `the stream holds the changes only (${fs.statSync(d).size} bytes)`);
    const r = await runDiffApply([replica, '--file', d, '--json'], null);
    t.equal(r.code, 0, `diff apply: ${r.stderr}`);
    t.ok(fs.readFileSync(replica).equals(s1), 'the replica reads b');
    const list = await cli(['snapshot', 'list', replica, '--json']);
    t.same((JSON.parse(list.stdout) as { name: string }[]).map((s) => s.name), ['a', 'b'], 'the replica has snapshot b');
  });
}
