// Snapshot failure isolation when the snapshot store runs out of space.
//
// The image and its IMAGE.nbd/ metadata live on a small filesystem of their
// own (a tmpfs, or else ext4 on a loop-mounted file), so copying old data into
// a snapshot store fails with ENOSPC while the image itself (fully allocated
// up front) never needs a new block. A ballast file sets how much room the
// snapshot store has, and is removed later to give the room back.
//
// The rules under test (docs/architecture.md, "Snapshots"): every host write
// still succeeds and lands; the snapshot whose store filled up is marked failed
// with its reason and time (snapshot list --json, server log), and so is every
// older snapshot that read one of the lost chunks through it; a failed
// snapshot's export answers reads with EIO, never with inexact data; later
// writes stop copying into failed snapshots; healthy snapshots stay exact; the
// failed state survives a restart. Deleting a snapshot hands each chunk older
// snapshots read through it to the nearest older healthy one, past failed
// ones, and fails (changing nothing) when that one has no room.
import t, { type Test } from 'tap';
import * as crypto from 'node:crypto';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { exec, type ExecResult } from './fixtures/exec';
import { NBD, RawClient } from './fixtures/raw-client';
import { CLI, logLines as serverLog, makeTempDir, removeDir, startServer, type RunningServer } from './fixtures/server';

const logLines = (srv: RunningServer) => serverLog<{ snapshot: string; reason: string }>(srv);
import { ballast, fillUp, freeBytes, smallFs } from './fixtures/small-fs';

const KiB = 1024;
const MiB = 1024 * KiB;
const CHUNK = 64 * KiB;
/** The layouts below are worked out for 64 KiB chunks (not the default): every server here is started with it. */
const CHUNK_ARGS = ['--chunk-size', '64K'];
const WRITE = 256 * KiB; // host write size
const SPACE = /space|ENOSPC/i;

function cli(args: string[]): Promise<ExecResult> {
  return exec(process.execPath, [CLI, ...args], { timeoutMs: 60_000 });
}

// ---- I/O helpers -------------------------------------------------------------------

/** Writes `data` at 0 in WRITE-sized requests; returns every request's error (0 = ok) and the flush's. */
async function writeAll(socket: string, data: Buffer, length = data.length): Promise<{ errors: number[]; flush: number }> {
  const c = await RawClient.connect(socket);
  const errors: number[] = [];
  try {
    await c.go('disk');
    for (let off = 0; off < length; off += WRITE) errors.push((await c.write(off, data.subarray(off, Math.min(off + WRITE, length)))).error);
    const flush = (await c.cmd(NBD.CMD_FLUSH, 0, 0, 0)).error;
    return { errors, flush };
  } finally {
    await c.disconnect();
  }
}

/** Reads a whole export in 1 MiB requests: the data, or the first error. */
async function readAll(socket: string, name: string, size: number): Promise<{ error: number; data?: Buffer; at?: number }> {
  const c = await RawClient.connect(socket);
  try {
    await c.go(name);
    const parts: Buffer[] = [];
    for (let off = 0; off < size; off += MiB) {
      const r = await c.read(off, Math.min(MiB, size - off));
      if (r.error) return { error: r.error, at: off };
      parts.push(r.data!);
    }
    return { error: 0, data: Buffer.concat(parts) };
  } finally {
    await c.disconnect();
  }
}

interface SnapJson {
  id: number;
  name: string;
  state: 'active' | 'failed';
  failure?: { reason: string; at: string };
  preservedChunks: number;
}

async function list(t: Test, img: string, what: string): Promise<Map<string, SnapJson>> {
  const r = await cli(['snapshot', 'list', img, '--json']);
  t.equal(r.code, 0, `${what}: snapshot list --json exits 0 ${r.stderr.trim().split('\n').at(-1) ?? ''}`);
  let arr: SnapJson[] = [];
  try {
    arr = JSON.parse(r.stdout) as SnapJson[];
  } catch {
    t.fail(`${what}: snapshot list --json prints JSON`);
  }
  return new Map(arr.map((s) => [s.name, s]));
}

function allocated(file: string): number {
  return fs.statSync(file).blocks * 512;
}

function checkWrites(t: Test, r: { errors: number[]; flush: number }, what: string): void {
  const bad = r.errors.map((e, i) => [i, e] as const).filter(([, e]) => e !== 0);
  t.same(bad, [], `${what}: all ${r.errors.length} host writes succeed${bad.length ? ` (failed: ${bad.slice(0, 5).map(([i, e]) => `#${i} errno ${e}`).join(', ')})` : ''}`);
  t.equal(r.flush, 0, `${what}: flush succeeds`);
}

function checkFailed(t: Test, s: SnapJson | undefined, name: string, reason: RegExp, started: number): void {
  t.equal(s?.state, 'failed', `${name}: state "failed"`);
  t.match(s?.failure?.reason ?? '', reason, `${name}: failure.reason ${reason} ("${s?.failure?.reason ?? ''}")`);
  const at = Date.parse(s?.failure?.at ?? '');
  t.ok(at >= started - 1000 && at <= Date.now() + 1000, `${name}: failure.at is the time of the failure ("${s?.failure?.at ?? ''}")`);
}

/** The server logged (level error or worse) that `name` failed, with a reason matching `reason`. */
function checkLogged(t: Test, srv: RunningServer, name: string, reason: RegExp): void {
  const line = logLines(srv).find((l) => l.snapshot === name && /snapshot failed/.test(l.msg ?? ''));
  t.ok(line, `server log has a "snapshot failed" line for ${name}`);
  t.ok((line?.level ?? 0) >= 50, `${name}: logged at level error (${line?.level})`);
  t.match(line?.reason ?? '', reason, `${name}: the log line gives the reason (${line?.reason ?? ''})`);
}

