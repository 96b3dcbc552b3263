// Change maps: which chunks of a volume may differ between snapshot A (older)
// and snapshot B, or between A and the live volume. Backups read only these
// chunks; `diff` prints them. The addon computes the union of the
// copy-on-write bitmaps (native/core/change_map.hh, Volume::changed_chunks):
// no data is read and nothing is hashed. This module validates the request
// against the manifest (names, order, failures) with precise errors, then
// asks the addon, which re-checks against the live chain (a failure the
// manifest has not recorded yet is still refused there).
//
// The answer is a cover, never short of a real change: every chunk whose
// content differs is listed; a chunk may be listed although a later write put
// its old content back. Invariants and their tests: docs/architecture.md,
// "Change maps".
import type { ChunkRun } from './backup/source';
import { fromNative, NbdError } from './errors';
import type { Volume } from './volume';

export interface ChangeMap {
  /** Snapshot A: the map lists changes after it. */
  from: string;
  /** Snapshot B, or null for the live volume. */
  to: string | null;
  /** Volume size in bytes (the last chunk may be short). */
  size: number;
  chunkSize: number;
  /** Ascending, disjoint runs of chunk indexes that may differ. */
  runs: ChunkRun[];
}

/** A byte range of a change map (the last run ends at the volume's size). */
export interface ByteRun {
  offset: number;
  length: number;
}

/** Throws TypeError/RangeError for arguments that are not a snapshot name pair. */
export function validateChangeRange(from: unknown, to: unknown): asserts from is string {
  if (typeof from !== 'string' || from === '') throw new TypeError('from must be a snapshot name (a non-empty string)');
  if (to !== null && (typeof to !== 'string' || to === '')) throw new TypeError('to must be a snapshot name or null (the live volume)');
}

/** Decodes the addon's [start, count, ...] pairs. */
export function runsFromPairs(pairs: Float64Array): ChunkRun[] {
  if (pairs.length % 2 !== 0) throw new RangeError('change map pairs must come in twos');
  const runs: ChunkRun[] = [];
  for (let i = 0; i < pairs.length; i += 2) runs.push({ start: pairs[i]!, count: pairs[i + 1]! });
  return runs;
}

/** The runs in bytes, clipped to the volume's size. */
export function byteRuns(map: Pick<ChangeMap, 'size' | 'chunkSize' | 'runs'>): ByteRun[] {
  return map.runs.map((r) => {
    const offset = r.start * map.chunkSize;
    return { offset, length: Math.min((r.start + r.count) * map.chunkSize, map.size) - offset };
  });
}

/** Computes the change map of `v` from snapshot `from` to snapshot `to` (null: the live volume). */
export async function changeMap(v: Volume, from: string, to: string | null): Promise<ChangeMap> {
  validateChangeRange(from, to);
  const snaps = v.manifest.snapshots;
  const a = v.snapshot(from); // SNAPSHOT_NOT_FOUND
  const b = to === null ? null : v.snapshot(to);
  if (b) {
    const ia = snaps.indexOf(a);
    const ib = snaps.indexOf(b);
    if (ia === ib) throw new NbdError('CHANGES_RANGE_INVALID', `the range starts and ends at the same snapshot ("${from}")`);
    if (ia > ib) throw new NbdError('CHANGES_RANGE_INVALID', `snapshot "${from}" is not older than snapshot "${to}"`);
  }
  // A failed A lost chunks without recording them; a failed B lost its content.
  if (a.state === 'failed') {
    throw new NbdError('CHANGES_UNAVAILABLE', `snapshot "${from}" failed, so the changes since it cannot be known: ${a.failure?.reason ?? 'no reason recorded'}`);
  }
  if (b?.state === 'failed') {
    throw new NbdError('CHANGES_UNAVAILABLE', `snapshot "${to}" failed, so its content is lost: ${b.failure?.reason ?? 'no reason recorded'}`);
  }
  let pairs: Float64Array;
  try {
    pairs = await v.native.changedChunks(v.exportName, a.id, b ? b.id : null);
  } catch (err) {
    const e = fromNative(err);
    // The addon names snapshots by id: put the names back.
    if (e instanceof NbdError) throw new NbdError(e.code, `${v.image} ${from}..${to ?? 'live'}: ${e.message}`, { cause: err });
    throw e;
  }
  return { from, to, size: v.manifest.size, chunkSize: v.chunkSize, runs: runsFromPairs(pairs) };
}
