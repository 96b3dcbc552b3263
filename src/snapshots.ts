// Snapshots of one served volume: create, list, info, delete. The native
// layer does the data path (copy-on-write, hand-down); this module owns the
// names, the manifest and the order of steps that keeps a crash harmless:
//
//   create: native creates the store files -> native pauses writes, applies
//           every queued first write and flushes the volume -> manifest
//           lists the snapshot -> native adds it to the chain and resumes
//           writes -> export added. A crash before the manifest leaves
//           orphan files (removed at open) and older snapshots untouched,
//           since nothing was preserved into the new store; a crash after it
//           leaves the snapshot listed, and loaded as the newest at restart,
//           showing the volume as it was at the crash (writes were paused
//           and the journal empty then, so no replay can add an older write
//           to it: it holds a prefix of the acknowledged writes).
//   delete: bulk hand-down with writes flowing -> export removed -> with
//           writes paused: final hand-down of chunks preserved meanwhile,
//           dropped from the chain, manifest written -> writes resume -> files
//           removed. No write can preserve into the snapshot between its last
//           hand-down and the manifest, so a crash leaves it listed and intact
//           or gone with every chunk an older snapshot read through it
//           handed down (to the nearest older healthy snapshot lacking it,
//           past failed ones: CowDevice::hand_down).
//   rollback: native writes the merge job file (pending set, synced) with
//           writes paused -> manifest records the job -> native activates it
//           (live reads show the snapshot from here) -> writes resume ->
//           history line -> background merge (runMerge below) copies the
//           pending chunks, then the job is dropped from the manifest and its
//           file removed. A crash before the manifest leaves an orphan job
//           file (removed at open) and the volume as it was; after it, the
//           next open resumes the job (native/core/merge_job.hh). A rollback
//           while a merge runs replaces it; snapshot create and delete are
//           refused until the merge finishes.
import * as fs from 'node:fs';
import * as os from 'node:os';
import { crashPoint } from './crash-point';
import { fromNative, NbdError } from './errors';
import { orphanJournals } from './journals';
import { appendHistory, readHistory, type HistoryEntry } from './history';
import type { Logger } from './logger';
import type { NativeFirstWrites, NativeMergeStatus, NativeServer, NativeSnapshotStatus } from './native';
import {
  AUTO_ROLLBACK_POLICIES,
  lockVolume,
  newManifest,
  readManifest,
  removeOrphans,
  rollbackJobPath,
  snapshotPaths,
  validateSnapshotName,
  writeManifest,
  type AutoRollbackPolicy,
  type Manifest,
  type RollbackJob,
  type RollbackTrigger,
  type SnapshotRecord,
} from './volume-meta';

export interface SnapshotInfo extends Omit<SnapshotRecord, 'autoRollback'> {
  export: string;
  preservedChunks?: number;
  preservedBytes?: number;
  chunkSize: number;
  autoRollback: AutoRollbackPolicy | 'off';
  /** Snapshot -> volume: the image this snapshot belongs to. */
  volume: string;
  /** Volumes whose content was last rolled back to this snapshot. */
  basisOf: string[];
  /** Present while a rollback to this snapshot is merging. */
  merge?: MergeProgress;
}

export interface MergeProgress {
  done: number;
  total: number;
  percent: number;
}

/** A running background job of a volume (today: rollback merges). */
export interface JobInfo extends MergeProgress {
  type: 'rollback-merge';
  volume: string;
  snapshot: string;
  snapshotId: number;
  startedAt: string;
  trigger: string;
  by: string;
  /** The last merge error, if the merge is retrying. */
  error?: string;
}