function noTempLeft(t: Test, meta: string): void {
  const left = fs.readdirSync(meta).filter((f) => /\.tmp/.test(f));
  t.same(left, [], `no temporary files left in IMAGE.nbd/ (${left.join(', ')})`);
}

// ---- scenarios ---------------------------------------------------------------------

t.test('store fills up while the newest snapshot copies: it fails, and the older one that needs it fails too', async (t) => {
  // 32 MiB: image 16, A 4, B gets 3 MiB (the ballast takes the rest until it is removed).
  const mnt = await smallFs(t, 32);
  if (!mnt) return;
  const size = 16 * MiB;
  const img = path.join(mnt.dir, 'disk.img');
  const meta = `${img}.nbd`;
  const p0 = crypto.randomBytes(size);
  fs.writeFileSync(img, p0);
  const started = Date.now();
  let srv: RunningServer | undefined = await startServer({ dir: mnt.dir, images: [img], args: CHUNK_ARGS });
  t.teardown(() => srv?.stop('SIGKILL'));
  try {
    t.equal((await cli(['snapshot', 'create', img, 'A'])).code, 0, 'create A');
    const p1 = Buffer.from(p0);
    crypto.randomFillSync(p1, 0, 4 * MiB);
    checkWrites(t, await writeAll(srv.socket, p1, 4 * MiB), 'overwrite the first 4 MiB (A preserves them)');
    t.equal((await list(t, img, 'after A')).get('A')?.preservedChunks, 64, 'A holds 64 chunks (4 MiB)');
    const ball = ballast(mnt.dir, 3 * MiB);
    t.comment(`free for snapshot data: ${(freeBytes(mnt.dir) / MiB).toFixed(2)} MiB`);
    t.equal((await cli(['snapshot', 'create', img, 'B'])).code, 0, 'create B');

    const p2 = crypto.randomBytes(size);
    checkWrites(t, await writeAll(srv.socket, p2), 'overwrite the whole volume while the store fills up');
    const l = await list(t, img, 'after ENOSPC');
    checkFailed(t, l.get('B'), 'B', SPACE, started);
    checkFailed(t, l.get('A'), 'A', SPACE, started);
    checkLogged(t, srv, 'B', SPACE);
    checkLogged(t, srv, 'A', SPACE);
    const live = await readAll(srv.socket, 'disk', size);
    t.ok(live.data?.equals(p2), 'the live export reads exactly what was written');
    for (const name of ['A', 'B']) {
      const r = await readAll(srv.socket, `disk@${name}`, size);
      t.equal(r.error, NBD.EIO, `reading the failed disk@${name} gives EIO (got ${r.error}${r.error ? ` at ${r.at}` : ', data'})`);
    }

    // Give the room back: failed snapshots get no more copies.
    const before = { A: allocated(path.join(meta, 'snap-1.snap')), B: allocated(path.join(meta, 'snap-2.snap')) };
    const chunks = { A: l.get('A')?.preservedChunks, B: l.get('B')?.preservedChunks };
    fs.rmSync(ball);
    const p3 = crypto.randomBytes(size);
    checkWrites(t, await writeAll(srv.socket, p3), 'overwrite again with room to spare');
    const l2 = await list(t, img, 'after room returned');
    t.same(
      { A: l2.get('A')?.preservedChunks, B: l2.get('B')?.preservedChunks },
      chunks,
      `failed snapshots preserve nothing more (chunks A ${chunks.A}, B ${chunks.B})`,
    );
    t.same({ A: allocated(path.join(meta, 'snap-1.snap')), B: allocated(path.join(meta, 'snap-2.snap')) }, before, 'their data files did not grow');
    t.equal(l2.get('A')?.state, 'failed', 'A stays failed');
    t.equal(l2.get('B')?.state, 'failed', 'B stays failed');

    // A new snapshot works normally behind the failed ones.
    t.equal((await cli(['snapshot', 'create', img, 'C'])).code, 0, 'create C after the failures');
    const p4 = Buffer.from(p3);
    crypto.randomFillSync(p4, 0, 2 * MiB);
    checkWrites(t, await writeAll(srv.socket, p4, 2 * MiB), 'overwrite 2 MiB under C');
    const c = await readAll(srv.socket, 'disk@C', size);
    t.ok(c.data?.equals(p3), 'C is exact');
    t.equal((await list(t, img, 'C')).get('C')?.state, 'active', 'C is active');
    t.equal((await readAll(srv.socket, 'disk@A', size)).error, NBD.EIO, 'A still answers EIO');

    t.equal(await srv.stop(), 0, 'server exits 0');
    srv = undefined;
    t.ok(fs.readFileSync(img).equals(p4), 'the image file holds exactly the last writes');
    noTempLeft(t, meta);

    const off = await list(t, img, 'offline after restart');
    t.same([...off.values()].map((s) => [s.name, s.state]), [['A', 'failed'], ['B', 'failed'], ['C', 'active']], 'the states survive a restart (offline list)');
    t.match(off.get('B')?.failure?.reason ?? '', SPACE, 'B keeps its reason');
    srv = await startServer({ dir: mnt.dir, images: [img], args: CHUNK_ARGS });
    t.equal((await readAll(srv.socket, 'disk@B', size)).error, NBD.EIO, 'after restart, disk@B still answers EIO');
    t.ok((await readAll(srv.socket, 'disk@C', size)).data?.equals(p3), 'after restart, C is exact');
  } finally {
    if (srv) t.equal(await srv.stop(), 0, 'server exits 0');
    srv = undefined;
  }
});

