// backup(): one full or incremental backup of a ChunkSource into a repository.
//
// Pipeline (all stages overlap):
//
//   changedRuns() --> segments of <= readSize bytes (runs split, never merged
//        |            across a gap: one read per segment, i.e. per run piece)
//        v
//   read: up to `readConcurrency` segments in flight (libuv pool / the
//        |  source's own threads), each then coded on a worker thread
//        |  (codec-pool.ts: zero check, id = SHA-256 / HMAC, zstd, AES-GCM)
//        v
//   consume, in order, on the JS thread: ZERO chunks recorded, never stored;
//        |  an id already in the repository or this run is reused; else the
//        |  blob is copied into the open pack
//        v
//   pack full (>= packSize): seal, upload pack then packidx, with at most
//        `uploadConcurrency` uploads in flight (the next pack waits for a slot)
//
// Memory bound, independent of the volume's size except for the index:
//   readConcurrency x readSize (segment buffers, read or being coded) + their coded blobs
//   + (uploadConcurrency + 1) x (packSize + a blob)  (packs in flight + the open one)
//   + 32 B per volume chunk (this backup's index; the parent's while copying)
//   + ~120 B per chunk stored in the repository (the chunk map).
// Defaults: 4 x 1 MiB + 3 x 16 MiB ~ 52 MiB of buffers; objects in flight <= 4 reads + 2 uploads.
//
// Crash safety: a pack is durable before its packidx, and the index before
// the manifest; nothing refers to an object written later. A killed backup
// leaves packs (with packidx) that a rerun finds in the chunk map and does
// not send again: a rerun re-sends at most the packs that were in flight
// (open, or uploaded without their packidx).
//
// Locking: see locks.ts (a backup lock, refreshed; wait for prunes first;
// assertHeld() before the manifest).
import { NbdError } from '../errors';
import { checkAbort } from './bounded';
import type { Logger } from '../logger';
import { BackupIndex } from './backup-index';
import { blobParts, Coded, type CodedSegment } from './chunk-codec';
import { codecPool } from './codec-pool';
import { DEFAULT_LOCK_TTL_MS, RepoLock, waitForNoPrune } from './locks';
import { newBackupId, type BackupStats, type Manifest } from './manifest';
import { PackBuilder } from './pack';
import { idKey, type Repository } from './repository';
import type { ChunkRun, ChunkSource } from './source';

export interface BackupProgress extends BackupStats {
  /** Chunks handled so far (read or known zero). */
  chunksDone: number;
}

export interface BackupOptions {
  /** Incremental: the backup whose content the source's changes are relative to. */
  parent?: string | null;
  /** Target pack size in bytes (default 16 MiB). */
  packSize?: number;
  /** Bytes per source read (default 1 MiB, at least one chunk). */
  readSize?: number;
  readConcurrency?: number;
  uploadConcurrency?: number;
  lockTtlMs?: number;
  /** How long to wait for a running prune (default 10 min). */
  pruneWaitMs?: number;
  signal?: AbortSignal;
  /** Called after each consumed read and each uploaded pack. */
  onProgress?: (p: BackupProgress) => void;
  logger?: Logger;
  /** The backup id (default: a new one); tests pass one to find it. */
  id?: string;
}

interface Segment {
  start: number;
  count: number;
  offset: number;
  length: number;
}

