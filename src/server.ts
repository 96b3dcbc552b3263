// NbdServer: the embeddable server. It owns one native server (whose threads
// do all socket and data-path work) and turns its events into log lines and
// EventEmitter events. Control operations are synchronous and cheap; close()
// drains in-flight requests and flushes on a worker thread.
import { EventEmitter } from 'node:events';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { fromNative, NbdError } from './errors';
import { silentLogger, type Logger } from './logger';
import { native, type NativeEvent, type NativeServer, type NativeServerStats } from './native';
import { removeOwnOrphans } from './journals';
import { journalDirFor, journalStatePath } from './volume-meta';
import { prepareImage, type ImageSpec, type PreparedImage } from './image';
import { Volume, type PreparedVolume } from './volume';

export interface ServerOptions {
  logger?: Logger;
  /** Worker threads per connection (spawned on demand). Default 32. */
  threadsPerConnection?: number;
  /** Largest request payload accepted and advertised, in bytes. Default 32 MiB. */
  maxPayload?: number;
  /** A client must finish negotiating within this time. Default 30 s. */
  handshakeTimeoutMs?: number;
  /** Most simultaneous connections; more are refused. Default 4096. */
  maxConnections?: number;
  /** Background rollback merge limit, bytes per second per volume. Default unlimited. */
  mergeRate?: number;
  /**
   * Size of each volume's first-write journal (first_write_queue.hh): 0
   * preserves first writes inline. Default defaultCowJournal(volume size).
   */
  cowJournal?: number;
  /**
   * Server-wide bound on first-write journal memory, bytes (every volume's
   * journal ring is reserved from it; a volume that finds it spent preserves
   * first writes inline). Default DEFAULT_JOURNAL_MEMORY.
   */
  journalMemory?: number;
}

/** Default server-wide journal memory: 1 GiB (16 volumes at the largest default ring). */
export const DEFAULT_JOURNAL_MEMORY = 1024 * 1024 * 1024;

/** Default first-write journal: 1/16 of the volume, from 4 MiB to 64 MiB. */
export function defaultCowJournal(size: number): number {
  const MiB = 1024 * 1024;
  return Math.min(64 * MiB, Math.max(4 * MiB, Math.floor(size / 16 / 4096) * 4096));
}

export interface ExportInfo {
  name: string;
  path: string;
  size: number;
  readOnly: boolean;
  created: boolean;
}

export interface ListenAddress {
  kind: 'tcp' | 'unix';
  host?: string;
  port?: number;
  path?: string;
}

export type ServerEvent = NativeEvent;

export interface AttachOptions {
  /** Export to bind ("" = default). */
  export?: string;
  /** Sockets handed to the kernel (multi-conn). Default 1. */
  connections?: number;
  /** Kernel request timeout in seconds (0 = none). Default 30. */
  timeoutSec?: number;
}

/** A kernel /dev/nbdN served by this server. */
export interface KernelAttachment {
  device: string;
  /** Resolves when the kernel disconnects the device (detach, or disconnect()). */
  detached: Promise<{ error?: string }>;
  /** Asks the kernel to disconnect, as `node-nbd-server detach` does. */
  disconnect(): void;
}

export class NbdServer extends EventEmitter {
  private readonly native: NativeServer;
  private readonly log: Logger;
  private readonly exportList: ExportInfo[] = [];
  private readonly addresses: ListenAddress[] = [];
  private state: 'new' | 'serving' | 'closing' | 'closed' = 'new';
  private closing?: Promise<void>;
  private readonly devices = new Map<number, (result: { error?: string }) => void>();
  private readonly volumes = new Map<string, Volume>();
  private readonly beforeClose: (() => Promise<void>)[] = [];
  private readonly mergeRate?: number;
  private readonly cowJournal?: number;
  /** After close(): exports whose final flush failed. */
  flushFailures: { export: string; error: string }[] = [];

