// A small NBD client for the backup library's NBD source and target: fixed
// newstyle handshake with NBD_OPT_GO, then simple replies (no structured
// replies are requested), with requests pipelined by handle. Written from
// the protocol spec (doc/proto.md in the NBD project). Only what backup and
// restore need: READ, WRITE, WRITE_ZEROES, FLUSH, DISC.
//
// URIs (the NBD URI spec): nbd://HOST[:PORT]/EXPORT and
// nbd+unix:///EXPORT?socket=PATH.
import * as net from 'node:net';
import { NbdError } from '../errors';

const NBDMAGIC = 0x4e42444d41474943n;
const IHAVEOPT = 0x49484156454f5054n;
const OPT_REPLY_MAGIC = 0x0003e889045565a9n;
const REQUEST_MAGIC = 0x25609513;
const SIMPLE_REPLY_MAGIC = 0x67446698;
const FLAG_FIXED_NEWSTYLE = 1;
const FLAG_NO_ZEROES = 2;
const OPT_GO = 7;
const REP_ACK = 1;
const REP_INFO = 3;
const INFO_EXPORT = 0;

export const CMD = { READ: 0, WRITE: 1, DISC: 2, FLUSH: 3, WRITE_ZEROES: 6 } as const;
export const TFLAG = { READ_ONLY: 2, SEND_FLUSH: 4, SEND_WRITE_ZEROES: 64 } as const;

/** Largest payload per request: well under every server's limit (32 MiB is common). */
export const MAX_REQUEST = 4 * 1024 * 1024;

export interface NbdAddress {
  socket?: string;
  host?: string;
  port?: number;
  exportName: string;
}

