// A backup's manifest: the last object a backup writes. A backup exists
// exactly when its manifest does; everything it names (its index, the packs
// its index references) was durable before it was written. Sealed JSON
// (envelope type Manifest) under backups/<id>, with the SHA-256 of the
// stored index object so a replaced index is detected.
import { randomBytes } from 'node:crypto';
import { NbdError } from '../errors';
import { ObjectType, openObject, sealObject } from './envelope';
import type { RepoKeys } from './keys';

export const MANIFEST_VERSION = 1;

export interface BackupStats {
  /** Chunks the source reported changed (all of them for a full backup). */
  chunksChanged: number;
  /** Of those, chunks that read as all zeros (recorded as ZERO, not stored). */
  chunksZero: number;
  /** Chunks whose content the repository did not have (stored by this backup). */
  chunksNew: number;
  /** Bytes read from the source. */
  bytesRead: number;
  /** Bytes of blobs stored by this backup (after compression and encryption). */
  bytesStored: number;
  /** Pack objects written by this backup. */
  packsWritten: number;
}

export interface Manifest {
  version: number;
  id: string;
  /** The backup whose index unchanged chunks were taken from, or null for a full backup. */
  parent: string | null;
  /** ISO time the backup started (prune's keep-daily etc. bucket on it). */
  time: string;
  /** Name of the volume (groups backups for prune). */
  volume: string;
  /** The snapshot backed up, when the source names one. */
  snapshot: string | null;
  size: number;
  chunkSize: number;
  index: { key: string; sha256: string };
  stats: BackupStats;
}

export function manifestKey(id: string): string {
  return `backups/${id}`;
}

/** Sortable, unique ids: UTC time to the second, then 8 random hex digits. */
export function newBackupId(now = new Date()): string {
  const t = now.toISOString().replace(/[-:]/g, '').replace(/\.\d+Z$/, 'Z');
  return `${t}-${randomBytes(4).toString('hex')}`;
}

export function isBackupId(s: string): boolean {
  return /^\d{8}T\d{6}Z-[0-9a-f]{8}$/.test(s);
}

export function sealManifest(keys: RepoKeys | null, m: Manifest): Buffer {
  return sealObject(keys, ObjectType.Manifest, manifestKey(m.id), Buffer.from(JSON.stringify(m)));
}

export function openManifest(keys: RepoKeys | null, id: string, data: Buffer): Manifest {
  const key = manifestKey(id);
  let m: Manifest;
  try {
    m = JSON.parse(openObject(keys, ObjectType.Manifest, key, data).toString('utf8')) as Manifest;
  } catch (err) {
    if (err instanceof NbdError) throw err;
    throw new NbdError('REPO_CORRUPT', `${key}: not JSON`, { cause: err });
  }
  if (m.version > MANIFEST_VERSION) throw new NbdError('REPO_VERSION', `${key}: manifest version ${m.version}; this version reads ${MANIFEST_VERSION}`);
  if (m.id !== id) throw new NbdError('REPO_CORRUPT', `${key}: names backup ${m.id}`);
  return m;
}
