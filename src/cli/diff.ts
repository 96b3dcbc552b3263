// `node-nbd-server diff IMAGE --from A [--to B] [--format json]`: the chunks
// that changed between snapshot A and snapshot B (or the live volume), from
// the server's own change maps (src/change-map.ts), online through the
// serving server's control socket or offline with the volume opened here.
//
// Formats are a table (DIFF_FORMATS): each gets the change map and the image
// and writes to stdout. json prints {from, to, size, chunkSize, runs:
// [{offset, length}]} in bytes. rbd writes the Ceph `rbd diff` v1 stream
// (src/diff/, docs/diff-format.md): the changed bytes of snapshot B, read
// through openVolumeSource (src/backup/volume-source.ts); it needs --to, as
// the live volume changes while it is read. `diff apply` (src/cli/diff-apply.ts)
// is a subcommand of this one.
import type { Writable } from 'node:stream';
import { Command } from 'commander';
import { openVolumeSource } from '../backup/volume-source';
import { byteRuns, validateChangeRange, type ChangeMap } from '../change-map';
import { writeRbdDiff } from '../diff';
import { NbdError } from '../errors';
import { registerDiffApply } from './diff-apply';
import { onVolume } from './volume-command';

export interface DiffContext {
  image: string;
  map: ChangeMap;
  out: Writable;
}

export type DiffFormat = (ctx: DiffContext) => Promise<void>;

function writeOut(out: NodeJS.WritableStream, text: string): Promise<void> {
  return new Promise((resolve, reject) => out.write(text, (err) => (err ? reject(err) : resolve())));
}

export const DIFF_FORMATS: Record<string, DiffFormat> = {
  json: ({ map, out }) =>
    writeOut(out, JSON.stringify({ from: map.from, to: map.to, size: map.size, chunkSize: map.chunkSize, runs: byteRuns(map) }) + '\n'),
  rbd: async ({ image, map, out }) => {
    if (map.to === null) throw new NbdError('BAD_ARGUMENT', '--format rbd needs --to SNAPSHOT: the live volume changes while it is read');
    const src = await openVolumeSource(image, { snapshot: map.to, since: map.from });
    try {
      await writeRbdDiff(src, out, { fromSnap: map.from, toSnap: map.to });
    } finally {
      await src.close();
    }
  },
};

/** The change map of IMAGE from A to B (null: live), online or offline. */
export async function volumeChangeMap(image: string, from: string, to: string | null): Promise<ChangeMap> {
  validateChangeRange(from, to);
  return (await onVolume(image, { op: 'change-map', from, to }, (v) => v.changeMap(from, to))) as ChangeMap;
}

export function registerDiff(program: Command): Command {
  const diff = program
    .command('diff')
    .description('Print the chunks that changed between two snapshots, or since a snapshot (online or offline).')
    .argument('<image>', 'image file')
    // Not a requiredOption: commander would demand it of `diff apply` too.
    .option('--from <snapshot>', 'the older snapshot (A); required')
    .option('--to <snapshot>', 'the newer snapshot (B); default: the live volume')
    .option('--format <format>', `output format: ${Object.keys(DIFF_FORMATS).join(', ')}`, 'json')
    .action(async (image: string, o: { from?: string; to?: string; format: string }) => {
      if (o.from === undefined) throw new NbdError('BAD_ARGUMENT', 'diff needs --from SNAPSHOT');
      const format = DIFF_FORMATS[o.format];
      if (!format) throw new NbdError('BAD_ARGUMENT', `unknown diff format "${o.format}" (${Object.keys(DIFF_FORMATS).join(', ')})`);
      const map = await volumeChangeMap(image, o.from, o.to ?? null);
      await format({ image, map, out: process.stdout });
    });
  registerDiffApply(diff);
  return diff;
}
