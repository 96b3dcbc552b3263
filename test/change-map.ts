// Change maps (src/change-map.ts, native/core/change_map.hh): the chunks that
// may differ between snapshot A and snapshot B, or between A and the live
// volume, checked against the exports' bytes and a reference model.
//
// The rules under test (docs/architecture.md, "Change maps"):
//   - cover: every chunk whose content differs between A and B (or live) is
//     reported, after random writes, TRIMs and WRITE_ZEROES between
//     snapshots, snapshot deletes (hand-down), a finished rollback, first
//     writes still queued in the journal (the server runs with
//     NBD_TEST_FIRST_WRITE_BATCH so they stay queued until something waits),
//     and a rollback still merging (--merge-rate keeps it pending);
//   - tight: the reported set is at most 1.1x the chunks the model saw
//     written in the interval (a rollback counts as writing every chunk
//     changed since its target);
//   - the same online (control socket) and offline (volume opened by the CLI);
//   - refusals with stable codes: unknown names, A not older than B, a failed
//     A or B (with the reason); failed snapshots between A and B are fine;
//   - the volume ChunkSource (src/backup/volume-source.ts) lists the same runs
//     and reads disk@SNAP, online and offline.
// The seed is printed; NBD_TEST_SEED=<seed> replays a run.
import t, { type Test } from 'tap';
import * as crypto from 'node:crypto';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { openVolumeSource } from '../src/backup/volume-source';
import type { ChunkRun } from '../src/backup/source';
import { exec, type ExecResult } from './fixtures/exec';
import { readExport } from './fixtures/export-io';
import { NBD, RawClient } from './fixtures/raw-client';
import { CLI, makeTempDir, removeDir, startServer, type RunningServer } from './fixtures/server';
import { baseSeed, jobsJson, Rng } from './fixtures/snapshot-model';
import { ballast, smallFs } from './fixtures/small-fs';
import { requireTools, SYSTEM_PYTHON } from './fixtures/tools';
import { ChangeModel } from './fixtures/change-model';

const KiB = 1024;
const MiB = 1024 * KiB;
const SIZE = 8 * MiB;
const CHUNK = 16 * KiB; // the default chunk size
const SEED = baseSeed();
t.comment(`change-map seed ${SEED} (replay: NBD_TEST_SEED=${SEED} node tools/run-tests.js test/change-map.ts)`);

function cli(args: string[]): Promise<ExecResult> {
  return exec(process.execPath, [CLI, ...args], { timeoutMs: 120_000 });
}

async function ok(t: Test, args: string[]): Promise<ExecResult> {
  const r = await cli(args);
  t.equal(r.code, 0, `${args.join(' ')}${r.code ? `: ${r.stderr.trim()}` : ''}`);
  return r;
}

interface DiffJson {
  from: string;
  to: string | null;
  size: number;
  chunkSize: number;
  runs: { offset: number; length: number }[];
}

/** `diff IMAGE --from A [--to B] --format json`, parsed. */
async function diff(image: string, from: string, to: string | null): Promise<DiffJson> {
  const r = await cli(['diff', image, '--from', from, ...(to ? ['--to', to] : []), '--format', 'json']);
  if (r.code !== 0) throw new Error(`diff ${from}..${to ?? 'live'}: exit ${r.code}: ${r.stderr.trim()}`);
  return JSON.parse(r.stdout) as DiffJson;
}

function chunksOfRuns(d: DiffJson): Set<number> {
  const s = new Set<number>();
  for (const r of d.runs) for (let c = r.offset / d.chunkSize; c * d.chunkSize < r.offset + r.length; c++) s.add(c);
  return s;
}

/** Chunks whose bytes differ between two images of the volume. */
function differing(a: Buffer, b: Buffer): number[] {
  const out: number[] = [];
  for (let c = 0; c * CHUNK < a.length; c++) {
    const s = c * CHUNK;
    if (!a.subarray(s, s + CHUNK).equals(b.subarray(s, s + CHUNK))) out.push(c);
  }
  return out;
}

