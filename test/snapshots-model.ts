// Model-based test of copy-on-write snapshots against the real CLI server.
//
// A seeded PRNG drives random writes (1 byte to 300 KiB, unaligned, across
// chunk boundaries), WRITE_ZEROES (with and without NO_HOLE, sometimes
// FAST_ZERO), TRIM, FLUSH, and online `snapshot create` / `snapshot delete`
// (oldest, newest, middle) through three libnbd connections held by one
// long-running python3-libnbd process (test/fixtures/snapshot_client.py).
// The model is the live bytes plus a frozen copy per snapshot. After every
// step the live export and every snapshot export (disk@NAME) are read in full
// and compared with the model; `snapshot list --json` is compared after every
// snapshot operation. At the end: SIGTERM (exit 0), the raw image against the
// model, a restart (persistence), offline create/delete, another restart.
//
// TRIM is modelled as zeroing: on this server over a regular file it punches
// a hole (FALLOC_FL_PUNCH_HOLE), which reads back as zeroes.
//
// The seed is printed; NBD_TEST_SEED=<seed> replays a run.
import t, { type Test } from 'tap';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { makeTempDir, startServer, type RunningServer } from './fixtures/server';
import { requireTools } from './fixtures/tools';
import {
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
  describeDiff,
  monoNs,
  removeDir,
  snapshotList,
  sparseImage,
  type BurstEvent,
  type BurstOp,
  type Candidate,
  randomRange,
} from './fixtures/snapshot-model';

const SEED = baseSeed();
t.comment(`snapshots-model seed ${SEED} (replay: NBD_TEST_SEED=${SEED} node tools/run-tests.js test/snapshots-model.ts)`);

const ENOTSUP = 95;
const MAX_SNAPSHOTS = 6;

interface RunConfig {
  label: string;
  size: number;
  steps: number;
  /** --chunk-size for the new volume (default: the server's 64K). */
  chunk?: string;
  chunkSize: number;
  seed: number;
  /** Weight multiplier for snapshot create/delete steps (default 1). */
  snapBias?: number;
}

class Failure extends Error {}

/** One model run: server, python client, model, step counter and history for messages. */
class ModelRun {
  readonly rng: Rng;
  readonly dir: string;
  readonly image: string;
  srv!: RunningServer;
  readonly py = new PyClient();
  readonly model: VolumeModel;
  step = 0;
  op = 'start';
  readonly history: string[] = [];
  readonly liveHandles = ['L0', 'L1', 'L2'];
  /** snapshot name -> python handle id */
  readonly snapHandles = new Map<string, string>();
  private handleSeq = 0;
  private nameSeq = 0;
  readonly deletedNames: string[] = [];
  fastZero = false;
  comparisons = 0;
  counts: Record<string, number> = {};

  constructor(readonly t: Test, readonly cfg: RunConfig) {
    this.rng = new Rng(cfg.seed);
    this.dir = makeTempDir('nbd-snapmodel-');
    this.image = sparseImage(this.dir, 'disk.img', cfg.size);
    this.model = new VolumeModel(cfg.size);
  }

  fail(msg: string): never {
    throw new Failure(
      `[${this.cfg.label}, seed ${this.cfg.seed}] step ${this.step} (${this.op}): ${msg}\n` +
        `recent steps:\n  ${this.history.slice(-12).join('\n  ')}\n` +
        `model snapshots (oldest first): ${this.model.names().join(', ') || '(none)'}`,
    );
  }

  check(cond: unknown, msg: string): void {
    if (!cond) this.fail(msg);
  }

