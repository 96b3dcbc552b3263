// Model-based test of ROLLBACK with snapshots against the real CLI server.
//
// A seeded PRNG drives random writes, WRITE_ZEROES (sometimes FAST_ZERO),
// TRIM and FLUSH over three libnbd connections (one long-running
// python3-libnbd process, test/fixtures/snapshot_client.py), snapshot create
// and delete, and rollbacks to any snapshot (often an OLD one while newer
// ones exist): by `node-nbd-server rollback IMAGE S --json [--wait]`, or
// through the control socket followed at once by a burst of writes that runs
// while the background merge copies chunks, or twice in a row (the second
// replaces the running merge). The model:
//   - live bytes plus a frozen copy per snapshot; `rollback S` sets live to
//     S's content; later writes apply to live as usual (writes during the
//     merge win); snapshots never change;
//   - which chunks each snapshot has seen change (ChangeTracker): a rollback
//     to S must merge exactly the chunks changed since S was created, so the
//     `total` it reports (reply, `jobs`, `history`) is checked against it;
//   - the merge state: snapshot create/delete must be refused with exit 7
//     [ROLLBACK_RUNNING] while a merge runs, and accepted otherwise; a create
//     or delete either waits first (`jobs IMAGE --wait`) or is tried at once
//     and the refusal leaves the model unchanged;
//   - the history: every rollback in order, `replaced` exactly when the
//     previous merge had not finished (no merge-finished entry before it),
//     each merge-finished with its rollback's chunk count.
// After every step the live export and every snapshot export (disk@NAME) are
// read in full through the clients and compared with the model; `snapshot
// list --json` (names, ids, basisOf, merge, autoRollback, volume) after every
// snapshot or rollback step. At the end: `jobs --wait`, SIGTERM, the raw image,
// an offline rollback (the CLI merges itself), a restart, and the refusals
// for an unknown snapshot (exit 8) and a failed one (exit 12).
//
// A second test makes merges long (a 96 MiB volume changed everywhere, 16K
// chunks, served with --merge-rate so that a merge takes about three seconds
// on any machine) so that create/delete requests, writes, reads and a
// replacing rollback land while the merge runs; what ran during a merge is
// counted from observed state (a refusal, `jobs` or the list showing the
// merge, an acknowledgement before the merge-finished time), never assumed.
//
// TRIM is modelled as zeroing (a punched hole reads back as zeroes).
// The seed is printed; NBD_TEST_SEED=<seed> replays a run.
import t, { type Test } from 'tap';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { readManifest, writeManifest } from '../src/volume-meta';
import { makeTempDir, startServer, type RunningServer } from './fixtures/server';
import { requireTools } from './fixtures/tools';
import {
  ChangeTracker,
  KiB,
  MiB,
  PyClient,
  Rng,
  VolumeModel,
  baseSeed,
  brief,
  cli,
  compareBuffers,
  compareExport,
  controlRequest,
  dataFor,
  plainCliProcesses,
  historyJson,
  jobsJson,
  removeDir,
  snapshotList,
  sparseImage,
  type BurstEvent,
  type BurstOp,
  type Candidate,
  type HistoryJson,
  type JobEntry,
  type SnapshotListEntry,
  randomRange,
} from './fixtures/snapshot-model';

plainCliProcesses();
const SEED = baseSeed();
t.comment(`rollback-model seed ${SEED} (replay: NBD_TEST_SEED=${SEED} node tools/run-tests.js test/rollback-model.ts)`);

const ENOTSUP = 95;
const MAX_SNAPSHOTS = 5;

interface RunConfig {
  label: string;
  size: number;
  steps: number;
  chunk: string;
  chunkSize: number;
  seed: number;
  /** Initial content of the image (default: zeros, sparse). */
  initial?: Buffer;
  /** Extra `serve` options. */
  serveArgs?: string[];
}

class Failure extends Error {}

type RollbackReply = JobEntry & { visibleMs: number };

/** One rollback made by the test. */
interface Rb {
  seq: number;
  target: string;
  id: number;
  /** From the reply. */
  total: number;
  startedAt: string;
  by: string;
  how: string;
  /** The pending set the model expects (per chunk 2 certain, 1 maybe), once settled. */
  levels?: Uint8Array;
}

/** What the history says about each rollback (aligned with RollbackRun.rollbacks). */
interface HistoryWalk {
  replaced: boolean;
  finished: boolean;
}

class RollbackRun {
  readonly rng: Rng;
  readonly dir: string;
  readonly image: string;
  srv?: RunningServer;
  readonly py = new PyClient();
  readonly model: VolumeModel;
  readonly tracker: ChangeTracker;
  step = 0;
  op = 'start';
  readonly history: string[] = [];
  readonly liveHandles = ['L0', 'L1', 'L2'];
  readonly snapHandles = new Map<string, string>();
  /** Snapshot name -> id, learnt from `snapshot list --json` after its create. */
  readonly ids = new Map<string, number>();
  private handleSeq = 0;
  private nameSeq = 0;
  private opSeq = 0;
  /** Every rollback, in order: the history must list exactly these. */
  readonly rollbacks: Rb[] = [];
  /** The last rollback, until its merge is known to have ended. */
  job?: Rb;
  /** The snapshot the volume was last rolled back to, while it exists (basisOf). */
  basis?: string;
  fastZero = false;
  comparisons = 0;
  counts: Record<string, number> = {};
  /** Create/delete refused with ROLLBACK_RUNNING. */
  refusals = 0;
  /** Rollbacks whose history entry says they replaced a running merge. */
  replaced = 0;
  /** Bursts during which `jobs` (asked at the first acknowledgement) still showed the merge. */
  burstsDuringMerge = 0;
  /** Writes acknowledged in those bursts. */
  writesDuringMerge = 0;
  /** Full verifications made while `jobs` showed the merge still running just before. */
  readsDuringMerge = 0;

  constructor(readonly t: Test, readonly cfg: RunConfig) {
    this.rng = new Rng(cfg.seed);
    this.dir = makeTempDir('nbd-rbmodel-');
    this.image = sparseImage(this.dir, 'disk.img', cfg.size);
    if (cfg.initial) fs.writeFileSync(this.image, cfg.initial);
    this.model = new VolumeModel(cfg.size, cfg.initial);
    this.tracker = new ChangeTracker(cfg.size, cfg.chunkSize);
  }

