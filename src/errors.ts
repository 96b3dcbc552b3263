// Errors that reach users and embedders carry a stable `code` that scripts can
// match on; messages may change, codes do not.

export type ErrorCode =
  | 'ADDON_NOT_BUILT'
  | 'BAD_ARGUMENT'
  | 'BAD_SIZE'
  | 'IMAGE_NOT_FOUND'
  | 'IMAGE_OPEN_FAILED'
  | 'IMAGE_CREATE_FAILED'
  | 'EXPORT_EXISTS'
  | 'EXPORT_NOT_FOUND'
  | 'LISTEN_FAILED'
  | 'START_FAILED'
  | 'SERVER_CLOSED'
  | 'ATTACH_FAILED'
  | 'DETACH_FAILED'
  | 'METADATA_CORRUPT'
  | 'VOLUME_BUSY'
  | 'VOLUME_NOT_FOUND'
  | 'CHANGES_RANGE_INVALID'
  | 'CHANGES_UNAVAILABLE'
  | 'DIFF_FORMAT_INVALID'
  | 'DIFF_MISMATCH'
  | 'JOB_NOT_FOUND'
  | 'JOB_EXISTS'
  | 'JOB_CANCELED'
  | 'SNAPSHOT_NOT_FOUND'
  | 'SNAPSHOT_EXISTS'
  | 'BAD_SNAPSHOT_NAME'
  | 'SNAPSHOT_CORRUPT'
  | 'SNAPSHOT_CREATE_FAILED'
  | 'SNAPSHOT_DELETE_FAILED'
  | 'CONTROL_FAILED'
  | 'SNAPSHOT_FAILED'
  | 'ROLLBACK_RUNNING'
  | 'ROLLBACK_FAILED'
  | 'MERGE_FAILED'
  | 'AUTO_ROLLBACK_CONFLICT'
  | 'JOURNAL_PENDING'
  | 'JOURNAL_MISSING'
  | 'JOURNAL_CORRUPT'
  | 'JOURNAL_IO_ERROR'
  | 'QUEUE_STALLED'
  | 'REPO_NOT_FOUND'
  | 'REPO_EXISTS'
  | 'REPO_CORRUPT'
  | 'REPO_VERSION'
  | 'REPO_UNREACHABLE'
  | 'REPO_CREDENTIALS'
  | 'REPO_IO_ERROR'
  | 'REPO_LOCKED'
  | 'BACKUP_NOT_FOUND'
  | 'BACKUP_KEY_REQUIRED'
  | 'BACKUP_KEY_WRONG'
  | 'BACKUP_DATA_CORRUPT'
  | 'BACKUP_SOURCE_FAILED'
  | 'BACKUP_ABORTED'
  | 'NBD_CONNECT_FAILED'
  | 'NBD_IO_ERROR'
  | 'CONTROL_DENIED';

export class NbdError extends Error {
  readonly code: ErrorCode;
  constructor(code: ErrorCode, message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = 'NbdError';
    this.code = code;
  }
}