  async start(): Promise<void> {
    const args = this.cfg.chunk ? ['--chunk-size', this.cfg.chunk] : [];
    this.srv = await startServer({ dir: this.dir, images: ['disk.img'], args });
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
    const r = await this.py.open(h, this.srv.uri(`disk@${name}`));
    this.check(r.ok, `cannot connect to snapshot export disk@${name}: ${r.error} (errno ${r.errno})`);
    this.check(r.size === this.cfg.size, `snapshot export disk@${name} has size ${r.size}, expected ${this.cfg.size}`);
    this.check(r.ro === true, `snapshot export disk@${name} is not read-only`);
    this.snapHandles.set(name, h);
  }

  /** Drops every python handle (after the server went away). */
  async dropHandles(): Promise<void> {
    for (const h of this.liveHandles) await this.py.close(h);
    for (const h of this.snapHandles.values()) await this.py.close(h);
    this.snapHandles.clear();
  }

  candidates(): Candidate[] {
    return this.model.candidates();
  }

  /** Reads the live export and every snapshot export in full and compares them with the model. */
  async verifyAll(): Promise<void> {
    const h = this.rng.pick(this.liveHandles);
    const live = await compareExport(this.py, h, this.model.live, this.model.crcs(), this.candidates());
    this.comparisons++;
    if (live) this.fail(`live export disk (read through ${h}) differs from the model: ${live}`);
    for (const s of this.model.snaps) {
      const sh = this.snapHandles.get(s.name);
      this.check(sh, `no handle for snapshot ${s.name}`);
      const d = await compareExport(this.py, sh!, s.data, s.crcs, this.candidates());
      this.comparisons++;
      if (d) this.fail(`snapshot export disk@${s.name} (created at ${s.createdAt}) differs from the model: ${d}`);
    }
  }

  async verifyList(): Promise<void> {
    const list = await snapshotList(this.image);
    const names = list.map((s) => s.name);
    this.check(
      JSON.stringify(names) === JSON.stringify(this.model.names()),
      `snapshot list --json names ${JSON.stringify(names)}, model ${JSON.stringify(this.model.names())}`,
    );
    const ids = list.map((s) => s.id);
    for (let i = 1; i < ids.length; i++) this.check(ids[i]! > ids[i - 1]!, `snapshot ids not increasing in list order: ${ids.join(',')}`);
    for (const s of list) {
      this.check(s.state === 'active', `snapshot ${s.name} is ${s.state}: ${JSON.stringify(s.failure)}`);
      this.check(s.export === `disk@${s.name}`, `snapshot ${s.name} lists export ${s.export}`);
      this.check(s.chunkSize === this.cfg.chunkSize, `snapshot ${s.name} lists chunkSize ${s.chunkSize}, expected ${this.cfg.chunkSize}`);
      const chunks = Math.ceil(this.cfg.size / this.cfg.chunkSize);
      this.check(
        Number.isInteger(s.preservedChunks) && s.preservedChunks! >= 0 && s.preservedChunks! <= chunks,
        `snapshot ${s.name} preservedChunks ${s.preservedChunks} (volume has ${chunks} chunks)`,
      );
      this.check(s.preservedBytes === s.preservedChunks! * this.cfg.chunkSize, `snapshot ${s.name} preservedBytes ${s.preservedBytes}`);
      this.check(!Number.isNaN(Date.parse(s.createdAt)), `snapshot ${s.name} createdAt ${s.createdAt}`);
    }
  }

  // ---- random ranges --------------------------------------------------------------

  /** A random [off, off+len) inside the volume (randomRange in the fixture). */
  range(kind: 'data' | 'zero'): { off: number; len: number } {
    return randomRange(this.rng, this.cfg.size, this.cfg.chunkSize, kind, { whole: 5, straddle: true });
  }

  private newName(): string {
    const r = this.rng;
    const reusable = this.deletedNames.filter((n) => !this.model.find(n));
    if (reusable.length && r.chance(0.15)) return r.pick(reusable);
    const n = ++this.nameSeq;
    return r.pick([`s${n}`, `snap-${n}`, `S.${n}`, `x_${n}`, `${n}`, `b${n}.v-1_x`]);
  }

