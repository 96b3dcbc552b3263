// First writes after a snapshot go through a journal (native/core/
// first_write_queue.hh, write_journal.hh), tested end to end through the CLI.
//
// Design note. A first write (WRITE, WRITE_ZEROES or TRIM to a chunk whose
// old data is not yet preserved in the newest snapshot) is appended to the
// volume's journal (in NBD_JOURNAL_DIR, default /dev/shm/node-nbd-server) and
// to an in-memory queue and acknowledged at once; a
// background thread preserves the old data of the chunks a batch touches,
// then applies the batch to the raw image. The test hook
// NBD_TEST_FIRST_WRITE_DELAY_MS=N makes that thread sleep N ms before each
// batch, so with a long delay every acknowledged first write stays queued and
// the test can look at the state in between: the live export must already
// show the writes (queued entries laid over the raw image; block status says
// "data"), the snapshot export and the RAW image file must still hold the old
// data (the invariant: the raw image never changes for a chunk before its old
// data is durable in the snapshot), and the journal file must hold exactly the
// acknowledged entries in order (parsed here from the format described in
// write_journal.hh, CRC-32C included, independently of the server's code).
//
// Then: SIGKILL with queued entries and a restart (the journal is replayed:
// preserved first, then applied; the server logs it and `info --json` counts
// it), a torn journal tail (an entry whose checksum fails ends the replay:
// earlier entries are applied, it and later ones are dropped; stale entries
// are never replayed again), both journal superblocks corrupt (serve refuses
// with METADATA_CORRUPT and modifies nothing), FLUSH and FUA are durable
// through the raw image (it holds the writes when they return), snapshot
// create/delete drain the queue first (the new snapshot holds every
// acknowledged write), and
// --cow-journal 0 (inline preservation, no journal file) plus the option's
// bounds (BAD_ARGUMENT, exit 2).
//
// Images are 8 MiB, fully allocated with random content (so raw-file checks
// mean something), default chunk size 64 KiB. All data is random.
import t, { type Test } from 'tap';
import * as crypto from 'node:crypto';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { cli, expectError, expectOk, lastLine } from './fixtures/cli-expect';
import { readExport } from './fixtures/export-io';
import { currentSuper, ENTRY_HEADER, journalOf, journalState, pendingEntries, readSupers, RING_BASE, SLOTS, T_WRITE, T_ZERO, type Entry } from './fixtures/journal';
import { pyNbd } from './fixtures/exec';
import { NBD, RawClient } from './fixtures/raw-client';
import { logLines, startServer, tempDirs, type RunningServer } from './fixtures/server';
import { requireTools } from './fixtures/tools';

const KiB = 1024;
const MiB = 1024 * KiB;
const CHUNK = 16 * KiB; // the default chunk size
const SIZE = 8 * MiB;
const NCHUNKS = SIZE / CHUNK;
/** The preserver sleeps this long before its first batch: nothing is applied during a subtest. */
const PAUSED = { NBD_TEST_FIRST_WRITE_DELAY_MS: '120000' };
const REPLAY_MSG = 'applied first writes journalled before the last stop (preserved first)';

// ---- directories, servers, CLI -------------------------------------------------------

const tempDir = tempDirs(t);
const newDir = () => tempDir('nbd-fwjournal-');

/** A fully allocated image of random content. */
function makeImage(dir: string, name = 'disk.img'): { img: string; content: Buffer } {
  const img = path.join(dir, name);
  const content = crypto.randomBytes(SIZE);
  fs.writeFileSync(img, content);
  return { img, content };
}

/**
 * Starts the CLI server in `dir`; killed at the end of the subtest (SIGKILL: a
 * paused preserver would make a graceful stop wait for its delay). Tests that
 * want a graceful stop call stop() themselves first.
 */
async function serve(t: Test, dir: string, opts: { images?: string[]; env?: NodeJS.ProcessEnv; args?: string[] } = {}): Promise<RunningServer> {
  const srv = await startServer({ dir, images: opts.images ?? ['disk.img'], env: opts.env, args: opts.args });
  t.teardown(async () => {
    await srv.stop('SIGKILL');
  });
  return srv;
}

interface FirstWritesJson {
  mode: string;
  queued: number;
  replayedAtOpen: number;
}

/** `info IMAGE --json` (through the control socket when served: it waits until queued writes are applied). */
async function firstWritesInfo(t: Test, img: string, what: string): Promise<FirstWritesJson | undefined> {
  const r = await cli(['info', img, '--json']);
  expectOk(t, r, `${what}: info --json`);
  try {
    const fw = (JSON.parse(r.stdout) as { firstWrites?: FirstWritesJson }).firstWrites;
    t.ok(fw, `${what}: info --json has firstWrites`);
    return fw;
  } catch {
    t.fail(`${what}: info --json prints JSON (${r.stdout.slice(0, 200)})`);
    return undefined;
  }
}

