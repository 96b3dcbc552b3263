// Small concurrency limits used by the pipeline, restore, verify and prune,
// and the one way they honour an AbortSignal. The limits bound work in flight
// (reads on libuv's pool, uploads on sockets) and the buffers it holds.
import { NbdError } from '../errors';

/** Throws BACKUP_ABORTED once `signal` has fired. */
export function checkAbort(signal: AbortSignal | undefined, what: string): void {
  if (signal?.aborted) throw new NbdError('BACKUP_ABORTED', `${what} was cancelled`, { cause: signal.reason });
}

/** A counting semaphore; waiters are served in FIFO order. */
export class Semaphore {
  private free: number;
  private readonly waiters: (() => void)[] = [];

  constructor(n: number) {
    if (!(n >= 1)) throw new RangeError(`semaphore size must be >= 1, got ${n}`);
    this.free = n;
  }

  async acquire(): Promise<void> {
    if (this.free > 0) {
      this.free--;
      return;
    }
    await new Promise<void>((resolve) => this.waiters.push(resolve));
  }

  release(): void {
    const w = this.waiters.shift();
    if (w) w();
    else this.free++;
  }
}

/** Runs fn over items with at most `limit` in flight; rejects with the first error after the started ones settle. */
export async function forEachLimit<T>(items: Iterable<T>, limit: number, fn: (item: T) => Promise<void>): Promise<void> {
  const it = items[Symbol.iterator]();
  let failed: { err: unknown } | undefined;
  const worker = async (): Promise<void> => {
    for (;;) {
      if (failed) return;
      const n = it.next();
      if (n.done) return;
      try {
        await fn(n.value);
      } catch (err) {
        failed ??= { err };
      }
    }
  };
  await Promise.all(Array.from({ length: Math.max(1, limit) }, worker));
  if (failed) throw failed.err;
}
