// Crash test of ROLLBACK: SIGKILL the real CLI server while the background
// merge of a rollback copies chunks, restart it on the same image, and compare
// the live volume and every snapshot with an in-memory model.
//
// The volume (128 MiB, 16K chunks) is changed everywhere after its older
// snapshots were taken, so a rollback to one of them merges every chunk in two
// 64 MiB native steps (each flushed and recorded before the next). Each round
// rolls back to a snapshot (usually an old one while newer ones exist), and
// kills the server during the merge, in one of these ways:
//   burst    writes, WRITE_ZEROES and TRIMs stream on three connections while
//            the merge runs; after a random number of acknowledgements `jobs`
//            is asked (control socket) and the server is killed at its reply;
//   quiet    `jobs` is polled until the merge reached a random percentage,
//            and the server is killed at that reply;
//   replace  a second rollback replaces the first one's merge at once, then
//            a burst or quiet kill;
//   cli      `node-nbd-server rollback IMAGE S --json`, then a quiet kill;
//   request  the kill lands while the rollback request itself runs (when its
//            job file or manifest temp file appears, when the manifest was
//            renamed into place, or on a short timer; always in round 2);
//   finishing the kill lands when the finishing merge replaces the manifest
//            (always in round 3).
// A kill counts as mid-merge when `jobs` reported percent < 100 just before it
// and the manifest on disk still records the rollback after it; the test
// requires at least 20 of them. Every server runs with --merge-rate
// (MERGE_RATE): a full merge then takes about two seconds on any machine,
// however fast its disk, so a kill sent at a `jobs` reply that showed
// done < total (at most about half way) lands mid-merge with a margin of
// about a second; the count is still taken from the observed state, not
// assumed. The resumed merge after a restart runs at the same rate, so
// `jobs` right after the restart shows it.
//
// After the restart (crash model as test/snapshots-kill.ts: SIGKILL keeps the
// page cache, so every acknowledged write survives):
//   - the snapshot list is unchanged and every snapshot is exact;
//   - live = the rolled-back snapshot's content plus every write acknowledged
//     after the rollback; the bytes of ops in flight at the kill are old or
//     new, each; a rollback request in flight left live either as it was or
//     exactly the snapshot, matching whether the manifest recorded it;
//   - the merge resumes: `jobs IMAGE --json` shows it (same snapshot, same
//     total) until it returns [], and `history IMAGE --json` then has its
//     merge-finished entry, stamped after the restart when it was killed
//     mid-way, with the rollback's chunk count; live and every snapshot are
//     exact again after it;
//   - in some rounds `jobs IMAGE --wait` finishes the merge offline (no
//     server) before the restart; the same checks apply;
//   - the history has each rollback that took effect, in order (`replaced`
//     as it happened), also one whose request was killed after the manifest
//     recorded it, and exactly one merge-finished for the last one, also when
//     the kill landed while the merge was finishing. A lost entry changes
//     nothing else, so it is collected and reported at the end (one failing
//     assertion) while the rounds go on.
// The chunk totals are checked against the chunks changed since each snapshot.
//
// The seed is printed; NBD_TEST_SEED=<seed> replays the random choices (the
// kill timing is real time, so a replay is close, not identical).
import t from 'tap';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { makeTempDir, startServer, type RunningServer } from './fixtures/server';
import { requireTools } from './fixtures/tools';
import {
  CRC_BLOCK,
  ChangeTracker,
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
  dataFor,
  describeDiff,
  plainCliProcesses,
  historyJson,
  jobsJson,
  removeDir,
  sleep,
  snapshotList,
  sparseImage,
  type BurstEvent,
  type BurstOp,
  type Candidate,
  type HistoryJson,
  type JobEntry,
  opData,
  describeOp,
} from './fixtures/snapshot-model';

plainCliProcesses();
const SEED = baseSeed();
t.comment(`rollback-kill seed ${SEED} (replay: NBD_TEST_SEED=${SEED} node tools/run-tests.js test/rollback-kill.ts)`);

const SIZE = 128 * MiB;
const CHUNK = 16 * KiB;
/** Chunks per native merge step (src/rollback.ts: 64 MiB per step). */
const STEP_CHUNKS = (64 * MiB) / CHUNK;
const MAX_SNAPSHOTS = 4;
const MIN_MID_KILLS = 20;
const MIN_ROUNDS = 21;
const MAX_ROUNDS = 40;
/**
 * --merge-rate of every server of this test: 128 MiB merge in about 2 s, in
 * steps of a tenth of a second (6.4 MiB, 5% of a full merge). Slow enough
 * that a kill at an observed done < total (quiet kills wait for at most 50%)
 * is mid-merge; fast enough that 20+ rounds of resumed merges stay short.
 */
const MERGE_RATE = '64M';

class Failure extends Error {}

type RollbackReply = JobEntry & { visibleMs: number };

/** A rollback of this test whose reply came back. */
interface Rb {
  target: string;
  id: number;
  total: number;
  startedAt: string;
  by: string;
  /** The pending set the model expects (per chunk 2 certain, 1 maybe). */
  levels: Uint8Array;
}