/** The server's pino lines with the replay message. */
function replayLogLines(srv: RunningServer): { entries?: number; level?: number; volume?: string }[] {
  return logLines<{ entries: number; volume: string }>(srv).filter((l) => l.msg === REPLAY_MSG);
}

function firstDiff(a: Buffer, b: Buffer): number {
  const n = Math.min(a.length, b.length);
  for (let off = 0; off < n; off += CHUNK) {
    const end = Math.min(off + CHUNK, n);
    if (a.subarray(off, end).equals(b.subarray(off, end))) continue;
    for (let i = off; i < end; i++) if (a[i] !== b[i]) return i;
  }
  return a.length === b.length ? -1 : n;
}

function differingChunks(a: Buffer, b: Buffer): number[] {
  const out: number[] = [];
  for (let c = 0; c * CHUNK < Math.max(a.length, b.length); c++) {
    if (!a.subarray(c * CHUNK, (c + 1) * CHUNK).equals(b.subarray(c * CHUNK, (c + 1) * CHUNK))) out.push(c);
  }
  return out;
}

/** Byte equality with a readable message: the first differing byte and the differing chunks. */
function sameBytes(t: Test, actual: Buffer | undefined, expected: Buffer, what: string): boolean {
  if (!actual) {
    t.fail(`${what}: no data`);
    return false;
  }
  const at = firstDiff(actual, expected);
  if (at < 0) {
    t.pass(what);
    return true;
  }
  const chunks = differingChunks(actual, expected);
  t.fail(
    `${what}: differs from byte ${at} (chunk ${Math.floor(at / CHUNK)}); ${chunks.length} differing chunk(s): ${chunks.slice(0, 12).join(', ')}` +
      (actual.length !== expected.length ? `; length ${actual.length}, expected ${expected.length}` : ''),
  );
  return false;
}

/** Reads a whole export (fresh connection). */
async function readWhole(t: Test, socket: string, name: string): Promise<Buffer | undefined> {
  const r = await readExport(socket, name, 0, SIZE);
  t.equal(r.error, 0, `reading export ${name}: no error`);
  return r.data;
}

// ---- operations and their model -------------------------------------------------------

type Op =
  | { kind: 'write'; off: number; data: Buffer; fua?: boolean }
  | { kind: 'zero'; off: number; len: number }
  | { kind: 'trim'; off: number; len: number };

const opLen = (op: Op) => (op.kind === 'write' ? op.data.length : op.len);
const describe = (op: Op) => `${op.kind}${op.kind === 'write' && op.fua ? '+FUA' : ''} [${op.off}, +${opLen(op)}) (chunk ${Math.floor(op.off / CHUNK)})`;

function applyOp(model: Buffer, op: Op): void {
  if (op.kind === 'write') op.data.copy(model, op.off);
  else model.fill(0, op.off, op.off + op.len); // a TRIM here reads back as zeroes (queued as a zeroing that may punch)
}

async function sendOp(c: RawClient, op: Op): Promise<number> {
  if (op.kind === 'write') return (await c.write(op.off, op.data, op.fua ? NBD.CMD_FLAG_FUA : 0)).error;
  return (await c.cmd(op.kind === 'zero' ? NBD.CMD_WRITE_ZEROES : NBD.CMD_TRIM, 0, op.off, op.len)).error;
}

function shuffledChunks(): number[] {
  const a = Array.from({ length: NCHUNKS }, (_, i) => i);
  for (let i = a.length - 1; i > 0; i--) {
    const j = crypto.randomInt(i + 1);
    [a[i], a[j]] = [a[j]!, a[i]!];
  }
  return a;
}

/** A 512-aligned offset inside chunk c leaving `room` bytes before the chunk's end. */
const inChunk = (c: number, room: number) => c * CHUNK + 512 * crypto.randomInt((CHUNK - room) / 512 + 1);

/**
 * The first-write mix: 20 random 4 KiB writes in distinct chunks, a partial
 * overlapping rewrite of one, a WRITE_ZEROES over part of another and a small
 * write into that zeroed range (order matters), a write across a chunk
 * boundary, a chunk-sized TRIM and a FUA write. Every op touches chunks not
 * preserved yet (or chunks with queued entries), so each is one journal entry.
 */
