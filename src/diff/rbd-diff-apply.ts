// applyRbdDiff(): applies an `rbd diff v1` stream to a DiffTarget.
//
// Order of checks, all before the first write:
//   1. the stream's metadata (parser: banner, records, size present);
//   2. its size against the target's: they must be equal (DIFF_MISMATCH: we
//      do not resize; rbd import-diff would);
//   3. opts.checkHeader(header), where the caller checks the from-snapshot
//      (and anything else it knows about the image) and may refuse with
//      DIFF_MISMATCH.
// Then every 'w' piece and 'z' record is written in stream order.
//
// Not atomic, like rbd import-diff: a stream that turns out bad, a failed
// write or a cancel stops the apply and leaves the target with a PREFIX of
// the stream applied: every record before the failing one, and of a 'w'
// record cut short only its whole pieces (parser pieceBytes, 1 MiB). Nothing
// outside the stream's (= the target's) size is ever written, and nothing
// from a record whose header failed. Before the error is thrown, every write
// already issued has settled, so the prefix is all there is.
//
// Concurrency: up to `maxInFlight` writes at once, never two that overlap
// (a write waits for in-flight ones it overlaps), so the result equals
// applying the records one by one. Memory: maxInFlight pieces.
import type { Readable } from 'node:stream';
import { NbdError } from '../errors';
import type { DiffTarget } from './diff-target';
import { parseRbdDiff, type DiffHeader } from './rbd-diff-parser';

export interface ApplyDiffOptions {
  signal?: AbortSignal;
  /** Called once with the stream's metadata, after the size check and before any write; throw to refuse. */
  checkHeader?: (h: DiffHeader) => Promise<void> | void;
  /** Writes in flight at once (default 4). */
  maxInFlight?: number;
  /** Largest single write of a 'w' record's data (default 1 MiB). */
  pieceBytes?: number;
}

export interface ApplyDiffResult extends DiffHeader {
  bytesWritten: number;
  bytesZeroed: number;
}

interface InFlight {
  start: number;
  end: number;
  done: Promise<void>;
}

export async function applyRbdDiff(input: Readable | AsyncIterable<Buffer>, target: DiffTarget, opts: ApplyDiffOptions = {}): Promise<ApplyDiffResult> {
  const maxInFlight = opts.maxInFlight ?? 4;
  const result: ApplyDiffResult = { fromSnap: null, toSnap: null, size: 0, bytesWritten: 0, bytesZeroed: 0 };
  const inFlight = new Set<InFlight>();
  let failure: unknown;

  const issue = async (start: number, end: number, op: () => Promise<void>) => {
    // Wait for room and for every in-flight write this one overlaps.
    for (;;) {
      if (failure) throw failure;
      const blockers = [...inFlight].filter((w) => w.start < end && start < w.end);
      if (blockers.length === 0 && inFlight.size < maxInFlight) break;
      await Promise.race((blockers.length ? blockers : [...inFlight]).map((w) => w.done));
    }
    const w: InFlight = { start, end, done: Promise.resolve() };
    w.done = op().then(
      () => void inFlight.delete(w),
      (err: unknown) => {
        failure ??= err;
        inFlight.delete(w);
      },
    );
    inFlight.add(w);
  };
  const settle = async () => {
    while (inFlight.size) await Promise.all([...inFlight].map((w) => w.done));
  };

  try {
    for await (const ev of parseRbdDiff(input, { pieceBytes: opts.pieceBytes })) {
      if (opts.signal?.aborted) throw new NbdError('JOB_CANCELED', 'the diff apply was canceled: the image holds part of the diff');
      if (failure) throw failure;
      switch (ev.kind) {
        case 'header': {
          result.fromSnap = ev.fromSnap;
          result.toSnap = ev.toSnap;
          result.size = ev.size;
          if (ev.size !== target.size) {
            throw new NbdError('DIFF_MISMATCH', `the diff is for an image of ${ev.size} bytes; this one has ${target.size} (diff apply does not resize)`);
          }
          await opts.checkHeader?.({ fromSnap: ev.fromSnap, toSnap: ev.toSnap, size: ev.size });
          break;
        }
        case 'data': {
          const { offset, data } = ev;
          await issue(offset, offset + data.length, () => target.write(offset, data));
          result.bytesWritten += data.length;
          break;
        }
        case 'zero': {
          if (ev.length === 0) break;
          const { offset, length } = ev;
          await issue(offset, offset + length, () => target.zero(offset, length));
          result.bytesZeroed += length;
          break;
        }
        case 'end':
          break;
      }
    }
    await settle();
    if (failure) throw failure;
    await target.flush();
  } catch (err) {
    failure ??= err;
    await settle();
    throw failure;
  }
  return result;
}