  fail(msg: string): never {
    throw new Failure(
      `[${this.cfg.label}, seed ${this.cfg.seed}] step ${this.step} (${this.op}): ${msg}\n` +
        `recent steps:\n  ${this.history.slice(-14).join('\n  ')}\n` +
        `model snapshots (oldest first): ${this.model.names().join(', ') || '(none)'}; ` +
        `last rollbacks: ${this.rollbacks
          .slice(-4)
          .map((r) => `#${r.seq} to ${r.target} (${r.total} chunks, ${r.how})`)
          .join(', ') || '(none)'}; merge ${this.job ? `to ${this.job.target} possibly running` : 'known to be finished'}`,
    );
  }

  check(cond: unknown, msg: string): void {
    if (!cond) this.fail(msg);
  }

  count(k: string): void {
    this.counts[k] = (this.counts[k] ?? 0) + 1;
  }

  // ---- server and connections ------------------------------------------------------------

  async start(): Promise<void> {
    this.tracker.restart(); // a new server process: no dirty set yet
    this.srv = await startServer({ dir: this.dir, images: ['disk.img'], args: ['--chunk-size', this.cfg.chunk, ...(this.cfg.serveArgs ?? [])] });
    for (const h of this.liveHandles) {
      const r = await this.py.open(h, this.srv.uri('disk'));
      this.check(r.ok, `cannot connect ${h} to export disk: ${r.error}`);
      this.check(r.size === this.cfg.size, `export disk has size ${r.size}, expected ${this.cfg.size}`);
      this.fastZero = Boolean(r.fast_zero);
    }
    for (const s of this.model.snaps) await this.openSnapshot(s.name);
  }

  async openSnapshot(name: string): Promise<void> {
    const h = `S${++this.handleSeq}`;
    const r = await this.py.open(h, this.srv!.uri(`disk@${name}`));
    this.check(r.ok, `cannot connect to snapshot export disk@${name}: ${r.error} (errno ${r.errno})`);
    this.check(r.size === this.cfg.size, `snapshot export disk@${name} has size ${r.size}, expected ${this.cfg.size}`);
    this.check(r.ro === true, `snapshot export disk@${name} is not read-only`);
    this.snapHandles.set(name, h);
  }

  async stop(when: string): Promise<void> {
    this.op = `SIGTERM (${when})`;
    const code = await this.srv!.stop('SIGTERM');
    this.check(code === 0, `server exited with ${code} on SIGTERM; stderr: ${this.srv!.stderr().slice(-2000)}`);
    this.srv = undefined;
    this.tracker.restart(); // offline commands run in processes of their own
    for (const h of this.liveHandles) await this.py.close(h);
    for (const h of this.snapHandles.values()) await this.py.close(h);
    this.snapHandles.clear();
  }

  async cleanup(): Promise<void> {
    if (this.srv) await this.srv.stop('SIGKILL');
    await this.py.quit();
    removeDir(this.dir);
  }

  // ---- verification ------------------------------------------------------------------------

  candidates(): Candidate[] {
    return this.model.candidates();
  }

  /** Reads the live export and every snapshot export in full and compares them with the model. */
  async verifyAll(): Promise<void> {
    const h = this.rng.pick(this.liveHandles);
    const live = await compareExport(this.py, h, this.model.live, this.model.crcs(), this.candidates());
    this.comparisons++;
    if (live) {
      const j = this.job ? `; the last rollback went to ${this.job.target} and its merge may still run` : '';
      this.fail(`live export disk (read through ${h}) differs from the model${j}: ${live}`);
    }
    for (const s of this.model.snaps) {
      const d = await compareExport(this.py, this.snapHandles.get(s.name)!, s.data, s.crcs, this.candidates());
      this.comparisons++;
      if (d) this.fail(`snapshot export disk@${s.name} (created at ${s.createdAt}) differs from the model: ${d}`);
    }
  }

  /** done/total/percent of a job or a merge entry. */
  checkProgress(j: { done: number; total: number; percent: number }, what: string): void {
    this.check(
      Number.isInteger(j.done) && Number.isInteger(j.total) && j.done >= 0 && j.done <= j.total && j.total <= this.tracker.chunks,
      `${what}: done ${j.done} / total ${j.total} (volume has ${this.tracker.chunks} chunks)`,
    );
    const want = j.total ? Math.floor((1000 * j.done) / j.total) / 10 : 100;
    this.check(j.percent === want, `${what}: percent ${j.percent}, expected ${want} for ${j.done}/${j.total}`);
  }

  /** `snapshot list --json` (or the same request on the control socket, fast enough to land during a merge) against the model. */
  async verifyList(via: 'cli' | 'control' = 'cli'): Promise<SnapshotListEntry[]> {
    let list: SnapshotListEntry[];
    if (via === 'cli') list = await snapshotList(this.image);
    else {
      const r = await controlRequest(this.image, { op: 'snapshot-list' });
      this.check(r.ok, `snapshot-list through the control socket: ${r.code} ${r.message}`);
      list = r.result as SnapshotListEntry[];
    }
    const names = list.map((s) => s.name);
    this.check(
      JSON.stringify(names) === JSON.stringify(this.model.names()),
      `snapshot list --json names ${JSON.stringify(names)}, model ${JSON.stringify(this.model.names())}`,
    );
    for (let i = 1; i < list.length; i++) this.check(list[i]!.id > list[i - 1]!.id, `snapshot ids not increasing in list order: ${list.map((s) => s.id).join(',')}`);
    for (const s of list) {
      const known = this.ids.get(s.name);
      if (known === undefined) this.ids.set(s.name, s.id);
      else this.check(known === s.id, `snapshot ${s.name} lists id ${s.id}, earlier ${known}`);
      this.check(s.state === 'active', `snapshot ${s.name} is ${s.state}: ${JSON.stringify(s.failure)}`);
      this.check(s.export === `disk@${s.name}`, `snapshot ${s.name} lists export ${s.export}`);
      this.check(s.chunkSize === this.cfg.chunkSize, `snapshot ${s.name} lists chunkSize ${s.chunkSize}, expected ${this.cfg.chunkSize}`);
      this.check(s.autoRollback === 'off', `snapshot ${s.name} lists autoRollback ${s.autoRollback}, expected off`);
      this.check(typeof s.volume === 'string' && path.resolve(s.volume) === this.image, `snapshot ${s.name} lists volume ${s.volume}, expected ${this.image}`);
      const basis = Array.isArray(s.basisOf) && s.basisOf.length === 1 && path.resolve(s.basisOf[0]!) === this.image;
      if (s.name === this.basis) this.check(basis, `snapshot ${s.name} is the last rollback target but lists basisOf ${JSON.stringify(s.basisOf)}`);
      else this.check(Array.isArray(s.basisOf) && s.basisOf.length === 0, `snapshot ${s.name} lists basisOf ${JSON.stringify(s.basisOf)}; the last rollback went to ${this.basis ?? '(none, or deleted)'}`);
      if (s.merge) {
        this.check(
          this.job && this.job.target === s.name,
          `snapshot ${s.name} lists a merge ${JSON.stringify(s.merge)}, but ${this.job ? `the running merge is to ${this.job.target}` : 'no merge can be running'}`,
        );
        this.check(s.merge.total === this.job!.total, `snapshot ${s.name} lists merge total ${s.merge.total}; the rollback reported ${this.job!.total}`);
        this.checkProgress(s.merge, `snapshot ${s.name} merge`);
      }
    }
    return list;
  }

  /** Compares a `jobs` answer with the model; an empty one ends the model's merge. */
  checkJobs(jobs: JobEntry[], what: string): boolean {
    this.check(Array.isArray(jobs) && jobs.length <= 1, `${what}: ${JSON.stringify(jobs)}`);
    if (jobs.length === 0) {
      this.mergeEnded();
      return false;
    }
    const j = jobs[0]!;
    const job = this.job;
    this.check(job, `${what} shows a merge to ${j.snapshot}, but the model's last merge is known to have finished`);
    this.check(
      j.type === 'rollback-merge' && j.snapshot === job!.target && j.snapshotId === job!.id && j.total === job!.total && j.startedAt === job!.startedAt,
      `${what}: ${JSON.stringify(j)}; expected the merge to ${job!.target} (id ${job!.id}, ${job!.total} chunks, started ${job!.startedAt})`,
    );
    this.check(j.trigger === 'command' && j.by === job!.by && path.resolve(j.volume) === this.image, `${what}: trigger/by/volume ${JSON.stringify(j)}`);
    this.check(j.error === undefined, `${what}: the merge reports an error: ${j.error}`);
    this.checkProgress(j, what);
    return true;
  }