function chunkRange(off: number, len: number): number[] {
  const out: number[] = [];
  for (let c = Math.floor(off / CHUNK); c <= Math.floor((off + len - 1) / CHUNK); c++) out.push(c);
  return out;
}

async function readAll(srv: RunningServer, name: string): Promise<Buffer> {
  const r = await readExport(srv.socket, name, 0, SIZE);
  if (r.error) throw new Error(`reading ${name}: NBD error ${r.error}`);
  return r.data!;
}

/** Random writes, TRIMs and WRITE_ZEROES through one connection, with no FLUSH (first writes stay queued). */
async function randomOps(srv: RunningServer, rng: Rng, model: ChangeModel, n: number): Promise<void> {
  const touched = new Set<number>();
  const c = await RawClient.connect(srv.socket);
  try {
    await c.go('disk');
    for (let k = 0; k < n; k++) {
      const kind = rng.weighted({ write: 6, trim: 2, zero: 2 });
      const len = rng.chance(0.3) ? rng.int(1, 4 * KiB) : rng.int(4 * KiB, 96 * KiB);
      const off = rng.int(0, SIZE - len);
      let r;
      if (kind === 'write') {
        r = await c.write(off, crypto.createHash('shake256', { outputLength: len }).update(String(rng.u32())).digest());
      } else if (kind === 'trim') r = await c.cmd(NBD.CMD_TRIM, 0, off, len);
      else r = await c.cmd(NBD.CMD_WRITE_ZEROES, rng.chance(0.5) ? NBD.CMD_FLAG_NO_HOLE : 0, off, len);
      if (r.error) throw new Error(`${kind} ${off}+${len}: NBD error ${r.error}`);
      for (const ch of chunkRange(off, len)) touched.add(ch);
    }
  } finally {
    await c.disconnect();
  }
  model.events.push(touched);
}

/**
 * Checks every pair of `snaps` (older first) and every snapshot against live:
 * the map covers the differing chunks and is at most 1.1x the model's.
 */
async function checkAll(t: Test, how: string, image: string, snaps: string[], content: Map<string, Buffer>, model: ChangeModel): Promise<void> {
  const pairs: [string, string | null][] = [];
  for (let i = 0; i < snaps.length; i++) {
    for (let j = i + 1; j < snaps.length; j++) pairs.push([snaps[i]!, snaps[j]!]);
    pairs.push([snaps[i]!, null]);
  }
  for (const [a, b] of pairs) {
    const d = await diff(image, a, b);
    const reported = chunksOfRuns(d);
    const changed = differing(content.get(a)!, content.get(b ?? 'live')!);
    const missed = changed.filter((c) => !reported.has(c));
    const written = model.written(a, b);
    const label = `${how} ${a}..${b ?? 'live'}`;
    t.same(missed, [], `${label}: covers the ${changed.length} chunks that differ (reported ${reported.size}, written ${written.size})`);
    t.ok(reported.size <= 1.1 * written.size, `${label}: ${reported.size} reported <= 1.1 x ${written.size} written`);
    t.same([d.from, d.to, d.size, d.chunkSize], [a, b, SIZE, CHUNK], `${label}: header`);
  }
}

