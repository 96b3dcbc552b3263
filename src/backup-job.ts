// The backup job (src/jobs.ts, kind "backup"): backs up one snapshot of the
// volume into a repository (src/backup/), in whichever process has the volume
// open: the serving server (request through the control socket) or, offline,
// the CLI process (which then runs it to its end).
//
// Without a snapshot given, the job makes its own, `backup-<job id>`,
// recorded as a backup base of that repository (SnapshotRecord.backupBase);
// once the backup is complete, older bases this job kind made for the same
// repository are deleted (a snapshot the user made is never deleted). The
// parent (incremental) is the newest backup of this volume in the repository
// whose snapshot still exists on the volume, created before that backup
// started (so a snapshot deleted and made again under the same name is not
// taken for it).
//
// Crash order (each step idempotent; a kill anywhere leaves the record
// running and the next open that runs jobs resumes it at the first step not
// known done):
//   1. manifest: the job record (running; params: repository, snapshot name,
//      autoSnapshot, the backup id chosen up front) with nextJobId;
//   2. auto: the snapshot is created if the volume has none of that name
//      (a crash between 1 and 2 makes it at resume: the backup then shows the
//      volume at the resume, which is still after the request);
//   3. manifest: the parent chosen (once: a resume keeps it, unless its
//      snapshot was deleted meanwhile);
//   4. the repository backup under the chosen id (src/backup/backup.ts: packs
//      before their packidx, index, manifest last). If the repository holds
//      that backup's manifest already, it is complete and is not run again;
//      else it is rerun, and dedup against the packs already uploaded means
//      it re-sends at most what was in flight;
//   5. older auto bases of this repository deleted (snapshot delete's own
//      crash order; one not deleted now is deleted by the next backup);
//   6. manifest: the record done, with the result.
// Failure or cancel before step 4 completed: the auto snapshot is deleted (no
// backup refers to it), then the record is failed / canceled. Cancel: the
// record is set canceling first (durable), then the running step aborts
// (JOB_CANCELED); a canceling record found at open is finished as canceled.
// A record whose owner is another live process on this host is never taken
// over (src/jobs.ts ownerAliveElsewhere).
//
// Credentials: S3 secrets given as flags stay in the memory of the process
// that runs the job (never in the manifest); a resume after a restart uses
// that process's AWS environment. The key file is recorded by path.
//
// Threads: the main JS thread drives it; reads of disk@SNAP are NBD reads
// served by the server's own threads; coding runs on the codec pool.
import * as fs from 'node:fs';
import * as path from 'node:path';
import { NbdError, isErrorCode } from './errors';
import { addJob, baseInfo, isFinished, ownerAliveElsewhere, progress, putJob, thisOwner, unfinished, type JobInfo, type JobKind } from './jobs';
import { ForwardingChunkSource } from './backup/source';
import { volumeSource } from './backup/volume-source';
import { backup, openRepository, type BackupStats, type ChunkSource, type Repository, type S3Flags } from './backup/index';
import { newBackupId } from './backup/manifest';
import type { Volume } from './volume';
import type { JobRecord } from './volume-meta';

export interface BackupParams {
  /** REPO as given (a local directory is recorded absolute). */
  repo: string;
  keyFile?: string;
  /** S3 settings other than secrets. */
  s3?: Pick<S3Flags, 'endpoint' | 'region' | 'forcePathStyle'>;
  snapshot: string;
  autoSnapshot: boolean;
  /** The repository backup's id, chosen when the job is recorded. */
  backupId: string;
  /** Chosen once (step 3): the parent backup, or null for a full one. */
  parent?: string | null;
  parentSnapshot?: string | null;
  /** The id of the snapshot record step 4 reads (set before it reads). */
  snapshotId?: number;
  result?: { backup: string; parent: string | null; stats: BackupStats; deleted: string[] };
}

export interface BackupRequest {
  repo: string;
  keyFile?: string;
  s3?: S3Flags;
  snapshot?: string;
}