interface Pending {
  /** Ops submitted but not acknowledged at the kill (pairwise disjoint). */
  writes: BurstOp[];
  what: string;
}

/** What the manifest on disk records (read raw, after the kill, before the restart). */
interface DiskManifest {
  /** The running rollback merge: its job record (manifest `jobs`, kind rollback-merge, running), as id and snapshot. */
  rollback?: { jobId: number; snapshotId: number };
  snapshots: { id: number; name: string }[];
  jobs?: { id: number; kind: string; state: string; params: { snapshotId: number } }[];
}


class KillRig {
  readonly rng: Rng;
  readonly dir: string;
  readonly image: string;
  readonly meta: string;
  srv?: RunningServer;
  readonly py = new PyClient();
  readonly model: VolumeModel;
  readonly tracker = new ChangeTracker(SIZE, CHUNK);
  readonly ids = new Map<string, number>();
  readonly liveHandles = ['L0', 'L1', 'L2'];
  readonly snapHandles = new Map<string, string>();
  pending: Pending = { writes: [], what: 'nothing' };
  round = 0;
  phase = 'start';
  readonly history: string[] = [];
  stats: Record<string, number> = {};
  private handleSeq = 0;
  private nameSeq = 0;
  private opSeq = 0;
  /** Rollbacks of the current round (replies received), in order. */
  rbs: Rb[] = [];
  /** The last basis (rollback target), while it exists. */
  basis?: string;
  /**
   * History entries lost across a kill (a rollback that took effect without
   * its "rollback" entry, a finished merge without its merge-finished): they
   * change nothing else, so the rounds go on and they are reported at the end.
   */
  readonly historyProblems: string[] = [];

  constructor(readonly seed: number) {
    this.rng = new Rng(seed);
    this.dir = makeTempDir('nbd-rbkill-');
    this.image = sparseImage(this.dir, 'disk.img', SIZE);
    const initial = dataFor(`${seed}-initial`, SIZE);
    fs.writeFileSync(this.image, initial);
    this.meta = `${this.image}.nbd`;
    this.model = new VolumeModel(SIZE, initial);
  }

