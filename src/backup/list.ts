// list(): the finished backups of a repository (those with a manifest),
// oldest first, as plain records for `backup list [--json]`.
import type { Manifest } from './manifest';
import type { Repository } from './repository';

/** A manifest's fields a listing shows (the manifest less its format version and index reference). */
export type BackupListEntry = Pick<Manifest, 'id' | 'parent' | 'time' | 'volume' | 'snapshot' | 'size' | 'chunkSize' | 'stats'>;

export async function listBackups(repo: Repository): Promise<BackupListEntry[]> {
  return (await repo.listManifests()).map((m) => ({
    id: m.id,
    parent: m.parent,
    time: m.time,
    volume: m.volume,
    snapshot: m.snapshot,
    size: m.size,
    chunkSize: m.chunkSize,
    stats: m.stats,
  }));
}
