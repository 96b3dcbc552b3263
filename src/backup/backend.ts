// The storage a backup repository lives on, behind one small interface: a
// flat namespace of immutable-once-written objects named by '/'-separated
// keys. Two implementations: a local directory (backend-local.ts) and S3
// (backend-s3.ts); openBackend() in location.ts picks one from a REPO string.
//
//     Repository (repository.ts: layout, sealing, caches)
//         |
//     Backend  -- put / get / getRange / list / delete / exists
//       |                     |
//     LocalBackend          S3Backend
//     (temp+fsync+rename)   (@aws-sdk/client-s3, single PUTs)
//
// Contract every backend keeps:
// - put() is atomic: a reader sees no object or the whole new one, never a
//   prefix. Overwriting with the same content is harmless (packs are named by
//   their hash, so two writers of one name write the same bytes).
// - get()/getRange() of a missing key throws NbdError REPO_CORRUPT only at
//   the repository layer; here it throws ObjectMissingError so callers can
//   tell "absent" from "broken".
// - list() returns every key under a prefix with its size and modification
//   time (prune compares it with lock times); order is unspecified.
// - delete() of a missing key succeeds.
// Errors are NbdErrors with REPO_* codes (unreachable, credentials, I/O).

export interface ObjectInfo {
  key: string;
  size: number;
  /** Last modification, ms since the epoch (the backend's clock for S3). */
  mtimeMs: number;
}

export interface Backend {
  /** Human-readable location (a path or s3://bucket/prefix), for messages. */
  readonly location: string;
  put(key: string, data: Buffer): Promise<void>;
  get(key: string): Promise<Buffer>;
  getRange(key: string, offset: number, length: number): Promise<Buffer>;
  list(prefix: string): Promise<ObjectInfo[]>;
  delete(key: string): Promise<void>;
  exists(key: string): Promise<boolean>;
  /** Current time on the backend's clock, ms (lock expiry is judged on it). */
  now(): Promise<number>;
  close(): Promise<void>;
}

/** A get of a key that does not exist. */
export class ObjectMissingError extends Error {
  readonly key: string;
  constructor(key: string, location: string) {
    super(`${location}: object ${key} does not exist`);
    this.name = 'ObjectMissingError';
    this.key = key;
  }
}

export function isObjectMissing(err: unknown): err is ObjectMissingError {
  return err instanceof ObjectMissingError;
}
