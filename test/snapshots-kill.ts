// Crash test of copy-on-write snapshots: SIGKILL the real CLI server at
// random moments, restart it on the same image, and compare the live volume
// and every snapshot with an in-memory model.
//
// Crash model (acknowledged writes are in the page cache, which survives
// SIGKILL of the process): after the restart every snapshot is exactly as
// created and every acknowledged write is in the live image. Only the
// operations in flight at the kill are ambiguous:
//   - a write/WRITE_ZEROES/TRIM not yet acknowledged: each of its bytes may
//     be old or new (a killed pwrite can be torn at page granularity);
//   - a `snapshot create` that had not returned: the snapshot exists with the
//     exact content, or does not exist;
//   - a `snapshot delete` that had not returned: the snapshot is gone, or
//     still there with the exact content.
// Nothing else may differ. In the first test nothing is written while a
// create/delete is in flight; the second runs writes during them (the
// snapshot being created must then be one cut of the write stream, and every
// other snapshot must still be exact).
//
// The seed is printed; NBD_TEST_SEED=<seed> replays the random choices (the
// kill timing is real time, so a replay is close, not identical).
import t from 'tap';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { makeTempDir, startServer, type RunningServer } from './fixtures/server';
import { requireTools } from './fixtures/tools';
import type { ExecResult } from './fixtures/exec';
import {
  CRC_BLOCK,
  KiB,
  MiB,
  PyClient,
  Rng,
  VolumeModel,
  baseSeed,
  brief,
  cli,
  compareExport,
  controlRequest,
  describeDiff,
  monoNs,
  removeDir,
  snapshotList,
  sparseImage,
  type BurstEvent,
  type BurstOp,
  type Candidate,
  opData,
  describeOp,
} from './fixtures/snapshot-model';

const SEED = baseSeed();
t.comment(`snapshots-kill seed ${SEED} (replay: NBD_TEST_SEED=${SEED} node tools/run-tests.js test/snapshots-kill.ts)`);

const MAX_SNAPSHOTS = 5;

class Failure extends Error {}

/** A snapshot create that had not returned at the kill. */
interface PendingCreate {
  name: string;
  /** Live content when the create was started. */
  base: Buffer;
  /** Writes that ran while it was in flight (each wholly in or out of the snapshot). */
  ops: BurstOp[];
  sub: Map<number, number>;
  ack: Map<number, number>;
}

interface Pending {
  /** Writes submitted but not acknowledged at the kill (pairwise disjoint). */
  writes: BurstOp[];
  create?: PendingCreate;
  /** A snapshot delete that had not returned at the kill. */
  delete?: string;
  /** What was going on, for messages. */
  what: string;
}


class KillRig {
  readonly rng: Rng;
  readonly dir: string;
  readonly image: string;
  readonly meta: string;
  srv?: RunningServer;
  readonly py = new PyClient();
  readonly model: VolumeModel;
  pending: Pending = { writes: [], what: 'nothing' };
  round = 0;
  phase = 'start';
  readonly history: string[] = [];
  readonly liveHandles = ['L0', 'L1', 'L2'];
  readonly snapHandles = new Map<string, string>();
  private handleSeq = 0;
  private nameSeq = 0;
  private opSeq = 0;
  stats: Record<string, number> = {};
  /** The last burst (for messages): its ops, submit/ack times, and when a snapshot request was sent (0: none). */
  lastBurst?: { ops: BurstOp[]; sub: Map<number, number>; ack: Map<number, number>; reqNs: number };

  constructor(readonly label: string, readonly seed: number, readonly size: number) {
    this.rng = new Rng(seed);
    this.dir = makeTempDir('nbd-snapkill-');
    this.image = sparseImage(this.dir, 'disk.img', size);
    this.meta = `${this.image}.nbd`;
    this.model = new VolumeModel(size);
  }