export async function backup(repo: Repository, source: ChunkSource, opts: BackupOptions = {}): Promise<Manifest> {
  const chunkSize = source.chunkSize;
  const packSize = opts.packSize ?? 16 * 1024 * 1024;
  const readSize = Math.max(chunkSize, Math.floor((opts.readSize ?? 1024 * 1024) / chunkSize) * chunkSize);
  const readConcurrency = opts.readConcurrency ?? 4;
  const uploadConcurrency = opts.uploadConcurrency ?? 2;
  if (!(packSize >= 4096) || !(readConcurrency >= 1) || !(uploadConcurrency >= 1)) {
    throw new RangeError('packSize >= 4096, readConcurrency >= 1 and uploadConcurrency >= 1 are required');
  }
  const log = opts.logger?.child({ component: 'backup' });
  const id = opts.id ?? newBackupId();
  const time = new Date().toISOString();

  const lock = await RepoLock.acquire(repo, 'backup', opts.lockTtlMs ?? DEFAULT_LOCK_TTL_MS);
  const inflightReads: Promise<{ seg: Segment; buf: Buffer; coded: CodedSegment }>[] = [];
  const pool = codecPool();
  const uploads = new Set<Promise<void>>();
  let uploadError: { err: unknown } | undefined;
  try {
    await waitForNoPrune(repo, opts.pruneWaitMs ?? 10 * 60_000, 500, opts.signal);

    // What we may dedup against: every chunk with a packidx now. Loaded after
    // the prune check, so it holds no pack a prune could still delete.
    // A damaged packidx only costs dedup: its chunks are stored again (and
    // verify names it; prune refuses to run until it is repaired).
    const known = await repo.chunkMap((pack, err) => log?.warn({ pack, err: err.message }, 'skipping a damaged pack index'));
    const index = new BackupIndex(source.size, chunkSize);
    /** Chunks whose content must be re-read although no run lists them (a short last chunk that changed size). */
    const forced: number[] = [];
    let parent: Manifest | null = null;
    if (opts.parent) {
      parent = await repo.readManifest(opts.parent);
      if (parent.chunkSize !== chunkSize) {
        throw new NbdError('BAD_ARGUMENT', `backup ${parent.id} has chunk size ${parent.chunkSize}; this volume has ${chunkSize}`);
      }
      const pidx = await repo.readIndex(parent);
      const n = Math.min(pidx.count, index.count);
      pidx.ids.copy(index.ids, 0, 0, n * 32);
      if (pidx.size !== source.size) {
        if (pidx.size % chunkSize !== 0 && pidx.count - 1 < index.count) forced.push(pidx.count - 1);
        if (source.size % chunkSize !== 0 && index.count - 1 < pidx.count && forced.at(-1) !== index.count - 1) forced.push(index.count - 1);
      }
    }

    const stats: BackupStats = { chunksChanged: 0, chunksZero: 0, chunksNew: 0, bytesRead: 0, bytesStored: 0, packsWritten: 0 };
    let chunksDone = 0;
    const progress = () => opts.onProgress?.({ ...stats, chunksDone });
    /** Ids added by this run (in the open pack or uploading): dedup within the run. */
    const stored = new Set<string>();
    // Room for a full pack, its last blob and the trailer of a pack of
    // incompressible chunks: no regrowth (a copy) on the usual path.
    const newPack = () => new PackBuilder(packSize + chunkSize + 96 * Math.ceil(packSize / chunkSize) + 4096);
    let pack = newPack();

    const startUpload = async (p: PackBuilder): Promise<void> => {
      const { name, data, entries } = p.finish(repo.keys);
      // Wait for a slot: bounds packs in flight (and their memory).
      while (uploads.size >= uploadConcurrency) await Promise.race(uploads);
      if (uploadError) throw uploadError.err;
      const u: Promise<void> = repo
        .putPack(name, data, entries)
        .then(() => {
          stats.packsWritten++;
          progress();
        })
        .catch((err: unknown) => {
          uploadError ??= { err };
        })
        .finally(() => uploads.delete(u));
      uploads.add(u);
    };

    const consume = async (seg: Segment, buf: Buffer, coded: CodedSegment): Promise<void> => {
      stats.bytesRead += seg.length;
      for (let k = 0; k < seg.count; k++) {
        const i = seg.start + k;
        stats.chunksChanged++;
        chunksDone++;
        if (coded.kinds[k] === Coded.Zero) {
          index.setZero(i);
          stats.chunksZero++;
          continue;
        }
        const cid = Buffer.from(coded.ids.buffer, coded.ids.byteOffset + k * 32, 32);
        index.set(i, cid);
        const key = idKey(cid);
        if (known.has(key) || stored.has(key)) continue;
        stored.add(key);
        stats.bytesStored += pack.add(Buffer.from(cid), blobParts(coded, buf, chunkSize, k), index.chunkLength(i));
        stats.chunksNew++;
        if (pack.size >= packSize) {
          const full = pack;
          pack = newPack();
          await startUpload(full);
        }
      }
      progress();
    };

    // Read, then code on the pool: both stages of a segment run while
    // earlier segments are consumed. The buffer owns its ArrayBuffer (it is
    // transferred to a codec worker and back).
    const readSegment = async (seg: Segment): Promise<{ seg: Segment; buf: Buffer; coded: CodedSegment }> => {
      const buf = Buffer.allocUnsafeSlow(seg.length);
      try {
        await source.read(seg.offset, buf);
      } catch (err) {
        if (err instanceof NbdError) throw err;
        throw new NbdError('BACKUP_SOURCE_FAILED', `reading the source at ${seg.offset} (+${seg.length}): ${(err as Error).message}`, { cause: err });
      }
      const r = await pool.run(repo.keys, buf, chunkSize);
      return { seg, buf: r.seg, coded: r.coded };
    };

    const chunksPerRead = readSize / chunkSize;
    async function* allRuns(): AsyncIterable<ChunkRun> {
      yield* source.changedRuns();
      for (const c of forced) yield { start: c, count: 1 };
    }
    let lastEnd = -1;
    for await (const run of allRuns()) {
      checkAbort(opts.signal, 'the backup');
      if (uploadError) throw uploadError.err;
      if (run.start + run.count > index.count || run.start < 0) throw new NbdError('BACKUP_SOURCE_FAILED', `the source listed chunks ${run.start}+${run.count} outside the volume`);
      if (run.start < lastEnd && !forced.includes(run.start)) throw new NbdError('BACKUP_SOURCE_FAILED', 'the source listed runs out of order');
      lastEnd = run.start + run.count;
      if (run.zero) {
        for (let i = run.start; i < run.start + run.count; i++) index.setZero(i);
        stats.chunksChanged += run.count;
        stats.chunksZero += run.count;
        chunksDone += run.count;
        continue;
      }
      for (let s = run.start; s < run.start + run.count; s += chunksPerRead) {
        const count = Math.min(chunksPerRead, run.start + run.count - s);
        const offset = s * chunkSize;
        const length = Math.min(count * chunkSize, source.size - offset);
        checkAbort(opts.signal, 'the backup');
        const p = readSegment({ start: s, count, offset, length });
        p.catch(() => undefined); // observed below, in order
        inflightReads.push(p);
        if (inflightReads.length >= readConcurrency) {
          const { seg, buf, coded } = await inflightReads.shift()!;
          await consume(seg, buf, coded);
        }
      }
    }
    while (inflightReads.length > 0) {
      checkAbort(opts.signal, 'the backup');
      const { seg, buf, coded } = await inflightReads.shift()!;
      await consume(seg, buf, coded);
    }
    if (pack.count > 0) await startUpload(pack);
    while (uploads.size > 0) await Promise.race(uploads);
    if (uploadError) throw uploadError.err;

    const indexRef = await repo.putIndex(id, index);
    const manifest: Manifest = {
      version: 1,
      id,
      parent: parent?.id ?? null,
      time,
      volume: source.volume,
      snapshot: source.snapshot,
      size: source.size,
      chunkSize,
      index: indexRef,
      stats,
    };
    lock.assertHeld();
    await repo.putManifest(manifest);
    log?.info({ backup: id, parent: manifest.parent, ...stats }, 'backup complete');
    return manifest;
  } finally {
    // On failure: let started work settle (no stray rejections), keep what
    // was uploaded (a rerun reuses it), drop the lock.
    await Promise.allSettled(inflightReads);
    await Promise.allSettled([...uploads]);
    await lock.release().catch(() => undefined);
  }
}