  constructor(options: ServerOptions = {}) {
    super();
    this.log = (options.logger ?? silentLogger()).child({ component: 'server' });
    this.mergeRate = options.mergeRate;
    this.cowJournal = options.cowJournal;
    try {
      this.native = new native.NativeServer({
        threadsPerConnection: options.threadsPerConnection,
        maxPayload: options.maxPayload,
        handshakeTimeoutMs: options.handshakeTimeoutMs,
        maxConnections: options.maxConnections,
        journalMemoryMiB: Math.floor((options.journalMemory ?? DEFAULT_JOURNAL_MEMORY) / (1024 * 1024)),
        onEvent: (ev) => this.onNativeEvent(ev),
      });
    } catch (err) {
      throw fromNative(err);
    }
  }

  /** Adds an image as an export; a missing file is created sparse if `size` is given. */
  addImage(spec: ImageSpec, size?: number): ExportInfo {
    this.assertOpen();
    const prepared: PreparedImage = prepareImage(spec, size);
    if (prepared.created) this.log.info({ path: prepared.path, size: prepared.size }, 'created sparse image');
    else if (size !== undefined && size !== prepared.size && prepared.size !== 0) {
      this.log.warn(
        { path: prepared.path, size: prepared.size, requested: size },
        'image exists: serving it at its current size (--size only applies to new images)',
      );
    }
    let info;
    let vol: PreparedVolume | undefined;
    try {
      if (spec.snapshots) {
        const size = prepared.size || fs.statSync(prepared.path).size;
        vol = Volume.prepare(prepared.path, size, spec.chunkSize, this.log, prepared.readOnly);
      }
      info = this.native.addExport({
        name: prepared.name,
        path: prepared.path,
        readOnly: prepared.readOnly,
        description: prepared.description,
        chunkSize: vol?.chunkSize,
        snapshots: vol?.snapshots,
        rollbackJob: vol?.rollbackJob,
        journalState: vol ? journalStatePath(prepared.path) : undefined,
        journalDir: vol && !prepared.readOnly ? journalDirFor(prepared.path, this.log) : undefined,
        journalSize: vol ? (this.cowJournal ?? defaultCowJournal(vol.manifest.size)) : undefined,
      });
    } catch (err) {
      vol?.unlock();
      if (prepared.created) fs.rmSync(prepared.path, { force: true });
      throw fromNative(err);
    }
    if (vol) {
      const v = Volume.open(this.native, prepared.path, info.name, vol, this.log, {
        readOnly: prepared.readOnly,
        mergeRate: this.mergeRate,
      });
      for (const st of info.snapshots) if (st.failed) v.snapshots.recordFailure(st.id, st.failure, st.failedAt);
      const fw = v.firstWrites();
      if (fw?.note) this.log.warn({ volume: prepared.path }, fw.note);
      if (!prepared.readOnly) {
        const gone = removeOwnOrphans(prepared.path);
        if (gone.length) this.log.info({ volume: prepared.path, journals: gone }, 'removed journals of this volume that nothing will replay (left by an interrupted start or stop)');
      }
      if (fw?.replayedAtOpen) {
        this.log.info({ volume: prepared.path, entries: fw.replayedAtOpen }, 'applied first writes journalled before the last stop (preserved first)');
      }
      if (fw?.mode.startsWith('inline (')) this.log.warn({ volume: prepared.path, mode: fw.mode }, 'first writes after a snapshot are preserved inline');
      v.exportUri = (name) => this.ownUri(name);
      this.volumes.set(info.name, v);
    }
    const exp: ExportInfo = { name: info.name, path: prepared.path, size: info.size, readOnly: info.readOnly, created: prepared.created };
    this.exportList.push(exp);
    this.log.info({ export: exp.name, path: exp.path, size: exp.size, readOnly: exp.readOnly }, 'export added');
    return exp;
  }

  /** A volume served with snapshots enabled: its snapshots, jobs and policies. */
  volume(exportName: string): Volume {
    const v = this.volumes.get(exportName);
    if (!v) throw new NbdError('VOLUME_NOT_FOUND', `no volume with snapshots is served as "${exportName}"`);
    return v;
  }

  volumeList(): Volume[] {
    return [...this.volumes.values()];
  }