  fail(msg: string): never {
    throw new Failure(
      `[${this.label}, seed ${this.seed}] round ${this.round} (${this.phase}): ${msg}\n` +
        `in flight at the last kill: ${this.pending.what}\n` +
        `recent rounds:\n  ${this.history.slice(-8).join('\n  ')}\n` +
        `model snapshots (oldest first): ${this.model.names().join(', ') || '(none)'}`,
    );
  }

  check(cond: unknown, msg: string): void {
    if (!cond) this.fail(msg);
  }

  count(k: string): void {
    this.stats[k] = (this.stats[k] ?? 0) + 1;
  }

  candidates(): Candidate[] {
    return this.model.candidates();
  }

  newName(): string {
    return `k${++this.nameSeq}`;
  }

  // ---- server lifecycle ------------------------------------------------------------

  async start(): Promise<void> {
    this.phase = 'restart';
    const lock = path.join(this.meta, 'lock');
    const stale = fs.existsSync(lock) ? fs.readFileSync(lock, 'utf8').trim() : null;
    try {
      this.srv = await startServer({ dir: this.dir, images: ['disk.img'] });
    } catch (err) {
      this.fail(`the server did not restart after the kill (stale lock ${stale}): ${(err as Error).message}`);
    }
    for (const h of this.liveHandles) {
      const r = await this.py.open(h, this.srv!.uri('disk'));
      this.check(r.ok, `cannot connect ${h} to disk after the restart: ${r.error}`);
      this.check(r.size === this.size, `disk has size ${r.size} after the restart, expected ${this.size}`);
    }
  }

  async openSnapshot(name: string): Promise<void> {
    const h = `S${++this.handleSeq}`;
    const r = await this.py.open(h, this.srv!.uri(`disk@${name}`));
    this.check(r.ok, `cannot connect to snapshot export disk@${name}: ${r.error} (errno ${r.errno})`);
    this.check(r.size === this.size, `disk@${name} has size ${r.size}, expected ${this.size}`);
    this.snapHandles.set(name, h);
  }

  async kill(): Promise<void> {
    const srv = this.srv!;
    this.srv = undefined;
    await srv.stop('SIGKILL');
    for (const h of this.liveHandles) await this.py.close(h);
    for (const h of this.snapHandles.values()) await this.py.close(h);
    this.snapHandles.clear();
  }

  async cleanup(): Promise<void> {
    if (this.srv) await this.srv.stop('SIGKILL');
    await this.py.quit();
    removeDir(this.dir);
  }

  // ---- checking after a restart -------------------------------------------------------