  /** The last merge is known to have ended (not replaced): every chunk it had pending was copied. */
  mergeEnded(): void {
    if (this.job) {
      this.tracker.merged(this.job.levels!, 2);
      this.tracker.endRollback();
    }
    this.job = undefined;
  }

  /** `jobs IMAGE --wait --json`, which returns once no merge runs. */
  async waitJobs(): Promise<void> {
    const j = await jobsJson(this.image, true);
    this.check(Array.isArray(j) && j.length === 0, `jobs --wait --json returned ${JSON.stringify(j)}, expected []`);
    this.mergeEnded();
  }

  /** The history file (IMAGE.nbd/history.jsonl, what `history --json` prints), read directly: fast enough to keep up with a merge. */
  historyFile(): HistoryJson[] {
    const file = path.join(`${this.image}.nbd`, 'history.jsonl');
    if (!fs.existsSync(file)) return [];
    return fs
      .readFileSync(file, 'utf8')
      .split('\n')
      .filter((l) => l)
      .map((l) => JSON.parse(l) as HistoryJson);
  }

  /**
   * Checks the history against every rollback made: in order, each rollback
   * entry with its snapshot, id, trigger, by, time and chunk count; its
   * merge-finished right after it (same chunks), or else the next rollback
   * names it as `replaced`; nothing else.
   */
  walkHistory(hist: HistoryJson[], what: string): HistoryWalk[] {
    const out: HistoryWalk[] = [];
    let i = 0;
    const show = () => `${what} (${hist.length} entries): ${JSON.stringify(hist.slice(-6))}`;
    for (let r = 0; r < this.rollbacks.length; r++) {
      const rb = this.rollbacks[r]!;
      const e = hist[i++];
      this.check(
        e && e.event === 'rollback' && e.snapshot === rb.target && e.snapshotId === rb.id,
        `history entry ${i - 1} should be rollback #${rb.seq} to ${rb.target} (id ${rb.id}): ${show()}`,
      );
      this.check(
        e!.trigger === 'command' && e!.by === rb.by && e!.at === rb.startedAt && e!.chunks === rb.total,
        `history entry for rollback #${rb.seq} to ${rb.target}: ${JSON.stringify(e)}; expected trigger command, by ${rb.by}, at ${rb.startedAt}, chunks ${rb.total}`,
      );
      const prev = out[r - 1];
      if (e!.replaced !== undefined) {
        this.check(
          prev && !prev.finished && e!.replaced === this.rollbacks[r - 1]!.target,
          `rollback #${rb.seq} to ${rb.target} says it replaced the rollback to "${e!.replaced}", but ` +
            (prev ? (prev.finished ? `that merge has a merge-finished entry before it` : `the previous rollback went to ${this.rollbacks[r - 1]!.target}`) : 'it is the first'),
        );
      } else {
        this.check(!prev || prev.finished, `rollback #${rb.seq} to ${rb.target} names no replaced rollback, but the merge before it (to ${this.rollbacks[r - 1]?.target}) never finished: ${show()}`);
      }
      const f = hist[i];
      const finished = f?.event === 'merge-finished';
      if (finished) {
        i++;
        this.check(
          f!.snapshot === rb.target && f!.snapshotId === rb.id && f!.chunks === rb.total && Number.isFinite(f!.ms) && f!.ms! >= 0,
          `merge-finished entry after rollback #${rb.seq} to ${rb.target} (${rb.total} chunks): ${JSON.stringify(f)}`,
        );
      }
      out.push({ replaced: e!.replaced !== undefined, finished });
    }
    this.check(i === hist.length, `history has ${hist.length - i} entries the test did not cause: ${JSON.stringify(hist.slice(i))}`);
    return out;
  }

  /** The CLI's `history --json` agrees with the walk over the file. */
  async checkHistoryCli(): Promise<void> {
    const hist = await historyJson(this.image);
    const walk = this.walkHistory(hist, 'history --json');
    if (walk.at(-1)?.finished) this.mergeEnded();
  }

  // ---- rollback ---------------------------------------------------------------------------