export interface RollbackResult extends JobInfo {
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

export function parseAutoRollback(text: string): AutoRollbackPolicy | 'off' {
  if (text === 'off' || (AUTO_ROLLBACK_POLICIES as readonly string[]).includes(text)) return text as AutoRollbackPolicy | 'off';
  throw new NbdError('BAD_ARGUMENT', `unknown auto-rollback policy "${text}": use ${AUTO_ROLLBACK_POLICIES.join(', ')} or off`);
}

/** Chunks handed down per native call when deleting (bounded work per step). */
const HAND_DOWN_STEP = 16384;
/** Bytes merged per native step: one flush and one job commit each. */
const MERGE_STEP_BYTES = 64 * 1024 * 1024;

export class VolumeSnapshots {
  private manifest: Manifest;
  private unlock: () => void;
  private queue: Promise<unknown> = Promise.resolve();
  private mergeLoop?: Promise<void>;
  private stopping = false;
  private mergeError?: string;
  /** Served read-only: a rollback would have to write, so it is refused. */
  private readOnly = false;
  /** Merge bandwidth limit, bytes/s (undefined: as fast as the disk goes). */
  private mergeRate?: number;
  /** Set while a manifest recording a snapshot failure could not be written. */
  private failureRetry?: NodeJS.Timeout;

  private constructor(
    private readonly native: NativeServer,
    readonly image: string,
    readonly exportName: string,
    manifest: Manifest,
    unlock: () => void,
    private readonly log: Logger,
  ) {
    this.manifest = manifest;
    this.unlock = unlock;
  }

  /**
   * Locks the volume, reads (or starts) its manifest and cleans orphans.
   * Returns the settings addExport needs; call attach() once the export exists.
   */
  static prepare(image: string, size: number, chunkSize: number | undefined, log: Logger, readOnly = false) {
    const unlock = lockVolume(image);
    try {
      let m = readManifest(image);
      if (!m) m = newManifest(size, chunkSize);
      else if (m.size !== size) {
        throw new NbdError('METADATA_CORRUPT', `${image} is ${size} bytes but its snapshots were taken at ${m.size} bytes`);
      }
      // A read-only open changes nothing: orphans wait for a read-write one.
      const orphans = readOnly ? [] : removeOrphans(image, m);
      if (orphans.length) log.warn({ image, files: orphans }, 'removed orphan snapshot files left by an interrupted operation');
      const snapshots = m.snapshots.map((s) => ({
        id: s.id,
        ...snapshotPaths(image, s.id),
        ...(s.state === 'failed' ? { failure: s.failure?.reason ?? 'recorded as failed in the manifest' } : {}),
      }));
      const rollbackJob = m.rollback ? rollbackJobPath(image, m.rollback.jobId) : undefined;
      return { manifest: m, unlock, chunkSize: m.chunkSize, snapshots, rollbackJob };
    } catch (err) {
      unlock();
      throw err;
    }
  }

  static attach(
    native: NativeServer,
    image: string,
    exportName: string,
    prepared: ReturnType<typeof VolumeSnapshots.prepare>,
    log: Logger,
    opts: { readOnly?: boolean; mergeRate?: number } = {},
  ) {
    const v = new VolumeSnapshots(native, image, exportName, prepared.manifest, prepared.unlock, log.child({ volume: exportName }));
    v.readOnly = opts.readOnly ?? false;
    v.mergeRate = opts.mergeRate;
    v.armHold();
    v.reconcileHistory();
    for (const s of v.manifest.snapshots) v.exportView(s);
    return v;
  }

  /** Arms the native admission hold while a snapshot carries the on-disconnect policy. */
  private armHold(): void {
    try {
      this.native.setDisconnectHold(this.exportName, !this.readOnly && !!this.policySnapshot('on-disconnect'));
    } catch (err) {
      this.log.warn({ err: (err as Error).message }, 'cannot arm the on-disconnect hold');
    }
  }

  /** Resumes an unfinished rollback merge (serving, or an offline command that waits for it). */
  resumeJobs(): void {
    if (!this.manifest.rollback || this.readOnly || this.mergeLoop) return;
    this.log.info({ snapshot: this.nameOf(this.manifest.rollback.snapshotId) }, 'resuming an unfinished rollback merge');
    this.kickMerge();
  }

  get chunkSize(): number {
    return this.manifest.chunkSize;
  }

  close(): void {
    this.stopping = true;
    if (this.failureRetry) this.retryManifest(); // a last try while the volume is still ours
    clearInterval(this.failureRetry);
    this.unlock();
  }

  /** Retries writing a manifest that records a failure (see recordFailure); a successful save ends the retries. */
  private retryManifest(): void {
    try {
      this.save(this.manifest);
      this.log.info('the snapshot failure is recorded in the manifest now');
    } catch (err) {
      this.log.error({ err }, 'still cannot write the manifest recording a snapshot failure');
    }
  }

