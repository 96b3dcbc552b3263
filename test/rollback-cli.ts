// The rollback commands as users and scripts see them: `rollback`, `jobs`,
// `history`, `info`, `snapshot set|get ... auto-rollback`, `snapshot create
// --auto-rollback`; online (through a running server) and offline; the
// on-disconnect and on-start policies; exit codes and error codes of bad
// input; the merge job surviving a SIGKILL. Data is read back through NBD
// (raw client) and from the raw file.
import t, { type Test } from 'tap';
import * as crypto from 'node:crypto';
import * as fs from 'node:fs';
import * as path from 'node:path';
import type { HistoryEntry } from '../src/history';
import { exec, type ExecResult } from './fixtures/exec';
import { readExport, writeExport } from './fixtures/export-io';
import { RawClient } from './fixtures/raw-client';
import { CLI, makeTempDir, removeDir, startServer, type RunningServer } from './fixtures/server';

const KiB = 1024;
const MiB = 1024 * KiB;
const CHUNK = 16 * KiB; // the default chunk size

function cli(args: string[]): Promise<ExecResult> {
  return exec(process.execPath, [CLI, ...args], { timeoutMs: 120_000 });
}

function lastLine(s: string): string {
  return s.trimEnd().split('\n').at(-1) ?? '';
}

function expectOk(tt: Test, r: ExecResult, what: string): void {
  tt.equal(r.code, 0, `${what}: exit 0${r.code ? ` (stderr: ${lastLine(r.stderr)})` : ''}`);
}

function expectError(tt: Test, r: ExecResult, exit: number, code: string, what: string, message?: RegExp): void {
  tt.equal(r.code, exit, `${what}: exit ${exit} (stderr: ${lastLine(r.stderr)})`);
  tt.match(lastLine(r.stderr), new RegExp(`^node-nbd-server: error: .+ \\[${code}\\]$`), `${what}: [${code}]`);
  if (message) tt.match(lastLine(r.stderr), message, `${what}: the message says why`);
}

async function json<T>(tt: Test, args: string[], what: string): Promise<T> {
  const r = await cli([...args, '--json']);
  expectOk(tt, r, what);
  return JSON.parse(r.stdout) as T;
}


interface Job {
  type: string;
  snapshot: string;
  done: number;
  total: number;
  percent: number;
  trigger: string;
}

function dirs(): { dir: string; img: string } {
  const dir = makeTempDir('nbd-rollback-');
  t.teardown(() => removeDir(dir));
  return { dir, img: path.join(dir, 'disk.img') };
}

/** Fills `size` bytes of random data with a recognisable seed. */
function pattern(size: number): Buffer {
  return crypto.randomBytes(size);
}

async function readAll(socket: string, name: string, size: number): Promise<Buffer> {
  const r = await readExport(socket, name, 0, size);
  if (r.error || !r.data) throw new Error(`reading ${name} failed with errno ${r.error}`);
  return r.data;
}

async function serve(dir: string, img: string, args: string[] = []): Promise<RunningServer> {
  const srv = await startServer({ dir, images: [img], args });
  t.teardown(() => srv.stop('SIGKILL').catch(() => undefined));
  return srv;
}

/**
 * A served volume with snapshots a (content p0) and b (p1), and live content
 * p2. Each generation rewrites half the chunks at random, so the snapshots
 * differ from each other and from live in some chunks and not in others.
 */
