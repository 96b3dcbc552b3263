// Rollback: a kind of job (src/jobs.ts, kind rollback-merge). Rolls the live volume back
// to a snapshot at once (live reads show the snapshot from the moment the
// job is active) and merges the snapshot's chunks into the live image in the
// background; every snapshot is kept. The native layer does the data path
// (native/core/merge_job.hh, RollbackDevice); this module owns the job's record
// (a JobRecord in the manifest's `jobs`, params RollbackParams; the merge
// file holds its real progress cursor), the merge loop and the history
// lines, in this order:
//
//   rollback: native writes the merge job file (pending set, synced) with
//           writes paused -> manifest records the job (state running, with
//           basedOn and nextJobId, and the replaced job's record set
//           canceled, in one write) -> native activates it
//           (live reads show the snapshot from here) -> writes resume ->
//           history line -> background merge (run() below) copies the
//           pending chunks, then finishMerge(): history line, the record
//           is set done in the manifest and the merge file removed. A crash before
//           the manifest leaves an orphan job file (removed at open) and the
//           volume as it was; after it, the next open resumes the job
//           (native/core/merge_job.hh). A rollback while a merge runs
//           replaces it; snapshot create and delete are refused until the
//           merge finishes (refuseWhileMerging).
//   history: a crash between the manifest and the rollback's history line
//           loses the line: reconcileHistory() appends it at the next open
//           from the manifest's record. The merge-finished line is appended
//           before the manifest drops the job: a crash between them finishes
//           the job again at the next open, which does not append it twice
//           (src/history.ts).
//
// At most one running rollback job per volume (runningRollback()). A merge
// cannot be canceled (live already shows the snapshot): `jobs cancel` is
// refused. A kill leaves the record running; the next open resumes it
// (Volume.prepare hands the merge file to the native layer; resume() takes
// the record over and starts the loop). Manifest
// changes run in the volume's serial queue (src/volume.ts), like snapshot
// create and delete; merge steps run outside it, on the runner's loop.
import * as fs from 'node:fs';
import * as os from 'node:os';
import { fromNative, NbdError } from './errors';
import { appendHistory, readHistory, type HistoryEntry } from './history';
import { addJob, baseInfo, progress, putJob, thisOwner, type JobInfo, type JobKind } from './jobs';
import type { NativeMergeStatus } from './native';
import type { Volume } from './volume';
import { rollbackJobPath, runningRollback, type JobRecord, type RollbackJob, type RollbackParams, type RollbackTrigger } from './volume-meta';

/** A running rollback merge, as `jobs IMAGE` shows it. */
export interface RollbackJobInfo extends JobInfo {
  type: 'rollback-merge';
  snapshot: string;
  snapshotId: number;
  trigger: string;
  by: string;
}

export interface RollbackResult extends RollbackJobInfo {
  /** From the request to the snapshot being visible on the live export. */
  visibleMs: number;
}

/** Who runs a command, for the history. */
export function commandTrigger(): RollbackTrigger {
  let user = 'unknown';
  try {
    user = os.userInfo().username;
  } catch {
    /* no passwd entry */
  }
  return { trigger: 'command', by: `${user}@${os.hostname()} pid ${process.pid}` };
}

/** Bytes merged per native step: one flush and one job commit each. */
const MERGE_STEP_BYTES = 64 * 1024 * 1024;

export class Rollbacks implements JobKind<RollbackJobInfo> {
  readonly type = 'rollback-merge';
  /** The last merge step's error, while the merge retries. */
  private mergeError?: string;

  constructor(
    private readonly v: Volume,
    /** Merge bandwidth limit, bytes/s (undefined: as fast as the disk goes). */
    private readonly mergeRate: number | undefined,
  ) {}

  /** Refuses `what` (snapshot create, delete) while a rollback merges. */
  refuseWhileMerging(what: string): void {
    const job = this.current();
    if (job) {
      throw new NbdError(
        'ROLLBACK_RUNNING',
        `cannot ${what} while the rollback to "${job.snapshot}" is merging (${job.percent}% done); ` +
          `wait for it: node-nbd-server jobs ${this.v.image} --wait`,
      );
    }
  }