  /** Rolls back to `name` (CLI or control socket) and settles the model at once. */
  async rollbackTo(name: string, via: 'cli' | 'control', wait = false): Promise<Rb> {
    const snap = this.model.find(name);
    this.check(snap, `model has no snapshot ${name}`);
    let res: RollbackReply;
    if (via === 'cli') {
      const r = await cli(['rollback', this.image, name, '--json', ...(wait ? ['--wait'] : [])], 120_000);
      this.check(r.code === 0, `rollback ${name}: ${brief(r)}`);
      try {
        res = JSON.parse(r.stdout) as RollbackReply;
      } catch {
        this.fail(`rollback --json printed no JSON: ${brief(r)}`);
      }
    } else {
      const r = await controlRequest(this.image, { op: 'rollback', name, by: `rollback-model step ${this.step}` });
      this.check(r.ok, `rollback ${name} through the control socket: ${r.code} ${r.message}`);
      res = r.result as RollbackReply;
    }
    const id = this.ids.get(name);
    this.check(
      res.type === 'rollback-merge' && res.snapshot === name && res.snapshotId === id && res.trigger === 'command' && typeof res.by === 'string' && res.by !== '',
      `rollback ${name} (id ${id}) replied ${JSON.stringify(res)}`,
    );
    this.check(typeof res.visibleMs === 'number' && res.visibleMs >= 0 && !Number.isNaN(Date.parse(res.startedAt)), `rollback ${name}: visibleMs/startedAt ${JSON.stringify(res)}`);
    this.checkProgress(res, `rollback ${name} reply`);
    const rb: Rb = { seq: this.rollbacks.length + 1, target: name, id: id!, total: res.total, startedAt: res.startedAt, by: res.by, how: `${via}${wait ? ' --wait' : ''}, step ${this.step}` };
    this.rollbacks.push(rb);
    this.model.restore(snap!);
    this.basis = name;
    this.count(`rollback-${via}`);
    this.settle(rb);
    return rb;
  }

  /**
   * Reads the history (from the file: this must not wait long, the merge is
   * running) to learn whether the rollback replaced the previous merge or
   * that one had finished; then computes what the new merge must copy.
   */
  settle(rb: Rb): void {
    const walk = this.walkHistory(this.historyFile(), 'history file');
    const w = walk[rb.seq - 1]!;
    if (this.job) {
      // Replaced: the old merge copied some of its chunks (a change for every snapshot), maybe not all.
      this.tracker.merged(this.job.levels!, w.replaced ? 1 : 2);
      if (w.replaced) this.replaced++;
      else this.tracker.endRollback();
    } else this.check(!w.replaced, `rollback #${rb.seq} to ${rb.target} says it replaced a merge, but the previous merge was seen to finish before it`);
    rb.levels = this.tracker.pendingFor(rb.target);
    this.tracker.beginRollback(rb.target);
    const { min, max } = ChangeTracker.bounds(rb.levels);
    this.check(
      rb.total >= min && rb.total <= max,
      `rollback to ${rb.target} has ${rb.total} chunks to merge; the model says ${min === max ? `exactly ${min}` : `between ${min} and ${max}`} ` +
        `(the chunks changed since ${rb.target} was created, or since the last rollback to it when that one finished; out of ${this.tracker.chunks})`,
    );
    this.job = rb;
    if (w.finished) this.mergeEnded();
  }

  pickTarget(): { name: string; which: string } {
    const r = this.rng;
    const names = this.model.names();
    const which = r.weighted({ oldest: 3, newest: 2, middle: names.length > 2 ? 3 : 0, random: 1, same: this.basis ? 1 : 0 });
    const name =
      which === 'oldest'
        ? names[0]!
        : which === 'newest'
          ? names.at(-1)!
          : which === 'middle'
            ? names[r.int(1, names.length - 2)]!
            : which === 'same'
              ? this.basis!
              : r.pick(names);
    return { name, which: `${which} of ${names.length}` };
  }

  // ---- random I/O ----------------------------------------------------------------------------

  /** A random [off, off+len) inside the volume (randomRange in the fixture). */
  range(kind: 'data' | 'zero'): { off: number; len: number } {
    return randomRange(this.rng, this.cfg.size, this.cfg.chunkSize, kind, { whole: 3 });
  }

  randomOp(tagBase: string): BurstOp {
    const r = this.rng;
    const kind = r.weighted({ w: 70, z: 18, trim: 12 });
    const { off, len } = this.range(kind === 'w' ? 'data' : 'zero');
    const k = ++this.opSeq;
    if (kind === 'w') return { k, t: 'w', off, len, tag: `${tagBase}-${k}` };
    if (kind === 'z') return { k, t: 'z', off, len, nohole: r.chance(0.5) };
    return { k, t: 'trim', off, len };
  }

  applyOp(op: BurstOp): void {
    if (op.t === 'w') this.model.write(op.off, dataFor(op.tag!, op.len));
    else this.model.zero(op.off, op.len);
    this.tracker.touch(op.off, op.len);
  }

  /**
   * A burst of `ops` on the three live connections (depth 4 each). All must
   * succeed; they are applied to the model in acknowledgement order (ops
   * with overlapping ranges are never in flight together). At the first
   * acknowledgement `jobs` is asked through the control socket: if the merge
   * still ran then, the burst counts as written during the merge. Returns
   * that, and the wall-clock time each acknowledgement was received (later
   * than the server sent it).
   */
  async burst(ops: BurstOp[]): Promise<{ during: boolean; ackWall: number[] }> {
    const order: number[] = [];
    const ackWall: number[] = [];
    const errs: BurstEvent[] = [];
    let probe: Promise<{ ok: boolean; result?: unknown }> | undefined;
    this.py.onEvent = (ev) => {
      if (ev.ev === 'ack') {
        order.push(ev.k);
        ackWall.push(Date.now());
        if (!probe) probe = controlRequest(this.image, { op: 'jobs' });
      } else if (ev.ev === 'err') errs.push(ev);
    };
    const br = await this.py.request({ op: 'burst', hs: this.liveHandles, depth: 4, ops });
    this.py.onEvent = undefined;
    this.check(br.ok && errs.length === 0, `burst failed: ${JSON.stringify(br)} ${JSON.stringify(errs.slice(0, 3))}`);
    this.check(order.length === ops.length, `burst: ${order.length} of ${ops.length} ops acknowledged`);
    const byK = new Map(ops.map((o) => [o.k, o]));
    for (const k of order) this.applyOp(byK.get(k)!);
    const p = probe ? await probe : undefined;
    const during = Boolean(p?.ok && Array.isArray(p.result) && p.result.length > 0);
    if (during) {
      this.burstsDuringMerge++;
      this.writesDuringMerge += ops.length;
    }
    return { during, ackWall };
  }