async function threeGenerations(tt: Test, size: number, args: string[] = []) {
  const { dir, img } = dirs();
  const p0 = pattern(size);
  fs.writeFileSync(img, p0);
  const srv = await serve(dir, img, args);
  expectOk(tt, await cli(['snapshot', 'create', img, 'a']), 'create a');
  const change = (base: Buffer) => {
    const next = Buffer.from(base);
    const writes: [number, Buffer][] = [];
    for (let c = 0; c < size / CHUNK; c++) {
      if (Math.random() < 0.5) continue;
      const off = c * CHUNK + Math.floor(Math.random() * (CHUNK - 4 * KiB));
      const d = crypto.randomBytes(4 * KiB);
      d.copy(next, off);
      writes.push([off, d]);
    }
    return { next, writes };
  };
  const g1 = change(p0);
  tt.same((await writeExport(srv.socket, 'disk', g1.writes)).filter((e) => e !== 0), [], 'generation 1 written');
  expectOk(tt, await cli(['snapshot', 'create', img, 'b']), 'create b');
  const g2 = change(g1.next);
  tt.same((await writeExport(srv.socket, 'disk', g2.writes)).filter((e) => e !== 0), [], 'generation 2 written');
  return { dir, img, srv, p0, p1: g1.next, p2: g2.next };
}

async function waitNoJobs(tt: Test, img: string, what: string): Promise<void> {
  const r = await cli(['jobs', img, '--wait', '--json']);
  expectOk(tt, r, `${what}: jobs --wait`);
  tt.same(JSON.parse(r.stdout), [], `${what}: no job left`);
}

t.test('online rollback to an older snapshot: visible at once, merged, every snapshot exact; jobs, history, info, list', async (t) => {
  const size = 8 * MiB;
  const { img, srv, p0, p1, p2 } = await threeGenerations(t, size);
  t.ok((await readAll(srv.socket, 'disk', size)).equals(p2), 'setup: live holds generation 2');

  const before = Date.now();
  const r = await json<{ snapshot: string; visibleMs: number; total: number; trigger: string; by: string; type: string }>(
    t,
    ['rollback', img, 'a'],
    'rollback a (online)',
  );
  t.equal(r.type, 'rollback-merge', 'the result describes the merge job');
  t.equal(r.snapshot, 'a', 'to snapshot a');
  // How fast is a benchmark's business (tools/bench-rollback.ts); "at once" is checked by the read below.
  t.ok(Number.isFinite(r.visibleMs) && r.visibleMs >= 0, `visibleMs reported (${r.visibleMs.toFixed(1)} ms)`);
  t.ok(r.total > 0 && r.total <= size / CHUNK, `${r.total} chunks to merge (changed since a)`);
  t.equal(r.trigger, 'command', 'trigger: command');
  t.match(r.by, new RegExp(`@.+ pid \\d+$`), `by: user@host pid N (${r.by})`);
  // The first read after the command returns already shows a.
  t.ok((await readAll(srv.socket, 'disk', size)).equals(p0), 'live reads show snapshot a as soon as the command returned');

  // Writes during (or after) the merge win.
  const w = crypto.randomBytes(4 * KiB);
  t.same(await writeExport(srv.socket, 'disk', [[3 * CHUNK + 512, w]]), [0], 'a write right after the rollback succeeds');
  const expected = Buffer.from(p0);
  w.copy(expected, 3 * CHUNK + 512);

  await waitNoJobs(t, img, 'after rollback a');
  t.ok((await readAll(srv.socket, 'disk', size)).equals(expected), 'after the merge: live = a + the later write');
  t.ok((await readAll(srv.socket, 'disk@a', size)).equals(p0), 'snapshot a is exact');
  t.ok((await readAll(srv.socket, 'disk@b', size)).equals(p1), 'snapshot b (newer than the rollback target) is exact');
  t.equal(await srv.stop(), 0, 'server exits 0');
  t.ok(fs.readFileSync(img).equals(expected), 'the raw file holds the rolled-back content and the later write');

  const h = await json<HistoryEntry[]>(t, ['history', img], 'history');
  t.same(
    h.map((e) => [e.event, e.snapshot, e.trigger]),
    [
      ['rollback', 'a', 'command'],
      ['merge-finished', 'a', undefined],
    ],
    'history: the rollback, then its merge finishing',
  );
  t.ok(Date.parse(h[0]!.at) >= before - 1000, 'history: when');
  t.equal(h[0]!.chunks, r.total, 'history: chunks to merge');
  t.equal(h[1]!.chunks, r.total, 'history: chunks merged');
  const text = await cli(['history', img]);
  expectOk(t, text, 'history (text)');
  t.match(text.stdout, /rollback to a \(id 1\), command by .+, \d+ chunks to merge/, 'history (text) names the snapshot and who');

  const info = await json<{ basedOn: { snapshot: string } | null; jobs: unknown[]; autoRollback: unknown }>(t, ['info', img], 'info');
  t.equal(info.basedOn?.snapshot, 'a', 'info: volume -> snapshot: based on a');
  t.same(info.jobs, [], 'info: no jobs');
  const list = await json<{ name: string; basisOf: string[]; volume: string }[]>(t, ['snapshot', 'list', img], 'list');
  t.same(
    list.map((s) => [s.name, s.basisOf.map((v) => path.basename(v))]),
    [
      ['a', ['disk.img']],
      ['b', []],
    ],
    'list: snapshot -> volume: a is the basis of disk.img',
  );
  t.ok(list.every((s) => s.volume === fs.realpathSync(img) || s.volume === img), 'list: each snapshot names its volume');
});

