// `node-nbd-server diff apply IMAGE [--file F]`: applies an `rbd diff v1`
// stream (docs/diff-format.md) read from stdin or F.
//
// Route: every write goes through an NBD export of the image, never into the
// file directly, because a volume with snapshots must take the copy-on-write
// path (a direct write would change what its snapshots read):
//   - IMAGE is nbd:// or nbd+unix://: that export, as it is. The stream's
//     snapshot names are neither checked nor created there.
//   - a server serves IMAGE: its export, over one of its listeners (asked
//     through IMAGE.nbd/control.sock, 'nbd-listeners'); a server with no
//     listener (attach) is refused with VOLUME_BUSY.
//   - offline: the volume is opened in this process (an NbdServer, which
//     takes the volume lock, as the other offline volume commands do) and
//     written through an export on a unix socket in a private temporary
//     directory; closing the server drains and flushes it.
// Snapshots (IMAGE a volume, online or offline), as rbd import-diff does:
//   - 'f' (from): the volume must have an active snapshot of that name, else
//     DIFF_MISMATCH before any write. Its content is not compared: the
//     snapshot stands for "this image is at A", the way rbd import-diff
//     treats it.
//   - 't' (to): refused up front if a snapshot of that name exists
//     (SNAPSHOT_EXISTS) or the name is not valid here (BAD_SNAPSHOT_NAME);
//     created after the diff was applied and flushed, unless --no-snapshot.
//     So a chain of diffs A->B, B->C applies in order and refuses to skip one.
// A failed apply leaves a prefix of the diff applied (src/diff/rbd-diff-apply.ts)
// and creates no snapshot.
import { Command } from 'commander';
import * as fs from 'node:fs';
import type { Readable } from 'node:stream';
import { callControl, listenerUri, type NbdListeners } from '../control';
import { applyRbdDiff, type ApplyDiffResult } from '../diff/rbd-diff-apply';
import type { DiffHeader } from '../diff/rbd-diff-parser';
import { NbdDiffTarget } from '../diff/diff-target';
import { NbdError } from '../errors';
import { createLogger } from '../logger';
import { NbdServer } from '../server';
import type { SnapshotInfo } from '../snapshots';
import { validateSnapshotName } from '../volume-meta';
import { output } from './volume-command';

export interface DiffApplyOptions {
  /** Read the stream from this file instead of `input`. */
  file?: string;
  /** Create the stream's to-snapshot after applying (default true). */
  snapshot?: boolean;
}

export interface DiffApplySummary extends ApplyDiffResult {
  image: string;
  /** The snapshot created from the stream's 't' record, if any. */
  createdSnapshot: string | null;
}

/** How apply reaches the volume's snapshots (online: control socket; offline: in process). */
interface SnapshotOps {
  list(): Promise<SnapshotInfo[]>;
  create(name: string): Promise<void>;
}

function isNbdUri(s: string): boolean {
  return /^nbd(\+unix)?:\/\//.test(s);
}


function checker(snaps: SnapshotOps | null, wantSnapshot: boolean, image: string): (h: DiffHeader) => Promise<void> {
  return async (h) => {
    if (!snaps) return;
    if (h.fromSnap === null && (h.toSnap === null || !wantSnapshot)) return;
    const list = await snaps.list();
    if (h.fromSnap !== null) {
      const s = list.find((x) => x.name === h.fromSnap);
      if (!s) throw new NbdError('DIFF_MISMATCH', `the diff starts at snapshot ${JSON.stringify(h.fromSnap)}, which ${image} does not have: it applies only to an image at that snapshot`);
      if (s.state !== 'active') throw new NbdError('DIFF_MISMATCH', `the diff starts at snapshot ${JSON.stringify(h.fromSnap)}, which failed on ${image}`);
    }
    if (h.toSnap !== null && wantSnapshot) {
      validateSnapshotName(h.toSnap);
      if (list.some((x) => x.name === h.toSnap)) throw new NbdError('SNAPSHOT_EXISTS', `the diff ends at snapshot ${JSON.stringify(h.toSnap)}, which ${image} already has (apply with --no-snapshot to skip creating it)`);
    }
  };
}