export interface BackupJobInfo extends JobInfo {
  type: 'backup';
  repo: string;
  snapshot: string;
  autoSnapshot: boolean;
  backup: string;
  parent?: string | null;
  result?: BackupParams['result'];
  /** Set when `backup create` resumed an interrupted backup instead of starting one. */
  resumed?: boolean;
}

/** How often a running backup's progress cursor is written to the manifest. */
const CURSOR_SAVE_MS = 5000;

function params(rec: JobRecord): BackupParams {
  return rec.params as unknown as BackupParams;
}

/** The volume's name in repositories: its image's real path (backups group by it). */
export function volumeName(image: string): string {
  try {
    return fs.realpathSync(image);
  } catch {
    return path.resolve(image);
  }
}

/**
 * THE one place a backup obtains its ChunkSource: disk@`snapshot` of this
 * volume (src/backup/volume-source.ts volumeSource), listing only the chunks
 * the server's change map says changed since `parentSnapshot` (null: every
 * chunk, a full read), read over NBD through this process's own server
 * (Volume.exportUri: the server's listener online; offline a private unix
 * socket in a 0700 temporary directory, src/server.ts ownUri).
 * When the change map cannot be exact (CHANGES_UNAVAILABLE: the parent's
 * snapshot failed), the backup reads every chunk instead: still exact, with
 * the parent kept for dedup only.
 *
 * Test hook: NBD_TEST_BACKUP_READ_DELAY_MS delays every read (a test keeps a
 * backup running that long per read, to kill or cancel it mid-way).
 */
export async function sourceFor(v: Volume, snapshot: string, parentSnapshot: string | null): Promise<ChunkSource> {
  const volume = volumeName(v.image);
  let src: ChunkSource;
  try {
    src = await volumeSource(v, { snapshot, since: parentSnapshot, volume });
  } catch (err) {
    if (!(err instanceof NbdError && err.code === 'CHANGES_UNAVAILABLE')) throw err;
    v.log.warn({ snapshot, since: parentSnapshot, reason: err.message }, 'no exact change map: this backup reads every chunk');
    src = await volumeSource(v, { snapshot, since: null, volume });
  }
  const delay = Number(process.env.NBD_TEST_BACKUP_READ_DELAY_MS) || 0;
  if (!delay) return src;
  return new (class extends ForwardingChunkSource {
    override async read(offset: number, buf: Buffer): Promise<void> {
      await new Promise((r) => setTimeout(r, delay));
      await this.inner.read(offset, buf);
    }
  })(src);
}

export class Backups implements JobKind<BackupJobInfo> {
  readonly type = 'backup';
  /** Per running job: its cancel switch. */
  private readonly cancelers = new Map<number, AbortController>();
  /** Live progress of running jobs (the record's cursor is written every CURSOR_SAVE_MS). */
  private readonly live = new Map<number, { done: number; total: number }>();
  /** S3 secrets given with a request, by job id (memory only). */
  private readonly secrets = new Map<number, S3Flags>();

  constructor(private readonly v: Volume) {}

  describe(rec: JobRecord): BackupJobInfo {
    const p = params(rec);
    const live = this.live.get(rec.id);
    let prog = live && !isFinished(rec.state) ? progress(live.done, live.total) : progress(rec.cursor.done, rec.cursor.total);
    if (!isFinished(rec.state) && prog.total === 0) prog = { ...prog, percent: 0 }; // not reading yet: nothing known done
    return {
      ...baseInfo(rec, prog),
      type: 'backup',
      repo: p.repo,
      snapshot: p.snapshot,
      autoSnapshot: p.autoSnapshot,
      backup: p.backupId,
      ...(p.parent !== undefined ? { parent: p.parent } : {}),
      ...(p.result ? { result: p.result } : {}),
    };
  }

