// A volume's jobs: one mechanism for every kind of long work (the rollback
// merge, src/rollback.ts; the backup, src/backup-job.ts; replication and
// clones next).
//
// Records. Every job is a record in the volume's manifest (`jobs`,
// JobRecord in src/volume-meta.ts): id, kind, volume, state (running /
// canceling / done / failed / canceled), a progress cursor, its owner
// (pid + host + process start time), created/updated times, the error that
// ended it, and its kind's params. The manifest is the one place, so a job
// record changes in the same atomic write (writeManifest: temp, fsync,
// rename, fsync of the directory) as whatever it goes with: the rollback's
// basedOn, a snapshot, nextJobId. Unfinished records stay until they end;
// the last KEEP_FINISHED finished ones are kept for `jobs IMAGE --all`.
// Ids (nextJobId) are volume-wide: a record is saved with nextJobId + 1 in
// the same write, so an id is never handed out twice.
//
// Crash order, common to every kind: a job exists from the manifest write
// that records it (state running); a kill leaves it running, and the next
// open that runs jobs (serve, `jobs IMAGE --wait`, an offline command that
// runs a job) resumes it: resume() takes the record over (owner = this
// process, saved) unless its owner is another live process on this host,
// then runs the kind's loop, which must be idempotent from any point after
// the record was written (each kind states how, at its top). A job ends with
// one manifest write that sets done / failed / canceled; a crash before it
// repeats the end at the next open. Cancel: the record is set canceling
// (durable) first, then the loop is aborted; a canceling record found at
// open is finished as canceled without running.
//
// The registry owns what is common to every kind:
//   - the runner: at most one background loop per kind at a time; start()
//     is idempotent; none starts once the registry is aborted;
//   - stopping: abort() (sync, at close) makes every loop return after its
//     current step; stop() also waits for them. Aborting is final: the
//     volume is closing, and the jobs resume at its next open;
//   - the listing (from the records, each kind adding live progress) and
//     waiting, and cancel (given to the kind).
// Each loop is a stepped loop in TypeScript checking the AbortSignal between
// steps (docs/architecture.md, "Threads and lifetime"). Record changes go
// through the volume's serial queue (Volume.serial, then save). Everything
// here runs on the main JS thread.
import * as fs from 'node:fs';
import * as os from 'node:os';
import { NbdError } from './errors';
import { FINISHED_JOB_STATES, type JobOwner, type JobRecord, type JobState, type Manifest } from './volume-meta';

export interface JobProgress {
  done: number;
  total: number;
  percent: number;
}

/** What every job reports (`jobs IMAGE --json`); each kind adds its own fields. */
export interface JobInfo extends JobProgress {
  id: number;
  /** The kind (same as kind; `type` is what version 1 of the listing called it). */
  type: string;
  kind: string;
  state: JobState;
  volume: string;
  startedAt: string;
  updatedAt: string;
  owner: JobOwner;
  /** The last step's error while the job retries, or what ended it. */
  error?: string;
  errorCode?: string;
}

/** One kind of job, as it registers with the volume's registry. */
export interface JobKind<I extends JobInfo = JobInfo> {
  /** JobRecord.kind (JobInfo.type) of its jobs. */
  readonly type: string;
  /** How `jobs` shows one of its records (with live progress while it runs). */
  describe(rec: JobRecord): I;
  /** At open: starts the loop of a job left unfinished, if it may run here (runner.start). */
  resume(): void;
  /** Its background loop: steps until no job of this kind is left or `signal` aborts. */
  run(signal: AbortSignal): Promise<void>;
  /** Cancels its unfinished job `rec`; resolves with the record as it ended. */
  cancel(rec: JobRecord): Promise<JobRecord>;
}

/** Finished records kept in the manifest (for `jobs IMAGE --all`). */
export const KEEP_FINISHED = 10;

/** Progress of `done` out of `total` units, percent to one decimal (nothing to do: 100). */
export function progress(done: number, total: number): JobProgress {
  return { done, total, percent: total ? Math.floor((1000 * done) / total) / 10 : 100 };
}

/** The id for the next job of the volume; save nextJobId + 1 with the job that takes it. */
export function nextJobId(m: Manifest): number {
  return m.nextJobId ?? 1;
}

export function isFinished(state: JobState): boolean {
  return FINISHED_JOB_STATES.includes(state);
}

/** Boot id + the process's start in clock ticks: with the PID, names one process of one boot. */
function processStart(pid: number): string | undefined {
  try {
    const stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
    // Field 22 (starttime), counted after the command name, which may hold spaces and parentheses.
    const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    const boot = fs.readFileSync('/proc/sys/kernel/random/boot_id', 'utf8').trim();
    return `${boot}/${fields[19]}`;
  } catch {
    return undefined;
  }
}

let self: JobOwner | undefined;
/** This process as a job owner. */
export function thisOwner(): JobOwner {
  self ??= { pid: process.pid, host: os.hostname(), start: processStart(process.pid) ?? '' };
  return self;
}

/**
 * Whether `o` is a live process other than this one, on this host: the same
 * PID with the same start time (a reused PID is not the owner). Owners on
 * other hosts cannot be checked; the volume lock (held by whoever runs jobs)
 * is what keeps two hosts apart.
 */
export function ownerAliveElsewhere(o: JobOwner): boolean {
  if (!o.pid || o.host !== os.hostname() || o.pid === process.pid) return false;
  const start = processStart(o.pid);
  return start !== undefined && start === o.start;
}

