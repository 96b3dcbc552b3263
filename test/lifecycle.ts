// Server lifecycle through the real CLI: signals with writes in flight,
// listen conflicts, stale sockets, connection limits, clean disconnects.
import t from 'tap';
import * as crypto from 'node:crypto';
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as path from 'node:path';
import { exec } from './fixtures/exec';
import { isAlive, sleep } from './fixtures/proc';
import { NBD, RawClient } from './fixtures/raw-client';
import { CLI, makeTempDir, startServer } from './fixtures/server';
import { requireTools } from './fixtures/tools';

const MiB = 1024 * 1024;
const BLOCK = 64 * 1024;


/** Deterministic 64 KiB content for block k. */
function pattern(k: number): Buffer {
  const seed = crypto.createHash('sha256').update(`block-${k}`).digest();
  const b = Buffer.alloc(BLOCK);
  for (let i = 0; i < BLOCK; i += seed.length) seed.copy(b, i);
  b.writeUInt32BE(k, 0);
  return b;
}

const SMALL = 4096;
/** Deterministic 4 KiB content for block k. */
function small(k: number): Buffer {
  return pattern(k).subarray(0, SMALL);
}

function waitExit(proc: import('node:child_process').ChildProcess, ms: number): Promise<number | null | 'timeout'> {
  if (proc.exitCode !== null || proc.signalCode !== null) return Promise.resolve(proc.exitCode);
  return new Promise((resolve) => {
    const timer = setTimeout(() => resolve('timeout'), ms);
    proc.once('exit', (code) => {
      clearTimeout(timer);
      resolve(code);
    });
  });
}

/** Runs the CLI to completion. */
function runCli(args: string[], cwd: string, timeoutMs = 20_000) {
  return exec(process.execPath, [CLI, ...args], { timeoutMs, env: { ...process.env } }).then((r) => ({ ...r, cwd }));
}

for (const signal of ['SIGTERM', 'SIGINT'] as const) {
  t.test(`${signal} with many FUA writes in flight: exit 0, every acknowledged write is in the file`, async (t) => {
    const blocks = 8192; // 4 KiB FUA writes: slow enough to queue up at the server
    const srv = await startServer({ size: '128M' });
    const c = await RawClient.connect(srv.socket);
    await c.go('disk');
    const cookieBlock = new Map<bigint, number>();
    const acked: number[] = [];
    const failed: number[] = [];
    let sent = 0;
    let replied = 0;
    let signalled = false;
    let ackedBeforeSignal = 0;
    let inflightAtSignal = 0;
    let wake: (() => void) | undefined;
    const MAX_INFLIGHT = 256;

    const reader = (async () => {
      for (;;) {
        let r;
        try {
          r = await c.readReply();
        } catch {
          break;
        }
        replied++;
        const k = cookieBlock.get(r.cookie);
        if (k === undefined) continue;
        if (r.error === 0) acked.push(k);
        else failed.push(r.error);
        wake?.();
      }
      wake?.();
    })();

    // Requests go out in batches of 64 in one write, so many are queued at
    // the server at any moment. Once 300 are acknowledged the client stops
    // sending (writing to a socket the server has shut for reading would get
    // EPIPE and lose the replies still coming) and the signal goes out while
    // the last batches are still being served: it is sent only at a moment
    // when the client holds unanswered requests (checked in the same
    // synchronous step as the kill), else one more batch goes out first.
    const writer = (async () => {
      const BATCH = 64;
      for (let k = 0; k < blocks && !c.isClosed; ) {
        while (sent - replied >= MAX_INFLIGHT - BATCH && !c.isClosed) await new Promise<void>((r) => (wake = r));
        if (acked.length >= 300 && sent > replied) {
          signalled = true;
          ackedBeforeSignal = acked.length;
          inflightAtSignal = sent - replied;
          srv.proc.kill(signal);
          return;
        }
        const parts: Buffer[] = [];
        const first = k;
        for (; k < Math.min(blocks, first + BATCH); k++) {
          const cookie = BigInt(1000 + k);
          cookieBlock.set(cookie, k);
          const h = Buffer.alloc(28);
          h.writeUInt32BE(NBD.REQUEST_MAGIC, 0);
          h.writeUInt16BE(NBD.CMD_FLAG_FUA, 4);
          h.writeUInt16BE(NBD.CMD_WRITE, 6);
          h.writeBigUInt64BE(cookie, 8);
          h.writeBigUInt64BE(BigInt(k * SMALL), 16);
          h.writeUInt32BE(SMALL, 24);
          parts.push(h, small(k));
        }
        sent += k - first;
        await c.send(Buffer.concat(parts));
      }
    })();

    const code = await waitExit(srv.proc, 30_000);
    t.equal(code, 0, `server exits 0 after ${signal}`);
    await writer;
    c.destroy();
    await reader;
    t.ok(signalled, `the signal was sent with writes in flight`);
    t.ok(inflightAtSignal > 0, `${inflightAtSignal} writes were in flight at the signal`);
    t.ok(ackedBeforeSignal >= 300, `${ackedBeforeSignal} writes acknowledged before the signal`);
    t.comment(`sent ${sent}, acknowledged ${acked.length}, refused ${failed.length} (${[...new Set(failed)].join(',')})`);
    t.ok(failed.every((e) => e === NBD.ESHUTDOWN), 'writes refused during shutdown (if any) got ESHUTDOWN');
    t.equal(acked.length + failed.length, sent, 'every write sent before the signal was answered (in-flight requests finished)');

    const image = fs.readFileSync(path.join(srv.dir, 'disk.img'));
    const bad = acked.filter((k) => !image.subarray(k * SMALL, (k + 1) * SMALL).equals(small(k)));
    t.same(bad.slice(0, 10), [], `all ${acked.length} acknowledged writes are in the image file`);
    t.equal(image.length, 128 * MiB, 'image size unchanged');
    t.notOk(fs.existsSync(srv.socket), 'the socket file was removed');
  });
}

