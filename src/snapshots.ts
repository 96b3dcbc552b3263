// Snapshots of one served volume: create, list, info, delete, failures, and
// their exports (EXPORT@NAME, read-only views). The native layer does the
// data path (copy-on-write, hand-down); this module owns the names, the
// manifest records (through the volume, src/volume.ts, which serialises
// these operations with every other manifest change) and the order of steps
// that keeps a crash harmless:
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
//           past failed ones: CowDevice::hand_down, via Volume::hand_down).
//   failure: a snapshot that can no longer preserve (native 'snapshot-failed'
//           event, or found failed at open) is recorded as failed in the
//           manifest; if that write fails too, the volume keeps retrying it
//           (Volume.saveOrRetry) so that a restart never serves the inexact
//           snapshot as data.
// Create and delete are refused while a rollback merges (src/rollback.ts);
// rollbacks and auto-rollback policies (src/policies.ts) live in their own
// modules.
import * as fs from 'node:fs';
import { crashPoint } from './crash-point';
import { fromNative, NbdError } from './errors';
import type { JobProgress } from './jobs';
import type { NativeSnapshotStatus } from './native';
import type { RollbackJobInfo } from './rollback';
import type { Volume } from './volume';
import { snapshotPaths, validateSnapshotName, type AutoRollbackPolicy, type SnapshotRecord } from './volume-meta';

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
  merge?: JobProgress;
}

/** Chunks handed down per native call when deleting (bounded work per step). */
const HAND_DOWN_STEP = 16384;

export class Snapshots {
  constructor(private readonly v: Volume) {}

  /** At open: one read-only export per snapshot the manifest lists. */
  exportAll(): void {
    for (const s of this.v.manifest.snapshots) this.exportView(s);
  }

  private viewName(s: SnapshotRecord): string {
    return `${this.v.exportName}@${s.name}`;
  }

  private exportView(s: SnapshotRecord): void {
    try {
      this.v.native.addSnapshotExport(this.v.exportName, s.id, this.viewName(s), `snapshot ${s.name} of ${this.v.exportName}`);
    } catch (err) {
      throw fromNative(err);
    }
  }

  /** Resolves with the snapshot, and how long writes were paused for it (pausedMs). */
  create(
    name: string,
    opts: { autoRollback?: AutoRollbackPolicy | 'off'; backupBase?: SnapshotRecord['backupBase'] } = {},
  ): Promise<SnapshotInfo & { pausedMs?: number; drainMs?: number; preflushMs?: number }> {
    validateSnapshotName(name);
    const v = this.v;
    return v.serial(async () => {
      v.rollback.refuseWhileMerging('create a snapshot');
      if (v.manifest.snapshots.some((s) => s.name === name)) {
        throw new NbdError('SNAPSHOT_EXISTS', `volume ${v.image} already has a snapshot named "${name}"`);
      }
      const policy = opts.autoRollback && opts.autoRollback !== 'off' ? opts.autoRollback : undefined;
      if (policy) v.policies.refuseConflict(undefined);
      const id = v.manifest.nextId;
      const files = snapshotPaths(v.image, id);
      const started = process.hrtime.bigint();
      const removeFiles = () => {
        for (const f of Object.values(files)) fs.rmSync(f, { force: true });
      };
      try {
        await v.native.prepareSnapshot(v.exportName, { id, ...files });
      } catch (err) {
        removeFiles();
        throw fromNative(err);
      }
      crashPoint('snapshot.create.prepared');
      // Writes pause and every queued first write reaches the image before
      // the manifest lists the snapshot: a crash after the manifest write
      // never replays a write queued under the old chain into it.
      try {
        await v.native.beginSnapshot(v.exportName); // writes are paused from here...
      } catch (err) {
        v.native.discardSnapshot(id);
        removeFiles();
        throw fromNative(err);
      }
      const rec: SnapshotRecord = {
        id,
        name,
        createdAt: new Date().toISOString(),
        state: 'active',
        ...(policy ? { autoRollback: policy } : {}),
        ...(opts.backupBase ? { backupBase: opts.backupBase } : {}),
      };
      try {
        v.save({ ...v.manifest, nextId: id + 1, snapshots: [...v.manifest.snapshots, rec] });
      } catch (err) {
        v.native.resumeWrites(v.exportName);
        v.native.discardSnapshot(id);
        removeFiles();
        throw new NbdError('SNAPSHOT_CREATE_FAILED', `cannot record the snapshot: ${(err as Error).message}`);
      }
      crashPoint('snapshot.create.manifest');
      v.native.addSnapshot(v.exportName, id); // ...to here: the snapshot is in the chain
      this.exportView(rec);
      const ms = Number(process.hrtime.bigint() - started) / 1e6;
      const fw = v.firstWrites();
      const pausedMs = fw?.lastPauseMs;
      // Where a create's time went: the queue applied while writes flowed,
      // the image's dirty pages written back, then the pause itself.
      const drainMs = fw?.lastDrainMs;
      const preflushMs = fw?.lastPreflushMs;
      v.log.info({ snapshot: name, id, ms, pausedMs, drainMs, preflushMs }, 'snapshot created');
      return { ...this.describe(rec), pausedMs, drainMs, preflushMs };
    });
  }

