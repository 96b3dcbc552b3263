// Enumerated crash test of the first-write journal and of snapshot create and
// delete: instead of killing the server at random moments (snapshots-kill.ts),
// kill it at each structurally distinct point of those sequences, then restart
// it and check the volume against a model.
//
// The hook: NBD_TEST_CRASH_AT=NAME[:N] (native/core/crash_point.hh,
// src/crash-point.ts) makes the N-th hit of the named point write
// "crash-point NAME[:N]" to stderr and raise SIGKILL: nothing is flushed or
// cleaned up, as with kill -9. Every case proves that the server died there
// (killed by SIGKILL, and that line on its stderr), so a workload that no
// longer reaches its point fails instead of passing vacuously. A second hook,
// NBD_TEST_FIRST_WRITE_BATCH=N, makes the first-write thread take a batch
// only once N entries are queued or someone waits for it (FLUSH, a drain, a
// writer without room, stop): batches of a known least size, without timing.
//
// Each case: a fresh 16 MiB volume of random content, 4 KiB chunks (so the
// 4 MiB journal ring holds 1014 entries of 4 KiB and its end is reachable with
// exact sizes); the crashing server takes snapshot s0, then runs the case's
// workload, recording what was acknowledged (writes, FLUSH, confirmed
// snapshots) and what was in flight at the kill. Then:
//   - the journal the crash left is read with an independent parser
//     (fixtures/journal.ts): every acknowledged write is in the raw image
//     file (page cache) or pending in the journal, and the case checks the
//     exact prefix a replay must apply (torn entry, wrap, ring end, torn
//     superblock);
//   - for a double fault, the next start is crashed again at a replay point;
//   - a restart without the hook must open the volume with no manual step and
//     replay exactly the entries the parser found; live must hold every
//     acknowledged write (each write in flight wholly there or not, as the
//     case says); every confirmed snapshot must be exact; a snapshot whose
//     create or delete was in flight must be exactly what the case expects
//     (absent, or exact: holding every write acknowledged before the create);
//   - after a clean stop (exit 0) the raw image is the model, no journal
//     state is left, no snapshot file but the listed ones, and no journal
//     file: the unnamed, drained journal that the documented windows leave
//     (created but not yet recorded; forgotten but not yet deleted) is
//     removed by the restart, which opens the volume and finds the journal
//     names it as owner but its state does not.
// The points and the invariant each one checks are listed in
// docs/architecture.md ("Crash invariants").
import t, { type Test } from 'tap';
import { spawn } from 'node:child_process';
import * as crypto from 'node:crypto';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { readExport } from './fixtures/export-io';
import { currentSuper, ENTRY_HEADER, ENTRY_MAGIC, journalOf, journalState, pendingEntries, readSupers, RING_BASE, T_WRAP, type Entry } from './fixtures/journal';
import { NBD, RawClient } from './fixtures/raw-client';
import { CLI, logLines, makeTempDir, removeDir, startServer, type RunningServer } from './fixtures/server';
import { controlRequest } from './fixtures/snapshot-model';

const KiB = 1024;
const MiB = 1024 * KiB;
const SIZE = 16 * MiB;
/** The journal ring of a 16 MiB volume (1/16 of it, at least 4 MiB). */
const RING = 4 * MiB;
const RING_END = RING_BASE + RING;
/** Ring bytes of an entry with 4 KiB of data. */
const SPAN_4K = ENTRY_HEADER + 4 * KiB;
/** 4 KiB entries in the first lap of the ring: 1014 (400 bytes are left). */
const LAP = Math.floor(RING / SPAN_4K);
/** Fresh writes go this far apart (each touches chunks nothing else touched). */
const STRIDE = 8 * KiB;
const REPLAY_MSG = 'applied first writes journalled before the last stop (preserved first)';
const ORPHAN_MSG = /^orphan first-write journal/;
const REMOVED_MSG = /^removed journals of this volume that nothing will replay/;
/** Generous bound for states that must come (a death, a start): a hang is a failure, not a wait forever. */
const DEADLINE_MS = 90_000;

const dirs: string[] = [];
t.teardown(() => dirs.forEach(removeDir));

interface Write {
  off: number;
  data: Buffer;
}

/** A reply with an error, or a refused control request: never expected, whatever the crash. */
class Refused extends Error {}

type InFlight = 'absent' | 'present' | 'either';