  // ---- steps ----------------------------------------------------------------------------

  async doStep(): Promise<void> {
    const r = this.rng;
    const nsnap = this.model.snaps.length;
    const kind = r.weighted({
      write: 46,
      zero: 10,
      trim: 8,
      flush: 4,
      create: (nsnap < MAX_SNAPSHOTS ? (nsnap === 0 ? 14 : 8) : 0) * (this.cfg.snapBias ?? 1),
      delete: (nsnap > 0 ? (nsnap >= MAX_SNAPSHOTS ? 10 : 5) : 0) * (this.cfg.snapBias ?? 1),
      cliErrors: 1.5,
    });
    this.counts[kind] = (this.counts[kind] ?? 0) + 1;
    const h = r.pick(this.liveHandles);
    switch (kind) {
      case 'write': {
        const { off, len } = this.range('data');
        const tag = `${this.cfg.seed}-${this.step}`;
        const fua = r.chance(0.1);
        this.op = `write ${len} bytes at ${off}${fua ? ' FUA' : ''} via ${h}`;
        const res = await this.py.request({ op: 'write', h, off, len, tag, fua });
        this.check(res.ok, `write failed: ${res.error} (errno ${res.errno})`);
        this.model.write(off, dataFor(tag, len));
        break;
      }
      case 'zero': {
        const { off, len } = this.range('zero');
        const nohole = r.chance(0.5);
        const fast = this.fastZero && r.chance(0.2);
        this.op = `WRITE_ZEROES ${len} bytes at ${off}${nohole ? ' NO_HOLE' : ''}${fast ? ' FAST_ZERO' : ''} via ${h}`;
        const res = await this.py.request({ op: 'zero', h, off, len, nohole, fast });
        if (res.ok) this.model.zero(off, len);
        else {
          this.check(fast && res.errno === ENOTSUP, `WRITE_ZEROES failed: ${res.error} (errno ${res.errno})`);
          this.op += ' -> ENOTSUP (no change expected)';
        }
        break;
      }
      case 'trim': {
        const { off, len } = this.range('zero');
        this.op = `TRIM ${len} bytes at ${off} via ${h}`;
        const res = await this.py.request({ op: 'trim', h, off, len });
        this.check(res.ok, `TRIM failed: ${res.error} (errno ${res.errno})`);
        this.model.zero(off, len);
        break;
      }
      case 'flush': {
        this.op = `FLUSH via ${h}`;
        const res = await this.py.request({ op: 'flush', h });
        this.check(res.ok, `FLUSH failed: ${res.error}`);
        break;
      }
      case 'create': {
        const name = this.newName();
        this.op = `snapshot create ${name}`;
        const res = await cli(['snapshot', 'create', this.image, name]);
        this.check(res.code === 0, `snapshot create ${name}: ${brief(res)}`);
        this.check(res.stdout.includes(`disk@${name}`), `snapshot create output names no export disk@${name}: ${res.stdout}`);
        this.model.snapshot(name, `step ${this.step}`);
        // The export must exist as soon as create returned.
        await this.openSnapshot(name);
        await this.verifyList();
        break;
      }
      case 'delete': {
        const names = this.model.names();
        const which = r.weighted({ oldest: 3, newest: 3, middle: names.length > 2 ? 3 : 0, random: 1 });
        const name =
          which === 'oldest'
            ? names[0]!
            : which === 'newest'
              ? names.at(-1)!
              : which === 'middle'
                ? names[r.int(1, names.length - 2)]!
                : r.pick(names);
        this.op = `snapshot delete ${name} (${which} of ${names.length})`;
        const res = await cli(['snapshot', 'delete', this.image, name]);
        this.check(res.code === 0, `snapshot delete ${name}: ${brief(res)}`);
        this.model.remove(name);
        this.deletedNames.push(name);
        const sh = this.snapHandles.get(name)!;
        this.snapHandles.delete(name);
        // A connection still open on the deleted export must not serve data any more.
        const stale = await this.py.request({ op: 'read', h: sh, off: 0, len: 1 });
        this.check(!stale.ok, `a connection opened on disk@${name} before its delete still reads data after it`);
        await this.py.close(sh);
        const again = await this.py.open('probe', this.srv.uri(`disk@${name}`));
        if (again.ok) await this.py.close('probe');
        this.check(!again.ok, `export disk@${name} still accepts connections after snapshot delete returned`);
        await this.verifyList();
        break;
      }
      case 'cliErrors': {
        await this.cliErrors();
        break;
      }
    }
  }