  /**
   * `backup create`: records a backup job and starts it. An interrupted
   * backup job of this volume (its process was killed) is resumed instead
   * (`resumed: true`); one that runs is JOB_EXISTS.
   */
  async create(req: BackupRequest): Promise<BackupJobInfo> {
    const v = this.v;
    if (v.readOnly && !req.snapshot) throw new NbdError('BAD_ARGUMENT', `${v.image} is served read-only: a backup without --snapshot would create one`);
    const pending = unfinished(v.manifest, this.type);
    if (pending.length) {
      const j = pending[0]!;
      if (this.v.jobs.running(this) || ownerAliveElsewhere(j.owner)) {
        throw new NbdError('JOB_EXISTS', `backup job ${j.id} of ${v.image} is running (to ${params(j).repo}); wait for it: node-nbd-server jobs ${v.image} --wait`);
      }
      v.log.info({ job: j.id }, 'resuming an interrupted backup instead of starting one');
      this.v.jobs.start(this);
      return { ...this.describe(j), resumed: true };
    }
    if (req.snapshot !== undefined) this.usableSnapshot(req.snapshot);
    // Bad repositories, keys and credentials are refused before anything is recorded.
    const repo = await openRepository(req.repo, { keyFile: req.keyFile, s3: req.s3 });
    await repo.close();
    const rec = await v.serial(async () => {
      if (unfinished(v.manifest, this.type).length) throw new NbdError('JOB_EXISTS', `a backup job of ${v.image} is running`);
      if (req.snapshot !== undefined) this.usableSnapshot(req.snapshot);
      const id = v.manifest.nextJobId ?? 1;
      const s3 = req.s3 ? { endpoint: req.s3.endpoint, region: req.s3.region, forcePathStyle: req.s3.forcePathStyle } : undefined;
      const p: BackupParams = {
        repo: req.repo,
        ...(req.keyFile ? { keyFile: req.keyFile } : {}),
        ...(s3 ? { s3: JSON.parse(JSON.stringify(s3)) as BackupParams['s3'] } : {}),
        snapshot: req.snapshot ?? `backup-${id}`,
        autoSnapshot: req.snapshot === undefined,
        backupId: newBackupId(),
      };
      if (p.autoSnapshot && v.manifest.snapshots.some((s) => s.name === p.snapshot)) {
        throw new NbdError('SNAPSHOT_EXISTS', `volume ${v.image} already has a snapshot named "${p.snapshot}" (the name this backup's base would get)`);
      }
      const added = addJob(v.manifest, this.type, v.image, p);
      v.save(added.manifest); // step 1
      return added.rec as unknown as JobRecord;
    });
    if (req.s3 && (req.s3.accessKeyId || req.s3.secretAccessKey || req.s3.sessionToken)) this.secrets.set(rec.id, req.s3);
    v.log.info({ job: rec.id, repo: req.repo, snapshot: params(rec).snapshot }, 'backup job recorded');
    this.v.jobs.start(this);
    return this.describe(rec);
  }

  /** The snapshot exists and has not failed (SNAPSHOT_NOT_FOUND, SNAPSHOT_FAILED). */
  private usableSnapshot(name: string): void {
    const s = this.v.snapshot(name);
    const info = this.v.snapshots.info(name);
    if (s.state === 'failed' || info.state === 'failed') {
      throw new NbdError('SNAPSHOT_FAILED', `snapshot "${name}" failed and cannot be backed up: ${info.failure?.reason ?? s.failure?.reason ?? 'unknown reason'}`);
    }
  }

  resume(): void {
    for (const r of unfinished(this.v.manifest, this.type).filter((x) => ownerAliveElsewhere(x.owner))) {
      this.v.log.warn({ job: r.id, owner: r.owner }, 'backup job belongs to another live process: not taken over');
    }
    const mine = unfinished(this.v.manifest, this.type).filter((r) => !ownerAliveElsewhere(r.owner));
    if (mine.length === 0 || this.v.jobs.running(this)) return;
    if (this.v.readOnly) return;
    this.v.log.info({ jobs: mine.map((r) => r.id) }, 'resuming unfinished backup jobs');
    this.v.jobs.start(this);
  }