  /** Stops the background merge after its current step (it resumes at the next open). */
  async stopJobs(): Promise<void> {
    this.stopping = true;
    await this.mergeLoop;
  }

  /** Serialises control operations on this volume. */
  private serial<T>(fn: () => Promise<T>): Promise<T> {
    const next = this.queue.then(fn, fn);
    this.queue = next.catch(() => undefined);
    return next;
  }

  private viewName(s: SnapshotRecord): string {
    return `${this.exportName}@${s.name}`;
  }

  private exportView(s: SnapshotRecord): void {
    try {
      this.native.addSnapshotExport(this.exportName, s.id, this.viewName(s), `snapshot ${s.name} of ${this.exportName}`);
    } catch (err) {
      throw fromNative(err);
    }
  }

  private find(name: string): SnapshotRecord {
    const s = this.manifest.snapshots.find((x) => x.name === name);
    if (!s) throw new NbdError('SNAPSHOT_NOT_FOUND', `volume ${this.image} has no snapshot named "${name}"`);
    return s;
  }

  private save(m: Manifest): void {
    writeManifest(this.image, m);
    this.manifest = m;
    // Every manifest derives from this.manifest, so it records any failure
    // an earlier write could not (recordFailure): no more retries needed.
    clearInterval(this.failureRetry);
    this.failureRetry = undefined;
    this.armHold(); // the policy may have changed (set, create, delete)
  }

  /** Resolves with the snapshot, and how long writes were paused for it (pausedMs). */
  create(name: string, opts: { autoRollback?: AutoRollbackPolicy | 'off' } = {}): Promise<SnapshotInfo & { pausedMs?: number }> {
    validateSnapshotName(name);
    return this.serial(async () => {
      this.refuseWhileMerging('create a snapshot');
      if (this.manifest.snapshots.some((s) => s.name === name)) {
        throw new NbdError('SNAPSHOT_EXISTS', `volume ${this.image} already has a snapshot named "${name}"`);
      }
      const policy = opts.autoRollback && opts.autoRollback !== 'off' ? opts.autoRollback : undefined;
      if (policy) this.refusePolicyConflict(undefined);
      const id = this.manifest.nextId;
      const files = snapshotPaths(this.image, id);
      const started = process.hrtime.bigint();
      const removeFiles = () => {
        for (const f of Object.values(files)) fs.rmSync(f, { force: true });
      };
      try {
        await this.native.prepareSnapshot(this.exportName, { id, ...files });
      } catch (err) {
        removeFiles();
        throw fromNative(err);
      }
      crashPoint('snapshot.create.prepared');
      // Writes pause and every queued first write reaches the image before
      // the manifest lists the snapshot: a crash after the manifest write
      // never replays a write queued under the old chain into it.
      try {
        await this.native.beginSnapshot(this.exportName); // writes are paused from here...
      } catch (err) {
        this.native.discardSnapshot(id);
        removeFiles();
        throw fromNative(err);
      }
      const rec: SnapshotRecord = { id, name, createdAt: new Date().toISOString(), state: 'active', ...(policy ? { autoRollback: policy } : {}) };
      try {
        this.save({ ...this.manifest, nextId: id + 1, snapshots: [...this.manifest.snapshots, rec] });
      } catch (err) {
        this.native.resumeWrites(this.exportName);
        this.native.discardSnapshot(id);
        removeFiles();
        throw new NbdError('SNAPSHOT_CREATE_FAILED', `cannot record the snapshot: ${(err as Error).message}`);
      }
      crashPoint('snapshot.create.manifest');
      this.native.addSnapshot(this.exportName, id); // ...to here: the snapshot is in the chain
      this.exportView(rec);
      const ms = Number(process.hrtime.bigint() - started) / 1e6;
      const pausedMs = this.firstWrites()?.lastPauseMs;
      this.log.info({ snapshot: name, id, ms, pausedMs }, 'snapshot created');
      return { ...this.describe(rec), pausedMs };
    });
  }

