// The envelope around every metadata object (manifests, backup indexes, pack
// indexes): a fixed header, an optionally zstd-compressed body, and either a
// SHA-256 over header and body (plain repositories) or AES-256-GCM over the
// body with the header and the object's key as associated data (encrypted
// ones), so an object moved to another name, truncated or altered in one
// byte fails to open. Layout in docs/backup-format.md, "Envelope".
import { createHash } from 'node:crypto';
import { compress, decompress } from 'zstd-napi';
import { NbdError } from '../errors';
import { open, seal, type RepoKeys } from './keys';

export const MAGIC = Buffer.from('NBDB');
export const HEADER_BYTES = 8;
export const ENVELOPE_VERSION = 1;

export enum ObjectType {
  Manifest = 1,
  BackupIndex = 2,
  PackIndex = 3,
}

const FLAG_ZSTD = 1;
const FLAG_ENCRYPTED = 2;

function header(type: ObjectType, flags: number): Buffer {
  const h = Buffer.alloc(HEADER_BYTES);
  MAGIC.copy(h, 0);
  h[4] = type;
  h[5] = ENVELOPE_VERSION;
  h[6] = flags;
  return h;
}

/** Seals `body` as an object of `type` to be stored under `key`. */
export function sealObject(keys: RepoKeys | null, type: ObjectType, key: string, body: Buffer): Buffer {
  const z = compress(body);
  const useZ = z.length < body.length;
  const payload = useZ ? z : body;
  const flags = (useZ ? FLAG_ZSTD : 0) | (keys ? FLAG_ENCRYPTED : 0);
  const h = header(type, flags);
  if (keys) return Buffer.concat([h, seal(keys.dataKey, payload, Buffer.concat([h, Buffer.from(key)]))]);
  const sum = createHash('sha256').update(h).update(payload).digest();
  return Buffer.concat([h, payload, sum]);
}

/** Opens an object sealed by sealObject; REPO_CORRUPT on any mismatch. */
export function openObject(keys: RepoKeys | null, type: ObjectType, key: string, data: Buffer): Buffer {
  const bad = (why: string) => new NbdError('REPO_CORRUPT', `repository object ${key} is damaged: ${why}`);
  if (data.length < HEADER_BYTES || !data.subarray(0, 4).equals(MAGIC)) throw bad('no envelope header');
  if (data[5]! > ENVELOPE_VERSION) {
    throw new NbdError('REPO_VERSION', `repository object ${key} has envelope version ${data[5]}; this version reads ${ENVELOPE_VERSION}`);
  }
  if (data[4] !== type) throw bad(`type ${data[4]}, expected ${type}`);
  const flags = data[6]!;
  const h = data.subarray(0, HEADER_BYTES);
  let payload: Buffer;
  if (flags & FLAG_ENCRYPTED) {
    if (!keys) throw new NbdError('BACKUP_KEY_REQUIRED', `repository object ${key} is encrypted: give the key file`);
    const p = open(keys.dataKey, data.subarray(HEADER_BYTES), Buffer.concat([h, Buffer.from(key)]));
    if (p === null) throw bad('authentication failed');
    payload = p;
  } else {
    if (keys) throw bad('not encrypted in an encrypted repository');
    if (data.length < HEADER_BYTES + 32) throw bad('truncated');
    payload = data.subarray(HEADER_BYTES, data.length - 32);
    const sum = createHash('sha256').update(h).update(payload).digest();
    if (!sum.equals(data.subarray(data.length - 32))) throw bad('checksum mismatch');
  }
  try {
    return flags & FLAG_ZSTD ? decompress(payload) : payload;
  } catch (err) {
    throw new NbdError('REPO_CORRUPT', `repository object ${key} is damaged: bad compressed body`, { cause: err });
  }
}
