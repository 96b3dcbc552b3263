// The codec stage of the backup pipeline on worker threads, so hashing,
// compression and encryption of one segment overlap with each other's and
// with reads and uploads, on every core.
//
// One pool per process, created on first use, its workers unref'd (an idle
// pool never keeps the process alive). A job transfers the segment's
// ArrayBuffer to a worker and back (no copy); the results (ids, compressed
// or sealed blobs) are copied by structured clone. Jobs go to the worker
// with the fewest jobs queued. Segment buffers must own their ArrayBuffer
// (Buffer.allocUnsafeSlow), never a slice of Node's shared pool.
//
// With threads = 0 (or where workers cannot start) processSegment() runs
// inline on the calling thread: same results.
import { Worker } from 'node:worker_threads';
import * as os from 'node:os';
import * as path from 'node:path';
import { processSegment, type CodedSegment } from './chunk-codec';
import type { RepoKeys } from './keys';

interface Pending {
  resolve: (r: { seg: Buffer; coded: CodedSegment }) => void;
  reject: (err: Error) => void;
}

interface Slot {
  worker: Worker;
  pending: Map<number, Pending>;
}

export class CodecPool {
  private readonly slots: Slot[] = [];
  private seq = 0;
  private broken: Error | undefined;

  constructor(threads: number) {
    const file = path.join(__dirname, `codec-worker${path.extname(__filename)}`);
    for (let i = 0; i < threads; i++) {
      const worker = new Worker(file);
      const slot: Slot = { worker, pending: new Map() };
      worker.on('message', (m: { seq: number; seg: Uint8Array; coded?: CodedSegment; error?: string }) => {
        const p = slot.pending.get(m.seq);
        if (!p) return;
        slot.pending.delete(m.seq);
        if (slot.pending.size === 0) worker.unref();
        if (m.error !== undefined) p.reject(new Error(`codec worker: ${m.error}`));
        else p.resolve({ seg: Buffer.from(m.seg.buffer, m.seg.byteOffset, m.seg.byteLength), coded: m.coded! });
      });
      const fail = (err: Error) => {
        this.broken ??= err;
        for (const p of slot.pending.values()) p.reject(err);
        slot.pending.clear();
      };
      worker.on('error', fail);
      worker.on('exit', (code) => fail(new Error(`codec worker exited (${code})`)));
      worker.unref(); // after the listeners: attaching 'message' refs the worker again
      this.slots.push(slot);
    }
  }

  get threads(): number {
    return this.slots.length;
  }

  /** Codes one segment; `seg` is transferred away while the job runs and handed back in the result. */
  run(keys: RepoKeys | null, seg: Buffer, chunkSize: number): Promise<{ seg: Buffer; coded: CodedSegment }> {
    if (this.slots.length === 0 || this.broken) return Promise.resolve({ seg, coded: processSegment(keys, seg, chunkSize) });
    let slot = this.slots[0]!;
    for (const s of this.slots) if (s.pending.size < slot.pending.size) slot = s;
    const seq = this.seq++;
    return new Promise((resolve, reject) => {
      slot.pending.set(seq, { resolve, reject });
      slot.worker.ref(); // a job in flight keeps the process alive until it answers
      const view = new Uint8Array(seg.buffer, seg.byteOffset, seg.byteLength);
      slot.worker.postMessage({ seq, seg: view, chunkSize, keys: keys ? { dataKey: keys.dataKey, idKey: keys.idKey } : null }, [seg.buffer as ArrayBuffer]);
    });
  }
}

let shared: CodecPool | undefined;

/** The process-wide pool: one worker per CPU, at most 4 (NBD_BACKUP_CODEC_THREADS overrides; 0 = inline). */
export function codecPool(): CodecPool {
  if (!shared) {
    const env = process.env.NBD_BACKUP_CODEC_THREADS;
    const n = env !== undefined && env !== '' ? Math.max(0, Math.min(64, Number(env) | 0)) : Math.min(4, os.availableParallelism());
    shared = new CodecPool(n);
  }
  return shared;
}