t.test('a snapshot that holds every chunk stays healthy and exact while a newer one fails', async (t) => {
  // 32 MiB: image 8, A 8, B 1, C gets 2 MiB (the ballast takes the rest until it is removed).
  const mnt = await smallFs(t, 32);
  if (!mnt) return;
  const size = 8 * MiB;
  const img = path.join(mnt.dir, 'disk.img');
  const meta = `${img}.nbd`;
  const p0 = crypto.randomBytes(size);
  fs.writeFileSync(img, p0);
  const started = Date.now();
  let srv: RunningServer | undefined = await startServer({ dir: mnt.dir, images: [img], args: CHUNK_ARGS });
  t.teardown(() => srv?.stop('SIGKILL'));
  try {
    // A: every chunk preserved while there is room.
    t.equal((await cli(['snapshot', 'create', img, 'A'])).code, 0, 'create A');
    const p1 = crypto.randomBytes(size);
    checkWrites(t, await writeAll(srv.socket, p1), 'overwrite everything under A');
    t.equal((await list(t, img, 'A full')).get('A')?.preservedChunks, size / CHUNK, 'A holds every chunk');
    // B: holds only the first 1 MiB.
    t.equal((await cli(['snapshot', 'create', img, 'B'])).code, 0, 'create B');
    const p2 = Buffer.from(p1);
    crypto.randomFillSync(p2, 0, MiB);
    checkWrites(t, await writeAll(srv.socket, p2, MiB), 'overwrite the first 1 MiB under B');
    // C: its store fills up after about 2 MiB.
    t.equal((await cli(['snapshot', 'create', img, 'C'])).code, 0, 'create C');
    const ball = ballast(mnt.dir, 2 * MiB);
    t.comment(`free for snapshot data: ${(freeBytes(mnt.dir) / MiB).toFixed(2)} MiB`);
    const p3 = crypto.randomBytes(size);
    checkWrites(t, await writeAll(srv.socket, p3), 'overwrite everything while C fills up');

    const l = await list(t, img, 'after ENOSPC');
    checkFailed(t, l.get('C'), 'C', SPACE, started);
    checkFailed(t, l.get('B'), 'B', SPACE, started);
    t.match(l.get('B')?.failure?.reason ?? '', /depend/i, 'B failed because it depended on C for a lost chunk');
    t.equal(l.get('A')?.state, 'active', 'A (holds every chunk itself) stays active');
    t.notOk(l.get('A')?.failure, 'A has no failure');
    checkLogged(t, srv, 'C', SPACE);
    checkLogged(t, srv, 'B', SPACE);
    t.notOk(logLines(srv).some((x) => x.snapshot === 'A' && /fail/.test(x.msg ?? '')), 'nothing logged about A failing');

    const live = await readAll(srv.socket, 'disk', size);
    t.ok(live.data?.equals(p3), 'the live export reads exactly what was written');
    const a = await readAll(srv.socket, 'disk@A', size);
    t.ok(a.error === 0 && a.data?.equals(p0), 'A reads exactly its content at creation');
    for (const name of ['B', 'C']) {
      const r = await readAll(srv.socket, `disk@${name}`, size);
      t.equal(r.error, NBD.EIO, `reading the failed disk@${name} gives EIO (got ${r.error}${r.error ? ` at ${r.at}` : ', data'})`);
    }

    // Room again: nothing copies into the failed snapshots; A needs nothing.
    const files = ['snap-1.snap', 'snap-2.snap', 'snap-3.snap'];
    const before = files.map((f) => allocated(path.join(meta, f)));
    const counts = ['A', 'B', 'C'].map((n) => l.get(n)?.preservedChunks);
    fs.rmSync(ball);
    const p4 = crypto.randomBytes(size);
    checkWrites(t, await writeAll(srv.socket, p4), 'overwrite everything with room to spare');
    const l2 = await list(t, img, 'after room returned');
    t.same(['A', 'B', 'C'].map((n) => l2.get(n)?.preservedChunks), counts, `preserved chunk counts unchanged (${counts.join(', ')})`);
    t.same(files.map((f) => allocated(path.join(meta, f))), before, 'no snapshot data file grew');
    t.same(['A', 'B', 'C'].map((n) => l2.get(n)?.state), ['active', 'failed', 'failed'], 'states unchanged');
    t.ok((await readAll(srv.socket, 'disk@A', size)).data?.equals(p0), 'A still exact');

    // A new snapshot after the failed ones takes the copies.
    t.equal((await cli(['snapshot', 'create', img, 'D'])).code, 0, 'create D');
    const p5 = Buffer.from(p4);
    crypto.randomFillSync(p5, 3 * MiB, MiB);
    checkWrites(t, await writeAll(srv.socket, p5), 'overwrite (same data except 1 MiB) under D');
    const l3 = await list(t, img, 'D');
    t.equal(l3.get('D')?.state, 'active', 'D active');
    t.equal(l3.get('D')?.preservedChunks, size / CHUNK, 'D took the copies (every chunk was written)');
    t.same(['B', 'C'].map((n) => l3.get(n)?.preservedChunks), counts.slice(1), 'still nothing copied into B and C');
    t.ok((await readAll(srv.socket, 'disk@D', size)).data?.equals(p4), 'D exact');
    t.ok((await readAll(srv.socket, 'disk@A', size)).data?.equals(p0), 'A still exact');

    t.equal(await srv.stop(), 0, 'server exits 0');
    srv = undefined;
    t.ok(fs.readFileSync(img).equals(p5), 'the image file holds exactly the last writes');
    noTempLeft(t, meta);
    const off = await list(t, img, 'offline after stop');
    t.same([...off.values()].map((s) => [s.name, s.state]), [['A', 'active'], ['B', 'failed'], ['C', 'failed'], ['D', 'active']], 'states survive a restart');
    srv = await startServer({ dir: mnt.dir, images: [img], args: CHUNK_ARGS });
    t.ok((await readAll(srv.socket, 'disk@A', size)).data?.equals(p0), 'after restart, A exact');
    t.equal((await readAll(srv.socket, 'disk@C', size)).error, NBD.EIO, 'after restart, C answers EIO');
  } finally {
    if (srv) t.equal(await srv.stop(), 0, 'server exits 0');
    srv = undefined;
  }
});