  fail(msg: string): never {
    throw new Failure(
      `[seed ${this.seed}] round ${this.round} (${this.phase}): ${msg}\n` +
        `in flight at the last kill: ${this.pending.what}\n` +
        `this round's rollbacks: ${this.rbs.map((r) => `${r.target} (${r.total} chunks)`).join(', ') || '(none)'}\n` +
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

  // ---- server lifecycle ------------------------------------------------------------------

  async start(): Promise<void> {
    this.phase = 'restart';
    this.tracker.restart(); // the new server has no dirty set
    try {
      this.srv = await startServer({ dir: this.dir, images: ['disk.img'], args: ['--chunk-size', '16K', '--merge-rate', MERGE_RATE] });
    } catch (err) {
      this.fail(`the server did not (re)start: ${(err as Error).message}`);
    }
    for (const h of this.liveHandles) {
      const r = await this.py.open(h, this.srv!.uri('disk'));
      this.check(r.ok, `cannot connect ${h} to disk after the restart: ${r.error}`);
      this.check(r.size === SIZE, `disk has size ${r.size} after the restart, expected ${SIZE}`);
    }
    for (const s of this.model.snaps) {
      const h = `S${++this.handleSeq}`;
      const r = await this.py.open(h, this.srv!.uri(`disk@${s.name}`));
      this.check(r.ok, `cannot connect to snapshot export disk@${s.name}: ${r.error} (errno ${r.errno})`);
      this.snapHandles.set(s.name, h);
    }
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

  diskManifest(): DiskManifest {
    const text = fs.readFileSync(path.join(this.meta, 'manifest.json'), 'utf8');
    const m = (JSON.parse(text) as { manifest: DiskManifest }).manifest;
    const r = m.jobs?.find((j) => j.kind === 'rollback-merge' && (j.state === 'running' || j.state === 'canceling'));
    return { ...m, rollback: r ? { jobId: r.id, snapshotId: r.params.snapshotId } : undefined };
  }

  historyFile(): HistoryJson[] {
    const file = path.join(this.meta, 'history.jsonl');
    if (!fs.existsSync(file)) return [];
    return fs
      .readFileSync(file, 'utf8')
      .split('\n')
      .filter((l) => l)
      .map((l) => JSON.parse(l) as HistoryJson);
  }

  // ---- checks --------------------------------------------------------------------------------

  async verifyList(): Promise<void> {
    const list = await snapshotList(this.image);
    this.check(
      JSON.stringify(list.map((s) => s.name)) === JSON.stringify(this.model.names()),
      `snapshot list --json names ${JSON.stringify(list.map((s) => s.name))}, model ${JSON.stringify(this.model.names())}`,
    );
    for (const s of list) {
      const known = this.ids.get(s.name);
      if (known === undefined) this.ids.set(s.name, s.id);
      else this.check(known === s.id, `snapshot ${s.name} lists id ${s.id}, earlier ${known}`);
      this.check(s.state === 'active', `snapshot ${s.name} is ${s.state}: ${JSON.stringify(s.failure)}`);
      const basis = Array.isArray(s.basisOf) && s.basisOf.length === 1 && path.resolve(s.basisOf[0]!) === this.image;
      this.check(
        s.name === this.basis ? basis : Array.isArray(s.basisOf) && s.basisOf.length === 0,
        `snapshot ${s.name} lists basisOf ${JSON.stringify(s.basisOf)}; the last rollback went to ${this.basis ?? '(none, or deleted)'}`,
      );
    }
  }

  async verifyAll(when: string): Promise<void> {
    const live = await compareExport(this.py, this.rng.pick(this.liveHandles), this.model.live, this.model.crcs(), this.candidates());
    if (live) this.fail(`live export ${when} differs from the model: ${live}`);
    for (const s of this.model.snaps) {
      const d = await compareExport(this.py, this.snapHandles.get(s.name)!, s.data, s.crcs, this.candidates());
      if (d) this.fail(`snapshot disk@${s.name} (created ${s.createdAt}) ${when} differs from the model: ${d}`);
    }
  }

  checkProgress(j: { done: number; total: number; percent: number }, what: string): void {
    this.check(Number.isInteger(j.done) && Number.isInteger(j.total) && j.done >= 0 && j.done <= j.total && j.total <= this.tracker.chunks, `${what}: done ${j.done} / total ${j.total}`);
    const want = j.total ? Math.floor((1000 * j.done) / j.total) / 10 : 100;
    this.check(j.percent === want, `${what}: percent ${j.percent}, expected ${want}`);
  }

  /**
   * Compares the restarted server's live volume with the model: exact except
   * the bytes of ops in flight at the kill (old or new each), which are then
   * adopted.
   */
  async resolveLive(): Promise<void> {
    const p = this.pending;
    const B = CRC_BLOCK;
    const got = await this.py.crcs('L0');
    const want = this.model.crcs();
    this.check(got.length === want.length, `live export has ${got.length} blocks, expected ${want.length}`);
    const adopt: [number, Buffer][] = [];
    for (let b = 0; b < want.length; b++) {
      if (got[b] === want[b]) continue;
      const base = b * B;
      const end = Math.min(SIZE, base + B);
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
            `live volume after the restart differs from the model (the rolled-back snapshot plus the acknowledged writes) outside the ops in flight: ` +
              describeDiff(old, actual, base, this.candidates()) +
              (ops.length ? `; ops in flight in this block: ${ops.map(describeOp).join(', ')}` : '; no op in flight touches this block'),
          );
        }
        if (actual[i] !== alt[i]) {
          const op = ops.find((o) => o.off <= base + i && base + i < o.off + o.len)!;
          this.fail(`byte ${base + i} of the unacknowledged ${describeOp(op)} is 0x${actual[i]!.toString(16)}: neither the old 0x${old[i]!.toString(16)} nor the new 0x${alt[i]!.toString(16)}`);
        }
      }
      adopt.push([base, actual]);
    }
    for (const [base, actual] of adopt) this.model.write(base, actual);
  }

  // ---- activity ------------------------------------------------------------------------------

  randomOp(): BurstOp {
    const r = this.rng;
    const kind = r.weighted({ w: 75, z: 13, trim: 12 });
    const maxLen = kind === 'w' ? 300 * KiB : 1 * MiB;
    let len = r.weighted({ tiny: 2, small: 3, big: 5 }) === 'tiny' ? r.int(1, 64) : r.chance(0.4) ? r.int(65, 8 * KiB) : r.int(8 * KiB, maxLen);
    len = Math.min(len, SIZE);
    let off: number;
    if (r.chance(0.3)) {
      const b = r.int(1, SIZE / CHUNK - 1) * CHUNK;
      off = b - r.int(0, Math.min(len, b));
    } else off = r.int(0, SIZE - len);
    off = Math.max(0, Math.min(off, SIZE - len));
    const k = ++this.opSeq;
    if (kind === 'w') return { k, t: 'w', off, len, tag: `${this.seed}-k${k}` };
    if (kind === 'z') return { k, t: 'z', off, len, nohole: r.chance(0.5) };
    return { k, t: 'trim', off, len };
  }

  apply(op: BurstOp): void {
    if (op.t === 'w') this.model.write(op.off, opData(op));
    else this.model.zero(op.off, op.len);
    this.tracker.touch(op.off, op.len);
  }