function firstWriteOps(opts: { fua?: boolean } = {}): Op[] {
  const ch = shuffledChunks();
  const ops: Op[] = [];
  const blocks = ch.slice(0, 20).map((c) => ({ kind: 'write' as const, off: inChunk(c, 16 * KiB), data: crypto.randomBytes(4 * KiB) }));
  ops.push(...blocks);
  ops.push({ kind: 'write', off: blocks[0]!.off + 2 * KiB, data: crypto.randomBytes(4 * KiB) }); // half over block 0, half past it
  ops.push({ kind: 'zero', off: blocks[1]!.off + 2 * KiB, len: 8 * KiB }); // over the second half of block 1 and beyond
  ops.push({ kind: 'write', off: blocks[1]!.off + 4 * KiB, data: crypto.randomBytes(KiB) }); // into the zeroed range
  const across = ch.slice(20).find((c) => c < NCHUNKS - 1)!;
  ops.push({ kind: 'write', off: (across + 1) * CHUNK - 4 * KiB, data: crypto.randomBytes(8 * KiB) });
  const trimmed = ch.slice(20).find((c) => c !== across && c !== across + 1)!;
  ops.push({ kind: 'trim', off: trimmed * CHUNK, len: CHUNK });
  if (opts.fua) {
    // FUA is durable through the live image: its reply waits until the
    // write is preserved and applied (so never with the preserver paused).
    const fua = ch.slice(20).find((c) => c !== across && c !== across + 1 && c !== trimmed)!;
    ops.push({ kind: 'write', off: inChunk(fua, 4 * KiB), data: crypto.randomBytes(4 * KiB), fua: true });
  }
  return ops;
}

/** Sends ops on one connection to `disk`; every one must be acknowledged with 0. Optionally FLUSH at the end. */
async function sendOps(t: Test, socket: string, ops: Op[], model: Buffer, opts: { flush?: boolean } = {}): Promise<void> {
  const c = await RawClient.connect(socket);
  try {
    const go = await c.go('disk');
    t.ok(go.flags & NBD.FLAG_SEND_TRIM && go.flags & NBD.FLAG_SEND_WRITE_ZEROES && go.flags & NBD.FLAG_SEND_FUA, 'disk advertises TRIM, WRITE_ZEROES and FUA');
    const bad: string[] = [];
    for (const op of ops) {
      const e = await sendOp(c, op);
      if (e) bad.push(`${describe(op)}: errno ${e}`);
      else applyOp(model, op);
    }
    t.same(bad, [], `all ${ops.length} first writes (WRITE, WRITE_ZEROES, TRIM${ops.some((o) => o.kind === 'write' && o.fua) ? ', FUA WRITE' : ''}) acknowledged with error 0`);
    if (opts.flush) t.equal((await c.cmd(NBD.CMD_FLUSH, 0, 0, 0)).error, 0, 'FLUSH after the first writes: error 0');
  } finally {
    await c.disconnect();
  }
}

/** The journal holds exactly `ops`, in order, as entries of the right type, range and data. */
function checkJournalHolds(t: Test, img: string, ops: Op[], what: string): Entry[] {
  const j = fs.readFileSync(journalOf(img));
  const sb = currentSuper(j);
  t.ok(sb, `${what}: the journal has a valid superblock`);
  const entries = pendingEntries(j);
  t.equal(entries.length, ops.length, `${what}: the journal holds ${ops.length} entries to replay (found ${entries.length})`);
  const wrong: string[] = [];
  ops.forEach((op, i) => {
    const e = entries[i];
    if (!e) return;
    const type = op.kind === 'write' ? T_WRITE : T_ZERO;
    if (e.type !== type || e.offset !== op.off || e.length !== opLen(op)) {
      wrong.push(`#${i} ${describe(op)}: entry type ${e.type} [${e.offset}, +${e.length})`);
    } else if (op.kind === 'write' && !e.data.equals(op.data)) wrong.push(`#${i} ${describe(op)}: data differs`);
    else if (op.kind !== 'write' && e.data.length !== 0) wrong.push(`#${i} ${describe(op)}: a zeroing entry with ${e.data.length} data bytes`);
    else if (op.kind === 'trim' && !(e.flags & 1)) wrong.push(`#${i} ${describe(op)}: TRIM entry without the may-punch flag`);
  });
  t.same(wrong, [], `${what}: each entry is its write, in order (type, range, data)`);
  const seqs = entries.map((e) => e.seq);
  t.ok(seqs.every((s, i) => i === 0 || s === seqs[i - 1]! + 1n), `${what}: consecutive sequence numbers`);
  return entries;
}

// ---- 1 ---------------------------------------------------------------------------------

