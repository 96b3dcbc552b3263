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
//   - 'f' (from): the volume must have an active snapshot of that name, and
//     its live content must equal that snapshot's, else DIFF_MISMATCH before
//     any write (rbd import-diff only checks the name; here a volume written
//     since A would silently become neither A's nor B's content, and get a
//     snapshot named B that later diffs build on). The check reads only the
//     chunks the change map A..live lists (usually none), from disk@A and
//     from live, and compares them: a chunk written back to A's content (a
//     rollback to A) passes.
//   - 't' (to): refused up front if a snapshot of that name exists
//     (SNAPSHOT_EXISTS) or the name is not valid here (BAD_SNAPSHOT_NAME);
//     created after the diff was applied and flushed, unless --no-snapshot.
//     So a chain of diffs A->B, B->C applies in order and refuses to skip one.
// A failed apply leaves a prefix of the diff applied (src/diff/rbd-diff-apply.ts)
// and creates no snapshot.
import { Command } from 'commander';
import * as fs from 'node:fs';
import type { Readable } from 'node:stream';
import { NbdClient } from '../backup/nbd-client';
import { byteRuns, changeMap, type ChangeMap } from '../change-map';
import { callControl, listenerUri, type NbdListeners } from '../control';
import { applyRbdDiff, type ApplyDiffResult } from '../diff/rbd-diff-apply';
import type { DiffHeader } from '../diff/rbd-diff-parser';
import { NbdDiffTarget, type DiffTarget } from '../diff/diff-target';
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
  /** The change map from snapshot `name` to live. */
  changedSince(name: string): Promise<ChangeMap>;
  /** NBD URIs of the live export and of snapshot `name`'s export. */
  uris(name: string): { live: string; snapshot: string };
}

function isNbdUri(s: string): boolean {
  return /^nbd(\+unix)?:\/\//.test(s);
}

/** A byte range [start, end). */
type Span = [number, number];

/**
 * Where live differs from snapshot `name`: per 512-byte sector that differs,
 * the span from its first to its last differing byte. Only the chunks the
 * change map A..live lists are read (usually none), from live and disk@A.
 */
async function differencesFrom(snaps: SnapshotOps, name: string): Promise<Span[]> {
  const map = await snaps.changedSince(name);
  const runs = byteRuns(map);
  const out: Span[] = [];
  if (runs.length === 0) return out;
  const { live, snapshot } = snaps.uris(name);
  const a = await NbdClient.connect(live);
  try {
    const b = await NbdClient.connect(snapshot);
    try {
      const SEG = 1024 * 1024;
      for (const r of runs) {
        for (let off = r.offset; off < r.offset + r.length; off += SEG) {
          const len = Math.min(SEG, r.offset + r.length - off);
          const x = Buffer.alloc(len);
          const y = Buffer.alloc(len);
          await Promise.all([a.read(off, x), b.read(off, y)]);
          if (x.equals(y)) continue;
          for (let s = 0; s < len; s += 512) {
            const e = Math.min(len, s + 512);
            if (x.subarray(s, e).equals(y.subarray(s, e))) continue;
            let lo = s;
            while (x[lo] === y[lo]) lo++;
            let hi = e;
            while (x[hi - 1] === y[hi - 1]) hi--;
            out.push([off + lo, off + hi]);
          }
        }
      }
    } finally {
      await b.close();
    }
  } finally {
    await a.close();
  }
  return out;
}

/** The first span of `need` not inside the union of `have` (both [start, end)), or null. */
function uncovered(need: Span[], have: Span[]): Span | null {
  const merged: Span[] = [];
  for (const [s, e] of [...have].sort((p, q) => p[0] - q[0])) {
    const last = merged.at(-1);
    if (last && s <= last[1]) last[1] = Math.max(last[1], e);
    else merged.push([s, e]);
  }
  let i = 0;
  for (const [s, e] of need) {
    while (i < merged.length && merged[i]![1] <= s) i++;
    if (i === merged.length || merged[i]![0] > s || merged[i]![1] < e) return [s, e];
  }
  return null;
}

/**
 * The header check (before any write). `diverged` receives where the volume
 * differs from the 'f' snapshot: the diff must overwrite all of it (a retry
 * after a failed apply, which left a prefix of the same diff applied, does),
 * else the result is neither A's nor B's content.
 */
function checker(snaps: SnapshotOps | null, wantSnapshot: boolean, image: string, diverged: Span[]): (h: DiffHeader) => Promise<void> {
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
    if (h.fromSnap !== null) diverged.push(...(await differencesFrom(snaps, h.fromSnap)));
  };
}

async function applyVia(uri: string, input: Readable, snaps: SnapshotOps | null, image: string, wantSnapshot: boolean): Promise<DiffApplySummary> {
  const inner = await NbdDiffTarget.connect(uri);
  const diverged: Span[] = [];
  const written: Span[] = [];
  const target: DiffTarget = {
    size: inner.size,
    write: (offset, data) => (written.push([offset, offset + data.length]), inner.write(offset, data)),
    zero: (offset, length) => (written.push([offset, offset + length]), inner.zero(offset, length)),
    flush: () => inner.flush(),
    close: () => inner.close(),
  };
  let r: ApplyDiffResult;
  try {
    r = await applyRbdDiff(input, target, { checkHeader: checker(snaps, wantSnapshot, image, diverged) });
  } finally {
    await target.close();
  }
  const left = uncovered(diverged, written);
  if (left) {
    throw new NbdError(
      'DIFF_MISMATCH',
      `${image} was written since snapshot ${JSON.stringify(r.fromSnap)} (bytes ${left[0]}..${left[1]} differ from it) where the diff does not write: the image is now neither ${JSON.stringify(r.fromSnap)} nor ${JSON.stringify(r.toSnap ?? 'the diff\'s end')}; no snapshot was created (roll back to ${JSON.stringify(r.fromSnap)} and apply again)`,
    );
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
      changedSince: async (name) => {
        const r = await callControl(image, { op: 'change-map', from: name, to: null });
        if (!r) throw new NbdError('CONTROL_FAILED', `the server serving ${image} went away`);
        return r.result as ChangeMap;
      },
      uris: (name) => ({ live: uri, snapshot: listenerUri(l.listeners, `${l.export}@${name}`)! }),
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
      changedSince: (name) => changeMap(v, name, null),
      uris: (name) => ({ live: v.exportUri(v.exportName), snapshot: v.exportUri(`${v.exportName}@${name}`) }),
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