t.test('the failure is durable when the disk is completely full (no room for a new map record or the manifest)', async (t) => {
  const mnt = await smallFs(t, 32);
  if (!mnt) return;
  const size = 16 * MiB;
  const img = path.join(mnt.dir, 'disk.img');
  const meta = `${img}.nbd`;
  const p0 = crypto.randomBytes(size);
  fs.writeFileSync(img, p0);
  const started = Date.now();
  // Inline preservation (no first-write journal): the setup below needs one
  // log record per write, and the first-write journal would batch them. The
  // journalled path is what the other tests in this file run.
  const inline = ['--cow-journal', '0', ...CHUNK_ARGS];
  let srv: RunningServer | undefined = await startServer({ dir: mnt.dir, images: [img], args: inline });
  t.teardown(() => srv?.stop('SIGKILL'));
  let fill = '';
  const live = Buffer.from(p0);
  try {
    t.equal((await cli(['snapshot', 'create', img, 'S'])).code, 0, 'create S');
    // 127 single-chunk commits of 32 bytes each: the log (from log_base =
    // 1 MiB + 16 MiB, page-aligned) ends 32 bytes before a page boundary.
    const c = await RawClient.connect(srv.socket);
    await c.go('disk');
    const errs: number[] = [];
    for (let k = 0; k < 127; k++) {
      const d = crypto.randomBytes(4096);
      d.copy(live, k * CHUNK);
      errs.push((await c.write(k * CHUNK, d)).error);
    }
    t.same(errs.filter((e) => e !== 0), [], '127 first writes, one chunk each, succeed');
    const fileSize = fs.statSync(path.join(meta, 'snap-1.snap')).size;
    t.comment(`snap-1.snap is ${fileSize} bytes before the disk fills up`);
    t.equal(fileSize, 17 * MiB + 127 * 32, 'setup: the log ends 32 bytes before a page boundary');
    fill = fillUp(mnt.dir);
    t.comment(`free after filling: ${freeBytes(mnt.dir)} bytes`);
    // The next first write cannot be preserved: S fails. A record appended to
    // its map would need a new page, and so would a new manifest.
    const d = crypto.randomBytes(4096);
    d.copy(live, 200 * CHUNK);
    t.equal((await c.write(200 * CHUNK, d)).error, 0, 'the host write into chunk 200 succeeds');
    t.equal((await c.cmd(NBD.CMD_FLUSH, 0, 0, 0)).error, 0, 'flush succeeds');
    await c.disconnect();
    const online = await list(t, img, 'online, disk full');
    checkFailed(t, online.get('S'), 'S (online)', SPACE, started);
    t.equal((await readAll(srv.socket, 'disk@S', size)).error, NBD.EIO, 'disk@S answers EIO');
    t.equal(await srv.stop(), 0, 'server exits 0 with the disk full');
    srv = undefined;
    const stoppedAt = Date.now();
    t.comment(`snap-1.snap is ${fs.statSync(path.join(meta, 'snap-1.snap')).size} bytes after the failure`);

    fs.rmSync(fill);
    fill = '';
    const off = await list(t, img, 'offline, room again');
    t.equal(off.get('S')?.state, 'failed', 'S is still failed after a restart (the failure was recorded durably)');
    t.match(off.get('S')?.failure?.reason ?? '', SPACE, 'with its reason');
    const at = Date.parse(off.get('S')?.failure?.at ?? '');
    t.ok(
      at >= started - 1000 && at <= stoppedAt,
      `failure.at is when it failed, before the server stopped (${off.get('S')?.failure?.at}; online it was ${online.get('S')?.failure?.at})`,
    );
    noTempLeft(t, meta);
    srv = await startServer({ dir: mnt.dir, images: [img], args: inline });
    const r = await readAll(srv.socket, 'disk@S', size);
    const inexact = r.error === 0 && r.data ? !r.data.equals(p0) : false;
    t.equal(r.error, NBD.EIO, `after restart, disk@S answers EIO${r.error === 0 ? ` (it served data${inexact ? ' that is NOT the snapshot content: chunk 200 has the new write' : ''})` : ''}`);
    t.ok(fs.readFileSync(img).equals(live), 'the image holds every host write');
  } finally {
    if (srv) t.equal(await srv.stop(), 0, 'server exits 0');
    srv = undefined;
    if (fill) fs.rmSync(fill, { force: true });
  }
});