t.test('rollback to the newest snapshot, then to an older one while it still merges (replaces it)', async (t) => {
  const size = 8 * MiB;
  // Merges at 128 KiB/s (8 chunks/s): the merge to b (about 256 chunks) runs
  // for half a minute, far longer than the few commands before the second
  // rollback take on any machine. The server is then restarted without the
  // limit, so that the rest runs at full speed.
  const { dir, img, srv: slow, p0, p1 } = await threeGenerations(t, size, ['--merge-rate', '128K']);
  expectOk(t, await cli(['rollback', img, 'b']), 'rollback b');
  const running = JSON.parse((await cli(['jobs', img, '--json'])).stdout) as Job[];
  t.equal(running[0]?.snapshot, 'b', 'the merge to b is running');
  const snapRefused = await cli(['snapshot', 'create', img, 'c']);
  expectError(t, snapRefused, 7, 'ROLLBACK_RUNNING', 'online create while merging', /rollback to "b" is merging/);
  const listed = await json<{ name: string; merge?: { percent: number } }[]>(t, ['snapshot', 'list', img], 'list while merging');
  t.ok(listed.find((s) => s.name === 'b')?.merge !== undefined, 'snapshot list shows the merge progress on b');
  t.ok((await readAll(slow.socket, 'disk', size)).equals(p1), 'live shows b');
  expectOk(t, await cli(['rollback', img, 'a']), 'rollback a right after');
  t.ok((await readAll(slow.socket, 'disk', size)).equals(p0), 'live shows a');
  const second = (await json<HistoryEntry[]>(t, ['history', img], 'history after the second rollback')).filter((e) => e.event === 'rollback');
  t.equal(second[1]?.replaced, 'b', 'the second rollback replaced the running merge to b');
  t.equal(await slow.stop(), 0, 'the rate-limited server exits 0 mid-merge');
  const srv = await serve(dir, img);
  t.ok((await readAll(srv.socket, 'disk', size)).equals(p0), 'restarted: live shows a');
  await waitNoJobs(t, img, 'after both');
  t.ok((await readAll(srv.socket, 'disk', size)).equals(p0), 'after the merge live is a');
  t.ok((await readAll(srv.socket, 'disk@a', size)).equals(p0), 'a exact');
  t.ok((await readAll(srv.socket, 'disk@b', size)).equals(p1), 'b exact');
  // And forward again: every snapshot is kept, so "undoing" a rollback works.
  expectOk(t, await cli(['rollback', img, 'b', '--wait']), 'rollback b --wait');
  t.same(JSON.parse((await cli(['jobs', img, '--json'])).stdout), [], '--wait returned after the merge finished');
  t.ok((await readAll(srv.socket, 'disk', size)).equals(p1), 'live is b again');
  const h = await json<HistoryEntry[]>(t, ['history', img], 'history');
  t.same(
    h.filter((e) => e.event === 'rollback').map((e) => e.snapshot),
    ['b', 'a', 'b'],
    'history records the three rollbacks in order',
  );
  t.same(
    h.filter((e) => e.event === 'rollback').map((e) => e.replaced),
    [undefined, 'b', undefined],
    'history: the second rollback replaced the running merge to b; the third came after the merge had finished',
  );
});