  removeExport(name: string): boolean {
    const removed = this.native.removeExport(name);
    if (removed) {
      const i = this.exportList.findIndex((e) => e.name === name);
      if (i >= 0) this.exportList.splice(i, 1);
    }
    return removed;
  }

  setDefaultExport(name: string): void {
    try {
      this.native.setDefaultExport(name);
    } catch (err) {
      throw fromNative(err);
    }
  }

  exports(): readonly ExportInfo[] {
    return this.exportList;
  }

  /** Listens on TCP; returns the bound port (useful with port 0). */
  listenTcp(host: string, port: number): number {
    this.assertOpen();
    if (!Number.isInteger(port) || port < 0 || port > 65535) throw new RangeError(`port must be 0..65535, got ${port}`);
    let bound: number;
    try {
      bound = this.native.listenTcp(host, port);
    } catch (err) {
      throw fromNative(err);
    }
    this.addresses.push({ kind: 'tcp', host, port: bound });
    return bound;
  }

  listenUnix(socketPath: string): void {
    this.assertOpen();
    try {
      this.native.listenUnix(socketPath);
    } catch (err) {
      throw fromNative(err);
    }
    // Absolute, so that other processes (control 'nbd-listeners') can reach it from any directory.
    this.addresses.push({ kind: 'unix', path: path.resolve(socketPath) });
  }

  listening(): readonly ListenAddress[] {
    return this.addresses;
  }

  start(): void {
    this.assertOpen();
    if (this.exportList.length === 0) throw new NbdError('START_FAILED', 'no exports: add at least one image');
    try {
      this.native.start();
    } catch (err) {
      throw fromNative(err);
    }
    this.state = 'serving';
    this.log.info({ addresses: this.addresses, exports: this.exportList.map((e) => e.name) }, 'serving');
  }

  stats(): NativeServerStats {
    return this.native.stats();
  }

  /** Serves an export through a kernel NBD device (no nbd-client needed). */
  attachDevice(device: string, opts: AttachOptions = {}): KernelAttachment {
    this.assertOpen();
    let id: number;
    try {
      id = this.native.attachDevice({ device, export: opts.export ?? '', connections: opts.connections, timeoutSec: opts.timeoutSec });
    } catch (err) {
      throw fromNative(err);
    }
    const detached = new Promise<{ error?: string }>((resolve) => this.devices.set(id, resolve));
    this.log.info({ device, export: opts.export ?? '', connections: opts.connections ?? 1 }, 'kernel device attached');
    return { device, detached, disconnect: () => void this.native.disconnectDevice(id) };
  }

  /** Registers work to finish before the native server stops (control sockets). */
  addCloseHook(fn: () => Promise<void>): void {
    this.beforeClose.push(fn);
  }

  /** Stops accepting, lets in-flight requests finish, flushes. Idempotent. */
  close(): Promise<void> {
    if (!this.closing) {
      this.state = 'closing';
      this.log.info('stopping: draining in-flight requests and flushing');
      const hooks = this.beforeClose.splice(0);
      const jobs = [...this.volumes.values()].map((v) => v.stopJobs().catch(() => undefined));
      this.closing = Promise.all([...hooks.map((h) => h().catch(() => undefined)), ...jobs])
        .then(() => this.native.stop())
        .then((failed) => {
          for (const f of failed) {
            this.log.error(
              { export: f.export, error: f.error },
              'the image could not be flushed: writes acknowledged since its last successful flush may not be on disk (a write-back error; every request to it failed since)',
            );
          }
          this.flushFailures = failed;
        for (const v of this.volumes.values()) {
          const kept = v.firstWrites()?.kept;
          if (kept) this.log.error({ volume: v.image }, `queued first writes could not be applied to the image: ${kept}`);
          v.close();
        }
        for (const done of this.devices.values()) done({});
        this.devices.clear();
        this.state = 'closed';
        this.log.info('stopped');
        this.emit('close');
      });
    }
    return this.closing;
  }

