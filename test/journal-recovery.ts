// The first-write journal across crashes, restarts, moves and faults: the
// defects an outside review reproduced, each as a regression test
// (docs/architecture.md, "First writes through a journal" and "Crash
// invariants").
//
//   1. an entry that ends exactly at the ring's end, checkpointed there, then
//      kill -9: the volume opens (and the next lap wraps correctly);
//   2. kill -9 during `snapshot create` with a first write queued and a later
//      direct write acknowledged: the snapshot, if listed, holds a prefix of
//      the acknowledged writes (here: both);
//   3. queued first writes that cannot be applied (the image's filesystem is
//      full): FLUSH reports it, reads work, create/delete fail at once with
//      QUEUE_STALLED, SIGTERM exits keeping the journal (and says so), and
//      the queue drains by itself once there is room;
//   4. a different NBD_JOURNAL_DIR between runs: the pending journal is found
//      through IMAGE.nbd/journal.state and replayed, and never again after;
//      a recorded journal that is missing refuses the open (JOURNAL_MISSING)
//      until `journal discard`; one lost with a reboot (memory-backed, other
//      boot id) is accepted with a warning;
//   5. `serve --read-only` with a pending journal: JOURNAL_PENDING, and
//      nothing written anywhere;
//   6. SIGTERM/SIGINT during start-up: logged, and every journal left holds
//      pending writes (the next start replays them); orphan journals are
//      named by serve, info and `journal list`.
//
// The test hook NBD_TEST_FIRST_WRITE_DELAY_MS=N makes the first-write thread
// sleep N ms before each batch, so queued writes stay queued for the test;
// NBD_TEST_OPEN_DELAY_MS=N pauses serve before opening each volume.
import t, { type Test } from 'tap';
import { spawn } from 'node:child_process';
import * as crypto from 'node:crypto';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { cli, expectError, expectOk, lastLine } from './fixtures/cli-expect';
import { readExport } from './fixtures/export-io';
import { crc32c, currentSuper, journalOf, journalState, pendingEntries, RING_BASE } from './fixtures/journal';
import { NBD, RawClient } from './fixtures/raw-client';
import { CLI, logLines, startServer, tempDirs, type RunningServer } from './fixtures/server';
import { ballast, smallFs } from './fixtures/small-fs';

const KiB = 1024;
const MiB = 1024 * KiB;
const PAUSED = { NBD_TEST_FIRST_WRITE_DELAY_MS: '120000' };

const tempDir = tempDirs(t);
const newDir = () => tempDir('nbd-jrecovery-');
/** A journal directory of its own, memory-backed like the default. */
const shmDir = tempDirs(t, fs.existsSync('/dev/shm') ? '/dev/shm' : undefined);
const newJournalDir = () => shmDir('nbd-jrecovery-j-');

async function serve(t: Test, dir: string, opts: { images?: string[]; env?: NodeJS.ProcessEnv; args?: string[]; size?: string } = {}): Promise<RunningServer> {
  const srv = await startServer({ dir, images: opts.images ?? ['disk.img'], env: opts.env, args: opts.args, size: opts.size });
  t.teardown(async () => {
    await srv.stop('SIGKILL');
  });
  return srv;
}

function sha256(file: string): string {
  return crypto.createHash('sha256').update(fs.readFileSync(file)).digest('hex');
}

/** Every regular file under a directory with its SHA-256 (the lock aside: taking it is not a change of data). */
function filesState(dir: string): Record<string, string> {
  const out: Record<string, string> = {};
  for (const e of fs.readdirSync(dir, { withFileTypes: true })) {
    if (e.isFile() && e.name !== 'lock') out[e.name] = sha256(path.join(dir, e.name));
  }
  return out;
}

/**
 * The volume's journal file: the one journal.state names (checked against its
 * id and `dir`); failing that, the only journal in `dir` (so a build without
 * journal.state still gets as far as the defect each test looks for).
 */
function theJournal(t: Test, img: string, dir: string): string {
  if (journalState(img)) return journalOf(img, dir);
  t.fail(`${img}: no journal.state names a journal`);
  const files = fs.readdirSync(dir).filter((f) => f.endsWith('.journal'));
  return path.join(dir, files.length === 1 ? files[0]! : 'none.journal');
}