t.test('queued first writes: live reads see them, the raw image and the snapshot keep the old data until preserved', async (t) => {
  const dir = newDir();
  const { img, content } = makeImage(dir);
  const sparseImg = path.join(dir, 'sparse.img');
  fs.writeFileSync(sparseImg, '');
  fs.truncateSync(sparseImg, SIZE);
  const srv = await serve(t, dir, { images: ['disk.img', 'sparse.img'], env: PAUSED });
  expectOk(t, await cli(['snapshot', 'create', img, 's1']), 'snapshot create disk s1');
  expectOk(t, await cli(['snapshot', 'create', sparseImg, 's1']), 'snapshot create sparse s1');
  t.notOk(journalState(img), 'no journal before the first first write (a volume that gets none pins no memory)');

  const model = Buffer.from(content);
  const ops = firstWriteOps();
  await sendOps(t, srv.socket, ops, model); // no FLUSH/FUA: they wait for the (paused) preserver
  t.ok(fs.existsSync(journalOf(img)), 'the first first write made the journal, in the journal directory, named by journal.state');
  t.notOk(fs.readdirSync(`${img}.nbd`).some((f) => f.endsWith('.journal')), 'no journal inside IMAGE.nbd/ (the journal directory is usable)');
  t.notOk(model.equals(content), 'the writes change the model (sanity)');

  sameBytes(t, await readWhole(t, srv.socket, 'disk'), model, 'live export disk reads every acknowledged write (queued entries over the raw image, in order)');
  sameBytes(t, await readWhole(t, srv.socket, 'disk@s1'), content, 'snapshot export disk@s1 reads the original content');
  // Unaligned reads straddling queued entries (a partial overlay).
  const probe = ops[20]!; // the overlapping rewrite of block 0
  const r = await readExport(srv.socket, 'disk', probe.off - 1000, 7000);
  t.equal(r.error, 0, 'unaligned read across queued entries: no error');
  sameBytes(t, r.data, model.subarray(probe.off - 1000, probe.off + 6000), 'unaligned read across queued entries: the model');

  // The invariant: nothing preserved yet, so the raw file is untouched, every chunk.
  sameBytes(t, fs.readFileSync(img), content, 'the RAW image file still holds the original data at every chunk (nothing written before preservation)');
  const snap1 = path.join(`${img}.nbd`, 'snap-1.snap');
  t.ok(fs.existsSync(snap1), 'snap-1.snap exists');
  checkJournalHolds(t, img, ops, 'while queued');

  // Block status of a sparse volume: a queued write into a hole is data.
  const b = await RawClient.connect(srv.socket);
  try {
    await b.go('sparse', { blockStatus: true });
    const data = crypto.randomBytes(4 * KiB);
    t.equal((await b.write(10 * CHUNK + 8 * KiB, data)).error, 0, 'sparse: first write into a hole acknowledged');
    const ext = await extentsOf(b, 9 * CHUNK, 3 * CHUNK);
    const at = (off: number) => ext.find((e) => e.start <= off && off < e.start + e.length)?.flags;
    t.equal(at(9 * CHUNK), 3, 'sparse: block status of an untouched hole chunk: hole,zero (3)');
    t.equal(at(10 * CHUNK), 0, 'sparse: block status of the chunk with a queued write: data (0)');
    t.equal(at(10 * CHUNK + CHUNK - 1), 0, 'sparse: ... for the whole chunk');
    t.equal(at(11 * CHUNK), 3, 'sparse: block status of the next hole chunk: hole,zero (3)');
    const rd = await b.read(10 * CHUNK, CHUNK);
    const want = Buffer.alloc(CHUNK);
    data.copy(want, 8 * KiB);
    t.equal(rd.error, 0, 'sparse: read of the chunk: no error');
    sameBytes(t, rd.data, want, 'sparse: the chunk reads as zeroes with the queued write');
  } finally {
    await b.disconnect();
  }
  sameBytes(t, fs.readFileSync(sparseImg), Buffer.alloc(SIZE), 'sparse: the raw file is still all zeroes');
  t.equal(srv.proc.exitCode, null, 'the server is still running');
});

/** base:allocation extents of [offset, offset+length), following short replies. */
async function extentsOf(c: RawClient, offset: number, length: number): Promise<{ start: number; length: number; flags: number }[]> {
  const out: { start: number; length: number; flags: number }[] = [];
  let pos = offset;
  while (pos < offset + length) {
    const r = await c.cmd(NBD.CMD_BLOCK_STATUS, 0, pos, offset + length - pos);
    if (r.error) throw new Error(`BLOCK_STATUS at ${pos}: errno ${r.error}`);
    const before = pos;
    for (const ch of r.chunks) {
      for (const e of ch.extents ?? []) {
        out.push({ start: pos, length: e.length, flags: e.flags });
        pos += e.length;
      }
    }
    if (pos === before) throw new Error(`BLOCK_STATUS at ${pos}: no progress`);
  }
  return out;
}

// ---- 2 ---------------------------------------------------------------------------------