/** Exit codes of the CLI, by error code. Scripts rely on these. */
export const EXIT_CODES: Record<ErrorCode, number> = {
  ADDON_NOT_BUILT: 70,
  BAD_ARGUMENT: 2,
  BAD_SIZE: 2,
  IMAGE_NOT_FOUND: 3,
  IMAGE_OPEN_FAILED: 3,
  IMAGE_CREATE_FAILED: 3,
  EXPORT_EXISTS: 2,
  EXPORT_NOT_FOUND: 3,
  LISTEN_FAILED: 4,
  START_FAILED: 4,
  SERVER_CLOSED: 1,
  ATTACH_FAILED: 5,
  DETACH_FAILED: 5,
  METADATA_CORRUPT: 6,
  SNAPSHOT_CORRUPT: 6,
  VOLUME_BUSY: 7,
  VOLUME_NOT_FOUND: 3,
  SNAPSHOT_NOT_FOUND: 8,
  SNAPSHOT_EXISTS: 9,
  BAD_SNAPSHOT_NAME: 2,
  SNAPSHOT_CREATE_FAILED: 10,
  SNAPSHOT_DELETE_FAILED: 10,
  CONTROL_FAILED: 11,
  SNAPSHOT_FAILED: 12,
  ROLLBACK_RUNNING: 7,
  ROLLBACK_FAILED: 10,
  MERGE_FAILED: 10,
  AUTO_ROLLBACK_CONFLICT: 9,
  /** A read-only open of a volume whose journal holds writes not yet applied. */
  JOURNAL_PENDING: 13,
  /** The volume's journal state names a journal that cannot be found. */
  JOURNAL_MISSING: 14,
  /** The journal state or the journal it names is damaged or another journal's. */
  JOURNAL_CORRUPT: 15,
  JOURNAL_IO_ERROR: 16,
  /** Queued first writes cannot be applied to the image (it refuses writes): create, delete and rollback wait. */
  QUEUE_STALLED: 17,
  /** The backup repository location holds no repository (no `config` object). */
  REPO_NOT_FOUND: 20,
  /** `init` on a location that already holds a repository. */
  REPO_EXISTS: 21,
  /** A repository object fails its checksum or does not parse (config, manifest, index, pack index). */
  REPO_CORRUPT: 22,
  /** The repository was written by a newer format version. */
  REPO_VERSION: 22,
  /** The repository's endpoint cannot be reached (DNS, refused, timeout). */
  REPO_UNREACHABLE: 23,
  /** No credentials, or the endpoint refused them. */
  REPO_CREDENTIALS: 24,
  /** Any other storage error (disk full, permission, S3 5xx after retries). */
  REPO_IO_ERROR: 25,
  /** A prune holds the repository (a backup waited for it and gave up), or a backup lost its lock. */
  REPO_LOCKED: 7,
  BACKUP_NOT_FOUND: 8,
  /** The repository is encrypted and no key was given. */
  BACKUP_KEY_REQUIRED: 26,
  /** The key does not open the repository (or a key was given for an unencrypted one). */
  BACKUP_KEY_WRONG: 26,
  /** A pack or chunk fails verification: restore refuses to write it. */
  BACKUP_DATA_CORRUPT: 27,
  /** The chunk source (volume, snapshot export) failed to read. */
  BACKUP_SOURCE_FAILED: 28,
  /** A backup, restore or prune stopped by its AbortSignal (job cancel); it left no manifest. */
  BACKUP_ABORTED: 29,
  /** An NBD source or target (nbd://, nbd+unix://) cannot be reached or refuses the handshake. */
  NBD_CONNECT_FAILED: 30,
  /** An NBD source or target answered a request with an error, or dropped the connection. */
  NBD_IO_ERROR: 31,
  /** The control socket refused the caller: another user than the server's (or root). */
  CONTROL_DENIED: 18,
  /** A change map between snapshots A and B where A is not older than B (or names the same snapshot twice). */
  CHANGES_RANGE_INVALID: 32,
  /** The change map cannot be computed exactly: a snapshot in the range failed (its reason is in the message). */
  CHANGES_UNAVAILABLE: 33,
  /** A diff stream (rbd diff v1) is truncated or malformed. */
  DIFF_FORMAT_INVALID: 34,
  /** A diff stream does not fit the image: its size or from-snapshot differs. */
  DIFF_MISMATCH: 35,
  /** No job with that id on the volume. */
  JOB_NOT_FOUND: 8,
  /** A job of that kind already runs on the volume (e.g. a second backup of one volume). */
  JOB_EXISTS: 9,
  /** The job was canceled (`jobs cancel ID`) before it finished. */
  JOB_CANCELED: 29,
};

export function isErrorCode(code: unknown): code is ErrorCode {
  return typeof code === 'string' && Object.prototype.hasOwnProperty.call(EXIT_CODES, code);
}

/** Converts a native error (with a string `code`) into an NbdError. */
export function fromNative(err: unknown): unknown {
  if (err instanceof Error && typeof (err as { code?: unknown }).code === 'string') {
    const code = (err as unknown as { code: string }).code;
    if (isErrorCode(code)) return new NbdError(code, err.message, { cause: err });
  }
  return err;
}
