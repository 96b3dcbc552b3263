// A volume's background jobs: a small registry that every kind of long job
// registers with (today one kind, the rollback merge, src/rollback.ts;
// backup, replication and clones will be more). A job is recorded in the
// volume's manifest while it runs, so it survives a restart; its work is a
// stepped loop in TypeScript, each step one bounded native call, checking the
// registry's AbortSignal between steps (docs/architecture.md, "Threads and
// lifetime"). The registry owns only what is common to every kind:
//   - the runner: at most one background loop per kind at a time; a loop
//     started while one runs is not started twice (start() is idempotent);
//     none starts once the registry is aborted;
//   - stopping: abort() (sync, at close) makes every loop return after its
//     current step; stop() also waits for them. Aborting is final: the
//     volume is closing, and the jobs resume at its next open (resume());
//   - the listing and waiting: list() asks each kind for its running jobs,
//     wait() polls until none is left.
// What a job records, its crash order and its progress belong to its kind.
// Job ids (the manifest's nextJobId) are volume-wide, shared by every kind;
// a kind saves the incremented nextJobId in the same manifest write as the
// job that takes the id, so an id is never handed out twice.
// Everything here runs on the main JS thread.
import { NbdError } from './errors';
import type { Manifest } from './volume-meta';

export interface JobProgress {
  done: number;
  total: number;
  percent: number;
}

/** What every running job reports (`jobs IMAGE --json`); each kind adds its own fields. */
export interface JobInfo extends JobProgress {
  type: string;
  volume: string;
  startedAt: string;
  /** The last step's error, if the job is retrying. */
  error?: string;
}

/** One kind of job, as it registers with the volume's registry. */
export interface JobKind<I extends JobInfo = JobInfo> {
  /** JobInfo.type of its jobs. */
  readonly type: string;
  /** Its running jobs (as the manifest records them), with their progress. */
  list(): I[];
  /** At open: starts the loop of a job left unfinished, if it may run here (runner.start). */
  resume(): void;
  /** Its background loop: steps until no job of this kind is left or `signal` aborts. */
  run(signal: AbortSignal): Promise<void>;
}

/** Progress of `done` out of `total` units, percent to one decimal (nothing to do: 100). */
export function progress(done: number, total: number): JobProgress {
  return { done, total, percent: total ? Math.floor((1000 * done) / total) / 10 : 100 };
}

/** The id for the next job of the volume; save nextJobId + 1 with the job that takes it. */
export function nextJobId(m: Manifest): number {
  return m.nextJobId ?? 1;
}

export class JobRegistry<I extends JobInfo = JobInfo> {
  private readonly kinds: JobKind<I>[] = [];
  /** The running loop of each kind, by type. */
  private readonly loops = new Map<string, Promise<void>>();
  private readonly aborter = new AbortController();

  register(kind: JobKind<I>): void {
    this.kinds.push(kind);
  }

  /** True once the volume is closing: loops return after their current step. */
  private get aborted(): boolean {
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

  /** Resumes every kind's unfinished jobs (serving, or an offline command that waits for them). */
  resume(): void {
    for (const k of this.kinds) k.resume();
  }

  /** Running jobs of every kind. */
  list(): I[] {
    return this.kinds.flatMap((k) => k.list());
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

  /** Resolves when no job runs; calls onProgress about every `everyMs`. */
  async wait(onProgress?: (jobs: I[]) => void, everyMs = 200): Promise<void> {
    for (;;) {
      const j = this.list();
      onProgress?.(j);
      if (j.length === 0) return;
      if (this.aborted) throw new NbdError('SERVER_CLOSED', 'the volume was closed before its jobs finished');
      await new Promise((r) => setTimeout(r, everyMs));
    }
  }
}