t.test('SIGKILL with queued first writes: replay preserves, then applies', async (t) => {
  const dir = newDir();
  const { img, content } = makeImage(dir);
  const srv = await serve(t, dir, { env: PAUSED });
  expectOk(t, await cli(['snapshot', 'create', img, 's1']), 'snapshot create s1');
  const model = Buffer.from(content);
  const ops = firstWriteOps();
  await sendOps(t, srv.socket, ops, model); // no FLUSH: the page cache survives a killed process
  await srv.stop('SIGKILL');
  t.equal(srv.proc.signalCode, 'SIGKILL', 'the server was killed');

  sameBytes(t, fs.readFileSync(img), content, 'after the kill the RAW image file still holds the original data');
  const jfile = journalOf(img);
  t.ok(fs.existsSync(jfile) && fs.statSync(jfile).size > RING_BASE, 'the journal exists and is not empty');
  const j = fs.readFileSync(jfile);
  const sb = currentSuper(j);
  t.match(sb, { chunkSize: CHUNK, volumeSize: BigInt(SIZE), ringSize: 4 * MiB }, 'superblock: chunk size, volume size, default ring (volume/16 clamped to 4 MiB)');
  checkJournalHolds(t, img, ops, 'after the kill');

  const again = await serve(t, dir, { args: ['--log-level', 'info'] });
  const lines = replayLogLines(again);
  t.equal(lines.length, 1, `the server logs "${REPLAY_MSG}" once`);
  t.equal(lines[0]?.entries, ops.length, `... with entries = ${ops.length}`);
  t.equal(lines[0]?.level, 30, '... at level info');
  sameBytes(t, await readWhole(t, again.socket, 'disk'), model, 'after replay the live export holds every acknowledged write');
  sameBytes(t, await readWhole(t, again.socket, 'disk@s1'), content, 'after replay disk@s1 still reads the original content (preserved before applying)');
  const fw = await firstWritesInfo(t, img, 'after replay');
  t.match(fw, { mode: 'journal', queued: 0, replayedAtOpen: ops.length }, `info --json: firstWrites {mode: journal, queued: 0, replayedAtOpen: ${ops.length}}`);

  t.equal(await again.stop('SIGTERM'), 0, 'graceful stop: exit 0');
  sameBytes(t, fs.readFileSync(img), model, 'after a graceful stop the RAW image file equals the model');
  t.notOk(fs.existsSync(jfile), 'after a graceful stop (queue drained) the journal file is gone: nothing to replay, no memory kept');

  const third = await serve(t, dir, { args: ['--log-level', 'info'] });
  t.equal(replayLogLines(third).length, 0, 'the next start replays nothing (no replay log line)');
  sameBytes(t, await readWhole(t, third.socket, 'disk'), model, 'the next start: live still the model');
  sameBytes(t, await readWhole(t, third.socket, 'disk@s1'), content, 'the next start: disk@s1 still the original');
  t.equal(await third.stop('SIGTERM'), 0, 'graceful stop: exit 0');
});

// ---- 3 ---------------------------------------------------------------------------------

t.test('torn journal tail (power loss of unflushed writes): entries up to the damage are applied, the rest dropped, snapshots stay exact', async (t) => {
  const dir = newDir();
  const { img, content } = makeImage(dir);
  const srv = await serve(t, dir, { env: PAUSED });
  expectOk(t, await cli(['snapshot', 'create', img, 's1']), 'snapshot create s1');
  const [ca, cb, cc] = shuffledChunks();
  const ops: Op[] = [ca!, cb!, cc!].map((c) => ({ kind: 'write', off: inChunk(c, 4 * KiB), data: crypto.randomBytes(4 * KiB) }));
  const all = Buffer.from(content);
  await sendOps(t, srv.socket, ops, all); // A, B, C; no FLUSH
  await srv.stop('SIGKILL');
  sameBytes(t, fs.readFileSync(img), content, 'after the kill the RAW image file is unchanged');

  const jfile = journalOf(img);
  const entries = checkJournalHolds(t, img, ops, 'after the kill');
  if (entries.length !== 3) return;
  // Damage entry C's data: as if the power went before its page reached the disk.
  const c = entries[2]!;
  const fd = fs.openSync(jfile, 'r+');
  try {
    const b = Buffer.alloc(1);
    fs.readSync(fd, b, 0, 1, c.at + ENTRY_HEADER + 100);
    b[0] = b[0]! ^ 0xff;
    fs.writeSync(fd, b, 0, 1, c.at + ENTRY_HEADER + 100);
  } finally {
    fs.closeSync(fd);
  }
  t.equal(pendingEntries(fs.readFileSync(jfile)).length, 2, 'sanity: with C damaged the journal yields A and B only');

  const model = Buffer.from(content);
  applyOp(model, ops[0]!);
  applyOp(model, ops[1]!);
  let again = await serve(t, dir, { args: ['--log-level', 'info'] });
  t.same(replayLogLines(again).map((l) => l.entries), [2], 'the server logs the replay of 2 entries');
  sameBytes(t, await readWhole(t, again.socket, 'disk'), model, 'live: A and B applied, C\'s chunk still the old data');
  sameBytes(t, await readWhole(t, again.socket, 'disk@s1'), content, 'disk@s1 reads the original content everywhere');

  // The dropped C chunk is still a first write; B's chunk is preserved now (a direct write).
  const c2: Op = { kind: 'write', off: ops[2]!.off, data: crypto.randomBytes(4 * KiB) };
  const b2: Op = { kind: 'write', off: ops[1]!.off, data: crypto.randomBytes(4 * KiB) };
  await sendOps(t, again.socket, [c2, b2], model, { flush: true });
  const fw = await firstWritesInfo(t, img, 'after the new writes'); // waits until the queue is applied
  t.match(fw, { mode: 'journal', queued: 0, replayedAtOpen: 2 }, 'info --json: firstWrites {mode: journal, queued: 0, replayedAtOpen: 2}');
  sameBytes(t, await readWhole(t, again.socket, 'disk'), model, 'live after the new writes');
  sameBytes(t, await readWhole(t, again.socket, 'disk@s1'), content, 'disk@s1 still the original after the new writes');

  // A kill now: stale entries of the earlier run (A, B, damaged C) must never be replayed over B2/C2.
  await again.stop('SIGKILL');
  again = await serve(t, dir, { args: ['--log-level', 'info'] });
  t.equal(replayLogLines(again).length, 0, 'after a second kill nothing is replayed (stale entries stay dead)');
  sameBytes(t, await readWhole(t, again.socket, 'disk'), model, 'live after the second kill: B2 and C2, not B');
  sameBytes(t, await readWhole(t, again.socket, 'disk@s1'), content, 'disk@s1 after the second kill: the original');
  t.equal(await again.stop('SIGTERM'), 0, 'graceful stop: exit 0');
  sameBytes(t, fs.readFileSync(img), model, 'the RAW image file equals the model');
});