async function connect(socket: string, name = 'disk'): Promise<RawClient> {
  const c = await RawClient.connect(socket);
  await c.go(name);
  return c;
}

async function readRange(t: Test, socket: string, name: string, off: number, len: number): Promise<Buffer> {
  const r = await readExport(socket, name, off, len);
  t.equal(r.error, 0, `read ${name} [${off}, +${len}): no error`);
  return r.data ?? Buffer.alloc(0);
}

/** Waits until `pred` holds, polling; fails the test with `what` after `ms`. */
async function waitFor(t: Test, what: string, pred: () => boolean | Promise<boolean>, ms = 60_000): Promise<boolean> {
  const end = Date.now() + ms;
  while (Date.now() < end) {
    if (await pred()) return true;
    await new Promise((r) => setTimeout(r, 20));
  }
  t.fail(`timed out waiting for: ${what}`);
  return false;
}

/** Resolves with the promise's value, or with `fallback` once `ms` have passed (a hang is a failure, not a wait forever). */
function within<T>(p: Promise<T>, ms: number, fallback: T): Promise<T> {
  return Promise.race([p, new Promise<T>((r) => setTimeout(() => r(fallback), ms).unref())]);
}

function manifestNames(img: string): string[] {
  try {
    const m = JSON.parse(fs.readFileSync(`${img}.nbd/manifest.json`, 'utf8')) as { manifest: { snapshots: { name: string }[] } };
    return m.manifest.snapshots.map((s) => s.name);
  } catch {
    return [];
  }
}

const REPLAY_MSG = 'applied first writes journalled before the last stop (preserved first)';
const replayed = (srv: RunningServer) => logLines<{ entries: number }>(srv).filter((l) => l.msg === REPLAY_MSG);

// ---- 1 --------------------------------------------------------------------------------

t.test('an entry ending exactly at the ring\'s end, checkpointed there, then kill -9: the volume opens and the next lap wraps', async (t) => {
  const dir = newDir();
  const img = path.join(dir, 'disk.img');
  // 64 MiB volume: a 4 MiB ring (volume/16); 4 KiB chunks.
  const J = newJournalDir();
  const env = { NBD_JOURNAL_DIR: J };
  const srv = await serve(t, dir, { size: '64M', args: ['--chunk-size', '4K'], env });
  expectOk(t, await cli(['snapshot', 'create', img, 's1']), 'snapshot create s1');
  const ring = 4 * MiB;
  // 1014 entries of 40 + 4096 bytes, then one of 40 + 360: 1014 * 4136 + 400 = 4 MiB exactly.
  const model = Buffer.alloc(64 * MiB);
  const c = await connect(srv.socket);
  try {
    for (let i = 0; i < 1014; i++) {
      const data = crypto.randomBytes(4 * KiB);
      data.copy(model, i * 4 * KiB);
      if ((await c.write(i * 4 * KiB, data)).error) return t.fail(`first write ${i} failed`);
    }
    const tail = crypto.randomBytes(360);
    tail.copy(model, 1014 * 4 * KiB);
    t.equal((await c.write(1014 * 4 * KiB, tail)).error, 0, 'the 360-byte first write');
    t.equal((await c.cmd(NBD.CMD_FLUSH, 0, 0, 0)).error, 0, 'FLUSH: everything applied and checkpointed');
  } finally {
    await c.disconnect();
  }
  const sb = currentSuper(fs.readFileSync(theJournal(t, img, J)));
  t.equal(sb?.ringSize, ring, 'the ring is 4 MiB');
  t.equal(sb?.replayOff, RING_BASE + ring, 'setup reached the boundary: the checkpoint is exactly at the ring\'s end');
  await srv.stop('SIGKILL');

  const list = await cli(['snapshot', 'list', img, '--json'], env);
  expectOk(t, list, 'offline snapshot list after the kill');
  const again = await serve(t, dir, { env });
  t.ok(again.ready, 'serve opens the volume');
  t.ok((await readRange(t, again.socket, 'disk', 0, 8 * MiB)).equals(model.subarray(0, 8 * MiB)), 'live holds every flushed write');
  t.ok((await readRange(t, again.socket, 'disk@s1', 0, 8 * MiB)).equals(Buffer.alloc(8 * MiB)), 'disk@s1 is still all zeroes');

  // The next lap: first writes again (new chunks), wrapping a fresh ring; kill with them queued.
  await again.stop('SIGKILL');
  const third = await serve(t, dir, { env: { ...PAUSED, ...env } });
  const c3 = await connect(third.socket);
  const errors: number[] = [];
  try {
    for (let i = 0; i < 40; i++) {
      const data = crypto.randomBytes(4 * KiB);
      const off = (2048 + i) * 4 * KiB;
      data.copy(model, off);
      errors.push((await c3.write(off, data)).error);
    }
  } finally {
    await c3.disconnect();
  }
  t.same(errors, Array(40).fill(0), '40 first writes acknowledged (queued)');
  await third.stop('SIGKILL');
  const fourth = await serve(t, dir, { args: ['--log-level', 'info'], env });
  t.same(replayed(fourth).map((l) => l.entries), [40], 'the 40 queued writes are replayed');
  t.ok((await readRange(t, fourth.socket, 'disk', 0, 16 * MiB)).equals(model.subarray(0, 16 * MiB)), 'live holds every acknowledged write');
  t.ok((await readRange(t, fourth.socket, 'disk@s1', 0, 16 * MiB)).equals(Buffer.alloc(16 * MiB)), 'disk@s1 is still all zeroes');
  t.equal(await fourth.stop('SIGTERM'), 0, 'graceful stop');
});