t.test('offline rollback: the command merges to the end itself; the raw file is the snapshot', async (t) => {
  const size = 4 * MiB;
  const { img, srv, p0 } = await threeGenerations(t, size);
  t.equal(await srv.stop(), 0, 'server stopped');
  const r = await cli(['rollback', img, 'a']);
  expectOk(t, r, 'offline rollback a');
  t.match(r.stdout, /^rolled back .+ to snapshot a \(visible after [\d.]+ ms\); merged \d+ chunks\n$/, 'it says it merged');
  t.ok(fs.readFileSync(img).equals(p0), 'the raw file now holds snapshot a');
  t.same(JSON.parse((await cli(['jobs', img, '--json'])).stdout), [], 'no job left');
  t.notOk(
    fs.readdirSync(`${img}.nbd`).some((f) => f.endsWith('.merge')),
    'no merge job file left behind',
  );
  t.same(
    (await json<HistoryEntry[]>(t, ['history', img], 'history')).map((e) => e.event),
    ['rollback', 'merge-finished'],
    'history has the offline rollback and its merge',
  );
});

t.test('a merge interrupted by SIGKILL: snapshot commands are refused until it finishes; serve resumes it', async (t) => {
  // 64 MiB rewritten entirely, merged at 2 MiB/s (--merge-rate): about 32 s
  // of merge, far longer than the one command between the rollback and the
  // kill takes on any machine; the restart has no limit.
  const size = 64 * MiB;
  const { dir, img } = dirs();
  const p0 = pattern(size);
  fs.writeFileSync(img, p0);
  let srv = await serve(dir, img, ['--chunk-size', '16K', '--merge-rate', '2M']);
  expectOk(t, await cli(['snapshot', 'create', img, 'a']), 'create a');
  const p1 = pattern(size);
  const writes: [number, Buffer][] = [];
  for (let off = 0; off < size; off += 4 * MiB) writes.push([off, p1.subarray(off, off + 4 * MiB)]);
  t.same((await writeExport(srv.socket, 'disk', writes)).filter((e) => e), [], 'whole volume rewritten');
  expectOk(t, await cli(['rollback', img, 'a']), 'rollback a');
  const jobs = JSON.parse((await cli(['jobs', img, '--json'])).stdout) as Job[];
  await srv.stop('SIGKILL');
  t.comment(`killed with the merge at ${jobs[0]?.percent ?? 100}%`);
  t.ok(jobs.length === 1 && jobs[0]!.percent < 100, `the merge was still running when killed (${jobs[0]?.percent ?? 'no job'}%)`);
  t.equal(jobs[0]?.total, size / (16 * KiB), 'every chunk was pending');
  const m = JSON.parse(fs.readFileSync(path.join(`${img}.nbd`, 'manifest.json'), 'utf8')) as { manifest: { jobs?: { kind: string; state: string }[] } };
  t.ok(
    m.manifest.jobs?.some((j) => j.kind === 'rollback-merge' && j.state === 'running'),
    'the manifest still records the unfinished merge (a running rollback-merge job) after the kill',
  );
  // Offline, with the job unfinished: create and delete are refused, nothing changes.
  const c = await cli(['snapshot', 'create', img, 'x']);
  expectError(t, c, 7, 'ROLLBACK_RUNNING', 'create while a merge is pending', /jobs .+ --wait/);
  const d = await cli(['snapshot', 'delete', img, 'a']);
  expectError(t, d, 7, 'ROLLBACK_RUNNING', 'delete while a merge is pending');
  const j = JSON.parse((await cli(['jobs', img, '--json'])).stdout) as Job[];
  t.equal(j.length, 1, 'offline jobs lists the unfinished merge');
  t.equal(j[0]?.snapshot, 'a', 'to a');
  t.ok(j[0]!.percent < 100, `offline progress ${j[0]?.percent}%`);
  srv = await serve(dir, img, ['--chunk-size', '16K']);
  t.ok((await readAll(srv.socket, 'disk', size)).equals(p0), 'after the restart live shows a');
  t.ok((await readAll(srv.socket, 'disk@a', size)).equals(p0), 'a exact while merging');
  await waitNoJobs(t, img, 'resumed merge');
  t.ok((await readAll(srv.socket, 'disk@a', size)).equals(p0), 'a exact');
  expectOk(t, await cli(['snapshot', 'create', img, 'x']), 'create works again once the merge finished');
  t.equal(await srv.stop(), 0, 'server exits 0');
  t.ok(fs.readFileSync(img).equals(p0), 'raw file = a');
});

