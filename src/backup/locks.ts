// Repository locks: objects locks/<kind>.<ttl ms>.<random> that say "a
// backup (or prune) is running". They are advisory records with an expiry,
// because a backend (S3) has no atomic lock primitive and a killed process
// cannot clean up.
//
// - Liveness: a lock is live while its object's modification time (the
//   backend's clock) plus its TTL is in the future of the backend's now().
//   The holder rewrites the object every TTL/3, which moves its mtime.
// - A holder that could not refresh in time must stop before it commits
//   anything that relies on the lock: assertHeld() throws REPO_LOCKED once
//   0.8 x TTL has passed since the start of the last successful refresh
//   (local monotonic clock; the margin absorbs clock-rate differences).
//
// The protocol between backups and prunes (the only pair that conflicts):
//   backup: write own lock; then wait until no live prune lock is listed;
//           only then load the chunk map (what it may dedup against) and
//           the parent index; assertHeld() before writing the manifest.
//   prune:  write own lock; forget manifests; then, only if no live backup
//           lock is listed, delete unreferenced packs (packidx first),
//           orphan indexes and expired locks.
// A killed holder's lock would keep prunes from deleting packs until it
// expires. So a lock also names its owner: boot id, PID namespace, PID and the
// process's start time. A lock whose owner ran under this kernel boot and in
// this PID namespace, and whose PID is gone or now belongs to a process that
// started at another time, is dead at once. Any other owner (another machine
// or container, a non-Linux host, an unreadable body) counts as alive until
// the lock expires: the check can only shorten the wait, never cut short a
// running holder.
//
// Each side writes its lock before listing the other's, and listings are
// strongly consistent (S3 since 2020, radosgw, a local directory), so of a
// backup and a prune that overlap at least one sees the other: either the
// prune deletes no packs, or the backup waits for the prune to finish and
// then sees only the packs that survived. A backup therefore never
// references a pack that a prune deletes. Backups do not exclude each other:
// each writes packs named by their content and its own index and manifest.
import * as fs from 'node:fs';
import * as os from 'node:os';
import { performance } from 'node:perf_hooks';
import { randomBytes } from 'node:crypto';
import { isObjectMissing } from './backend';
import { NbdError } from '../errors';
import { checkAbort } from './bounded';
import type { Repository } from './repository';

export type LockKind = 'backup' | 'prune';

export const DEFAULT_LOCK_TTL_MS = 15 * 60_000;

export interface LockInfo {
  key: string;
  kind: LockKind;
  ttlMs: number;
  mtimeMs: number;
}

function parseLockKey(key: string, mtimeMs: number): LockInfo | null {
  const m = /^locks\/(backup|prune)\.(\d+)\.[0-9a-f]+$/.exec(key);
  if (!m) return null;
  return { key, kind: m[1] as LockKind, ttlMs: Number(m[2]), mtimeMs };
}

/** Who holds a lock, as precisely as this host can tell a process apart. */
export interface LockOwner {
  host: string;
  /** /proc/sys/kernel/random/boot_id ('' where unknown). */
  bootId: string;
  /** The PID namespace, as /proc/self/ns/pid reads ('' where unknown). */
  pidNs: string;
  pid: number;
  /** Field 22 of /proc/PID/stat: start time in clock ticks since boot ('' where unknown). */
  start: string;
}

function readOr(fn: () => string): string {
  try {
    return fn().trim();
  } catch {
    return '';
  }
}

function startTime(pid: number): string {
  return readOr(() => {
    const stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
    return stat.slice(stat.lastIndexOf(')') + 2).split(' ')[19] ?? '';
  });
}

let self: LockOwner | undefined;

export function selfOwner(): LockOwner {
  self ??= {
    host: os.hostname(),
    bootId: readOr(() => fs.readFileSync('/proc/sys/kernel/random/boot_id', 'utf8')),
    pidNs: readOr(() => fs.readlinkSync('/proc/self/ns/pid')),
    pid: process.pid,
    start: startTime(process.pid),
  };
  return self;
}

/** True only when `o` certainly names a process of this boot and PID namespace that has exited. */
export function ownerIsDead(o: Partial<LockOwner> | undefined): boolean {
  const me = selfOwner();
  if (!o || !me.bootId || !me.pidNs || o.bootId !== me.bootId || o.pidNs !== me.pidNs || typeof o.pid !== 'number' || !o.start) return false;
  if (o.pid === me.pid) return o.start !== me.start;
  const now = startTime(o.pid);
  return now === '' ? !fs.existsSync(`/proc/${o.pid}`) : now !== o.start;
}