  /** Error paths of the snapshot CLI; none of them may change anything. */
  async cliErrors(): Promise<void> {
    const r = this.rng;
    const names = this.model.names();
    const choice = r.weighted({ exists: names.length ? 1 : 0, missingDelete: 1, missingInfo: 1, badName: 1, info: names.length ? 1 : 0 });
    if (choice === 'exists') {
      const name = r.pick(names);
      this.op = `snapshot create ${name} (exists)`;
      const res = await cli(['snapshot', 'create', this.image, name]);
      this.check(res.code === 9 && res.stderr.includes('SNAPSHOT_EXISTS'), `create of an existing name: want exit 9 SNAPSHOT_EXISTS, ${brief(res)}`);
    } else if (choice === 'missingDelete' || choice === 'missingInfo') {
      const name = `nosuch${r.int(0, 999)}`;
      const verb = choice === 'missingDelete' ? 'delete' : 'info';
      this.op = `snapshot ${verb} ${name} (missing)`;
      const res = await cli(['snapshot', verb, this.image, name]);
      this.check(res.code === 8 && res.stderr.includes('SNAPSHOT_NOT_FOUND'), `${verb} of a missing name: want exit 8 SNAPSHOT_NOT_FOUND, ${brief(res)}`);
    } else if (choice === 'badName') {
      const name = r.pick(['_x', 'a/b', '.hidden', 'a b', 'x'.repeat(65), 'é', 'a@b']);
      this.op = `snapshot create ${JSON.stringify(name)} (bad name)`;
      const res = await cli(['snapshot', 'create', this.image, name]);
      this.check(res.code === 2 && res.stderr.includes('BAD_SNAPSHOT_NAME'), `bad name: want exit 2 BAD_SNAPSHOT_NAME, ${brief(res)}`);
    } else {
      const name = r.pick(names);
      this.op = `snapshot info ${name} --json`;
      const res = await cli(['snapshot', 'info', this.image, name, '--json']);
      this.check(res.code === 0, `snapshot info ${name}: ${brief(res)}`);
      const info = JSON.parse(res.stdout) as { name: string; export: string; state: string };
      this.check(info.name === name && info.export === `disk@${name}` && info.state === 'active', `snapshot info ${name}: ${res.stdout}`);
    }
    await this.verifyList();
  }

  async rawImageMatches(when: string): Promise<void> {
    this.op = `raw image check (${when})`;
    const raw = fs.readFileSync(this.image);
    const d = compareBuffers(this.model.live, raw, this.candidates());
    if (d) this.fail(`the raw image file differs from the model live volume: ${d}`);
  }

  async stop(when: string): Promise<void> {
    this.op = `SIGTERM (${when})`;
    const code = await this.srv.stop('SIGTERM');
    this.check(code === 0, `server exited with ${code} on SIGTERM; stderr: ${this.srv.stderr().slice(-2000)}`);
    await this.dropHandles();
  }

  async cleanup(): Promise<void> {
    if (this.srv) await this.srv.stop('SIGKILL');
    await this.py.quit();
    removeDir(this.dir);
  }
}