  /**
   * Compares the restarted server with the model, resolving exactly the
   * ambiguity of what was in flight at the kill, then adopts the outcome.
   */
  async resolve(): Promise<void> {
    this.phase = 'check after restart';
    const p = this.pending;
    const list = await snapshotList(this.image);
    const names = list.map((s) => s.name);
    for (const s of list) this.check(s.state === 'active', `snapshot ${s.name} is ${s.state} after the restart: ${JSON.stringify(s.failure)}`);
    // Allowed name sequences: the model's, with the in-flight delete gone or
    // not, and the in-flight create appended or not.
    const allowed: string[][] = [];
    for (const del of p.delete ? [false, true] : [false])
      for (const cre of p.create ? [false, true] : [false]) {
        const seq = this.model.names().filter((n) => !(del && n === p.delete));
        if (cre) seq.push(p.create!.name);
        allowed.push(seq);
      }
    this.check(
      allowed.some((a) => JSON.stringify(a) === JSON.stringify(names)),
      `snapshot list after the restart is ${JSON.stringify(names)}; allowed: ${allowed.map((a) => JSON.stringify(a)).join(' or ')}`,
    );

    // Live volume: exact except the bytes of unacknowledged writes (old or new
    // each). Blocks whose checksum matches the model are equal; the others are
    // read and checked byte by byte.
    const B = CRC_BLOCK;
    const got = await this.py.crcs('L0');
    const want = this.model.crcs();
    const bad: number[] = [];
    for (let b = 0; b < want.length; b++) if (got[b] !== want[b]) bad.push(b);
    const adopt: [number, Buffer][] = [];
    for (const b of bad) {
      const base = b * B;
      const end = Math.min(this.size, base + B);
      const actual = await this.py.read('L0', base, end - base);
      const old = this.model.live.subarray(base, end);
      const ops = p.writes.filter((op) => op.off < end && base < op.off + op.len);
      const alt = Buffer.from(old);
      const mask = new Uint8Array(end - base);
      for (const op of ops) {
        const a = Math.max(base, op.off);
        const z = Math.min(end, op.off + op.len);
        mask.fill(1, a - base, z - base);
        opData(op).copy(alt, a - base, a - op.off, z - op.off);
      }
      for (let i = 0; i < end - base; i++) {
        if (actual[i] === old[i]) continue;
        if (!mask[i]) {
          this.fail(
            `live volume after the restart differs outside the unacknowledged writes: ` +
              describeDiff(old, actual, base, this.candidates()) +
              (ops.length ? `; unacknowledged ops in this block: ${ops.map(describeOp).join(', ')}` : '; no unacknowledged op touches this block'),
          );
        }
        if (actual[i] !== alt[i]) {
          const op = ops.find((o) => o.off <= base + i && base + i < o.off + o.len)!;
          this.fail(
            `byte ${base + i} of the unacknowledged ${describeOp(op)} is 0x${actual[i]!.toString(16)}: neither the old 0x${old[i]!.toString(16)} nor the new 0x${alt[i]!.toString(16)}`,
          );
        }
      }
      adopt.push([base, actual]);
    }
    for (const [base, actual] of adopt) this.model.write(base, actual);

    // The outcome of the in-flight snapshot operations.
    if (p.delete) p.what += `; after the restart ${p.delete} is ${names.includes(p.delete) ? 'still listed' : 'gone'}`;
    if (p.create) p.what += `; after the restart ${p.create.name} ${names.includes(p.create.name) ? 'exists' : 'does not exist'}`;
    if (p.delete && !names.includes(p.delete)) this.model.remove(p.delete);
    if (p.create && names.includes(p.create.name)) await this.adoptCut(p.create);

    for (const s of this.model.snaps) await this.openSnapshot(s.name);
    await this.verifySnapshots('after the restart');
    this.pending = { writes: [], what: 'nothing' };
  }

  /** Adds an in-flight create that survived: it must be one cut of the writes that ran during it. */
  async adoptCut(c: PendingCreate): Promise<void> {
    const data = Buffer.from(c.base);
    const inT = new Map<number, boolean>();
    await this.openSnapshot(c.name);
    const h = this.snapHandles.get(c.name)!;
    for (const op of c.ops) {
      const got = await this.py.read(h, op.off, op.len);
      const neu = opData(op);
      if (got.equals(neu)) {
        inT.set(op.k, true);
        neu.copy(data, op.off);
      } else if (got.equals(c.base.subarray(op.off, op.off + op.len))) inT.set(op.k, false);
      else this.fail(`snapshot ${c.name} (create in flight at the kill) holds ${describeOp(op)} only in part: ${describeDiff(neu, got, op.off)}`);
    }
    const ins = c.ops.filter((op) => inT.get(op.k));
    for (const w2 of ins) {
      const w1 = c.ops.find((op) => !inT.get(op.k) && c.ack.has(op.k) && c.ack.get(op.k)! < c.sub.get(w2.k)!);
      this.check(
        !w1,
        `snapshot ${c.name} is not one point in time: it holds ${describeOp(w2)} but not ${w1 && describeOp(w1)}, acknowledged before the former was submitted`,
      );
    }
    await this.py.close(h);
    this.snapHandles.delete(c.name);
    this.model.addSnapshot(c.name, data, `round ${this.round} (create in flight at the kill)`);
    this.count('create-in-flight-survived');
  }

