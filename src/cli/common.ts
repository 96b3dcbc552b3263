// Options and run-until-signal logic shared by the commands that serve
// (`serve`, `attach`).
import { Command, Option } from 'commander';
import { NbdError } from '../errors';
import { createLogger, LOG_LEVELS, type Logger } from '../logger';
import { serve, type ServeOptions, type Serving } from '../serve';
import type { NbdServer } from '../server';
import { parseSize } from '../size';

export function collect(value: string, previous: string[]): string[] {
  return [...previous, value];
}

export function positiveInt(name: string, max = Number.MAX_SAFE_INTEGER) {
  return (value: string): number => {
    const n = Number(value);
    if (!/^\d+$/.test(value) || n < 1 || n > max) {
      throw new NbdError('BAD_ARGUMENT', `${name} must be an integer from 1 to ${max}, got "${value}"`);
    }
    return n;
  };
}

export function nonNegativeInt(name: string, max: number) {
  return (value: string): number => {
    const n = Number(value);
    if (!/^\d+$/.test(value) || n > max) throw new NbdError('BAD_ARGUMENT', `${name} must be an integer from 0 to ${max}, got "${value}"`);
    return n;
  };
}

/** The options every serving command takes. */
export function addServeOptions(cmd: Command, listenHelp: string): Command {
  return cmd
    .option('-s, --size <size>', 'size for images that do not exist yet: 512M, 1G, 1T')
    .option('-l, --listen <host:port>', listenHelp, collect, [])
    .option('-u, --socket <path>', 'listen on a unix socket')
    .option('-r, --read-only', 'serve read-only')
    .addOption(new Option('--log-level <level>', 'log level').choices(LOG_LEVELS as string[]).default('info'))
    .option('--threads <n>', 'worker threads per connection', positiveInt('--threads', 256), 32)
    .option('--max-connections <n>', 'refuse connections beyond this many', positiveInt('--max-connections'), 4096)
    .option('--chunk-size <size>', 'copy-on-write chunk size for images without snapshots yet: 4K..1M, a power of two (default 16K)')
    .option('--merge-rate <size>', 'limit background rollback merges to this many bytes per second per volume (e.g. 50M; default unlimited)')
    .option(
      '--cow-journal <size>',
      'journal for first writes after a snapshot: they are acknowledged at once and their chunks preserved in the background; ' +
        '0 or off preserves inline (default: volume size / 16, 4M..64M)',
    )
    .option(
      '--journal-memory <size>',
      'server-wide bound on first-write journal memory (memory-backed): volumes beyond it preserve first writes inline (default 1G)',
    );
}

export function parseCowJournal(text: string): number {
  if (/^\s*(0+|off)\s*$/i.test(text)) return 0;
  const n = parseSize(text);
  if (n !== 0 && (n < 4 * 1024 * 1024 || n > 4 * 1024 * 1024 * 1024)) {
    throw new NbdError('BAD_ARGUMENT', `--cow-journal must be 0 (off) or from 4M to 4G, got "${text}"`);
  }
  return n;
}

export function parseJournalMemory(text: string): number {
  const n = parseSize(text);
  if (n < 0 || n > 2 ** 44) throw new NbdError('BAD_ARGUMENT', `--journal-memory must be from 0 to 16T, got "${text}"`);
  return n;
}

export function parseChunkSize(text: string): number {
  const n = parseSize(text);
  if (n < 4096 || n > 1 << 20 || (n & (n - 1)) !== 0) {
    throw new NbdError('BAD_ARGUMENT', `--chunk-size must be a power of two from 4K to 1M, got "${text}"`);
  }
  return n;
}

export interface CommonServeOptions {
  size?: number;
  listen: string[];
  socket?: string;
  readOnly: boolean;
  logger: Logger;
  threadsPerConnection: number;
  maxConnections: number;
  chunkSize?: number;
  mergeRate?: number;
  cowJournal?: number;
  journalMemory?: number;
}

export function commonServeOptions(o: Record<string, unknown>): CommonServeOptions {
  return {
    size: o.size !== undefined ? parseSize(o.size as string) : undefined,
    listen: o.listen as string[],
    socket: o.socket as string | undefined,
    readOnly: Boolean(o.readOnly),
    logger: createLogger(o.logLevel as never),
    threadsPerConnection: o.threads as number,
    maxConnections: o.maxConnections as number,
    chunkSize: o.chunkSize !== undefined ? parseChunkSize(o.chunkSize as string) : undefined,
    mergeRate: o.mergeRate !== undefined ? parseSize(o.mergeRate as string) : undefined,
    cowJournal: o.cowJournal !== undefined ? parseCowJournal(o.cowJournal as string) : undefined,
    journalMemory: o.journalMemory !== undefined ? parseJournalMemory(o.journalMemory as string) : undefined,
  };
}

/**
 * SIGINT/SIGTERM while the server starts (opening many volumes takes a
 * while): the returned signal aborts, and serve() stops opening volumes,
 * closes those it opened (draining and removing their journals) and
 * rejects. A second signal exits at once. dispose() hands over to
 * runUntilSignal() (call both with no await in between).
 */
export function startupSignals(logger: Logger): { signal: AbortSignal; dispose(): void } {
  const ac = new AbortController();
  const handler = (sig: NodeJS.Signals) => {
    if (ac.signal.aborted) {
      logger.warn({ signal: sig }, 'second signal during start-up: exiting without waiting');
      process.exit(130);
    }
    logger.info({ signal: sig }, 'stop requested during start-up: closing the volumes opened so far');
    ac.abort(new NbdError('SERVER_CLOSED', `stopped by ${sig} during start-up`));
  };
  process.on('SIGINT', handler);
  process.on('SIGTERM', handler);
  return {
    signal: ac.signal,
    dispose() {
      process.off('SIGINT', handler);
      process.off('SIGTERM', handler);
    },
  };
}

/** serve() with start-up signals handled: null when a signal stopped it (already closed and logged). */
export async function serveOrStop(logger: Logger, opts: ServeOptions): Promise<Serving | null> {
  const startup = startupSignals(logger);
  try {
    return await serve({ ...opts, signal: startup.signal });
  } catch (err) {
    if (startup.signal.aborted && err === startup.signal.reason) {
      logger.info('stopped during start-up');
      return null;
    }
    throw err;
  } finally {
    startup.dispose();
  }
}

/**
 * Resolves after SIGINT/SIGTERM has been handled by `onSignal` (which should
 * wind the server down), or when `until` settles. A second signal exits at once.
 */
export function runUntilSignal(logger: Logger, onSignal: () => Promise<void>, until?: Promise<unknown>): Promise<void> {
  return new Promise<void>((resolve) => {
    let signals = 0;
    const handler = (sig: NodeJS.Signals) => {
      signals++;
      if (signals > 1) {
        logger.warn({ signal: sig }, 'second signal: exiting without waiting');
        process.exit(130);
      }
      logger.info({ signal: sig }, 'shutting down');
      onSignal().then(resolve, (err: unknown) => {
        logger.error({ err }, 'shutdown failed');
        process.exitCode = 1;
        resolve();
      });
    };
    process.on('SIGINT', handler);
    process.on('SIGTERM', handler);
    until?.then(
      () => resolve(),
      () => resolve(),
    );
  });
}

/** The readiness line scripts and tests wait for (stdout, one JSON object). */
export function printReady(server: NbdServer, extra: Record<string, unknown>): void {
  process.stdout.write(JSON.stringify({ ready: true, ...extra, exports: server.exports().map((e) => e.name) }) + '\n');
}
