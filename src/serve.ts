// serve(): the whole "serve these images" job, shared by the CLI and embedders.
import * as fs from 'node:fs';
import { NbdError } from './errors';
import { ORPHAN_HINT, orphanJournals } from './journals';
import type { Logger } from './logger';
import { NbdServer, type ServerOptions } from './server';
import { exportNameFor } from './image';
import { metaDir } from './volume-meta';
import { serveControl } from './control';
import { silentLogger } from './logger';

export const DEFAULT_HOST = '127.0.0.1';
export const DEFAULT_PORT = 10809;

export interface ServeOptions extends ServerOptions {
  images: string[];
  /** Size for images that do not exist yet (bytes). */
  size?: number;
  /** TCP addresses as "HOST:PORT" ("[::1]:10809", ":10809", "10809" also accepted). */
  listen?: string[];
  /** Unix socket path. */
  socket?: string;
  readOnly?: boolean;
  logger?: Logger;
  /** Chunk size for volumes without snapshot metadata yet. */
  chunkSize?: number;
  /** Listen on 127.0.0.1:10809 when neither `listen` nor `socket` is given. Default true. */
  defaultListen?: boolean;
  /**
   * Aborting it while volumes are being opened stops the start: the volumes
   * opened so far are closed (their journals drained and removed) and serve()
   * rejects with the signal's reason.
   */
  signal?: AbortSignal;
}

export interface Serving {
  server: NbdServer;
  /** TCP ports actually bound, in --listen order. */
  ports: number[];
}

export function parseListen(text: string): { host: string; port: number } {
  let host: string;
  let portText: string;
  const v6 = /^\[([^\]]+)\]:(\d+)$/.exec(text);
  if (v6) {
    host = v6[1]!;
    portText = v6[2]!;
  } else if (/^\d+$/.test(text)) {
    host = DEFAULT_HOST;
    portText = text;
  } else {
    const i = text.lastIndexOf(':');
    if (i < 0) throw new NbdError('BAD_ARGUMENT', `invalid --listen "${text}": expected HOST:PORT`);
    host = text.slice(0, i) || '0.0.0.0';
    portText = text.slice(i + 1);
  }
  const port = Number(portText);
  if (!/^\d+$/.test(portText) || port > 65535) {
    throw new NbdError('BAD_ARGUMENT', `invalid port in --listen "${text}": expected 0..65535`);
  }
  return { host, port };
}

export async function serve(opts: ServeOptions): Promise<Serving> {
  if (opts.images.length === 0) throw new NbdError('BAD_ARGUMENT', 'no image given');
  const addrs = (opts.listen ?? []).map(parseListen);
  if (addrs.length === 0 && !opts.socket && opts.defaultListen !== false) addrs.push({ host: DEFAULT_HOST, port: DEFAULT_PORT });
  const names = new Map<string, string>();
  for (const image of opts.images) {
    const name = exportNameFor(image);
    const other = names.get(name);
    if (other !== undefined) {
      throw new NbdError('EXPORT_EXISTS', `${other} and ${image} would both be served as the export "${name}"; rename one`);
    }
    names.set(name, image);
  }
  const server = new NbdServer(opts);
  try {
    // Test hook: a pause before each volume's open, so a test can stop the
    // start-up between two volumes.
    const openDelayMs = Number(process.env.NBD_TEST_OPEN_DELAY_MS) || 0;
    for (const image of opts.images) {
      // Each volume's open is synchronous: yield between them, so a stop
      // request (a signal) is seen and start-up ends cleanly.
      await new Promise((r) => (openDelayMs ? setTimeout(r, openDelayMs) : setImmediate(r)));
      opts.signal?.throwIfAborted();
      server.addImage({ path: image, readOnly: opts.readOnly, snapshots: true, chunkSize: opts.chunkSize }, opts.size);
    }
    await new Promise((r) => setImmediate(r));
    opts.signal?.throwIfAborted();
    // on-start auto-rollback: before the first client can connect.
    if (!opts.readOnly) for (const v of server.volumeList()) await v.policies.apply('on-start');
    for (const v of server.volumeList()) v.jobs.resume();
    const ports = addrs.map((a) => server.listenTcp(a.host, a.port));
    if (opts.socket) server.listenUnix(opts.socket);
    if (addrs.length > 0 || opts.socket) server.start();
    const log = opts.logger ?? silentLogger();
    for (const j of orphanJournals()) log.warn({ journal: j.path, bytes: j.size, owner: j.owner || undefined, why: j.why }, `orphan first-write journal: ${ORPHAN_HINT}`);
    for (const v of server.volumeList()) server.addCloseHook(await serveControl(v, log, () => server.listening()));
    return { server, ports };
  } catch (err) {
    // Leave no trace of a failed start: images we just created go away.
    await server.close();
    for (const e of server.exports()) {
      if (e.created) {
        fs.rmSync(e.path, { force: true });
        fs.rmSync(metaDir(e.path), { recursive: true, force: true });
      }
    }
    throw err;
  }
}
