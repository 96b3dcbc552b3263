// Volume metadata beside each image, in IMAGE.nbd/ (docs/architecture.md,
// "On-disk format"):
//   manifest.json   which snapshots exist, in order, with their names and state;
//                   versioned, with a SHA-256 over its content; replaced atomically
//                   (write temp, fsync, rename, fsync dir).
//   snap-<id>.snap  snapshot <id>: preserved chunk data (sparse) and its
//                   checksummed log (native/core/snapshot_store.cc, format 2)
//   rollback-<n>.merge  the running rollback merge's pending set and progress
//                   (native/core/merge_job.hh)
//   history.jsonl   every rollback and finished merge, one JSON line each (src/history.ts)
//   journal.state   which first-write journal may hold acknowledged writes
//                   (native/core/journal_state.hh)
//   lock            the PID of the process that owns the volume
//   control.sock    the serving server's control socket
import * as crypto from 'node:crypto';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { NbdError } from './errors';

export const MANIFEST_FORMAT = 'node-nbd-server-volume';
// 2: snapshots in one file each (snap-<id>.snap, store format 2). A version 1
// manifest without snapshots is read as version 2; one with snapshots names
// files of store format 1, which this build does not read.
export const MANIFEST_VERSION = 2;
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

export interface Manifest {
  format: typeof MANIFEST_FORMAT;
  version: number;
  chunkSize: number;
  size: number;
  nextId: number;
  snapshots: SnapshotRecord[];
  /** The running rollback merge, if any. */
  rollback?: RollbackJob;
  /** Volume -> snapshot: the snapshot the volume's content was last rolled back to. */
  basedOn?: { snapshotId: number; since: string };
  nextJobId?: number;
}

/**
 * IMAGE.nbd beside the image's real path: a symlink to a volume finds the
 * volume's own metadata and lock (hard links are caught by the inode lock).
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
 */
export function journalDir(): string {
  return process.env.NBD_JOURNAL_DIR || '/dev/shm/node-nbd-server';
}

/** IMAGE.nbd/journal.state: which journal the volume has pending, if any. */
export function journalStatePath(image: string): string {
  return path.join(metaDir(image), 'journal.state');
}

/**
 * The directory a new journal of this image goes to: journalDir(), or
 * IMAGE.nbd/ when that cannot be used. Journals are named by a random id
 * that the volume's journal state records, never by the image file's
 * times (which some filesystems do not keep).
 */
export function journalDirFor(image: string): string {
  const dir = journalDir();
  try {
    fs.mkdirSync(dir, { recursive: true, mode: 0o700 });
    fs.accessSync(dir, fs.constants.W_OK);
    return fs.realpathSync(dir);
  } catch {
    return metaDir(image);
  }
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
  if (m.version === 1 && Array.isArray(m.snapshots) && m.snapshots.length === 0) m.version = MANIFEST_VERSION;
  if (m.version !== MANIFEST_VERSION) {
    throw new NbdError('METADATA_CORRUPT', `${file} has format version ${m.version}; this build reads version ${MANIFEST_VERSION}`);
  }
  return m;
}

export function writeManifest(image: string, m: Manifest): void {
  const dir = metaDir(image);
  fs.mkdirSync(dir, { recursive: true });
  const file = path.join(dir, 'manifest.json');
  const tmp = `${file}.tmp-${process.pid}`;
  try {
    const fd = fs.openSync(tmp, 'w', 0o644);
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
}

export function newManifest(size: number, chunkSize = DEFAULT_CHUNK_SIZE): Manifest {
  return { format: MANIFEST_FORMAT, version: MANIFEST_VERSION, chunkSize, size, nextId: 1, snapshots: [] };
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
    if ((mm && !keep.has(Number(mm[1]))) || (job && Number(job[1]) !== m.rollback?.jobId) || /^manifest\.json\.tmp-\d+$/.test(n)) {
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
 * Takes the volume's locks for this process: IMAGE.nbd/lock, and a lock named
 * after the image's device and inode in the shared lock directory, so that a
 * hard link (another path to the same file) cannot open the volume twice.
 * Each lock is a file holding our PID, created exclusively; a lock whose
 * process is gone is stale and replaced. Returns the unlock function, which
 * also removes IMAGE.nbd/ again if it is left empty.
 */
export function lockVolume(image: string): () => void {
  const dir = metaDir(image);
  const st = fs.statSync(image);
  fs.mkdirSync(LOCK_DIR, { recursive: true, mode: 0o1777 });
  const inodeLock = path.join(LOCK_DIR, `${st.dev}-${st.ino}.lock`);
  const releaseInode = takePidLock(inodeLock, image);
  let releaseDir: () => void;
  try {
    fs.mkdirSync(dir, { recursive: true });
    releaseDir = takePidLock(path.join(dir, 'lock'), image);
  } catch (err) {
    releaseInode();
    throw err;
  }
  return () => {
    releaseDir();
    releaseInode();
    try {
      fs.rmdirSync(dir); // only if empty: a volume that never had snapshots leaves nothing behind
    } catch {
      /* not empty */
    }
  };
}

/** Shared directory for inode locks (same for every process on the machine). */
export const LOCK_DIR = path.join(os.tmpdir(), 'node-nbd-server-locks');

function takePidLock(file: string, image: string): () => void {
  for (let attempt = 0; attempt < 2; attempt++) {
    try {
      fs.writeFileSync(file, `${process.pid}\n`, { flag: 'wx' });
      return () => {
        try {
          if (fs.readFileSync(file, 'utf8').trim() === String(process.pid)) fs.rmSync(file);
        } catch {
          /* already gone */
        }
      };
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'EEXIST') throw err;
      let pid = 0;
      try {
        pid = Number(fs.readFileSync(file, 'utf8').trim());
      } catch {
        /* vanished meanwhile: retry */
      }
      if (pid && pid !== process.pid && processAlive(pid)) {
        throw new NbdError('VOLUME_BUSY', `${image} is in use by process ${pid} (another server or command)`);
      }
      fs.rmSync(file, { force: true });
    }
  }
  throw new NbdError('VOLUME_BUSY', `cannot lock ${image}`);
}

function processAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'EPERM';
  }
}
