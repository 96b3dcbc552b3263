// Keys of an encrypted repository, and the two primitives everything else
// uses: chunk ids and authenticated encryption.
//
// Key hierarchy (documented in docs/backup-format.md):
//   key file bytes --scrypt(salt, N, r, p)--> KEK (32 B)
//   KEK --AES-256-GCM--> unwraps the 64-byte master key kept in `config`
//   master --HKDF-SHA256(info "nbd-backup data")--> data key (AES-256-GCM)
//   master --HKDF-SHA256(info "nbd-backup id")--> id key (HMAC-SHA256)
// A wrong key file fails the GCM tag of the wrapped master key: a clear
// BACKUP_KEY_WRONG before anything else is read.
//
// Chunk ids: SHA-256 of the plaintext without encryption; HMAC-SHA256 under
// the id key with encryption, so ids reveal nothing about content to whoever
// can list the repository (no confirmation of known plaintexts).
//
// AEAD: AES-256-GCM with a random 96-bit nonce per object; sealed = nonce(12)
// || ciphertext || tag(16). Random nonces keep the collision risk below 2^-32
// for up to 2^32 sealed objects per repository key (about 256 TiB of 64 KiB
// chunks); docs/backup-format.md states the limit.
import { createCipheriv, createDecipheriv, createHash, createHmac, hkdfSync, randomBytes, scryptSync } from 'node:crypto';
import { NbdError } from '../errors';

export const NONCE_BYTES = 12;
export const TAG_BYTES = 16;
export const AEAD_OVERHEAD = NONCE_BYTES + TAG_BYTES;

export interface RepoKeys {
  readonly dataKey: Buffer;
  readonly idKey: Buffer;
}

/** The `encryption` member of the repository config. */
export interface EncryptionConfig {
  cipher: 'aes-256-gcm';
  kdf: { name: 'scrypt'; salt: string; N: number; r: number; p: number };
  /** base64 of AEAD(KEK, master key, aad "nbd-backup master"). */
  wrappedMasterKey: string;
}

const MASTER_AAD = Buffer.from('nbd-backup master');

function deriveKeys(master: Buffer): RepoKeys {
  const dataKey = Buffer.from(hkdfSync('sha256', master, Buffer.alloc(0), 'nbd-backup data', 32));
  const idKey = Buffer.from(hkdfSync('sha256', master, Buffer.alloc(0), 'nbd-backup id', 32));
  return { dataKey, idKey };
}

function kek(keyFileBytes: Buffer, kdf: EncryptionConfig['kdf']): Buffer {
  return scryptSync(keyFileBytes, Buffer.from(kdf.salt, 'base64'), 32, { N: kdf.N, r: kdf.r, p: kdf.p, maxmem: 256 * kdf.N * kdf.r });
}

/** A new master key wrapped under the key file's bytes (repository init). */
export function newEncryption(keyFileBytes: Buffer): { config: EncryptionConfig; keys: RepoKeys } {
  if (keyFileBytes.length < 16) throw new NbdError('BAD_ARGUMENT', 'the key file must hold at least 16 bytes (e.g. 32 random bytes)');
  const kdf = { name: 'scrypt' as const, salt: randomBytes(16).toString('base64'), N: 1 << 15, r: 8, p: 1 };
  const master = randomBytes(64);
  const wrapped = seal(kek(keyFileBytes, kdf), master, MASTER_AAD);
  return { config: { cipher: 'aes-256-gcm', kdf, wrappedMasterKey: wrapped.toString('base64') }, keys: deriveKeys(master) };
}

/** Opens the master key; a wrong key file is BACKUP_KEY_WRONG. */
export function openEncryption(cfg: EncryptionConfig, keyFileBytes: Buffer): RepoKeys {
  if (cfg.cipher !== 'aes-256-gcm' || cfg.kdf?.name !== 'scrypt') {
    throw new NbdError('REPO_VERSION', `unsupported repository encryption ${cfg.cipher}/${cfg.kdf?.name}`);
  }
  const master = open(kek(keyFileBytes, cfg.kdf), Buffer.from(cfg.wrappedMasterKey, 'base64'), MASTER_AAD);
  if (master === null) throw new NbdError('BACKUP_KEY_WRONG', 'the key file does not open this repository (wrong key)');
  return deriveKeys(master);
}

/** The id of a chunk's plaintext. */
export function chunkId(keys: RepoKeys | null, data: Buffer): Buffer {
  return keys ? createHmac('sha256', keys.idKey).update(data).digest() : createHash('sha256').update(data).digest();
}

/** nonce || ciphertext || tag. */
export function seal(key: Buffer, plain: Buffer, aad: Buffer): Buffer {
  const nonce = randomBytes(NONCE_BYTES);
  const c = createCipheriv('aes-256-gcm', key, nonce);
  c.setAAD(aad);
  const out = Buffer.allocUnsafe(NONCE_BYTES + plain.length + TAG_BYTES);
  nonce.copy(out, 0);
  let n = NONCE_BYTES + c.update(plain).copy(out, NONCE_BYTES);
  n += c.final().copy(out, n);
  c.getAuthTag().copy(out, n);
  return out;
}

/** The plaintext, or null when the tag does not verify (wrong key, tampering). */
export function open(key: Buffer, sealed: Buffer, aad: Buffer): Buffer | null {
  if (sealed.length < AEAD_OVERHEAD) return null;
  const d = createDecipheriv('aes-256-gcm', key, sealed.subarray(0, NONCE_BYTES));
  d.setAAD(aad);
  d.setAuthTag(sealed.subarray(sealed.length - TAG_BYTES));
  try {
    const a = d.update(sealed.subarray(NONCE_BYTES, sealed.length - TAG_BYTES));
    const b = d.final();
    return b.length === 0 ? a : Buffer.concat([a, b]);
  } catch {
    return null;
  }
}
