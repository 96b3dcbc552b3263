// Where a restore writes. The restore (restore.ts) calls open() once, then
// write() for data and zero() for runs that must read as zeros, in any order
// and concurrently, then commit() on success or abort() on any failure; it
// never writes data it has not verified.
//
// FileTarget writes a raw file: into NAME.partial-XXXX created sparse at the
// full size, so zero() is free (a hole), then fsync + rename + directory
// fsync in commit(). A failed or refused restore leaves no file at NAME.
// NbdTarget (nbd-target.ts) implements zero() as NBD_CMD_WRITE_ZEROES,
// write() as NBD_CMD_WRITE and commit() as NBD_CMD_FLUSH.
import * as fs from 'node:fs';
import * as fsp from 'node:fs/promises';
import * as path from 'node:path';
import { randomBytes } from 'node:crypto';
import { NbdError } from '../errors';

export interface RestoreTarget {
  open(size: number): Promise<void>;
  write(offset: number, data: Buffer): Promise<void>;
  zero(offset: number, length: number): Promise<void>;
  commit(): Promise<void>;
  abort(): Promise<void>;
}

export class FileTarget implements RestoreTarget {
  private readonly file: string;
  private readonly tmp: string;
  private fh: fsp.FileHandle | undefined;

  constructor(file: string) {
    this.file = path.resolve(file);
    this.tmp = `${this.file}.partial-${randomBytes(4).toString('hex')}`;
  }

  async open(size: number): Promise<void> {
    try {
      this.fh = await fsp.open(this.tmp, 'wx', 0o644);
      await this.fh.truncate(size);
    } catch (err) {
      throw new NbdError('IMAGE_CREATE_FAILED', `cannot create ${this.tmp}: ${(err as NodeJS.ErrnoException).code ?? err}`, { cause: err });
    }
  }

  async write(offset: number, data: Buffer): Promise<void> {
    let done = 0;
    while (done < data.length) {
      const { bytesWritten } = await this.fh!.write(data, done, data.length - done, offset + done);
      done += bytesWritten;
    }
  }

  /** The file was created sparse: a range never written is a hole and reads as zeros. */
  async zero(_offset: number, _length: number): Promise<void> {}

  async commit(): Promise<void> {
    await this.fh!.sync();
    await this.fh!.close();
    this.fh = undefined;
    await fsp.rename(this.tmp, this.file);
    const d = await fsp.open(path.dirname(this.file), fs.constants.O_RDONLY | fs.constants.O_DIRECTORY);
    try {
      await d.sync();
    } finally {
      await d.close();
    }
  }

  async abort(): Promise<void> {
    await this.fh?.close().catch(() => undefined);
    this.fh = undefined;
    await fsp.rm(this.tmp, { force: true });
  }
}
