// Where `diff apply` writes: the DiffTarget seam and its two implementations.
//
// A target has a fixed size; apply (rbd-diff-apply.ts) checks the stream's
// 's' record against it before the first write, then calls write() and
// zero() (possibly several at once, never overlapping), then flush() on
// success; close() always, last.
//
//   FileDiffTarget  an existing raw file, written in place with pwrite. zero()
//                   writes zeros (Node has no fallocate(PUNCH_HOLE)); it does
//                   not keep snapshots of one of our volumes exact: the CLI
//                   never uses it on a volume (see src/cli/diff-apply.ts).
//   NbdDiffTarget   any writable NBD export: NBD_CMD_WRITE, NBD_CMD_WRITE_ZEROES
//                   (the server punches holes or writes zeros; zero-filled
//                   writes where the export lacks it), NBD_CMD_FLUSH. Writes to
//                   our own server go through its device chain, so snapshots
//                   stay exact.
import * as fsp from 'node:fs/promises';
import { NbdError } from '../errors';
import { NbdClient, TFLAG } from '../backup/nbd-client';

export interface DiffTarget {
  /** Size in bytes; a stream for another size is refused (DIFF_MISMATCH). */
  readonly size: number;
  write(offset: number, data: Buffer): Promise<void>;
  /** The range must read as zeros afterwards. */
  zero(offset: number, length: number): Promise<void>;
  /** Makes every completed write durable. */
  flush(): Promise<void>;
  close(): Promise<void>;
}

const ZEROS = Buffer.alloc(1024 * 1024);

export class FileDiffTarget implements DiffTarget {
  readonly size: number;
  private readonly fh: fsp.FileHandle;

  private constructor(fh: fsp.FileHandle, size: number) {
    this.fh = fh;
    this.size = size;
  }

  static async open(file: string): Promise<FileDiffTarget> {
    let fh: fsp.FileHandle;
    try {
      fh = await fsp.open(file, 'r+');
    } catch (err) {
      const code = (err as NodeJS.ErrnoException).code;
      throw new NbdError(code === 'ENOENT' ? 'IMAGE_NOT_FOUND' : 'IMAGE_OPEN_FAILED', `cannot open ${file}: ${code ?? err}`, { cause: err });
    }
    return new FileDiffTarget(fh, (await fh.stat()).size);
  }

  async write(offset: number, data: Buffer): Promise<void> {
    let done = 0;
    while (done < data.length) {
      const { bytesWritten } = await this.fh.write(data, done, data.length - done, offset + done);
      done += bytesWritten;
    }
  }

  async zero(offset: number, length: number): Promise<void> {
    for (let o = 0; o < length; o += ZEROS.length) await this.write(offset + o, ZEROS.subarray(0, Math.min(ZEROS.length, length - o)));
  }

  async flush(): Promise<void> {
    await this.fh.datasync();
  }

  async close(): Promise<void> {
    await this.fh.close();
  }
}

/** Largest WRITE_ZEROES range handed to the client at once (it splits further). */
const ZERO_STEP = 1024 * 1024 * 1024;

export class NbdDiffTarget implements DiffTarget {
  readonly size: number;
  private readonly client: NbdClient;

  private constructor(client: NbdClient) {
    this.client = client;
    this.size = client.size;
  }

  /** Connects to `uri` (nbd:// or nbd+unix://); a read-only export is refused. */
  static async connect(uri: string): Promise<NbdDiffTarget> {
    const c = await NbdClient.connect(uri);
    if (c.flags & TFLAG.READ_ONLY) {
      await c.close();
      throw new NbdError('BAD_ARGUMENT', `${uri} is read-only`);
    }
    return new NbdDiffTarget(c);
  }

  write(offset: number, data: Buffer): Promise<void> {
    return this.client.write(offset, data);
  }

  async zero(offset: number, length: number): Promise<void> {
    for (let o = 0; o < length; o += ZERO_STEP) await this.client.zero(offset + o, Math.min(ZERO_STEP, length - o));
  }

  flush(): Promise<void> {
    return this.client.flush();
  }

  close(): Promise<void> {
    return this.client.close();
  }
}
