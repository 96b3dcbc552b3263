// `node-nbd-server journal list|discard`: the first-write journals
// (src/journals.ts).
import { Command } from 'commander';
import { discardJournal, orphanJournals } from '../journals';
import { journalDir } from '../volume-meta';
import { output } from './volume-command';

export function registerJournal(program: Command): void {
  const cmd = program.command('journal').description('First-write journals: list the ones no volume names, discard a volume\'s pending one.');
  cmd
    .command('list')
    .description(`List journal files in the journal directory (NBD_JOURNAL_DIR, default ${journalDir()}) that no volume names: nothing will ever replay them.`)
    .option('--json', 'machine-readable output')
    .action((o: { json?: boolean }) => {
      output(o, { dir: journalDir(), orphans: orphanJournals() }, (r) => {
        if (r.orphans.length === 0) process.stdout.write(`no orphan journals in ${r.dir}\n`);
        for (const j of r.orphans) process.stdout.write(`${j.path}\t${j.size} bytes\t${j.why}\n`);
      });
    });
  cmd
    .command('discard')
    .description(
      'Forget and delete the volume\'s pending first-write journal (the volume must not be open). ' +
        'Writes it holds that were acknowledged but not yet applied to the image are LOST: only for a journal that is gone or damaged for good.',
    )
    .argument('<image>', 'image file')
    .option('--json', 'machine-readable output')
    .action((image: string, o: { json?: boolean }) => {
      output(o, discardJournal(image), (r) => {
        process.stdout.write(r.discarded ? `discarded ${r.discarded}\n` : `${image} has no pending journal\n`);
      });
    });
}