/** Every lock object, with whether it is live: not expired on the backend's clock, and its owner not known dead. */
export async function listLocks(repo: Repository): Promise<(LockInfo & { live: boolean; owner?: LockOwner })[]> {
  const objs = await repo.backend.list('locks/');
  const now = await repo.backend.now();
  const out: (LockInfo & { live: boolean; owner?: LockOwner })[] = [];
  for (const o of objs) {
    const l = parseLockKey(o.key, o.mtimeMs);
    if (!l) continue;
    if (l.mtimeMs + l.ttlMs <= now) {
      out.push({ ...l, live: false });
      continue;
    }
    let owner: LockOwner | undefined;
    try {
      owner = (JSON.parse((await repo.backend.get(o.key)).toString('utf8')) as { owner?: LockOwner }).owner;
    } catch (err) {
      if (isObjectMissing(err)) continue; // released since the listing
      owner = undefined; // unreadable: alive until it expires
    }
    out.push({ ...l, live: !ownerIsDead(owner), owner });
  }
  return out;
}

export async function liveLocks(repo: Repository, kind: LockKind, exceptKey?: string): Promise<LockInfo[]> {
  return (await listLocks(repo)).filter((l) => l.live && l.kind === kind && l.key !== exceptKey);
}

export class RepoLock {
  readonly key: string;
  readonly kind: LockKind;
  readonly ttlMs: number;
  private readonly repo: Repository;
  private timer: NodeJS.Timeout | undefined;
  /** performance.now() at the start of the last successful write of the lock. */
  private heldSince = 0;
  private refreshing: Promise<void> | undefined;
  private released = false;

  private constructor(repo: Repository, kind: LockKind, ttlMs: number) {
    this.repo = repo;
    this.kind = kind;
    this.ttlMs = ttlMs;
    this.key = `locks/${kind}.${ttlMs}.${randomBytes(8).toString('hex')}`;
  }

  static async acquire(repo: Repository, kind: LockKind, ttlMs = DEFAULT_LOCK_TTL_MS): Promise<RepoLock> {
    if (!(ttlMs >= 1000)) throw new RangeError(`lock TTL must be at least 1000 ms, got ${ttlMs}`);
    const lock = new RepoLock(repo, kind, Math.round(ttlMs));
    await lock.write();
    lock.timer = setInterval(() => {
      lock.refreshing ??= lock
        .write()
        .catch(() => undefined) // a missed refresh shows in assertHeld()
        .finally(() => (lock.refreshing = undefined));
    }, Math.max(250, Math.floor(lock.ttlMs / 3)));
    lock.timer.unref();
    return lock;
  }

  private async write(): Promise<void> {
    if (this.released) return;
    const started = performance.now();
    const body = JSON.stringify({ kind: this.kind, time: new Date().toISOString(), owner: selfOwner() });
    await this.repo.backend.put(this.key, Buffer.from(body));
    this.heldSince = started;
  }

  /** Throws REPO_LOCKED when the lock may have expired in others' eyes. */
  assertHeld(): void {
    if (this.released || performance.now() - this.heldSince > this.ttlMs * 0.8) {
      throw new NbdError('REPO_LOCKED', `${this.repo.location}: this ${this.kind}'s lock could not be refreshed in time; stopping before commit`);
    }
  }

  async release(): Promise<void> {
    if (this.released) return;
    this.released = true;
    if (this.timer) clearInterval(this.timer);
    await this.refreshing;
    await this.repo.backend.delete(this.key);
  }
}

/**
 * Waits until no prune holds the repository (polling every pollMs), or
 * throws REPO_LOCKED after waitMs. Call with the caller's own lock written.
 */
export async function waitForNoPrune(repo: Repository, waitMs: number, pollMs = 500, signal?: AbortSignal): Promise<void> {
  const deadline = performance.now() + waitMs;
  for (;;) {
    const prunes = await liveLocks(repo, 'prune');
    if (prunes.length === 0) return;
    if (performance.now() >= deadline) {
      throw new NbdError('REPO_LOCKED', `${repo.location}: a prune is running (${prunes.map((p) => p.key).join(', ')}); try again later`);
    }
    checkAbort(signal, 'the wait for a prune');
    await new Promise((r) => setTimeout(r, pollMs));
  }
}