  async verifySnapshots(when: string): Promise<void> {
    const live = await compareExport(this.py, 'L1', this.model.live, this.model.crcs(), this.candidates());
    if (live) this.fail(`live export ${when}: ${live}`);
    for (const s of this.model.snaps) {
      const d = await compareExport(this.py, this.snapHandles.get(s.name)!, s.data, s.crcs, this.candidates(), (base, len) => this.explain(base, len));
      const note =
        s.name === this.pending.delete
          ? ` (its delete was in flight at the kill and it is still listed, so it must be intact)`
          : this.pending.create && s.name === this.pending.create.name
            ? ' (its create was in flight at the kill)'
            : this.pending.delete || this.pending.create
              ? ` (not itself in flight: ${this.pending.what})`
              : '';
      if (d) this.fail(`snapshot disk@${s.name} (created ${s.createdAt}) ${when} differs from the model${note}: ${d}`);
    }
  }

  /** The last burst's writes touching [base, base+len), with their timing against the snapshot operation. */
  explain(base: number, len: number): string {
    const b = this.lastBurst;
    if (!b) return '';
    const ms = (ns: number) => ((ns - b.reqNs) / 1e6).toFixed(2);
    return b.ops
      .filter((op) => b.sub.has(op.k) && op.off < base + len && base < op.off + op.len)
      .map(
        (op) =>
          `${describeOp(op)} touched this block: submitted at ${b.reqNs ? ms(b.sub.get(op.k)!) : '?'} ms, ` +
          (b.ack.has(op.k) ? `acknowledged at ${b.reqNs ? ms(b.ack.get(op.k)!) : '?'} ms` : 'never acknowledged') +
          (b.reqNs ? ' (relative to sending the snapshot request)' : ''),
      )
      .join('; ');
  }

  // ---- activity -------------------------------------------------------------------------

  randomOp(region?: { off: number; len: number }): BurstOp {
    const r = this.rng;
    const lo = region?.off ?? 0;
    const span = region?.len ?? this.size;
    const kind = r.weighted({ w: 75, z: 13, trim: 12 });
    const maxLen = kind === 'w' ? 300 * KiB : 1 * MiB;
    let len = r.weighted({ tiny: 2, small: 3, big: 5 }) === 'tiny' ? r.int(1, 64) : r.chance(0.4) ? r.int(65, 8 * KiB) : r.int(8 * KiB, maxLen);
    len = Math.min(len, span);
    let off: number;
    if (r.chance(0.3)) {
      const b = Math.ceil(lo / (64 * KiB)) * 64 * KiB + r.int(0, Math.max(0, Math.floor(span / (64 * KiB)) - 1)) * 64 * KiB;
      off = b - r.int(0, Math.min(len, b - lo));
    } else off = lo + r.int(0, span - len);
    off = Math.max(lo, Math.min(off, lo + span - len));
    const k = ++this.opSeq;
    if (kind === 'w') return { k, t: 'w', off, len, tag: `${this.seed}-k${k}` };
    if (kind === 'z') return { k, t: 'z', off, len, nohole: r.chance(0.5) };
    return { k, t: 'trim', off, len };
  }

  /** Runs ops one at a time (all acknowledged). */
  async sequential(n: number): Promise<void> {
    for (let i = 0; i < n; i++) {
      const op = this.randomOp();
      const h = this.rng.pick(this.liveHandles);
      const req =
        op.t === 'w'
          ? { op: 'write', h, off: op.off, len: op.len, tag: op.tag }
          : op.t === 'z'
            ? { op: 'zero', h, off: op.off, len: op.len, nohole: op.nohole }
            : { op: 'trim', h, off: op.off, len: op.len };
      const res = await this.py.request(req);
      this.check(res.ok, `${describeOp(op)} failed: ${res.error} (errno ${res.errno})`);
      if (op.t === 'w') this.model.write(op.off, opData(op));
      else this.model.zero(op.off, op.len);
    }
  }