t.test('bad input: unknown snapshot, failed snapshot, bad policy and keys, policy conflicts, read-only', async (t) => {
  const { dir, img } = dirs();
  fs.writeFileSync(img, pattern(2 * MiB));
  expectOk(t, await cli(['snapshot', 'create', img, 'a']), 'create a');
  expectError(t, await cli(['rollback', img, 'nope']), 8, 'SNAPSHOT_NOT_FOUND', 'rollback to an unknown snapshot');
  expectError(t, await cli(['rollback', path.join(dir, 'missing.img'), 'a']), 3, 'IMAGE_NOT_FOUND', 'rollback of a missing image');
  expectError(t, await cli(['snapshot', 'create', img, 'b', '--auto-rollback', 'sometimes']), 2, 'BAD_ARGUMENT', 'unknown policy');
  t.notOk(JSON.parse((await cli(['snapshot', 'list', img, '--json'])).stdout).some((s: { name: string }) => s.name === 'b'), 'no snapshot created by a refused create');
  expectError(t, await cli(['snapshot', 'set', img, 'a', 'color=blue']), 2, 'BAD_ARGUMENT', 'unknown setting');
  expectError(t, await cli(['snapshot', 'set', img, 'a', 'auto-rollback=never']), 2, 'BAD_ARGUMENT', 'bad policy value');
  expectError(t, await cli(['snapshot', 'get', img, 'a', 'color']), 2, 'BAD_ARGUMENT', 'unknown key');
  expectError(t, await cli(['snapshot', 'get', img, 'zz', 'auto-rollback']), 8, 'SNAPSHOT_NOT_FOUND', 'get of an unknown snapshot');

  expectOk(t, await cli(['snapshot', 'set', img, 'a', 'auto-rollback=on-start']), 'set a on-start');
  t.equal((await cli(['snapshot', 'get', img, 'a', 'auto-rollback'])).stdout, 'on-start\n', 'get prints on-start');
  const conflict = await cli(['snapshot', 'create', img, 'b', '--auto-rollback', 'on-disconnect']);
  expectError(t, conflict, 9, 'AUTO_ROLLBACK_CONFLICT', 'a second policy on create', /"a" already carries auto-rollback=on-start/);
  t.notOk(JSON.parse((await cli(['snapshot', 'list', img, '--json'])).stdout).some((s: { name: string }) => s.name === 'b'), 'the conflicting create created nothing');
  expectOk(t, await cli(['snapshot', 'create', img, 'b']), 'create b without a policy');
  expectError(t, await cli(['snapshot', 'set', img, 'b', 'auto-rollback=on-disconnect']), 9, 'AUTO_ROLLBACK_CONFLICT', 'a second policy on set');
  expectOk(t, await cli(['snapshot', 'set', img, 'a', 'auto-rollback=on-start']), 'setting the same snapshot again is fine');
  expectOk(t, await cli(['snapshot', 'set', img, 'a', 'auto-rollback=off']), 'set a off');
  t.equal((await cli(['snapshot', 'get', img, 'a', 'auto-rollback'])).stdout, 'off\n', 'get prints off');
  expectOk(t, await cli(['snapshot', 'set', img, 'b', 'auto-rollback=on-disconnect']), 'now b can carry one');

  // A failed snapshot: write a valid failure marker into its header page, as the server would.
  const snapFile = path.join(`${img}.nbd`, 'snap-1.snap');
  const reason = 'writing to the snapshot store failed: No space left on device';
  const marker = Buffer.alloc(16 + reason.length + 4);
  marker.writeUInt32LE(0x4c494146, 0);
  marker.writeUInt32LE(reason.length, 4);
  marker.writeBigUInt64LE(BigInt(Date.now()), 8);
  marker.write(reason, 16, 'utf8');
  marker.writeUInt32LE(crc32c(marker.subarray(0, 16 + reason.length)), 16 + reason.length);
  const fd = fs.openSync(snapFile, 'r+');
  fs.writeSync(fd, marker, 0, marker.length, 1024);
  fs.closeSync(fd);
  const failed = await cli(['rollback', img, 'a']);
  expectError(t, failed, 12, 'SNAPSHOT_FAILED', 'rollback to a failed snapshot', /No space left on device/);
  expectError(t, await cli(['snapshot', 'set', img, 'a', 'auto-rollback=on-start']), 9, 'AUTO_ROLLBACK_CONFLICT', 'b still holds the policy');

  // Served read-only: a rollback would write.
  const srv = await serve(dir, img, ['--read-only']);
  expectError(t, await cli(['rollback', img, 'b']), 2, 'BAD_ARGUMENT', 'rollback of a read-only served volume', /read-only/);
  t.equal(await srv.stop(), 0, 'read-only server exits 0');

  // A damaged history line before the end is corruption; a torn last line is not.
  expectOk(t, await cli(['rollback', img, 'b']), 'rollback b (offline)');
  const hist = path.join(`${img}.nbd`, 'history.jsonl');
  const good = fs.readFileSync(hist, 'utf8');
  fs.writeFileSync(hist, good + '{"at":"2026-');
  t.equal((await json<HistoryEntry[]>(t, ['history', img], 'torn last line')).length, 2, 'a torn last history line is skipped');
  fs.writeFileSync(hist, '{broken\n' + good);
  expectError(t, await cli(['history', img]), 6, 'METADATA_CORRUPT', 'a damaged history line');
  fs.writeFileSync(hist, good);
});

