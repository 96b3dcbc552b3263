// `node-nbd-server attach IMAGE /dev/nbdN` and `detach /dev/nbdN`: the kernel
// client without nbd-client, as `qemu-nbd -c` does. attach stays in the
// foreground serving the device until it is detached (by `detach`, by
// `nbd-client -d`, or by SIGINT/SIGTERM here), then exits 0.
import { Command } from 'commander';
import { fromNative } from '../errors';
import { native } from '../native';
import { addServeOptions, commonServeOptions, nonNegativeInt, positiveInt, printReady, runUntilSignal, serveOrStop } from './common';

export function registerAttach(program: Command): void {
  const cmd = program
    .command('attach')
    .description('Serve IMAGE through the kernel NBD device DEVICE (no nbd-client needed); stays in the foreground until detached.')
    .argument('<image>', 'raw image file (created sparse when missing and --size is given)')
    .argument('<device>', 'kernel NBD device, e.g. /dev/nbd0 (needs the nbd module and root)')
    .option('-C, --connections <n>', 'sockets handed to the kernel (multi-conn)', positiveInt('--connections', 64), 1)
    .option('-t, --timeout <seconds>', 'kernel request timeout; 0 waits forever', nonNegativeInt('--timeout', 86400), 30);
  addServeOptions(cmd, 'also serve over TCP HOST:PORT (repeatable); by default attach serves only the device')
    .addHelpText('after', '\nExample:\n  node-nbd-server attach disk.img /dev/nbd0 --size 1G && mkfs.ext4 /dev/nbd0\n')
    .action(async (image: string, device: string, o: Record<string, unknown>) => {
      const common = commonServeOptions(o);
      const started = await serveOrStop(common.logger, { images: [image], ...common, defaultListen: false });
      if (!started) return;
      const { server, ports } = started;
      let attachment;
      try {
        attachment = server.attachDevice(device, {
          connections: o.connections as number,
          timeoutSec: o.timeout as number,
        });
      } catch (err) {
        await server.close();
        throw err;
      }
      printReady(server, { ports, socket: common.socket ?? null, device });
      const onSignal = async () => {
        attachment.disconnect();
        await attachment.detached;
      };
      await runUntilSignal(common.logger, onSignal, attachment.detached);
      const result = await attachment.detached;
      await server.close();
      if (server.flushFailures.length) process.exitCode = 1; // logged by close(): data may be lost
      if (result.error) {
        common.logger.error({ device, error: result.error }, 'device ended with an error');
        process.exitCode = 1;
      }
    });

  program
    .command('detach')
    .description('Disconnect a kernel NBD device attached by `attach` (or by nbd-client).')
    .argument('<device>', 'kernel NBD device, e.g. /dev/nbd0')
    .action((device: string) => {
      try {
        native.detachDevice(device);
      } catch (err) {
        throw fromNative(err);
      }
    });
}
