// list(): the finished backups of a repository (those with a manifest),
// oldest first, as plain records for `backup list [--json]`.
import type { BackupStats } from './manifest';
import type { Repository } from './repository';

export interface BackupListEntry {
  id: string;
  parent: string | null;
  time: string;
  volume: string;
  snapshot: string | null;
  size: number;
  chunkSize: number;
  stats: BackupStats;
}

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