  /** One write/zero/trim through the python client, checked and applied. */
  async single(kind: 'write' | 'zero' | 'trim'): Promise<void> {
    const r = this.rng;
    const h = r.pick(this.liveHandles);
    if (kind === 'write') {
      const { off, len } = this.range('data');
      const tag = `${this.cfg.seed}-${this.step}`;
      const fua = r.chance(0.1);
      this.op = `write ${len} bytes at ${off}${fua ? ' FUA' : ''} via ${h}`;
      const res = await this.py.request({ op: 'write', h, off, len, tag, fua });
      this.check(res.ok, `write failed: ${res.error} (errno ${res.errno})`);
      this.applyOp({ k: 0, t: 'w', off, len, tag });
    } else if (kind === 'zero') {
      const { off, len } = this.range('zero');
      const nohole = r.chance(0.5);
      const fast = this.fastZero && r.chance(0.25);
      this.op = `WRITE_ZEROES ${len} bytes at ${off}${nohole ? ' NO_HOLE' : ''}${fast ? ' FAST_ZERO' : ''} via ${h}`;
      const res = await this.py.request({ op: 'zero', h, off, len, nohole, fast });
      if (res.ok) this.applyOp({ k: 0, t: 'z', off, len });
      else {
        // FAST_ZERO is refused when the zeroing would first have to copy (preserve or merge): no change.
        this.check(fast && res.errno === ENOTSUP, `WRITE_ZEROES failed: ${res.error} (errno ${res.errno})`);
        this.op += ' -> ENOTSUP (no change expected)';
      }
    } else {
      const { off, len } = this.range('zero');
      this.op = `TRIM ${len} bytes at ${off} via ${h}`;
      const res = await this.py.request({ op: 'trim', h, off, len });
      this.check(res.ok, `TRIM failed: ${res.error} (errno ${res.errno})`);
      this.applyOp({ k: 0, t: 'trim', off, len });
    }
  }

  // ---- snapshot create / delete ----------------------------------------------------------------

  newName(): string {
    const n = ++this.nameSeq;
    return this.rng.pick([`s${n}`, `snap-${n}`, `S.${n}`, `r_${n}`, `${n}`]);
  }

  /**
   * `snapshot create`, after `jobs --wait` or at once. A refusal must be
   * exit 7 [ROLLBACK_RUNNING] and only while the model's merge may run; it
   * changes nothing. Returns whether it was created.
   */
  async create(name: string, waitFirst: boolean, via: 'cli' | 'control' = 'cli'): Promise<boolean> {
    if (waitFirst) await this.waitJobs();
    this.op = `snapshot create ${name}${waitFirst ? ' after jobs --wait' : ''} (${via})`;
    const refused = await this.snapshotRequest(via, 'create', name);
    if (refused) {
      const probe = await this.py.open('probe', this.srv!.uri(`disk@${name}`));
      if (probe.ok) await this.py.close('probe');
      this.check(!probe.ok, `snapshot create ${name} was refused, yet export disk@${name} accepts connections`);
      return false;
    }
    this.model.snapshot(name, `step ${this.step}`);
    this.tracker.add(name);
    await this.openSnapshot(name);
    return true;
  }

  /** `snapshot delete` (see create()). */
  async remove(name: string, waitFirst: boolean, via: 'cli' | 'control' = 'cli'): Promise<boolean> {
    if (waitFirst) await this.waitJobs();
    this.op = `snapshot delete ${name}${waitFirst ? ' after jobs --wait' : ''} (${via})`;
    const refused = await this.snapshotRequest(via, 'delete', name);
    const sh = this.snapHandles.get(name)!;
    if (refused) {
      // Refused: the export keeps serving the exact content (checked by the next verification).
      const still = await this.py.request({ op: 'read', h: sh, off: 0, len: 1 });
      this.check(still.ok, `snapshot delete ${name} was refused, yet its open connection no longer reads: ${still.error}`);
      return false;
    }
    this.model.remove(name);
    this.tracker.remove(name);
    if (this.basis === name) this.basis = undefined;
    this.snapHandles.delete(name);
    const stale = await this.py.request({ op: 'read', h: sh, off: 0, len: 1 });
    this.check(!stale.ok, `a connection opened on disk@${name} before its delete still reads data after it`);
    await this.py.close(sh);
    return true;
  }

  /** Sends a create/delete; returns true if refused because a merge runs (anything else but success fails). */
  private async snapshotRequest(via: 'cli' | 'control', verb: 'create' | 'delete', name: string): Promise<boolean> {
    let ok: boolean;
    let refusal: boolean;
    let detail: string;
    if (via === 'cli') {
      const r = await cli(['snapshot', verb, this.image, name]);
      ok = r.code === 0;
      refusal = r.code === 7 && r.stderr.includes('[ROLLBACK_RUNNING]');
      detail = brief(r);
    } else {
      const r = await controlRequest(this.image, { op: `snapshot-${verb}`, name });
      ok = r.ok;
      refusal = r.code === 'ROLLBACK_RUNNING';
      detail = `${r.code} ${r.message}`;
    }
    if (ok) {
      // Accepted: no merge ran any more.
      this.mergeEnded();
      return false;
    }
    this.check(refusal, `snapshot ${verb} ${name}: want success or ${via === 'cli' ? 'exit 7 [ROLLBACK_RUNNING]' : 'ROLLBACK_RUNNING'}, got ${detail}`);
    this.check(this.job, `snapshot ${verb} ${name} refused with ROLLBACK_RUNNING, but the model's last merge is known to have finished: ${detail}`);
    this.refusals++;
    this.count(`${verb}-refused`);
    this.op += ' -> refused: a merge runs';
    return true;
  }

  // ---- steps -----------------------------------------------------------------------------------