async function runModel(t: Test, cfg: RunConfig): Promise<void> {
  if (!requireTools(t, ['python3-libnbd'])) return;
  t.comment(`${cfg.label}: seed ${cfg.seed}, ${cfg.steps} steps, size ${cfg.size}, chunk ${cfg.chunkSize}`);
  const run = new ModelRun(t, cfg);
  t.teardown(() => run.cleanup());
  const started = Date.now();
  try {
    await run.start();
    // A second server on the same image is refused while the first serves it.
    run.op = 'second server on the same image';
    const busy = await cli(['serve', run.image, '--socket', path.join(run.dir, 'other.sock'), '--log-level', 'error'], 30_000);
    run.check(busy.code === 7 && busy.stderr.includes('VOLUME_BUSY'), `second server: want exit 7 VOLUME_BUSY, ${brief(busy)}`);
    await run.verifyList();
    await run.verifyAll();
    for (run.step = 1; run.step <= cfg.steps; run.step++) {
      await run.doStep();
      run.history.push(`${run.step}: ${run.op}`);
      await run.verifyAll();
    }
    run.step = cfg.steps + 1;
    run.op = 'final FLUSH';
    const fl = await run.py.request({ op: 'flush', h: 'L0' });
    run.check(fl.ok, `final flush failed: ${fl.error}`);
    await run.stop('end of steps');
    await run.rawImageMatches('after SIGTERM');

    // Persistence: a restarted server serves every snapshot exactly.
    run.op = 'restart';
    await run.start();
    await run.verifyList();
    await run.verifyAll();
    t.pass(`restart: live and ${run.model.snaps.length} snapshots exact`);

    // A write after the restart does not leak into any snapshot.
    run.op = 'write after restart';
    const { off, len } = run.range('data');
    const tag = `${cfg.seed}-restart`;
    run.check((await run.py.request({ op: 'write', h: 'L1', off, len, tag })).ok, 'write after restart failed');
    run.model.write(off, dataFor(tag, len));
    await run.verifyAll();
    await run.stop('before offline operations');

    // Offline: the CLI opens the volume itself.
    run.op = 'offline snapshot create';
    const oc = await cli(['snapshot', 'create', run.image, 'offline-1']);
    run.check(oc.code === 0, `offline snapshot create: ${brief(oc)}`);
    run.model.snapshot('offline-1', 'offline');
    const names = run.model.names();
    if (names.length > 2) {
      const victim = names[Math.floor(names.length / 2) - 1]!;
      run.op = `offline snapshot delete ${victim}`;
      const od = await cli(['snapshot', 'delete', run.image, victim]);
      run.check(od.code === 0, `offline snapshot delete ${victim}: ${brief(od)}`);
      run.model.remove(victim);
    }
    await run.verifyList();
    await run.rawImageMatches('after offline operations');
    run.op = 'restart after offline operations';
    await run.start();
    await run.verifyList();
    await run.verifyAll();
    await run.stop('end');
    await run.rawImageMatches('at the end');
    t.pass(
      `${cfg.steps} steps (${Object.entries(run.counts)
        .map(([k, v]) => `${k} ${v}`)
        .join(', ')}), ${run.comparisons} full export comparisons, all exact (${((Date.now() - started) / 1000).toFixed(1)} s)`,
    );
  } catch (err) {
    if (err instanceof Failure) t.fail(err.message);
    else t.fail(`[${cfg.label}, seed ${cfg.seed}] step ${run.step} (${run.op}): ${(err as Error).stack ?? err}`);
  }
}

t.test('model: 16 MiB volume, 64 KiB chunks', (t) =>
  runModel(t, { label: '16MiB', size: 16 * MiB, steps: 260, chunk: '64K', chunkSize: 64 * KiB, seed: SEED }),
);

t.test('model: unaligned 16 MiB + 12345 bytes, 64 KiB chunks', (t) =>
  runModel(t, { label: '16MiB+12345', size: 16 * MiB + 12345, steps: 200, chunk: '64K', chunkSize: 64 * KiB, seed: (SEED + 1) >>> 0 }),
);

