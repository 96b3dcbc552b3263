// The node-nbd-server command line. Each command lives in its own module;
// this file wires them into commander and maps errors to exit codes.
import { Command, CommanderError } from 'commander';
import { EXIT_CODES, NbdError } from '../errors';
import { packageVersion } from '../package-root';
import { registerAttach } from './attach';
import { registerDiff } from './diff';
import { registerBackup } from './backup';
import { registerJobs } from './jobs';
import { registerJournal } from './journal';
import { registerServe } from './serve';
import { registerRollback } from './rollback';
import { registerSnapshot } from './snapshot';

export function buildProgram(): Command {
  const program = new Command();
  program
    .name('node-nbd-server')
    .description('A Linux NBD server for raw block files, with snapshots, clones, backup and replication.')
    .version(packageVersion())
    .showHelpAfterError('(run with --help for usage)')
    .configureOutput({ outputError: (str, write) => write(str) })
    .exitOverride();
  registerServe(program);
  registerAttach(program);
  registerSnapshot(program);
  registerRollback(program);
  registerJournal(program);
  registerDiff(program);
  registerJobs(program);
  registerBackup(program);
  return program;
}

export function reportError(err: unknown): number {
  if (err instanceof CommanderError) return err.exitCode === 0 ? 0 : 2;
  if (err instanceof NbdError) {
    process.stderr.write(`node-nbd-server: error: ${err.message} [${err.code}]\n`);
    return EXIT_CODES[err.code] ?? 1;
  }
  const code = (err as { code?: unknown })?.code;
  process.stderr.write(`node-nbd-server: error: ${(err as Error)?.message ?? String(err)}${code ? ` [${String(code)}]` : ''}\n`);
  return 1;
}

export async function main(argv: string[]): Promise<void> {
  try {
    await buildProgram().parseAsync(argv);
  } catch (err) {
    process.exitCode = reportError(err);
  }
}

if (require.main === module) void main(process.argv);
