// Volume metadata beside each image, in IMAGE.nbd/ (docs/architecture.md,
// "On-disk format"):
//   manifest.json   which snapshots exist, in order, with their names and state;
//                   versioned, with a SHA-256 over its content; replaced atomically
//                   (write temp, fsync, rename, fsync dir).
//   snap-<id>.snap  snapshot <id>: preserved chunk data (sparse) and its
//                   checksummed log (native/core/snapshot_store.cc, format 2)
//   rollback-<n>.merge  the running rollback merge's pending set and progress
//                   (native/core/merge_job.hh); its job record is in the manifest
//   history.jsonl   every rollback and finished merge, one JSON line each (src/history.ts)
//   journal.state   which first-write journal may hold acknowledged writes
//                   (native/core/journal_state.hh)
//   lock            flock'ed by the process that owns the volume (see lockVolume);
//                   holds its PID for messages only
//   control.sock    the serving server's control socket
//
// Modes: IMAGE.nbd/ is 0700 and everything in it 0600, whatever the umask and
// whatever the image's own mode (ensureMetaDir): the snapshot stores hold the
// disk's old data and the control socket changes the volume, so nobody but
// the server's user (and root) may read or use any of it. An IMAGE.nbd/ an
// older version left looser is made private when the volume is locked.
import * as crypto from 'node:crypto';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { NbdError } from './errors';
import type { Logger } from './logger';
import { native } from './native';

export const MANIFEST_FORMAT = 'node-nbd-server-volume';
// 2: snapshots in one file each (snap-<id>.snap, store format 2). A version 1
// manifest without snapshots is read as version 2; one with snapshots names
// files of store format 1, which this build does not read.
// 3: jobs are records in `jobs` (src/jobs.ts); a running rollback merge is
// the running record of kind rollback-merge, no longer version 2's
// `rollback`. A manifest is written as version 3 only when it holds job
// records (else as version 2, which older builds read): an older build must
// refuse a volume with a running job rather than take its merge file for an
// orphan. A version 2 manifest's `rollback` is read as a running record.
export const MANIFEST_VERSION = 3;
const MANIFEST_VERSION_NO_JOBS = 2;
export const DEFAULT_CHUNK_SIZE = 16 * 1024;

export const AUTO_ROLLBACK_POLICIES = ['on-disconnect', 'on-start'] as const;
export type AutoRollbackPolicy = (typeof AUTO_ROLLBACK_POLICIES)[number];

export interface SnapshotRecord {
  id: number;
  name: string;
  createdAt: string;
  state: 'active' | 'failed';
  failure?: { reason: string; at: string };
  /** Rolls the volume back to this snapshot automatically (at most one snapshot per volume). */
  autoRollback?: AutoRollbackPolicy;
  /** Made by a backup job as its base (src/backup-job.ts): deleted by a later backup to the same repository. */
  backupBase?: { job: number; repo: string };
  /**
   * Repository backups made of this snapshot record (their ids), added when
   * each completes (src/backup-job.ts). A backup is an incremental's parent
   * only if listed here: a name, a clock or a path can be shared by another
   * snapshot (deleted and made again, another volume at the same path).
   */
  backups?: string[];
}

/** Who or what started a rollback. */
export interface RollbackTrigger {
  /** 'command' (rollback CLI or API) or 'policy:on-disconnect' / 'policy:on-start' */
  trigger: string;
  /** user@host and PID of a command; the policy's snapshot for a policy */
  by: string;
}

/** A rollback whose background merge has not finished. */
export interface RollbackJob extends RollbackTrigger {
  jobId: number;
  snapshotId: number;
  startedAt: string;
  /** The running rollback this one replaced (its snapshot's name), for the history. */
  replaced?: string;
}

/** A job's state: running (or being canceled) until it ends as done, failed or canceled. */
export type JobState = 'running' | 'canceling' | 'done' | 'failed' | 'canceled';
export const FINISHED_JOB_STATES: readonly JobState[] = ['done', 'failed', 'canceled'];

/**
 * The process that runs (or last ran) a job: its PID, host, and start time
 * (boot id and start time in clock ticks from /proc/PID/stat), so that a
 * reused PID is not taken for the owner (src/jobs.ts ownerAlive).
 */
export interface JobOwner {
  pid: number;
  host: string;
  start: string;
}