t.test('signal with idle and half-negotiated clients: prompt exit 0', async (t) => {
  const srv = await startServer({ size: '16M' });
  const idle = await RawClient.connect(srv.socket);
  await idle.go('disk');
  const half = await RawClient.connect(srv.socket);
  await half.handshake();
  const greeted = await RawClient.connect(srv.socket); // never sends anything
  await greeted.readGreeting(); // the server has taken it on
  // Prompt: the server does not wait for these clients (the drain would
  // otherwise last its 30 s timeout); the bound below only stops a hang.
  const start = Date.now();
  srv.proc.kill('SIGTERM');
  const code = await waitExit(srv.proc, 25_000);
  t.equal(code, 0, 'exit 0, without waiting for the drain timeout');
  t.comment(`exited ${Date.now() - start} ms after the signal`);
  t.ok(await idle.waitClosed(30_000), 'idle transmission client was disconnected');
  t.ok(await half.waitClosed(30_000), 'half-negotiated client was disconnected');
  t.ok(await greeted.waitClosed(30_000), 'silent client was disconnected');
  for (const c of [idle, half, greeted]) c.destroy();
});

t.test('second signal while draining a stuck client: exits without waiting', async (t) => {
  const srv = await startServer({ size: '64M' });
  const c = await RawClient.connect(srv.socket);
  await c.go('disk');
  // Fill the image so reads carry data, then ask for far more than the socket buffers hold, and never read.
  c.sock.pause();
  const reqs: Buffer[] = [];
  for (let i = 0; i < 128; i++) {
    const h = Buffer.alloc(28);
    h.writeUInt32BE(NBD.REQUEST_MAGIC, 0);
    h.writeUInt16BE(NBD.CMD_READ, 6);
    h.writeBigUInt64BE(BigInt(i + 1), 8);
    h.writeBigUInt64BE(BigInt((i % 32) * MiB), 16);
    h.writeUInt32BE(MiB, 24);
    reqs.push(h);
  }
  await c.send(Buffer.concat(reqs));
  await sleep(300);
  srv.proc.kill('SIGTERM');
  const first = await waitExit(srv.proc, 1500);
  if (first !== 'timeout') {
    t.equal(first, 0, 'server gave up on the stuck client and exited 0');
  } else {
    t.pass('server is draining the stuck client');
    srv.proc.kill('SIGINT');
    // 130 comes only from the second-signal path; a server that ignored it
    // would exit 0 when its 30 s drain timeout ends, so no time bound is needed.
    const t0 = Date.now();
    const second = await waitExit(srv.proc, 120_000);
    t.equal(second, 130, 'second signal: exit 130, without waiting for the drain');
    t.comment(`server exited ${second} ${Date.now() - t0} ms after the second signal`);
  }
  c.destroy();
  if (isAlive(srv.proc.pid!)) srv.proc.kill('SIGKILL');
});