  /**
   * Runs `ops` as a burst on three connections (depth 4 each), calling
   * `during` once it runs (with the event stream so far); returns when the
   * burst ends (ops done, stopped, or connections dead). Acknowledged ops are
   * applied to the model in acknowledgement order; submitted but
   * unacknowledged ones are returned.
   */
  async burst(ops: BurstOp[], during: (acks: number) => void): Promise<{ unacked: BurstOp[]; sub: Map<number, number>; ack: Map<number, number> }> {
    const sub = new Map<number, number>();
    const ack = new Map<number, number>();
    const order: number[] = [];
    const errs: BurstEvent[] = [];
    this.py.onEvent = (ev) => {
      if (ev.ev === 'sub') sub.set(ev.k, ev.ns);
      else if (ev.ev === 'ack') {
        ack.set(ev.k, ev.ns);
        order.push(ev.k);
      } else errs.push(ev);
      during(ack.size);
    };
    const br = await this.py.request({ op: 'burst', hs: this.liveHandles, depth: 4, ops });
    this.py.onEvent = undefined;
    this.check(br.ok, `burst failed: ${br.error}`);
    const byK = new Map(ops.map((o) => [o.k, o]));
    for (const k of order) {
      const op = byK.get(k)!;
      if (op.t === 'w') this.model.write(op.off, opData(op));
      else this.model.zero(op.off, op.len);
    }
    const unacked = ops.filter((o) => sub.has(o.k) && !ack.has(o.k));
    this.lastBurst = { ops, sub, ack, reqNs: 0 };
    return { unacked, sub, ack };
  }
}

function pickDelete(rng: Rng, names: string[]): string {
  const which = rng.weighted({ oldest: 1, newest: 1, middle: names.length > 2 ? 1 : 0 });
  return which === 'oldest' ? names[0]! : which === 'newest' ? names.at(-1)! : names[rng.int(1, names.length - 2)]!;
}

/** Kills the server when the manifest is about to be replaced (its temp file appears), or after `fallbackMs`. */
function killOnManifestWrite(rig: KillRig, fallbackMs: number, watch = true): { fired: Promise<string>; cancel: () => void } {
  const srv = rig.srv;
  let done = false;
  let watcher: fs.FSWatcher | undefined;
  let timer: NodeJS.Timeout | undefined;
  let resolveFired!: (why: string) => void;
  const fired = new Promise<string>((r) => (resolveFired = r));
  const fire = (why: string) => {
    if (done) return;
    done = true;
    srv?.proc.kill('SIGKILL');
    watcher?.close();
    clearTimeout(timer);
    resolveFired(why);
  };
  if (watch) {
    watcher = fs.watch(rig.meta, (_ev, file) => {
      if (file && String(file).startsWith('manifest.json.tmp')) fire('manifest temp file appeared');
    });
  }
  timer = setTimeout(() => fire(`${fallbackMs} ms timer`), fallbackMs);
  return {
    fired,
    cancel: () => {
      done = true;
      watcher?.close();
      clearTimeout(timer);
    },
  };
}

// ---- Test 1: kill rounds, no writes during snapshot operations ----------------------------------