async function applyVia(uri: string, input: Readable, snaps: SnapshotOps | null, image: string, wantSnapshot: boolean): Promise<DiffApplySummary> {
  const target = await NbdDiffTarget.connect(uri);
  let r: ApplyDiffResult;
  try {
    r = await applyRbdDiff(input, target, { checkHeader: checker(snaps, wantSnapshot, image) });
  } finally {
    await target.close();
  }
  let createdSnapshot: string | null = null;
  if (snaps && wantSnapshot && r.toSnap !== null) {
    await snaps.create(r.toSnap);
    createdSnapshot = r.toSnap;
  }
  return { ...r, image, createdSnapshot };
}

/** Applies the stream in `input` (or opts.file) to IMAGE: a volume or an NBD URI. */
export async function diffApply(image: string, input: Readable, opts: DiffApplyOptions = {}): Promise<DiffApplySummary> {
  const wantSnapshot = opts.snapshot ?? true;
  if (opts.file !== undefined) {
    if (!fs.existsSync(opts.file)) throw new NbdError('BAD_ARGUMENT', `diff file ${opts.file} does not exist`);
    input = fs.createReadStream(opts.file);
  }
  if (isNbdUri(image)) return applyVia(image, input, null, image, wantSnapshot);

  const online = await callControl(image, { op: 'nbd-listeners' });
  if (online) {
    const l = online.result as NbdListeners;
    const uri = listenerUri(l.listeners, l.export);
    if (!uri) throw new NbdError('VOLUME_BUSY', `${image} is served with no NBD listener (only a kernel device?): apply through the device's server with a listener, or stop it`);
    const snaps: SnapshotOps = {
      list: async () => (await callControl(image, { op: 'snapshot-list' }))!.result as SnapshotInfo[],
      create: async (name) => void (await callControl(image, { op: 'snapshot-create', name })),
    };
    return applyVia(uri, input, snaps, image, wantSnapshot);
  }

  if (!fs.existsSync(image)) throw new NbdError('IMAGE_NOT_FOUND', `image ${image} does not exist`);
  const server = new NbdServer({ logger: createLogger('warn') });
  try {
    const exp = server.addImage({ path: image, snapshots: true });
    const v = server.volume(exp.name);
    const snaps: SnapshotOps = {
      list: async () => {
        await v.settle();
        return v.snapshots.list();
      },
      create: async (name) => void (await v.snapshots.create(name)),
    };
    // ownUri: a private unix socket (0700 directory, removed at close).
    return await applyVia(server.ownUri(exp.name), input, snaps, image, wantSnapshot);
  } finally {
    await server.close();
  }
}

/**
 * Adds `apply` to the `diff` command (src/cli/diff.ts creates `diff`):
 *   node-nbd-server diff apply IMAGE [--file F] [--no-snapshot] [--json]
 */
export function registerDiffApply(diff: Command): Command {
  return diff
    .command('apply')
    .description('Apply an rbd diff v1 stream (from `diff --format rbd` or `rbd export-diff`) to IMAGE; reads stdin unless --file.')
    .argument('<image>', 'image file (online or offline), or an nbd:// / nbd+unix:// URI')
    .option('-f, --file <file>', 'read the diff from FILE instead of stdin')
    .option('--no-snapshot', 'do not create the snapshot the diff ends at (its \'t\' record)')
    .option('--json', 'print the result as JSON')
    .addHelpText('after', '\nExample:\n  node-nbd-server diff disk.img --from a --to b --format rbd | ssh replica node-nbd-server diff apply disk.img\n')
    .action(async (image: string, o: { file?: string; snapshot: boolean; json?: boolean }) => {
      const r = await diffApply(image, process.stdin, { file: o.file, snapshot: o.snapshot });
      output(o, r, (s) => {
        const range = `${s.fromSnap ?? '(empty)'} -> ${s.toSnap ?? '(live)'}`;
        process.stdout.write(`applied diff ${range} to ${s.image}: ${s.bytesWritten} bytes written, ${s.bytesZeroed} bytes zeroed\n`);
        if (s.createdSnapshot) process.stdout.write(`created snapshot ${s.createdSnapshot}\n`);
      });
    });
}
