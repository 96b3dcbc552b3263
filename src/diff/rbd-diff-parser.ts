// A streaming, validating parser of `rbd diff v1` (rbd-diff-format.ts,
// docs/diff-format.md). The input is untrusted: every field is checked before
// anything is yielded for it, so a consumer never sees an extent outside the
// declared size, an unknown record or a name longer than MAX_SNAP_NAME.
//
// Events, in stream order:
//   { kind: 'header', fromSnap, toSnap, size }  once, when the metadata is
//       complete (at the first data record or at 'e'), before any extent;
//   { kind: 'data', offset, data }              pieces of a 'w' record, in order,
//       each at most `pieceBytes` (the record's header was validated first);
//   { kind: 'zero', offset, length }            a 'z' record;
//   { kind: 'end' }                             'e', and nothing after it.
// Any violation throws NbdError('DIFF_FORMAT_INVALID') naming the byte
// offset in the stream: a wrong banner, an unknown tag, a metadata record
// after data or given twice, no 's' record, a name that is too long or not
// UTF-8, a value above 2^53-1, an extent past the size, bytes after 'e', or
// an input that ends before 'e' (mid-record or between records).
//
// Memory: one input chunk plus at most one piece; the input is consumed
// through its async iterator, so a slow consumer holds the producer back.
import type { Readable } from 'node:stream';
import { NbdError } from '../errors';
import { MAX_OFFSET, MAX_SNAP_NAME, RBD_DIFF_BANNER, TAG } from './rbd-diff-format';

export interface DiffHeader {
  fromSnap: string | null;
  toSnap: string | null;
  size: number;
}

export type DiffEvent =
  | ({ kind: 'header' } & DiffHeader)
  | { kind: 'data'; offset: number; data: Buffer }
  | { kind: 'zero'; offset: number; length: number }
  | { kind: 'end' };

export interface ParseOptions {
  /** Largest 'data' piece (default 1 MiB). */
  pieceBytes?: number;
}

export const DEFAULT_PIECE_BYTES = 1024 * 1024;

function invalid(at: number, what: string): NbdError {
  return new NbdError('DIFF_FORMAT_INVALID', `not a valid rbd diff v1 stream: ${what} (at byte ${at})`);
}

/** Pulls exact byte counts out of an async iterable of Buffers. */
class ByteReader {
  private readonly it: AsyncIterator<Buffer | string>;
  /** Unconsumed input: chunks[0] from `head` on, then the others whole. */
  private chunks: Buffer[] = [];
  private head = 0;
  private buffered = 0;
  private eof = false;
  /** Stream offset of the next unconsumed byte. */
  pos = 0;

  constructor(input: AsyncIterable<Buffer | string>) {
    this.it = input[Symbol.asyncIterator]();
  }

  private async fill(): Promise<boolean> {
    if (this.eof) return false;
    const r = await this.it.next();
    if (r.done) {
      this.eof = true;
      return false;
    }
    const chunk = typeof r.value === 'string' ? Buffer.from(r.value, 'latin1') : r.value;
    if (chunk.length) {
      this.chunks.push(chunk);
      this.buffered += chunk.length;
    }
    return true;
  }

  /** Exactly n bytes, or null if the input ends first. One copy at most. */
  async exact(n: number): Promise<Buffer | null> {
    while (this.buffered < n) if (!(await this.fill())) return null;
    const first = this.chunks[0];
    let out: Buffer;
    if (n === 0) out = Buffer.alloc(0);
    else if (first!.length - this.head >= n) {
      out = first!.subarray(this.head, this.head + n);
      this.head += n;
    } else {
      out = Buffer.allocUnsafe(n);
      let got = 0;
      while (got < n) {
        const c = this.chunks[0]!;
        const k = Math.min(n - got, c.length - this.head);
        c.copy(out, got, this.head, this.head + k);
        got += k;
        this.head += k;
        if (this.head === c.length) {
          this.chunks.shift();
          this.head = 0;
        }
      }
    }
    if (this.chunks.length && this.head === this.chunks[0]!.length) {
      this.chunks.shift();
      this.head = 0;
    }
    this.buffered -= n;
    this.pos += n;
    return out;
  }

  async atEnd(): Promise<boolean> {
    while (this.buffered === 0) if (!(await this.fill())) return true;
    return false;
  }

  /** Stops reading the input (its iterator's return(): destroys a Readable). */
  async close(): Promise<void> {
    await this.it.return?.();
  }
}