/** One job of the volume (src/jobs.ts): common fields, and `params` of its kind. */
export interface JobRecord<P extends object = Record<string, unknown>> {
  id: number;
  /** 'rollback-merge' | 'backup' */
  kind: string;
  /** The image path. */
  volume: string;
  state: JobState;
  /** Progress cursor: units done of total (chunks). */
  cursor: { done: number; total: number };
  owner: JobOwner;
  createdAt: string;
  updatedAt: string;
  /** Why it failed or was canceled. */
  error?: { code: string; message: string };
  params: P;
}

/** A rollback merge's parameters (its progress is in its merge file). */
export interface RollbackParams extends RollbackTrigger {
  snapshotId: number;
  /** The running rollback this one replaced (its snapshot's name), for the history. */
  replaced?: string;
}

export interface Manifest {
  format: typeof MANIFEST_FORMAT;
  version: number;
  chunkSize: number;
  size: number;
  nextId: number;
  snapshots: SnapshotRecord[];
  /** Version 2 only: the running rollback merge (read into `jobs`). */
  rollback?: RollbackJob;
  /** Jobs: every unfinished one, and the last finished ones (src/jobs.ts). */
  jobs?: JobRecord[];
  /** Volume -> snapshot: the snapshot the volume's content was last rolled back to. */
  basedOn?: { snapshotId: number; since: string };
  nextJobId?: number;
}

/**
 * IMAGE.nbd beside the image's real path: a symlink to a volume finds the
 * volume's own metadata and lock (hard links are caught by the lock on the image file).
 */
export function metaDir(image: string): string {
  let real: string;
  try {
    real = fs.realpathSync(image);
  } catch {
    real = path.resolve(image);
  }
  return `${real}.nbd`;
}

/**
 * Makes IMAGE.nbd/ exist and be private; returns its path. A new one is
 * created 0700 (a umask only removes bits, so the mode holds under any
 * umask). An existing one that we own and that others may enter (made by an
 * older version, or under a loose umask) is chmod'ed 0700 first, then the
 * regular files we own in it 0600; `log` hears what was tightened. Symbolic
 * links and entries owned by someone else are never changed: once the
 * directory is 0700 and ours, no other user can swap an entry between our
 * lstat and chmod. One owned by another user is left alone (its owner
 * controls the volume's metadata either way; the control socket still checks
 * its peers, src/control.ts) and logged as a warning.
 */
export function ensureMetaDir(image: string, log?: Logger): string {
  const dir = metaDir(image);
  if (fs.mkdirSync(dir, { recursive: true, mode: 0o700 }) !== undefined) return dir; // created now: 0700
  let st: fs.Stats;
  try {
    st = fs.lstatSync(dir);
  } catch {
    return dir; // removed meanwhile: the caller's next step reports it
  }
  // A symlink was put there on purpose by whoever may write the image's directory (its
  // target's modes are theirs to choose); a file makes the lock fail.
  if (!st.isDirectory()) return dir;
  const euid = process.geteuid?.() ?? st.uid;
  if (st.uid !== euid) {
    log?.warn({ dir, owner: st.uid }, 'volume metadata directory is owned by another user: its modes are left as they are');
    return dir;
  }
  const tightened: string[] = [];
  if (st.mode & 0o077) {
    fs.chmodSync(dir, 0o700);
    tightened.push(`${path.basename(dir)}/ ${(st.mode & 0o777).toString(8)}`);
  }
  for (const n of fs.readdirSync(dir)) {
    const f = path.join(dir, n);
    let fst: fs.Stats;
    try {
      fst = fs.lstatSync(f);
    } catch {
      continue;
    }
    if (!fst.isFile() || fst.uid !== euid || !(fst.mode & 0o077)) continue;
    fs.chmodSync(f, 0o600);
    tightened.push(`${n} ${(fst.mode & 0o777).toString(8)}`);
  }
  if (tightened.length) {
    // info, not warn: fixed for good, and offline commands (which log warnings on stderr) stay quiet about it.
    log?.info({ dir, was: tightened }, 'volume metadata was readable by other users (older version or loose umask): made private (0700/0600)');
  }
  return dir;
}

export function controlSocketPath(image: string): string {
  return path.join(metaDir(image), 'control.sock');
}

export function snapshotPaths(image: string, id: number): { file: string } {
  return { file: path.join(metaDir(image), `snap-${id}.snap`) };
}

/**
 * Where new first-write journals are created: memory-backed by default (they
 * protect acknowledged writes against a crash of the server process, and
 * appends to a file on a disk filesystem stall while other files are
 * fsynced). NBD_JOURNAL_DIR overrides it. Changing it between runs is safe:
 * a volume's pending journal is found through IMAGE.nbd/journal.state, which
 * records its path (native/core/journal_state.hh).
 *
 * The default is per user, /dev/shm/node-nbd-server-<euid>: a name shared
 * by all users in a world-writable directory could be taken first by any
 * local user (to refuse us, or to plant a symlink). Whatever the path,
 * journalDirFor() uses it only if it passes journalDirProblem().
 * NBD_TEST_SHM_DIR (tests only) replaces /dev/shm in the default.
 */