t.test('snapshot delete on a full disk: refused, and every snapshot stays exact (the deletion is recorded before the snapshot leaves the chain)', async (t) => {
  const mnt = await smallFs(t, 32);
  if (!mnt) return;
  const size = 8 * MiB;
  const img = path.join(mnt.dir, 'disk.img');
  const p0 = crypto.randomBytes(size);
  fs.writeFileSync(img, p0);
  let srv: RunningServer | undefined = await startServer({ dir: mnt.dir, images: [img], args: CHUNK_ARGS });
  t.teardown(() => srv?.stop('SIGKILL'));
  let fill = '';
  try {
    // A (older) and B (newer): B holds chunks A reads through it, so deleting
    // B has to hand them down; with the disk full, that or the manifest fails.
    t.equal((await cli(['snapshot', 'create', img, 'A'])).code, 0, 'create A');
    t.equal((await cli(['snapshot', 'create', img, 'B'])).code, 0, 'create B');
    const live = Buffer.from(p0);
    const c = await RawClient.connect(srv.socket);
    await c.go('disk');
    const errs: number[] = [];
    for (let k = 0; k < 16; k++) {
      const d = crypto.randomBytes(4096);
      d.copy(live, k * CHUNK);
      errs.push((await c.write(k * CHUNK, d)).error);
    }
    errs.push((await c.cmd(NBD.CMD_FLUSH, 0, 0, 0)).error);
    await c.disconnect();
    t.same(errs.filter((e) => e !== 0), [], '16 first writes into B and a flush succeed');
    const before = await list(t, img, 'before the delete');
    t.equal(before.get('B')?.preservedChunks, 16, 'B holds the 16 chunks');
    fill = fillUp(mnt.dir);
    t.comment(`free after filling: ${freeBytes(mnt.dir)} bytes`);
    const del = await cli(['snapshot', 'delete', img, 'B']);
    t.equal(del.code, 10, `snapshot delete B on a full disk fails with exit 10 (exit ${del.code}: ${del.stderr.trim().split('\n').at(-1)})`);
    t.match(del.stderr.trim().split('\n').at(-1) ?? '', /\[SNAPSHOT_DELETE_FAILED\]$/, 'a stable error code, never a raw system error code');
    t.match(del.stderr, SPACE, 'the error says the disk is full');
    const after = await list(t, img, 'after the refused delete');
    t.same([...after.keys()], ['A', 'B'], 'A and B are both still listed');
    t.equal(after.get('A')?.state, 'active', 'A is healthy');
    t.equal(after.get('B')?.state, 'active', 'B is healthy');
    const a = await readAll(srv.socket, 'disk@A', size);
    t.ok(a.error === 0 && a.data!.equals(p0), `disk@A is exact (error ${a.error})`);
    const b = await readAll(srv.socket, 'disk@B', size);
    t.ok(b.error === 0 && b.data!.equals(p0), `disk@B is exact (error ${b.error})`);
    // Overwriting chunks B holds needs no room: both stay exact.
    const c2 = await RawClient.connect(srv.socket);
    await c2.go('disk');
    const d = crypto.randomBytes(4096);
    d.copy(live, 3 * CHUNK);
    t.equal((await c2.write(3 * CHUNK, d)).error, 0, 'a write to a chunk B already holds succeeds');
    t.equal((await c2.cmd(NBD.CMD_FLUSH, 0, 0, 0)).error, 0, 'flush succeeds');
    await c2.disconnect();
    t.equal(await srv.stop('SIGTERM'), 0, 'server exits 0');
    srv = undefined;
    fs.rmSync(fill, { force: true });
    fill = '';
    // After a restart, B is still in the chain where it was: both exact.
    srv = await startServer({ dir: mnt.dir, images: [img], args: CHUNK_ARGS });
    const a2 = await readAll(srv.socket, 'disk@A', size);
    t.ok(a2.error === 0 && a2.data!.equals(p0), 'after a restart disk@A is exact');
    const b2 = await readAll(srv.socket, 'disk@B', size);
    t.ok(b2.error === 0 && b2.data!.equals(p0), 'after a restart disk@B is exact');
    const l2 = await readAll(srv.socket, 'disk', size);
    t.ok(l2.error === 0 && l2.data!.equals(live), 'after a restart the live volume holds every write');
    // With room again, the delete goes through and A stays exact.
    t.equal((await cli(['snapshot', 'delete', img, 'B'])).code, 0, 'with room again, delete B succeeds');
    const a3 = await readAll(srv.socket, 'disk@A', size);
    t.ok(a3.error === 0 && a3.data!.equals(p0), 'after deleting B, disk@A is exact (B handed its chunks down)');
    t.equal(await srv.stop('SIGTERM'), 0, 'server exits 0');
    srv = undefined;
  } finally {
    if (fill) fs.rmSync(fill, { force: true });
  }
});

/** manifest.json as on disk (the test's own reading of the documented format). */
function manifestOnDisk(img: string): { manifest: { snapshots: { name: string; state: string; failure?: { reason: string } }[] }; sha256: string } {
  return JSON.parse(fs.readFileSync(path.join(`${img}.nbd`, 'manifest.json'), 'utf8')) as never;
}