  async doStep(): Promise<void> {
    const r = this.rng;
    const nsnap = this.model.snaps.length;
    const kind = r.weighted({
      write: 34,
      zero: 7,
      trim: 5,
      flush: 2,
      create: nsnap < MAX_SNAPSHOTS ? (nsnap === 0 ? 30 : 7) : 0,
      delete: nsnap > 1 ? (nsnap >= MAX_SNAPSHOTS ? 8 : 3) : 0,
      rollback: nsnap > 0 ? 9 : 0,
      rollbackBurst: nsnap > 0 ? 6 : 0,
      rollbackTwice: nsnap > 0 ? 3 : 0,
      jobs: this.job ? 2 : 0,
      errors: 1.5,
    });
    this.count(kind);
    switch (kind) {
      case 'write':
      case 'zero':
      case 'trim':
        await this.single(kind);
        break;
      case 'flush': {
        const h = r.pick(this.liveHandles);
        this.op = `FLUSH via ${h}`;
        const res = await this.py.request({ op: 'flush', h });
        this.check(res.ok, `FLUSH failed: ${res.error}`);
        break;
      }
      case 'create': {
        const name = this.newName();
        await this.create(name, this.job ? r.chance(0.4) : false);
        await this.verifyList();
        break;
      }
      case 'delete': {
        const names = this.model.names();
        const which = r.weighted({ oldest: 3, newest: 3, middle: names.length > 2 ? 3 : 0, basis: this.basis ? 2 : 0 });
        const name =
          which === 'oldest' ? names[0]! : which === 'newest' ? names.at(-1)! : which === 'basis' ? this.basis! : names[r.int(1, names.length - 2)]!;
        await this.remove(name, this.job ? r.chance(0.4) : false);
        this.op += ` (${which} of ${names.length})`;
        await this.verifyList();
        break;
      }
      case 'rollback': {
        const { name, which } = this.pickTarget();
        const wait = r.chance(0.2);
        this.op = `rollback ${name}${wait ? ' --wait' : ''} (${which})`;
        await this.rollbackTo(name, 'cli', wait);
        if (wait) {
          // --wait returns after the merge: nothing may run any more.
          this.check(!this.checkJobs(await jobsJson(this.image), 'jobs --json after rollback --wait'), 'a merge still runs after rollback --wait returned');
        } else if (r.chance(0.3)) this.checkJobs(await jobsJson(this.image), 'jobs --json after rollback');
        await this.verifyList();
        if (r.chance(0.25)) await this.checkHistoryCli();
        break;
      }
      case 'rollbackBurst': {
        // Control socket: the burst starts within a millisecond of the reply,
        // while the merge is copying. Sometimes a create or delete first.
        const { name, which } = this.pickTarget();
        this.op = `rollback ${name} (${which}) through the control socket`;
        await this.rollbackTo(name, 'control');
        const attempt = r.weighted({ none: 3, create: nsnap < MAX_SNAPSHOTS ? 1 : 0, delete: nsnap > 1 ? 1 : 0 });
        let tried = '';
        if (attempt === 'create') {
          const n = this.newName();
          tried = (await this.create(n, false, 'control')) ? `; create ${n} accepted` : `; create ${n} refused`;
        } else if (attempt === 'delete') {
          const victim = r.pick(this.model.names());
          tried = (await this.remove(victim, false, 'control')) ? `; delete ${victim} accepted` : `; delete ${victim} refused`;
        }
        const ops = Array.from({ length: r.int(8, 40) }, () => this.randomOp(`${this.cfg.seed}-${this.step}-b`));
        const { during } = await this.burst(ops);
        this.op = `rollback ${name} (${which}) via control${tried}, then a burst of ${ops.length} ops (${during ? 'merge still running at the first ack' : 'merge done by the first ack'})`;
        if (tried) await this.verifyList();
        break;
      }
      case 'rollbackTwice': {
        // The second rollback replaces the first one's merge if it still runs.
        const a = this.pickTarget();
        const b = this.pickTarget();
        this.op = `rollback ${a.name} (${a.which}) then at once ${b.name} (${b.which}), control socket`;
        await this.rollbackTo(a.name, 'control');
        const rb = await this.rollbackTo(b.name, 'control');
        const walk = this.walkHistory(this.historyFile(), 'history file');
        this.op += walk[rb.seq - 1]!.replaced ? ' (replaced the running merge)' : ' (the first merge had finished)';
        if (r.chance(0.5)) this.checkJobs(await jobsJson(this.image), 'jobs --json after two rollbacks');
        await this.verifyList();
        break;
      }
      case 'jobs': {
        this.op = r.chance(0.5) ? 'jobs --wait' : 'jobs --json';
        if (this.op === 'jobs --wait') await this.waitJobs();
        else this.checkJobs(await jobsJson(this.image), 'jobs --json');
        await this.checkHistoryCli();
        break;
      }
      case 'errors':
        await this.errors();
        break;
    }
  }

  /** Error paths: none of them may change anything. */
  async errors(): Promise<void> {
    const r = this.rng;
    const choice = r.weighted({ rollbackMissing: 2, deleteMissing: 1, rollbackBadArgs: 1 });
    if (choice === 'rollbackMissing') {
      const name = this.deletedOrMissingName();
      this.op = `rollback ${name} (no such snapshot)`;
      const res = await cli(['rollback', this.image, name, ...(r.chance(0.5) ? ['--json'] : [])]);
      this.check(res.code === 8 && res.stderr.includes('[SNAPSHOT_NOT_FOUND]'), `rollback to a missing snapshot: want exit 8 [SNAPSHOT_NOT_FOUND], ${brief(res)}`);
    } else if (choice === 'deleteMissing') {
      const name = this.deletedOrMissingName();
      this.op = `snapshot delete ${name} (no such snapshot)`;
      const res = await cli(['snapshot', 'delete', this.image, name]);
      this.check(res.code === 8 && res.stderr.includes('[SNAPSHOT_NOT_FOUND]'), `delete of a missing snapshot: want exit 8 [SNAPSHOT_NOT_FOUND], ${brief(res)}`);
    } else {
      this.op = 'rollback with a missing argument';
      const res = await cli(['rollback', this.image]);
      this.check(res.code === 2, `rollback IMAGE (no snapshot): want exit 2, ${brief(res)}`);
    }
    await this.verifyList();
  }

  deletedOrMissingName(): string {
    const gone = [...this.ids.keys()].filter((n) => !this.model.find(n));
    return gone.length && this.rng.chance(0.6) ? this.rng.pick(gone) : `nosuch${this.rng.int(0, 999)}`;
  }

  async rawImageMatches(when: string): Promise<void> {
    this.op = `raw image check (${when})`;
    const d = compareBuffers(this.model.live, fs.readFileSync(this.image), this.candidates());
    if (d) this.fail(`the raw image file differs from the model live volume: ${d}`);
  }
}

// ---- Test 1: random steps ------------------------------------------------------------------------

