// prune(): forgets backups by a retention policy and deletes the data no
// remaining backup needs.
//
// Policy (restic's semantics, per volume): backups sorted newest first;
// keepLast keeps the N newest; keepHourly/Daily/Weekly/Monthly/Yearly keep
// the newest backup of each of the N most recent hours/days/ISO weeks/
// months/years (UTC) that have one. A backup kept by any rule is kept. An
// empty policy is refused (it would forget everything).
//
// Steps and safety (locking protocol in locks.ts):
//  1. write the prune lock;
//  2. delete the manifests of forgotten backups (then their indexes): a
//     backup without a manifest is gone, whatever else remains;
//  3. if any live backup lock is listed, stop here: packs stay (a running
//     backup may have deduplicated against any of them, or copied ids from
//     a just-forgotten parent); the result says `deferred`;
//  4. else compute the packs that the remaining backups' chunks map to and
//     delete every other pack (packidx first, then the pack), indexes with
//     no manifest (left by killed backups), dead or expired locks and (local
//     directories) temporary files over an hour old.
// Packs that are only partly referenced are kept whole (no repacking yet);
// `bytesReclaimable` reports what a repack could free.
import { NbdError } from '../errors';
import type { Logger } from '../logger';
import { LocalBackend } from './backend-local';
import { indexKey } from './backup-index';
import { forEachLimit } from './bounded';
import { DEFAULT_LOCK_TTL_MS, listLocks, liveLocks, RepoLock } from './locks';
import { manifestKey, type Manifest } from './manifest';
import { packIndexKey, packKey } from './pack';
import { idKey, type Repository } from './repository';

export interface PrunePolicy {
  keepLast?: number;
  keepHourly?: number;
  keepDaily?: number;
  keepWeekly?: number;
  keepMonthly?: number;
  keepYearly?: number;
}

export interface PruneOptions {
  dryRun?: boolean;
  lockTtlMs?: number;
  logger?: Logger;
}

export interface PruneResult {
  kept: string[];
  forgotten: string[];
  /** True when a running backup kept packs from being deleted (run prune again later). */
  deferred: boolean;
  packsDeleted: number;
  bytesDeleted: number;
  /** Bytes in kept packs that no backup uses. */
  bytesReclaimable: number;
}

function isoWeek(d: Date): string {
  const t = new Date(Date.UTC(d.getUTCFullYear(), d.getUTCMonth(), d.getUTCDate()));
  const day = t.getUTCDay() || 7;
  t.setUTCDate(t.getUTCDate() + 4 - day);
  const y = t.getUTCFullYear();
  const week = Math.ceil(((t.getTime() - Date.UTC(y, 0, 1)) / 86400000 + 1) / 7);
  return `${y}-W${week}`;
}

/** The ids a policy keeps among `backups` (all of one volume or not: grouped here). */
export function applyPolicy(backups: Manifest[], policy: PrunePolicy): Set<string> {
  const rules: [number | undefined, (d: Date) => string][] = [
    [policy.keepLast, () => ''],
    [policy.keepHourly, (d) => d.toISOString().slice(0, 13)],
    [policy.keepDaily, (d) => d.toISOString().slice(0, 10)],
    [policy.keepWeekly, isoWeek],
    [policy.keepMonthly, (d) => d.toISOString().slice(0, 7)],
    [policy.keepYearly, (d) => d.toISOString().slice(0, 4)],
  ];
  for (const [n] of rules) if (n !== undefined && !(Number.isInteger(n) && n >= 0)) throw new NbdError('BAD_ARGUMENT', `keep counts must be integers >= 0, got ${n}`);
  if (!rules.some(([n]) => n !== undefined && n > 0)) throw new NbdError('BAD_ARGUMENT', 'prune needs a policy that keeps something (--keep-last N, --keep-daily N, ...)');
  const keep = new Set<string>();
  const byVolume = new Map<string, Manifest[]>();
  for (const b of backups) {
    const g = byVolume.get(b.volume) ?? [];
    g.push(b);
    byVolume.set(b.volume, g);
  }
  for (const group of byVolume.values()) {
    group.sort((a, b) => (a.time < b.time ? 1 : a.time > b.time ? -1 : a.id < b.id ? 1 : -1));
    rules.forEach(([n, bucket], r) => {
      if (!n) return;
      const seen = new Set<string>();
      for (const b of group) {
        const key = r === 0 ? b.id : bucket(new Date(b.time));
        if (seen.has(key)) continue;
        if (seen.size >= n) break;
        seen.add(key);
        keep.add(b.id);
      }
    });
  }
  return keep;
}