  /**
   * Rolls the volume back to snapshot `name`: visible on the live export when
   * this resolves; the merge continues in the background.
   */
  to(name: string, who: RollbackTrigger): Promise<RollbackResult> {
    const v = this.v;
    return v.serial(async () => {
      const started = process.hrtime.bigint();
      const s = v.snapshot(name);
      if (v.readOnly) throw new NbdError('BAD_ARGUMENT', `${v.image} is served read-only: a rollback would write to it`);
      const info = v.snapshots.info(name);
      if (info.state === 'failed') {
        throw new NbdError('SNAPSHOT_FAILED', `snapshot "${name}" failed and cannot be rolled back to: ${info.failure?.reason ?? 'unknown reason'}`);
      }
      const prior = runningRollback(v.manifest);
      const params: RollbackParams = { snapshotId: s.id, ...who, ...(prior ? { replaced: v.nameOf(prior.snapshotId) } : {}) };
      let base = v.manifest;
      if (prior) {
        const pr = v.manifest.jobs!.find((j) => j.id === prior.jobId)!;
        base = putJob(base, { ...pr, state: 'canceled', error: { code: 'JOB_CANCELED', message: `replaced by the rollback to ${name}` } });
      }
      const added = addJob(base, this.type, v.image, params);
      const jobId = added.rec.id;
      const file = rollbackJobPath(v.image, jobId);
      fs.rmSync(file, { force: true });
      try {
        await v.native.prepareRollback(v.exportName, s.id, file); // writes are paused from here...
      } catch (err) {
        fs.rmSync(file, { force: true });
        throw fromNative(err);
      }
      const job: RollbackJob = { jobId, snapshotId: s.id, startedAt: added.rec.createdAt, ...who, ...(params.replaced ? { replaced: params.replaced } : {}) };
      try {
        v.save({ ...added.manifest, basedOn: { snapshotId: s.id, since: job.startedAt } });
      } catch (err) {
        v.native.abortRollback(v.exportName);
        fs.rmSync(file, { force: true });
        throw new NbdError('ROLLBACK_FAILED', `cannot record the rollback: ${(err as Error).message}`);
      }
      v.native.activateRollback(v.exportName); // ...to here; live reads show the snapshot
      const visibleMs = Number(process.hrtime.bigint() - started) / 1e6;
      if (prior) fs.rmSync(rollbackJobPath(v.image, prior.jobId), { force: true });
      const st = v.native.mergeStatus(v.exportName);
      this.recordRollback(job, st?.total ?? 0);
      v.log.info({ snapshot: name, id: s.id, trigger: who.trigger, by: who.by, chunks: st?.total, ms: visibleMs }, 'rolled back (merging in the background)');
      this.mergeError = undefined;
      v.jobs.start(this);
      const j = this.current();
      return { ...(j ?? this.describe({ ...added.rec, state: 'done', cursor: { done: st?.total ?? 0, total: st?.total ?? 0 } } as unknown as JobRecord)), visibleMs };
    });
  }

  /** The running rollback merge, if any. */
  current(): RollbackJobInfo | undefined {
    const job = runningRollback(this.v.manifest);
    if (!job) return undefined;
    return this.describe(this.v.manifest.jobs!.find((j) => j.id === job.jobId)!);
  }

  private status(): NativeMergeStatus | null {
    try {
      return this.v.native.mergeStatus(this.v.exportName);
    } catch {
      return null;
    }
  }

  resume(): void {
    const job = runningRollback(this.v.manifest);
    if (!job || this.v.readOnly || this.v.jobs.running(this)) return;
    this.v.log.info({ snapshot: this.v.nameOf(job.snapshotId) }, 'resuming an unfinished rollback merge');
    // Taken over: this process owns it now (the volume lock says nobody else can).
    const rec = this.v.manifest.jobs!.find((j) => j.id === job.jobId)!;
    const owner = thisOwner();
    if (rec.owner.pid !== owner.pid || rec.owner.start !== owner.start) {
      void this.v
        .serial(async () => {
          const r = this.v.manifest.jobs?.find((j) => j.id === job.jobId);
          if (r && r.state === 'running') this.v.save(putJob(this.v.manifest, { ...r, owner }));
        })
        .catch((err: Error) => this.v.log.warn({ err: err.message }, 'could not record the new owner of the rollback merge'));
    }
    this.v.jobs.start(this);
  }

  cancel(rec: JobRecord): Promise<JobRecord> {
    return Promise.reject(
      new NbdError('BAD_ARGUMENT', `job ${rec.id} is a rollback merge, which cannot be canceled: live already shows snapshot ${this.v.nameOf((rec.params as unknown as RollbackParams).snapshotId)}; roll back to another snapshot instead`),
    );
  }

  describe(rec: JobRecord): RollbackJobInfo {
    const p = rec.params as unknown as RollbackParams;
    const running = runningRollback(this.v.manifest)?.jobId === rec.id;
    const st = running ? this.status() : null;
    const prog = st ? progress(st.total - st.remaining, st.total) : progress(rec.cursor.done, rec.cursor.total);
    const base = baseInfo(rec, prog);
    return {
      ...base,
      type: 'rollback-merge',
      snapshot: this.v.nameOf(p.snapshotId),
      snapshotId: p.snapshotId,
      trigger: p.trigger,
      by: p.by,
      ...(running && this.mergeError ? { error: this.mergeError } : {}),
    };
  }