interface Case {
  point: string;
  /** What the point is, for the test's name. */
  what: string;
  env?: NodeJS.ProcessEnv;
  workload: (r: Rig) => Promise<void>;
  /** Double fault: the next start dies at this point during the replay at open. */
  replayPoint?: string;
  /** What a write in flight at the kill must look like after the restart. */
  inflight?: InFlight;
  /** The snapshot whose create/delete was in flight: must be absent, exact, or either. */
  snapshot?: 'absent' | 'exact' | 'either';
  /** Unnamed, drained journals this point leaves by design (the restart removes them). */
  orphans?: number;
  /** Checks on the journal the crash left (pending: what a replay applies; undefined: no journal named). */
  journal?: (t: Test, r: Rig, pending: Entry[] | undefined) => void;
}

function within<T>(p: Promise<T>, ms: number): Promise<T | 'timeout'> {
  return Promise.race([p, new Promise<'timeout'>((r) => setTimeout(() => r('timeout'), ms).unref())]);
}

interface Exit {
  code: number | null;
  signal: NodeJS.Signals | null;
}

function exitOf(srv: RunningServer): Promise<Exit> {
  const p = srv.proc;
  if (p.exitCode !== null || p.signalCode !== null) return Promise.resolve({ code: p.exitCode, signal: p.signalCode });
  return new Promise((r) => p.once('exit', (code, signal) => r({ code, signal })));
}

/** One case's volume, its model and its servers. */
class Rig {
  readonly dir: string;
  readonly img: string;
  readonly J: string;
  /** Live as acknowledged. */
  model: Buffer;
  /** Writes sent and not acknowledged. */
  inflight: Write[] = [];
  /** Acknowledged writes, in order. */
  acked: Write[] = [];
  /** Confirmed snapshots, oldest first, with their exact content. */
  snaps = new Map<string, Buffer>();
  /** A snapshot create/delete not confirmed. */
  pendingSnap?: { op: 'create' | 'delete'; name: string; content: Buffer };
  srv?: RunningServer;
  client?: RawClient;
  private next = 0;

  constructor(t: Test) {
    this.dir = makeTempDir('nbd-crashpt-');
    dirs.push(this.dir);
    this.J = fs.mkdtempSync(path.join(fs.existsSync('/dev/shm') ? '/dev/shm' : '/tmp', 'nbd-crashpt-j-'));
    dirs.push(this.J);
    this.img = path.join(this.dir, 'disk.img');
    this.model = crypto.randomBytes(SIZE);
    fs.writeFileSync(this.img, this.model);
    t.teardown(async () => {
      this.client?.destroy();
      await this.srv?.stop('SIGKILL');
    });
  }

  /** An offset no earlier write touched (its chunks are first written now). */
  fresh(): number {
    const off = this.next;
    this.next += STRIDE;
    if (this.next > SIZE) throw new Error('test setup: the volume has no fresh chunk left');
    return off;
  }

  async write(off: number, data: Buffer): Promise<void> {
    const w = { off, data };
    this.inflight.push(w);
    const r = await this.client!.write(off, data);
    if (r.error) throw new Refused(`write [${off}, +${data.length}) failed with NBD error ${r.error}`);
    this.inflight.splice(this.inflight.indexOf(w), 1);
    data.copy(this.model, off);
    this.acked.push(w);
  }

  /** n first writes of `len` random bytes, each at a fresh offset. */
  async firstWrites(n: number, len = 4 * KiB): Promise<void> {
    for (let i = 0; i < n; i++) await this.write(this.fresh(), crypto.randomBytes(len));
  }

  async flush(): Promise<void> {
    const r = await this.client!.cmd(NBD.CMD_FLUSH, 0, 0, 0);
    if (r.error) throw new Refused(`FLUSH failed with NBD error ${r.error}`);
  }

  async create(name: string): Promise<void> {
    this.pendingSnap = { op: 'create', name, content: Buffer.from(this.model) };
    const r = await controlRequest(this.img, { op: 'snapshot-create', name }, DEADLINE_MS);
    if (!r.ok) throw new Refused(`snapshot create ${name}: [${r.code}] ${r.message}`);
    this.snaps.set(name, this.pendingSnap.content);
    this.pendingSnap = undefined;
  }