// ---- 4 ---------------------------------------------------------------------------------

function sha256(file: string): string {
  return crypto.createHash('sha256').update(fs.readFileSync(file)).digest('hex');
}

/** Every file under a directory with its size and SHA-256 (sockets by type). */
function dirState(dir: string): Record<string, string> {
  const out: Record<string, string> = {};
  for (const e of fs.readdirSync(dir, { withFileTypes: true })) {
    const p = path.join(dir, e.name);
    out[e.name] = e.isFile() ? `${fs.statSync(p).size}:${sha256(p)}` : e.isSocket() ? 'socket' : 'other';
  }
  return out;
}

t.test('corrupt journal superblocks: clear error, nothing modified', async (t) => {
  const dir = newDir();
  const { img, content } = makeImage(dir);
  const srv = await serve(t, dir);
  expectOk(t, await cli(['snapshot', 'create', img, 's1']), 'setup: snapshot create s1');
  const model = Buffer.from(content);
  await sendOps(t, srv.socket, firstWriteOps({ fua: true }), model, { flush: true });
  // SIGKILL, not SIGTERM: a graceful stop drains the queue and deletes the journal.
  await srv.stop('SIGKILL');
  const jfile = journalOf(img);
  const j = fs.readFileSync(jfile);
  const supers = readSupers(j);
  t.ok(supers.every((s) => s.magic && s.crcOk), 'setup: both superblock slots are valid (magic and CRC)');

  // Keep the magic, change a field: the superblock CRC no longer matches, in both slots.
  for (const slot of SLOTS) j[slot + 40] = j[slot + 40]! ^ 0x5a;
  fs.writeFileSync(jfile, j);
  t.ok(readSupers(fs.readFileSync(jfile)).every((s) => s.magic && !s.crcOk), 'sanity: both slots keep the magic and fail their CRC');

  const meta = `${img}.nbd`;
  const before = dirState(meta);
  const imgSum = sha256(img);
  const journalSum = sha256(jfile);
  const sock = path.join(dir, 'refused.sock');
  const r = await cli(['serve', img, '--socket', sock]);
  expectError(t, r, 15, 'JOURNAL_CORRUPT', 'serve with both journal superblocks corrupt');
  t.equal(sha256(jfile), journalSum, 'the journal is unchanged');
  t.match(lastLine(r.stderr), /journal/, 'the error names the journal');
  t.notOk(fs.existsSync(sock), 'not served (no socket)');
  t.equal(sha256(img), imgSum, 'the image file is unchanged');
  // The killed setup server left its lock (a dead PID); the refused serve may clean it up.
  const noLock = (d: Record<string, string>) => Object.fromEntries(Object.entries(d).filter(([k]) => k !== 'lock'));
  t.same(noLock(dirState(meta)), noLock(before), 'IMAGE.nbd/ unchanged (snapshot, manifest; the stale lock aside)');
  sameBytes(t, fs.readFileSync(img), model, 'the image still holds the model of before');
});

// ---- 5 ---------------------------------------------------------------------------------

