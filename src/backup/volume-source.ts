// A ChunkSource over one of this server's own volumes: the chunks of
// snapshot SNAPSHOT that changed since snapshot SINCE (the server's change
// map, src/change-map.ts: the union of the copy-on-write bitmaps, no data
// read), or every chunk when SINCE is null (a full backup), read from the
// snapshot's export disk@SNAPSHOT over NBD (NbdChunkSource).
//
// The route, chosen for being the same code online and offline:
//   - online (a server serves IMAGE: its control socket answers): the change
//     map comes from the control socket ('change-map'), and the reads go to
//     the serving server's own NBD listener ('nbd-listeners'): its unix
//     socket if it has one (no network stack, the usual `serve --socket`),
//     else its first TCP listener (a wildcard address is reached through the
//     loopback). A server with no listener (only kernel devices) cannot be
//     read this way: NBD_CONNECT_FAILED says so.
//   - offline: the volume is opened in this process (under the volume lock,
//     as offline CLI commands do) by an NbdServer listening only on a unix
//     socket in a fresh 0700 temporary directory, so no other user can reach
//     the export; close() stops that server, releasing the lock, and removes
//     the directory.
// Either way the reads are plain NBD_CMD_READs of disk@SNAPSHOT, a
// read-only view whose content never changes while the snapshot exists.
// The source does not keep the snapshot from being deleted meanwhile
// (online): reads then fail with an NBD error, never with wrong data.
import * as fs from 'node:fs';
import * as path from 'node:path';
import { changeMap as computeChangeMap, type ChangeMap } from '../change-map';
import { callControl, listenerUri, type NbdListeners } from '../control';
import { NbdError } from '../errors';
import { createLogger } from '../logger';
import { NbdServer } from '../server';
import type { SnapshotInfo } from '../snapshots';
import type { Volume } from '../volume';
import type { SnapshotRecord } from '../volume-meta';
import { NbdChunkSource } from './nbd-source';
import { ForwardingChunkSource, type ChunkSource } from './source';

export interface VolumeSourceOptions {
  /** The snapshot to read. */
  snapshot: string;
  /** The base snapshot (only its changes are listed), or null for every chunk. */
  since: string | null;
}

class VolumeChunkSource extends ForwardingChunkSource {
  constructor(
    inner: NbdChunkSource,
    /** The change map, or undefined for a full source. */
    readonly changes: ChangeMap | undefined,
    private readonly onClose: () => Promise<void>,
  ) {
    super(inner);
  }
  override async close(): Promise<void> {
    try {
      await this.inner.close();
    } finally {
      await this.onClose();
    }
  }
}

/** A failed snapshot's export answers EIO: refuse before reading. */
function refuseFailed(image: string, s: Pick<SnapshotRecord, 'name' | 'state' | 'failure'>): void {
  if (s.state === 'failed') {
    throw new NbdError('SNAPSHOT_FAILED', `snapshot "${s.name}" of ${image} failed: ${s.failure?.reason ?? 'no reason recorded'}`);
  }
}


/** The URI of `exportName` on the first usable listener (unix preferred). */
function sourceUri(l: NbdListeners, exportName: string, image: string): string {
  const uri = listenerUri(l.listeners, exportName);
  if (uri) return uri;
  throw new NbdError('NBD_CONNECT_FAILED', `the server serving ${image} has no NBD listener to read ${exportName} from (serve it with --socket or --listen)`);
}

/** Opens a source over snapshot `opts.snapshot` of IMAGE, listing the changes since `opts.since` (or every chunk). */
export async function openVolumeSource(image: string, opts: VolumeSourceOptions): Promise<ChunkSource & { readonly changes: ChangeMap | undefined }> {
  if (typeof opts.snapshot !== 'string' || opts.snapshot === '') throw new TypeError('snapshot must be a snapshot name');
  if (opts.since !== null && (typeof opts.since !== 'string' || opts.since === '')) throw new TypeError('since must be a snapshot name or null');
  const volume = path.basename(image);
  // Online: the serving server answers both questions.
  const online = await callControl(image, { op: 'nbd-listeners' });
  if (online) {
    const l = online.result as NbdListeners;
    const info = (await callControl(image, { op: 'snapshot-info', name: opts.snapshot }))?.result as SnapshotInfo | undefined;
    if (!info) throw new NbdError('CONTROL_FAILED', `the server serving ${image} went away`);
    refuseFailed(image, info);
    const changes = opts.since
      ? ((await callControl(image, { op: 'change-map', from: opts.since, to: opts.snapshot }))?.result as ChangeMap | undefined)
      : undefined;
    if (opts.since && !changes) throw new NbdError('CONTROL_FAILED', `the server serving ${image} went away`);
    const src = await NbdChunkSource.open(sourceUri(l, `${l.export}@${opts.snapshot}`, image), {
      chunkSize: info.chunkSize,
      runs: changes?.runs,
      volume,
      snapshot: opts.snapshot,
    });
    return new VolumeChunkSource(src, changes, async () => undefined);
  }
  // Offline: the volume opened in this process, served on a private socket.
  if (!fs.existsSync(image)) throw new NbdError('IMAGE_NOT_FOUND', `image ${image} does not exist`);
  const server = new NbdServer({ logger: createLogger('warn') });
  try {
    const exp = server.addImage({ path: image, snapshots: true });
    return await volumeSource(server.volume(exp.name), { ...opts, volume }, () => server.close());
  } catch (err) {
    await server.close();
    throw err;
  }
}

/**
 * The same source over a volume opened in this process (a serving server's,
 * whose jobs run here, or an offline command's): the change map from the
 * volume itself, the reads through the process's own listener (ownUri: a
 * private unix socket when it has none). `onClose` runs after the reads end.
 */
export async function volumeSource(
  v: Volume,
  opts: VolumeSourceOptions & { volume?: string },
  onClose: () => Promise<void> = async () => undefined,
): Promise<ChunkSource & { readonly changes: ChangeMap | undefined }> {
  refuseFailed(v.image, v.snapshot(opts.snapshot)); // SNAPSHOT_NOT_FOUND, SNAPSHOT_FAILED
  const changes = opts.since ? await computeChangeMap(v, opts.since, opts.snapshot) : undefined;
  const src = await NbdChunkSource.open(v.exportUri(`${v.exportName}@${opts.snapshot}`), {
    chunkSize: v.chunkSize,
    runs: changes?.runs,
    volume: opts.volume ?? path.basename(v.image),
    snapshot: opts.snapshot,
  });
  return new VolumeChunkSource(src, changes, onClose);
}
