// The control socket: how CLI commands reach the server that serves a volume.
// One unix socket per volume at IMAGE.nbd/control.sock (found from IMAGE
// alone); one JSON request per line, one JSON reply per line:
//   -> {"op":"snapshot-create","name":"x"}
//   <- {"ok":true,"result":{...}}  or  {"ok":false,"code":"SNAPSHOT_EXISTS","message":"..."}
// Requests are handled on the main JS thread; slow work inside them runs on
// native threads and is awaited.
//
// Who may call: the server's own user and root, nobody else (a request can
// create, delete and roll back snapshots). Two independent gates:
//   - modes: the socket is chmod'ed 0600 as soon as it is bound, before the
//     first accept, inside IMAGE.nbd/ which is 0700 and ours
//     (ensureMetaDir, src/volume-meta.ts), so under any umask no other user
//     can even reach it;
//   - credentials: every accepted connection's SO_PEERCRED uid (recorded by
//     the kernel at connect, not forgeable) must be our euid or 0, else the
//     peer gets one CONTROL_DENIED line and is closed, logged. This holds
//     when the modes do not (an IMAGE.nbd/ owned by someone else, or loosened
//     by hand).
import * as fs from 'node:fs';
import * as net from 'node:net';
import { isErrorCode, NbdError, type ErrorCode } from './errors';
import type { Logger } from './logger';
import type { ListenAddress } from './server';
export { listenerUri } from './server';
import { native } from './native';
import { parseAutoRollback } from './policies';
import type { BackupRequest } from './backup-job';
import type { Volume } from './volume';
import { controlSocketPath } from './volume-meta';

export interface ControlRequest {
  op:
    | 'snapshot-create'
    | 'snapshot-list'
    | 'snapshot-info'
    | 'snapshot-delete'
    | 'snapshot-set'
    | 'snapshot-get'
    | 'rollback'
    | 'jobs'
    | 'job-cancel'
    | 'backup-create'
    | 'info'
    | 'change-map'
    | 'nbd-listeners'
    | 'ping';
  name?: string;
  /** snapshot-create, snapshot-set: an auto-rollback policy or "off" */
  autoRollback?: string;
  /** rollback: who asked (user@host pid) */
  by?: string;
  /** change-map: snapshot A, and snapshot B or null for the live volume */
  from?: string;
  to?: string | null;
  /** jobs: also the finished ones */
  all?: boolean;
  /** job-cancel: the job */
  id?: number;
  /** backup-create: what `backup create` asked (paths absolute) */
  backup?: BackupRequest;
}

/** Where the serving server can be read over NBD (nbd-listeners): its volume export and listeners. */
export interface NbdListeners {
  export: string;
  listeners: readonly ListenAddress[];
}


async function handle(v: Volume, req: ControlRequest, listening: () => readonly ListenAddress[]): Promise<unknown> {
  switch (req.op) {
    case 'change-map':
      return v.changeMap(req.from as string, req.to ?? null); // validated there
    case 'nbd-listeners':
      return { export: v.exportName, listeners: listening() } satisfies NbdListeners;
    case 'ping':
      return { pid: process.pid, export: v.exportName };
    case 'snapshot-create':
      return v.snapshots.create(String(req.name ?? ''), { autoRollback: req.autoRollback ? parseAutoRollback(req.autoRollback) : undefined });
    case 'snapshot-set':
      return v.policies.set(String(req.name ?? ''), parseAutoRollback(String(req.autoRollback ?? '')));
    case 'snapshot-get':
      return { autoRollback: v.policies.get(String(req.name ?? '')) };
    case 'rollback':
      return v.rollback.to(String(req.name ?? ''), { trigger: 'command', by: String(req.by ?? 'unknown') });
    case 'jobs':
      return v.jobs.list({ all: req.all === true });
    case 'job-cancel':
      return v.jobs.cancel(Number(req.id), v.image);
    case 'backup-create':
      if (!req.backup || typeof req.backup.repo !== 'string') throw new NbdError('BAD_ARGUMENT', 'backup-create needs a repository');
      return v.backups.create(req.backup);
    case 'info':
      await v.settle();
      return v.info();
    case 'snapshot-list':
      await v.settle(); // queued first writes preserved: counts and failures are current
      return v.snapshots.list();
    case 'snapshot-info':
      await v.settle();
      return v.snapshots.info(String(req.name ?? ''));
    case 'snapshot-delete':
      await v.snapshots.delete(String(req.name ?? ''));
      return {};
    default:
      throw new NbdError('BAD_ARGUMENT', `unknown control operation "${(req as { op: string }).op}"`);
  }
}

/**
 * Whether the peer may use the control socket: its SO_PEERCRED uid is our
 * euid or root. Fails closed: no descriptor or no SO_PEERCRED is a refusal.
 * Refusals are logged with the peer's uid, gid and pid.
 */
function allowedPeer(sock: net.Socket, clog: Logger): boolean {
  // Node exposes a connection's descriptor only as its handle's `fd` (a
  // Pipe handle on Unix); should that ever go away, every peer is refused.
  const fd = (sock as unknown as { _handle?: { fd?: number } })._handle?.fd;
  let cred: { pid: number; uid: number; gid: number };
  try {
    if (typeof fd !== 'number' || fd < 0) throw new Error('no descriptor for the connection');
    cred = native.peerCredentials(fd);
  } catch (err) {
    clog.warn({ err: (err as Error).message }, 'control connection refused: its credentials cannot be read');
    return false;
  }
  const euid = process.geteuid?.() ?? 0;
  if (cred.uid === euid || cred.uid === 0) return true;
  clog.warn({ uid: cred.uid, gid: cred.gid, peerPid: cred.pid }, 'control connection refused: another user than the server\'s (or root)');
  return false;
}