  delete(name: string, onProgress?: (done: number, total: number) => void): Promise<void> {
    return this.serial(async () => {
      const s = this.find(name);
      this.refuseWhileMerging('delete a snapshot');
      let from = 0;
      for (;;) {
        let r;
        try {
          r = await this.native.handDown(this.exportName, s.id, from, HAND_DOWN_STEP);
        } catch (err) {
          throw fromNative(err);
        }
        onProgress?.(r.next, r.total);
        if (r.next >= r.total) break;
        from = r.next;
      }
      this.native.removeExport(this.viewName(s));
      try {
        await this.native.removeSnapshot(this.exportName, s.id); // writes are paused from here...
        crashPoint('snapshot.delete.removed');
        const { basedOn, ...m } = this.manifest;
        const keepBasis = basedOn && basedOn.snapshotId !== s.id ? { basedOn } : {};
        // Recorded first, then out of the chain: if the manifest cannot be
        // written (disk full), the snapshot stays in the chain and exact.
        try {
          this.save({ ...m, ...keepBasis, snapshots: this.manifest.snapshots.filter((x) => x.id !== s.id) });
        } catch (err) {
          throw new NbdError('SNAPSHOT_DELETE_FAILED', `cannot record the deletion (the snapshot stays, exact): ${(err as Error).message}`);
        }
        crashPoint('snapshot.delete.manifest');
        this.native.dropSnapshot(this.exportName, s.id);
        crashPoint('snapshot.delete.dropped');
      } catch (err) {
        if (this.manifest.snapshots.some((x) => x.id === s.id)) this.exportView(s);
        throw fromNative(err);
      } finally {
        this.native.resumeWrites(this.exportName); // ...to here
      }
      for (const f of Object.values(snapshotPaths(this.image, s.id))) fs.rmSync(f, { force: true });
      this.log.info({ snapshot: name, id: s.id }, 'snapshot deleted');
    });
  }

  list(): SnapshotInfo[] {
    const state = this.liveState();
    return this.manifest.snapshots.map((s) => this.describe(s, state));
  }

  info(name: string): SnapshotInfo {
    return this.describe(this.find(name));
  }

  /** Called for native 'snapshot-failed' events: records the failure durably. */
  recordFailure(id: number, reason: string, atMs?: number): void {
    const s = this.manifest.snapshots.find((x) => x.id === id);
    if (!s || s.state === 'failed') return;
    const at = new Date(atMs || Date.now()).toISOString();
    const failed: SnapshotRecord = { ...s, state: 'failed', failure: { reason, at } };
    this.log.error({ snapshot: s.name, id, reason }, 'snapshot failed: it no longer preserves data');
    try {
      this.save({ ...this.manifest, snapshots: this.manifest.snapshots.map((x) => (x.id === id ? failed : x)) });
    } catch (err) {
      // The store's own failure marker may not have been written either (the
      // device that failed holds both): keep trying, so that the failure is
      // recorded once the device works again, before a restart could serve
      // the inexact snapshot as data. Any other manifest write records it too.
      this.manifest = { ...this.manifest, snapshots: this.manifest.snapshots.map((x) => (x.id === id ? failed : x)) };
      this.log.error({ err }, 'could not write the manifest after a snapshot failure; retrying every 2 s');
      this.failureRetry ??= setInterval(() => this.retryManifest(), 2000).unref();
    }
  }

  // ---- rollback ------------------------------------------------------------

  private nameOf(id: number): string {
    return this.manifest.snapshots.find((x) => x.id === id)?.name ?? `#${id}`;
  }

  private refuseWhileMerging(what: string): void {
    const job = this.jobs()[0];
    if (job) {
      throw new NbdError(
        'ROLLBACK_RUNNING',
        `cannot ${what} while the rollback to "${job.snapshot}" is merging (${job.percent}% done); ` +
          `wait for it: node-nbd-server jobs ${this.image} --wait`,
      );
    }
  }

  private refusePolicyConflict(exceptId: number | undefined): void {
    const other = this.manifest.snapshots.find((x) => x.autoRollback && x.id !== exceptId);
    if (other) {
      throw new NbdError(
        'AUTO_ROLLBACK_CONFLICT',
        `snapshot "${other.name}" already carries auto-rollback=${other.autoRollback}; at most one snapshot per volume can: ` +
          `node-nbd-server snapshot set ${this.image} ${other.name} auto-rollback=off`,
      );
    }
  }

