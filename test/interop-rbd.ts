// Interop with the real Ceph tools (ceph-common's rbd, a single-node cluster
// from test/fixtures/ceph-rbd.ts):
//   (a) our stream (writeRbdDiff) -> `rbd import-diff` into an RBD image ->
//       `rbd export` equals the bytes we meant, full and incremental, and rbd
//       checks our 'f' and creates our 't' snapshot;
//   (b) `rbd export-diff` (full, and --from-snap) -> our `diff apply` on a
//       raw image -> bytes equal `rbd export` of the same snapshot, with
//       changes made by rbd itself (rbd bench writes) and by zeroing.
import t from 'tap';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { randomBytes } from 'node:crypto';
import { FileChunkSource, type ChunkRun } from '../src/backup/source';
import { writeRbdDiff } from '../src/diff';
import { startCephRbd } from './fixtures/ceph-rbd';
import { decodeModel, prng, runDiffApply } from './fixtures/diff-stream';
import { tempDirs } from './fixtures/server';

const KiB = 1024;
const MiB = 1024 * KiB;
const CHUNK = 64 * KiB;
// Not a multiple of the chunk or of rbd's 4 MiB objects: a short last chunk.
const SIZE = 6 * MiB + 12 * KiB;
const makeTempDir = tempDirs(t);

async function diffFile(file: string, image: string, runs: ChunkRun[] | undefined, fromSnap: string | null, toSnap: string | null): Promise<void> {
  const src = await FileChunkSource.open(image, { chunkSize: CHUNK, runs });
  const out = fs.createWriteStream(file);
  try {
    await writeRbdDiff(src, out, { fromSnap, toSnap });
  } finally {
    await src.close();
    await new Promise<void>((resolve, reject) => out.end((err?: Error | null) => (err ? reject(err) : resolve())));
  }
}

function tags(file: string): string {
  return [...new Set(decodeModel(fs.readFileSync(file)).map((r) => r.tag))].sort().join('');
}