// ---- 2 --------------------------------------------------------------------------------

t.test('kill -9 during snapshot create with a first write queued: the snapshot holds a prefix of the acknowledged writes', async (t) => {
  const dir = newDir();
  const img = path.join(dir, 'disk.img');
  const SIZE = 8 * MiB;
  const content = crypto.randomBytes(SIZE);
  fs.writeFileSync(img, content);
  const model = Buffer.from(content);
  const CH = 16 * KiB;
  const a = 10 * CH;
  const b = 20 * CH;
  // Chunk b gets preserved into s0 by a replay (the thread itself is paused throughout).
  let srv = await serve(t, dir, { env: PAUSED });
  expectOk(t, await cli(['snapshot', 'create', img, 's0']), 'snapshot create s0');
  const w0 = crypto.randomBytes(4 * KiB);
  let c = await connect(srv.socket);
  t.equal((await c.write(b, w0)).error, 0, 'W0: first write to chunk b (queued)');
  await c.disconnect();
  w0.copy(model, b);
  await srv.stop('SIGKILL');
  srv = await serve(t, dir, { env: PAUSED });
  // W1: a first write to chunk a, queued and acknowledged; then W2 to chunk b
  // (preserved already, nothing queued there): applied directly, acknowledged after W1.
  const w1 = crypto.randomBytes(4 * KiB);
  const w2 = crypto.randomBytes(4 * KiB);
  c = await connect(srv.socket);
  t.equal((await c.write(a, w1)).error, 0, 'W1 acknowledged (queued)');
  t.equal((await c.write(b, w2)).error, 0, 'W2 acknowledged (direct, after W1)');
  await c.disconnect();
  w1.copy(model, a);
  w2.copy(model, b);

  // Create s1 while W1 is queued (the paused thread keeps it queued), and kill mid-create:
  // as soon as the manifest lists s1, or once the create has been pending a while.
  const create = cli(['snapshot', 'create', img, 's1']);
  await waitFor(t, 'the create to start (its store file)', () => fs.existsSync(`${img}.nbd/snap-2.snap`));
  const started = Date.now();
  await waitFor(t, 'the manifest to list s1, or 3 s of a pending create', () => manifestNames(img).includes('s1') || Date.now() - started > 3000);
  await srv.stop('SIGKILL');
  const r = await create;
  t.not(r.code, 0, `the interrupted create did not report success (exit ${r.code})`);

  const again = await serve(t, dir);
  const listed = manifestNames(img).includes('s1');
  t.comment(`after the kill s1 is ${listed ? 'listed' : 'absent'}`);
  t.ok((await readRange(t, again.socket, 'disk', 0, SIZE)).equals(model), 'live holds W0, W1 and W2');
  if (listed) {
    // Both were acknowledged before the create was issued: a snapshot has both, never W2 without W1.
    const s1 = await readRange(t, again.socket, 'disk@s1', 0, SIZE);
    t.ok(s1.subarray(a, a + 4 * KiB).equals(w1), 'disk@s1 holds W1');
    t.ok(s1.subarray(b, b + 4 * KiB).equals(w2), 'disk@s1 holds W2');
    t.ok(s1.equals(model), 'disk@s1 is exactly the acknowledged state');
  }
  const s0 = await readRange(t, again.socket, 'disk@s0', 0, SIZE);
  t.ok(s0.equals(content), 'disk@s0 is the original content');
  t.equal(await again.stop('SIGTERM'), 0, 'graceful stop');
});

