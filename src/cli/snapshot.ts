// `node-nbd-server snapshot create|list|info|delete IMAGE ...`. Online, the
// server serving IMAGE does the work (through IMAGE.nbd/control.sock);
// offline, the command opens the volume itself under the volume lock.
import { Command } from 'commander';
import { NbdError } from '../errors';
import { parseAutoRollback } from '../policies';
import type { SnapshotInfo } from '../snapshots';
import { formatSize } from '../size';
import { onVolume as run, output } from './volume-command';

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
    s.autoRollback,
    s.export,
  ]);
  const head = ['NAME', 'ID', 'CREATED', 'STATE', 'PRESERVED', 'AUTO-ROLLBACK', 'EXPORT'];
  const w = head.map((h, i) => Math.max(h.length, ...rows.map((r) => r[i]!.length)));
  for (const r of [head, ...rows]) process.stdout.write(r.map((c, i) => c.padEnd(w[i]!)).join('  ').trimEnd() + '\n');
  for (const s of list) {
    if (s.merge) process.stdout.write(`rollback to ${s.name}: merging, ${s.merge.percent}% (${s.merge.done}/${s.merge.total} chunks)\n`);
    if (s.basisOf.length) process.stdout.write(`${s.basisOf.join(', ')} was last rolled back to ${s.name}\n`);
  }
}

const AUTO_ROLLBACK_KEY = 'auto-rollback';

export function registerSnapshot(program: Command): void {
  const snap = program.command('snapshot').description('Copy-on-write snapshots of an image (online or offline).');
  snap
    .command('create')
    .description('Create a snapshot: O(1), holds every write acknowledged before it returns.')
    .argument('<image>', 'image file')
    .argument('<name>', 'snapshot name (letters, digits, . _ -)')
    .option('--auto-rollback <policy>', 'roll the volume back to this snapshot automatically: on-disconnect, on-start or off')
    .action(async (image: string, name: string, o: { autoRollback?: string }) => {
      const policy = o.autoRollback !== undefined ? parseAutoRollback(o.autoRollback) : undefined;
      const r = (await run(image, { op: 'snapshot-create', name, autoRollback: policy }, (v) =>
        v.snapshots.create(name, { autoRollback: policy }),
      )) as SnapshotInfo;
      process.stdout.write(`created snapshot ${r.name} (export ${r.export})${r.autoRollback !== 'off' ? `, auto-rollback=${r.autoRollback}` : ''}\n`);
    });
  snap
    .command('set')
    .description('Set a snapshot parameter: auto-rollback=on-disconnect|on-start|off.')
    .argument('<image>', 'image file')
    .argument('<name>', 'snapshot name')
    .argument('<setting>', 'KEY=VALUE; keys: auto-rollback')
    .action(async (image: string, name: string, setting: string) => {
      const i = setting.indexOf('=');
      const key = i < 0 ? setting : setting.slice(0, i);
      if (key !== AUTO_ROLLBACK_KEY || i < 0) {
        throw new NbdError('BAD_ARGUMENT', `unknown setting "${setting}": use ${AUTO_ROLLBACK_KEY}=on-disconnect|on-start|off`);
      }
      const policy = parseAutoRollback(setting.slice(i + 1));
      await run(image, { op: 'snapshot-set', name, autoRollback: policy }, (v) => v.policies.set(name, policy));
      process.stdout.write(`${name}: ${AUTO_ROLLBACK_KEY}=${policy}\n`);
    });
  snap
    .command('get')
    .description('Print a snapshot parameter (auto-rollback).')
    .argument('<image>', 'image file')
    .argument('<name>', 'snapshot name')
    .argument('<key>', 'auto-rollback')
    .action(async (image: string, name: string, key: string) => {
      if (key !== AUTO_ROLLBACK_KEY) throw new NbdError('BAD_ARGUMENT', `unknown key "${key}": use ${AUTO_ROLLBACK_KEY}`);
      const r = (await run(image, { op: 'snapshot-get', name }, (v) => ({ autoRollback: v.policies.get(name) }))) as {
        autoRollback: string;
      };
      process.stdout.write(`${r.autoRollback}\n`);
    });
  snap
    .command('list')
    .description('List snapshots, oldest first.')
    .argument('<image>', 'image file')
    .option('--json', 'machine-readable output')
    .action(async (image: string, o: { json?: boolean }) => {
      const list = (await run(image, { op: 'snapshot-list' }, (v) => v.snapshots.list())) as SnapshotInfo[];
      output(o, list, printTable);
    });
  snap
    .command('info')
    .description('Show one snapshot.')
    .argument('<image>', 'image file')
    .argument('<name>', 'snapshot name')
    .option('--json', 'machine-readable output')
    .action(async (image: string, name: string, o: { json?: boolean }) => {
      const s = (await run(image, { op: 'snapshot-info', name }, (v) => v.snapshots.info(name))) as SnapshotInfo;
      output(o, s, (x) => printTable([x]));
    });
  snap
    .command('delete')
    .description('Delete a snapshot; older snapshots keep their exact content.')
    .argument('<image>', 'image file')
    .argument('<name>', 'snapshot name')
    .action(async (image: string, name: string) => {
      await run(image, { op: 'snapshot-delete', name }, (v) => v.snapshots.delete(name));
      process.stdout.write(`deleted snapshot ${name}\n`);
    });
}