t.test('rbd import-diff and export-diff against our stream', async (t) => {
  const ceph = await startCephRbd(t);
  if (!ceph) return;
  const dir = makeTempDir('nbd-interop-rbd-');
  const rnd = prng(5);

  // s0: data, holes and a data tail in the short last chunk.
  const s0 = Buffer.alloc(SIZE);
  for (let off = 0; off < SIZE; off += CHUNK) if (rnd() < 0.5) randomBytes(Math.min(CHUNK, SIZE - off)).copy(s0, off);
  s0[SIZE - 1] = 0x5a;
  const f0 = path.join(dir, 's0.raw');
  fs.writeFileSync(f0, s0);

  // (a) full diff ending at snapshot a, into an image of another size (import-diff resizes to 's').
  await ceph.rbd(['create', '--size', '1', 'rbd/img']);
  const full = path.join(dir, 'full-a.diff');
  await diffFile(full, f0, undefined, null, 'a');
  t.equal(tags(full), 'estwz', 'the full diff has t, s, w, z and e records');
  await ceph.rbd(['import-diff', '--no-progress', full, 'rbd/img']);
  const out = path.join(dir, 'out.raw');
  await ceph.rbd(['export', '--no-progress', 'rbd/img@a', out]);
  t.ok(fs.readFileSync(out).equals(s0), 'rbd import-diff of our full diff: img@a equals s0');

  // s1: changed chunks (new data, zeroed chunks the source reports as zero runs, zeroed chunks it reads).
  const s1 = Buffer.from(s0);
  const changed: ChunkRun[] = [];
  const chunks = Math.ceil(SIZE / CHUNK);
  for (let c = 0; c < chunks; c++) {
    const off = c * CHUNK;
    const len = Math.min(CHUNK, SIZE - off);
    const r = rnd();
    if (r < 0.2) {
      randomBytes(len).copy(s1, off);
      changed.push({ start: c, count: 1 });
    } else if (r < 0.3) {
      s1.fill(0, off, off + len);
      changed.push({ start: c, count: 1, zero: true });
    } else if (r < 0.4) {
      s1.fill(0, off, off + len);
      changed.push({ start: c, count: 1 });
    }
  }
  changed.push({ start: chunks - 1, count: 1 }); // the short last chunk
  randomBytes(SIZE - (chunks - 1) * CHUNK).copy(s1, (chunks - 1) * CHUNK);
  const uniq = changed.sort((x, y) => x.start - y.start).filter((r, i, a) => i === 0 || a[i - 1]!.start !== r.start);
  const f1 = path.join(dir, 's1.raw');
  fs.writeFileSync(f1, s1);
  const inc = path.join(dir, 'a-b.diff');
  await diffFile(inc, f1, uniq, 'a', 'b');
  t.equal(tags(inc), 'efstwz', 'the incremental has f, t, s, w, z and e records');

  // rbd checks our 'f': an image without snapshot a refuses the incremental.
  await ceph.rbd(['create', '--size', '1', 'rbd/other']);
  const refused = await ceph.rbdTry(['import-diff', '--no-progress', inc, 'rbd/other']);
  t.not(refused.code, 0, `rbd import-diff refuses our a->b on an image without snapshot a: ${refused.stderr.trim()}`);
  t.match(refused.stderr, /start snapshot 'a' does not exist/);

  await ceph.rbd(['import-diff', '--no-progress', inc, 'rbd/img']);
  await ceph.rbd(['export', '--no-progress', 'rbd/img@b', out + '.b']);
  t.ok(fs.readFileSync(out + '.b').equals(s1), 'rbd import-diff of our incremental: img@b equals s1');
  await ceph.rbd(['export', '--no-progress', 'rbd/img@a', out + '.a']);
  t.ok(fs.readFileSync(out + '.a').equals(s0), 'img@a is still s0');

  // (b) rbd export-diff -> our diff apply, on a raw image of ours.
  const ours = path.join(dir, 'ours.img');
  // A diff without 'f' is relative to an all-zero image (rbd export-diff leaves out what was never
  // written): apply it to a new, sparse image, as rbd import-diff expects a new image.
  fs.writeFileSync(ours, '');
  fs.truncateSync(ours, SIZE);
  const rFull = path.join(dir, 'rbd-full-a.diff');
  await ceph.rbd(['export-diff', '--no-progress', 'rbd/img@a', rFull]);
  let r = await runDiffApply([ours, '--file', rFull], null);
  t.equal(r.code, 0, `our diff apply of rbd's full diff: ${r.stderr}`);
  t.ok(fs.readFileSync(ours).equals(s0), 'our image equals rbd img@a');

  const rInc = path.join(dir, 'rbd-a-b.diff');
  await ceph.rbd(['export-diff', '--no-progress', '--from-snap', 'a', 'rbd/img@b', rInc]);
  t.match(tags(rInc), /z/, `rbd's a->b diff has zero records (${tags(rInc)})`);
  r = await runDiffApply([ours], rInc);
  t.equal(r.code, 0, `our diff apply of rbd's a->b (stdin): ${r.stderr}`);
  t.ok(fs.readFileSync(ours).equals(s1), 'our image equals rbd img@b');

  // Changes made by rbd itself: random 4 KiB writes (rbd bench), then snapshot c.
  await ceph.rbd(['bench', '--io-type', 'write', '--io-size', '4096', '--io-threads', '1', '--io-total', '256K', '--io-pattern', 'rand', 'rbd/img']);
  await ceph.rbd(['snap', 'create', 'rbd/img@c']);
  const rInc2 = path.join(dir, 'rbd-b-c.diff');
  await ceph.rbd(['export-diff', '--no-progress', '--from-snap', 'b', 'rbd/img@c', rInc2]);
  // Its 'f' must name a snapshot our image has: b was created by the last apply.
  r = await runDiffApply([ours, '--file', rInc2, '--json'], null);
  t.equal(r.code, 0, `our diff apply of rbd's b->c: ${r.stderr}`);
  await ceph.rbd(['export', '--no-progress', 'rbd/img@c', out + '.c']);
  const sc = fs.readFileSync(out + '.c');
  t.notOk(sc.equals(s1), 'rbd bench changed the image');
  t.ok(fs.readFileSync(ours).equals(sc), 'our image equals rbd img@c');
  t.equal((JSON.parse(r.stdout) as { createdSnapshot: string }).createdSnapshot, 'c', 'and has snapshot c');
});