// ---- 3 --------------------------------------------------------------------------------

/** Room left on the full filesystem: not enough for a 1 MiB write (the queue's partial applies then fill it). */
const ROOM = 384 * KiB;

t.test('queued first writes that cannot be applied (full filesystem): errors within seconds, no hang, the journal kept and drained later', async (t) => {
  const mnt = await smallFs(t, 24);
  if (!mnt) return;
  const img = path.join(mnt.dir, 'disk.img');
  let srv = await serve(t, mnt.dir, { size: '16M', args: ['--log-level', 'info'] });
  expectOk(t, await cli(['snapshot', 'create', img, 's1']), 'snapshot create s1');
  let weight = ballast(mnt.dir, ROOM);

  // A first write larger than the room left: acknowledged (queued); its apply has no room.
  const big = crypto.randomBytes(1 * MiB); // one journal entry (a larger write is queued in 1 MiB pieces)
  let c = await connect(srv.socket);
  t.equal((await c.write(0, big)).error, 0, 'the first write is acknowledged (queued)');
  const flush = await within(c.cmd(NBD.CMD_FLUSH, 0, 0, 0), 30_000, null);
  t.ok(flush && flush.error !== 0, `FLUSH reports the error within 30 s (error ${flush?.error})`);
  t.ok((await within(c.read(0, 1 * MiB), 30_000, null))?.data?.equals(big), 'reads still see the acknowledged write');
  const other = await within(c.write(12 * MiB, crypto.randomBytes(4 * KiB)), 30_000, null);
  t.ok(other !== null, `a new write is answered within 30 s (error ${other?.error})`);
  await c.disconnect();

  // Create fails at once: QUEUE_STALLED, or earlier, when its new store finds no room either.
  const create = await within(cli(['snapshot', 'create', img, 's2']), 60_000, null);
  t.ok(create, 'snapshot create returns within 60 s');
  t.match(create?.stderr ?? '', /\[(QUEUE_STALLED|SNAPSHOT_CREATE_FAILED)\]\n$/, `snapshot create fails with a clear code (${lastLine(create?.stderr ?? '')})`);
  t.notOk(manifestNames(img).includes('s2'), 'no snapshot s2');
  const roll = await within(cli(['rollback', img, 's1']), 60_000, null);
  t.ok(roll && roll.code !== 0, `rollback returns within 60 s and fails (${lastLine(roll?.stderr ?? '')})`);
  const del = await within(cli(['snapshot', 'delete', img, 's1']), 60_000, null);
  t.ok(del, 'snapshot delete returns within 60 s');
  if (del) expectError(t, del, 17, 'QUEUE_STALLED', 'snapshot delete with a stalled queue');

  // Room again: the queue drains by itself.
  fs.rmSync(weight);
  await waitFor(t, 'the queue to drain by itself', async () => {
    const r = await cli(['info', img, '--json']);
    return r.code === 0 && (JSON.parse(r.stdout) as { firstWrites?: { queued: number } }).firstWrites?.queued === 0;
  });
  c = await connect(srv.socket);
  t.equal((await c.cmd(NBD.CMD_FLUSH, 0, 0, 0)).error, 0, 'FLUSH succeeds once applied');
  await c.disconnect();
  t.ok(fs.readFileSync(img).subarray(0, 1 * MiB).equals(big), 'the RAW image holds the write');

  // Again with a healthy snapshot, then SIGTERM while stalled: exits, keeps the journal, says so.
  expectOk(t, await cli(['snapshot', 'create', img, 's3']), 'snapshot create s3 (room again)');
  weight = ballast(mnt.dir, ROOM);
  const big2 = crypto.randomBytes(1 * MiB);
  c = await connect(srv.socket);
  t.equal((await c.write(6 * MiB, big2)).error, 0, 'a first write into s3 is acknowledged (queued)');
  const f2 = await within(c.cmd(NBD.CMD_FLUSH, 0, 0, 0), 30_000, null);
  t.ok(f2 && f2.error !== 0, 'FLUSH reports the stall');
  await c.disconnect();
  const code = await within<number | null | 'hung'>(srv.stop('SIGTERM'), 60_000, 'hung');
  t.not(code, 'hung', `SIGTERM exits within 60 s (exit ${code})`);
  t.ok(
    logLines(srv).some((l) => /could not be applied to the image/.test(l.msg ?? '') && /keeps them for the next start/.test(l.msg ?? '')),
    'the log says the queued writes are kept in the journal',
  );
  const st = journalState(img);
  t.ok(st && fs.existsSync(st.path) && pendingEntries(fs.readFileSync(st.path)).length > 0, 'journal.state names the journal, which holds the writes');
  fs.rmSync(weight);
  srv = await serve(t, mnt.dir, { args: ['--log-level', 'info'] });
  t.ok(replayed(srv).length === 1 && (replayed(srv)[0]?.entries ?? 0) > 0, 'the next start replays them');
  t.ok((await readRange(t, srv.socket, 'disk', 6 * MiB, 1 * MiB)).equals(big2), 'live holds the kept write');
  t.equal(await srv.stop('SIGTERM'), 0, 'graceful stop');
  t.ok(fs.readFileSync(img).subarray(6 * MiB, 7 * MiB).equals(big2), 'the RAW image holds it');
});