  /**
   * Rolls the volume back to snapshot `name`: visible on the live export when
   * this resolves; the merge continues in the background.
   */
  rollback(name: string, who: RollbackTrigger): Promise<RollbackResult> {
    return this.serial(async () => {
      const started = process.hrtime.bigint();
      const s = this.find(name);
      if (this.readOnly) throw new NbdError('BAD_ARGUMENT', `${this.image} is served read-only: a rollback would write to it`);
      const info = this.describe(s);
      if (info.state === 'failed') {
        throw new NbdError('SNAPSHOT_FAILED', `snapshot "${name}" failed and cannot be rolled back to: ${info.failure?.reason ?? 'unknown reason'}`);
      }
      const prior = this.manifest.rollback;
      const jobId = this.manifest.nextJobId ?? 1;
      const file = rollbackJobPath(this.image, jobId);
      fs.rmSync(file, { force: true });
      try {
        await this.native.prepareRollback(this.exportName, s.id, file); // writes are paused from here...
      } catch (err) {
        fs.rmSync(file, { force: true });
        throw fromNative(err);
      }
      const job: RollbackJob = {
        jobId,
        snapshotId: s.id,
        startedAt: new Date().toISOString(),
        ...who,
        ...(prior ? { replaced: this.nameOf(prior.snapshotId) } : {}),
      };
      try {
        this.save({ ...this.manifest, rollback: job, basedOn: { snapshotId: s.id, since: job.startedAt }, nextJobId: jobId + 1 });
      } catch (err) {
        this.native.abortRollback(this.exportName);
        fs.rmSync(file, { force: true });
        throw new NbdError('ROLLBACK_FAILED', `cannot record the rollback: ${(err as Error).message}`);
      }
      this.native.activateRollback(this.exportName); // ...to here; live reads show the snapshot
      const visibleMs = Number(process.hrtime.bigint() - started) / 1e6;
      if (prior) fs.rmSync(rollbackJobPath(this.image, prior.jobId), { force: true });
      const st = this.native.mergeStatus(this.exportName);
      this.recordRollback(job, st?.total ?? 0);
      this.log.info({ snapshot: name, id: s.id, trigger: who.trigger, by: who.by, chunks: st?.total, ms: visibleMs }, 'rolled back (merging in the background)');
      this.mergeError = undefined;
      this.kickMerge();
      const j = this.jobs()[0];
      return { ...(j ?? this.jobOf(job, st)), visibleMs };
    });
  }

  private recordRollback(job: RollbackJob, chunks: number, recovered = false): void {
    this.history({
      at: job.startedAt,
      event: 'rollback',
      jobId: job.jobId,
      snapshot: this.nameOf(job.snapshotId),
      snapshotId: job.snapshotId,
      trigger: job.trigger,
      by: job.by,
      ...(job.replaced ? { replaced: job.replaced } : {}),
      chunks,
      ...(recovered ? { recovered } : {}),
    });
  }

  /** At open: the running job's history entry, if a crash lost it (see src/history.ts). */
  private reconcileHistory(): void {
    const job = this.manifest.rollback;
    if (!job) return;
    let entries: HistoryEntry[];
    try {
      entries = readHistory(this.image);
    } catch (err) {
      this.log.error({ err: (err as Error).message }, 'cannot read the volume history');
      return;
    }
    if (entries.some((e) => e.event === 'rollback' && e.jobId === job.jobId)) return;
    const st = this.native.mergeStatus(this.exportName);
    this.log.warn({ jobId: job.jobId }, 'the history lacked the running rollback (a crash interrupted it): recording it now');
    this.recordRollback(job, st?.total ?? 0, true);
  }

  private history(e: Parameters<typeof appendHistory>[1]): void {
    try {
      appendHistory(this.image, e);
    } catch (err) {
      this.log.error({ err, entry: e }, 'could not append to the volume history');
    }
  }

