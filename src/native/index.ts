// The one module that loads the compiled addon (build/Release/nbd_native.node)
// and gives it types. Nothing else in src/ imports the .node file.
import * as path from 'node:path';
import { packageRoot } from '../package-root';

export interface NativeServerOptions {
  threadsPerConnection?: number;
  maxPayload?: number;
  handshakeTimeoutMs?: number;
  maxConnections?: number;
  drainTimeoutMs?: number;
  /** Server-wide bound on first-write journal memory, MiB (memory_budget.hh). Default 1024. */
  journalMemoryMiB?: number;
  /** Called on the main thread for events raised on native threads. */
  onEvent: (ev: NativeEvent) => void;
}

export interface NativeEvent {
  type:
    | 'connect'
    | 'disconnect'
    | 'last-disconnect'
    | 'handshake-failed'
    | 'error'
    | 'device-detached'
    | 'device-error'
    | 'snapshot-failed';
  connection: number;
  export: string;
  peer: string;
  message: string;
}

export interface NativeSnapshotFiles {
  id: number;
  /** snap-<id>.snap: the snapshot's data region and log (native/core/snapshot_store.hh) */
  file: string;
  /** The manifest records it failed (its in-file marker may not have been writable): never served as data. */
  failure?: string;
}

export interface NativeExportOptions {
  name: string;
  path: string;
  readOnly?: boolean;
  description?: string;
  /** Present for volumes with snapshots: puts the copy-on-write layer in the chain. */
  chunkSize?: number;
  /** Existing snapshots, oldest first. */
  snapshots?: NativeSnapshotFiles[];
  /** A rollback merge to resume (its job file). */
  rollbackJob?: string;
  /** IMAGE.nbd/journal.state: the journal it names is replayed at open (native/core/journal_state.hh). */
  journalState?: string;
  /** Where this run creates its journal. */
  journalDir?: string;
  /** Its ring size in bytes when it is created; 0: first writes are preserved inline. */
  journalSize?: number;
}

export interface NativeFirstWrites {
  /** "journal", or "inline" with the reason when a journal was wanted but is unavailable. */
  mode: string;
  /** Entries waiting for the background preserver. */
  queued: number;
  /** Writes paused by the last snapshot create/delete/rollback, and the longest pause since open (ms). */
  lastPauseMs: number;
  maxPauseMs: number;
  /** The last create/delete/rollback's phases before its pause (ms): applying the queue while
   * writes flowed, and writing back the image's dirty pages. */
  lastDrainMs: number;
  lastPreflushMs: number;
  /** Entries a previous run left in the journal, replayed when this volume was opened. */
  replayedAtOpen: number;
  /** Why a journal the volume recorded was not replayed (lost with a restart of the machine). */
  note?: string;
  /** After stop: queued writes that could not be applied, kept in the journal for the next start. */
  kept?: string;
}

export interface NativeSnapshotState {
  id: number;
  failed: boolean;
  failure: string;
  /** Unix time in ms of the failure (0 if unknown). */
  failedAt: number;
}

export interface NativeSnapshotStatus extends NativeSnapshotState {
  preservedChunks: number;
  chunks: number;
  mapBytes: number;
}

export interface NativeExportInfo {
  name: string;
  size: number;
  readOnly: boolean;
  snapshots: NativeSnapshotState[];
}

export interface NativeExportStats {
  size: number;
  readOnly: boolean;
  reads: number;
  writes: number;
  flushes: number;
  trims: number;
  zeroes: number;
  caches: number;
  blockStatus: number;
  bytesRead: number;
  bytesWritten: number;
  errors: number;
  connectionsTotal: number;
  connectionsActive: number;
}

export interface NativeServerStats {
  connectionsTotal: number;
  connectionsActive: number;
  connectionsRefused: number;
  handshakesFailed: number;
  exports: Record<string, NativeExportStats>;
}

