// The Ceph `rbd diff v1` stream: constants and record encoders only, no I/O.
// Spec: Ceph doc/dev/rbd-diff.rst; the rules we emit and accept, and how they
// relate to what `rbd export-diff` writes and `rbd import-diff` reads, are in
// docs/diff-format.md.
//
//   "rbd diff v1\n"                          banner, 12 bytes
//   metadata records, any order, each at most once, all before data:
//     'f' le32 len, name                     from-snapshot (absent: a full diff)
//     't' le32 len, name                     to-snapshot (absent: the live image)
//     's' le64 size                          the image size at the end
//   data records, in any order (we emit them ascending and disjoint):
//     'w' le64 offset, le64 length, data     these bytes
//     'z' le64 offset, le64 length           this range reads as zeros
//   'e'                                      end; nothing may follow
//
// Integers are little-endian; names are length-prefixed, not terminated.

export const RBD_DIFF_BANNER = Buffer.from('rbd diff v1\n', 'latin1');

export const TAG = {
  FROM_SNAP: 0x66, // 'f'
  TO_SNAP: 0x74, // 't'
  SIZE: 0x73, // 's'
  WRITE: 0x77, // 'w'
  ZERO: 0x7a, // 'z'
  END: 0x65, // 'e'
} as const;

/** Longest snapshot name accepted: rbd import-diff's own limit (4 KiB). */
export const MAX_SNAP_NAME = 4096;

/** Offsets, lengths and sizes must fit a JS number exactly. */
export const MAX_OFFSET = Number.MAX_SAFE_INTEGER;

/** Bytes of a 'w' or 'z' record before its data: tag, offset, length. */
export const EXTENT_HEADER = 17;

export function encodeBanner(): Buffer {
  return Buffer.from(RBD_DIFF_BANNER);
}

function nameRecord(tag: number, name: string): Buffer {
  const bytes = Buffer.from(name, 'utf8');
  if (bytes.length > MAX_SNAP_NAME) throw new RangeError(`snapshot name is ${bytes.length} bytes; rbd accepts at most ${MAX_SNAP_NAME}`);
  const b = Buffer.alloc(5 + bytes.length);
  b[0] = tag;
  b.writeUInt32LE(bytes.length, 1);
  bytes.copy(b, 5);
  return b;
}

export function encodeFromSnap(name: string): Buffer {
  return nameRecord(TAG.FROM_SNAP, name);
}

export function encodeToSnap(name: string): Buffer {
  return nameRecord(TAG.TO_SNAP, name);
}

function checkU64(what: string, v: number): void {
  if (!Number.isSafeInteger(v) || v < 0) throw new RangeError(`${what} must be a non-negative safe integer, got ${v}`);
}

export function encodeSize(size: number): Buffer {
  checkU64('size', size);
  const b = Buffer.alloc(9);
  b[0] = TAG.SIZE;
  b.writeBigUInt64LE(BigInt(size), 1);
  return b;
}

/** The header of a 'w' (data follows: `length` bytes) or 'z' record. */
export function encodeExtent(tag: typeof TAG.WRITE | typeof TAG.ZERO, offset: number, length: number): Buffer {
  checkU64('offset', offset);
  checkU64('length', length);
  const b = Buffer.alloc(EXTENT_HEADER);
  b[0] = tag;
  b.writeBigUInt64LE(BigInt(offset), 1);
  b.writeBigUInt64LE(BigInt(length), 9);
  return b;
}

export function encodeEnd(): Buffer {
  return Buffer.from([TAG.END]);
}

/** The metadata part of a stream: banner, 'f' and 't' when given, 's'. */
export function encodeHeader(h: { fromSnap: string | null; toSnap: string | null; size: number }): Buffer {
  const parts = [encodeBanner()];
  if (h.fromSnap !== null) parts.push(encodeFromSnap(h.fromSnap));
  if (h.toSnap !== null) parts.push(encodeToSnap(h.toSnap));
  parts.push(encodeSize(h.size));
  return Buffer.concat(parts);
}