export function journalDir(): string {
  if (process.env.NBD_JOURNAL_DIR) return process.env.NBD_JOURNAL_DIR;
  const shm = process.env.NBD_TEST_SHM_DIR || '/dev/shm';
  return path.join(shm, `node-nbd-server-${process.geteuid?.() ?? 0}`);
}

/** IMAGE.nbd/journal.state: which journal the volume has pending, if any. */
export function journalStatePath(image: string): string {
  return path.join(metaDir(image), 'journal.state');
}

/**
 * Why `dir` must not hold our journals, or '' when it may: it must be a
 * directory itself (not a symlink to one), owned by this process's euid, and
 * writable by nobody else. Then no other user can remove, rename or add an
 * entry in it, so what we create there stays ours (its parent, /dev/shm, is
 * sticky: only we may rename or remove our directory in it).
 */
export function journalDirProblem(dir: string): string {
  let st: fs.Stats;
  try {
    st = fs.lstatSync(dir);
  } catch (err) {
    return `cannot stat it: ${(err as Error).message}`;
  }
  if (st.isSymbolicLink()) return 'it is a symbolic link';
  if (!st.isDirectory()) return 'it is not a directory';
  const euid = process.geteuid?.() ?? st.uid;
  if (st.uid !== euid) return `it is owned by uid ${st.uid}, not by this process's user (uid ${euid})`;
  if (st.mode & 0o022) return `other users may write to it (mode ${(st.mode & 0o777).toString(8)})`;
  return '';
}

/**
 * The directory a new journal of this image goes to: journalDir() (created
 * 0700 if missing), or IMAGE.nbd/ when it cannot be used: not creatable or
 * writable, or failing journalDirProblem() (logged: someone else may have
 * taken the name). Journals are named by a random id that the volume's
 * journal state records, never by the image file's times (which some
 * filesystems do not keep).
 */
export function journalDirFor(image: string, log?: Logger): string {
  const dir = journalDir();
  try {
    fs.mkdirSync(dir, { recursive: true, mode: 0o700 });
    fs.accessSync(dir, fs.constants.W_OK);
  } catch {
    return metaDir(image);
  }
  const why = journalDirProblem(dir);
  if (why) {
    log?.warn({ dir, why, instead: metaDir(image) }, 'journal directory refused (another user may have taken its name): journals go to IMAGE.nbd/');
    return metaDir(image);
  }
  return fs.realpathSync(dir);
}

/** The running rollback merge (the running record of kind rollback-merge), in version 2's shape. */
export function runningRollback(m: Manifest): RollbackJob | undefined {
  const r = m.jobs?.find((j) => j.kind === 'rollback-merge' && (j.state === 'running' || j.state === 'canceling')) as JobRecord<RollbackParams> | undefined;
  if (!r) return undefined;
  const p = r.params;
  return { jobId: r.id, snapshotId: p.snapshotId, startedAt: r.createdAt, trigger: p.trigger, by: p.by, ...(p.replaced ? { replaced: p.replaced } : {}) };
}

export function rollbackJobPath(image: string, jobId: number): string {
  return path.join(metaDir(image), `rollback-${jobId}.merge`);
}

function digest(m: Manifest): string {
  return crypto.createHash('sha256').update(JSON.stringify(m)).digest('hex');
}