  /** Ops one at a time, all acknowledged. */
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
      this.apply(op);
    }
  }

  /** The whole volume, 16 MiB per request: every chunk changes. */
  async rewrite(how: 'data' | 'zero'): Promise<void> {
    for (let off = 0; off < SIZE; off += 16 * MiB) {
      const k = ++this.opSeq;
      const op: BurstOp = how === 'data' ? { k, t: 'w', off, len: 16 * MiB, tag: `${this.seed}-full${k}` } : { k, t: 'z', off, len: 16 * MiB, nohole: true };
      const req = how === 'data' ? { op: 'write', h: 'L0', off, len: op.len, tag: op.tag } : { op: 'zero', h: 'L0', off, len: op.len, nohole: true };
      this.check((await this.py.request(req)).ok, `rewrite (${how}) at ${off} failed`);
      this.apply(op);
    }
  }

  /**
   * A burst on the three live connections (depth 4 each); `during` sees the
   * acknowledgement count after every event. Acknowledged ops are applied in
   * acknowledgement order; the submitted, unacknowledged ones are returned.
   */
  async burst(ops: BurstOp[], during: (acks: number) => void): Promise<{ unacked: BurstOp[]; acked: number }> {
    const sub = new Set<number>();
    const order: number[] = [];
    const errs: BurstEvent[] = [];
    this.py.onEvent = (ev) => {
      if (ev.ev === 'sub') sub.add(ev.k);
      else if (ev.ev === 'ack') order.push(ev.k);
      else errs.push(ev);
      during(order.length);
    };
    const br = await this.py.request({ op: 'burst', hs: this.liveHandles, depth: 4, ops });
    this.py.onEvent = undefined;
    this.check(br.ok, `burst failed: ${br.error}`);
    const byK = new Map(ops.map((o) => [o.k, o]));
    const acked = new Set(order);
    for (const k of order) this.apply(byK.get(k)!);
    return { unacked: ops.filter((o) => sub.has(o.k) && !acked.has(o.k)), acked: order.length };
  }

  async createSnapshot(): Promise<string> {
    const name = `k${++this.nameSeq}`;
    const c = await cli(['snapshot', 'create', this.image, name]);
    this.check(c.code === 0, `snapshot create ${name}: ${brief(c)}`);
    this.model.snapshot(name, `round ${this.round}`);
    this.tracker.add(name);
    const h = `S${++this.handleSeq}`;
    this.check((await this.py.open(h, this.srv!.uri(`disk@${name}`))).ok, `cannot open disk@${name}`);
    this.snapHandles.set(name, h);
    return name;
  }

  async deleteSnapshot(name: string): Promise<void> {
    const c = await cli(['snapshot', 'delete', this.image, name]);
    this.check(c.code === 0, `snapshot delete ${name}: ${brief(c)}`);
    this.model.remove(name);
    this.tracker.remove(name);
    if (this.basis === name) this.basis = undefined;
    await this.py.close(this.snapHandles.get(name)!);
    this.snapHandles.delete(name);
  }

  /** A snapshot to roll back to: mostly one whose merge takes more than one step. */
  pickTarget(exclude?: string, bigOnly = false): string {
    const names = this.model.names().filter((n) => n !== exclude);
    const big = names.filter((n) => ChangeTracker.bounds(this.tracker.pending(n)).min > STEP_CHUNKS);
    if (big.length && (bigOnly || this.rng.chance(0.9))) {
      // Older ones first: a rollback while newer snapshots exist.
      return this.rng.chance(0.5) ? big[0]! : this.rng.pick(big);
    }
    return this.rng.pick(names.length ? names : this.model.names());
  }

  // ---- rollback ------------------------------------------------------------------------------

  /** Rollback through the control socket or the CLI; settles the model at once. */
  async rollback(name: string, via: 'control' | 'cli'): Promise<Rb> {
    let res: RollbackReply;
    if (via === 'control') {
      const r = await controlRequest(this.image, { op: 'rollback', name, by: `rollback-kill round ${this.round}` });
      this.check(r.ok, `rollback ${name}: ${r.code} ${r.message}`);
      res = r.result as RollbackReply;
    } else {
      const r = await cli(['rollback', this.image, name, '--json']);
      this.check(r.code === 0, `rollback ${name}: ${brief(r)}`);
      res = JSON.parse(r.stdout) as RollbackReply;
    }
    const id = this.ids.get(name)!;
    this.check(res.snapshot === name && res.snapshotId === id && res.type === 'rollback-merge' && res.trigger === 'command', `rollback ${name} (id ${id}) replied ${JSON.stringify(res)}`);
    this.checkProgress(res, `rollback ${name} reply`);
    // Did it replace the previous rollback of this round? The history says (read at once: the merge runs).
    const prev = this.rbs.at(-1);
    // (its merge may even have finished already: the last rollback entry)
    const entry = this.historyFile()
      .reverse()
      .find((e) => e.event === 'rollback');
    this.check(
      entry && entry.event === 'rollback' && entry.snapshot === name && entry.at === res.startedAt && entry.chunks === res.total,
      `the history's last entry after rollback ${name} replied ${JSON.stringify(res)}: ${JSON.stringify(entry)}`,
    );
    if (prev) {
      const replaced = entry!.replaced !== undefined;
      if (replaced) this.check(entry!.replaced === prev.target, `rollback ${name} says it replaced "${entry!.replaced}", expected ${prev.target}`);
      this.tracker.merged(prev.levels, replaced ? 1 : 2);
      if (!replaced) this.tracker.endRollback();
      this.count(replaced ? 'replaced' : 'not-replaced');
    } else this.check(entry!.replaced === undefined, `rollback ${name} says it replaced "${entry!.replaced}", but no merge ran`);
    const levels = this.tracker.pendingFor(name);
    this.tracker.beginRollback(name);
    const { min, max } = ChangeTracker.bounds(levels);
    this.check(res.total >= min && res.total <= max, `rollback ${name} has ${res.total} chunks to merge; the model says ${min === max ? `exactly ${min}` : `between ${min} and ${max}`}`);
    const rb: Rb = { target: name, id, total: res.total, startedAt: res.startedAt, by: res.by, levels };
    this.rbs.push(rb);
    this.model.restore(this.model.find(name)!);
    this.basis = name;
    return rb;
  }
}

