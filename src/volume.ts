// A served volume with snapshots enabled: the owner of its manifest
// (IMAGE.nbd/manifest.json, format in src/volume-meta.ts) and of its lock,
// and the place its concerns meet:
//   snapshots  create, delete, list, info, failures, exports  src/snapshots.ts
//   jobs       the background job registry                  src/jobs.ts
//   rollback   the rollback job: rollback, merge, history    src/rollback.ts
//   backups    the backup job                               src/backup-job.ts
//   policies   auto-rollback                                 src/policies.ts
//   changeMap  chunks changed between snapshots, or since one src/change-map.ts
// Each of them reads the manifest here and changes it only through save()
// (or saveOrRetry()); each module states its own crash order at its top.
//
// Invariants:
//   - The volume lock (lockVolume: IMAGE.nbd/lock and the image) is held
//     from prepare() until close(): no other process (server or offline
//     command) opens the volume meanwhile, so the manifest read at
//     prepare() stays the truth and only this object writes it.
//   - `manifest` is what the last successful save() wrote, except while a
//     failure could not be recorded (saveOrRetry): then it is ahead of the
//     file and retried every 2 s. Every new manifest derives from it, so any
//     later successful save records that failure too and ends the retries.
//   - Operations that change the manifest run one at a time, in order, in
//     serial(): snapshot create and delete, rollback, the end of a merge, a
//     policy change. (recordFailure does not wait: it comes from a native
//     event and only marks a record failed.) A save replaces the file
//     atomically (writeManifest), so a crash leaves the old or the new one.
//   - After every save the on-disconnect hold follows the manifest
//     (Policies.armHold).
//   - close() (after the native server stopped; NbdServer.close() awaits
//     stopJobs() before that) aborts the jobs, which resume at the next
//     open, and releases the lock last, after a last try at a pending
//     failure record.
// Everything here runs on the main JS thread.
import { changeMap, type ChangeMap } from './change-map';
import { NbdError } from './errors';
import { Backups, type BackupJobInfo } from './backup-job';
import { JobRegistry } from './jobs';
import { orphanJournals } from './journals';
import type { Logger } from './logger';
import type { NativeFirstWrites, NativeServer } from './native';
import { Policies } from './policies';
import { Rollbacks, type RollbackJobInfo } from './rollback';
import { Snapshots } from './snapshots';
import {
  lockVolume,
  newManifest,
  readManifest,
  removeOrphans,
  rollbackJobPath,
  runningRollback,
  snapshotPaths,
  writeManifest,
  type Manifest,
  type SnapshotRecord,
} from './volume-meta';

/** The jobs of a volume, of every kind. */
export type VolumeJob = RollbackJobInfo | BackupJobInfo;

/** What prepare() found: the settings addExport needs, and the lock to hand to open(). */
export interface PreparedVolume {
  manifest: Manifest;
  unlock: () => void;
  chunkSize: number;
  snapshots: { id: number; file: string; failure?: string }[];
  rollbackJob?: string;
}

export class Volume {
  readonly snapshots: Snapshots;
  readonly jobs = new JobRegistry<VolumeJob>(() => this.current);
  readonly rollback: Rollbacks;
  readonly backups: Backups;
  /**
   * An NBD URI at which this process serves export `name` (a snapshot view
   * disk@SNAP): set by the NbdServer that opened the volume (ownUri).
   */
  exportUri: (name: string) => string = () => {
    throw new NbdError('BAD_ARGUMENT', 'this volume is not served by an NBD server in this process');
  };
  readonly policies: Policies;
  /** Served read-only: a rollback would have to write, so it is refused. */
  readonly readOnly: boolean;
  readonly log: Logger;
  private current: Manifest;
  private readonly unlock: () => void;
  private queue: Promise<unknown> = Promise.resolve();
  /** Set while a manifest recording a snapshot failure could not be written. */
  private failureRetry?: NodeJS.Timeout;

  private constructor(
    readonly native: NativeServer,
    readonly image: string,
    readonly exportName: string,
    prepared: PreparedVolume,
    log: Logger,
    opts: { readOnly?: boolean; mergeRate?: number },
  ) {
    this.current = prepared.manifest;
    this.unlock = prepared.unlock;
    this.log = log.child({ volume: exportName });
    this.readOnly = opts.readOnly ?? false;
    this.snapshots = new Snapshots(this);
    this.rollback = new Rollbacks(this, opts.mergeRate);
    this.policies = new Policies(this);
    this.backups = new Backups(this);
    this.jobs.register(this.rollback);
    this.jobs.register(this.backups);
  }