  async delete(name: string): Promise<void> {
    this.pendingSnap = { op: 'delete', name, content: this.snaps.get(name)! };
    const r = await controlRequest(this.img, { op: 'snapshot-delete', name }, DEADLINE_MS);
    if (!r.ok) throw new Refused(`snapshot delete ${name}: [${r.code}] ${r.message}`);
    this.snaps.delete(name);
    this.pendingSnap = undefined;
  }

  /** SIGTERM: the server drains and stops (a crash point on that path kills it). */
  stopGracefully(): void {
    this.srv!.proc.kill('SIGTERM');
  }

  async serve(env: NodeJS.ProcessEnv = {}, args: string[] = []): Promise<RunningServer> {
    this.srv = await startServer({ dir: this.dir, images: ['disk.img'], env: { NBD_JOURNAL_DIR: this.J, ...env }, args: ['--log-level', 'info', ...args] });
    return this.srv;
  }

  async connect(): Promise<void> {
    this.client = await RawClient.connect(this.srv!.socket);
    await this.client.go('disk');
  }

  /** The journal the volume's state names, and what a replay of it applies (independent parser). */
  pending(): { file: string; entries: Entry[] } | undefined {
    if (!journalState(this.img)) return undefined;
    const file = journalOf(this.img, this.J);
    return { file, entries: fs.existsSync(file) ? pendingEntries(fs.readFileSync(file)) : [] };
  }

  journalBytes(): Buffer {
    return fs.readFileSync(journalOf(this.img, this.J));
  }

  journalFiles(): string[] {
    return fs.readdirSync(this.J).filter((f) => f.endsWith('.journal'));
  }

  manifest(): { id: number; name: string }[] {
    const m = JSON.parse(fs.readFileSync(`${this.img}.nbd/manifest.json`, 'utf8')) as { manifest: { snapshots: { id: number; name: string }[] } };
    return m.manifest.snapshots;
  }
}

/** Index of the first differing byte, or -1. */
function firstDiff(a: Buffer, b: Buffer): number {
  if (a.equals(b)) return -1;
  const n = Math.min(a.length, b.length);
  for (let i = 0; i < n; i += 4096) {
    const end = Math.min(n, i + 4096);
    if (!a.subarray(i, end).equals(b.subarray(i, end))) for (let k = i; k < end; k++) if (a[k] !== b[k]) return k;
  }
  return n;
}

function sameBytes(t: Test, actual: Buffer | undefined, expected: Buffer, what: string): void {
  const d = actual ? firstDiff(actual, expected) : 0;
  t.ok(d < 0, d < 0 ? what : `${what} (first difference at byte ${d}${actual ? '' : ': nothing read'})`);
}

async function readAll(t: Test, socket: string, name: string): Promise<Buffer | undefined> {
  const r = await readExport(socket, name, 0, SIZE);
  t.equal(r.error, 0, `read ${name}: no error`);
  return r.data;
}

/**
 * Runs the workload on the armed server until the server dies; proves it died
 * at the point (SIGKILL, and its marker line on stderr).
 */
async function crashRun(t: Test, r: Rig, c: Case): Promise<boolean> {
  const srv = r.srv!;
  const exit = exitOf(srv);
  let failure: unknown;
  const work = c.workload(r).then(
    () => 'done' as const,
    (err: unknown) => {
      failure = err;
      return 'error' as const;
    },
  );
  const first = await Promise.race([work, exit.then(() => 'exit' as const)]);
  const died = await within(exit, DEADLINE_MS);
  if (died === 'timeout') {
    t.fail(`the server did not die at ${c.point} (the workload ${first === 'error' ? `failed: ${String(failure)}` : 'ended'}, and it was still running after ${DEADLINE_MS / 1000} s)`);
    return false;
  }
  await within(work, DEADLINE_MS); // its requests end with the connection
  r.client?.destroy();
  r.client = undefined;
  if (failure instanceof Refused) t.fail(`the workload was refused before the crash: ${failure.message}`);
  t.equal(died.signal, 'SIGKILL', `the server was killed by SIGKILL (exit ${died.code}, signal ${died.signal})`);
  t.ok(srv.stderr().split('\n').includes(`crash-point ${c.point}`), `its stderr says "crash-point ${c.point}": the point was reached`);
  return died.signal === 'SIGKILL';
}