/**
 * Polls `jobs` through the control socket until the merge reached `threshold`
 * percent (or ended), then kills the server at once. Returns the job seen
 * last (null: none ran any more).
 */
async function quietKill(rig: KillRig, threshold: number): Promise<JobEntry | null> {
  const srv = rig.srv!;
  // A liveness bound only (a stalled merge must not hang the test): at
  // MERGE_RATE the threshold is reached within about a second.
  const deadline = Date.now() + 120_000;
  for (;;) {
    const x = await controlRequest(rig.image, { op: 'jobs' });
    const j = x.ok ? ((x.result as JobEntry[])[0] ?? null) : null;
    if (!j || j.percent >= threshold || Date.now() > deadline) {
      srv.proc.kill('SIGKILL');
      return j;
    }
    await sleep(rig.rng.int(0, 3));
  }
}

/** Runs a burst of ops and kills the server after `killAfter` acknowledgements, at the reply of a `jobs` request. */
async function burstKill(rig: KillRig, killAfter: number): Promise<{ job: JobEntry | null; unacked: BurstOp[]; acked: number }> {
  const srv = rig.srv!;
  const ops = Array.from({ length: 400 }, () => rig.randomOp());
  let killing: Promise<JobEntry | null> | undefined;
  const res = await rig.burst(ops, (acks) => {
    if (killing || acks < killAfter) return;
    killing = controlRequest(rig.image, { op: 'jobs' }).then(
      (x) => {
        srv.proc.kill('SIGKILL');
        return x.ok ? ((x.result as JobEntry[])[0] ?? null) : null;
      },
      () => {
        srv.proc.kill('SIGKILL');
        return null;
      },
    );
  });
  const job = killing ? await killing : await quietKill(rig, 0);
  return { job, ...res };
}

/**
 * Kills the server while a rollback request runs: when its job file appears
 * (before the manifest records it), when the manifest temp file appears, when
 * the manifest was renamed into place (recorded, the reply not sent yet), or
 * on a short timer.
 */
async function requestKill(rig: KillRig, name: string, forced?: 'manifestRenamed'): Promise<{ how: string; returned: boolean }> {
  const srv = rig.srv!;
  const r = rig.rng;
  const trigger = forced ?? r.weighted({ jobFile: 1, manifestTmp: 1, manifestRenamed: 2, timer: 1 });
  let fired = '';
  let tmpSeen = false;
  const fire = (why: string) => {
    if (fired) return;
    fired = why;
    srv.proc.kill('SIGKILL');
  };
  const watcher =
    trigger === 'timer'
      ? undefined
      : fs.watch(rig.meta, (_ev, file) => {
          const f = String(file ?? '');
          if (trigger === 'jobFile' && /^rollback-\d+\.merge$/.test(f)) fire('job file appeared');
          if (f.startsWith('manifest.json.tmp')) {
            tmpSeen = true;
            if (trigger === 'manifestTmp') fire('manifest temp file appeared');
          }
          if (trigger === 'manifestRenamed' && tmpSeen && f === 'manifest.json') fire('manifest renamed into place');
        });
  const delay = r.int(0, 4);
  const timer = setTimeout(() => fire(trigger === 'timer' ? `${delay} ms timer` : 'fallback timer'), trigger === 'timer' ? delay : 3000);
  const res = await controlRequest(rig.image, { op: 'rollback', name, by: `rollback-kill round ${rig.round}` }).catch((e: Error) => ({ ok: false, code: 'DIED', message: e.message }));
  clearTimeout(timer);
  watcher?.close();
  if (res.ok) fire('after the reply');
  return { how: `${trigger} trigger: killed ${fired}${res.ok ? ' (the request had returned)' : ''}`, returned: res.ok };
}

/** Kills the server when the merge, finishing, replaces the manifest (without the job): the next manifest rename after the rollback replied. */
async function finishingKill(rig: KillRig): Promise<string> {
  const srv = rig.srv!;
  return new Promise((resolve) => {
    let done = false;
    const fire = (why: string) => {
      if (done) return;
      done = true;
      srv.proc.kill('SIGKILL');
      watcher.close();
      clearTimeout(timer);
      resolve(why);
    };
    const watcher = fs.watch(rig.meta, (_ev, file) => {
      if (String(file ?? '') === 'manifest.json') fire('the finishing merge renamed the manifest into place');
    });
    // A liveness bound only: at MERGE_RATE a full merge ends within about 2 s.
    const timer = setTimeout(() => fire('120 s fallback timer'), 120_000);
  });
}