async function killRound(rig: KillRig): Promise<void> {
  const r = rig.rng;
  const n = rig.model.snaps.length;
  const mode = r.weighted({
    burst: 5,
    afterCreate: n < MAX_SNAPSHOTS ? 2 : 0,
    duringCreate: n < MAX_SNAPSHOTS ? 3 : 0,
    duringDelete: n > 0 ? 3 : 0,
    afterDelete: n > 0 ? 1 : 0,
    idle: 1,
  });
  rig.count(mode);
  rig.phase = `activity (${mode})`;
  // Some ordinary traffic first (and now and then a snapshot), all acknowledged.
  await rig.sequential(r.int(0, 6));
  if (mode === 'burst' && n < MAX_SNAPSHOTS && r.chance(0.3)) {
    const name = rig.newName();
    const c = await cli(['snapshot', 'create', rig.image, name]);
    rig.check(c.code === 0, `snapshot create ${name}: ${brief(c)}`);
    rig.model.snapshot(name, `round ${rig.round}`);
    await rig.sequential(r.int(0, 3));
  }
  let what: string = mode;
  switch (mode) {
    case 'burst': {
      const ops = Array.from({ length: 600 }, () => rig.randomOp());
      const killAfter = r.int(0, 60);
      const delay = r.int(0, 40);
      let armed = false;
      const res = await rig.burst(ops, (acks) => {
        if (!armed && acks >= killAfter) {
          armed = true;
          const srv = rig.srv;
          setTimeout(() => srv?.proc.kill('SIGKILL'), delay);
        }
      });
      if (!armed) rig.srv?.proc.kill('SIGKILL');
      await rig.kill();
      rig.pending = { writes: res.unacked, what: `a burst of writes; ${res.ack.size} acknowledged, ${res.unacked.length} in flight: ${res.unacked.map(describeOp).join(', ')}` };
      what = `burst: ${res.ack.size} acked, ${res.unacked.length} in flight`;
      break;
    }
    case 'afterCreate':
    case 'afterDelete': {
      if (mode === 'afterCreate') {
        const name = rig.newName();
        const c = await cli(['snapshot', 'create', rig.image, name]);
        rig.check(c.code === 0, `snapshot create ${name}: ${brief(c)}`);
        rig.model.snapshot(name, `round ${rig.round} (killed right after)`);
        what = `kill right after create ${name} returned`;
      } else {
        const name = pickDelete(r, rig.model.names());
        const c = await cli(['snapshot', 'delete', rig.image, name]);
        rig.check(c.code === 0, `snapshot delete ${name}: ${brief(c)}`);
        rig.model.remove(name);
        what = `kill right after delete ${name} returned`;
      }
      await rig.kill();
      rig.pending = { writes: [], what };
      break;
    }
    case 'duringCreate':
    case 'duringDelete': {
      const create = mode === 'duringCreate';
      const name = create ? rig.newName() : pickDelete(r, rig.model.names());
      const base = Buffer.from(rig.model.live);
      // Kill at the manifest update (the server is between the data-path change
      // and the record of it), or at a random moment of the CLI's run.
      const trigger = r.chance(0.5) ? 'manifest' : 'timer';
      const delay = r.int(0, 450);
      const k = killOnManifestWrite(rig, trigger === 'manifest' ? 5000 : delay, trigger === 'manifest');
      const c: ExecResult = await cli(['snapshot', create ? 'create' : 'delete', rig.image, name]);
      k.cancel();
      await rig.kill();
      // Exit 0: it returned (online before the kill, or offline after it): it happened.
      if (c.code === 0) {
        if (create) rig.model.snapshot(name, `round ${rig.round} (returned despite the kill)`);
        else rig.model.remove(name);
        rig.pending = { writes: [], what: `${mode} ${name}, which returned (${trigger} kill)` };
        rig.count(`${mode}-returned`);
      } else {
        // 11 CONTROL_FAILED: the server died during the request. 7 VOLUME_BUSY
        // can only mean the CLI found no server and then saw the killed one's
        // lock while it was not reaped yet (a zombie of this test process).
        rig.check(
          c.code === 11 || (c.code === 7 && c.stderr.includes('VOLUME_BUSY')),
          `snapshot ${create ? 'create' : 'delete'} ${name} interrupted by the kill: want CONTROL_FAILED (11), ${brief(c)}`,
        );
        rig.pending = create
          ? { writes: [], create: { name, base, ops: [], sub: new Map(), ack: new Map() }, what: `snapshot create ${name} in flight (${trigger} kill${trigger === 'timer' ? ` after ${delay} ms` : ''})` }
          : { writes: [], delete: name, what: `snapshot delete ${name} in flight (${trigger} kill${trigger === 'timer' ? ` after ${delay} ms` : ''})` };
        rig.count(`${mode}-interrupted`);
      }
      what = rig.pending.what;
      break;
    }
    case 'idle': {
      await rig.kill();
      rig.pending = { writes: [], what: 'nothing (idle kill)' };
      what = 'idle kill';
      break;
    }
  }
  rig.history.push(`${rig.round}: ${what}`);
}