t.test('model: 12 MiB volume, default (16 KiB) chunks', (t) =>
  runModel(t, { label: '12MiB/default', size: 12 * MiB, steps: 150, chunkSize: 16 * KiB, seed: (SEED + 6) >>> 0 }),
);

t.test('model: unaligned 3 MiB + 777 bytes, 4 KiB chunks', (t) =>
  runModel(t, { label: '3MiB+777/4K', size: 3 * MiB + 777, steps: 150, chunk: '4K', chunkSize: 4 * KiB, seed: (SEED + 2) >>> 0 }),
);

// More chunks than one hand-down step (16384 chunks per native call): a
// delete hands chunks down in several calls.
t.test('model: 72 MiB + 100 bytes, 4 KiB chunks (18433 chunks: multi-step hand-down)', (t) =>
  runModel(t, { label: '72MiB+100/4K', size: 72 * MiB + 100, steps: 40, chunk: '4K', chunkSize: 4 * KiB, seed: (SEED + 5) >>> 0, snapBias: 3 }),
);

// ---- Writes concurrent with create and delete -------------------------------------------------
//
// Writes stream on three connections while a snapshot is created or deleted
// (through the control socket, so the operation lands in the middle of the
// stream). All writes go to distinct chunks that no snapshot holds yet, so
// each one must first preserve old data into the newest snapshot.
//   delete: deleting changes no content, so every remaining snapshot and the
//           live volume must match the model exactly.
//   create: the new snapshot must be one cut of the write stream: each write
//           wholly in or out; every write acknowledged before the request was
//           sent is in; every write submitted after the reply is out; and a
//           write in it implies every write acknowledged before that one was
//           submitted is in too. Older snapshots stay exact.
// Overlap is made, not hoped for: the burst holds its remaining writes once
// `startAfter` are acknowledged, the test sends the create/delete and only
// then lets them go, and the server's first-write thread waits
// FIRST_WRITE_DELAY_MS before each batch (NBD_TEST_FIRST_WRITE_DELAY_MS), so
// a create or delete, which drains the queued first writes, lasts about that
// long: the released writes are submitted while it runs. (Not in the first
// round of a test: with no snapshot yet nothing is queued.)
const FIRST_WRITE_DELAY_MS = '1000';
async function concurrentRounds(t: Test, which: 'create' | 'delete', seed: number): Promise<void> {
  if (!requireTools(t, ['python3-libnbd'])) return;
  t.comment(`seed ${seed}`);
  const rng = new Rng(seed);
  const size = 64 * MiB;
  const cs = 64 * KiB;
  const dir = makeTempDir('nbd-snapconc-');
  const image = sparseImage(dir, 'disk.img', size);
  const srv = await startServer({ dir, images: ['disk.img'], args: ['--chunk-size', '64K'], env: { NBD_TEST_FIRST_WRITE_DELAY_MS: FIRST_WRITE_DELAY_MS } });
  const py = new PyClient();
  t.teardown(async () => {
    await srv.stop('SIGKILL');
    await py.quit();
    removeDir(dir);
  });
  const model = new VolumeModel(size);
  const hs = ['L0', 'L1', 'L2'];
  for (const h of hs) if (!(await py.open(h, srv.uri('disk'))).ok) throw new Error('cannot connect');
  const snapH = new Map<string, string>();
  // Chunks never written so far (fresh for every snapshot), in random order.
  const fresh = Array.from({ length: size / cs }, (_, i) => i);
  for (let i = fresh.length - 1; i > 0; i--) {
    const j = rng.int(0, i);
    [fresh[i], fresh[j]] = [fresh[j]!, fresh[i]!];
  }
  const control = async (req: Record<string, unknown>) => {
    const r = await controlRequest(image, req);
    if (!r.ok) throw new Error(`control ${JSON.stringify(req)}: ${r.code} ${r.message}`);
  };
  const openSnap = async (name: string) => {
    const h = `S-${name}`;
    const r = await py.open(h, srv.uri(`disk@${name}`));
    if (!r.ok) throw new Error(`cannot open disk@${name} right after it was created: ${r.error}`);
    snapH.set(name, h);
  };
  let k = 0;
  const ROUNDS = 8;
  const problems: string[] = [];
  let concurrent = 0;
  let lateAcked = 0;
  for (let round = 1; round <= ROUNDS && problems.length === 0 && fresh.length >= 150; round++) {
    // Delete rounds keep one older snapshot (o1, taken first) as the neighbour
    // that receives handed-down chunks; the deleted one is the newest.
    const kind = which === 'delete' && round === 1 ? 'create' : which;
    const target = `${kind === 'create' ? (which === 'delete' ? 'o' : 't') : 'd'}${round}`;
    if (kind === 'delete') {
      // D is created with no write in flight (exact), then deleted under writes.
      await control({ op: 'snapshot-create', name: target });
      model.snapshot(target, `round ${round}`);
      await openSnap(target);
    }
    const ops: BurstOp[] = [];
    for (let i = 0; i < 120 && fresh.length; i++) {
      const c = fresh.pop()!;
      const len = rng.int(1, 8 * KiB);
      ops.push({ k: k++, t: 'w', off: c * cs + rng.int(0, cs - len), len, tag: `${seed}-c${round}-${i}` });
    }
    const sub = new Map<number, number>();
    const ack = new Map<number, number>();
    const errs: BurstEvent[] = [];
    let reqNs = 0;
    let repNs = 0;
    let opDone: Promise<void> | undefined;
    const startAfter = rng.int(1, 30);
    py.onEvent = (ev) => {
      if (ev.ev === 'sub') sub.set(ev.k, ev.ns);
      else if (ev.ev === 'ack') ack.set(ev.k, ev.ns);
      else errs.push(ev);
      if (!opDone && ack.size >= startAfter) {
        reqNs = monoNs();
        opDone = control({ op: kind === 'create' ? 'snapshot-create' : 'snapshot-delete', name: target }).then(() => {
          repNs = monoNs();
          py.send('stop');
        });
        py.send('go'); // the held writes: submitted after reqNs, while the operation runs
      }
    };
    const br = await py.request({ op: 'burst', hs, depth: 4, ops, hold: startAfter });
    py.onEvent = undefined;
    if (!opDone) throw new Error('the burst ended before the snapshot operation started');
    await opDone;
    if (!br.ok || errs.length) throw new Error(`burst failed: ${JSON.stringify(br)} ${JSON.stringify(errs.slice(0, 3))}`);
    const before = Buffer.from(model.live);
    const done = ops.filter((op) => ack.has(op.k));
    for (const op of ops) if (!sub.has(op.k)) fresh.push(Math.floor(op.off / cs));
    for (const op of done) model.write(op.off, dataFor(op.tag!, op.len));
    const during = done.filter((op) => ack.get(op.k)! > reqNs && sub.get(op.k)! < repNs).length;
    concurrent += during;
    if (kind === 'delete') {
      model.remove(target);
      await py.close(snapH.get(target)!);
      snapH.delete(target);
    } else {
      // Which writes did the new snapshot take? Each must be wholly in or out.
      await openSnap(target);
      const inT = new Map<number, boolean>();
      const snapData = Buffer.from(before);
      for (const op of done) {
        const got = await py.read(snapH.get(target)!, op.off, op.len);
        const neu = dataFor(op.tag!, op.len);
        if (got.equals(neu)) {
          inT.set(op.k, true);
          neu.copy(snapData, op.off);
        } else if (got.equals(before.subarray(op.off, op.off + op.len))) inT.set(op.k, false);
        else problems.push(`round ${round}: snapshot ${target} holds write #${op.k} (${op.len} bytes at ${op.off}) only in part: ${describeDiff(neu, got, op.off)}`);
      }
      for (const op of done) {
        const a = ack.get(op.k)!;
        const s = sub.get(op.k)!;
        if (a < reqNs && inT.get(op.k) === false)
          problems.push(`round ${round}: write #${op.k} at ${op.off} was acknowledged ${((reqNs - a) / 1e6).toFixed(3)} ms before snapshot-create ${target} was sent, but is not in it`);
        if (s > repNs && inT.get(op.k) === true)
          problems.push(`round ${round}: write #${op.k} at ${op.off} was submitted ${((s - repNs) / 1e6).toFixed(3)} ms after snapshot-create ${target} returned, but is in it`);
      }
      const inOps = done.filter((op) => inT.get(op.k) === true);
      const outOps = done.filter((op) => inT.get(op.k) === false);
      // Not an error (the snapshot is the point where its create drained
      // writes), but worth seeing: writes acknowledged before create returned
      // that it does not hold.
      lateAcked += outOps.filter((op) => ack.get(op.k)! < repNs).length;
      for (const w2 of inOps) {
        const w1 = outOps.find((op) => ack.get(op.k)! < sub.get(w2.k)!);
        if (w1) {
          problems.push(
            `round ${round}: snapshot ${target} is not one point in time: it holds write #${w2.k} (at ${w2.off}) but not write #${w1.k} (at ${w1.off}), ` +
              `which was acknowledged ${((sub.get(w2.k)! - ack.get(w1.k)!) / 1e6).toFixed(3)} ms before #${w2.k} was submitted`,
          );
          break;
        }
      }
      model.addSnapshot(target, snapData, `round ${round}`);
    }
    const candidates = model.candidates();
    const live = await compareExport(py, 'L0', model.live, model.crcs(), candidates);
    if (live) problems.push(`round ${round}: live export differs after ${kind} of ${target} with concurrent writes: ${live}`);
    const explain = (base: number, len: number) =>
      done
        .filter((op) => op.off < base + len && base < op.off + op.len)
        .map(
          (op) =>
            `write #${op.k} (${op.len} bytes at ${op.off}) touched this block: submitted ${((sub.get(op.k)! - reqNs) / 1e6).toFixed(2)} ms and ` +
            `acknowledged ${((ack.get(op.k)! - reqNs) / 1e6).toFixed(2)} ms after the ${kind} request was sent; the reply came at ${((repNs - reqNs) / 1e6).toFixed(2)} ms`,
        )
        .join('; ');
    for (const s of model.snaps) {
      const d = await compareExport(py, snapH.get(s.name)!, s.data, s.crcs, candidates, explain);
      if (d)
        problems.push(
          `round ${round}: snapshot ${s.name} differs from the model after snapshot ${kind} ${target} ran with ${during} writes ` +
            `(to chunks no snapshot held yet) in flight: ${d}`,
        );
    }
    t.comment(`round ${round}: ${kind} ${target}: ${done.length} writes, ${during} overlapping the operation`);
  }
  t.same(problems, [], `seed ${seed}: snapshots stay exact while snapshots are ${which}d under concurrent writes`);
  t.ok(concurrent > 0, `some writes overlapped the snapshot operations (${concurrent})`);
  if (which === 'create') t.comment(`${lateAcked} writes were acknowledged before their snapshot create returned, yet are not in it (they came after its cut)`);
  const list = await snapshotList(image);
  t.same(
    list.map((s) => s.name),
    model.names(),
    'snapshot list matches the model',
  );
}

t.test('writes concurrent with snapshot create: the snapshot is one point in time, older ones stay exact', (t) =>
  concurrentRounds(t, 'create', (SEED + 3) >>> 0),
);

t.test('writes concurrent with snapshot delete: every other snapshot stays exact', (t) =>
  concurrentRounds(t, 'delete', (SEED + 4) >>> 0),
);