t.test('snapshot create drains queued first writes', async (t) => {
  const dir = newDir();
  const { img, content } = makeImage(dir);
  const srv = await serve(t, dir, { env: { NBD_TEST_FIRST_WRITE_DELAY_MS: '300' } });
  expectOk(t, await cli(['snapshot', 'create', img, 's1']), 'snapshot create s1');
  const model = Buffer.from(content);
  // FLUSH and FUA are durable through the live image: when they return, the
  // raw file holds every write acknowledged before them.
  const flushed = firstWriteOps();
  await sendOps(t, srv.socket, flushed, model, { flush: true });
  sameBytes(t, fs.readFileSync(img), model, 'after FLUSH returns the RAW image file holds every write before it (applied, then flushed)');
  const fuaOps: Op[] = shuffledChunks()
    .filter((c) => !flushed.some((o) => Math.floor(o.off / CHUNK) === c || Math.floor((o.off + opLen(o) - 1) / CHUNK) === c))
    .slice(0, 3)
    .map((c) => ({ kind: 'write', off: inChunk(c, 4 * KiB), data: crypto.randomBytes(4 * KiB), fua: true }));
  await sendOps(t, srv.socket, fuaOps, model);
  sameBytes(t, fs.readFileSync(img), model, 'after each FUA first write returns, the RAW image file holds it');
  const ops = firstWriteOps();
  await sendOps(t, srv.socket, ops, model);
  expectOk(t, await cli(['snapshot', 'create', img, 's2']), 'snapshot create s2 with first writes queued');
  sameBytes(t, fs.readFileSync(img), model, 'after snapshot create returns the RAW image file holds every queued write (drained)');
  const atS2 = Buffer.from(model);
  sameBytes(t, await readWhole(t, srv.socket, 'disk@s2'), atS2, 'disk@s2 holds every write acknowledged before it');
  sameBytes(t, await readWhole(t, srv.socket, 'disk@s1'), content, 'disk@s1 still the original');
  sameBytes(t, await readWhole(t, srv.socket, 'disk'), model, 'live is the model');

  // First writes into s2 (queued again), then delete s1 while they are queued: delete drains too.
  const more = firstWriteOps();
  await sendOps(t, srv.socket, more, model);
  expectOk(t, await cli(['snapshot', 'delete', img, 's1']), 'snapshot delete s1 with first writes queued');
  sameBytes(t, fs.readFileSync(img), model, 'after snapshot delete returns the RAW image file holds every queued write (drained)');
  sameBytes(t, await readWhole(t, srv.socket, 'disk@s2'), atS2, 'disk@s2 unchanged by the later writes');
  sameBytes(t, await readWhole(t, srv.socket, 'disk'), model, 'live is the model');
  const fw = await firstWritesInfo(t, img, 'default server');
  t.match(fw, { mode: 'journal', queued: 0 }, 'info --json: firstWrites.mode "journal", nothing queued');
  t.equal(await srv.stop('SIGTERM'), 0, 'graceful stop: exit 0');
  sameBytes(t, fs.readFileSync(img), model, 'after the stop the RAW image file equals the model');
});

// A first write larger than the bound on queued chunks (native
// first_write_queue.hh, "Pacing": while a drain shrinks the queue the bound
// can be that small, and room appears a batch at a time; here a 4 MiB WRITE_ZEROES: 256 chunks, the largest
// zeroing entry) fits only into an empty queue. With a steady stream
// of small first writes from another connection the queue never empties, so
// the large one must not be overtaken by writes that arrive after it, or it
// waits for as long as the stream lasts. The hooks: NBD_TEST_FIRST_WRITE_DEPTH
// sets a bound of 64 chunks (room then appears at most 64 chunks at a time);
// NBD_TEST_FIRST_WRITE_DELAY_MS=200 holds the preserver
// before each batch, so the small writes (4 KiB each into chunks 0..255, up
// to 32 in flight) keep entries queued. The stream stops submitting once the
// zeroing completes; it must complete while the stream still has first
// writes to send, and the data is checked at the end.
const FAIR_SCRIPT = String.raw`
import json, select, sys
import nbd
uri = sys.argv[1]
CHUNK, N, DEPTH = ${CHUNK}, ${NCHUNKS / 2}, 32
a, b = nbd.NBD(), nbd.NBD()
a.connect_uri(uri)
b.connect_uri(uri)
data = lambda i: bytes([(i * 7 + 1) % 251 or 1]) * 4096
inflight, bufs = [], {}
submitted = acked = 0
zc = None
b_done_at = None
def pump(timeout):
    rf, wf, fm = [], [], {}
    for h in (a, b):
        fd, d = h.aio_get_fd(), h.aio_get_direction()
        fm[fd] = h
        if d & nbd.AIO_DIRECTION_READ: rf.append(fd)
        if d & nbd.AIO_DIRECTION_WRITE: wf.append(fd)
    r, w, _ = select.select(rf, wf, [], timeout)
    for fd in r: fm[fd].aio_notify_read()
    for fd in w: fm[fd].aio_notify_write()
while True:
    for c in list(inflight):
        if a.aio_command_completed(c):
            inflight.remove(c)
            bufs.pop(c)
            acked += 1
    if zc is not None and b_done_at is None and b.aio_command_completed(zc):
        b_done_at = submitted
    if b_done_at is None and zc is None and acked >= 64:
        zc = b.aio_zero(256 * CHUNK, N * CHUNK)
    if b_done_at is None and submitted < N and len(inflight) < DEPTH:
        buf = nbd.Buffer.from_bytearray(bytearray(data(submitted)))
        c = a.aio_pwrite(buf, submitted * CHUNK)
        inflight.append(c)
        bufs[c] = buf
        submitted += 1
        pump(0)
        continue
    if not inflight and b_done_at is not None:
        break
    pump(1.0)
a.flush()
print(json.dumps({"submitted": submitted, "bDoneAt": b_done_at, "of": N}))
`;