/** A new record of kind `kind` (running, owned by this process) and the manifest that holds it. */
export function addJob<P extends object>(m: Manifest, kind: string, volume: string, params: P, total = 0): { rec: JobRecord<P>; manifest: Manifest } {
  const id = nextJobId(m);
  const now = new Date().toISOString();
  const rec: JobRecord<P> = { id, kind, volume, state: 'running', cursor: { done: 0, total }, owner: thisOwner(), createdAt: now, updatedAt: now, params };
  return { rec, manifest: { ...m, nextJobId: id + 1, jobs: trimFinished([...(m.jobs ?? []), rec as unknown as JobRecord]) } };
}

/** `m` with record `rec` replaced (updatedAt set); finished records beyond KEEP_FINISHED dropped, oldest first. */
export function putJob(m: Manifest, rec: JobRecord<object>): Manifest {
  const r = { ...rec, updatedAt: new Date().toISOString() } as unknown as JobRecord;
  const jobs = (m.jobs ?? []).map((j) => (j.id === rec.id ? r : j));
  if (!jobs.some((j) => j.id === rec.id)) jobs.push(r);
  return { ...m, jobs: trimFinished(jobs) };
}

function trimFinished(jobs: JobRecord[]): JobRecord[] {
  const finished = jobs.filter((j) => isFinished(j.state));
  const drop = new Set(finished.slice(0, Math.max(0, finished.length - KEEP_FINISHED)).map((j) => j.id));
  return jobs.filter((j) => !drop.has(j.id));
}

/** The record with id `id`, or JOB_NOT_FOUND. */
export function jobRecord(m: Manifest, id: number, image: string): JobRecord {
  const r = m.jobs?.find((j) => j.id === id);
  if (!r) throw new NbdError('JOB_NOT_FOUND', `volume ${image} has no job ${id} (finished jobs are kept only for a while: node-nbd-server jobs ${image} --all)`);
  return r;
}

/** The unfinished records of `kind`. */
export function unfinished(m: Manifest, kind: string): JobRecord[] {
  return (m.jobs ?? []).filter((j) => j.kind === kind && !isFinished(j.state));
}

/** The common fields of a record's listing. */
export function baseInfo(rec: JobRecord, p: JobProgress = progress(rec.cursor.done, rec.cursor.total)): JobInfo {
  return {
    id: rec.id,
    type: rec.kind,
    kind: rec.kind,
    state: rec.state,
    volume: rec.volume,
    startedAt: rec.createdAt,
    updatedAt: rec.updatedAt,
    owner: rec.owner,
    ...p,
    ...(rec.error ? { error: rec.error.message, errorCode: rec.error.code } : {}),
  };
}

export class JobRegistry<I extends JobInfo = JobInfo> {
  private readonly kinds: JobKind<I>[] = [];
  /** The running loop of each kind, by type. */
  private readonly loops = new Map<string, Promise<void>>();
  private readonly aborter = new AbortController();

  constructor(private readonly manifest: () => Manifest) {}

  register(kind: JobKind<I>): void {
    this.kinds.push(kind);
  }

  /** True once the volume is closing: loops return after their current step. */
  get aborted(): boolean {
    return this.aborter.signal.aborted;
  }

  /** Starts `kind`'s background loop unless it runs already or the registry is aborted. */
  start(kind: JobKind<I>): void {
    if (this.loops.has(kind.type) || this.aborted) return;
    this.loops.set(kind.type, kind.run(this.aborter.signal).finally(() => this.loops.delete(kind.type)));
  }

  /** Whether `kind`'s loop runs. */
  running(kind: JobKind<I>): boolean {
    return this.loops.has(kind.type);
  }

  /** `kind`'s loop, if it runs. */
  loop(kind: JobKind<I>): Promise<void> | undefined {
    return this.loops.get(kind.type);
  }

  /** Resumes every kind's unfinished jobs (serving, or an offline command that runs them). */
  resume(): void {
    for (const k of this.kinds) k.resume();
  }

  private kindOf(rec: JobRecord): JobKind<I> | undefined {
    return this.kinds.find((k) => k.type === rec.kind);
  }

  /** Unfinished jobs of every kind (with `all`, also the last finished ones), oldest first. */
  list(opts: { all?: boolean } = {}): I[] {
    const out: I[] = [];
    for (const r of this.manifest().jobs ?? []) {
      if (!opts.all && isFinished(r.state)) continue;
      const k = this.kindOf(r);
      out.push(k ? k.describe(r) : (baseInfo(r) as I));
    }
    return out;
  }

  /** Cancels job `id` (JOB_NOT_FOUND; a finished job is returned as it is). */
  async cancel(id: number, image: string): Promise<I> {
    const rec = jobRecord(this.manifest(), id, image);
    const k = this.kindOf(rec);
    if (!k) throw new NbdError('BAD_ARGUMENT', `job ${id} is of kind ${rec.kind}, which this build does not know`);
    const done = isFinished(rec.state) ? rec : await k.cancel(rec);
    return k.describe(done);
  }

  /** Makes every loop return after its current step (they resume at the next open). */
  abort(): void {
    this.aborter.abort();
  }

  /** abort(), then waits for the loops to return. */
  async stop(): Promise<void> {
    this.abort();
    await Promise.all([...this.loops.values()]);
  }

  /**
   * Resolves when no job runs here: none is unfinished of a kind whose loop
   * runs (a record nobody runs, such as an interrupted backup during an
   * offline rollback, or one owned by another live process, is not waited
   * for). Calls onProgress about every `everyMs`.
   */
  async wait(onProgress?: (jobs: I[]) => void, everyMs = 200): Promise<void> {
    for (;;) {
      const j = this.list().filter((x) => this.loops.has(x.type));
      onProgress?.(j);
      if (j.length === 0) return;
      if (this.aborted) throw new NbdError('SERVER_CLOSED', 'the volume was closed before its jobs finished');
      await new Promise((r) => setTimeout(r, everyMs));
    }
  }
}