t.test('SIGKILL during the background merge of a rollback: restart, resume, exact', async (t) => {
  if (!requireTools(t, ['python3-libnbd'])) return;
  const rig = new KillRig(SEED);
  t.teardown(() => rig.cleanup());
  t.comment(`seed ${SEED}, volume ${SIZE} bytes, chunk ${CHUNK}: a full merge is ${Math.ceil(SIZE / CHUNK / STEP_CHUNKS)} native steps`);
  const started = Date.now();
  let midKills = 0;
  let lateKills = 0;
  try {
    await rig.start();
    // a = the initial data, b = zeros, c = new data; live differs everywhere from a and b.
    rig.phase = 'setup';
    await rig.createSnapshot();
    await rig.rewrite('zero');
    await rig.createSnapshot();
    await rig.rewrite('data');
    await rig.createSnapshot();
    await rig.sequential(10);
    await rig.verifyList();
    await rig.verifyAll('after setup');

    for (rig.round = 1; rig.round <= MAX_ROUNDS && (rig.round <= MIN_ROUNDS || midKills < MIN_MID_KILLS + 1); rig.round++) {
      const r = rig.rng;
      rig.rbs = [];
      rig.pending = { writes: [], what: 'nothing' };
      rig.phase = 'activity';
      await rig.sequential(r.int(0, 5));
      if (rig.model.snaps.length < MAX_SNAPSHOTS && r.chance(0.2)) {
        await rig.createSnapshot();
        await rig.verifyList();
      } else if (rig.model.snaps.length > 2 && r.chance(0.15)) {
        await rig.deleteSnapshot(r.pick(rig.model.names()));
        await rig.verifyList();
      }
      const histStart = rig.historyFile().length;
      // Rounds 2 and 3 always kill at the two points where the history can lose an entry.
      const mode = rig.round === 2 ? 'request' : rig.round === 3 ? 'finishing' : r.weighted({ burst: 5, quiet: 3, replace: 2, cli: 1, request: 1, finishing: 0.3 });
      rig.count(mode);
      rig.phase = `rollback and kill (${mode})`;
      let job: JobEntry | null | undefined;
      let what: string;
      let returned = false;
      const target = rig.pickTarget(undefined, mode === 'finishing' || mode === 'request');
      if (mode === 'request') {
        const k = await requestKill(rig, target, rig.round === 2 ? 'manifestRenamed' : undefined);
        returned = k.returned;
        what = `rollback ${target} request in flight: ${k.how}`;
        rig.pending = { writes: [], what };
      } else {
        await rig.rollback(target, mode === 'cli' ? 'cli' : 'control');
        what = `rollback ${target} (${rig.rbs[0]!.total} chunks, ${mode === 'cli' ? 'CLI' : 'control socket'})`;
        if (mode === 'replace') {
          const second = rig.pickTarget(target);
          await rig.rollback(second, 'control');
          const replaced = rig.historyFile().some((e) => e.event === 'rollback' && e.at === rig.rbs[1]!.startedAt && e.replaced !== undefined);
          what += `, then rollback ${second} (${rig.rbs[1]!.total} chunks, ${replaced ? 'replacing the merge' : 'after the merge ended'})`;
        }
        if (mode === 'finishing') {
          what += `; killed when ${await finishingKill(rig)}`;
          job = null;
        } else if (mode === 'burst' || (mode === 'replace' && r.chance(0.5))) {
          const killAfter = r.int(0, 8);
          const b = await burstKill(rig, killAfter);
          job = b.job;
          rig.pending = { writes: b.unacked, what: '' };
          what += `; burst: killed after ${killAfter} acks (${b.acked} acknowledged, ${b.unacked.length} in flight)`;
        } else {
          const threshold = r.pick([0, 0, 25, 50]);
          job = await quietKill(rig, threshold);
          what += `; quiet: killed at ${threshold}%+`;
        }
        what += job ? ` at ${job.percent}% (${job.done}/${job.total})` : ' after the merge had ended';
      }
      await rig.kill();
      rig.pending.what = what;
      // Mid-merge: `jobs` said percent < 100 just before the kill, and the manifest still records the rollback.
      const m = rig.diskManifest();
      const last = rig.rbs.at(-1);
      const recorded = m.rollback !== undefined;
      const mid = Boolean(job && job.percent < 100 && last && m.rollback?.snapshotId === last.id);
      if (mid) midKills++;
      else if (mode !== 'request') lateKills++;
      // A rollback request in flight took effect if the manifest records it (or it replied: then its merge may even have finished).
      const happened = recorded || returned;
      if (mode === 'request') {
        rig.check(!recorded || m.rollback!.snapshotId === rig.ids.get(target), `after a kill during rollback ${target}, the manifest records a rollback to snapshot id ${m.rollback?.snapshotId}`);
        rig.count(returned ? 'request-returned' : recorded ? 'request-recorded' : 'request-not-recorded');
      } else {
        // Every rollback replied before the kill, so it is recorded until its merge finished.
        rig.check(!recorded || m.rollback!.snapshotId === last!.id, `the manifest records a rollback to snapshot id ${m.rollback?.snapshotId}, but the last one went to ${last!.target} (id ${last!.id})`);
      }
      rig.history.push(`${rig.round}: ${what}${mid ? ' [mid-merge]' : ''}${mode === 'request' ? (recorded ? ' [recorded]' : happened ? ' [merged before the kill]' : ' [not recorded]') : ''}`);

      // Sometimes the merge is finished offline first: `jobs IMAGE --wait`
      // with no server runs it in the CLI process.
      const killedAt = Date.now();
      const offline = recorded && r.chance(0.15);
      if (offline) {
        rig.phase = 'offline jobs --wait';
        const j = await jobsJson(rig.image, true);
        rig.check(j.length === 0, `offline jobs --wait --json returned ${JSON.stringify(j)}, expected []`);
        rig.count('finished-offline');
        rig.history[rig.history.length - 1] += ' [finished offline by jobs --wait]';
      }
      // Restart: the merge resumes at once.
      const restartAt = Date.now();
      await rig.start();
      rig.phase = 'check after restart';
      const firstJobs = await jobsJson(rig.image);
      if (offline) rig.check(firstJobs.length === 0, `after offline jobs --wait, the restarted server still shows a merge: ${JSON.stringify(firstJobs)}`);
      if (mode === 'request') {
        // As before, or exactly the snapshot (and then a merge to it), as the manifest says.
        const snap = rig.model.find(target)!;
        if (happened) {
          rig.model.setLive(snap.data);
          rig.basis = target;
          // Its pending set: the chunks changed since the snapshot (no reply: the total comes from the history later).
          rig.rbs.push({ target, id: rig.ids.get(target)!, total: -1, startedAt: '', by: '', levels: rig.tracker.pending(target) });
        }
      }
      await rig.verifyList();
      await rig.resolveLive();
      await rig.verifyAll('right after the restart (the merge may still run)');
      if (firstJobs.length) {
        const j = firstJobs[0]!;
        const rb = rig.rbs.at(-1);
        rig.check(rb && j.snapshot === rb.target && j.snapshotId === rb.id && j.type === 'rollback-merge', `jobs after the restart: ${JSON.stringify(firstJobs)}; expected the merge to ${rb?.target}`);
        if (rb!.startedAt) rig.check(j.total === rb!.total && j.startedAt === rb!.startedAt && j.by === rb!.by, `the resumed merge reports ${JSON.stringify(j)}; the rollback replied total ${rb!.total}, started ${rb!.startedAt}, by ${rb!.by}`);
        rig.checkProgress(j, 'jobs after the restart');
        rig.count('jobs-showed-resumed-merge');
      }
      // The merge finishes: `jobs --json` comes back [].
      rig.phase = 'waiting for the merge to finish';
      const until = Date.now() + 300_000;
      for (;;) {
        const j = await jobsJson(rig.image);
        if (j.length === 0) break;
        rig.check(Date.now() < until, `the merge did not finish within 300 s after the restart: ${JSON.stringify(j)}`);
        await sleep(100);
      }
      rig.phase = 'history after the merge';
      const added = await historyJsonAfter(rig, histStart);
      if (mode === 'request' && happened) rig.rbs[0]!.total = added.find((e) => e.event === 'merge-finished')?.chunks ?? -1;
      checkRoundHistory(rig, added, mode === 'request' && happened ? { target, returned } : undefined, recorded, recorded ? (offline ? killedAt : restartAt) : 0);
      const rb = rig.rbs.at(-1);
      if (rb) {
        const { min, max } = ChangeTracker.bounds(rb.levels);
        rig.check(rb.total >= min && rb.total <= max, `the merge to ${rb.target} had ${rb.total} chunks; the model says ${min === max ? `exactly ${min}` : `between ${min} and ${max}`}`);
        rig.tracker.merged(rb.levels, 2);
      }
      // Ops in flight at the kill may have changed their chunks (or not).
      for (const op of rig.pending.writes) rig.tracker.touch(op.off, op.len, 1);
      // (Without a merge after the restart, the check right after it saw the final state already.)
      if (recorded && !offline) await rig.verifyAll('after the resumed merge finished');
      t.comment(rig.history.at(-1)!);
    }
    rig.phase = 'final SIGTERM';
    const code = await rig.srv!.stop('SIGTERM');
    rig.srv = undefined;
    rig.check(code === 0, `server exited with ${code} on SIGTERM`);
    rig.check(fs.readFileSync(rig.image).equals(rig.model.live), 'the raw image differs from the model at the end');
    const rounds = rig.round - 1;
    t.comment(`${rounds} kill rounds: ${midKills} killed mid-merge (jobs said < 100% and the manifest still recorded the rollback), ${lateKills} after the merge had ended`);
    t.same(rig.historyProblems, [], 'history --json lists every rollback that took effect and every merge that finished, whatever the kill hit');
    t.ok(midKills >= MIN_MID_KILLS, `at least ${MIN_MID_KILLS} kills landed mid-merge (${midKills} of ${rounds} rounds)`);
    t.pass(
      `${rounds} rounds (${Object.entries(rig.stats)
        .map(([k, v]) => `${k} ${v}`)
        .join(', ')}): every snapshot, the rolled-back content and every acknowledged write exact after each restart; every merge resumed and finished ` +
        `(${((Date.now() - started) / 1000).toFixed(1)} s)`,
    );
  } catch (err) {
    t.fail(err instanceof Failure ? err.message : `[seed ${SEED}] round ${rig.round} (${rig.phase}): ${(err as Error).stack}`);
  }
});