t.test('a first write larger than the queue bound is not starved by a stream of small ones', async (t) => {
  if (!requireTools(t, ['python3-libnbd'])) return;
  const dir = newDir();
  const { img, content } = makeImage(dir);
  const srv = await serve(t, dir, { env: { NBD_TEST_FIRST_WRITE_DEPTH: '64', NBD_TEST_FIRST_WRITE_DELAY_MS: '200' } });
  expectOk(t, await cli(['snapshot', 'create', img, 's1']), 'snapshot create s1');
  const r = await pyNbd(dir, FAIR_SCRIPT, srv.uri('disk'), 300_000);
  t.equal(r.code, 0, `client ran (${r.stderr.slice(-400)})`);
  let res: { submitted: number; bDoneAt: number | null; of: number } | undefined;
  try {
    res = JSON.parse(lastLine(r.stdout)) as typeof res;
  } catch {
    t.fail(`client printed JSON: ${r.stdout.slice(-200)}`);
    return;
  }
  t.ok(res!.bDoneAt !== null && res!.bDoneAt < res!.of,
    `the 256-chunk WRITE_ZEROES completed while the stream still had first writes to send (after ${res!.bDoneAt} of ${res!.of} small writes were submitted)`);
  const model = Buffer.from(content);
  for (let i = 0; i < res!.submitted; i++) model.fill((i * 7 + 1) % 251 || 1, i * CHUNK, i * CHUNK + 4 * KiB);
  model.fill(0, (NCHUNKS / 2) * CHUNK, (NCHUNKS / 2 + 256) * CHUNK);
  sameBytes(t, await readWhole(t, srv.socket, 'disk'), model, 'live holds every small write and the zeroing');
  sameBytes(t, await readWhole(t, srv.socket, 'disk@s1'), content, 'disk@s1 still the original');
});

// ---- 6 ---------------------------------------------------------------------------------

t.test('--cow-journal 0: inline preservation, no journal file; out-of-range sizes are refused', async (t) => {
  const dir = newDir();
  const { img, content } = makeImage(dir);
  const srv = await serve(t, dir, { args: ['--cow-journal', '0'] });
  expectOk(t, await cli(['snapshot', 'create', img, 's1']), 'snapshot create s1');
  const model = Buffer.from(content);
  await sendOps(t, srv.socket, firstWriteOps({ fua: true }), model, { flush: true });
  // Inline: each write is preserved and written before its reply, so the raw file is current.
  sameBytes(t, fs.readFileSync(img), model, 'the RAW image file holds every acknowledged write (inline)');
  sameBytes(t, await readWhole(t, srv.socket, 'disk'), model, 'live is the model');
  sameBytes(t, await readWhole(t, srv.socket, 'disk@s1'), content, 'disk@s1 is the original');
  const fw = await firstWritesInfo(t, img, '--cow-journal 0');
  t.match(fw, { mode: 'inline', queued: 0, replayedAtOpen: 0 }, 'info --json: firstWrites.mode "inline"');
  t.equal(fw?.mode, 'inline', 'mode is exactly "inline" (no failure reason)');
  t.notOk(journalState(img), 'no journal: journal.state names none');
  t.equal(await srv.stop('SIGTERM'), 0, 'graceful stop: exit 0');
  t.notOk(journalState(img), 'still no journal after the stop');

  const dir2 = newDir();
  const { img: img2 } = makeImage(dir2);
  const sum = sha256(img2);
  for (const size of ['1M', '5G', '4095K']) {
    const sock = path.join(dir2, 'refused.sock');
    const r = await cli(['serve', img2, '--socket', sock, '--cow-journal', size]);
    expectError(t, r, 2, 'BAD_ARGUMENT', `serve --cow-journal ${size}`);
    t.match(lastLine(r.stderr), /--cow-journal/, `--cow-journal ${size}: the error names the option`);
    t.notOk(fs.existsSync(sock), `--cow-journal ${size}: not served (no socket)`);
  }
  t.equal(sha256(img2), sum, 'the image is unchanged');
  t.notOk(fs.existsSync(`${img2}.nbd`), 'no IMAGE.nbd/ created by a refused serve');
});