t.test('auto-rollback on-disconnect: the last client leaving rolls the volume back to the golden snapshot', async (t) => {
  const size = 4 * MiB;
  const { dir, img } = dirs();
  const golden = pattern(size);
  fs.writeFileSync(img, golden);
  const srv = await serve(dir, img);
  const c = await cli(['snapshot', 'create', img, 'golden', '--auto-rollback', 'on-disconnect']);
  expectOk(t, c, 'create golden --auto-rollback on-disconnect');
  t.match(c.stdout, /auto-rollback=on-disconnect/, 'create reports the policy');

  // Two clients; the volume rolls back only when the last one leaves.
  const keep = await RawClient.connect(srv.socket);
  await keep.go('disk');
  const scribble = crypto.randomBytes(64 * KiB);
  t.same(await writeExport(srv.socket, 'disk', [[0, scribble]]), [0], 'a session writes while another client stays connected');
  await new Promise((r) => setTimeout(r, 300));
  const r1 = await keep.read(0, 64 * KiB);
  t.ok(r1.data?.equals(scribble), 'no rollback while a client is still connected');
  const before = (await json<HistoryEntry[]>(t, ['history', img], 'history before')).length;
  await keep.disconnect();
  // Wait for the state (the policy's rollback in the history); the bound only stops a hang.
  const deadline = Date.now() + 120_000;
  while (Date.now() < deadline && (JSON.parse((await cli(['history', img, '--json'])).stdout) as HistoryEntry[]).length === before) {
    await new Promise((r) => setTimeout(r, 50));
  }
  const h = await json<HistoryEntry[]>(t, ['history', img], 'history after');
  const e = h.find((x) => x.event === 'rollback');
  t.equal(e?.trigger, 'policy:on-disconnect', 'history: triggered by the on-disconnect policy');
  t.equal(e?.snapshot, 'golden', 'history: to golden');
  t.ok((await readAll(srv.socket, 'disk', size)).equals(golden), 'the next session sees the golden content');

  expectOk(t, await cli(['snapshot', 'set', img, 'golden', 'auto-rollback=off']), 'policy off');
  await waitNoJobs(t, img, 'before the last session');
  const n = (await json<HistoryEntry[]>(t, ['history', img], 'history')).length;
  t.same(await writeExport(srv.socket, 'disk', [[0, scribble]]), [0], 'a session writes and leaves');
  await new Promise((r) => setTimeout(r, 500));
  t.equal((await json<HistoryEntry[]>(t, ['history', img], 'history')).length, n, 'no rollback with the policy off');
  t.ok((await readAll(srv.socket, 'disk', 64 * KiB)).equals(scribble), 'the write stays');
  t.equal(await srv.stop(), 0, 'server exits 0');
});

