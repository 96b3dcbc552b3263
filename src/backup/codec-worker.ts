// A codec worker thread: runs processSegment() (zero check, chunk id,
// zstd, AES-GCM) on segments the backup pipeline sends, and sends the
// segment buffer back with the results. Messages (see codec-pool.ts):
//   in:  { seq, seg: Uint8Array (its ArrayBuffer transferred), chunkSize, keys: {dataKey, idKey} | null }
//   out: { seq, seg (transferred back), coded } | { seq, error }
// Stateless apart from its zstd context; it never touches the repository.
import { parentPort } from 'node:worker_threads';
import { processSegment } from './chunk-codec';
import type { RepoKeys } from './keys';

interface Job {
  seq: number;
  seg: Uint8Array;
  chunkSize: number;
  keys: { dataKey: Uint8Array; idKey: Uint8Array } | null;
}

parentPort?.on('message', (job: Job) => {
  try {
    const keys: RepoKeys | null = job.keys ? { dataKey: Buffer.from(job.keys.dataKey), idKey: Buffer.from(job.keys.idKey) } : null;
    const coded = processSegment(keys, job.seg, job.chunkSize);
    // Structured clone copies a view's whole ArrayBuffer: give small results
    // (slices of Node's 8 KiB pool or of a zstd scratch buffer) their own.
    coded.encoded = coded.encoded.map((e) => (e && e.byteLength !== e.buffer.byteLength ? new Uint8Array(e) : e));
    parentPort!.postMessage({ seq: job.seq, seg: job.seg, coded }, [job.seg.buffer as ArrayBuffer]);
  } catch (err) {
    parentPort!.postMessage({ seq: job.seq, seg: job.seg, error: String((err as Error).stack ?? err) }, [job.seg.buffer as ArrayBuffer]);
  }
});