t.test('a failure the manifest could not record is written as soon as there is room again, while serving', async (t) => {
  const mnt = await smallFs(t, 32);
  if (!mnt) return;
  const size = 8 * MiB;
  const img = path.join(mnt.dir, 'disk.img');
  fs.writeFileSync(img, crypto.randomBytes(size));
  let srv: RunningServer | undefined = await startServer({ dir: mnt.dir, images: [img], args: CHUNK_ARGS });
  t.teardown(() => srv?.stop('SIGKILL'));
  let fill = '';
  try {
    t.equal((await cli(['snapshot', 'create', img, 'S'])).code, 0, 'create S');
    fill = fillUp(mnt.dir);
    const c = await RawClient.connect(srv.socket);
    await c.go('disk');
    t.equal((await c.write(5 * CHUNK, crypto.randomBytes(4096))).error, 0, 'a first write on a full disk succeeds');
    t.equal((await c.cmd(NBD.CMD_FLUSH, 0, 0, 0)).error, 0, 'flush succeeds');
    await c.disconnect();
    // Wait until the server has seen the failure (list settles the queue).
    const online = await list(t, img, 'disk full');
    t.equal(online.get('S')?.state, 'failed', 'S is failed (in memory)');
    t.equal(manifestOnDisk(img).manifest.snapshots[0]?.state, 'active', 'setup: manifest.json could not record it (no room)');
    fs.rmSync(fill, { force: true });
    fill = '';
    // The server retries every 2 s: wait for the state (the bound only stops a hang).
    let recorded = false;
    for (const end = Date.now() + 120_000; !recorded && Date.now() < end; ) {
      await new Promise((r) => setTimeout(r, 200));
      recorded = manifestOnDisk(img).manifest.snapshots[0]?.state === 'failed';
    }
    t.ok(recorded, 'once room comes back, manifest.json records S as failed (the server retried)');
    t.match(manifestOnDisk(img).manifest.snapshots[0]?.failure?.reason ?? '', SPACE, 'with the reason');
    t.equal(await srv.stop(), 0, 'server exits 0');
    srv = undefined;
  } finally {
    if (fill) fs.rmSync(fill, { force: true });
  }
});

t.test('a snapshot the manifest records as failed is never served as data, even without its own failure marker', async (t) => {
  const dir = makeTempDir('nbd-snapfail-');
  t.teardown(() => removeDir(dir));
  const size = 4 * MiB;
  const img = path.join(dir, 'disk.img');
  const p0 = crypto.randomBytes(size);
  fs.writeFileSync(img, p0);
  let srv: RunningServer | undefined = await startServer({ dir, images: [img] });
  t.teardown(() => srv?.stop('SIGKILL'));
  t.equal((await cli(['snapshot', 'create', img, 'S'])).code, 0, 'create S');
  t.equal(await srv.stop(), 0, 'server exits 0');
  srv = undefined;
  // What a device that failed while the failure was recorded leaves behind:
  // the manifest (written later, once there was room) says failed, the
  // store's in-place marker never made it.
  const file = path.join(`${img}.nbd`, 'manifest.json');
  const doc = manifestOnDisk(img);
  doc.manifest.snapshots[0] = { ...doc.manifest.snapshots[0]!, state: 'failed', failure: { reason: 'test: recorded in the manifest only' } } as never;
  doc.sha256 = crypto.createHash('sha256').update(JSON.stringify(doc.manifest)).digest('hex');
  fs.writeFileSync(file, JSON.stringify(doc, null, 2) + '\n');
  srv = await startServer({ dir, images: [img] });
  const r = await readAll(srv.socket, 'disk@S', size);
  t.equal(r.error, NBD.EIO, `disk@S answers EIO (got ${r.error})`);
  const l = await list(t, img, 'after restart');
  t.equal(l.get('S')?.state, 'failed', 'S is listed failed');
  t.equal(await srv.stop(), 0, 'server exits 0');
  srv = undefined;
});

// ---- delete hands chunks down past failed snapshots ------------------------------

/**
 * Writes 8 KiB of fresh random data inside each of `chunks` (one request
 * each, 4 KiB into the chunk, so every one is a first write that preserves
 * the whole chunk) and flushes; `live` (the model of the volume) follows.
 */
async function writeChunks(socket: string, live: Buffer, chunks: number[]): Promise<{ errors: number[]; flush: number }> {
  const c = await RawClient.connect(socket);
  const errors: number[] = [];
  try {
    await c.go('disk');
    for (const k of chunks) {
      const d = crypto.randomBytes(8 * KiB);
      d.copy(live, k * CHUNK + 4 * KiB);
      errors.push((await c.write(k * CHUNK + 4 * KiB, d)).error);
    }
    return { errors, flush: (await c.cmd(NBD.CMD_FLUSH, 0, 0, 0)).error };
  } finally {
    await c.disconnect();
  }
}

const range = (from: number, to: number): number[] => Array.from({ length: to - from }, (_, i) => from + i);

/** The chunks where two images differ (for messages). */
function chunksDiffering(a: Buffer | undefined, b: Buffer): number[] {
  if (!a) return [];
  const out: number[] = [];
  for (let k = 0; k * CHUNK < b.length; k++) if (!a.subarray(k * CHUNK, (k + 1) * CHUNK).equals(b.subarray(k * CHUNK, (k + 1) * CHUNK))) out.push(k);
  return out;
}

/**
 * The model check: every snapshot in `model` is read in full through its
 * export; a healthy one must read exactly its frozen content, a failed one
 * (null) must answer EIO. The live export must read `live`.
 */