/** Starts a server that must die during the replay at open, at `point`. */
async function crashAtOpen(t: Test, r: Rig, point: string): Promise<void> {
  const p = spawn(process.execPath, [CLI, 'serve', r.img, '--socket', path.join(r.dir, 'nbd.sock'), '--log-level', 'info'], {
    env: { ...process.env, NBD_JOURNAL_DIR: r.J, NBD_TEST_CRASH_AT: point },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let out = '';
  let err = '';
  p.stdout.on('data', (d: Buffer) => (out += d.toString()));
  p.stderr.on('data', (d: Buffer) => (err += d.toString()));
  const exit = await within(new Promise<Exit>((res) => p.once('exit', (code, signal) => res({ code, signal }))), DEADLINE_MS);
  if (exit === 'timeout') {
    p.kill('SIGKILL');
    t.fail(`the start with ${point} armed neither died nor ended within ${DEADLINE_MS / 1000} s`);
    return;
  }
  t.notMatch(out, /"ready"/, `double fault: the start died before it was ready`);
  t.equal(exit.signal, 'SIGKILL', `double fault: killed by SIGKILL during the replay (exit ${exit.code}; ${err.trim().split('\n').at(-1)})`);
  t.ok(err.split('\n').includes(`crash-point ${point}`), `double fault: its stderr says "crash-point ${point}"`);
}

/**
 * Every acknowledged write is in the raw image file (page cache) or pending in
 * the journal the volume names (none named: all in the raw image file).
 */
function checkNothingLost(t: Test, r: Rig, pending: Entry[] = []): void {
  const raw = fs.readFileSync(r.img);
  const last = new Map<number, Buffer>();
  for (const w of r.acked) last.set(w.off, w.data);
  let lost = 0;
  for (const [off, data] of last) {
    if (raw.subarray(off, off + data.length).equals(data)) continue;
    if (pending.some((e) => e.offset === off && e.data.equals(data))) continue;
    lost++;
  }
  t.equal(lost, 0, `each of the ${last.size} acknowledged writes is in the raw image file or pending in the journal`);
  const sent = [...r.acked, ...r.inflight];
  t.ok(
    pending.every((e) => sent.some((w) => w.off === e.offset && w.data.equals(e.data))),
    `each of the ${pending.length} pending journal entries is a write the client sent`,
  );
}

/** The restarted server against the model; then the model adopts the outcome. */
async function verify(t: Test, r: Rig, c: Case, srv: RunningServer): Promise<void> {
  const listed = r.manifest().map((s) => s.name);
  const confirmed = [...r.snaps.keys()];
  const p = r.pendingSnap;
  let pendingThere = false;
  if (p) {
    pendingThere = listed.includes(p.name);
    const expect = c.snapshot ?? 'either';
    const without = confirmed.filter((n) => n !== p.name);
    const withIt = p.op === 'create' ? [...confirmed, p.name] : confirmed;
    const allowed = expect === 'absent' ? [without] : expect === 'exact' ? [withIt] : [without, withIt];
    t.ok(
      allowed.some((a) => JSON.stringify(a) === JSON.stringify(listed)),
      `snapshots listed ${JSON.stringify(listed)}; the ${p.op} of ${p.name} was in flight: expected ${allowed.map((a) => JSON.stringify(a)).join(' or ')}`,
    );
  } else t.same(listed, confirmed, 'the confirmed snapshots are listed');

  const live = await readAll(t, srv.socket, 'disk');
  const expected = Buffer.from(r.model);
  const rule = c.inflight ?? 'either';
  for (const w of r.inflight) {
    const there = !!live && live.subarray(w.off, w.off + w.data.length).equals(w.data);
    if (rule === 'present') t.ok(there, `the write in flight at the kill ([${w.off}, +${w.data.length}), journalled whole) is in live`);
    if (rule === 'absent') t.notOk(there, `the write in flight at the kill ([${w.off}, +${w.data.length}), never journalled whole) is not in live`);
    if (there) w.data.copy(expected, w.off);
  }
  sameBytes(t, live, expected, `live holds every acknowledged write${r.inflight.length ? ` (the ${r.inflight.length} in flight: ${rule})` : ''}`);
  if (live) r.model = live;
  for (const name of listed) {
    const want = r.snaps.get(name) ?? (p?.name === name ? p.content : undefined);
    if (!want) {
      t.fail(`snapshot ${name} is listed but was never created`);
      continue;
    }
    const got = await readAll(t, srv.socket, `disk@${name}`);
    sameBytes(t, got, want, `disk@${name} is exact${p?.name === name ? ` (its ${p.op} was in flight)` : ''}`);
  }
  if (p) {
    if (p.op === 'create' && pendingThere) r.snaps.set(p.name, p.content);
    if (p.op === 'delete' && !pendingThere) r.snaps.delete(p.name);
    r.pendingSnap = undefined;
  }
  r.inflight = [];
}

async function runCase(t: Test, c: Case): Promise<void> {
  const r = new Rig(t);
  await r.serve({ NBD_TEST_CRASH_AT: c.point, ...c.env }, ['--chunk-size', '4K']);
  await r.connect();
  if (!(await crashRun(t, r, c))) return;

  // The journal the crash left, read independently.
  let pj = r.pending();
  checkNothingLost(t, r, pj?.entries);
  c.journal?.(t, r, pj?.entries);

  if (c.replayPoint) {
    await crashAtOpen(t, r, c.replayPoint);
    pj = r.pending();
    checkNothingLost(t, r, pj?.entries);
  }
  const expectReplay = pj?.entries.length ?? 0;

  const srv = await within(r.serve(), DEADLINE_MS).catch((err: Error) => err);
  if (!srv || srv === 'timeout' || srv instanceof Error) {
    t.fail(`the volume does not open after the crash: ${srv instanceof Error ? srv.message : 'no ready line'}`);
    return;
  }
  t.pass('the volume opens after the crash (no manual step)');
  const replayed = logLines<{ entries: number }>(srv).filter((l) => l.msg === REPLAY_MSG).reduce((n, l) => n + (l.entries ?? 0), 0);
  t.equal(replayed, expectReplay, `the restart replays exactly the ${expectReplay} entries the journal holds`);
  await verify(t, r, c, srv);
  const removed = logLines<{ journals: string[] }>(srv)
    .filter((l) => REMOVED_MSG.test(l.msg ?? ''))
    .reduce((n, l) => n + (l.journals?.length ?? 0), 0);
  t.equal(removed, c.orphans ?? 0, `the restart removes ${c.orphans ?? 0} unnamed journal(s) of this volume`);
  t.equal(logLines(srv).filter((l) => ORPHAN_MSG.test(l.msg ?? '')).length, 0, 'serve names no orphan journal: none is left');

  const code = await within(srv.stop('SIGTERM'), DEADLINE_MS);
  t.equal(code, 0, 'the restarted server stops cleanly (exit 0)');
  sameBytes(t, fs.readFileSync(r.img), r.model, 'after the clean stop the raw image is the model');
  t.notOk(journalState(r.img), 'no journal state is left');
  t.same(r.journalFiles(), [], 'no journal file is left');
  const ids = r.manifest().map((s) => s.id).sort((a, b) => a - b);
  const snapFiles = fs.readdirSync(`${r.img}.nbd`).filter((f) => /^snap-\d+\.snap$/.test(f)).map((f) => Number(/\d+/.exec(f)![0])).sort((a, b) => a - b);
  t.same(snapFiles, ids, 'no snapshot file but those of the listed snapshots');
}

// ---- workloads ------------------------------------------------------------------------

/** s0 first (the journal is used only with a snapshot), then n fresh 4 KiB first writes. */
const writes = (n: number) => async (r: Rig) => {
  await r.create('s0');
  await r.firstWrites(n);
};

/** s0, `lap` fresh 4 KiB first writes, one of `odd` bytes (sized to end where the case needs), FLUSH if asked, `more` 4 KiB ones. */
const lapThen = (lap: number, odd: number, more: number, flush = false) => async (r: Rig) => {
  await r.create('s0');
  await r.firstWrites(lap);
  await r.firstWrites(1, odd);
  if (flush) await r.flush();
  await r.firstWrites(more);
};

/** Batches of at least 8: 40 first writes, then FLUSH (which waits for the thread). */
const batched = async (r: Rig) => {
  await r.create('s0');
  await r.firstWrites(40);
  await r.flush();
};
const BATCH_8 = { NBD_TEST_FIRST_WRITE_BATCH: '8' };
/** The thread takes nothing unless someone waits for it: acknowledged first writes stay queued. */
const HELD = { NBD_TEST_FIRST_WRITE_BATCH: '1000000' };

/** The pending entry with sequence number seq. */
const entry = (p: Entry[] | undefined, seq: number) => p?.find((e) => e.seq === BigInt(seq));
const lastSeq = (p: Entry[] | undefined) => Number(p?.at(-1)?.seq ?? 0n);

/** Pending entries whose data the raw image file holds already (applied before the crash). */
function appliedOf(r: Rig, p: Entry[] | undefined): number {
  const raw = fs.readFileSync(r.img);
  return (p ?? []).filter((e) => raw.subarray(e.offset, e.offset + e.length).equals(e.data)).length;
}

/**
 * The replay ends with entry `seq`: the last pending one; or, when the thread
 * had applied everything before the crash, the checkpoint expects the entry
 * after it (and finds none).
 */
function endsWith(t: Test, r: Rig, p: Entry[] | undefined, seq: number, what: string): void {
  if (p?.length) t.equal(lastSeq(p), seq, `${what}: the last pending entry is ${seq}`);
  else t.equal(currentSuper(r.journalBytes())?.replaySeq, BigInt(seq + 1), `${what}: all applied, the checkpoint expects entry ${seq + 1}`);
}

function ringIs4M(t: Test, r: Rig): void {
  t.equal(currentSuper(r.journalBytes())?.ringSize, RING, 'setup: the ring is 4 MiB');
}

const cases: Case[] = [
  // ---- journal appends
  {
    point: 'journal.append.torn:12',
    what: 'entry 12 torn: data copied, header not written (first lap, nothing applied)',
    env: HELD,
    workload: writes(20),
    inflight: 'absent',
    journal: (t, r, p) => {
      t.same(p?.map((e) => Number(e.seq)), Array.from({ length: 11 }, (_, i) => i + 1), 'the replay prefix is entries 1..11');
      t.ok(p?.every((e, i) => e.offset === r.acked[i]!.off && e.data.equals(r.acked[i]!.data)), 'entries 1..11 are the 11 acknowledged writes, in order');
    },
  },
  {
    point: 'journal.append.torn:1020',
    what: 'entry 1020 torn on the second lap, over a stale header of the first',
    workload: writes(1030),
    inflight: 'absent',
    journal: (t, r, p) => {
      ringIs4M(t, r);
      endsWith(t, r, p, 1019, 'the replay prefix ends before the torn entry');
      const h = r.journalBytes().subarray(RING_BASE + 5 * SPAN_4K);
      t.ok(h.readUInt32LE(0) === ENTRY_MAGIC && h.readBigUInt64LE(8) === 6n, 'under the torn entry lies the header of entry 6 of the first lap (stale: ends the replay)');
    },
  },
  {
    point: 'journal.append.wrap',
    what: 'right after a WRAP record, before the entry at the ring start',
    workload: writes(1030),
    inflight: 'absent',
    journal: (t, r, p) => {
      ringIs4M(t, r);
      const h = r.journalBytes().subarray(RING_BASE + LAP * SPAN_4K);
      t.ok(h.readUInt16LE(4) === T_WRAP && h.readBigUInt64LE(8) === BigInt(LAP + 1), `a WRAP record numbered ${LAP + 1} follows entry ${LAP}`);
      endsWith(t, r, p, LAP, 'the replay follows it to the ring start, which holds a stale entry');
    },
  },
  {
    point: `journal.append.done:${LAP + 1}`,
    what: 'the first entry after a WRAP record, at the ring start',
    workload: writes(1030),
    inflight: 'present',
    journal: (t, r, p) => {
      ringIs4M(t, r);
      t.equal(entry(p, LAP + 1)?.at, RING_BASE, `the replay follows the WRAP record to entry ${LAP + 1} at the ring start`);
      t.equal(lastSeq(p), LAP + 1, `and ends there`);
    },
  },
  {
    point: 'journal.append.ring-end',
    what: 'an entry that ends exactly at the ring end',
    workload: lapThen(LAP, RING - LAP * SPAN_4K - ENTRY_HEADER, 20),
    inflight: 'present',
    journal: (t, r, p) => {
      ringIs4M(t, r);
      const e = entry(p, LAP + 1);
      t.equal(e && e.at + ENTRY_HEADER + e.data.length, RING_END, `entry ${LAP + 1} ends exactly at the ring end`);
      t.equal(lastSeq(p), LAP + 1, 'the replay ends with it');
    },
  },
  {
    point: `journal.append.done:${LAP + 2}`,
    what: 'the entry after one that ended exactly at the ring end (no WRAP record)',
    workload: lapThen(LAP, RING - LAP * SPAN_4K - ENTRY_HEADER, 20),
    inflight: 'present',
    journal: (t, r, p) => {
      ringIs4M(t, r);
      t.equal(entry(p, LAP + 2)?.at, RING_BASE, `the replay goes from the ring end to entry ${LAP + 2} at the ring start`);
      t.equal(lastSeq(p), LAP + 2, 'and ends there');
    },
  },
  {
    point: `journal.append.done:${LAP + 1}`,
    what: 'the entry after one that left 16 bytes (no room for a WRAP record)',
    workload: lapThen(LAP - 1, RING - (LAP - 1) * SPAN_4K - 16 - ENTRY_HEADER, 20),
    inflight: 'present',
    journal: (t, r, p) => {
      ringIs4M(t, r);
      const e = entry(p, LAP);
      if (e) t.equal(e.at + ENTRY_HEADER + e.data.length, RING_END - 16, `entry ${LAP} leaves 16 bytes before the ring end`);
      t.equal(entry(p, LAP + 1)?.at, RING_BASE, `the replay skips the short tail to entry ${LAP + 1} at the ring start`);
      t.equal(lastSeq(p), LAP + 1, 'and ends there');
    },
  },
  {
    point: 'journal.checkpoint.at-ring-end',
    what: 'a checkpoint exactly at the ring end (the entry before it ended there)',
    workload: lapThen(LAP, RING - LAP * SPAN_4K - ENTRY_HEADER, 0, true),
    journal: (t, r, p) => {
      t.equal(currentSuper(r.journalBytes())?.replayOff, RING_END, 'the durable checkpoint is the ring end');
      t.same(p, [], 'nothing to replay (the ring start holds a stale entry)');
    },
  },
  // ---- the first-write thread and its checkpoint
  {
    point: 'queue.apply.preserved',
    what: 'first-write thread: batch preserved, not applied',
    env: BATCH_8,
    workload: batched,
    journal: (t, r, p) => {
      t.equal(p?.[0]?.seq, 1n, 'the replay starts at entry 1 (the checkpoint did not move)');
      t.equal(appliedOf(r, p), 0, 'no entry reached the raw image');
    },
  },
  {
    point: 'queue.apply.half',
    what: 'first-write thread: half the batch applied',
    env: BATCH_8,
    workload: batched,
    journal: (t, r, p) => {
      t.equal(p?.[0]?.seq, 1n, 'the replay starts at entry 1 (re-applies the half applied)');
      const n = appliedOf(r, p);
      t.ok(n >= 4 && n < (p?.length ?? 0), `half the batch (of at least 8) reached the raw image: ${n} of the ${p?.length} pending entries`);
    },
  },
  {
    point: 'queue.applied',
    what: 'first-write thread: batch applied, before the checkpoint',
    env: BATCH_8,
    workload: batched,
    journal: (t, r, p) => {
      t.equal(p?.[0]?.seq, 1n, 'the replay starts at entry 1');
      t.ok(appliedOf(r, p) >= 8, 'the batch (of at least 8) reached the raw image');
    },
  },
  {
    point: 'journal.checkpoint.before-super',
    what: 'checkpoint: before the superblock write',
    env: BATCH_8,
    workload: batched,
    journal: (t, r, p) => {
      t.equal(p?.[0]?.seq, 1n, 'the replay starts at entry 1');
      t.ok(appliedOf(r, p) >= 8, 'the batch (of at least 8) reached the raw image');
    },
  },
  {
    point: 'journal.super.unsynced:2',
    what: 'checkpoint: superblock written, not synced',
    env: BATCH_8,
    workload: batched,
    journal: (t, r, p) => {
      t.equal(currentSuper(r.journalBytes())?.gen, 2n, 'the written superblock counts (the page cache survives the process)');
      t.ok(!p?.length || p[0]!.seq > 8n, 'the replay starts after the batch of at least 8');
    },
  },
  {
    point: 'journal.super.torn:2',
    what: 'checkpoint: torn superblock (half of the new slot written)',
    env: BATCH_8,
    workload: batched,
    journal: (t, r, p) => {
      const s = readSupers(r.journalBytes());
      t.ok(s[0]!.magic && !s[0]!.crcOk, 'the new slot is torn: its magic written, its checksum failing');
      t.ok(s[1]!.crcOk && s[1]!.gen === 1n, 'the other slot holds the previous checkpoint');
      t.equal(p?.[0]?.seq, 1n, 'the replay falls back to it: from entry 1');
      t.ok(appliedOf(r, p) >= 8, 'the batch (of at least 8) reached the raw image: the replay re-applies it');
      t.ok(lastSeq(p) >= r.acked.length, 'through every acknowledged entry');
    },
  },
  {
    point: 'queue.checkpointed',
    what: 'first-write thread: checkpoint synced, entries not yet removed',
    env: BATCH_8,
    workload: batched,
    journal: (t, _r, p) => t.ok(!p?.length || p[0]!.seq > 8n, 'the replay starts after the batch'),
  },
  // ---- journal creation and retirement
  {
    point: 'journal.create.made',
    what: 'journal file created, journal.state not yet saved',
    workload: writes(1),
    inflight: 'absent',
    orphans: 1,
    journal: (t, _r, p) => t.equal(p, undefined, 'no journal is named'),
  },
  {
    point: 'journal.super.torn:1',
    what: 'journal creation: its first superblock torn',
    workload: writes(1),
    inflight: 'absent',
    orphans: 1,
    journal: (t, _r, p) => t.equal(p, undefined, 'no journal is named'),
  },
  {
    point: 'journal.create.recorded',
    what: 'journal created and named, before the first append',
    workload: writes(1),
    inflight: 'absent',
    journal: (t, _r, p) => t.same(p, [], 'the named journal is empty'),
  },
  {
    point: 'journal.retire.cleared',
    what: 'stop: journal.state cleared, journal file not yet deleted',
    env: HELD,
    workload: async (r) => {
      await writes(20)(r);
      r.stopGracefully(); // the stop drains the 20 queued writes, then retires the journal
    },
    orphans: 1,
    journal: (t, _r, p) => t.equal(p, undefined, 'no journal is named'),
  },
  // ---- replay at open (double faults: a crash in the thread, then one in the replay)
  ...(['replay.apply.preserved', 'replay.apply.half', 'replay.applied', 'replay.reset', 'replay.cleared', 'journal.super.torn:1'] as const).map(
    (rp): Case => ({
      point: 'queue.apply.half',
      replayPoint: rp,
      what: `double fault: half a batch applied, then the replay dies at ${rp === 'journal.super.torn:1' ? 'its reset (torn superblock)' : rp}`,
      env: BATCH_8,
      workload: batched,
      orphans: rp === 'replay.cleared' ? 1 : 0,
    }),
  ),
  // ---- snapshot create, with first writes queued
  ...(
    [
      ['snapshot.create.prepared:2', 'store files made', 'absent'],
      ['snapshot.create.begun:2', 'writes paused, queue drained, live flushed', 'absent'],
      ['snapshot.create.manifest:2', 'the manifest lists it', 'exact'],
      ['snapshot.create.added:2', 'in the chain, writes resumed', 'exact'],
    ] as const
  ).map(
    ([point, what, snapshot]): Case => ({
      point,
      what: `snapshot create: ${what}`,
      env: HELD,
      workload: async (r) => {
        await writes(20)(r);
        await r.create('s1');
      },
      snapshot,
    }),
  ),
  // ---- snapshot delete, with first writes queued
  ...(
    [
      ['snapshot.delete.copied:20', 'mid bulk hand-down (copies not committed)', 'exact'],
      ['snapshot.delete.committed:1', 'bulk hand-down committed', 'exact'],
      ['snapshot.delete.removed', 'final hand-down done (removeSnapshot), writes paused', 'exact'],
      ['snapshot.delete.manifest', 'the manifest no longer lists it', 'absent'],
      ['snapshot.delete.dropped', 'out of the chain', 'absent'],
    ] as const
  ).map(
    ([point, what, snapshot]): Case => ({
      point,
      what: `snapshot delete: ${what}`,
      env: HELD,
      workload: async (r) => {
        await writes(24)(r); // region A, queued
        const a = r.acked.map((w) => w.off);
        await r.create('s1'); // drains: A's old data preserved into s0
        for (const off of a.slice(0, 8)) await r.write(off, crypto.randomBytes(4 * KiB)); // A again: into s1 (s0 holds them)
        await r.firstWrites(48); // region B: into s1 only
        await r.flush();
        await r.firstWrites(16); // region C: queued at the delete (its final hand-down moves them to s0)
        await r.delete('s1');
      },
      snapshot,
    }),
  ),
];

for (const c of cases) {
  t.test(`${c.point}${c.replayPoint ? ` + ${c.replayPoint}` : ''}: ${c.what}`, (t) => runCase(t, c));
}