  /**
   * The volume's last client left while its on-disconnect hold is armed: new
   * sessions wait (natively) until the auto-rollback is visible.
   */
  private onLastDisconnect(exportName: string): void {
    const v = this.volumes.get(exportName);
    const release = () => {
      try {
        this.native.releaseHold(exportName);
      } catch {
        /* the export is gone */
      }
    };
    if (!v || this.state !== 'serving') return release();
    v.policies.apply('on-disconnect')
      .catch((err: Error) => this.log.error({ volume: exportName, err: err.message }, 'auto-rollback on disconnect failed'))
      .finally(release);
  }

  /**
   * An NBD URI at which this process serves export `name`, for reading its
   * own exports (a backup reads disk@SNAP, src/backup-job.ts sourceFor):
   * the first unix listener, else the first TCP one (a wildcard address is
   * reached through loopback). A server with no listener that has not
   * started (an offline command) gets a private one first: a unix socket in
   * a new 0700 temporary directory, removed at close; the server starts.
   */
  ownUri(name: string): string {
    if (this.addresses.length === 0 && this.state === 'new') {
      const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'node-nbd-server-'));
      fs.chmodSync(dir, 0o700);
      const sock = path.join(dir, 'nbd.sock');
      this.addCloseHook(async () => fs.rmSync(dir, { recursive: true, force: true }));
      this.listenUnix(sock);
      this.start();
    }
    // A TCP listener is usable once the server serves.
    const uri = listenerUri(this.state === 'serving' ? this.addresses : this.addresses.filter((a) => a.kind === 'unix'), name);
    if (uri) return uri;
    throw new NbdError('BAD_ARGUMENT', `this server has no NBD listener through which to read ${name} (serve with --socket or --listen)`);
  }

  private assertOpen(): void {
    if (this.state === 'closing' || this.state === 'closed') throw new NbdError('SERVER_CLOSED', 'server is closed');
  }

  private onNativeEvent(ev: NativeEvent): void {
    const fields = { connection: ev.connection, export: ev.export || undefined, peer: ev.peer || undefined };
    switch (ev.type) {
      case 'connect':
        this.log.info({ ...fields, mode: ev.message }, 'client connected');
        break;
      case 'disconnect':
        this.log.info({ ...fields, reason: ev.message }, 'client disconnected');
        break;
      case 'last-disconnect':
        this.onLastDisconnect(ev.export);
        break;
      case 'device-detached':
      case 'device-error': {
        const done = this.devices.get(ev.connection);
        this.devices.delete(ev.connection);
        this.native.releaseDevice(ev.connection);
        if (ev.type === 'device-error') this.log.error({ device: ev.peer, error: ev.message }, 'kernel device failed');
        else this.log.info({ device: ev.peer }, 'kernel device detached');
        done?.(ev.type === 'device-error' ? { error: ev.message } : {});
        break;
      }
      case 'snapshot-failed':
        for (const v of this.volumes.values()) if (v.exportName === ev.export) v.snapshots.recordFailure(ev.connection, ev.message);
        break;
      case 'handshake-failed':
        this.log.warn({ ...fields, reason: ev.message }, 'handshake failed');
        break;
      default:
        this.log.error({ ...fields, error: ev.message }, 'server error');
    }
    this.emit(ev.type, ev);
    this.emit('event', ev);
  }
}

/**
 * An NBD URI for `exportName` on one of the listeners: the unix socket if
 * there is one (no network stack), else the first TCP listener (a wildcard
 * address reached through the loopback); null when the server has none
 * (only kernel devices).
 */
export function listenerUri(listeners: readonly ListenAddress[], exportName: string): string | null {
  const name = encodeURIComponent(exportName);
  const unix = listeners.find((a) => a.kind === 'unix' && a.path);
  if (unix) return `nbd+unix:///${name}?socket=${encodeURIComponent(unix.path!)}`;
  const tcp = listeners.find((a) => a.kind === 'tcp' && a.port);
  if (!tcp) return null;
  let host = tcp.host ?? '127.0.0.1';
  if (host === '0.0.0.0' || host === '') host = '127.0.0.1';
  if (host === '::') host = '::1';
  return `nbd://${host.includes(':') ? `[${host}]` : host}:${tcp.port}/${name}`;
}