  /** The background loop: runs the unfinished backup jobs this process may run, one at a time. */
  async run(signal: AbortSignal): Promise<void> {
    const skipped = new Set<number>();
    while (!signal.aborted) {
      const rec = unfinished(this.v.manifest, this.type).find((r) => !skipped.has(r.id));
      if (!rec) return;
      if (ownerAliveElsewhere(rec.owner)) {
        this.v.log.warn({ job: rec.id, owner: rec.owner }, 'backup job belongs to another live process: not taken over');
        skipped.add(rec.id);
        continue;
      }
      const ctl = new AbortController();
      this.cancelers.set(rec.id, ctl);
      try {
        await this.runOne(rec.id, AbortSignal.any([signal, ctl.signal]), ctl.signal);
      } catch (err) {
        // Only a failure to record the end lands here: the record stays as it was, retried at the next open.
        this.v.log.error({ job: rec.id, err: (err as Error).message }, 'backup job: could not record its end');
        skipped.add(rec.id);
      } finally {
        this.cancelers.delete(rec.id);
        this.live.delete(rec.id);
      }
    }
  }

  /** Changes the record (in the serial queue); returns it as saved. */
  private update(id: number, fn: (r: JobRecord) => JobRecord, unlessClosing = false): Promise<JobRecord> {
    const v = this.v;
    return v.serial(async () => {
      const cur = v.manifest.jobs?.find((j) => j.id === id);
      if (!cur) throw new NbdError('JOB_NOT_FOUND', `job ${id} is gone from the manifest`);
      if (unlessClosing && v.jobs.aborted) return cur;
      const next = fn(cur);
      v.save(putJob(v.manifest, next));
      return v.manifest.jobs!.find((j) => j.id === id)!;
    });
  }

  private record(id: number): JobRecord | undefined {
    return this.v.manifest.jobs?.find((j) => j.id === id);
  }