  /**
   * Locks the volume, reads (or starts) its manifest and cleans orphans.
   * Returns the settings addExport needs; call open() once the export exists.
   */
  static prepare(image: string, size: number, chunkSize: number | undefined, log: Logger, readOnly = false): PreparedVolume {
    const unlock = lockVolume(image, log);
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
      const running = runningRollback(m);
      const rollbackJob = running ? rollbackJobPath(image, running.jobId) : undefined;
      return { manifest: m, unlock, chunkSize: m.chunkSize, snapshots, rollbackJob };
    } catch (err) {
      unlock();
      throw err;
    }
  }

  /** The volume of an export added with prepare()'s settings; it owns the lock from here. */
  static open(
    native: NativeServer,
    image: string,
    exportName: string,
    prepared: PreparedVolume,
    log: Logger,
    opts: { readOnly?: boolean; mergeRate?: number } = {},
  ): Volume {
    const v = new Volume(native, image, exportName, prepared, log, opts);
    v.publishNames();
    v.policies.armHold();
    v.rollback.reconcileHistory();
    v.snapshots.exportAll();
    return v;
  }

  get manifest(): Manifest {
    return this.current;
  }

  get chunkSize(): number {
    return this.current.chunkSize;
  }

  /** Serialises the operations that change the manifest. */
  serial<T>(fn: () => Promise<T>): Promise<T> {
    const next = this.queue.then(fn, fn);
    this.queue = next.catch(() => undefined);
    return next;
  }

  /** Writes `m` (derived from `manifest`) and makes it current; throws if it cannot be written. */
  save(m: Manifest): void {
    this.current = writeManifest(this.image, m);
    // Every manifest derives from this.manifest, so it records any failure
    // an earlier write could not (saveOrRetry): no more retries needed.
    clearInterval(this.failureRetry);
    this.failureRetry = undefined;
    this.policies.armHold(); // the policy may have changed (set, create, delete)
    this.publishNames();
  }

  /**
   * Tells the addon the snapshots' names: NBD clients ask for
   * qemu:dirty-bitmap:NAME. Never fails a save: after the export is gone
   * (a last manifest retry at close) nobody can ask any more.
   */
  private publishNames(): void {
    try {
      this.native.setSnapshotNames(this.exportName, this.current.snapshots.map((s) => [s.name, s.id]));
    } catch (err) {
      this.log.debug({ err: (err as Error).message }, 'snapshot names not passed to the addon');
    }
  }

  /**
   * Makes `m` (a snapshot failure recorded) current at once, and writes it,
   * or keeps retrying every 2 s until it or any later save is written.
   */
  saveOrRetry(m: Manifest): void {
    try {
      this.save(m);
    } catch (err) {
      this.current = m;
      this.log.error({ err }, 'could not write the manifest after a snapshot failure; retrying every 2 s');
      this.failureRetry ??= setInterval(() => this.retryManifest(), 2000).unref();
    }
  }

  /** Retries writing a manifest that records a failure (see saveOrRetry); a successful save ends the retries. */
  private retryManifest(): void {
    try {
      this.save(this.current);
      this.log.info('the snapshot failure is recorded in the manifest now');
    } catch (err) {
      this.log.error({ err }, 'still cannot write the manifest recording a snapshot failure');
    }
  }

  /** The snapshot named `name`, or SNAPSHOT_NOT_FOUND. */
  snapshot(name: string): SnapshotRecord {
    const s = this.current.snapshots.find((x) => x.name === name);
    if (!s) throw new NbdError('SNAPSHOT_NOT_FOUND', `volume ${this.image} has no snapshot named "${name}"`);
    return s;
  }

  /** A snapshot's name by id (`#id` once it is gone). */
  nameOf(id: number): string {
    return this.current.snapshots.find((x) => x.id === id)?.name ?? `#${id}`;
  }

  /** Stops the background jobs after their current step (they resume at the next open). */
  stopJobs(): Promise<void> {
    return this.jobs.stop();
  }

  /** Releases the volume (after the native server stopped). */
  close(): void {
    this.jobs.abort();
    if (this.failureRetry) this.retryManifest(); // a last try while the volume is still ours
    clearInterval(this.failureRetry);
    this.unlock();
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

  /** The chunks that may differ between snapshot `from` and snapshot `to` (null: live); src/change-map.ts. */
  changeMap(from: string, to: string | null): Promise<ChangeMap> {
    return changeMap(this, from, to);
  }

  /** Volume -> snapshot mapping and the volume's state (`info IMAGE`). */
  info() {
    const m = this.current;
    const based = m.basedOn;
    return {
      volume: this.image,
      export: this.exportName,
      size: m.size,
      chunkSize: m.chunkSize,
      snapshots: m.snapshots.length,
      basedOn: based ? { snapshot: this.nameOf(based.snapshotId), snapshotId: based.snapshotId, since: based.since } : null,
      autoRollback: this.policies.current(),
      jobs: this.jobs.list(),
      firstWrites: this.firstWrites(),
      /** Journal files in the journal directory that no volume names (src/journals.ts). */
      orphanJournals: orphanJournals(),
    };
  }
}