t.test('reference model: writes, TRIMs, zeroes, deletes, rollbacks, queued first writes; online and offline', async (t) => {
  const rng = new Rng(SEED);
  const dir = makeTempDir('nbd-changemap-');
  t.teardown(() => removeDir(dir));
  const image = path.join(dir, 'disk.img');
  const env = { NBD_TEST_FIRST_WRITE_BATCH: '1000000' }; // first writes stay queued until something waits for them
  let srv: RunningServer | undefined = await startServer({ dir, images: [image], size: '8M', env });
  t.teardown(() => srv?.stop('SIGKILL'));
  const model = new ChangeModel();
  const ops = () => randomOps(srv!, rng, model, rng.int(8, 20));
  const snap = async (name: string) => {
    await ok(t, ['snapshot', 'create', image, name]);
    model.snapshot(name);
  };

  await ops();
  await snap('s0');
  await ops();
  await snap('s1');
  await ops();
  await snap('s2');
  await ops();
  await ok(t, ['snapshot', 'delete', image, 's1']); // hand-down into s0
  await snap('s3');
  await ops();
  await ok(t, ['rollback', image, 's0']);
  model.rollback('s0');
  await jobsJson(image, true); // the merge finishes before the next snapshot (create is refused while it runs)
  await ops();
  await snap('s4');
  await ops();
  await snap('s5');
  await ops();
  await ok(t, ['snapshot', 'delete', image, 's3']); // a newer one: hand-down into s2
  await ops(); // queued: no FLUSH after these
  const snaps = ['s0', 's2', 's4', 's5'];
  // Nothing below waits for the first-write thread until checkAll is done
  // (no FLUSH, no info or list, which settle): the last ops stay queued.
  const content = new Map<string, Buffer>();
  for (const s of snaps) content.set(s, await readAll(srv, `disk@${s}`));
  content.set('live', await readAll(srv, 'disk'));
  await checkAll(t, 'online', image, snaps, content, model);

  // The volume source: the same runs, and the snapshot's bytes.
  await checkSource(t, 'online', image, 's2', 's5', content);

  t.equal(await srv.stop(), 0, 'server stops cleanly');
  srv = undefined;
  t.ok(fs.readFileSync(image).equals(content.get('live')!), 'the queued writes reached the image at stop');
  await checkAll(t, 'offline', image, snaps, content, model);
  await checkSource(t, 'offline', image, 's2', 's5', content);

  // A rollback still merging: live shows s0 where chunks are pending.
  srv = await startServer({ dir, images: [image], args: ['--merge-rate', '16K'], env });
  await ok(t, ['rollback', image, 's0']);
  model.rollback('s0');
  content.set('live', await readAll(srv, 'disk'));
  t.ok(content.get('live')!.equals(content.get('s0')!), 'live reads as s0');
  await checkAll(t, 'online, merging', image, snaps, content, model);
  const jobs = await jobsJson(image);
  t.comment(`merge after the checks: ${JSON.stringify(jobs)}`);
  t.equal(await srv.stop(), 0, 'server stops cleanly');
  srv = undefined;
  await checkAll(t, 'offline, merge pending', image, snaps, content, model);
});

/** openVolumeSource(image, {snapshot: to, since: from}): the diff's runs, and reads equal to the export. */
async function checkSource(t: Test, how: string, image: string, from: string, to: string, content: Map<string, Buffer>): Promise<void> {
  const d = await diff(image, from, to);
  const src = await openVolumeSource(image, { snapshot: to, since: from });
  try {
    const runs: ChunkRun[] = [];
    for await (const r of src.changedRuns()) runs.push(r);
    t.same(
      runs.map((r) => ({ offset: r.start * CHUNK, length: Math.min((r.start + r.count) * CHUNK, SIZE) - r.start * CHUNK })),
      d.runs,
      `${how} source ${from}..${to}: the diff's runs`,
    );
    t.same([src.size, src.chunkSize, src.snapshot], [SIZE, CHUNK, to], `${how} source: geometry and snapshot`);
    let same = true;
    for (const r of runs) {
      const buf = Buffer.alloc(Math.min((r.start + r.count) * CHUNK, SIZE) - r.start * CHUNK);
      await src.read(r.start * CHUNK, buf);
      if (!buf.equals(content.get(to)!.subarray(r.start * CHUNK, r.start * CHUNK + buf.length))) same = false;
    }
    t.ok(same, `${how} source: reads equal disk@${to}`);
  } finally {
    await src.close();
  }
  const full = await openVolumeSource(image, { snapshot: to, since: null });
  try {
    const runs: ChunkRun[] = [];
    for await (const r of full.changedRuns()) runs.push(r);
    t.same(runs, [{ start: 0, count: SIZE / CHUNK }], `${how} full source: every chunk`);
    const buf = Buffer.alloc(SIZE);
    await full.read(0, buf);
    t.ok(buf.equals(content.get(to)!), `${how} full source reads disk@${to}`);
  } finally {
    await full.close();
  }
}

