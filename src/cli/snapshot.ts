// `node-nbd-server snapshot create|list|info|delete IMAGE ...`. Online, the
// server serving IMAGE does the work (through IMAGE.nbd/control.sock);
// offline, the command opens the volume itself under the volume lock.
import * as fs from 'node:fs';
import { Command } from 'commander';
import { callControl, type ControlRequest } from '../control';
import { NbdError } from '../errors';
import { createLogger } from '../logger';
import { NbdServer } from '../server';
import type { SnapshotInfo, VolumeSnapshots } from '../snapshots';
import { formatSize } from '../size';

async function run(image: string, req: ControlRequest, offline: (v: VolumeSnapshots) => Promise<unknown> | unknown): Promise<unknown> {
  const online = await callControl(image, req);
  if (online) return online.result;
  if (!fs.existsSync(image)) throw new NbdError('IMAGE_NOT_FOUND', `image ${image} does not exist`);
  const server = new NbdServer({ logger: createLogger('warn') });
  try {
    const exp = server.addImage({ path: image, snapshots: true });
    return await offline(server.snapshots(exp.name));
  } finally {
    await server.close();
  }
}

function printTable(list: SnapshotInfo[]): void {
  if (list.length === 0) {
    process.stdout.write('no snapshots\n');
    return;
  }
  const rows = list.map((s) => [
    s.name,
    String(s.id),
    s.createdAt,
    s.state + (s.failure ? ` (${s.failure.reason})` : ''),
    s.preservedBytes !== undefined ? formatSize(s.preservedBytes) : '-',
    s.export,
  ]);
  const head = ['NAME', 'ID', 'CREATED', 'STATE', 'PRESERVED', 'EXPORT'];
  const w = head.map((h, i) => Math.max(h.length, ...rows.map((r) => r[i]!.length)));
  for (const r of [head, ...rows]) process.stdout.write(r.map((c, i) => c.padEnd(w[i]!)).join('  ').trimEnd() + '\n');
}

export function registerSnapshot(program: Command): void {
  const snap = program.command('snapshot').description('Copy-on-write snapshots of an image (online or offline).');
  snap
    .command('create')
    .description('Create a snapshot: O(1), holds every write acknowledged before it returns.')
    .argument('<image>', 'image file')
    .argument('<name>', 'snapshot name (letters, digits, . _ -)')
    .action(async (image: string, name: string) => {
      const r = (await run(image, { op: 'snapshot-create', name }, (v) => v.create(name))) as SnapshotInfo;
      process.stdout.write(`created snapshot ${r.name} (export ${r.export})\n`);
    });
  snap
    .command('list')
    .description('List snapshots, oldest first.')
    .argument('<image>', 'image file')
    .option('--json', 'machine-readable output')
    .action(async (image: string, o: { json?: boolean }) => {
      const list = (await run(image, { op: 'snapshot-list' }, (v) => v.list())) as SnapshotInfo[];
      if (o.json) process.stdout.write(JSON.stringify(list, null, 2) + '\n');
      else printTable(list);
    });
  snap
    .command('info')
    .description('Show one snapshot.')
    .argument('<image>', 'image file')
    .argument('<name>', 'snapshot name')
    .option('--json', 'machine-readable output')
    .action(async (image: string, name: string, o: { json?: boolean }) => {
      const s = (await run(image, { op: 'snapshot-info', name }, (v) => v.info(name))) as SnapshotInfo;
      if (o.json) process.stdout.write(JSON.stringify(s, null, 2) + '\n');
      else printTable([s]);
    });
  snap
    .command('delete')
    .description('Delete a snapshot; older snapshots keep their exact content.')
    .argument('<image>', 'image file')
    .argument('<name>', 'snapshot name')
    .action(async (image: string, name: string) => {
      await run(image, { op: 'snapshot-delete', name }, (v) => v.delete(name));
      process.stdout.write(`deleted snapshot ${name}\n`);
    });
}
