// One chunk's stored form (a "blob" inside a pack):
//   body  = kind(1: 0 raw, 1 zstd) || data
//   blob  = body                                     plain repository
//   blob  = nonce || AES-256-GCM(body, aad = id) || tag  encrypted repository
// Decoding always checks the result against its id (SHA-256 or HMAC of the
// plaintext), and with encryption also the GCM tag bound to that id, so a
// blob is never returned unverified and a blob swapped for another fails.
import { Compressor, decompress } from 'zstd-napi';
import { chunkId, open, seal, type RepoKeys } from './keys';

const RAW = 0;
const ZSTD = 1;
/** zstd level: 3, zstd's own default (speed and ratio balanced). */
const LEVEL = 3;

/** One compression context per thread, reused: a fresh one per chunk costs more than the compression. */
let compressor: Compressor | undefined;

const KIND_RAW = Buffer.from([RAW]);
const KIND_ZSTD = Buffer.from([ZSTD]);

/** How processSegment() left each chunk. */
export enum Coded {
  /** All zeros: recorded as ZERO, never stored. */
  Zero = 0,
  /** Stored raw (plain repository): blob = [RAW] || the chunk's bytes in the segment buffer. */
  Raw = 1,
  /** zstd (plain repository): blob = [ZSTD] || encoded. */
  Zstd = 2,
  /** Encrypted repository: blob = encoded. */
  Sealed = 3,
}

/** The result for one segment (consecutive chunks read together). */
export interface CodedSegment {
  kinds: Uint8Array;
  /** 32 bytes per chunk (zeros for Zero chunks). */
  ids: Uint8Array;
  /** Per chunk: the encoded bytes for Zstd and Sealed, else null. */
  encoded: (Uint8Array | null)[];
}

const ZEROS = Buffer.alloc(1024 * 1024);

/** memcmp against a zero buffer, 1 MiB at a time (native). */
export function isAllZero(b: Uint8Array): boolean {
  const buf = Buffer.from(b.buffer, b.byteOffset, b.byteLength);
  for (let o = 0; o < buf.length; o += ZEROS.length) {
    const n = Math.min(ZEROS.length, buf.length - o);
    if (!buf.subarray(o, o + n).equals(ZEROS.subarray(0, n))) return false;
  }
  return true;
}

/**
 * Zero check, id, compression and encryption of every chunk of a segment.
 * Pure CPU work on one buffer: runs in a codec worker (codec-worker.ts) or
 * inline. Chunks the repository already has are encoded too (cheap next to
 * hashing, and the worker does not know the repository).
 */
export function processSegment(keys: RepoKeys | null, seg: Uint8Array, chunkSize: number): CodedSegment {
  if (!compressor) {
    compressor = new Compressor();
    compressor.setParameters({ compressionLevel: LEVEL });
  }
  const n = Math.ceil(seg.length / chunkSize);
  const out: CodedSegment = { kinds: new Uint8Array(n), ids: new Uint8Array(n * 32), encoded: new Array(n).fill(null) };
  const buf = Buffer.from(seg.buffer, seg.byteOffset, seg.byteLength);
  for (let k = 0; k < n; k++) {
    const data = buf.subarray(k * chunkSize, Math.min((k + 1) * chunkSize, buf.length));
    if (isAllZero(data)) continue; // kinds[k] = Zero
    const id = chunkId(keys, data);
    out.ids.set(id, k * 32);
    const z = compressor.compress(data);
    // Keep the compressed form only when it saves something: incompressible
    // data costs 1 byte (+28 encrypted), which keeps repository growth ~1x.
    const useZ = z.length + 1 < data.length;
    if (keys) {
      out.kinds[k] = Coded.Sealed;
      out.encoded[k] = seal(keys.dataKey, Buffer.concat(useZ ? [KIND_ZSTD, z] : [KIND_RAW, data]), id);
    } else if (useZ) {
      out.kinds[k] = Coded.Zstd;
      out.encoded[k] = z;
    } else {
      out.kinds[k] = Coded.Raw;
    }
  }
  return out;
}

/** The blob of chunk k of a coded segment, as parts to copy back to back into a pack. */
export function blobParts(c: CodedSegment, seg: Buffer, chunkSize: number, k: number): Buffer[] {
  const e = c.encoded[k];
  switch (c.kinds[k]) {
    case Coded.Raw:
      return [KIND_RAW, seg.subarray(k * chunkSize, Math.min((k + 1) * chunkSize, seg.length))];
    case Coded.Zstd:
      return [KIND_ZSTD, Buffer.from(e!.buffer, e!.byteOffset, e!.byteLength)];
    case Coded.Sealed:
      return [Buffer.from(e!.buffer, e!.byteOffset, e!.byteLength)];
    default:
      throw new Error(`chunk ${k} has no blob (kind ${c.kinds[k]})`);
  }
}

/**
 * The plaintext of a blob, or null when it does not verify (damaged,
 * swapped, wrong length): callers turn null into BACKUP_DATA_CORRUPT with
 * the pack and chunk named.
 */
export function decodeChunk(keys: RepoKeys | null, id: Buffer, blob: Buffer, rawLength: number): Buffer | null {
  const body = keys ? open(keys.dataKey, blob, id) : blob;
  if (body === null || body.length < 1) return null;
  let data: Buffer;
  try {
    if (body[0] === RAW) data = body.subarray(1);
    else if (body[0] === ZSTD) data = decompress(body.subarray(1));
    else return null;
  } catch {
    return null;
  }
  if (data.length !== rawLength) return null;
  return chunkId(keys, data).equals(id) ? data : null;
}

/** One blob of a range read from a pack: where it is in the range, and how long its plaintext is. */
export interface RangeBlob {
  /** Offset of the blob in the range buffer. */
  offset: number;
  length: number;
  rawLength: number;
}

/**
 * Decodes and verifies consecutive blobs of one range read (ids: 32 bytes
 * per blob, back to back) into one buffer
 * of their plaintexts back to back. `bad` is the index of the first blob
 * that fails (then `data` is empty), or -1.
 */
export function decodeRange(keys: RepoKeys | null, range: Uint8Array, blobs: RangeBlob[], ids: Uint8Array): { data: Buffer; bad: number } {
  const buf = Buffer.from(range.buffer, range.byteOffset, range.byteLength);
  const idBuf = Buffer.from(ids.buffer, ids.byteOffset, ids.byteLength);
  const data = Buffer.allocUnsafeSlow(blobs.reduce((n, b) => n + b.rawLength, 0));
  let at = 0;
  for (let k = 0; k < blobs.length; k++) {
    const b = blobs[k]!;
    const blob = buf.subarray(b.offset, b.offset + b.length);
    const plain = blob.length === b.length ? decodeChunk(keys, idBuf.subarray(k * 32, (k + 1) * 32), blob, b.rawLength) : null;
    if (plain === null) return { data: Buffer.alloc(0), bad: k };
    at += plain.copy(data, at);
  }
  return { data, bad: -1 };
}