  private jobOf(job: RollbackJob, st: NativeMergeStatus | null): JobInfo {
    const total = st?.total ?? 0;
    const done = st ? st.total - st.remaining : 0;
    return {
      type: 'rollback-merge',
      volume: this.image,
      snapshot: this.nameOf(job.snapshotId),
      snapshotId: job.snapshotId,
      startedAt: job.startedAt,
      trigger: job.trigger,
      by: job.by,
      done,
      total,
      percent: total ? Math.floor((1000 * done) / total) / 10 : 100,
      ...(this.mergeError ? { error: this.mergeError } : {}),
    };
  }

  /** Running jobs: the rollback merge, if one runs. */
  jobs(): JobInfo[] {
    const job = this.manifest.rollback;
    if (!job) return [];
    let st: NativeMergeStatus | null = null;
    try {
      st = this.native.mergeStatus(this.exportName);
    } catch {
      st = null;
    }
    return [this.jobOf(job, st)];
  }

  /** Resolves when no job runs; calls onProgress about every `everyMs`. */
  async waitJobs(onProgress?: (jobs: JobInfo[]) => void, everyMs = 200): Promise<void> {
    for (;;) {
      const j = this.jobs();
      onProgress?.(j);
      if (j.length === 0) return;
      if (this.stopping) throw new NbdError('SERVER_CLOSED', 'the volume was closed before its jobs finished');
      await new Promise((r) => setTimeout(r, everyMs));
    }
  }

  private kickMerge(): void {
    if (this.mergeLoop || this.stopping) return;
    this.mergeLoop = this.runMerge().finally(() => {
      this.mergeLoop = undefined;
    });
  }

  private async runMerge(): Promise<void> {
    const cs = this.manifest.chunkSize;
    // A step is one native call: copy, flush, record progress. With a rate
    // limit, steps shrink to about a tenth of a second's worth and sleep off
    // what they ran ahead.
    const stepBytes = this.mergeRate ? Math.min(MERGE_STEP_BYTES, Math.max(cs, Math.floor(this.mergeRate / 10))) : MERGE_STEP_BYTES;
    const step = Math.max(1, Math.floor(stepBytes / cs));
    let from = 0;
    while (!this.stopping) {
      const st = this.native.mergeStatus(this.exportName);
      if (!st) return;
      if (st.remaining === 0) {
        await this.serial(() => this.finishMerge());
        continue;
      }
      const began = Date.now();
      try {
        const r = await this.native.mergeStep(this.exportName, from, step);
        from = r.next >= r.chunks ? 0 : r.next;
        this.mergeError = undefined;
        if (this.mergeRate) {
          const merged = st.remaining - r.remaining;
          const due = (merged * cs * 1000) / this.mergeRate - (Date.now() - began);
          if (due > 0) await new Promise((res) => setTimeout(res, due));
        }
      } catch (err) {
        this.mergeError = (err as Error).message;
        this.log.error({ err: this.mergeError }, 'rollback merge step failed; retrying in 1 s');
        await new Promise((r) => setTimeout(r, 1000));
      }
    }
  }

  private async finishMerge(): Promise<void> {
    const st = this.native.mergeStatus(this.exportName);
    const job = this.manifest.rollback;
    if (!st || st.remaining > 0 || !job) return;
    try {
      await this.native.finishRollback(this.exportName);
    } catch (err) {
      throw fromNative(err);
    }
    // History first, then the manifest: a crash between them finishes the
    // job again at the next open, which must not append a second entry.
    const ms = Date.now() - Date.parse(job.startedAt);
    let done = false;
    try {
      done = readHistory(this.image).some((e) => e.event === 'merge-finished' && e.jobId === job.jobId);
    } catch {
      done = false;
    }
    if (!done) {
      this.history({ at: new Date().toISOString(), event: 'merge-finished', jobId: job.jobId, snapshot: this.nameOf(job.snapshotId), snapshotId: job.snapshotId, chunks: st.total, ms });
    }
    const { rollback: _done, ...rest } = this.manifest;
    this.save(rest);
    fs.rmSync(rollbackJobPath(this.image, job.jobId), { force: true });
    this.log.info({ snapshot: this.nameOf(job.snapshotId), chunks: st.total, ms }, 'rollback merge finished');
  }

  // ---- auto-rollback policy ---------------------------------------------------