t.test('auto-rollback on-disconnect: a client reconnecting at once never sees the session it follows (30 rounds)', async (t) => {
  const size = 8 * MiB;
  const { dir, img } = dirs();
  const golden = pattern(size);
  fs.writeFileSync(img, golden);
  const srv = await serve(dir, img);
  expectOk(t, await cli(['snapshot', 'create', img, 'golden', '--auto-rollback', 'on-disconnect']), 'create golden with the policy');
  const stale: number[] = [];
  for (let i = 0; i < 30; i++) {
    const off = (i % 8) * MiB;
    const w = await RawClient.connect(srv.socket);
    await w.go('disk');
    await w.write(off, crypto.randomBytes(256 * KiB));
    await w.disconnect();
    // Reconnect at once: the rollback starts after the disconnect, and this
    // session must wait for it rather than read the previous session's data.
    const r = await RawClient.connect(srv.socket);
    await r.go('disk');
    const got = await r.read(off, 256 * KiB);
    if (!got.data?.equals(golden.subarray(off, off + 256 * KiB))) stale.push(i);
    await r.disconnect();
  }
  t.same(stale, [], 'every reconnect read the golden content');
  await waitNoJobs(t, img, 'after the rounds');
  t.ok((await readAll(srv.socket, 'disk', size)).equals(golden), 'the volume is golden');
  t.equal(await srv.stop(), 0, 'server exits 0');
});

t.test('auto-rollback on-start: every server start begins from the snapshot', async (t) => {
  const size = 4 * MiB;
  const { dir, img } = dirs();
  const golden = pattern(size);
  fs.writeFileSync(img, golden);
  expectOk(t, await cli(['snapshot', 'create', img, 'golden']), 'create golden (offline)');
  expectOk(t, await cli(['snapshot', 'set', img, 'golden', 'auto-rollback=on-start']), 'set on-start (offline)');
  let srv = await serve(dir, img);
  const scribble = crypto.randomBytes(128 * KiB);
  t.same(await writeExport(srv.socket, 'disk', [[MiB, scribble]]), [0], 'a session changes the volume');
  t.equal(await srv.stop(), 0, 'server stopped');
  srv = await serve(dir, img);
  t.ok((await readAll(srv.socket, 'disk', size)).equals(golden), 'the restarted server serves the golden content from its first read');
  const h = await json<HistoryEntry[]>(t, ['history', img], 'history');
  t.same(
    h.filter((e) => e.event === 'rollback').map((e) => e.trigger),
    ['policy:on-start', 'policy:on-start'],
    'each start rolled back (policy:on-start)',
  );
  t.equal(await srv.stop(), 0, 'server exits 0');
  t.ok(fs.readFileSync(img).equals(golden), 'the raw file is golden after the merge');
});

// CRC-32C (Castagnoli), for forging a failure marker like the server writes.
function crc32c(b: Buffer): number {
  let crc = ~0 >>> 0;
  for (const byte of b) {
    crc ^= byte;
    for (let k = 0; k < 8; k++) crc = crc & 1 ? (crc >>> 1) ^ 0x82f63b78 : crc >>> 1;
  }
  return ~crc >>> 0;
}
