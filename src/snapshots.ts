// Snapshots of one served volume: create, list, info, delete. The native
// layer does the data path (copy-on-write, hand-down); this module owns the
// names, the manifest and the order of steps that keeps a crash harmless:
//
//   create: native creates the store files -> manifest lists the snapshot ->
//           native adds it to the chain (writes drained, volume flushed) ->
//           export added. A crash before the manifest leaves orphan files
//           (removed at open) and older snapshots untouched, since nothing was
//           preserved into the new store; a crash after it leaves the snapshot
//           listed, and loaded as the newest at restart, showing the volume as
//           it was at the crash — a point in time after the request.
//   delete: bulk hand-down with writes flowing -> export removed -> with
//           writes paused: final hand-down of chunks preserved meanwhile,
//           dropped from the chain, manifest written -> writes resume -> files
//           removed. No write can preserve into the snapshot between its last
//           hand-down and the manifest, so a crash leaves it listed and intact
//           or gone with every chunk its older neighbour needs.
import * as fs from 'node:fs';
import { fromNative, NbdError } from './errors';
import type { Logger } from './logger';
import type { NativeServer, NativeSnapshotStatus } from './native';
import {
  lockVolume,
  newManifest,
  readManifest,
  removeOrphans,
  snapshotPaths,
  validateSnapshotName,
  writeManifest,
  type Manifest,
  type SnapshotRecord,
} from './volume-meta';

export interface SnapshotInfo extends SnapshotRecord {
  export: string;
  preservedChunks?: number;
  preservedBytes?: number;
  chunkSize: number;
}

/** Chunks handed down per native call when deleting (bounded work per step). */
const HAND_DOWN_STEP = 16384;

export class VolumeSnapshots {
  private manifest: Manifest;
  private unlock: () => void;
  private queue: Promise<unknown> = Promise.resolve();

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
  static prepare(image: string, size: number, chunkSize: number | undefined, log: Logger) {
    const unlock = lockVolume(image);
    try {
      let m = readManifest(image);
      if (!m) m = newManifest(size, chunkSize);
      else if (m.size !== size) {
        throw new NbdError('METADATA_CORRUPT', `${image} is ${size} bytes but its snapshots were taken at ${m.size} bytes`);
      }
      const orphans = removeOrphans(image, m);
      if (orphans.length) log.warn({ image, files: orphans }, 'removed orphan snapshot files left by an interrupted operation');
      const snapshots = m.snapshots.map((s) => ({ id: s.id, ...snapshotPaths(image, s.id) }));
      return { manifest: m, unlock, chunkSize: m.chunkSize, snapshots };
    } catch (err) {
      unlock();
      throw err;
    }
  }

  static attach(native: NativeServer, image: string, exportName: string, prepared: ReturnType<typeof VolumeSnapshots.prepare>, log: Logger) {
    const v = new VolumeSnapshots(native, image, exportName, prepared.manifest, prepared.unlock, log.child({ volume: exportName }));
    for (const s of v.manifest.snapshots) v.exportView(s);
    return v;
  }

  get chunkSize(): number {
    return this.manifest.chunkSize;
  }

  close(): void {
    this.unlock();
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
  }

  create(name: string): Promise<SnapshotInfo> {
    validateSnapshotName(name);
    return this.serial(async () => {
      if (this.manifest.snapshots.some((s) => s.name === name)) {
        throw new NbdError('SNAPSHOT_EXISTS', `volume ${this.image} already has a snapshot named "${name}"`);
      }
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
      const rec: SnapshotRecord = { id, name, createdAt: new Date().toISOString(), state: 'active' };
      const before = this.manifest;
      try {
        this.save({ ...before, nextId: id + 1, snapshots: [...before.snapshots, rec] });
      } catch (err) {
        this.native.discardSnapshot(id);
        removeFiles();
        throw new NbdError('SNAPSHOT_CREATE_FAILED', `cannot record the snapshot: ${(err as Error).message}`);
      }
      try {
        await this.native.addSnapshot(this.exportName, id);
      } catch (err) {
        // Never in the chain, so nothing depends on it: forget it again.
        try {
          this.save({ ...before, nextId: id + 1 });
          removeFiles();
        } catch {
          /* listed but empty: it shows the volume as of the next open */
        }
        throw fromNative(err);
      }
      this.exportView(rec);
      const ms = Number(process.hrtime.bigint() - started) / 1e6;
      this.log.info({ snapshot: name, id, ms }, 'snapshot created');
      return this.describe(rec);
    });
  }

  delete(name: string, onProgress?: (done: number, total: number) => void): Promise<void> {
    return this.serial(async () => {
      const s = this.find(name);
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
        this.save({ ...this.manifest, snapshots: this.manifest.snapshots.filter((x) => x.id !== s.id) });
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
    return this.manifest.snapshots.map((s) => this.describe(s));
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
      // The native map log has its own FAILED record; the manifest catches up at next open.
      this.manifest = { ...this.manifest, snapshots: this.manifest.snapshots.map((x) => (x.id === id ? failed : x)) };
      this.log.error({ err }, 'could not write the manifest after a snapshot failure');
    }
  }

  private describe(s: SnapshotRecord): SnapshotInfo {
    let st: NativeSnapshotStatus | undefined;
    try {
      st = this.native.snapshotStatus(this.exportName).find((x) => x.id === s.id);
    } catch {
      st = undefined;
    }
    const failed = s.state === 'failed' || st?.failed === true;
    return {
      ...s,
      state: failed ? 'failed' : 'active',
      failure: s.failure ?? (st?.failed ? { reason: st.failure, at: st.failedAt ? new Date(st.failedAt).toISOString() : '' } : undefined),
      export: this.viewName(s),
      chunkSize: this.manifest.chunkSize,
      preservedChunks: st?.preservedChunks,
      preservedBytes: st ? st.preservedChunks * this.manifest.chunkSize : undefined,
    };
  }
}