/** `history --json` entries added since the first `from`. */
async function historyJsonAfter(rig: KillRig, from: number): Promise<HistoryJson[]> {
  const all = await historyJson(rig.image);
  rig.check(all.length >= from, `history --json has ${all.length} entries, fewer than the ${from} before this round`);
  return all.slice(from);
}

/**
 * The history entries of one round: each rollback that replied (the second
 * naming the first as replaced, unless the first's merge-finished came
 * between), then exactly one merge-finished for the last one, with its chunk
 * count, stamped after the restart when the kill landed before it. A rollback
 * request killed after the manifest recorded it may lack its own entry (it is
 * written after the manifest), but its merge-finished must be there.
 */
function checkRoundHistory(
  rig: KillRig,
  added: HistoryJson[],
  request: { target: string; returned: boolean } | undefined,
  recordedAtKill: boolean,
  finishedAfter: number,
): void {
  const show = JSON.stringify(added);
  const rbs = rig.rbs;
  let i = 0;
  if (request) {
    // It took effect (the manifest recorded it, live shows the snapshot, its merge ran): the history must say so.
    if (added[0]?.event === 'rollback') {
      rig.check(added[0].snapshot === request.target && added[0].chunks === rbs[0]!.total && added[0].trigger === 'command', `history for the rollback request to ${request.target}: ${show}`);
      i++;
    } else {
      rig.historyProblems.push(
        `round ${rig.round}: the rollback request to ${request.target} was killed (${rig.pending.what}) after the manifest recorded it - it took effect: live shows ` +
          `the snapshot and its merge resumed and finished - but the history has no "rollback" entry for it: ${show}`,
      );
    }
  } else {
    for (let r = 0; r < rbs.length; r++) {
      const rb = rbs[r]!;
      const e = added[i++];
      rig.check(
        e && e.event === 'rollback' && e.snapshot === rb.target && e.snapshotId === rb.id && e.chunks === rb.total && e.at === rb.startedAt && e.by === rb.by && e.trigger === 'command',
        `history entry for rollback #${r + 1} of the round (to ${rb.target}, ${rb.total} chunks): ${show}`,
      );
      if (r + 1 < rbs.length && added[i]?.event === 'merge-finished') {
        rig.check(added[i]!.snapshot === rb.target && added[i]!.chunks === rb.total, `merge-finished of ${rb.target} before the next rollback: ${show}`);
        i++;
        rig.check(added[i]?.replaced === undefined, `a rollback names a replaced merge that had finished: ${show}`);
      } else if (r + 1 < rbs.length) rig.check(added[i]?.replaced === rb.target, `the second rollback does not name ${rb.target} as replaced: ${show}`);
    }
  }
  const rb = rbs.at(-1);
  if (!rb) {
    rig.check(added.length === 0, `a rollback request killed before the manifest recorded it left history entries: ${show}`);
    return;
  }
  const f = added[i];
  if (f?.event !== 'merge-finished') {
    rig.historyProblems.push(
      `round ${rig.round}: history has no merge-finished entry for the merge to ${rb.target} (${rb.total} chunks), which finished ` +
        (recordedAtKill
          ? 'after the restart (the manifest still recorded it at the kill)'
          : `before the kill (${rig.pending.what}): the manifest no longer recorded the job, so the kill landed after the manifest dropped it and before the merge-finished entry was appended`) +
        `; entries this round: ${show}`,
    );
    rig.check(i === added.length, `history has entries the round did not cause: ${show}`);
    return;
  }
  i++;
  rig.check(
    f.snapshot === rb.target && f.snapshotId === rb.id && f.chunks === rb.total && Number.isFinite(f.ms),
    `the merge-finished entry does not match the merge to ${rb.target} (id ${rb.id}, ${rb.total} chunks): ${show}`,
  );
  rig.check(i === added.length, `history has entries the round did not cause: ${show}`);
  if (finishedAfter) {
    rig.check(
      Date.parse(f!.at) >= finishedAfter,
      `the merge to ${rb.target} was killed mid-way, yet its merge-finished entry (${f!.at}) predates the restart (or the offline jobs --wait) at ${new Date(finishedAfter).toISOString()}`,
    );
  }
}
