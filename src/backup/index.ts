// The backup library: repositories (local directory or S3), full and
// incremental backups from a ChunkSource, list, restore, verify and prune.
// Format: docs/backup-format.md. The CLI and the server's change maps plug in
// through ChunkSource (source.ts) and RestoreTarget (target.ts).
export type { Backend, ObjectInfo } from './backend';
export { LocalBackend } from './backend-local';
export type { S3Options } from './backend-s3';
export { openBackend, openRepository, initRepository, parseS3Url, type RepoAccess, type S3Flags } from './location';
export { Repository, FORMAT_VERSION } from './repository';
export { FileChunkSource, runsOf, type ChunkRun, type ChunkSource, type FileSourceOptions } from './source';
export { FileTarget, type RestoreTarget } from './target';
export { NbdTarget } from './nbd-target';
export { NbdChunkSource, type NbdSourceOptions } from './nbd-source';
export { parseNbdUri } from './nbd-client';
export { backup, type BackupOptions, type BackupProgress } from './backup';
export { restore, type RestoreOptions, type RestoreResult } from './restore';
export { verify, type VerifyOptions, type VerifyProblem, type VerifyResult } from './verify';
export { prune, applyPolicy, type PrunePolicy, type PruneOptions, type PruneResult } from './prune';
export { listBackups, type BackupListEntry } from './list';
export type { Manifest, BackupStats } from './manifest';
export { DEFAULT_LOCK_TTL_MS } from './locks';
export { closeCodecPool } from './codec-pool';