t.test('SIGKILL at random moments: snapshots and acknowledged writes survive exactly', async (t) => {
  if (!requireTools(t, ['python3-libnbd'])) return;
  const ROUNDS = 60;
  const seed = SEED;
  const rig = new KillRig('kill', seed, 8 * MiB + 12345);
  t.teardown(() => rig.cleanup());
  t.comment(`seed ${seed}, ${ROUNDS} rounds, volume ${rig.size} bytes`);
  const started = Date.now();
  try {
    await rig.start();
    for (rig.round = 1; rig.round <= ROUNDS; rig.round++) {
      await killRound(rig);
      await rig.start();
      await rig.resolve();
    }
    rig.phase = 'final SIGTERM';
    const code = await rig.srv!.stop('SIGTERM');
    rig.srv = undefined;
    rig.check(code === 0, `server exited with ${code} on SIGTERM`);
    const raw = fs.readFileSync(rig.image);
    rig.check(raw.equals(rig.model.live), 'the raw image differs from the model at the end');
    t.pass(
      `${ROUNDS} kill rounds (${Object.entries(rig.stats)
        .map(([k, v]) => `${k} ${v}`)
        .join(', ')}): every snapshot and acknowledged write exact (${((Date.now() - started) / 1000).toFixed(1)} s)`,
    );
  } catch (err) {
    t.fail(err instanceof Failure ? err.message : `[seed ${seed}] round ${rig.round} (${rig.phase}): ${(err as Error).stack}`);
  }
});