  private async runOne(id: number, signal: AbortSignal, canceled: AbortSignal): Promise<void> {
    const v = this.v;
    let rec = this.record(id)!;
    if (rec.state === 'canceling') return this.end(id, 'canceled', { code: 'JOB_CANCELED', message: 'canceled' });
    const owner = thisOwner();
    if (rec.owner.pid !== owner.pid || rec.owner.start !== owner.start) rec = await this.update(id, (r) => ({ ...r, owner }));
    const p = params(rec);
    let completed = false;
    try {
      // Step 2: the snapshot.
      if (p.autoSnapshot && !v.manifest.snapshots.some((s) => s.name === p.snapshot)) {
        await v.snapshots.create(p.snapshot, { backupBase: { job: id, repo: p.repo } });
      } else {
        this.usableSnapshot(p.snapshot);
      }
      const repo = await openRepository(p.repo, { keyFile: p.keyFile, s3: { ...p.s3, ...this.secrets.get(id) } });
      try {
        let done = await this.finished(repo, p.backupId);
        if (!done) {
          // Step 3: the parent, chosen once (again only if its snapshot was deleted meanwhile: the
          // changes are computed from it).
          const cur = params(rec);
          if (cur.parent === undefined || (cur.parent !== null && !this.parentValid(cur.parent, cur.parentSnapshot ?? null, p.snapshot))) {
            const parent = await this.chooseParent(repo, p.backupId, p.snapshot);
            rec = await this.update(id, (r) => ({ ...r, params: { ...r.params, parent: parent?.id ?? null, parentSnapshot: parent?.snapshot ?? null } }));
          }
          // The snapshot record read (by id: the name could be given to another one later).
          const snapId = v.snapshot(params(rec).snapshot).id;
          if (params(rec).snapshotId !== snapId) rec = await this.update(id, (r) => ({ ...r, params: { ...r.params, snapshotId: snapId } }));
          const q = params(rec);
          signal.throwIfAborted();
          // Step 4. From these checks to the change map's name resolution (sourceFor ->
          // changeMap) nothing awaits, so the map is computed from the records checked here: a
          // parent snapshot or a target deleted and made again under its name while the steps
          // above awaited is not used for the changes (the parent then serves dedup only).
          const exact = q.parent ? this.parentValid(q.parent, q.parentSnapshot ?? null, q.snapshot) : false;
          if (v.snapshot(q.snapshot).id !== q.snapshotId) throw new NbdError('SNAPSHOT_NOT_FOUND', `snapshot "${q.snapshot}" was replaced while the backup started`);
          const source = await sourceFor(v, q.snapshot, exact ? (q.parentSnapshot ?? null) : null);
          // The reads go to the export opened by name: the snapshot it showed then must be
          // the one the map was computed for (a later replacement makes its reads fail).
          if (v.manifest.snapshots.find((s) => s.name === q.snapshot)?.id !== q.snapshotId) {
            await source.close().catch(() => undefined);
            throw new NbdError('SNAPSHOT_NOT_FOUND', `snapshot "${q.snapshot}" was replaced while the backup started`);
          }
          const total = Math.ceil(source.size / source.chunkSize);
          this.live.set(id, { done: 0, total });
          let saved = Date.now();
          try {
            done = await backup(repo, source, {
              parent: q.parent ?? null,
              id: q.backupId,
              signal,
              logger: v.log,
              onProgress: (pr) => {
                this.live.set(id, { done: pr.chunksDone, total });
                if (Date.now() - saved >= CURSOR_SAVE_MS && !signal.aborted) {
                  saved = Date.now();
                  // Informative only (a resume reruns the backup; dedup skips what was uploaded), so
                  // it is dropped once the volume closes: no manifest write after the lock is released.
                  void this.update(id, (r) => ({ ...r, cursor: { done: pr.chunksDone, total } }), true).catch(() => undefined);
                }
              },
            });
          } finally {
            await source.close().catch(() => undefined);
          }
        }
        completed = true;
        // Step 5a: the snapshot record lists this backup (what makes it a parent later).
        await this.recordBackupOf(params(this.record(id) ?? rec).snapshotId, done.id);
        // Step 5: older bases of this repository.
        const deleted = await this.rotate(id, p);
        // Step 6.
        const result = { backup: done.id, parent: done.parent, stats: done.stats, deleted };
        const n = Math.ceil(done.size / done.chunkSize);
        await this.update(id, (r) => ({ ...r, state: 'done', cursor: { done: n, total: n }, params: { ...r.params, result } }));
        v.log.info({ job: id, backup: done.id, parent: done.parent, ...done.stats }, 'backup job done');
      } finally {
        await repo.close().catch(() => undefined);
      }
    } catch (err) {
      if (signal.aborted && !canceled.aborted) return; // the volume closes: resumed at the next open
      const e = err as { code?: string; message?: string };
      const wasCanceled = canceled.aborted || this.record(id)?.state === 'canceling';
      if (!completed && p.autoSnapshot) await this.dropSnapshot(p.snapshot);
      if (wasCanceled) await this.end(id, 'canceled', { code: 'JOB_CANCELED', message: 'canceled' });
      else {
        const code = isErrorCode(e.code) ? e.code : 'BACKUP_SOURCE_FAILED';
        v.log.error({ job: id, code, err: e.message }, 'backup job failed');
        await this.end(id, 'failed', { code, message: e.message ?? String(err) });
      }
    }
  }

  private async end(id: number, state: 'failed' | 'canceled', error: { code: string; message: string }): Promise<void> {
    const rec = this.record(id);
    if (rec?.state === 'canceling' || (rec && !isFinished(rec.state))) {
      if (rec.state === 'canceling' && params(rec).autoSnapshot && !params(rec).result) await this.dropSnapshot(params(rec).snapshot);
      await this.update(id, (r) => ({ ...r, state, error }));
    }
  }

  /** Whether the repository holds backup `id` already (its manifest is written last). */
  private async finished(repo: Repository, id: string) {
    try {
      return await repo.readManifest(id);
    } catch (err) {
      if (err instanceof NbdError && err.code === 'BACKUP_NOT_FOUND') return null;
      throw err;
    }
  }

