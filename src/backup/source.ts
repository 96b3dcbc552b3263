// The seam between the backup pipeline and whatever holds the volume.
//
// A ChunkSource describes one backup's input: the volume's size and chunk
// size, which chunks may differ from the BASE, and a positional read. The
// base is the parent backup's content (extended with zeros if the volume
// grew), or an all-zero volume for a full backup; chunks not listed by
// changedRuns() are taken to equal the base and are never read.
//
// Implementations:
// - FileChunkSource (here): a raw file; all chunks, or a given list of runs.
//   Tests use it, and so do peers that back up a copy of an image.
// - NbdChunkSource (nbd-source.ts): any NBD export (e.g. disk@SNAP), all
//   chunks or given runs, read with NBD_CMD_READ.
// - openVolumeSource (volume-source.ts): this server's own volumes. The
//   addon unions the copy-on-write bitmaps between the parent's snapshot and
//   this one (src/change-map.ts), and disk@SNAP is read over NBD. Not yet:
//   marking trimmed/zeroed runs `zero` (no read). Other NBD servers' exports
//   can feed NbdChunkSource's runs from their qemu:dirty-bitmap meta context
//   (this server offers it too).
import * as fsp from 'node:fs/promises';
import * as path from 'node:path';
import { NbdError } from '../errors';

/** `count` chunks from chunk `start`. `zero`: the source knows they read as zeros (no read needed). */
export interface ChunkRun {
  start: number;
  count: number;
  zero?: boolean;
}

export interface ChunkSource {
  /** Volume size in bytes (the last chunk may be short). */
  readonly size: number;
  /** Chunk size in bytes: the volume's own (its copy-on-write granularity). */
  readonly chunkSize: number;
  /** The volume's name (backups group by it for prune and listing). */
  readonly volume: string;
  /** The snapshot being backed up, when there is one. */
  readonly snapshot: string | null;
  /** Runs of chunks that may differ from the base, ascending and disjoint. */
  changedRuns(): AsyncIterable<ChunkRun>;
  /** Fills `buf` with the bytes at `offset` (offset + buf.length <= size). Safe to call concurrently. */
  read(offset: number, buf: Buffer): Promise<void>;
  close(): Promise<void>;
}

/**
 * A ChunkSource that forwards everything to another one: the base of sources
 * that add to one (a close hook, a test hook on reads) and override only that.
 */
export class ForwardingChunkSource implements ChunkSource {
  constructor(protected readonly inner: ChunkSource) {}
  get size(): number {
    return this.inner.size;
  }
  get chunkSize(): number {
    return this.inner.chunkSize;
  }
  get volume(): string {
    return this.inner.volume;
  }
  get snapshot(): string | null {
    return this.inner.snapshot;
  }
  changedRuns(): AsyncIterable<ChunkRun> {
    return this.inner.changedRuns();
  }
  read(offset: number, buf: Buffer): Promise<void> {
    return this.inner.read(offset, buf);
  }
  close(): Promise<void> {
    return this.inner.close();
  }
}

export interface FileSourceOptions {
  chunkSize: number;
  /** Runs to back up; default: every chunk. */
  runs?: ChunkRun[];
  volume?: string;
  snapshot?: string | null;
}

/** Coalesces a sorted list of chunk indexes into runs. */
export function runsOf(chunks: Iterable<number>): ChunkRun[] {
  const out: ChunkRun[] = [];
  for (const c of chunks) {
    const last = out.at(-1);
    if (last && last.start + last.count === c) last.count++;
    else if (last && c < last.start + last.count) throw new RangeError('chunk indexes must be ascending and distinct');
    else out.push({ start: c, count: 1 });
  }
  return out;
}

export class FileChunkSource implements ChunkSource {
  readonly size: number;
  readonly chunkSize: number;
  readonly volume: string;
  readonly snapshot: string | null;
  private readonly fh: fsp.FileHandle;
  private readonly runs: ChunkRun[] | undefined;

  private constructor(fh: fsp.FileHandle, size: number, file: string, opts: FileSourceOptions) {
    this.fh = fh;
    this.size = size;
    this.chunkSize = opts.chunkSize;
    this.volume = opts.volume ?? path.basename(file);
    this.snapshot = opts.snapshot ?? null;
    this.runs = opts.runs;
  }

  static async open(file: string, opts: FileSourceOptions): Promise<FileChunkSource> {
    if (!Number.isInteger(opts.chunkSize) || opts.chunkSize < 4096 || opts.chunkSize > 64 * 1024 * 1024) {
      throw new RangeError(`chunk size must be an integer from 4096 to 64 MiB, got ${opts.chunkSize}`);
    }
    let fh: fsp.FileHandle;
    try {
      fh = await fsp.open(file, 'r');
    } catch (err) {
      throw new NbdError('IMAGE_NOT_FOUND', `cannot open ${file}: ${(err as NodeJS.ErrnoException).code ?? err}`, { cause: err });
    }
    const st = await fh.stat();
    return new FileChunkSource(fh, st.size, file, opts);
  }

  changedRuns(): AsyncIterable<ChunkRun> {
    return givenRuns(this.size, this.chunkSize, this.runs);
  }

  async read(offset: number, buf: Buffer): Promise<void> {
    let done = 0;
    while (done < buf.length) {
      const { bytesRead } = await this.fh.read(buf, done, buf.length - done, offset + done);
      if (bytesRead === 0) throw new NbdError('BACKUP_SOURCE_FAILED', `short read at ${offset + done}: the file shrank`);
      done += bytesRead;
    }
  }

  async close(): Promise<void> {
    await this.fh.close();
  }
}

/**
 * The runs a source was given (validated against the volume), or, with none
 * given, one run of every chunk: a full backup.
 */
export async function* givenRuns(size: number, chunkSize: number, runs: readonly ChunkRun[] | undefined): AsyncIterable<ChunkRun> {
  const count = Math.ceil(size / chunkSize);
  if (runs === undefined) {
    if (count > 0) yield { start: 0, count };
    return;
  }
  for (const r of runs) {
    if (r.start < 0 || r.count < 1 || r.start + r.count > count) throw new RangeError(`run ${r.start}+${r.count} is outside the volume (${count} chunks)`);
    yield r;
  }
}