// ---- 4 --------------------------------------------------------------------------------

/** Rewrites journal.state with another boot id (a restart of the machine), CRC recomputed. */
function pretendReboot(img: string): void {
  const file = `${img}.nbd/journal.state`;
  const text = fs.readFileSync(file, 'latin1');
  const body = text.slice(0, text.lastIndexOf('crc=')).replace(/^boot=.*$/m, 'boot=00000000-0000-0000-0000-000000000000');
  fs.writeFileSync(file, `${body}crc=${crc32c(0, Buffer.from(body, 'latin1')).toString(16).padStart(8, '0')}\n`);
}

t.test('a different journal directory between runs: the pending journal is found and replayed once; a missing one refuses until discarded', async (t) => {
  const dir = newDir();
  const img = path.join(dir, 'disk.img');
  const content = crypto.randomBytes(4 * MiB);
  fs.writeFileSync(img, content);
  const A = newJournalDir();
  const B = newJournalDir();
  const wA = Buffer.alloc(4 * KiB, 'A');
  const wN = Buffer.alloc(4 * KiB, 'N');

  let srv = await serve(t, dir, { env: { ...PAUSED, NBD_JOURNAL_DIR: A } });
  expectOk(t, await cli(['snapshot', 'create', img, 's1']), 'snapshot create s1');
  let c = await connect(srv.socket);
  t.equal((await c.write(0, wA)).error, 0, "'A' at offset 0 (queued)");
  await c.disconnect();
  await srv.stop('SIGKILL');
  t.equal(path.dirname(journalState(img)?.path ?? ''), fs.realpathSync(A), 'journal.state names the journal in A');

  srv = await serve(t, dir, { env: { NBD_JOURNAL_DIR: B } });
  t.ok((await readRange(t, srv.socket, 'disk', 0, 4 * KiB)).equals(wA), "served with B: offset 0 reads 'A' (replayed from A)");
  c = await connect(srv.socket);
  t.equal((await c.write(0, wN)).error, 0, "'N' at offset 0");
  t.equal((await c.cmd(NBD.CMD_FLUSH, 0, 0, 0)).error, 0, 'FLUSH');
  await c.disconnect();
  t.equal(await srv.stop('SIGTERM'), 0, 'graceful stop');
  srv = await serve(t, dir, { env: { NBD_JOURNAL_DIR: A } });
  t.ok((await readRange(t, srv.socket, 'disk', 0, 4 * KiB)).equals(wN), "served with A again: offset 0 reads 'N' (nothing stale replayed)");
  t.ok((await readRange(t, srv.socket, 'disk@s1', 0, 4 * KiB)).equals(content.subarray(0, 4 * KiB)), 'disk@s1 still the original');
  t.equal(await srv.stop('SIGTERM'), 0, 'graceful stop');
  t.same(fs.readdirSync(A).concat(fs.readdirSync(B)), [], 'no journal file left in A or B');

  // A recorded journal that is missing (same boot): refused, nothing changed, until discarded.
  srv = await serve(t, dir, { env: { ...PAUSED, NBD_JOURNAL_DIR: A } });
  c = await connect(srv.socket);
  t.equal((await c.write(64 * KiB, wA)).error, 0, 'a queued first write');
  await c.disconnect();
  await srv.stop('SIGKILL');
  const jfile = journalOf(img, A);
  fs.rmSync(jfile);
  const before = filesState(`${img}.nbd`);
  const imgSum = sha256(img);
  const refused = await cli(['serve', img, '--socket', path.join(dir, 'refused.sock')]);
  expectError(t, refused, 14, 'JOURNAL_MISSING', 'serve with the recorded journal missing');
  t.match(lastLine(refused.stderr), /journal discard/, 'the error says the way out');
  t.match(lastLine(refused.stderr), new RegExp(path.basename(jfile)), 'the error names the journal');
  expectError(t, await cli(['snapshot', 'list', img]), 14, 'JOURNAL_MISSING', 'offline snapshot list too');
  t.same(filesState(`${img}.nbd`), before, 'IMAGE.nbd/ unchanged');
  t.equal(sha256(img), imgSum, 'the image unchanged');
  const discard = await cli(['journal', 'discard', img]);
  expectOk(t, discard, 'journal discard');
  t.notOk(journalState(img), 'journal.state names no journal after the discard');
  srv = await serve(t, dir, { env: { NBD_JOURNAL_DIR: A } });
  t.ok((await readRange(t, srv.socket, 'disk', 64 * KiB, 4 * KiB)).equals(content.subarray(64 * KiB, 68 * KiB)), 'the discarded write is gone, as asked');
  t.equal(await srv.stop('SIGTERM'), 0, 'graceful stop');

  // Lost with a reboot (memory-backed, another boot id): accepted, with a warning.
  srv = await serve(t, dir, { env: { ...PAUSED, NBD_JOURNAL_DIR: A } });
  c = await connect(srv.socket);
  t.equal((await c.write(128 * KiB, wA)).error, 0, 'a queued first write');
  await c.disconnect();
  await srv.stop('SIGKILL');
  fs.rmSync(journalOf(img, A));
  pretendReboot(img);
  srv = await serve(t, dir, { env: { NBD_JOURNAL_DIR: A }, args: ['--log-level', 'info'] });
  t.ok(logLines(srv).some((l) => l.level === 40 && /restarted since/.test(l.msg ?? '')), 'a warning says the journal went with the restart');
  t.equal(await srv.stop('SIGTERM'), 0, 'graceful stop');
});