async function runModel(t: Test, cfg: RunConfig): Promise<void> {
  if (!requireTools(t, ['python3-libnbd'])) return;
  t.comment(`${cfg.label}: seed ${cfg.seed}, ${cfg.steps} steps, size ${cfg.size}, chunk ${cfg.chunkSize}`);
  const run = new RollbackRun(t, cfg);
  t.teardown(() => run.cleanup());
  const started = Date.now();
  try {
    await run.start();
    await run.verifyAll();
    for (run.step = 1; run.step <= cfg.steps; run.step++) {
      await run.doStep();
      run.history.push(`${run.step}: ${run.op}`);
      await run.verifyAll();
    }
    run.step = cfg.steps + 1;
    run.op = 'end: jobs --wait, history';
    await run.waitJobs();
    await run.checkHistoryCli();
    await run.verifyList();
    await run.verifyAll();
    run.check((await run.py.request({ op: 'flush', h: 'L0' })).ok, 'final flush failed');
    await run.stop('end of steps');
    await run.rawImageMatches('after SIGTERM');

    // Offline rollback: no server, so the CLI merges to the end itself.
    if (run.model.snaps.length) {
      const { name, which } = run.pickTarget();
      run.op = `offline rollback ${name} (${which})`;
      await run.rollbackTo(name, 'cli');
      run.check(!run.job, `offline rollback ${name} returned before its merge finished (history has no merge-finished)`);
      run.check(!run.checkJobs(await jobsJson(run.image), 'offline jobs --json'), 'offline: a merge still recorded after the offline rollback');
      await run.checkHistoryCli();
      await run.rawImageMatches(`after the offline rollback to ${name}`);
    }
    // Restart: live and every snapshot as the model says.
    run.op = 'restart';
    await run.start();
    await run.verifyList();
    await run.verifyAll();
    t.pass(
      `${cfg.label}: ${cfg.steps} steps (${Object.entries(run.counts)
        .map(([k, v]) => `${k} ${v}`)
        .join(', ')}), ${run.rollbacks.length} rollbacks (${run.replaced} replaced a running merge), ${run.refusals} create/delete refused during a merge, ` +
        `${run.burstsDuringMerge} bursts (${run.writesDuringMerge} ops) written during a merge, ${run.comparisons} full export comparisons, all exact ` +
        `(${((Date.now() - started) / 1000).toFixed(1)} s)`,
    );

    // Refusals that change nothing: an unknown snapshot (8), a failed one (12).
    run.op = 'rollback to a missing snapshot (online)';
    const missing = await cli(['rollback', run.image, 'no-such-snapshot', '--json']);
    run.check(missing.code === 8 && missing.stderr.includes('[SNAPSHOT_NOT_FOUND]'), `online rollback to a missing snapshot: want exit 8, ${brief(missing)}`);
    await run.stop('before marking a snapshot failed');
    run.op = 'rollback to a missing snapshot (offline)';
    const missingOff = await cli(['rollback', run.image, 'no-such-snapshot']);
    run.check(missingOff.code === 8 && missingOff.stderr.includes('[SNAPSHOT_NOT_FOUND]'), `offline rollback to a missing snapshot: want exit 8, ${brief(missingOff)}`);
    if (run.model.snaps.length) {
      // A failed snapshot as the server records it (state "failed" in the
      // manifest, which is how a failure persists): written here because making
      // a store fail for real needs a small filesystem of its own
      // (test/snapshots-failure.ts covers that).
      const victim = run.model.snaps[0]!.name;
      run.op = `rollback to failed snapshot ${victim}`;
      const m = readManifest(run.image)!;
      writeManifest(run.image, {
        ...m,
        snapshots: m.snapshots.map((s) => (s.name === victim ? { ...s, state: 'failed' as const, failure: { reason: 'marked failed by the test', at: new Date().toISOString() } } : s)),
      });
      const before = run.historyFile().length;
      const off = await cli(['rollback', run.image, victim]);
      run.check(off.code === 12 && off.stderr.includes('[SNAPSHOT_FAILED]'), `offline rollback to failed snapshot ${victim}: want exit 12 [SNAPSHOT_FAILED], ${brief(off)}`);
      await run.rawImageMatches('after the refused offline rollback');
      run.srv = await startServer({ dir: run.dir, images: ['disk.img'] });
      const on = await cli(['rollback', run.image, victim, '--json']);
      run.check(on.code === 12 && on.stderr.includes('[SNAPSHOT_FAILED]'), `online rollback to failed snapshot ${victim}: want exit 12 [SNAPSHOT_FAILED], ${brief(on)}`);
      run.check((await jobsJson(run.image)).length === 0, 'a refused rollback left a job');
      run.check(run.historyFile().length === before, 'a refused rollback wrote to the history');
      run.check((await run.py.open('L0', run.srv.uri('disk'))).ok, 'cannot connect after the refused rollback');
      const live = await compareExport(run.py, 'L0', run.model.live, run.model.crcs(), run.candidates());
      run.check(!live, `live export changed by a refused rollback: ${live}`);
      await run.py.close('L0');
      t.pass(`${cfg.label}: rollback to a missing (exit 8) or failed (exit 12) snapshot is refused, online and offline, and changes nothing`);
    }
  } catch (err) {
    if (err instanceof Failure) t.fail(err.message);
    else t.fail(`[${cfg.label}, seed ${cfg.seed}] step ${run.step} (${run.op}): ${(err as Error).stack ?? err}`);
  }
}

t.test('rollback model: 16 MiB volume, 64 KiB chunks', (t) =>
  runModel(t, { label: '16MiB/64K', size: 16 * MiB, steps: 140, chunk: '64K', chunkSize: 64 * KiB, seed: SEED }),
);

t.test('rollback model: unaligned 8 MiB + 5555 bytes, 16 KiB chunks', (t) =>
  runModel(t, { label: '8MiB+5555/16K', size: 8 * MiB + 5555, steps: 140, chunk: '16K', chunkSize: 16 * KiB, seed: (SEED + 1) >>> 0 }),
);