t.test('a second server on the same unix socket fails with LISTEN_FAILED, the first keeps serving', async (t) => {
  const srv = await startServer({ size: '16M', tcp: true });
  try {
    const w = await RawClient.connect(srv.socket);
    await w.go('disk');
    const data = crypto.randomBytes(65536);
    t.equal((await w.write(0, data)).error, 0, 'first server accepts a write');

    const other = makeTempDir();
    fs.writeFileSync(path.join(other, 'x.img'), Buffer.alloc(MiB));
    const r = await runCli(['serve', path.join(other, 'x.img'), '--socket', srv.socket], other);
    t.equal(r.code, 4, `exit 4 (stderr: ${r.stderr.trim()})`);
    t.match(r.stderr, /\[LISTEN_FAILED\]/, 'LISTEN_FAILED code');
    t.match(r.stderr, srv.socket, 'message names the socket path');
    t.notMatch(r.stdout, /"ready"/, 'never reported ready');

    const port = srv.ready.ports[0]!;
    const r2 = await runCli(['serve', path.join(other, 'x.img'), '--listen', `127.0.0.1:${port}`], other);
    t.equal(r2.code, 4, `same TCP port: exit 4 (stderr: ${r2.stderr.trim()})`);
    t.match(r2.stderr, /\[LISTEN_FAILED\]/, 'LISTEN_FAILED code');

    t.ok(fs.existsSync(srv.socket), 'the first server socket file still exists');
    t.ok(isAlive(srv.proc.pid!), 'the first server is alive');
    const c = await RawClient.connect(srv.socket);
    await c.go('disk');
    const back = await c.read(0, 65536);
    t.ok(back.data?.equals(data), 'a new client on the first server reads the data');
    await c.disconnect();
    const back2 = await w.read(0, 65536);
    t.ok(back2.data?.equals(data), 'the existing client still works');
    await w.disconnect();
  } finally {
    t.equal(await srv.stop(), 0, 'first server exits 0');
  }
});

t.test('stale socket left by a SIGKILLed server is replaced on restart', async (t) => {
  const dir = makeTempDir();
  const srv = await startServer({ dir, size: '16M' });
  const c = await RawClient.connect(srv.socket);
  await c.go('disk');
  const data = crypto.randomBytes(65536);
  t.equal((await c.write(4096, data)).error, 0, 'write');
  t.equal((await c.cmd(NBD.CMD_FLUSH, 0, 0, 0)).error, 0, 'flush');
  c.destroy();
  srv.proc.kill('SIGKILL');
  await waitExit(srv.proc, 60_000);
  t.ok(fs.lstatSync(srv.socket).isSocket(), 'the socket file was left behind');

  const again = await startServer({ dir });
  try {
    const d = await RawClient.connect(again.socket);
    const go = await d.go('disk');
    t.equal(go.size, BigInt(16 * MiB), 'restarted server serves the image');
    const r = await d.read(4096, 65536);
    t.ok(r.data?.equals(data), 'flushed data survived the SIGKILL');
    await d.disconnect();
    if (requireTools(t, ['nbdinfo'])) {
      const info = await exec('nbdinfo', ['--size', again.uri('disk')], { timeoutMs: 30_000 });
      t.equal(info.stdout.trim(), String(16 * MiB), 'nbdinfo --size on the restarted server');
    }
  } finally {
    t.equal(await again.stop(), 0, 'exit 0');
  }
});

t.test('a non-socket file at the socket path is never deleted', async (t) => {
  const dir = makeTempDir();
  const sock = path.join(dir, 'nbd.sock');
  fs.writeFileSync(sock, 'precious');
  fs.writeFileSync(path.join(dir, 'disk.img'), Buffer.alloc(MiB));
  const r = await runCli(['serve', path.join(dir, 'disk.img'), '--socket', sock], dir);
  t.equal(r.code, 4, `exit 4 (stderr: ${r.stderr.trim()})`);
  t.match(r.stderr, /\[LISTEN_FAILED\]/, 'LISTEN_FAILED');
  t.equal(fs.readFileSync(sock, 'utf8'), 'precious', 'the file is untouched');
});

