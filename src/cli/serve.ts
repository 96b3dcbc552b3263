// `node-nbd-server serve IMAGE...`: serve images until SIGINT/SIGTERM.
import { Command, Option } from 'commander';
import { NbdError } from '../errors';
import { createLogger, LOG_LEVELS } from '../logger';
import { serve } from '../serve';
import { parseSize } from '../size';

function collect(value: string, previous: string[]): string[] {
  return [...previous, value];
}

function positiveInt(name: string) {
  return (value: string): number => {
    const n = Number(value);
    if (!/^\d+$/.test(value) || n < 1) throw new NbdError('BAD_ARGUMENT', `${name} must be a positive integer, got "${value}"`);
    return n;
  };
}

export function registerServe(program: Command): void {
  program
    .command('serve')
    .description(
      'Serve raw image files over NBD. Each image is an export named after its file (disk.img -> "disk"); ' +
        'the first image is also the default export "".',
    )
    .argument('<image...>', 'raw image files (created sparse when missing and --size is given)')
    .option('-s, --size <size>', 'size for images that do not exist yet: 512M, 1G, 1T')
    .option('-l, --listen <host:port>', 'listen on TCP (repeatable); default 127.0.0.1:10809 unless --socket is given', collect, [])
    .option('-u, --socket <path>', 'listen on a unix socket')
    .option('-r, --read-only', 'serve every image read-only')
    .addOption(new Option('--log-level <level>', 'log level').choices(LOG_LEVELS as string[]).default('info'))
    .option('--threads <n>', 'worker threads per connection', positiveInt('--threads'), 16)
    .option('--max-connections <n>', 'refuse connections beyond this many', positiveInt('--max-connections'), 4096)
    .addHelpText(
      'after',
      '\nExamples:\n' +
        '  node-nbd-server serve disk.img --size 1G\n' +
        '  node-nbd-server serve a.img b.img --socket /run/nbd.sock\n' +
        '  node-nbd-server serve disk.img --listen 0.0.0.0:10809 --read-only\n',
    )
    .action(async (images: string[], o: Record<string, unknown>) => {
      const logger = createLogger(o.logLevel as never);
      const size = o.size !== undefined ? parseSize(o.size as string) : undefined;
      const { server, ports } = serve({
        images,
        size,
        listen: o.listen as string[],
        socket: o.socket as string | undefined,
        readOnly: Boolean(o.readOnly),
        threadsPerConnection: o.threads as number,
        maxConnections: o.maxConnections as number,
        logger,
      });
      // Machine-readable readiness line for scripts and tests (stdout).
      process.stdout.write(
        JSON.stringify({ ready: true, ports, socket: o.socket ?? null, exports: server.exports().map((e) => e.name) }) + '\n',
      );
      await new Promise<void>((resolve) => {
        let signals = 0;
        const onSignal = (sig: NodeJS.Signals) => {
          signals++;
          if (signals > 1) {
            logger.warn({ signal: sig }, 'second signal: exiting without waiting');
            process.exit(130);
          }
          logger.info({ signal: sig }, 'shutting down');
          server.close().then(resolve, (err: unknown) => {
            logger.error({ err }, 'shutdown failed');
            process.exitCode = 1;
            resolve();
          });
        };
        process.on('SIGINT', onSignal);
        process.on('SIGTERM', onSignal);
      });
    });
}