  delete(name: string, onProgress?: (done: number, total: number) => void): Promise<void> {
    const v = this.v;
    return v.serial(async () => {
      const s = v.snapshot(name);
      v.rollback.refuseWhileMerging('delete a snapshot');
      let from = 0;
      for (;;) {
        let r;
        try {
          r = await v.native.handDown(v.exportName, s.id, from, HAND_DOWN_STEP);
        } catch (err) {
          throw fromNative(err);
        }
        onProgress?.(r.next, r.total);
        if (r.next >= r.total) break;
        from = r.next;
      }
      v.native.removeExport(this.viewName(s));
      try {
        await v.native.removeSnapshot(v.exportName, s.id); // writes are paused from here...
        crashPoint('snapshot.delete.removed');
        const { basedOn, ...m } = v.manifest;
        const keepBasis = basedOn && basedOn.snapshotId !== s.id ? { basedOn } : {};
        // Recorded first, then out of the chain: if the manifest cannot be
        // written (disk full), the snapshot stays in the chain and exact.
        try {
          v.save({ ...m, ...keepBasis, snapshots: v.manifest.snapshots.filter((x) => x.id !== s.id) });
        } catch (err) {
          throw new NbdError('SNAPSHOT_DELETE_FAILED', `cannot record the deletion (the snapshot stays, exact): ${(err as Error).message}`);
        }
        crashPoint('snapshot.delete.manifest');
        v.native.dropSnapshot(v.exportName, s.id);
        crashPoint('snapshot.delete.dropped');
      } catch (err) {
        if (v.manifest.snapshots.some((x) => x.id === s.id)) this.exportView(s);
        throw fromNative(err);
      } finally {
        v.native.resumeWrites(v.exportName); // ...to here
      }
      for (const f of Object.values(snapshotPaths(v.image, s.id))) fs.rmSync(f, { force: true });
      v.log.info({ snapshot: name, id: s.id }, 'snapshot deleted');
    });
  }

  list(): SnapshotInfo[] {
    const state = this.liveState();
    return this.v.manifest.snapshots.map((s) => this.describe(s, state));
  }

  info(name: string): SnapshotInfo {
    return this.describe(this.v.snapshot(name));
  }

  /** Called for native 'snapshot-failed' events: records the failure durably. */
  recordFailure(id: number, reason: string, atMs?: number): void {
    const v = this.v;
    const s = v.manifest.snapshots.find((x) => x.id === id);
    if (!s || s.state === 'failed') return;
    const at = new Date(atMs || Date.now()).toISOString();
    const failed: SnapshotRecord = { ...s, state: 'failed', failure: { reason, at } };
    v.log.error({ snapshot: s.name, id, reason }, 'snapshot failed: it no longer preserves data');
    // The store's own failure marker may not have been written either (the
    // device that failed holds both): if the manifest cannot be written now,
    // the volume keeps trying, so that the failure is recorded once the
    // device works again, before a restart could serve the inexact snapshot
    // as data. Any other manifest write records it too.
    v.saveOrRetry({ ...v.manifest, snapshots: v.manifest.snapshots.map((x) => (x.id === id ? failed : x)) });
  }

  /** The native state every describe() needs, fetched once per call (status counts each bitmap). */
  private liveState(): { status: NativeSnapshotStatus[]; job: RollbackJobInfo | undefined } {
    let status: NativeSnapshotStatus[] = [];
    try {
      status = this.v.native.snapshotStatus(this.v.exportName);
    } catch {
      status = [];
    }
    return { status, job: this.v.rollback.current() };
  }

  /** A snapshot as list and info show it: its record with its live state. */
  describe(s: SnapshotRecord, state = this.liveState()): SnapshotInfo {
    const v = this.v;
    const st = state.status.find((x) => x.id === s.id);
    const failed = s.state === 'failed' || st?.failed === true;
    const job = state.job;
    const { autoRollback, ...rest } = s;
    return {
      ...rest,
      autoRollback: autoRollback ?? 'off',
      volume: v.image,
      basisOf: v.manifest.basedOn?.snapshotId === s.id ? [v.image] : [],
      ...(job && job.snapshotId === s.id ? { merge: { done: job.done, total: job.total, percent: job.percent } } : {}),
      state: failed ? 'failed' : 'active',
      failure: s.failure ?? (st?.failed ? { reason: st.failure, at: st.failedAt ? new Date(st.failedAt).toISOString() : '' } : undefined),
      export: this.viewName(s),
      chunkSize: v.manifest.chunkSize,
      preservedChunks: st?.preservedChunks,
      preservedBytes: st ? st.preservedChunks * v.manifest.chunkSize : undefined,
    };
  }
}
