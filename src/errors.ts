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
  /** The control socket refused the caller: another user than the server's (or root). */
  CONTROL_DENIED: 18,
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