/** The manifest, or null when the volume has no metadata yet. Corruption is an error, never guessed around. */
export function readManifest(image: string): Manifest | null {
  const file = path.join(metaDir(image), 'manifest.json');
  let text: string;
  try {
    text = fs.readFileSync(file, 'utf8');
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return null;
    throw new NbdError('METADATA_CORRUPT', `cannot read ${file}: ${(err as Error).message}`);
  }
  let parsed: { manifest?: Manifest; sha256?: string };
  try {
    parsed = JSON.parse(text) as typeof parsed;
  } catch {
    throw new NbdError('METADATA_CORRUPT', `${file} is not valid JSON (corrupt metadata)`);
  }
  const m = parsed.manifest;
  if (!m || typeof parsed.sha256 !== 'string' || digest(m) !== parsed.sha256) {
    throw new NbdError('METADATA_CORRUPT', `${file} fails its checksum (corrupt metadata)`);
  }
  if (m.format !== MANIFEST_FORMAT) throw new NbdError('METADATA_CORRUPT', `${file} is not a ${MANIFEST_FORMAT} manifest`);
  if (m.version === 1 && Array.isArray(m.snapshots) && m.snapshots.length === 0) m.version = MANIFEST_VERSION_NO_JOBS;
  if (m.version !== MANIFEST_VERSION && m.version !== MANIFEST_VERSION_NO_JOBS) {
    throw new NbdError('METADATA_CORRUPT', `${file} has format version ${m.version}; this build reads versions 2 and ${MANIFEST_VERSION}`);
  }
  if (m.version === MANIFEST_VERSION && !Array.isArray(m.jobs)) throw new NbdError('METADATA_CORRUPT', `${file}: version ${m.version} without jobs`);
  if (m.rollback) {
    // Version 2: the running rollback becomes its job record.
    const { rollback: r, ...rest } = m;
    const owner = { pid: 0, host: '', start: '' };
    const rec: JobRecord<RollbackParams> = {
      id: r.jobId,
      kind: 'rollback-merge',
      volume: image,
      state: 'running',
      cursor: { done: 0, total: 0 },
      owner,
      createdAt: r.startedAt,
      updatedAt: r.startedAt,
      params: { snapshotId: r.snapshotId, trigger: r.trigger, by: r.by, ...(r.replaced ? { replaced: r.replaced } : {}) },
    };
    return { ...rest, jobs: [...(rest.jobs ?? []), rec as unknown as JobRecord] };
  }
  return m;
}

/** `m` as it is written: version 3 with job records, else version 2 (see MANIFEST_VERSION). */
export function manifestToWrite(m: Manifest): Manifest {
  const { rollback: _v2, jobs, ...rest } = m;
  return jobs?.length ? { ...rest, version: MANIFEST_VERSION, jobs } : { ...rest, version: MANIFEST_VERSION_NO_JOBS };
}

/** Writes `m` (as manifestToWrite() makes it, which it returns) atomically. */
export function writeManifest(image: string, given: Manifest): Manifest {
  const m = manifestToWrite(given);
  const dir = metaDir(image);
  fs.mkdirSync(dir, { recursive: true, mode: 0o700 }); // normally there already: the volume lock is in it
  const file = path.join(dir, 'manifest.json');
  const tmp = `${file}.tmp-${process.pid}`;
  try {
    const fd = fs.openSync(tmp, 'w', 0o600);
    try {
      fs.writeSync(fd, JSON.stringify({ manifest: m, sha256: digest(m) }, null, 2) + '\n');
      fs.fsyncSync(fd);
    } finally {
      fs.closeSync(fd);
    }
    fs.renameSync(tmp, file);
  } catch (err) {
    try {
      fs.rmSync(tmp, { force: true });
    } catch {
      // a failing disk may refuse the clean-up too: the first error is the one to report
    }
    throw err;
  }
  const dfd = fs.openSync(dir, 'r');
  try {
    fs.fsyncSync(dfd);
  } finally {
    fs.closeSync(dfd);
  }
  return m;
}

export function newManifest(size: number, chunkSize = DEFAULT_CHUNK_SIZE): Manifest {
  return { format: MANIFEST_FORMAT, version: MANIFEST_VERSION_NO_JOBS, chunkSize, size, nextId: 1, snapshots: [] };
}

/** Removes snapshot files that no manifest entry names (left by a crash mid-create or mid-delete). */
export function removeOrphans(image: string, m: Manifest): string[] {
  const dir = metaDir(image);
  let names: string[];
  try {
    names = fs.readdirSync(dir);
  } catch {
    return [];
  }
  const keep = new Set(m.snapshots.map((s) => s.id));
  const removed: string[] = [];
  for (const n of names) {
    const mm = /^snap-(\d+)\.(snap|data|map)$/.exec(n);
    const job = /^rollback-(\d+)\.merge$/.exec(n);
    if ((mm && !keep.has(Number(mm[1]))) || (job && Number(job[1]) !== runningRollback(m)?.jobId) || /^manifest\.json\.tmp-\d+$/.test(n)) {
      fs.rmSync(path.join(dir, n), { force: true });
      removed.push(n);
    }
  }
  return removed;
}

const NAME_RE = /^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$/;

export function validateSnapshotName(name: string): void {
  if (!NAME_RE.test(name)) {
    throw new NbdError(
      'BAD_SNAPSHOT_NAME',
      `invalid snapshot name ${JSON.stringify(name)}: use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit`,
    );
  }
}