t.test('refusals: unknown names, A not older than B; online and offline', async (t) => {
  const dir = makeTempDir('nbd-changemap-err-');
  t.teardown(() => removeDir(dir));
  const image = path.join(dir, 'disk.img');
  let srv: RunningServer | undefined = await startServer({ dir, images: [image], size: '4M' });
  t.teardown(() => srv?.stop('SIGKILL'));
  await ok(t, ['snapshot', 'create', image, 'a']);
  await ok(t, ['snapshot', 'create', image, 'b']);
  for (const how of ['online', 'offline']) {
    if (how === 'offline') {
      t.equal(await srv!.stop(), 0, 'server stops');
      srv = undefined;
    }
    const cases: [string[], number, string][] = [
      [['--from', 'nope'], 8, 'SNAPSHOT_NOT_FOUND'],
      [['--from', 'a', '--to', 'nope'], 8, 'SNAPSHOT_NOT_FOUND'],
      [['--from', 'b', '--to', 'a'], 32, 'CHANGES_RANGE_INVALID'],
      [['--from', 'a', '--to', 'a'], 32, 'CHANGES_RANGE_INVALID'],
    ];
    for (const [args, code, name] of cases) {
      const r = await cli(['diff', image, ...args]);
      t.equal(r.code, code, `${how} diff ${args.join(' ')}: exit ${code}`);
      t.match(r.stderr, name, `${how}: ${name}`);
    }
    const r = await cli(['diff', image, '--from', 'a', '--format', 'xml']);
    t.not(r.code, 0, `${how}: an unknown format fails`);
    t.match(r.stderr, 'BAD_ARGUMENT', `${how}: an unknown format is BAD_ARGUMENT`);
  }
});

