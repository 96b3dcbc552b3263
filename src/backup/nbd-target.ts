// Restore into any NBD export (nbd:// or nbd+unix://): data with
// NBD_CMD_WRITE, zero runs with NBD_CMD_WRITE_ZEROES (or zero-filled writes
// where the export lacks it), NBD_CMD_FLUSH at commit. The export must be
// writable and at least as large as the backup; bytes past the backup's
// size are left alone. Unlike FileTarget, a refused restore cannot be rolled
// back: the restore verifies every chunk before writing it, so what was
// written is right, but the export holds a partial restore.
import { NbdError } from '../errors';
import { NbdClient, TFLAG } from './nbd-client';
import type { RestoreTarget } from './target';

export class NbdTarget implements RestoreTarget {
  private readonly uri: string;
  private client: NbdClient | undefined;

  constructor(uri: string) {
    this.uri = uri;
  }

  async open(size: number): Promise<void> {
    const c = await NbdClient.connect(this.uri);
    if (c.flags & TFLAG.READ_ONLY) {
      await c.close();
      throw new NbdError('BAD_ARGUMENT', `${this.uri} is read-only`);
    }
    if (c.size < size) {
      await c.close();
      throw new NbdError('BAD_SIZE', `${this.uri} has ${c.size} bytes; the backup needs ${size}`);
    }
    this.client = c;
  }

  write(offset: number, data: Buffer): Promise<void> {
    return this.client!.write(offset, data);
  }

  zero(offset: number, length: number): Promise<void> {
    return this.client!.zero(offset, length);
  }

  async commit(): Promise<void> {
    await this.client!.flush();
    await this.client!.close();
    this.client = undefined;
  }

  async abort(): Promise<void> {
    await this.client?.close().catch(() => undefined);
    this.client = undefined;
  }
}
