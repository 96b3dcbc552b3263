// A codec worker thread. Two jobs (messages, see codec-pool.ts):
//   encode: processSegment() (zero check, chunk id, zstd, AES-GCM) on a
//     segment the backup read; the segment buffer goes back with the results.
//   decode: decodeRange() (AES-GCM, zstd, id check) on a range a restore
//     read from a pack; the plaintexts come back in one transferred buffer.
// Buffers with their own ArrayBuffer are transferred, never copied. Stateless
// apart from its zstd context; it never touches the repository.
import { parentPort } from 'node:worker_threads';
import { decodeRange, processSegment, type RangeBlob } from './chunk-codec';
import type { RepoKeys } from './keys';

export interface EncodeJob {
  op: 'encode';
  seq: number;
  seg: Uint8Array;
  chunkSize: number;
  keys: { dataKey: Uint8Array; idKey: Uint8Array } | null;
}

export interface DecodeJob {
  op: 'decode';
  seq: number;
  range: Uint8Array;
  blobs: RangeBlob[];
  ids: Uint8Array;
  keys: { dataKey: Uint8Array; idKey: Uint8Array } | null;
}

function toKeys(k: EncodeJob['keys']): RepoKeys | null {
  return k ? { dataKey: Buffer.from(k.dataKey), idKey: Buffer.from(k.idKey) } : null;
}

parentPort?.on('message', (job: EncodeJob | DecodeJob) => {
  if (job.op === 'decode') {
    try {
      const r = decodeRange(toKeys(job.keys), job.range, job.blobs, job.ids);
      parentPort!.postMessage({ seq: job.seq, data: r.data, bad: r.bad }, r.data.length ? [r.data.buffer as ArrayBuffer] : []);
    } catch (err) {
      parentPort!.postMessage({ seq: job.seq, error: String((err as Error).stack ?? err) });
    }
    return;
  }
  try {
    const coded = processSegment(toKeys(job.keys), job.seg, job.chunkSize);
    // Structured clone copies a view's whole ArrayBuffer: give small results
    // (slices of Node's 8 KiB pool or of a zstd scratch buffer) their own.
    coded.encoded = coded.encoded.map((e) => (e && e.byteLength !== e.buffer.byteLength ? new Uint8Array(e) : e));
    parentPort!.postMessage({ seq: job.seq, seg: job.seg, coded }, [job.seg.buffer as ArrayBuffer]);
  } catch (err) {
    parentPort!.postMessage({ seq: job.seq, seg: job.seg, error: String((err as Error).stack ?? err) }, [job.seg.buffer as ArrayBuffer]);
  }
});