async function checkModel(t: Test, srv: RunningServer, live: Buffer, model: Map<string, Buffer | null>, what: string): Promise<void> {
  const l = await readAll(srv.socket, 'disk', live.length);
  t.ok(l.error === 0 && l.data!.equals(live), `${what}: the live export is exact (error ${l.error})`);
  for (const [name, frozen] of model) {
    const r = await readAll(srv.socket, `disk@${name}`, live.length);
    if (frozen === null) {
      t.equal(r.error, NBD.EIO, `${what}: the failed disk@${name} answers EIO (got ${r.error})`);
      continue;
    }
    const bad = chunksDiffering(r.data, frozen);
    t.ok(r.error === 0 && bad.length === 0, `${what}: disk@${name} is exact (error ${r.error}${bad.length ? `; chunks differing: ${bad.join(', ')}` : ''})`);
  }
}

t.test('delete hands its chunks down past a failed older neighbour (the older healthy snapshot stays exact)', async (t) => {
  // s0 holds chunk Y; s1 fails because preserving Y into it found the disk
  // full (s0 does not fail: it holds Y itself). With room again, s2 takes
  // chunk X, which s0 reads through s2 (s1 lacks X). Deleting s2 must give X
  // to s0, past the failed s1.
  const mnt = await smallFs(t, 32);
  if (!mnt) return;
  const size = 4 * MiB;
  const Y = 5;
  const X = 20;
  const img = path.join(mnt.dir, 'disk.img');
  const p0 = crypto.randomBytes(size);
  fs.writeFileSync(img, p0);
  const live = Buffer.from(p0);
  let srv: RunningServer | undefined = await startServer({ dir: mnt.dir, images: [img], args: CHUNK_ARGS });
  t.teardown(() => srv?.stop('SIGKILL'));
  let fill = '';
  const x0 = p0.subarray(X * CHUNK, (X + 1) * CHUNK);
  const readX = async (what: string): Promise<void> => {
    const c = await RawClient.connect(srv!.socket);
    try {
      await c.go('disk@s0');
      const r = await c.read(X * CHUNK, CHUNK);
      t.ok(r.error === 0 && r.data!.equals(x0), `${what}: disk@s0 reads chunk X as it was when s0 was created (error ${r.error}${r.error === 0 && !r.data!.equals(x0) ? ', got different data' : ''})`);
    } finally {
      await c.disconnect();
    }
    const all = await readAll(srv!.socket, 'disk@s0', size);
    const bad = chunksDiffering(all.data, p0);
    t.ok(all.error === 0 && bad.length === 0, `${what}: disk@s0 is exact (error ${all.error}${bad.length ? `; chunks differing: ${bad.join(', ')}` : ''})`);
  };
  try {
    t.equal((await cli(['snapshot', 'create', img, 's0'])).code, 0, 'create s0');
    checkWrites(t, await writeChunks(srv.socket, live, [Y]), 'write Y (s0 preserves it)');
    t.equal((await cli(['snapshot', 'create', img, 's1'])).code, 0, 'create s1');
    fill = fillUp(mnt.dir);
    checkWrites(t, await writeChunks(srv.socket, live, [Y]), 'write Y again with the disk full (preserving it into s1 fails)');
    const l1 = await list(t, img, 'after the failure');
    t.equal(l1.get('s1')?.state, 'failed', `s1 failed (${l1.get('s1')?.failure?.reason ?? ''})`);
    t.match(l1.get('s1')?.failure?.reason ?? '', SPACE, 's1 failed for lack of space');
    t.equal(l1.get('s0')?.state, 'active', 's0 (holds Y itself) stays active');
    fs.rmSync(fill);
    fill = '';
    t.equal((await cli(['snapshot', 'create', img, 's2'])).code, 0, 'create s2 with room again');
    checkWrites(t, await writeChunks(srv.socket, live, [X]), 'write X (s2 preserves it)');
    const l2 = await list(t, img, 'after writing X');
    t.same(['s0', 's1', 's2'].map((n) => l2.get(n)?.preservedChunks), [1, 0, 1], 'setup: s0 holds Y, s1 nothing, s2 holds X');
    await readX('before the delete');

    // With the disk full, s0 cannot take X: the delete is refused and
    // nothing changes (s0 is not marked failed, s2 stays and is exact).
    fill = fillUp(mnt.dir);
    const full = await cli(['snapshot', 'delete', img, 's2']);
    t.equal(full.code, 10, `snapshot delete s2 on a full disk fails with exit 10 (exit ${full.code}: ${full.stderr.trim().split('\n').at(-1) ?? ''})`);
    t.match(full.stderr.trim().split('\n').at(-1) ?? '', /\[SNAPSHOT_DELETE_FAILED\]$/, 'a stable error code, never a raw system error code');
    t.match(full.stderr, SPACE, 'the error says the disk is full');
    t.match(full.stderr, /copying chunk 20 to snapshot 1\b/, 'the error names the copy of X into s0 (id 1) that failed');
    const lf = await list(t, img, 'after the refused delete');
    t.same([...lf.values()].map((s) => [s.name, s.state]), [['s0', 'active'], ['s1', 'failed'], ['s2', 'active']], 'all three still listed, s0 and s2 active');
    await readX('after the refused delete');
    const s2 = await readAll(srv.socket, 'disk@s2', size);
    const s2want = Buffer.from(live);
    p0.copy(s2want, X * CHUNK, X * CHUNK, (X + 1) * CHUNK);
    t.ok(s2.error === 0 && s2.data!.equals(s2want), `disk@s2 is exact after the refused delete (error ${s2.error})`);
    fs.rmSync(fill);
    fill = '';

    const del = await cli(['snapshot', 'delete', img, 's2']);
    t.equal(del.code, 0, `snapshot delete s2 succeeds ${del.stderr.trim().split('\n').at(-1) ?? ''}`);
    const l3 = await list(t, img, 'after the delete');
    t.same([...l3.values()].map((s) => [s.name, s.state]), [['s0', 'active'], ['s1', 'failed']], 's0 active, s1 failed, s2 gone');
    t.equal(l3.get('s0')?.preservedChunks, 2, 's0 now holds Y and X');
    t.equal(l3.get('s1')?.preservedChunks, 0, 'nothing was copied into the failed s1');
    await readX('after the delete');
    t.equal((await readAll(srv.socket, 'disk@s1', size)).error, NBD.EIO, 'disk@s1 still answers EIO');
    const lv = await readAll(srv.socket, 'disk', size);
    t.ok(lv.error === 0 && lv.data!.equals(live), 'the live export holds every write');

    t.equal(await srv.stop(), 0, 'server exits 0');
    srv = undefined;
    srv = await startServer({ dir: mnt.dir, images: [img], args: CHUNK_ARGS });
    await readX('after a restart');
  } finally {
    if (srv) t.equal(await srv.stop(), 0, 'server exits 0');
    srv = undefined;
    if (fill) fs.rmSync(fill, { force: true });
  }
});