// ---- Test 2: kill while a create/delete runs under concurrent writes ----------------------------
//
// Writes stream to chunks no snapshot holds yet while a snapshot is created
// or deleted (via the control socket); the server is killed the moment the
// manifest is about to be replaced, i.e. after the data path already changed
// (new snapshot in the chain / deleted one out of it) but before that is
// recorded, or at a random moment. After the restart: older snapshots exact,
// the deleted one gone or exact, the created one absent or one cut of the
// write stream, acknowledged writes present.
t.test('SIGKILL during create/delete with writes in flight', async (t) => {
  if (!requireTools(t, ['python3-libnbd'])) return;
  const ROUNDS = 16;
  const seed = (SEED + 1) >>> 0;
  const rig = new KillRig('kill-concurrent', seed, 64 * MiB);
  t.teardown(() => rig.cleanup());
  t.comment(`seed ${seed}, ${ROUNDS} rounds, volume ${rig.size} bytes`);
  const cs = 64 * KiB;
  const fresh = Array.from({ length: rig.size / cs }, (_, i) => i);
  for (let i = fresh.length - 1; i > 0; i--) {
    const j = rig.rng.int(0, i);
    [fresh[i], fresh[j]] = [fresh[j]!, fresh[i]!];
  }
  const started = Date.now();
  try {
    await rig.start();
    for (rig.round = 1; rig.round <= ROUNDS && fresh.length > 100; rig.round++) {
      const r = rig.rng;
      if (rig.model.snaps.length === 0) {
        // An older snapshot, taken with nothing in flight: the one whose chunks
        // the writes below must keep preserved whatever happens to the new one.
        const name = rig.newName();
        const c = await controlRequest(rig.image, { op: 'snapshot-create', name });
        rig.check(c.ok, `create ${name}: ${c.message}`);
        rig.model.snapshot(name, `round ${rig.round} (quiet)`);
      }
      const names = rig.model.names();
      const kind = names.length < MAX_SNAPSHOTS && r.chance(0.5) ? 'create' : 'delete';
      rig.phase = `activity (${kind} under writes)`;
      let target: string;
      if (kind === 'delete') {
        // The newest snapshot, taken just now without writes: every chunk the
        // burst touches is then preserved into it and must be handed down.
        target = rig.newName();
        const c = await controlRequest(rig.image, { op: 'snapshot-create', name: target });
        rig.check(c.ok, `create ${target}: ${c.message}`);
        rig.model.snapshot(target, `round ${rig.round}`);
      } else target = rig.newName();
      const base = Buffer.from(rig.model.live);
      const ops: BurstOp[] = [];
      for (let i = 0; i < 60 && fresh.length; i++) {
        const c = fresh.pop()!;
        const len = r.int(1, 16 * KiB);
        ops.push({ k: i + rig.round * 1000, t: 'w', off: c * cs + r.int(0, cs - len), len, tag: `${seed}-kc${rig.round}-${i}` });
      }
      const trigger = r.chance(0.75) ? 'manifest' : 'timer';
      const startAfter = r.int(1, 10);
      let k: ReturnType<typeof killOnManifestWrite> | undefined;
      let opPromise: Promise<{ ok: boolean } | Error> | undefined;
      let returned = false;
      let reqNs = 0;
      const res = await rig.burst(ops, (acks) => {
        if (opPromise || acks < startAfter) return;
        k = killOnManifestWrite(rig, trigger === 'manifest' ? 3000 : r.int(0, 25), trigger === 'manifest');
        reqNs = monoNs();
        const srv = rig.srv;
        opPromise = controlRequest(rig.image, { op: kind === 'create' ? 'snapshot-create' : 'snapshot-delete', name: target }).then(
          (x) => {
            returned = x.ok;
            // It returned before the kill: kill now (the burst keeps going until then).
            srv?.proc.kill('SIGKILL');
            return x;
          },
          (e: Error) => e,
        );
      });
      if (!opPromise) rig.srv?.proc.kill('SIGKILL');
      rig.lastBurst!.reqNs = reqNs;
      const why = k ? await Promise.race([k.fired, opPromise!.then(() => 'operation returned')]) : 'burst ended first';
      await opPromise;
      k?.cancel();
      await rig.kill();
      const used = ops.filter((o) => res.sub.has(o.k));
      for (const o of ops) if (!res.sub.has(o.k)) fresh.push(Math.floor(o.off / cs));
      let what = `${kind} ${target} with ${used.length} writes (${res.unacked.length} unacknowledged at the kill), killed on ${why}`;
      if (kind === 'delete') {
        if (returned) rig.model.remove(target);
        rig.pending = { writes: res.unacked, delete: returned ? undefined : target, what };
      } else {
        const create: PendingCreate = { name: target, base, ops: used, sub: res.sub, ack: res.ack };
        rig.pending = { writes: res.unacked, create, what };
        if (returned) what += ' (it returned: must exist)';
      }
      rig.count(`${kind}${returned ? '-returned' : '-interrupted'}`);
      rig.history.push(`${rig.round}: ${what}`);
      await rig.start();
      const mustExist = kind === 'create' && returned;
      await rig.resolve();
      if (mustExist) rig.check(rig.model.find(target), `snapshot ${target} returned from create before the kill but is gone after the restart`);
    }
    t.pass(
      `${rig.round - 1} rounds (${Object.entries(rig.stats)
        .map(([k, v]) => `${k} ${v}`)
        .join(', ')}): all exact (${((Date.now() - started) / 1000).toFixed(1)} s)`,
    );
  } catch (err) {
    t.fail(err instanceof Failure ? err.message : `[seed ${seed}] round ${rig.round} (${rig.phase}): ${(err as Error).stack}`);
  }
});