// ---- Test 2: long merges ---------------------------------------------------------------------------
//
// Every chunk differs between the snapshots and live, so a rollback to any of
// them merges the whole volume. The server runs with --merge-rate 32M: a
// whole-volume merge takes about 3 s however fast the machine is, while the
// requests that must find it running are sent within milliseconds of the
// rollback reply (a full read of every export and the CLI create come later
// and may find it finished; both outcomes are checked). Each round, right
// after the rollback reply (control socket): a create and a delete (must be
// refused: the merge runs), a burst of writes (they win), a full read of
// every export while the merge may still run, sometimes a second rollback
// replacing the merge, then `jobs --wait` and every check again.
t.test('rollback model: writes, reads and snapshot requests during multi-step merges (96 MiB + 4321, 16 KiB chunks)', async (t) => {
  if (!requireTools(t, ['python3-libnbd'])) return;
  const seed = (SEED + 2) >>> 0;
  const size = 96 * MiB + 4321;
  const cfg: RunConfig = {
    label: 'long merges',
    size,
    steps: 0,
    chunk: '16K',
    chunkSize: 16 * KiB,
    seed,
    initial: dataFor(`${seed}-initial`, size),
    serveArgs: ['--merge-rate', '32M'],
  };
  t.comment(`seed ${cfg.seed}, size ${cfg.size}`);
  const run = new RollbackRun(t, cfg);
  t.teardown(() => run.cleanup());
  const started = Date.now();
  const ROUNDS = 6;
  /** Rollback targets have more chunks than this to merge: 64 MiB, over 2 s at 32M/s. */
  const STEP_CHUNKS = (64 * MiB) / cfg.chunkSize;
  try {
    await run.start();
    const r = run.rng;
    let rewrites = 0;
    const rewrite = async (how: 'data' | 'zero' | 'trim') => {
      // The whole volume, so that every chunk changes.
      run.op = `rewrite everything (${how})`;
      const label = `${seed}-rewrite-${++rewrites}`;
      for (let off = 0; off < size; off += 16 * MiB) {
        const len = Math.min(16 * MiB, size - off);
        const op: BurstOp = how === 'data' ? { k: 0, t: 'w', off, len, tag: `${label}-${off}` } : how === 'zero' ? { k: 0, t: 'z', off, len, nohole: true } : { k: 0, t: 'trim', off, len };
        const req = how === 'data' ? { op: 'write', h: 'L0', off, len, tag: op.tag } : { op: how, h: 'L0', off, len, nohole: true };
        run.check((await run.py.request(req)).ok, `${run.op}: request failed`);
        run.applyOp(op);
      }
    };
    // old = the initial data, mid = zeros, live = new data: every chunk differs.
    run.check(await run.create('old', false), 'create old');
    await rewrite('zero');
    run.check(await run.create('mid', false), 'create mid');
    await rewrite('data');
    await run.verifyList();
    let mergeSeen = 0;
    let writesInMerge = 0;
    let mergeListed = 0;
    for (run.step = 1; run.step <= ROUNDS; run.step++) {
      // A snapshot with more than one merge step's worth of chunks changed since it.
      const big = run.model.names().filter((n) => ChangeTracker.bounds(run.tracker.pending(n)).min > STEP_CHUNKS);
      run.check(big.length > 0, 'no snapshot has enough changed chunks for a multi-step merge (test setup)');
      const target = big[(run.step - 1) % big.length]!;
      run.op = `round ${run.step}: rollback ${target}`;
      await run.rollbackTo(target, 'control');
      // The snapshot list shows the merge on the target while it runs.
      const listed = (await run.verifyList('control')).find((x) => x.name === target)?.merge;
      if (listed) mergeListed++;
      else {
        const j = await controlRequest(run.image, { op: 'jobs' });
        run.check(j.ok && Array.isArray(j.result) && j.result.length === 0, `snapshot-list showed no merge on ${target}, yet a merge runs after it: ${JSON.stringify(j.result)}`);
        run.mergeEnded();
      }
      // Snapshot requests right now find the merge running.
      const tries: string[] = [];
      const n1 = run.newName();
      tries.push((await run.create(n1, false, 'control')) ? `create ${n1} accepted` : `create ${n1} refused`);
      const victim = r.pick(run.model.names());
      tries.push((await run.remove(victim, false, 'control')) ? `delete ${victim} accepted` : `delete ${victim} refused`);
      // Odd rounds: writes at once, then reads. Even rounds: a second rollback
      // replaces the merge at once, then reads of every export, then writes.
      const ops = Array.from({ length: r.int(60, 150) }, () => run.randomOp(`${cfg.seed}-${run.step}-lb`));
      const readWhileMerging = async () => {
        const probe = run.job ? await controlRequest(run.image, { op: 'jobs' }) : undefined;
        if (probe?.ok && Array.isArray(probe.result) && probe.result.length) {
          run.checkJobs(probe.result as JobEntry[], 'jobs (control socket) during the merge');
          run.readsDuringMerge++;
        }
        await run.verifyAll();
      };
      let replacedBy = '';
      let burst: { during: boolean; ackWall: number[] };
      if (run.step % 2 === 0) {
        const other = run.model.names().filter((x) => x !== target && ChangeTracker.bounds(run.tracker.pending(x)).min > STEP_CHUNKS);
        if (other.length) {
          const b = await run.rollbackTo(r.pick(other), 'control');
          replacedBy = `; then rollback ${b.target} (${run.walkHistory(run.historyFile(), 'history file')[b.seq - 1]!.replaced ? 'replaced the merge' : 'after the merge ended'})`;
        }
        await readWhileMerging();
        burst = await run.burst(ops);
      } else {
        burst = await run.burst(ops);
        await readWhileMerging();
      }
      // The CLI too (a process start later): refused if the merge still runs.
      const n2 = run.newName();
      tries.push((await run.create(n2, false, 'cli')) ? `CLI create ${n2} accepted` : `CLI create ${n2} refused`);
      run.op = `round ${run.step}: rollback ${target}: ${tries.join(', ')}${replacedBy}; burst of ${ops.length}; jobs --wait`;
      await run.waitJobs();
      await run.checkHistoryCli();
      // Writes acknowledged (as received here, i.e. later than sent) before the merge-finished time: written during the merge.
      const last = run.rollbacks.at(-1)!;
      const mf = run.historyFile().at(-1);
      run.check(mf?.event === 'merge-finished' && mf.snapshotId === last.id, `after jobs --wait the history does not end with the merge-finished of ${last.target}: ${JSON.stringify(mf)}`);
      const inMerge = burst.ackWall.filter((w) => w < Date.parse(mf!.at)).length;
      if (inMerge) mergeSeen++;
      writesInMerge += inMerge;
      run.op += ` (${inMerge} of the burst's ops acknowledged before the merge finished)`;
      run.history.push(run.op);
      await run.verifyList();
      await run.verifyAll();
      // At most three snapshots; at least two with everything changed since them.
      while (run.model.snaps.length > 3) run.check(await run.remove(run.model.names().at(-1)!, false), 'delete the newest');
      while (run.model.names().filter((n) => ChangeTracker.bounds(run.tracker.pending(n)).min > STEP_CHUNKS).length < 2) {
        const n = run.newName();
        run.check(await run.create(n, false), `create ${n}`);
        await rewrite(r.pick(['data', 'zero', 'trim'] as const));
      }
      await run.verifyList();
    }
    t.ok(run.refusals > 0, `snapshot create/delete refused with ROLLBACK_RUNNING while merging (${run.refusals} times)`);
    t.ok(mergeSeen > 0, `writes were acknowledged while the merge ran (in ${mergeSeen} of ${ROUNDS} bursts, ${writesInMerge} ops)`);
    t.ok(mergeListed > 0, `snapshot list showed the merge (done/total/percent) on its target while it ran (${mergeListed} of ${ROUNDS} rounds)`);
    t.ok(run.readsDuringMerge > 0, `full reads of every export started while the merge ran (${run.readsDuringMerge} times)`);
    t.ok(run.replaced > 0, `a rollback replaced a running merge (${run.replaced} times)`);
    t.pass(
      `long merges: ${ROUNDS} rounds, ${run.rollbacks.length} rollbacks, ${run.comparisons} full export comparisons, all exact (${((Date.now() - started) / 1000).toFixed(1)} s)`,
    );
  } catch (err) {
    if (err instanceof Failure) t.fail(err.message);
    else t.fail(`[${cfg.label}, seed ${cfg.seed}] round ${run.step} (${run.op}): ${(err as Error).stack ?? err}`);
  }
});
