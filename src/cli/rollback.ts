// `node-nbd-server rollback IMAGE SNAPSHOT [--wait]`, `history IMAGE` and
// `info IMAGE` (`jobs` is src/cli/jobs.ts). Online, the serving server rolls back and
// merges in the background (the command returns once the snapshot is
// visible); offline there is no server to merge later, so the command merges
// to the end itself (a kill leaves the job recorded: the next serve or
// `jobs IMAGE --wait` resumes it).
import { Command } from 'commander';
import { readHistory, type HistoryEntry } from '../history';
import { ORPHAN_HINT } from '../journals';
import { commandTrigger, type RollbackResult } from '../rollback';
import type { Volume } from '../volume';
import { jobBar, printJobs, waitJobs } from './jobs';
import { onVolume, output } from './volume-command';

function printHistory(list: HistoryEntry[]): void {
  if (list.length === 0) {
    process.stdout.write('no history\n');
    return;
  }
  for (const e of list) {
    if (e.event === 'rollback') {
      process.stdout.write(
        `${e.at}  rollback to ${e.snapshot} (id ${e.snapshotId}), ${e.trigger} by ${e.by}, ${e.chunks ?? 0} chunks to merge` +
          (e.replaced ? `, replacing the rollback to ${e.replaced}` : '') +
          '\n',
      );
    } else {
      process.stdout.write(`${e.at}  merge to ${e.snapshot} finished: ${e.chunks ?? 0} chunks in ${((e.ms ?? 0) / 1000).toFixed(1)} s\n`);
    }
  }
}

export function registerRollback(program: Command): void {
  program
    .command('rollback')
    .description('Roll the volume back to a snapshot, online: visible at once, merged in the background; every snapshot is kept.')
    .argument('<image>', 'image file')
    .argument('<snapshot>', 'snapshot name')
    .option('--wait', 'show a progress bar and return when the merge has finished')
    .option('--json', 'machine-readable output')
    .action(async (image: string, snapshot: string, o: { wait?: boolean; json?: boolean }) => {
      const who = commandTrigger();
      let offline = false;
      const r = (await onVolume(image, { op: 'rollback', name: snapshot, by: who.by }, async (v) => {
        offline = true;
        const res = await v.rollback.to(snapshot, who);
        const bar = o.wait ? jobBar() : undefined;
        try {
          await v.jobs.wait((j) => bar?.update(j));
        } finally {
          bar?.stop();
        }
        return res;
      })) as RollbackResult;
      if (!offline && o.wait) await waitJobs(image, true);
      if (o.json) process.stdout.write(JSON.stringify(r, null, 2) + '\n');
      else {
        process.stdout.write(
          `rolled back ${image} to snapshot ${r.snapshot} (visible after ${r.visibleMs.toFixed(1)} ms); ` +
            (offline || o.wait ? `merged ${r.total} chunks\n` : `merging ${r.total} chunks in the background (node-nbd-server jobs ${image})\n`),
        );
      }
    });
  program
    .command('history')
    .description("Show the volume's history: every rollback (when, to which snapshot, by whom or which policy) and finished merge.")
    .argument('<image>', 'image file')
    .option('--json', 'machine-readable output')
    .action(async (image: string, o: { json?: boolean }) => {
      // Validates the image and its metadata like every volume command, then reads the append-only file.
      await onVolume(image, { op: 'ping' }, () => undefined);
      const list = readHistory(image);
      output(o, list, printHistory);
    });
  program
    .command('info')
    .description('Show a volume: size, chunk size, the snapshot it is based on, its auto-rollback policy, running jobs.')
    .argument('<image>', 'image file')
    .option('--json', 'machine-readable output')
    .action(async (image: string, o: { json?: boolean }) => {
      const i = (await onVolume(image, { op: 'info' }, (v) => v.info())) as ReturnType<Volume['info']>;
      output(o, i, (i) => {
        process.stdout.write(
          `volume ${i.volume} (export ${i.export}): ${i.size} bytes, chunk size ${i.chunkSize}, ${i.snapshots} snapshot(s)\n` +
            `based on: ${i.basedOn ? `snapshot ${i.basedOn.snapshot} (since ${i.basedOn.since})` : '-'}\n` +
            `auto-rollback: ${i.autoRollback ? `${i.autoRollback.policy} to snapshot ${i.autoRollback.snapshot}` : 'off'}\n`,
        );
        printJobs(i.jobs);
        for (const j of i.orphanJournals) process.stdout.write(`orphan journal: ${j.path} (${j.size} bytes): ${j.why}; ${ORPHAN_HINT}\n`);
      });
    });
}


