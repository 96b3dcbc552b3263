// restore(): writes one backup to a RestoreTarget, from its index and the
// packs alone (no parent chain: the index is complete).
//
// Chunks are visited in volume order. Runs of ZERO chunks become one
// target.zero() each. Runs of chunks whose blobs lie back to back in one
// pack become one range read (up to maxRangeBytes), so a full backup of a
// mostly sequential volume reads whole packs in a few requests; up to
// `concurrency` range reads are in flight, each decoded and checked against
// its ids on the codec pool (codec-pool.ts) before it is written; the first chunk that fails
// aborts the restore (BACKUP_DATA_CORRUPT naming the pack, the backup and
// the chunk) and the target is discarded (FileTarget: no file is left).
//
// Memory: concurrency x maxRangeBytes of pack data plus the decoded chunks
// of those ranges, the index (32 B per chunk) and the chunk map.
import { NbdError } from '../errors';
import { checkAbort } from './bounded';
import { isObjectMissing } from './backend';
import { codecPool } from './codec-pool';
import { idKey, type ChunkLocation, type Repository } from './repository';
import { packKey } from './pack';
import type { RestoreTarget } from './target';

export interface RestoreOptions {
  concurrency?: number;
  maxRangeBytes?: number;
  signal?: AbortSignal;
}

export interface RestoreResult {
  backup: string;
  size: number;
  bytesWritten: number;
  bytesZero: number;
  bytesFetched: number;
}

interface Range {
  pack: string;
  offset: number;
  length: number;
  /** Consecutive volume chunks from `first`, with their blob locations. */
  first: number;
  locs: ChunkLocation[];
}

export async function restore(repo: Repository, backupId: string, target: RestoreTarget, opts: RestoreOptions = {}): Promise<RestoreResult> {
  const concurrency = opts.concurrency ?? 4;
  const maxRange = opts.maxRangeBytes ?? 8 * 1024 * 1024;
  const m = await repo.readManifest(backupId);
  const index = await repo.readIndex(m);
  // A damaged packidx of a pack this backup does not use must not stop it;
  // one it does use shows as a chunk that no pack holds.
  const damaged: string[] = [];
  const known = await repo.chunkMap((pack) => damaged.push(pack));
  const pool = codecPool();
  const result: RestoreResult = { backup: m.id, size: m.size, bytesWritten: 0, bytesZero: 0, bytesFetched: 0 };

  // Resolve every data chunk before writing anything: a missing chunk is
  // refused up front.
  const ranges: Range[] = [];
  const zeroRuns: [number, number][] = [];
  let cur: Range | undefined;
  for (let i = 0; i < index.count; i++) {
    if (index.isZero(i)) {
      cur = undefined;
      const last = zeroRuns.at(-1);
      if (last && last[0] + last[1] === i) last[1]++;
      else zeroRuns.push([i, 1]);
      continue;
    }
    const loc = known.get(idKey(index.id(i)));
    if (!loc) {
      const also = damaged.length ? ` (damaged pack indexes: ${damaged.map((d) => `packidx/${d}`).join(', ')})` : '';
      throw new NbdError('REPO_CORRUPT', `backup ${m.id}: chunk ${i} (offset ${i * m.chunkSize}) refers to ${index.id(i).toString('hex')}, which no pack holds${also}`);
    }
    if (cur && cur.pack === loc.pack && cur.offset + cur.length === loc.entry.offset && cur.length + loc.entry.length <= maxRange && cur.first + cur.locs.length === i) {
      cur.length += loc.entry.length;
      cur.locs.push(loc);
    } else {
      cur = { pack: loc.pack, offset: loc.entry.offset, length: loc.entry.length, first: i, locs: [loc] };
      ranges.push(cur);
    }
  }

  await target.open(m.size);
  try {
    for (const [start, count] of zeroRuns) {
      const off = start * m.chunkSize;
      const len = Math.min(count * m.chunkSize, m.size - off);
      await target.zero(off, len);
      result.bytesZero += len;
    }
    let next = 0;
    let failed: { err: unknown } | undefined;
    const worker = async (): Promise<void> => {
      while (!failed && next < ranges.length) {
        const r = ranges[next++]!;
        try {
          checkAbort(opts.signal, 'the restore');
          let buf: Buffer;
          try {
            buf = await repo.readPackRange(r.pack, r.offset, r.length);
          } catch (err) {
            if (!isObjectMissing(err)) throw err;
            throw new NbdError('BACKUP_DATA_CORRUPT', `pack ${packKey(r.pack)} is missing (backup ${m.id}, chunk ${r.first})`);
          }
          result.bytesFetched += buf.length;
          if (buf.length !== r.length) {
            throw new NbdError('BACKUP_DATA_CORRUPT', `pack ${packKey(r.pack)} is truncated (backup ${m.id}, chunk ${r.first})`);
          }
          // Decode and verify on the codec pool (the plaintexts come back in one buffer).
          const ids = Buffer.allocUnsafeSlow(32 * r.locs.length);
          r.locs.forEach(({ entry }, k) => entry.id.copy(ids, 32 * k));
          const { data, bad } = await pool.decode(
            repo.keys,
            buf,
            r.locs.map(({ entry }, k) => ({ offset: entry.offset - r.offset, length: entry.length, rawLength: index.chunkLength(r.first + k) })),
            ids,
          );
          if (bad >= 0) {
            const i = r.first + bad;
            throw new NbdError(
              'BACKUP_DATA_CORRUPT',
              `pack ${packKey(r.pack)}: chunk ${r.locs[bad]!.entry.id.toString('hex')} fails verification (backup ${m.id}, chunk ${i} at offset ${i * m.chunkSize}); refusing to restore it`,
            );
          }
          await target.write(r.first * m.chunkSize, data);
          result.bytesWritten += data.length;
        } catch (err) {
          failed ??= { err };
        }
      }
    };
    await Promise.all(Array.from({ length: concurrency }, worker));
    if (failed) throw failed.err;
    await target.commit();
  } catch (err) {
    await target.abort().catch(() => undefined);
    throw err;
  }
  return result;
}