t.test('model check: failed snapshots interleaved with healthy ones, delete the newest and then a healthy middle one', async (t) => {
  // Chain s0 healthy, s1 failed, s2 healthy, s3 failed, s4. Each failed
  // snapshot also holds chunks of its own (preserved before the disk filled
  // up), which it keeps serving to older snapshots. The model is the live
  // bytes plus each snapshot's content at creation; after every step every
  // export is read in full and compared.
  const mnt = await smallFs(t, 32);
  if (!mnt) return;
  const size = 4 * MiB; // 64 chunks
  const img = path.join(mnt.dir, 'disk.img');
  const p0 = crypto.randomBytes(size);
  fs.writeFileSync(img, p0);
  const live = Buffer.from(p0);
  const model = new Map<string, Buffer | null>();
  let srv: RunningServer | undefined = await startServer({ dir: mnt.dir, images: [img], args: CHUNK_ARGS });
  t.teardown(() => srv?.stop('SIGKILL'));
  let fill = '';
  const create = async (name: string): Promise<void> => {
    t.equal((await cli(['snapshot', 'create', img, name])).code, 0, `create ${name}`);
    model.set(name, Buffer.from(live));
  };
  const write = async (chunks: number[], what: string): Promise<void> => checkWrites(t, await writeChunks(srv!.socket, live, chunks), what);
  /** Writes `trigger` with the disk full: preserving it into `name` (the newest) fails. */
  const failNewest = async (name: string, trigger: number): Promise<void> => {
    fill = fillUp(mnt.dir);
    await write([trigger], `write chunk ${trigger} with the disk full`);
    const l = await list(t, img, `${name} fails`);
    t.equal(l.get(name)?.state, 'failed', `${name} failed (${l.get(name)?.failure?.reason ?? ''})`);
    model.set(name, null);
    fs.rmSync(fill);
    fill = '';
  };
  const states = async (what: string): Promise<void> => {
    const l = await list(t, img, what);
    t.same(
      [...l.values()].map((s) => [s.name, s.state]),
      [...model].map(([n, m]) => [n, m ? 'active' : 'failed']),
      `${what}: the listed states match the model`,
    );
  };
  try {
    await create('s0');
    await write(range(0, 16), 's0 preserves chunks 0-15');
    await create('s1');
    await write([50, 51], 's1 preserves chunks 50, 51');
    await failNewest('s1', 0); // s0 holds chunk 0: only s1 fails
    await write(range(16, 24), 's1 failed: s0 (the newest healthy) preserves chunks 16-23');
    await create('s2');
    await write(range(20, 40), 's2 preserves chunks 20-39');
    await create('s3');
    await write([60, 61], 's3 preserves chunks 60, 61');
    await failNewest('s3', 20); // s2 holds chunk 20: only s3 fails
    await write(range(40, 44), 's3 failed: s2 preserves chunks 40-43');
    await create('s4');
    await write(range(0, 64), 's4 preserves every chunk');
    await states('before the deletes');
    await checkModel(t, srv, live, model, 'before the deletes');

    const d4 = await cli(['snapshot', 'delete', img, 's4']);
    t.equal(d4.code, 0, `delete s4 (its older neighbour s3 is failed) ${d4.stderr.trim().split('\n').at(-1) ?? ''}`);
    model.delete('s4');
    await states('after deleting s4');
    await checkModel(t, srv, live, model, 'after deleting s4');
    await write([3, 30, 45, 60], 'more writes (nothing left to preserve: s2 or s3 holds every chunk)');
    await checkModel(t, srv, live, model, 'after more writes');

    const d2 = await cli(['snapshot', 'delete', img, 's2']);
    t.equal(d2.code, 0, `delete s2 (healthy, its older neighbour s1 is failed) ${d2.stderr.trim().split('\n').at(-1) ?? ''}`);
    model.delete('s2');
    await states('after deleting s2');
    await checkModel(t, srv, live, model, 'after deleting s2');

    t.equal(await srv.stop(), 0, 'server exits 0');
    srv = undefined;
    t.ok(fs.readFileSync(img).equals(live), 'the image file holds every write');
    srv = await startServer({ dir: mnt.dir, images: [img], args: CHUNK_ARGS });
    await states('after a restart');
    await checkModel(t, srv, live, model, 'after a restart');
  } finally {
    if (srv) t.equal(await srv.stop(), 0, 'server exits 0');
    srv = undefined;
    if (fill) fs.rmSync(fill, { force: true });
  }
});
