// A backup's index: for every chunk of the volume, the id of its content or
// ZERO. "Same as the parent" is resolved when the backup is written (the
// parent's id is copied), so a restore needs this one index and the packs,
// never a chain of parents.
//
//   body = u64le volume size || u32le chunk size || u32le chunk count || count x 32-byte id
//   ZERO = 32 zero bytes (no SHA-256/HMAC output is all zero in practice: 2^-256)
// Sealed in an envelope (type BackupIndex, zstd: runs of ZERO and repeated
// parent ids compress well) under indexes/<backup id>.
//
// Memory: 32 bytes per chunk of the volume (0.05% of the volume at 64 KiB
// chunks), held by backup and restore for the whole run.
import { NbdError } from '../errors';
import { ObjectType, openObject, sealObject } from './envelope';
import type { RepoKeys } from './keys';

export const ID_BYTES = 32;
export const ZERO_ID = Buffer.alloc(ID_BYTES);

export function indexKey(backupId: string): string {
  return `indexes/${backupId}`;
}

export class BackupIndex {
  readonly size: number;
  readonly chunkSize: number;
  readonly count: number;
  /** count x 32 bytes; an all-zero entry means the chunk reads as zeros. */
  readonly ids: Buffer;

  constructor(size: number, chunkSize: number, ids?: Buffer) {
    this.size = size;
    this.chunkSize = chunkSize;
    this.count = Math.ceil(size / chunkSize);
    this.ids = ids ?? Buffer.alloc(this.count * ID_BYTES);
    if (this.ids.length !== this.count * ID_BYTES) throw new NbdError('REPO_CORRUPT', 'backup index: entry count does not match the volume size');
  }

  id(i: number): Buffer {
    return this.ids.subarray(i * ID_BYTES, (i + 1) * ID_BYTES);
  }

  isZero(i: number): boolean {
    return this.id(i).equals(ZERO_ID);
  }

  set(i: number, id: Buffer): void {
    id.copy(this.ids, i * ID_BYTES);
  }

  setZero(i: number): void {
    this.ids.fill(0, i * ID_BYTES, (i + 1) * ID_BYTES);
  }

  /** Length of chunk i (the last one may be short). */
  chunkLength(i: number): number {
    return Math.min(this.chunkSize, this.size - i * this.chunkSize);
  }

  seal(keys: RepoKeys | null, backupId: string): Buffer {
    const h = Buffer.alloc(16);
    h.writeBigUInt64LE(BigInt(this.size), 0);
    h.writeUInt32LE(this.chunkSize, 8);
    h.writeUInt32LE(this.count, 12);
    return sealObject(keys, ObjectType.BackupIndex, indexKey(backupId), Buffer.concat([h, this.ids]));
  }

  static open(keys: RepoKeys | null, backupId: string, data: Buffer): BackupIndex {
    const key = indexKey(backupId);
    const body = openObject(keys, ObjectType.BackupIndex, key, data);
    if (body.length < 16) throw new NbdError('REPO_CORRUPT', `${key}: truncated`);
    const size = Number(body.readBigUInt64LE(0));
    const chunkSize = body.readUInt32LE(8);
    const count = body.readUInt32LE(12);
    if (chunkSize === 0 || count !== Math.ceil(size / chunkSize) || body.length !== 16 + count * ID_BYTES) {
      throw new NbdError('REPO_CORRUPT', `${key}: inconsistent header`);
    }
    return new BackupIndex(size, chunkSize, Buffer.from(body.subarray(16)));
  }
}