// ---- 5 --------------------------------------------------------------------------------

t.test('serve --read-only with a pending journal: JOURNAL_PENDING, nothing written; after a read-write start it serves', async (t) => {
  const dir = newDir();
  const img = path.join(dir, 'disk.img');
  const content = crypto.randomBytes(4 * MiB);
  fs.writeFileSync(img, content);
  const J = newJournalDir();
  let srv = await serve(t, dir, { env: { ...PAUSED, NBD_JOURNAL_DIR: J } });
  expectOk(t, await cli(['snapshot', 'create', img, 's1']), 'snapshot create s1');
  const w = crypto.randomBytes(64 * KiB);
  const c = await connect(srv.socket);
  t.equal((await c.write(256 * KiB, w)).error, 0, 'queued first write');
  await c.disconnect();
  await srv.stop('SIGKILL');
  const jfile = theJournal(t, img, J);
  const before = { meta: filesState(`${img}.nbd`), img: sha256(img), journal: sha256(jfile) };
  const r = await cli(['serve', img, '--read-only', '--socket', path.join(dir, 'ro.sock')], { NBD_JOURNAL_DIR: J });
  expectError(t, r, 13, 'JOURNAL_PENDING', 'serve --read-only with a pending journal');
  t.match(lastLine(r.stderr), /read-write/, 'the error says what to do');
  t.notMatch(r.stderr, /METADATA_CORRUPT/, 'not called corruption');
  t.same({ meta: filesState(`${img}.nbd`), img: sha256(img), journal: sha256(jfile) }, before, 'the image, IMAGE.nbd/ and the journal are unchanged');

  srv = await serve(t, dir, { env: { NBD_JOURNAL_DIR: J } });
  t.ok((await readRange(t, srv.socket, 'disk', 256 * KiB, 64 * KiB)).equals(w), 'read-write: replayed');
  t.equal(await srv.stop('SIGTERM'), 0, 'graceful stop');
  srv = await serve(t, dir, { args: ['--read-only'], env: { NBD_JOURNAL_DIR: J } });
  t.ok((await readRange(t, srv.socket, 'disk', 256 * KiB, 64 * KiB)).equals(w), 'read-only now serves it');
  t.ok((await readRange(t, srv.socket, 'disk@s1', 256 * KiB, 64 * KiB)).equals(content.subarray(256 * KiB, 320 * KiB)), 'disk@s1 the original');
  t.equal(await srv.stop('SIGTERM'), 0, 'graceful stop');
});