export interface NativeServer {
  addExport(opts: NativeExportOptions): NativeExportInfo;
  removeExport(name: string): boolean;
  setDefaultExport(name: string): void;
  listenTcp(host: string, port: number): number;
  listenUnix(path: string): void;
  start(): void;
  /** Resolves with the exports whose final flush failed (their acknowledged writes may not be on disk). */
  stop(): Promise<{ export: string; error: string }[]>;
  stats(): NativeServerStats;
  /** Binds an export to a kernel /dev/nbdN; returns a device id. */
  attachDevice(opts: NativeAttachOptions): number;
  disconnectDevice(id: number): boolean;
  releaseDevice(id: number): boolean;
  /** Creates a snapshot's files (not yet in the chain). */
  prepareSnapshot(exportName: string, files: NativeSnapshotFiles): Promise<void>;
  /**
   * Pauses writes, applies queued first writes and flushes the volume; writes
   * stay paused until addSnapshot() or resumeWrites(). Rejects with
   * QUEUE_STALLED when queued writes cannot be applied, ROLLBACK_RUNNING
   * during a merge.
   */
  beginSnapshot(exportName: string): Promise<void>;
  /** After beginSnapshot and the manifest: appends a prepared snapshot to the chain and resumes writes. */
  addSnapshot(exportName: string, id: number): void;
  discardSnapshot(id: number): boolean;
  /**
   * Final hand-down, with writes paused; they stay paused until
   * resumeWrites(), so the deletion can be recorded, then dropSnapshot().
   */
  removeSnapshot(exportName: string, id: number): Promise<void>;
  /** After removeSnapshot and once the deletion is recorded: takes the snapshot out of the chain (writes still paused). */
  dropSnapshot(exportName: string, id: number): boolean;
  resumeWrites(exportName: string): void;
  /** Copies chunks [from, from+max) that the older neighbour needs; resolves with the next chunk. */
  handDown(exportName: string, id: number, from: number, max: number): Promise<{ next: number; total: number }>;
  snapshotStatus(exportName: string): NativeSnapshotStatus[];
  /** Resolves once the first writes queued before the call are applied (status is then settled). */
  settle(exportName: string): Promise<void>;
  firstWrites(exportName: string): NativeFirstWrites;
  addSnapshotExport(exportName: string, id: number, viewName: string, description?: string): void;
  /** Writes a rollback job file and pauses writes until activateRollback/abortRollback. */
  prepareRollback(exportName: string, snapshotId: number, jobFile: string): Promise<void>;
  activateRollback(exportName: string): void;
  abortRollback(exportName: string): void;
  /** Merges up to `max` pending chunks from chunk `from` on. */
  mergeStep(exportName: string, from: number, max: number): Promise<NativeMergeStatus & { next: number }>;
  /** Drops a finished merge (rejects with MERGE_FAILED if chunks are pending). */
  finishRollback(exportName: string): Promise<void>;
  mergeStatus(exportName: string): NativeMergeStatus | null;
  /** Arms the admission hold: the last session leaving holds new ones (event "last-disconnect") until releaseHold. */
  setDisconnectHold(exportName: string, on: boolean): void;
  releaseHold(exportName: string): void;
  /**
   * The change map from snapshot `fromId` to snapshot `toId` (null: the live
   * volume): [start, count, start, count, ...], ascending disjoint runs of
   * chunk indexes (native/core/change_map.hh). Rejects with
   * SNAPSHOT_NOT_FOUND, CHANGES_RANGE_INVALID or CHANGES_UNAVAILABLE.
   */
  changedChunks(exportName: string, fromId: number, toId: number | null): Promise<Float64Array>;
  /** The snapshots' names, for qemu:dirty-bitmap:NAME meta contexts (set after every manifest change). */
  setSnapshotNames(exportName: string, names: [string, number][]): void;
}

export interface NativeMergeStatus {
  snapshotId: number;
  /** chunks pending when the rollback started */
  total: number;
  remaining: number;
  /** chunks in the volume */
  chunks: number;
}

export interface NativeAttachOptions {
  device: string;
  export?: string;
  connections?: number;
  timeoutSec?: number;
  blockSize?: number;
}

interface NativeModule {
  NativeServer: new (opts: NativeServerOptions) => NativeServer;
  abiVersion: number;
  /** NBD_DISCONNECT on a device attached by any process. */
  detachDevice(device: string): void;
  /** A journal file's id and owner image, or null if it is not a journal of this build. */
  inspectJournal(file: string): { id: string; owner: string } | null;
  /** The journal a volume's journal.state names, or null (JOURNAL_CORRUPT if the state is damaged). */
  readJournalState(file: string): { id: string; path: string } | null;
  /** Forgets the volume's pending journal, durably. */
  clearJournalState(file: string): void;
  /**
   * Opens `path` and takes an exclusive flock on it (native/core/file_lock.hh).
   * Returns the descriptor (O_CLOEXEC) that holds the lock until unlockFile().
   * 'lock-file': created with mode 0600 if missing, never through a symlink,
   * and checked to still be the file `path` names; 'existing': an existing
   * file (an image) opened read-only. Throws code LOCK_FAILED with `errno`
   * (EWOULDBLOCK: another open file description holds the lock).
   */
  lockFile(path: string, kind: 'lock-file' | 'existing'): number;
  /** Unlinks `unlinkPath` if it still names the locked file, then closes `fd` (releasing the lock). */
  unlockFile(fd: number, unlinkPath?: string): void;
  /** SO_PEERCRED of a connected unix socket: who connected (CONTROL_FAILED with `errno` on failure). */
  peerCredentials(fd: number): { pid: number; uid: number; gid: number };
}

function load(): NativeModule {
  const file = path.join(packageRoot(), 'build', 'Release', 'nbd_native.node');
  try {
    // eslint-disable-next-line @typescript-eslint/no-require-imports
    return require(file) as NativeModule;
  } catch (err) {
    const e = new Error(
      `cannot load the native addon at ${file}: ${(err as Error).message}. Run "npm install" (or "npm run build") first.`,
    );
    (e as Error & { code: string }).code = 'ADDON_NOT_BUILT';
    throw e;
  }
}

export const native: NativeModule = load();
