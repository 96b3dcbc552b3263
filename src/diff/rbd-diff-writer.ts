// writeRbdDiff(): a ChunkSource's changed runs as an `rbd diff v1` stream
// (format: rbd-diff-format.ts, docs/diff-format.md).
//
// Records go out in volume order, ascending and disjoint, as rbd export-diff
// writes them:
//   - a run marked `zero` becomes a 'z' record without a read;
//   - other runs are read in segments of whole chunks (at most
//     SEGMENT_BYTES, at least one chunk); in each segment, chunks that read as
//     all zeros become 'z', the others 'w' with their bytes. Adjacent chunks
//     of one kind are coalesced: 'w' records within a segment (a record's
//     length is written before its data, so a 'w' never spans segments),
//     'z' records across segments and runs.
//   - the last chunk may be short: records end at the volume size.
// Memory: at most two segments (the one being written, the one being read
// ahead). Backpressure: after a write that fills the stream's buffer, the
// writer waits for 'drain' before it starts the next read.
// Cancel: `signal` is checked between segments (JOB_CANCELED); the stream is
// then incomplete (no 'e'), which every reader refuses.
// The writer does not end `out`: the caller does (stdout stays open).
import type { Writable } from 'node:stream';
import { NbdError } from '../errors';
import type { ChunkRun, ChunkSource } from '../backup/source';
import { encodeEnd, encodeExtent, encodeHeader, TAG } from './rbd-diff-format';

/** Largest read (and largest 'w' record): 4 MiB, rbd's default object size. */
export const SEGMENT_BYTES = 4 * 1024 * 1024;

export interface WriteDiffOptions {
  fromSnap: string | null;
  toSnap: string | null;
  signal?: AbortSignal;
  /** Test hook: segment size in bytes (rounded down to whole chunks, at least one). */
  segmentBytes?: number;
}

export interface WriteDiffResult {
  size: number;
  /** Bytes carried by 'w' records. */
  bytesData: number;
  /** Bytes covered by 'z' records. */
  bytesZero: number;
  /** Bytes read from the source. */
  bytesRead: number;
  records: number;
}

/** True when every byte of `b` is 0 (memcmp against a shared zero page). */
const ZERO_PAGE = Buffer.alloc(64 * 1024);
export function isAllZero(b: Buffer): boolean {
  for (let i = 0; i < b.length; i += ZERO_PAGE.length) {
    const n = Math.min(ZERO_PAGE.length, b.length - i);
    if (b.compare(ZERO_PAGE, 0, n, i, i + n) !== 0) return false;
  }
  return true;
}

/** Writes `data` to `out`, waiting for 'drain' when its buffer is full; rejects on a stream error. */
class Sink {
  private error: Error | undefined;
  private readonly out: Writable;
  constructor(out: Writable) {
    this.out = out;
    out.on('error', (e) => (this.error ??= e));
  }
  async write(data: Buffer): Promise<void> {
    if (this.error) throw this.error;
    if (this.out.write(data)) return;
    await new Promise<void>((resolve, reject) => {
      const done = (err?: Error) => {
        this.out.off('drain', onDrain);
        this.out.off('error', done);
        this.out.off('close', onClose);
        if (err) reject(err);
        else resolve();
      };
      const onDrain = () => done();
      const onClose = () => done(this.error ?? new Error('the output stream closed'));
      this.out.on('drain', onDrain);
      this.out.on('error', done);
      this.out.on('close', onClose);
    });
  }
  /** Resolves once `data` was handed to the underlying resource. */
  last(data: Buffer): Promise<void> {
    if (this.error) return Promise.reject(this.error);
    return new Promise((resolve, reject) => this.out.write(data, (err) => (err ? reject(err) : resolve())));
  }
}

