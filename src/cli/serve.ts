// `node-nbd-server serve IMAGE...`: serve images until SIGINT/SIGTERM.
import { Command } from 'commander';
import { addServeOptions, commonServeOptions, printReady, runUntilSignal, serveOrStop } from './common';

export function registerServe(program: Command): void {
  const cmd = program
    .command('serve')
    .description(
      'Serve raw image files over NBD. Each image is an export named after its file (disk.img -> "disk"); ' +
        'the first image is also the default export "".',
    )
    .argument('<image...>', 'raw image files (created sparse when missing and --size is given)');
  addServeOptions(cmd, 'listen on TCP HOST:PORT (repeatable); default 127.0.0.1:10809 unless --socket is given')
    .addHelpText(
      'after',
      '\nExamples:\n' +
        '  node-nbd-server serve disk.img --size 1G\n' +
        '  node-nbd-server serve a.img b.img --socket /run/nbd.sock\n' +
        '  node-nbd-server serve disk.img --listen 0.0.0.0:10809 --read-only\n',
    )
    .action(async (images: string[], o: Record<string, unknown>) => {
      const common = commonServeOptions(o);
      const started = await serveOrStop(common.logger, { images, ...common });
      if (!started) return;
      const { server, ports } = started;
      printReady(server, { ports, socket: common.socket ?? null });
      await runUntilSignal(common.logger, () => server.close());
      if (server.flushFailures.length) process.exitCode = 1; // logged by close(): data may be lost
    });
}
