// One chunk's stored form (a "blob" inside a pack):
//   body  = kind(1: 0 raw, 1 zstd) || data
//   blob  = body                                     plain repository
//   blob  = nonce || AES-256-GCM(body, aad = id) || tag  encrypted repository
// Decoding always checks the result against its id (SHA-256 or HMAC of the
// plaintext), and with encryption also the GCM tag bound to that id, so a
// blob is never returned unverified and a blob swapped for another fails.
import { compress, decompress } from 'zstd-napi';
import { chunkId, open, seal, type RepoKeys } from './keys';

const RAW = 0;
const ZSTD = 1;
/** zstd level: 3 is zstd's default; fast and within a few % of level 9 on disk images. */
const LEVEL = 3;

export function encodeChunk(keys: RepoKeys | null, id: Buffer, data: Buffer): Buffer {
  const z = compress(data, { compressionLevel: LEVEL });
  // Keep the compressed form only when it saves something: incompressible
  // data costs 1 byte (+28 encrypted), which keeps repository growth ~1x.
  const body = z.length + 1 < data.length ? Buffer.concat([Buffer.from([ZSTD]), z]) : Buffer.concat([Buffer.from([RAW]), data]);
  return keys ? seal(keys.dataKey, body, id) : body;
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