// ---- 6 --------------------------------------------------------------------------------

t.test('SIGTERM/SIGINT during start-up: logged, every journal left holds pending writes, the next start replays them; orphans are named', async (t) => {
  const dir = newDir();
  const J = newJournalDir();
  const N = 12;
  const images = Array.from({ length: N }, (_, i) => path.join(dir, `v${i}.img`));
  const data = images.map(() => crypto.randomBytes(16 * KiB));
  for (const img of images) {
    fs.writeFileSync(img, '');
    fs.truncateSync(img, 4 * MiB);
    expectOk(t, await cli(['snapshot', 'create', img, 's1']), `${path.basename(img)}: snapshot create s1 (offline)`);
  }
  // Pending writes in every other volume: kill -9 with them queued.
  const srv = await serve(t, dir, { images, env: { ...PAUSED, NBD_JOURNAL_DIR: J } });
  for (let i = 0; i < N; i += 2) {
    const c = await connect(srv.socket, `v${i}`);
    t.equal((await c.write(0, data[i]!)).error, 0, `v${i}: queued first write`);
    await c.disconnect();
  }
  await srv.stop('SIGKILL');
  // Kept aside for the orphan check at the end: a pending journal of v0.
  const pendingCopy = path.join(dir, 'v0-journal.copy');
  const v0journal = journalState(images[0]!)?.path;
  if (v0journal) fs.copyFileSync(v0journal, pendingCopy);

  for (const sig of ['SIGTERM', 'SIGINT'] as const) {
    // Start, and stop it once a few volumes are open (a pause before each open keeps it in start-up).
    const out = { text: '' };
    const p = spawn(process.execPath, [CLI, 'serve', ...images, '--socket', path.join(dir, 'nbd.sock'), '--log-level', 'info'], {
      env: { ...process.env, NBD_JOURNAL_DIR: J, NBD_TEST_OPEN_DELAY_MS: '200' },
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    p.stdout.on('data', (d: Buffer) => (out.text += d.toString()));
    p.stderr.on('data', (d: Buffer) => (out.text += d.toString()));
    const exited = new Promise<number | null>((r) => p.once('exit', (code) => r(code)));
    // A random moment of the start-up: after k of the N volumes are open.
    const k = 1 + crypto.randomInt(N - 1);
    await waitFor(t, `${k} volumes opened`, () => (out.text.match(/"export added"/g) ?? []).length >= k);
    t.comment(`${sig} after ${k} of ${N} volumes opened`);
    p.kill(sig);
    const code = await within(exited, 60_000, -1);
    t.equal(code, 0, `${sig} during start-up: exit 0`);
    t.notMatch(out.text, /"ready"/, `${sig}: never became ready`);
    t.match(out.text, /stop requested during start-up/, `${sig}: logged`);
    t.match(out.text, /stopped during start-up/, `${sig}: the end logged`);
    for (const f of fs.readdirSync(J)) {
      const file = path.join(J, f);
      const owner = images.find((img) => journalState(img)?.path === file);
      t.ok(owner, `${sig}: ${f} is named by a volume`);
      t.ok(pendingEntries(fs.readFileSync(file)).length > 0, `${sig}: ${f} holds pending writes`);
    }
  }
  // Two orphans: a copy of a pending journal under an id no volume names (its
  // owner is a served volume: its open removes it), and a file that is no
  // journal of this build (an older build's): named, never removed.
  const some = fs.existsSync(pendingCopy);
  const own = path.join(J, `${'0'.repeat(32)}.journal`);
  if (some) fs.copyFileSync(pendingCopy, own);
  const foreign = path.join(J, '65024-12345-1700000000000000000.journal');
  fs.writeFileSync(foreign, Buffer.alloc(8192, 1));
  const all = await serve(t, dir, { images, env: { NBD_JOURNAL_DIR: J }, args: ['--log-level', 'info'] });
  for (let i = 0; i < N; i += 2) {
    t.ok((await readRange(t, all.socket, `v${i}`, 0, 16 * KiB)).equals(data[i]!), `v${i}: the pending write is there after the full start`);
  }
  if (some) {
    t.ok(logLines<{ journals: string[] }>(all).some((l) => /^removed journals of this volume/.test(l.msg ?? '') && (l.journals ?? []).includes(own)), 'the copy (owned by a served volume, not named by it) is removed at its open');
    t.notOk(fs.existsSync(own), 'it is gone');
  } else t.fail('setup: a pending journal was left to copy');
  t.ok(logLines(all).some((l) => /orphan first-write journal/.test(l.msg ?? '') && (l as { journal?: string }).journal === foreign), 'serve names the foreign journal file');
  const info = await cli(['info', images[0]!, '--json']);
  expectOk(t, info, 'info --json');
  t.ok((JSON.parse(info.stdout) as { orphanJournals: { path: string }[] }).orphanJournals.some((o) => o.path === foreign), 'info lists it');
  const list = await cli(['journal', 'list', '--json'], { NBD_JOURNAL_DIR: J });
  t.ok((JSON.parse(list.stdout) as { orphans: { path: string }[] }).orphans.some((o) => o.path === foreign), 'journal list lists it');
  const orphan = foreign;
  t.equal(await all.stop('SIGTERM'), 0, 'graceful stop');
  t.same(fs.readdirSync(J).filter((f) => f !== path.basename(orphan)), [], 'after a clean stop only the orphan is left');
});

// ---- 7 --------------------------------------------------------------------------------

t.test('--journal-memory bounds journal memory across volumes: beyond it, first writes are preserved inline', async (t) => {
  const dir = newDir();
  const J = newJournalDir();
  const images = ['a.img', 'b.img', 'c.img'].map((n) => path.join(dir, n));
  // 64 MiB volumes: 4 MiB rings; a budget of 8 MiB takes two of them.
  const srv = await serve(t, dir, { images, size: '64M', args: ['--journal-memory', '8M'], env: { NBD_JOURNAL_DIR: J } });
  const data = images.map(() => crypto.randomBytes(64 * KiB));
  const modes: string[] = [];
  for (const [i, img] of images.entries()) {
    expectOk(t, await cli(['snapshot', 'create', img, 's1']), `${path.basename(img)}: snapshot create s1`);
    const c = await connect(srv.socket, path.basename(img, '.img'));
    t.equal((await c.write(0, data[i]!)).error, 0, `${path.basename(img)}: first write acknowledged`);
    await c.disconnect();
    const info = await cli(['info', img, '--json']);
    modes.push((JSON.parse(info.stdout) as { firstWrites: { mode: string } }).firstWrites.mode);
  }
  t.same(modes.slice(0, 2), ['journal', 'journal'], 'the first two volumes journal their first writes');
  t.match(modes[2], /^inline \(journal unavailable: .*--journal-memory/, 'the third preserves inline, and says why');
  t.equal(fs.readdirSync(J).length, 2, 'two journal files');
  for (const [i, img] of images.entries()) {
    const name = path.basename(img, '.img');
    t.ok((await readRange(t, srv.socket, name, 0, 64 * KiB)).equals(data[i]!), `${name}: live holds the write`);
    t.ok((await readRange(t, srv.socket, `${name}@s1`, 0, 64 * KiB)).equals(Buffer.alloc(64 * KiB)), `${name}@s1: zeroes`);
  }
});