t.test('--max-connections: extra connections are refused, slots are reused', async (t) => {
  const srv = await startServer({ size: '16M', args: ['--max-connections', '2'] });
  try {
    const a = await RawClient.connect(srv.socket);
    await a.go('disk');
    const b = await RawClient.connect(srv.socket);
    await b.go('disk');
    const c = await RawClient.connect(srv.socket);
    t.ok(await c.waitClosed(60_000), 'third connection is closed');
    t.equal(c.available, 0, 'without a greeting');
    c.destroy();
    t.equal((await a.read(0, 4096)).error, 0, 'first client still served');
    await a.disconnect();
    // The server frees the slot when its connection threads have wound down:
    // connect until one is greeted (refused ones are closed without a greeting).
    let d: RawClient | undefined;
    for (const end = Date.now() + 60_000; !d; ) {
      const x = await RawClient.connect(srv.socket);
      try {
        await x.readGreeting();
        d = x;
      } catch {
        x.destroy();
        if (Date.now() > end) throw new Error('no connection was accepted within 60 s after a slot was freed');
        await sleep(50);
      }
    }
    await d.sendClientFlags(NBD.FLAG_C_FIXED_NEWSTYLE | NBD.FLAG_C_NO_ZEROES);
    const go = await d.go('disk', { skipHandshake: true });
    t.equal(go.size, BigInt(16 * MiB), 'a freed slot accepts a new client');
    await d.disconnect();
    await b.disconnect();
  } finally {
    t.equal(await srv.stop(), 0, 'exit 0');
  }
});

t.test('NBD_CMD_DISC behind pipelined writes: every write is answered and applied', async (t) => {
  const srv = await startServer({ size: '16M' });
  try {
    const c = await RawClient.connect(srv.socket);
    await c.go('disk', { structured: true });
    const reqs: Buffer[] = [];
    for (let k = 0; k < 64; k++) {
      const h = Buffer.alloc(28);
      h.writeUInt32BE(NBD.REQUEST_MAGIC, 0);
      h.writeUInt16BE(NBD.CMD_WRITE, 6);
      h.writeBigUInt64BE(BigInt(k + 1), 8);
      h.writeBigUInt64BE(BigInt(k * BLOCK), 16);
      h.writeUInt32BE(BLOCK, 24);
      reqs.push(h, pattern(k));
    }
    const disc = Buffer.alloc(28);
    disc.writeUInt32BE(NBD.REQUEST_MAGIC, 0);
    disc.writeUInt16BE(NBD.CMD_DISC, 6);
    disc.writeBigUInt64BE(999n, 8);
    await c.send(Buffer.concat([...reqs, disc]));
    const cookies = new Set<bigint>();
    for (let i = 0; i < 64; i++) {
      const r = await c.readReply().catch(() => undefined);
      if (!r) break;
      if (r.error === 0) cookies.add(r.cookie);
    }
    t.equal(cookies.size, 64, 'all 64 writes before DISC were acknowledged');
    t.ok(await c.waitClosed(60_000), 'then the server closed the connection');
    t.equal(c.available, 0, 'no reply to NBD_CMD_DISC');
    c.destroy();
    const d = await RawClient.connect(srv.socket);
    await d.go('disk');
    const r = await d.read(0, 64 * BLOCK);
    let ok = true;
    for (let k = 0; k < 64; k++) if (!r.data!.subarray(k * BLOCK, (k + 1) * BLOCK).equals(pattern(k))) ok = false;
    t.ok(ok, 'all 64 writes are readable');
    await d.disconnect();
  } finally {
    t.equal(await srv.stop(), 0, 'exit 0');
  }
});

t.test('clean stop removes the socket and refuses new connections', async (t) => {
  const srv = await startServer({ size: '16M' });
  t.equal(await srv.stop('SIGTERM'), 0, 'exit 0');
  t.notOk(fs.existsSync(srv.socket), 'socket file removed');
  const err = await new Promise<string>((resolve) => {
    const s = net.connect(srv.socket);
    s.on('connect', () => {
      s.destroy();
      resolve('connected');
    });
    s.on('error', (e: NodeJS.ErrnoException) => resolve(e.code ?? 'error'));
  });
  t.equal(err, 'ENOENT', 'connecting afterwards fails');
});