/**
 * Takes the volume for this process: an exclusive flock on IMAGE.nbd/lock, and
 * one on the image file itself, because every hard link to the image is the
 * same inode (native/core/file_lock.hh). The kernel keeps them while the
 * descriptors are open and drops them when the process exits or is killed,
 * so no lock outlives its owner and nothing has to guess whether a PID is
 * stale. The lock file also holds the owner's PID, only so that VOLUME_BUSY
 * can name it: it never decides ownership. A lock belongs to its open file
 * description, so a second lockVolume() of the same volume in one process is
 * refused too (a process opens a volume once). Nothing outside IMAGE.nbd/ is
 * created. Returns the unlock function (idempotent), which removes the lock
 * file while still holding it, then IMAGE.nbd/ if it is left empty.
 */
export function lockVolume(image: string, log?: Logger): () => void {
  const dir = metaDir(image);
  const file = path.join(dir, 'lock');
  const lockFd = lockMetaFile(dir, file, image, log);
  let imageFd: number;
  try {
    imageFd = native.lockFile(image, 'existing');
  } catch (err) {
    releaseMetaFile(lockFd, file, dir);
    throw lockError(err, image);
  }
  let held = true;
  return () => {
    if (!held) return; // never close a descriptor number twice: it may be reused meanwhile
    held = false;
    native.unlockFile(imageFd);
    releaseMetaFile(lockFd, file, dir);
  };
}

function lockMetaFile(dir: string, file: string, image: string, log?: Logger): number {
  for (let attempt = 0; ; attempt++) {
    ensureMetaDir(image, log);
    let fd: number;
    try {
      fd = native.lockFile(file, 'lock-file');
    } catch (err) {
      // IMAGE.nbd/ was removed between our mkdir and open by an owner
      // releasing a volume without snapshots: create it again.
      if ((err as { errno?: number }).errno === os.constants.errno.ENOENT && attempt < 100) continue;
      throw lockError(err, image, file);
    }
    try {
      fs.ftruncateSync(fd, 0);
      fs.writeSync(fd, `${process.pid}\n`, 0);
    } catch {
      /* the PID is only informational (e.g. no space left) */
    }
    return fd;
  }
}

function releaseMetaFile(fd: number, file: string, dir: string): void {
  try {
    native.unlockFile(fd, file);
  } catch {
    /* closed, but the lock file could not be unlinked: harmless, the next owner locks it */
  }
  try {
    fs.rmdirSync(dir); // only if empty: a volume that never had snapshots leaves nothing behind
  } catch {
    /* not empty */
  }
}

/** Maps a native LOCK_FAILED error to a coded one. `file`: the lock file (else the image itself). */
function lockError(err: unknown, image: string, file?: string): unknown {
  const e = err as { code?: string; errno?: number; message?: string };
  if (e?.code !== 'LOCK_FAILED') return err;
  const { EWOULDBLOCK, ELOOP, EINVAL } = os.constants.errno;
  if (e.errno === EWOULDBLOCK) {
    if (!file) {
      return new NbdError(
        'VOLUME_BUSY',
        `${image} is in use by another process (the same file is open as a volume under another path, e.g. a hard link, or locked with flock)`,
      );
    }
    const pid = lockHolder(file);
    return new NbdError('VOLUME_BUSY', `${image} is in use by ${pid ? `process ${pid}` : 'another process'} (another server or command)`);
  }
  if (file && (e.errno === ELOOP || e.errno === EINVAL)) {
    return new NbdError(
      'METADATA_CORRUPT',
      `${file} is ${e.errno === ELOOP ? 'a symbolic link' : 'not a regular file'}: refusing to use it as the volume lock (remove it if no server or command uses the volume)`,
    );
  }
  return new NbdError('IMAGE_OPEN_FAILED', `cannot lock ${image}: ${e.message}`, { cause: err });
}

/** The PID the holder wrote into the lock file (for messages only), if readable. */
function lockHolder(file: string): number | undefined {
  let fd: number;
  try {
    fd = fs.openSync(file, fs.constants.O_RDONLY | fs.constants.O_NOFOLLOW | fs.constants.O_NONBLOCK);
  } catch {
    return undefined;
  }
  try {
    const buf = Buffer.alloc(32);
    const pid = Number(buf.toString('utf8', 0, fs.readSync(fd, buf, 0, buf.length, 0)).trim());
    return Number.isSafeInteger(pid) && pid > 0 ? pid : undefined;
  } catch {
    return undefined;
  } finally {
    fs.closeSync(fd);
  }
}
