// The root pino logger. Components take `logger.child({ component })`; the data
// path never logs per request. JSON on stderr; pretty when stderr is a TTY.
import pino, { type Logger, type LevelWithSilent } from 'pino';

export type { Logger };

export const LOG_LEVELS: readonly LevelWithSilent[] = ['trace', 'debug', 'info', 'warn', 'error', 'fatal', 'silent'];

export function createLogger(level: LevelWithSilent = 'info', pretty = process.stderr.isTTY === true): Logger {
  if (pretty) {
    // eslint-disable-next-line @typescript-eslint/no-require-imports
    const pinoPretty = require('pino-pretty') as (o: object) => NodeJS.WritableStream;
    return pino({ level, base: { pid: process.pid } }, pinoPretty({ destination: 2, sync: true, colorize: true }));
  }
  return pino({ level, base: { pid: process.pid } }, pino.destination({ fd: 2, sync: true }));
}

/** A logger that drops everything: the default for embedders who pass none. */
export function silentLogger(): Logger {
  return pino({ level: 'silent' });
}