t.test('a failed snapshot: refused as A or B with its reason; one between A and B leaves the union exact', async (t) => {
  // 32 MiB filesystem: image 8, A up to 8; X gets 1 MiB (ballast) and fails.
  const mnt = await smallFs(t, 32);
  if (!mnt) return;
  const image = path.join(mnt.dir, 'disk.img');
  const p0 = crypto.randomBytes(SIZE);
  fs.writeFileSync(image, p0); // fully allocated: the image never needs a new block
  let srv: RunningServer | undefined = await startServer({ dir: mnt.dir, images: [image] });
  t.teardown(() => srv?.stop('SIGKILL'));
  const write = async (off: number, data: Buffer) => {
    const c = await RawClient.connect(srv!.socket);
    try {
      await c.go('disk');
      for (let o = 0; o < data.length; o += 256 * KiB) {
        const r = await c.write(off + o, data.subarray(o, Math.min(o + 256 * KiB, data.length)));
        if (r.error) throw new Error(`write: NBD error ${r.error}`);
      }
      await c.cmd(NBD.CMD_FLUSH, 0, 0, 0);
    } finally {
      await c.disconnect();
    }
  };
  await ok(t, ['snapshot', 'create', image, 'A']);
  await write(0, crypto.randomBytes(4 * MiB)); // A holds the first half
  await ok(t, ['snapshot', 'create', image, 'X']);
  const ball = ballast(mnt.dir, 1 * MiB);
  await write(0, crypto.randomBytes(4 * MiB)); // X fills up and fails; A holds every chunk X lost, so A stays healthy
  fs.rmSync(ball);
  // Written after X failed: preserved into the nearest older healthy snapshot, A.
  await write(6 * MiB, crypto.randomBytes(256 * KiB));
  await ok(t, ['snapshot', 'create', image, 'B']);
  await write(7 * MiB, crypto.randomBytes(64 * KiB));
  const list = JSON.parse((await ok(t, ['snapshot', 'list', image, '--json'])).stdout) as { name: string; state: string; failure?: { reason: string } }[];
  t.same(list.map((s) => [s.name, s.state]), [['A', 'active'], ['X', 'failed'], ['B', 'active']], 'X failed, A and B are healthy');
  const a = await readAll(srv, 'disk@A');
  const b = await readAll(srv, 'disk@B');
  const live = await readAll(srv, 'disk');
  t.ok(a.equals(p0), 'A is exact');
  for (const how of ['online', 'offline']) {
    if (how === 'offline') {
      t.equal(await srv!.stop(), 0, 'server stops');
      srv = undefined;
    }
    const ab = chunksOfRuns(await diff(image, 'A', 'B'));
    const ab_changed = differing(a, b);
    t.same(ab_changed.filter((c) => !ab.has(c)), [], `${how} A..B covers the ${ab_changed.length} chunks that differ, past the failed X`);
    t.ok(ab.has((6 * MiB) / CHUNK), `${how}: a chunk written after X failed is in A's map`);
    const al = chunksOfRuns(await diff(image, 'A', null));
    t.same(differing(a, live).filter((c) => !al.has(c)), [], `${how} A..live covers the differing chunks`);
    for (const [from, to] of [['X', 'B'], ['A', 'X'], ['X', null]] as [string, string | null][]) {
      const r = await cli(['diff', image, '--from', from, ...(to ? ['--to', to] : [])]);
      t.equal(r.code, 33, `${how} ${from}..${to ?? 'live'}: exit 33`);
      t.match(r.stderr, /CHANGES_UNAVAILABLE/, `${how} ${from}..${to ?? 'live'}: CHANGES_UNAVAILABLE`);
      t.match(r.stderr, /space|ENOSPC/i, `${how} ${from}..${to ?? 'live'}: with the failure's reason`);
    }
  }
});

t.test('TRIM and WRITE_ZEROES (with and without NO_HOLE) mark their chunks like writes; a refused FAST_ZERO marks none', async (t) => {
  const dir = makeTempDir('nbd-changemap-zero-');
  t.teardown(() => removeDir(dir));
  const image = path.join(dir, 'disk.img');
  const p0 = crypto.randomBytes(SIZE);
  fs.writeFileSync(image, p0);
  // Inline preservation (no journal) and through the first-write queue.
  for (const [how, args] of [['inline', ['--cow-journal', '0']], ['queued', []]] as [string, string[]][]) {
    const srv = await startServer({ dir, images: [image], args });
    try {
      await ok(t, ['snapshot', 'create', image, `${how}-a`]);
      const c = await RawClient.connect(srv.socket);
      const expect = new Set<number>();
      try {
        await c.go('disk');
        const fast = await c.cmd(NBD.CMD_WRITE_ZEROES, NBD.CMD_FLAG_FAST_ZERO, 40 * CHUNK, CHUNK);
        t.not(fast.error, 0, `${how}: a FAST_ZERO that would have to preserve is refused`);
        const reqs: [number, number, number, number][] = [
          [NBD.CMD_TRIM, 0, 3 * CHUNK + 100, 2 * CHUNK],
          [NBD.CMD_WRITE_ZEROES, 0, 10 * CHUNK, 3 * CHUNK],
          [NBD.CMD_WRITE_ZEROES, NBD.CMD_FLAG_NO_HOLE, 20 * CHUNK + 5, 17],
        ];
        for (const [cmd, flags, off, len] of reqs) {
          const r = await c.cmd(cmd, flags, off, len);
          t.equal(r.error, 0, `${how}: request ${cmd} ${off}+${len}`);
          for (const ch of chunkRange(off, len)) expect.add(ch);
        }
      } finally {
        await c.disconnect();
      }
      const got = chunksOfRuns(await diff(image, `${how}-a`, null));
      t.same([...got].sort((x, y) => x - y), [...expect].sort((x, y) => x - y), `${how}: the map is exactly the trimmed and zeroed chunks`);
      await ok(t, ['snapshot', 'create', image, `${how}-b`]);
      const got2 = chunksOfRuns(await diff(image, `${how}-a`, `${how}-b`));
      t.same([...got2].sort((x, y) => x - y), [...expect].sort((x, y) => x - y), `${how}: and between the two snapshots`);
    } finally {
      t.equal(await srv.stop(), 0, 'server stops cleanly');
    }
  }
});