  /** The merge loop: one native step at a time until the job is finished or the volume closes. */
  async run(signal: AbortSignal): Promise<void> {
    const v = this.v;
    const cs = v.chunkSize;
    // A step is one native call: copy, flush, record progress. With a rate
    // limit, steps shrink to about a tenth of a second's worth and sleep off
    // what they ran ahead.
    const stepBytes = this.mergeRate ? Math.min(MERGE_STEP_BYTES, Math.max(cs, Math.floor(this.mergeRate / 10))) : MERGE_STEP_BYTES;
    const step = Math.max(1, Math.floor(stepBytes / cs));
    let from = 0;
    while (!signal.aborted) {
      const st = v.native.mergeStatus(v.exportName);
      if (!st) return;
      if (st.remaining === 0) {
        await v.serial(() => this.finishMerge());
        continue;
      }
      const began = Date.now();
      try {
        const r = await v.native.mergeStep(v.exportName, from, step);
        from = r.next >= r.chunks ? 0 : r.next;
        this.mergeError = undefined;
        if (this.mergeRate) {
          const merged = st.remaining - r.remaining;
          const due = (merged * cs * 1000) / this.mergeRate - (Date.now() - began);
          if (due > 0) await new Promise((res) => setTimeout(res, due));
        }
      } catch (err) {
        this.mergeError = (err as Error).message;
        v.log.error({ err: this.mergeError }, 'rollback merge step failed; retrying in 1 s');
        await new Promise((r) => setTimeout(r, 1000));
      }
    }
  }

  private async finishMerge(): Promise<void> {
    const v = this.v;
    const st = v.native.mergeStatus(v.exportName);
    const job = runningRollback(v.manifest);
    if (!st || st.remaining > 0 || !job) return;
    try {
      await v.native.finishRollback(v.exportName);
    } catch (err) {
      throw fromNative(err);
    }
    // History first, then the manifest: a crash between them finishes the
    // job again at the next open, which must not append a second entry.
    const ms = Date.now() - Date.parse(job.startedAt);
    let done = false;
    try {
      done = readHistory(v.image).some((e) => e.event === 'merge-finished' && e.jobId === job.jobId);
    } catch {
      done = false;
    }
    if (!done) {
      this.history({ at: new Date().toISOString(), event: 'merge-finished', jobId: job.jobId, snapshot: v.nameOf(job.snapshotId), snapshotId: job.snapshotId, chunks: st.total, ms });
    }
    const rec = v.manifest.jobs!.find((j) => j.id === job.jobId)!;
    v.save(putJob(v.manifest, { ...rec, state: 'done', cursor: { done: st.total, total: st.total } }));
    fs.rmSync(rollbackJobPath(v.image, job.jobId), { force: true });
    v.log.info({ snapshot: v.nameOf(job.snapshotId), chunks: st.total, ms }, 'rollback merge finished');
  }

  // ---- history ---------------------------------------------------------------

  private recordRollback(job: RollbackJob, chunks: number, recovered = false): void {
    this.history({
      at: job.startedAt,
      event: 'rollback',
      jobId: job.jobId,
      snapshot: this.v.nameOf(job.snapshotId),
      snapshotId: job.snapshotId,
      trigger: job.trigger,
      by: job.by,
      ...(job.replaced ? { replaced: job.replaced } : {}),
      chunks,
      ...(recovered ? { recovered } : {}),
    });
  }

  /** At open: the running job's history entry, if a crash lost it (see src/history.ts). */
  reconcileHistory(): void {
    const v = this.v;
    const job = runningRollback(v.manifest);
    if (!job) return;
    let entries: HistoryEntry[];
    try {
      entries = readHistory(v.image);
    } catch (err) {
      v.log.error({ err: (err as Error).message }, 'cannot read the volume history');
      return;
    }
    if (entries.some((e) => e.event === 'rollback' && e.jobId === job.jobId)) return;
    const st = v.native.mergeStatus(v.exportName);
    v.log.warn({ jobId: job.jobId }, 'the history lacked the running rollback (a crash interrupted it): recording it now');
    this.recordRollback(job, st?.total ?? 0, true);
  }

  private history(e: Parameters<typeof appendHistory>[1]): void {
    try {
      appendHistory(this.v.image, e);
    } catch (err) {
      this.v.log.error({ err, entry: e }, 'could not append to the volume history');
    }
  }
}