export function parseNbdUri(uri: string): NbdAddress {
  let u: URL;
  try {
    u = new URL(uri);
  } catch {
    throw new NbdError('BAD_ARGUMENT', `bad NBD URI ${JSON.stringify(uri)}`);
  }
  const exportName = decodeURIComponent(u.pathname.replace(/^\//, ''));
  if (u.protocol === 'nbd+unix:') {
    const socket = u.searchParams.get('socket');
    if (!socket) throw new NbdError('BAD_ARGUMENT', `${uri}: nbd+unix URIs need ?socket=PATH`);
    return { socket, exportName };
  }
  if (u.protocol === 'nbd:') return { host: u.hostname || 'localhost', port: u.port ? Number(u.port) : 10809, exportName };
  throw new NbdError('BAD_ARGUMENT', `unsupported NBD URI ${JSON.stringify(uri)} (nbd:// or nbd+unix://)`);
}

interface Pending {
  readLength: number;
  resolve: (data: Buffer) => void;
  reject: (err: Error) => void;
}

export class NbdClient {
  readonly size: number;
  readonly flags: number;
  private readonly sock: net.Socket;
  private readonly pending = new Map<bigint, Pending>();
  private nextHandle = 1n;
  private buf: Buffer = Buffer.alloc(0);
  private failed: Error | undefined;
  private readonly where: string;

  private constructor(sock: net.Socket, size: number, flags: number, where: string) {
    this.sock = sock;
    this.size = size;
    this.flags = flags;
    this.where = where;
    sock.on('data', (d: Buffer) => this.onData(d));
    const fail = (err: Error) => {
      this.failed ??= err;
      for (const p of this.pending.values()) p.reject(err);
      this.pending.clear();
    };
    sock.on('error', (e) => fail(new NbdError('NBD_IO_ERROR', `${where}: ${e.message}`, { cause: e })));
    sock.on('close', () => fail(new NbdError('NBD_IO_ERROR', `${where}: the server closed the connection`)));
  }

  static async connect(uri: string): Promise<NbdClient> {
    const addr = parseNbdUri(uri);
    const sock = addr.socket ? net.createConnection(addr.socket) : net.createConnection(addr.port!, addr.host);
    sock.setNoDelay(true);
    // Handshake: read exactly what each step needs.
    let inbox = Buffer.alloc(0);
    let waiter: (() => void) | undefined;
    let error: Error | undefined;
    const onData = (d: Buffer) => {
      inbox = Buffer.concat([inbox, d]);
      waiter?.();
    };
    const onErr = (e: Error) => {
      error = e;
      waiter?.();
    };
    sock.on('data', onData);
    sock.on('error', onErr);
    sock.on('close', () => onErr(new Error('connection closed during the handshake')));
    const need = async (n: number): Promise<Buffer> => {
      while (inbox.length < n) {
        if (error) throw new NbdError('NBD_CONNECT_FAILED', `${uri}: ${error.message}`, { cause: error });
        await new Promise<void>((r) => (waiter = r));
        waiter = undefined;
      }
      const out = inbox.subarray(0, n);
      inbox = inbox.subarray(n);
      return out;
    };
    try {
      const hello = await need(18);
      if (hello.readBigUInt64BE(0) !== NBDMAGIC || hello.readBigUInt64BE(8) !== IHAVEOPT) throw new NbdError('NBD_CONNECT_FAILED', `${uri}: not a fixed-newstyle NBD server`);
      const hflags = hello.readUInt16BE(16);
      if (!(hflags & FLAG_FIXED_NEWSTYLE)) throw new NbdError('NBD_CONNECT_FAILED', `${uri}: the server does not speak fixed newstyle`);
      const cflags = Buffer.alloc(4);
      cflags.writeUInt32BE(FLAG_FIXED_NEWSTYLE | (hflags & FLAG_NO_ZEROES));
      const name = Buffer.from(addr.exportName);
      const opt = Buffer.alloc(16 + 4 + name.length + 2);
      opt.writeBigUInt64BE(IHAVEOPT, 0);
      opt.writeUInt32BE(OPT_GO, 8);
      opt.writeUInt32BE(4 + name.length + 2, 12);
      opt.writeUInt32BE(name.length, 16);
      name.copy(opt, 20);
      opt.writeUInt16BE(0, 20 + name.length);
      sock.write(Buffer.concat([cflags, opt]));
      let size = -1;
      let tflags = 0;
      for (;;) {
        const h = await need(20);
        if (h.readBigUInt64BE(0) !== OPT_REPLY_MAGIC) throw new NbdError('NBD_CONNECT_FAILED', `${uri}: bad option reply`);
        const type = h.readUInt32BE(12);
        const data = await need(h.readUInt32BE(16));
        if (type === REP_ACK) break;
        if (type & 0x80000000) {
          throw new NbdError('EXPORT_NOT_FOUND', `${uri}: the server refused export ${JSON.stringify(addr.exportName)} (${data.subarray(0).toString('utf8') || `error 0x${type.toString(16)}`})`);
        }
        if (type === REP_INFO && data.length >= 12 && data.readUInt16BE(0) === INFO_EXPORT) {
          size = Number(data.readBigUInt64BE(2));
          tflags = data.readUInt16BE(10);
        }
      }
      if (size < 0) throw new NbdError('NBD_CONNECT_FAILED', `${uri}: the server sent no export size`);
      sock.off('data', onData);
      sock.removeAllListeners('error');
      sock.removeAllListeners('close');
      const c = new NbdClient(sock, size, tflags, uri);
      if (inbox.length) c.onData(inbox);
      return c;
    } catch (err) {
      sock.destroy();
      if (err instanceof NbdError) throw err;
      throw new NbdError('NBD_CONNECT_FAILED', `${uri}: ${(err as Error).message}`, { cause: err });
    }
  }

  private onData(d: Buffer): void {
    this.buf = this.buf.length ? Buffer.concat([this.buf, d]) : d;
    for (;;) {
      if (this.buf.length < 16) return;
      if (this.buf.readUInt32BE(0) !== SIMPLE_REPLY_MAGIC) {
        this.sock.destroy(new Error('bad reply magic'));
        return;
      }
      const error = this.buf.readUInt32BE(4);
      const handle = this.buf.readBigUInt64BE(8);
      const p = this.pending.get(handle);
      if (!p) {
        this.sock.destroy(new Error(`reply to unknown handle ${handle}`));
        return;
      }
      const len = error === 0 ? p.readLength : 0;
      if (this.buf.length < 16 + len) return;
      const data = Buffer.from(this.buf.subarray(16, 16 + len));
      this.buf = this.buf.subarray(16 + len);
      this.pending.delete(handle);
      if (error) p.reject(new NbdError('NBD_IO_ERROR', `${this.where}: the server answered error ${error}`));
      else p.resolve(data);
    }
  }

  private request(type: number, offset: number, length: number, payload?: Buffer): Promise<Buffer> {
    if (this.failed) return Promise.reject(this.failed);
    const handle = this.nextHandle++;
    const h = Buffer.alloc(28);
    h.writeUInt32BE(REQUEST_MAGIC, 0);
    h.writeUInt16BE(0, 4);
    h.writeUInt16BE(type, 6);
    h.writeBigUInt64BE(handle, 8);
    h.writeBigUInt64BE(BigInt(offset), 16);
    h.writeUInt32BE(length, 24);
    return new Promise((resolve, reject) => {
      this.pending.set(handle, { readLength: type === CMD.READ ? length : 0, resolve, reject });
      this.sock.write(payload ? Buffer.concat([h, payload]) : h);
    });
  }

  async read(offset: number, buf: Buffer): Promise<void> {
    const parts: Promise<void>[] = [];
    for (let o = 0; o < buf.length; o += MAX_REQUEST) {
      const n = Math.min(MAX_REQUEST, buf.length - o);
      parts.push(this.request(CMD.READ, offset + o, n).then((d) => void d.copy(buf, o)));
    }
    await Promise.all(parts);
  }

  async write(offset: number, data: Buffer): Promise<void> {
    const parts: Promise<Buffer>[] = [];
    for (let o = 0; o < data.length; o += MAX_REQUEST) parts.push(this.request(CMD.WRITE, offset + o, Math.min(MAX_REQUEST, data.length - o), data.subarray(o, o + MAX_REQUEST)));
    await Promise.all(parts);
  }

  /** WRITE_ZEROES where the export has it, else writes of zero buffers. */
  async zero(offset: number, length: number): Promise<void> {
    const step = this.flags & TFLAG.SEND_WRITE_ZEROES ? 32 * 1024 * 1024 : MAX_REQUEST;
    const zeros = this.flags & TFLAG.SEND_WRITE_ZEROES ? undefined : Buffer.alloc(MAX_REQUEST);
    const parts: Promise<Buffer>[] = [];
    for (let o = 0; o < length; o += step) {
      const n = Math.min(step, length - o);
      parts.push(zeros ? this.request(CMD.WRITE, offset + o, n, zeros.subarray(0, n)) : this.request(CMD.WRITE_ZEROES, offset + o, n));
    }
    await Promise.all(parts);
  }

  async flush(): Promise<void> {
    if (this.flags & TFLAG.SEND_FLUSH) await this.request(CMD.FLUSH, 0, 0);
  }

  async close(): Promise<void> {
    if (!this.failed && !this.sock.destroyed) {
      const h = Buffer.alloc(28);
      h.writeUInt32BE(REQUEST_MAGIC, 0);
      h.writeUInt16BE(CMD.DISC, 6);
      this.sock.end(h);
    }
    this.failed ??= new NbdError('NBD_IO_ERROR', `${this.where}: closed`);
    await new Promise<void>((r) => (this.sock.destroyed ? r() : this.sock.once('close', () => r())));
  }
}