export async function writeRbdDiff(source: ChunkSource, out: Writable, opts: WriteDiffOptions): Promise<WriteDiffResult> {
  const { size, chunkSize } = source;
  const chunks = Math.ceil(size / chunkSize);
  const perSegment = Math.max(1, Math.floor((opts.segmentBytes ?? SEGMENT_BYTES) / chunkSize));
  const sink = new Sink(out);
  const result: WriteDiffResult = { size, bytesData: 0, bytesZero: 0, bytesRead: 0, records: 0 };
  const checkAbort = () => {
    if (opts.signal?.aborted) throw new NbdError('JOB_CANCELED', 'the diff was canceled: the stream is incomplete (no end record)');
  };

  // A 'z' range not yet written: extended while the next zero range is adjacent.
  let zeroStart = 0;
  let zeroEnd = 0;
  const flushZero = async () => {
    if (zeroEnd > zeroStart) {
      await sink.write(encodeExtent(TAG.ZERO, zeroStart, zeroEnd - zeroStart));
      result.bytesZero += zeroEnd - zeroStart;
      result.records++;
    }
    zeroStart = zeroEnd = 0;
  };
  const addZero = async (start: number, end: number) => {
    if (zeroEnd > zeroStart && zeroEnd === start) {
      zeroEnd = end;
      return;
    }
    await flushZero();
    zeroStart = start;
    zeroEnd = end;
  };
  const writeData = async (start: number, data: Buffer) => {
    await flushZero();
    await sink.write(encodeExtent(TAG.WRITE, start, data.length));
    await sink.write(data);
    result.bytesData += data.length;
    result.records++;
  };

  /** Segments to read, in order: [first chunk, chunk count) within one non-zero run. */
  async function* plan(): AsyncGenerator<{ run: ChunkRun; first: number; count: number }> {
    let prevEnd = 0;
    for await (const run of source.changedRuns()) {
      if (!Number.isInteger(run.start) || !Number.isInteger(run.count) || run.start < prevEnd || run.count < 1 || run.start + run.count > chunks) {
        throw new RangeError(`changed run ${run.start}+${run.count} is not ascending, disjoint and within the volume (${chunks} chunks)`);
      }
      prevEnd = run.start + run.count;
      if (run.zero) {
        yield { run, first: run.start, count: run.count };
        continue;
      }
      for (let c = run.start; c < prevEnd; c += perSegment) yield { run, first: c, count: Math.min(perSegment, prevEnd - c) };
    }
  }

  await sink.write(encodeHeader({ fromSnap: opts.fromSnap, toSnap: opts.toSnap, size }));
  const read = async (seg: { run: ChunkRun; first: number; count: number }) => {
    const start = seg.first * chunkSize;
    const end = Math.min(size, (seg.first + seg.count) * chunkSize);
    if (seg.run.zero) return { seg, start, end, buf: null };
    const buf = Buffer.allocUnsafe(end - start);
    await source.read(start, buf);
    result.bytesRead += buf.length;
    return { seg, start, end, buf };
  };

  const segments = plan()[Symbol.asyncIterator]();
  const next = async () => {
    const r = await segments.next();
    return r.done ? null : read(r.value);
  };
  let pending = next();
  for (;;) {
    checkAbort();
    const cur = await pending;
    if (!cur) break;
    pending = next(); // read ahead while this one is written
    pending.catch(() => undefined); // observed below; an error here must not be unhandled meanwhile
    if (!cur.buf) {
      await addZero(cur.start, cur.end);
      continue;
    }
    // Split the segment into maximal runs of zero / data chunks (the last chunk may be short).
    const buf = cur.buf;
    const zeroAt = (off: number) => isAllZero(buf.subarray(off, Math.min(off + chunkSize, buf.length)));
    let runStart = 0;
    let runZero = zeroAt(0);
    for (let off = chunkSize; ; off += chunkSize) {
      const atEnd = off >= buf.length;
      const z = atEnd ? !runZero : zeroAt(off);
      if (z === runZero) continue;
      const end = Math.min(off, buf.length);
      if (runZero) await addZero(cur.start + runStart, cur.start + end);
      else await writeData(cur.start + runStart, buf.subarray(runStart, end));
      if (atEnd) break;
      runStart = off;
      runZero = z;
    }
  }
  await flushZero();
  await sink.last(encodeEnd());
  return result;
}
