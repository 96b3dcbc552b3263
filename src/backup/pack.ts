// Packs: many chunk blobs in one large object, so a backup of N changed
// chunks costs about N x chunk / packSize PUTs instead of N.
//
//   pack = "NBDPACK1" || blob 0 || blob 1 || ... || trailer || u32le(trailer length) || "NBDPKEND"
//   trailer = the pack index sealed as an envelope (type PackIndex, context "pack-trailer")
//   name  = hex SHA-256 of the whole pack (so --read-data checks every byte)
//   key   = packs/<first 2 hex>/<name>
//
// The same pack index is also stored on its own as packidx/<name> (context
// its key): readers load those small objects to learn which chunks exist,
// never the packs. A pack is written before its packidx, and prune deletes
// the packidx before the pack, so "a packidx exists" implies "its pack
// exists" (outside a prune, which locking keeps apart from backups).
import { createHash } from 'node:crypto';
import { NbdError } from '../errors';
import { ObjectType, openObject, sealObject } from './envelope';
import type { RepoKeys } from './keys';

export const PACK_MAGIC = Buffer.from('NBDPACK1');
export const PACK_END = Buffer.from('NBDPKEND');
const ENTRY_BYTES = 32 + 4 + 4 + 4;

export interface PackEntry {
  id: Buffer;
  /** Byte offset of the blob in the pack. */
  offset: number;
  /** Blob length in the pack. */
  length: number;
  /** Plaintext chunk length. */
  rawLength: number;
}

export function packKey(name: string): string {
  return `packs/${name.slice(0, 2)}/${name}`;
}

export function packIndexKey(name: string): string {
  return `packidx/${name}`;
}

export function encodePackIndex(entries: PackEntry[]): Buffer {
  const b = Buffer.allocUnsafe(4 + entries.length * ENTRY_BYTES);
  b.writeUInt32LE(entries.length, 0);
  let o = 4;
  for (const e of entries) {
    e.id.copy(b, o);
    b.writeUInt32LE(e.offset, o + 32);
    b.writeUInt32LE(e.length, o + 36);
    b.writeUInt32LE(e.rawLength, o + 40);
    o += ENTRY_BYTES;
  }
  return b;
}

export function decodePackIndex(body: Buffer, what: string): PackEntry[] {
  const n = body.length >= 4 ? body.readUInt32LE(0) : -1;
  if (n < 0 || body.length !== 4 + n * ENTRY_BYTES) throw new NbdError('REPO_CORRUPT', `${what}: bad pack index length`);
  const out: PackEntry[] = new Array(n);
  for (let i = 0, o = 4; i < n; i++, o += ENTRY_BYTES) {
    out[i] = {
      id: Buffer.from(body.subarray(o, o + 32)),
      offset: body.readUInt32LE(o + 32),
      length: body.readUInt32LE(o + 36),
      rawLength: body.readUInt32LE(o + 40),
    };
  }
  return out;
}

export function sealPackIndex(keys: RepoKeys | null, name: string, entries: PackEntry[]): Buffer {
  return sealObject(keys, ObjectType.PackIndex, packIndexKey(name), encodePackIndex(entries));
}

export function openPackIndex(keys: RepoKeys | null, name: string, data: Buffer): PackEntry[] {
  const key = packIndexKey(name);
  return decodePackIndex(openObject(keys, ObjectType.PackIndex, key, data), key);
}

/** The pack index kept in a pack's own trailer (for repair and --read-data). */
export function readPackTrailer(keys: RepoKeys | null, name: string, pack: Buffer): PackEntry[] {
  const key = packKey(name);
  if (pack.length < PACK_MAGIC.length + 12 || !pack.subarray(0, 8).equals(PACK_MAGIC) || !pack.subarray(pack.length - 8).equals(PACK_END)) {
    throw new NbdError('BACKUP_DATA_CORRUPT', `pack ${key} is damaged: bad magic`);
  }
  const len = pack.readUInt32LE(pack.length - 12);
  if (len > pack.length - 20) throw new NbdError('BACKUP_DATA_CORRUPT', `pack ${key} is damaged: bad trailer length`);
  const trailer = pack.subarray(pack.length - 12 - len, pack.length - 12);
  return decodePackIndex(openObject(keys, ObjectType.PackIndex, 'pack-trailer', trailer), key);
}

/**
 * Accumulates blobs into one pack buffer (grown by doubling, so a blob is
 * copied once when it is added); finish() seals it. Not shared between tasks.
 */
export class PackBuilder {
  private buf: Buffer;
  readonly entries: PackEntry[] = [];
  private bytes: number;

  constructor(capacity = 1024 * 1024) {
    this.buf = Buffer.allocUnsafe(Math.max(capacity, 64 * 1024));
    PACK_MAGIC.copy(this.buf, 0);
    this.bytes = PACK_MAGIC.length;
  }

  get size(): number {
    return this.bytes;
  }

  get count(): number {
    return this.entries.length;
  }

  private reserve(n: number): void {
    if (this.bytes + n <= this.buf.length) return;
    const next = Buffer.allocUnsafe(Math.max(this.buf.length * 2, this.bytes + n));
    this.buf.copy(next, 0, 0, this.bytes);
    this.buf = next;
  }

  /** Adds one blob, given as parts stored back to back. */
  add(id: Buffer, blob: Buffer[], rawLength: number): number {
    const length = blob.reduce((n, p) => n + p.length, 0);
    this.reserve(length);
    this.entries.push({ id, offset: this.bytes, length, rawLength });
    for (const p of blob) this.bytes += p.copy(this.buf, this.bytes);
    return length;
  }

  finish(keys: RepoKeys | null): { name: string; data: Buffer; entries: PackEntry[] } {
    const trailer = sealObject(keys, ObjectType.PackIndex, 'pack-trailer', encodePackIndex(this.entries));
    this.reserve(trailer.length + 12);
    this.bytes += trailer.copy(this.buf, this.bytes);
    this.buf.writeUInt32LE(trailer.length, this.bytes);
    PACK_END.copy(this.buf, this.bytes + 4);
    this.bytes += 12;
    const data = this.buf.subarray(0, this.bytes);
    return { name: createHash('sha256').update(data).digest('hex'), data, entries: this.entries };
  }
}
