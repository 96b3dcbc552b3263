// The codec stages on worker threads: for backup, hashing, compression and
// encryption of one segment overlap with other segments' and with reads and
// uploads, on every core; for restore, decryption, decompression and id
// checks of one range read overlap with other ranges' and with writes.
//
// One pool per process, created on first use, its workers unref'd (an idle
// pool never keeps the process alive). A job transfers the segment's
// ArrayBuffer to a worker and back (no copy); the results (ids, compressed
// or sealed blobs) are copied by structured clone. Jobs go to the worker
// with the fewest jobs queued. Only a buffer that owns its whole ArrayBuffer
// is transferred (Buffer.allocUnsafeSlow, or any allocation over 4 KiB);
// a slice of Node's shared 8 KiB pool is copied first, since transferring it
// would detach the pool under every other buffer in it.
//
// With threads = 0 (or where workers cannot start) processSegment() runs
// inline on the calling thread: same results.
import { Worker } from 'node:worker_threads';
import * as os from 'node:os';
import * as path from 'node:path';
import { decodeRange, processSegment, type CodedSegment, type RangeBlob } from './chunk-codec';
import type { RepoKeys } from './keys';

interface Reply {
  seq: number;
  error?: string;
  seg?: Uint8Array;
  coded?: CodedSegment;
  data?: Uint8Array;
  bad?: number;
}

interface Pending {
  resolve: (r: Reply) => void;
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
      worker.on('message', (m: Reply) => {
        const p = slot.pending.get(m.seq);
        if (!p) return;
        slot.pending.delete(m.seq);
        if (slot.pending.size === 0) worker.unref();
        if (m.error !== undefined) p.reject(new Error(`codec worker: ${m.error}`));
        else p.resolve(m);
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

  /** Terminates the workers; jobs still in flight reject. */
  async close(): Promise<void> {
    this.broken ??= new Error('codec pool closed');
    await Promise.all(this.slots.map((s) => s.worker.terminate()));
  }

  private post(msg: Record<string, unknown>, transfer: ArrayBuffer[]): Promise<Reply> {
    let slot = this.slots[0]!;
    for (const s of this.slots) if (s.pending.size < slot.pending.size) slot = s;
    const seq = this.seq++;
    return new Promise((resolve, reject) => {
      slot.pending.set(seq, { resolve, reject });
      slot.worker.ref(); // a job in flight keeps the process alive until it answers
      slot.worker.postMessage({ ...msg, seq }, transfer);
    });
  }

  private keysMsg(keys: RepoKeys | null): { dataKey: Buffer; idKey: Buffer } | null {
    return keys ? { dataKey: keys.dataKey, idKey: keys.idKey } : null;
  }

  /** Codes one segment; `seg` (owning its ArrayBuffer) is transferred away while the job runs and handed back in the result. */
  async run(keys: RepoKeys | null, seg: Buffer, chunkSize: number): Promise<{ seg: Buffer; coded: CodedSegment }> {
    if (this.slots.length === 0 || this.broken) return { seg, coded: processSegment(keys, seg, chunkSize) };
    const view = seg.byteOffset === 0 && seg.byteLength === seg.buffer.byteLength ? new Uint8Array(seg.buffer, 0, seg.byteLength) : new Uint8Array(seg);
    const r = await this.post({ op: 'encode', seg: view, chunkSize, keys: this.keysMsg(keys) }, [view.buffer as ArrayBuffer]);
    return { seg: Buffer.from(r.seg!.buffer, r.seg!.byteOffset, r.seg!.byteLength), coded: r.coded! };
  }

  /** Decodes and verifies the blobs of one range read (see decodeRange). `range` is given away. */
  async decode(keys: RepoKeys | null, range: Buffer, blobs: RangeBlob[], ids: Buffer): Promise<{ data: Buffer; bad: number }> {
    if (this.slots.length === 0 || this.broken) return decodeRange(keys, range, blobs, ids);
    // Transfer only a buffer that owns its whole ArrayBuffer (never a slice of a shared pool).
    // (Buffer.from(...) of a small buffer would land in that pool again: copy into a plain Uint8Array.)
    const view = range.byteOffset === 0 && range.byteLength === range.buffer.byteLength ? new Uint8Array(range.buffer, 0, range.byteLength) : new Uint8Array(range);
    const r = await this.post({ op: 'decode', range: view, blobs, ids: new Uint8Array(ids), keys: this.keysMsg(keys) }, [view.buffer as ArrayBuffer]);
    const d = r.data!;
    return { data: Buffer.from(d.buffer, d.byteOffset, d.byteLength), bad: r.bad! };
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

/** Stops the shared pool's workers (a server's shutdown); the next codecPool() starts a new one. */
export async function closeCodecPool(): Promise<void> {
  const p = shared;
  shared = undefined;
  await p?.close();
}