  /**
   * Whether backup `parent` is still an exact base for a backup of `target`:
   * the snapshot record it was made of (listing it in `backups`, so the same
   * record, not a later one under the same name) is active and older than
   * `target` (the change map runs from it to `target`).
   */
  private parentValid(parent: string, parentSnapshot: string | null, target: string): boolean {
    const snaps = this.v.manifest.snapshots;
    const i = snaps.findIndex((s) => s.name === parentSnapshot && s.state === 'active' && (s.backups ?? []).includes(parent));
    const j = snaps.findIndex((s) => s.name === target);
    return i >= 0 && j >= 0 && i < j;
  }

  /** Adds backup `id` to snapshot record `snapshotId` if it still exists (once). */
  private async recordBackupOf(snapshotId: number | undefined, id: string): Promise<void> {
    const v = this.v;
    if (snapshotId === undefined) return; // read before this was recorded: never a parent
    await v.serial(async () => {
      const s = v.manifest.snapshots.find((x) => x.id === snapshotId);
      if (!s || (s.backups ?? []).includes(id)) return;
      v.save({ ...v.manifest, snapshots: v.manifest.snapshots.map((x) => (x === s ? { ...x, backups: [...(x.backups ?? []), id] } : x)) });
    });
  }

  /**
   * The newest backup of this volume that this volume's manifest records as
   * made of a snapshot record that still exists, is active and is older than
   * `target` (names, times and paths alone can be shared by other content:
   * a snapshot deleted and made again, a clock stepped back, another
   * volume at the same path).
   */
  private async chooseParent(repo: Repository, self: string, target: string) {
    const name = volumeName(this.v.image);
    const m = this.v.manifest;
    const candidates = (await repo.listManifests()).filter((b) => {
      if (b.id === self || b.volume !== name || b.size !== m.size || b.chunkSize !== m.chunkSize || !b.snapshot) return false;
      return this.parentValid(b.id, b.snapshot, target);
    });
    candidates.sort((a, b) => (a.time < b.time ? -1 : a.time > b.time ? 1 : a.id < b.id ? -1 : 1));
    return candidates.at(-1) ?? null;
  }

  /** Deletes the auto bases of this repository other than this job's (and any an unfinished backup uses). */
  private async rotate(id: number, p: BackupParams): Promise<string[]> {
    const v = this.v;
    const inUse = new Set(
      unfinished(v.manifest, this.type)
        .filter((r) => r.id !== id)
        .flatMap((r) => [params(r).snapshot, params(r).parentSnapshot ?? '']),
    );
    const old = v.manifest.snapshots.filter((s) => s.backupBase?.repo === p.repo && s.name !== p.snapshot && !inUse.has(s.name));
    const deleted: string[] = [];
    for (const s of old) {
      try {
        await v.snapshots.delete(s.name);
        deleted.push(s.name);
      } catch (err) {
        v.log.warn({ snapshot: s.name, err: (err as Error).message }, 'could not delete the previous backup base (the next backup tries again)');
      }
    }
    return deleted;
  }

  private async dropSnapshot(name: string): Promise<void> {
    if (!this.v.manifest.snapshots.some((s) => s.name === name)) return;
    try {
      await this.v.snapshots.delete(name);
    } catch (err) {
      this.v.log.warn({ snapshot: name, err: (err as Error).message }, 'could not delete the unfinished backup\'s snapshot');
    }
  }

  async cancel(rec: JobRecord): Promise<JobRecord> {
    const id = rec.id;
    if (rec.state === 'running') await this.update(id, (r) => ({ ...r, state: 'canceling' }));
    const ctl = this.cancelers.get(id);
    if (ctl) {
      ctl.abort(new NbdError('JOB_CANCELED', `backup job ${id} was canceled`));
      // The loop ends it (canceled, or done if it had completed the backup already).
      while (!isFinished(this.record(id)?.state ?? 'done')) await new Promise((r) => setTimeout(r, 50));
    } else if (!ownerAliveElsewhere(rec.owner)) {
      await this.end(id, 'canceled', { code: 'JOB_CANCELED', message: 'canceled' });
    }
    return this.record(id) ?? rec;
  }
}