export async function prune(repo: Repository, policy: PrunePolicy, opts: PruneOptions = {}): Promise<PruneResult> {
  const log = opts.logger?.child({ component: 'prune' });
  const lock = opts.dryRun ? null : await RepoLock.acquire(repo, 'prune', opts.lockTtlMs ?? DEFAULT_LOCK_TTL_MS);
  try {
    const manifests = await repo.listManifests();
    const keepIds = applyPolicy(manifests, policy);
    const kept = manifests.filter((m) => keepIds.has(m.id));
    const forgotten = manifests.filter((m) => !keepIds.has(m.id)).map((m) => m.id);
    const result: PruneResult = { kept: kept.map((m) => m.id), forgotten, deferred: false, packsDeleted: 0, bytesDeleted: 0, bytesReclaimable: 0 };
    if (opts.dryRun) return result;

    for (const id of forgotten) {
      lock!.assertHeld();
      await repo.backend.delete(manifestKey(id));
      await repo.backend.delete(indexKey(id));
    }

    const running = await liveLocks(repo, 'backup');
    if (running.length > 0) {
      result.deferred = true;
      log?.info({ forgotten: forgotten.length, running: running.length }, 'prune: backups running, packs kept');
      return result;
    }

    // What the remaining backups use. Re-list: a backup may have finished
    // between the first listing and the lock check.
    const remaining = await repo.listManifests();
    // A damaged packidx throws here (REPO_CORRUPT): its pack would look
    // unused, and deleting it would lose what a repair could still read
    // from the pack's own trailer.
    const known = await repo.chunkMap();
    const usedBlobs = new Map<string, Set<string>>();
    for (const m of remaining) {
      const index = await repo.readIndex(m);
      for (let i = 0; i < index.count; i++) {
        if (index.isZero(i)) continue;
        const k = idKey(index.id(i));
        const loc = known.get(k);
        if (!loc) continue; // verify reports it; never a reason to delete more
        let s = usedBlobs.get(loc.pack);
        if (!s) usedBlobs.set(loc.pack, (s = new Set()));
        s.add(k);
      }
    }
    const packs = await repo.listPackNames();
    const names = new Set([...packs.keys(), ...(await repo.listPackIndexNames())]);
    const doomed = [...names].filter((n) => !usedBlobs.has(n));
    await forEachLimit(doomed, 8, async (name) => {
      lock!.assertHeld();
      await repo.backend.delete(packIndexKey(name));
      await repo.backend.delete(packKey(name));
      result.packsDeleted++;
      result.bytesDeleted += packs.get(name) ?? 0;
    });
    for (const [pack, used] of usedBlobs) {
      let unused = 0;
      try {
        for (const e of await repo.readPackIndex(pack)) if (!used.has(idKey(e.id))) unused += e.length;
      } catch {
        /* verify reports unreadable pack indexes */
      }
      result.bytesReclaimable += unused;
    }
    // Indexes without a manifest: left by killed backups (no backup runs now).
    const live = new Set(remaining.map((m) => m.id));
    for (const o of await repo.backend.list('indexes/')) {
      if (!live.has(o.key.slice('indexes/'.length))) await repo.backend.delete(o.key);
    }
    for (const l of await listLocks(repo)) if (!l.live) await repo.backend.delete(l.key);
    // Temporary files of killed writers (local directories); an hour old, so
    // a put still finishing (of a backup started after our lock check) is never touched.
    if (repo.backend instanceof LocalBackend) await repo.backend.sweepTemp(60 * 60_000);
    log?.info({ forgotten: forgotten.length, packsDeleted: result.packsDeleted, bytesDeleted: result.bytesDeleted }, 'prune complete');
    return result;
  } finally {
    await lock?.release().catch(() => undefined);
  }
}