/**
 * Serves the control socket of one volume; returns a closer. `listening`
 * names the server's NBD listeners (for readers of disk@SNAP exports,
 * src/backup/volume-source.ts).
 */
export function serveControl(v: Volume, log: Logger, listening: () => readonly ListenAddress[] = () => []): Promise<() => Promise<void>> {
  const file = controlSocketPath(v.image);
  const clog = log.child({ component: 'control', volume: v.exportName });
  const server = net.createServer((sock) => {
    if (!allowedPeer(sock, clog)) {
      // One refusal line, then closed. Its input is read and dropped, so its
      // end of stream is seen and the socket closes (closing with unread input
      // would reset the peer before it reads the line); one that stays
      // connected is cut off: a refused peer holds nothing open.
      sock.on('error', () => undefined);
      sock.setTimeout(10_000, () => sock.destroy());
      sock.resume();
      const message = `the server serving ${v.image} accepts control requests only from its own user and root`;
      sock.end(JSON.stringify({ ok: false, code: 'CONTROL_DENIED', message }) + '\n');
      return;
    }
    let buf = '';
    sock.setEncoding('utf8');
    sock.on('data', (d: string) => {
      buf += d;
      if (buf.length > 1 << 20) sock.destroy();
      let i;
      while ((i = buf.indexOf('\n')) >= 0) {
        const line = buf.slice(0, i);
        buf = buf.slice(i + 1);
        let req: ControlRequest;
        try {
          req = JSON.parse(line) as ControlRequest;
        } catch {
          sock.write(JSON.stringify({ ok: false, code: 'BAD_ARGUMENT', message: 'request is not JSON' }) + '\n');
          continue;
        }
        handle(v, req, listening).then(
          (result) => sock.write(JSON.stringify({ ok: true, result }) + '\n'),
          (err: unknown) => {
            const e = err as { code?: string; message?: string };
            clog.warn({ op: req.op, err: e.message }, 'control request failed');
            // Only stable codes cross the socket: a raw system error (ENOSPC from a file write) is a failed request.
            const code = isErrorCode(e.code) ? e.code : 'CONTROL_FAILED';
            sock.write(JSON.stringify({ ok: false, code, message: e.message ?? String(err) }) + '\n');
          },
        );
      }
    });
    sock.on('error', () => undefined);
  });
  server.unref();
  return new Promise((resolve, reject) => {
    try {
      fs.rmSync(file, { force: true }); // we hold the volume lock: any socket here is stale
    } catch {
      /* ignore */
    }
    server.once('error', reject);
    server.listen(file, () => {
      // Runs before the first connection is accepted: 'listening' is emitted
      // on process.nextTick, accepts come from a later turn of the event loop. IMAGE.nbd/ is 0700, so no other
      // user could reach the socket in the moment it had the umask's mode.
      try {
        fs.chmodSync(file, 0o600);
      } catch (err) {
        server.close();
        reject(err);
        return;
      }
      resolve(
        () =>
          new Promise<void>((r) => {
            server.close(() => r());
            fs.rmSync(file, { force: true });
          }),
      );
    });
  });
}

/**
 * Sends one request to the server serving `image`. Resolves with undefined
 * when no server is listening (the caller then works offline).
 */
export function callControl(image: string, req: ControlRequest, timeoutMs = 600_000): Promise<{ result: unknown } | undefined> {
  const file = controlSocketPath(image);
  return new Promise((resolve, reject) => {
    const sock = net.connect(file);
    let buf = '';
    let connected = false;
    const timer = setTimeout(() => {
      sock.destroy();
      reject(new NbdError('CONTROL_FAILED', `the server serving ${image} did not answer within ${timeoutMs / 1000} s`));
    }, timeoutMs);
    sock.setEncoding('utf8');
    sock.on('connect', () => {
      connected = true;
      sock.write(JSON.stringify(req) + '\n');
    });
    sock.on('data', (d: string) => {
      buf += d;
      const i = buf.indexOf('\n');
      if (i < 0) return;
      clearTimeout(timer);
      sock.end();
      const reply = JSON.parse(buf.slice(0, i)) as { ok: boolean; result?: unknown; code?: ErrorCode; message?: string };
      if (reply.ok) resolve({ result: reply.result });
      else reject(new NbdError(isErrorCode(reply.code) ? reply.code : 'CONTROL_FAILED', reply.message ?? 'control request failed'));
    });
    sock.on('error', (err: NodeJS.ErrnoException) => {
      clearTimeout(timer);
      if (!connected && (err.code === 'ENOENT' || err.code === 'ECONNREFUSED')) resolve(undefined);
      else reject(new NbdError('CONTROL_FAILED', `control socket ${file}: ${err.message}`));
    });
    sock.on('close', () => {
      clearTimeout(timer);
      if (connected && !buf.includes('\n')) reject(new NbdError('CONTROL_FAILED', `the server serving ${image} closed the control socket`));
    });
  });
}