const utf8 = new TextDecoder('utf-8', { fatal: true });

export async function* parseRbdDiff(input: Readable | AsyncIterable<Buffer>, opts: ParseOptions = {}): AsyncGenerator<DiffEvent> {
  const pieceBytes = opts.pieceBytes ?? DEFAULT_PIECE_BYTES;
  if (!Number.isInteger(pieceBytes) || pieceBytes < 1) throw new RangeError(`pieceBytes must be a positive integer, got ${pieceBytes}`);
  const r = new ByteReader(input as AsyncIterable<Buffer>);
  try {
    const need = async (n: number, what: string): Promise<Buffer> => {
      const at = r.pos;
      const b = await r.exact(n);
      if (!b) throw invalid(at, `the stream ends inside ${what}`);
      return b;
    };
    const u64 = async (what: string): Promise<number> => {
      const at = r.pos;
      const v = (await need(8, what)).readBigUInt64LE(0);
      if (v > BigInt(MAX_OFFSET)) throw invalid(at, `${what} ${v} is larger than 2^53-1`);
      return Number(v);
    };

    const banner = await r.exact(RBD_DIFF_BANNER.length);
    if (!banner || !banner.equals(RBD_DIFF_BANNER)) {
      const v2 = banner?.toString('latin1') === 'rbd diff v2\n';
      throw invalid(0, v2 ? 'this is an rbd diff v2 stream; only v1 is supported (rbd export-diff writes v1 unless --export-format 2)' : 'no "rbd diff v1" banner');
    }

    let fromSnap: string | null = null;
    let toSnap: string | null = null;
    let size: number | null = null;
    const seen = new Set<number>();
    let inData = false;
    const startData = (at: number): DiffEvent => {
      if (size === null) throw invalid(at, 'no size record (\'s\') before the data records');
      inData = true;
      return { kind: 'header', fromSnap, toSnap, size };
    };
    for (;;) {
      const at = r.pos;
      const tagBuf = await r.exact(1);
      if (!tagBuf) throw invalid(at, 'the stream ends without an end record (\'e\'): truncated');
      const tag = tagBuf[0]!;
      switch (tag) {
        case TAG.FROM_SNAP:
        case TAG.TO_SNAP:
        case TAG.SIZE: {
          const name = String.fromCharCode(tag);
          if (inData) throw invalid(at, `metadata record '${name}' after data records`);
          if (seen.has(tag)) throw invalid(at, `a second '${name}' record`);
          seen.add(tag);
          if (tag === TAG.SIZE) {
            size = await u64('the size');
            break;
          }
          const lenAt = r.pos;
          const len = (await need(4, `the length of the '${name}' snapshot name`)).readUInt32LE(0);
          if (len > MAX_SNAP_NAME) throw invalid(lenAt, `a snapshot name of ${len} bytes (at most ${MAX_SNAP_NAME})`);
          const bytes = await need(len, `the '${name}' snapshot name`);
          let s: string;
          try {
            s = utf8.decode(bytes);
          } catch {
            throw invalid(lenAt + 4, `the '${name}' snapshot name is not UTF-8`);
          }
          if (tag === TAG.FROM_SNAP) fromSnap = s;
          else toSnap = s;
          break;
        }
        case TAG.WRITE:
        case TAG.ZERO: {
          if (!inData) yield startData(at);
          const offset = await u64('the offset');
          const length = await u64('the length');
          if (offset + length > size!) throw invalid(at, `an extent ${offset}+${length} past the image size ${size}`);
          if (tag === TAG.ZERO) {
            yield { kind: 'zero', offset, length };
            break;
          }
          let done = 0;
          while (done < length) {
            const pieceAt = r.pos;
            // A piece is yielded only whole (pieceBytes, or the record's rest).
            const want = Math.min(pieceBytes, length - done);
            const data = await r.exact(want);
            if (!data) throw invalid(pieceAt, `the stream ends inside the data of 'w' ${offset}+${length}`);
            yield { kind: 'data', offset: offset + done, data };
            done += want;
          }
          break;
        }
        case TAG.END: {
          if (!inData) yield startData(at);
          if (!(await r.atEnd())) throw invalid(r.pos, 'bytes after the end record');
          yield { kind: 'end' };
          return;
        }
        default:
          throw invalid(at, `unknown record tag 0x${tag.toString(16).padStart(2, '0')}`);
      }
    }
  } finally {
    await r.close();
  }
}