/** The dirty byte ranges a real client reports, merged. */
function mergeRanges(r: { offset: number; length: number }[]): { offset: number; length: number }[] {
  const out: { offset: number; length: number }[] = [];
  for (const x of r) {
    const last = out.at(-1);
    if (last && last.offset + last.length === x.offset) last.length += x.length;
    else out.push({ ...x });
  }
  return out;
}

t.test('NBD meta context qemu:dirty-bitmap:NAME: nbdinfo --map and qemu-img map x-dirty-bitmap read the change maps', async (t) => {
  if (!requireTools(t, ['nbdinfo', 'qemu-img', 'python3-libnbd'])) return;
  const rng = new Rng(SEED + 1);
  const dir = makeTempDir('nbd-changemap-meta-');
  t.teardown(() => removeDir(dir));
  const image = path.join(dir, 'disk.img');
  const srv = await startServer({ dir, images: [image], size: '8M', env: { NBD_TEST_FIRST_WRITE_BATCH: '1000000' } });
  t.teardown(() => srv.stop('SIGKILL'));
  const model = new ChangeModel();
  await ok(t, ['snapshot', 'create', image, 'a']);
  await randomOps(srv, rng, model, 12);
  await ok(t, ['snapshot', 'create', image, 'b']);
  await randomOps(srv, rng, model, 12); // still queued: live's map includes them
  const uri = (exp: string) => `nbd+unix:///${exp}?socket=${srv.socket}`;
  const env = { ...process.env, PATH: `/usr/bin:${process.env.PATH}` };

  const list = await exec('nbdinfo', ['--list', '--json', uri('')], { env });
  t.equal(list.code, 0, `nbdinfo --list: ${list.stderr.trim()}`);
  const exports = (JSON.parse(list.stdout) as { exports: { 'export-name': string; contexts?: string[] }[] }).exports;
  const ctx = (name: string) => exports.find((e) => e['export-name'] === name)?.contexts ?? [];
  t.same(ctx('disk'), ['base:allocation', 'qemu:dirty-bitmap:a', 'qemu:dirty-bitmap:b'], 'live offers a bitmap per snapshot');
  t.same(ctx('disk@b'), ['base:allocation', 'qemu:dirty-bitmap:a'], 'disk@b offers the older snapshot only');
  t.same(ctx('disk@a'), ['base:allocation'], 'disk@a offers none');

  for (const [exp, from, to] of [['disk', 'a', null], ['disk', 'b', null], ['disk@b', 'a', 'b']] as [string, string, string | null][]) {
    const want = mergeRanges((await diff(image, from, to)).runs);
    t.ok(want.length > 0, `${exp} since ${from}: something changed`);
    const m = await exec('nbdinfo', ['--json', `--map=qemu:dirty-bitmap:${from}`, uri(exp)], { env });
    t.equal(m.code, 0, `nbdinfo --map=qemu:dirty-bitmap:${from} ${exp}: ${m.stderr.trim()}`);
    const got = mergeRanges((JSON.parse(m.stdout) as { offset: number; length: number; type: number }[]).filter((e) => e.type & 1).map((e) => ({ offset: e.offset, length: e.length })));
    t.same(got, want, `nbdinfo: ${exp} dirty since ${from} = the change map`);
    const q = await exec(
      'qemu-img',
      ['map', '--output=json', '--image-opts', `driver=nbd,server.type=unix,server.path=${srv.socket},export=${exp},x-dirty-bitmap=qemu:dirty-bitmap:${from}`],
      { env },
    );
    t.equal(q.code, 0, `qemu-img map x-dirty-bitmap ${exp} ${from}: ${q.stderr.trim()}`);
    // With x-dirty-bitmap, qemu reports dirty extents as "data": false.
    const qgot = mergeRanges((JSON.parse(q.stdout) as { start: number; length: number; data: boolean }[]).filter((e) => !e.data).map((e) => ({ offset: e.start, length: e.length })));
    t.same(qgot, want, `qemu-img map: ${exp} dirty since ${from} = the change map`);
  }
  // BLOCK_STATUS over random unaligned windows (python-libnbd): each answer
  // equals the map clipped to the window (the native map works on a window
  // of bitmap words), and answers with REQ_ONE are one extent that starts it.
  {
    const want = (await diff(image, 'a', null)).runs;
    const windows: [number, number][] = [];
    for (let i = 0; i < 60; i++) {
      const len = rng.int(1, 3 * MiB);
      windows.push([rng.int(0, SIZE - len), len]);
    }
    const script = [
      'import json, sys, nbd',
      'h = nbd.NBD()',
      "h.add_meta_context('qemu:dirty-bitmap:a')",
      `h.connect_uri(${JSON.stringify(uri('disk'))})`,
      `out = []`,
      `for off, n in ${JSON.stringify(windows)}:`,
      '    for flags in (0, nbd.CMD_FLAG_REQ_ONE):',
      '        ext = []',
      '        def cb(ctx, o, e, err):',
      "            if ctx == 'qemu:dirty-bitmap:a': ext.extend(e)",
      '            return 0',
      '        h.block_status(n, off, cb, flags)',
      '        out.append(ext)',
      'print(json.dumps(out))',
    ].join('\n');
    const r = await exec(SYSTEM_PYTHON, ['-c', script]);
    t.equal(r.code, 0, `python-libnbd block status: ${r.stderr.trim().slice(-300)}`);
    const answers = JSON.parse(r.stdout) as number[][];
    let bad = '';
    windows.forEach(([off, len], i) => {
      const expect: { offset: number; length: number }[] = [];
      for (const x of want) {
        const a = Math.max(off, x.offset);
        const b = Math.min(off + len, x.offset + x.length);
        if (a < b) expect.push({ offset: a, length: b - a });
      }
      const full = answers[2 * i]!;
      const got: { offset: number; length: number }[] = [];
      let pos = off;
      for (let k = 0; k < full.length; k += 2) {
        if (full[k + 1]! & 1) got.push({ offset: pos, length: full[k]! });
        pos += full[k]!;
      }
      if (pos !== off + len && !bad) bad = `window ${off}+${len}: the extents cover ${pos - off} bytes`;
      if (JSON.stringify(mergeRanges(got)) !== JSON.stringify(expect) && !bad) bad = `window ${off}+${len}: ${JSON.stringify(got)} != ${JSON.stringify(expect)}`;
      const one = answers[2 * i + 1]!;
      const dirtyAtStart = expect.length > 0 && expect[0]!.offset === off;
      const oneLen = dirtyAtStart ? expect[0]!.length : (expect[0]?.offset ?? off + len) - off;
      if ((one.length !== 2 || one[0] !== oneLen || (one[1]! & 1) !== (dirtyAtStart ? 1 : 0)) && !bad) bad = `window ${off}+${len} REQ_ONE: ${JSON.stringify(one)}, expected [${oneLen}, ${dirtyAtStart ? 1 : 0}]`;
    });
    t.equal(bad, '', `BLOCK_STATUS over ${windows.length} unaligned windows, with and without REQ_ONE, equals the map`);
  }
  const bad = await exec('nbdinfo', ['--map=qemu:dirty-bitmap:b', uri('disk@b')], { env });
  t.not(bad.code, 0, 'disk@b has no bitmap of itself');
});