  setAutoRollback(name: string, policy: AutoRollbackPolicy | 'off'): Promise<SnapshotInfo> {
    return this.serial(async () => {
      const s = this.find(name);
      if (policy !== 'off') {
        this.refusePolicyConflict(s.id);
        if (this.describe(s).state === 'failed') {
          throw new NbdError('SNAPSHOT_FAILED', `snapshot "${name}" failed and cannot carry an auto-rollback policy: ${s.failure?.reason ?? ''}`);
        }
      }
      const next: SnapshotRecord = { ...s };
      if (policy === 'off') delete next.autoRollback;
      else next.autoRollback = policy;
      this.save({ ...this.manifest, snapshots: this.manifest.snapshots.map((x) => (x.id === s.id ? next : x)) });
      this.log.info({ snapshot: name, autoRollback: policy }, 'auto-rollback policy set');
      return this.describe(next);
    });
  }

  getAutoRollback(name: string): AutoRollbackPolicy | 'off' {
    return this.find(name).autoRollback ?? 'off';
  }

  /** The snapshot carrying `policy`, if any. */
  policySnapshot(policy: AutoRollbackPolicy): string | undefined {
    return this.manifest.snapshots.find((x) => x.autoRollback === policy)?.name;
  }

  /** Runs the volume's auto-rollback for `policy`, if a snapshot carries it. */
  async applyPolicy(policy: AutoRollbackPolicy): Promise<RollbackResult | undefined> {
    const name = this.policySnapshot(policy);
    if (!name) return undefined;
    return this.rollback(name, { trigger: `policy:${policy}`, by: `snapshot ${name}` });
  }

  /** Waits until first writes queued so far have been preserved and applied. */
  async settle(): Promise<void> {
    await this.native.settle(this.exportName);
  }

  /** How first writes after a snapshot are handled (native first_write_queue.hh). */
  firstWrites(): NativeFirstWrites | undefined {
    try {
      return this.native.firstWrites(this.exportName);
    } catch {
      return undefined;
    }
  }

  /** Volume -> snapshot mapping and the volume's state. */
  volumeInfo() {
    const based = this.manifest.basedOn;
    const policy = this.manifest.snapshots.find((x) => x.autoRollback);
    return {
      volume: this.image,
      export: this.exportName,
      size: this.manifest.size,
      chunkSize: this.manifest.chunkSize,
      snapshots: this.manifest.snapshots.length,
      basedOn: based ? { snapshot: this.nameOf(based.snapshotId), snapshotId: based.snapshotId, since: based.since } : null,
      autoRollback: policy ? { snapshot: policy.name, policy: policy.autoRollback } : null,
      jobs: this.jobs(),
      firstWrites: this.firstWrites(),
      /** Journal files in the journal directory that no volume names (src/journals.ts). */
      orphanJournals: orphanJournals(),
    };
  }

  /** The native state every describe() needs, fetched once per call (status counts each bitmap). */
  private liveState(): { status: NativeSnapshotStatus[]; job: JobInfo | undefined } {
    let status: NativeSnapshotStatus[] = [];
    try {
      status = this.native.snapshotStatus(this.exportName);
    } catch {
      status = [];
    }
    return { status, job: this.jobs()[0] };
  }

  private describe(s: SnapshotRecord, state = this.liveState()): SnapshotInfo {
    const st = state.status.find((x) => x.id === s.id);
    const failed = s.state === 'failed' || st?.failed === true;
    const job = state.job;
    const { autoRollback, ...rest } = s;
    return {
      ...rest,
      autoRollback: autoRollback ?? 'off',
      volume: this.image,
      basisOf: this.manifest.basedOn?.snapshotId === s.id ? [this.image] : [],
      ...(job && job.snapshotId === s.id ? { merge: { done: job.done, total: job.total, percent: job.percent } } : {}),
      state: failed ? 'failed' : 'active',
      failure: s.failure ?? (st?.failed ? { reason: st.failure, at: st.failedAt ? new Date(st.failedAt).toISOString() : '' } : undefined),
      export: this.viewName(s),
      chunkSize: this.manifest.chunkSize,
      preservedChunks: st?.preservedChunks,
      preservedBytes: st ? st.preservedChunks * this.manifest.chunkSize : undefined,
    };
  }
}
