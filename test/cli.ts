// The command line (help, argument errors, exit codes, image handling, export
// naming) and the typed embedding API.
import t, { type Test } from 'tap';
import * as crypto from 'node:crypto';
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as path from 'node:path';
import { exec, type ExecResult } from './fixtures/exec';
import { sleep, waitFor } from './fixtures/proc';
import { NBD, RawClient } from './fixtures/raw-client';
import { CLI, makeTempDir, ROOT, startServer } from './fixtures/server';
import { requireTools } from './fixtures/tools';
import type * as Api from '../src/index';

const MiB = 1024 * 1024;

function cli(args: string[]): Promise<ExecResult> {
  return exec(process.execPath, [CLI, ...args], { timeoutMs: 30_000 });
}

/** Asserts a CLI failure: exit code, `[CODE]`, and no readiness line. */
function expectFailure(tt: Test, r: ExecResult, exit: number, code: string | null, what: string): void {
  tt.equal(r.code, exit, `${what}: exit ${exit} (stderr: ${r.stderr.trim().split('\n').at(-1)})`);
  if (code) tt.match(r.stderr, `node-nbd-server: error: `, `${what}: error line`);
  if (code) tt.match(r.stderr, `[${code}]`, `${what}: [${code}]`);
  tt.notMatch(r.stdout, /"ready"/, `${what}: never became ready`);
}

// ---- Help and usage errors --------------------------------------------------------

t.test('--help for the program and for serve', async (t) => {
  const top = await cli(['--help']);
  t.equal(top.code, 0, 'program --help exits 0');
  t.match(top.stdout, /Usage: node-nbd-server/, 'usage line');
  t.match(top.stdout, /\bserve\b/, 'lists the serve command');

  for (const args of [['serve', '--help'], ['help', 'serve']]) {
    const r = await cli(args);
    t.equal(r.code, 0, `${args.join(' ')} exits 0`);
    for (const opt of ['--size', '--socket', '--listen', '--read-only', '--log-level', '--threads', '--max-connections']) {
      t.match(r.stdout, opt, `${args.join(' ')} mentions ${opt}`);
    }
    t.match(r.stdout, /<image\.\.\.>/, 'shows the image argument');
  }
  const v = await cli(['--version']);
  t.equal(v.code, 0, '--version exits 0');
  const pkg = JSON.parse(fs.readFileSync(path.join(ROOT, 'package.json'), 'utf8')) as { version: string };
  t.equal(v.stdout.trim(), pkg.version, '--version prints the package version');
});

t.test('usage errors exit 2', async (t) => {
  const dir = makeTempDir();
  const img = path.join(dir, 'x.img');
  const sock = path.join(dir, 's.sock');
  const cases: [string, string[]][] = [
    ['unknown option', ['serve', img, '--size', '1M', '--socket', sock, '--bogus']],
    ['unknown command', ['frobnicate']],
    ['missing image argument', ['serve', '--socket', sock]],
    ['--threads 0', ['serve', img, '--size', '1M', '--socket', sock, '--threads', '0']],
    ['--threads abc', ['serve', img, '--size', '1M', '--socket', sock, '--threads', 'abc']],
    ['--max-connections -3', ['serve', img, '--size', '1M', '--socket', sock, '--max-connections=-3']],
    ['bad --log-level', ['serve', img, '--size', '1M', '--socket', sock, '--log-level', 'loud']],
    ['--size without a value', ['serve', img, '--socket', sock, '--size']],
  ];
  for (const [what, args] of cases) {
    const r = await cli(args);
    expectFailure(t, r, 2, null, what);
    t.ok(r.stderr.length > 0, `${what}: says why on stderr`);
  }
  t.match((await cli(['serve', img, '--bogus'])).stderr, /--bogus/, 'the unknown option is named');
  t.notOk(fs.existsSync(img), 'no image was created by a failed command line');
});

// ---- Images --------------------------------------------------------------------

t.test('missing image without --size: IMAGE_NOT_FOUND, exit 3, nothing created', async (t) => {
  const dir = makeTempDir();
  const img = path.join(dir, 'missing.img');
  const r = await cli(['serve', img, '--socket', path.join(dir, 's.sock')]);
  expectFailure(t, r, 3, 'IMAGE_NOT_FOUND', 'missing image');
  t.match(r.stderr, img, 'the message names the file');
  t.match(r.stderr, /--size/, 'and suggests --size');
  t.notOk(fs.existsSync(img), 'the image was not created');
  t.notOk(fs.existsSync(path.join(dir, 's.sock')), 'no socket left behind');

  const ro = await cli(['serve', img, '--size', '1M', '--read-only', '--socket', path.join(dir, 's.sock')]);
  expectFailure(t, ro, 3, 'IMAGE_NOT_FOUND', 'missing image with --read-only --size');
  t.notOk(fs.existsSync(img), 'a read-only export does not create the image');
});

t.test('--size creates a missing image sparse', async (t) => {
  const srv = await startServer({ images: ['new.img'], size: '3M' });
  try {
    const st = fs.statSync(path.join(srv.dir, 'new.img'));
    t.equal(st.size, 3 * MiB, 'created at the requested size');
    t.ok(st.blocks * 512 < MiB, `sparse (${st.blocks * 512} bytes allocated)`);
    const c = await RawClient.connect(srv.socket);
    t.equal((await c.go('new')).size, BigInt(3 * MiB), 'served at that size');
    await c.disconnect();
  } finally {
    t.equal(await srv.stop(), 0, 'exit 0');
  }
});

t.test('--size with an existing file never truncates or grows it', async (t) => {
  for (const [name, len] of [['odd.img', 3000], ['big.img', 2 * MiB + 512]] as const) {
    const dir = makeTempDir();
    const content = crypto.randomBytes(len);
    fs.writeFileSync(path.join(dir, name), content);
    const srv = await startServer({ dir, images: [name], size: '1M' });
    try {
      const c = await RawClient.connect(srv.socket);
      const go = await c.go(name.replace('.img', ''));
      t.equal(go.size, BigInt(len), `${name}: served at its own size ${len}, not 1M`);
      const r = await c.read(0, len);
      t.ok(r.data?.equals(content), `${name}: content served as is`);
      t.equal((await c.read(len - 1, 2)).error, NBD.EINVAL, `${name}: no bytes beyond the file`);
      await c.disconnect();
    } finally {
      t.equal(await srv.stop(), 0, `${name}: exit 0`);
    }
    const after = fs.readFileSync(path.join(dir, name));
    t.equal(after.length, len, `${name}: file size unchanged`);
    t.ok(after.equals(content), `${name}: file content unchanged`);
  }
});

t.test('bad --size values: BAD_SIZE, exit 2, nothing created', async (t) => {
  const dir = makeTempDir();
  const img = path.join(dir, 'x.img');
  for (const bad of ['abc', '0', '-1G', '1X', '1.3', '', '1e3', '99999999999T', '1G1']) {
    const r = await cli(['serve', img, `--size=${bad}`, '--socket', path.join(dir, 's.sock')]);
    expectFailure(t, r, 2, 'BAD_SIZE', `--size "${bad}"`);
    t.notOk(fs.existsSync(img), `--size "${bad}": no image created`);
  }
});

t.test('bad --listen: BAD_ARGUMENT, exit 2; unresolvable host: LISTEN_FAILED, exit 4', async (t) => {
  const dir = makeTempDir();
  const img = path.join(dir, 'x.img');
  for (const bad of ['nohost', '127.0.0.1:99999', '127.0.0.1:abc', '127.0.0.1:', '[::1]', '127.0.0.1:-1']) {
    const r = await cli(['serve', img, '--size', '1M', `--listen=${bad}`]);
    expectFailure(t, r, 2, 'BAD_ARGUMENT', `--listen "${bad}"`);
    t.match(r.stderr, bad, `--listen "${bad}": names the bad value`);
    t.notOk(fs.existsSync(img), `--listen "${bad}": no image created`);
  }
  fs.writeFileSync(img, Buffer.alloc(MiB));
  const r = await cli(['serve', img, '--listen', '256.1.2.3:10809']);
  expectFailure(t, r, 4, 'LISTEN_FAILED', 'unresolvable listen host');

  // A TCP port that is taken.
  const blocker = net.createServer();
  await new Promise<void>((resolve) => blocker.listen(0, '127.0.0.1', resolve));
  const port = (blocker.address() as net.AddressInfo).port;
  try {
    const taken = await cli(['serve', img, '--listen', `127.0.0.1:${port}`]);
    expectFailure(t, taken, 4, 'LISTEN_FAILED', 'port in use');
    t.match(taken.stderr, String(port), 'names the port');
  } finally {
    blocker.close();
  }
});

t.test('a directory as image: IMAGE_OPEN_FAILED, exit 3', async (t) => {
  const dir = makeTempDir();
  const sub = path.join(dir, 'adir.img');
  fs.mkdirSync(sub);
  for (const extra of [[], ['--size', '1M']]) {
    const r = await cli(['serve', sub, ...extra, '--socket', path.join(dir, 's.sock')]);
    expectFailure(t, r, 3, 'IMAGE_OPEN_FAILED', `directory ${extra.join(' ')}`);
    t.match(r.stderr, sub, 'the message names the directory');
    t.ok(fs.statSync(sub).isDirectory(), 'the directory is untouched');
  }
});

t.test('several images export under their basenames; the first is the default export', async (t) => {
  const dir = makeTempDir();
  const files: [string, string, number, number][] = [
    // file, export name, size, fill byte
    ['alpha.img', 'alpha', MiB, 0xaa],
    ['beta.raw', 'beta', 2 * MiB, 0xbb],
    ['gamma.v2.img', 'gamma.v2', 3 * MiB, 0xcc],
    ['noext', 'noext', 4 * MiB, 0xdd],
  ];
  for (const [f, , size, fill] of files) fs.writeFileSync(path.join(dir, f), Buffer.alloc(size, fill));
  const srv = await startServer({ dir, images: files.map((f) => f[0]) });
  try {
    t.same(srv.ready.exports, files.map((f) => f[1]), 'readiness line lists the exports in order');
    const c = await RawClient.connect(srv.socket);
    await c.handshake();
    const list = await c.option(NBD.OPT_LIST);
    const names = list
      .filter((r) => r.type === NBD.REP_SERVER)
      .map((r) => r.data.subarray(4, 4 + r.data.readUInt32BE(0)).toString());
    t.same(names, files.map((f) => f[1]), 'NBD_OPT_LIST names every export');
    for (const [, name, size] of files) {
      const info = await c.option(NBD.OPT_INFO, RawClient.infoPayload(name));
      const exp = info.find((r) => r.type === NBD.REP_INFO && r.data.readUInt16BE(0) === NBD.INFO_EXPORT);
      t.equal(exp && RawClient.parseInfoExport(exp.data).size, BigInt(size), `export "${name}" has its file's size`);
    }
    const def = await c.go('', { skipHandshake: true, infos: [NBD.INFO_NAME] });
    t.equal(def.size, BigInt(MiB), 'default export "" has the first image size');
    const nameInfo = def.infos.find((r) => r.data.readUInt16BE(0) === NBD.INFO_NAME);
    t.equal(nameInfo?.data.subarray(2).toString(), 'alpha', 'NBD_INFO_NAME of the default export is "alpha"');
    const r = await c.read(0, 4096);
    t.ok(r.data?.equals(Buffer.alloc(4096, 0xaa)), 'default export serves the first image');
    await c.disconnect();
    for (const [, name, , fill] of files.slice(1)) {
      const d = await RawClient.connect(srv.socket);
      await d.go(name);
      const rr = await d.read(0, 4096);
      t.ok(rr.data?.equals(Buffer.alloc(4096, fill)), `export "${name}" serves its own file`);
      await d.disconnect();
    }
    if (requireTools(t, ['nbdinfo'])) {
      const li = await exec('nbdinfo', ['--list', '--json', srv.uri()], { timeoutMs: 30_000 });
      t.equal(li.code, 0, `nbdinfo --list exits 0 ${li.stderr}`);
      const j = JSON.parse(li.stdout) as { exports: { 'export-name': string; 'export-size': number }[] };
      t.same(
        j.exports.map((e) => [e['export-name'], e['export-size']]),
        files.map((f) => [f[1], f[2]]),
        'nbdinfo --list sees every export and size',
      );
    }
  } finally {
    t.equal(await srv.stop(), 0, 'exit 0');
  }
});

t.test('two images with the same export name: clear error', async (t) => {
  const dir = makeTempDir();
  fs.mkdirSync(path.join(dir, 'd1'));
  fs.mkdirSync(path.join(dir, 'd2'));
  const a = path.join(dir, 'd1', 'disk.img');
  const b = path.join(dir, 'd2', 'disk.img');
  fs.writeFileSync(a, Buffer.alloc(MiB));
  fs.writeFileSync(b, Buffer.alloc(MiB));
  const c = path.join(dir, 'd2', 'disk.raw');
  fs.writeFileSync(c, Buffer.alloc(MiB));
  for (const [what, imgs] of [['same basename in two dirs', [a, b]], ['disk.img and disk.raw', [a, c]]] as const) {
    const r = await cli(['serve', ...imgs, '--socket', path.join(dir, 's.sock')]);
    expectFailure(t, r, 2, 'EXPORT_EXISTS', what);
    t.match(r.stderr, /"disk"|'disk'/, `${what}: names the clashing export`);
    t.notOk(fs.existsSync(path.join(dir, 's.sock')), `${what}: no socket left behind`);
  }
});

// ---- Typed API -----------------------------------------------------------------

type ApiModule = typeof Api;

/** The package API from the TypeScript sources, falling back to the build. */
async function loadApi(): Promise<{ api: ApiModule; from: string; srcError?: string }> {
  try {
    return { api: (await import('../src/index')) as ApiModule, from: 'src' };
  } catch (err) {
    // eslint-disable-next-line @typescript-eslint/no-require-imports
    return { api: require(path.join(ROOT, 'dist', 'src', 'index.js')) as ApiModule, from: 'dist', srcError: (err as Error).message };
  }
}

t.test("typed API loads from the TypeScript sources ('../src/index')", async (t) => {
  const { from, srcError } = await loadApi();
  t.equal(from, 'src', `src/index loads the native addon${srcError ? ` (error: ${srcError})` : ''}`);
});

t.test("the CLI program builds from the TypeScript sources ('../src/cli/main')", async (t) => {
  // Same layout assumption as the addon loader: a path relative to dist/src/... breaks from src/.
  let version: string | undefined;
  let error: string | undefined;
  try {
    const main = (await import('../src/cli/main')) as { buildProgram: () => { version(): string | undefined } };
    version = main.buildProgram().version();
  } catch (err) {
    error = (err as Error).message.split('\n')[0];
  }
  const pkg = JSON.parse(fs.readFileSync(path.join(ROOT, 'package.json'), 'utf8')) as { version: string };
  t.equal(version, pkg.version, `buildProgram() works from src and reports the package version${error ? ` (error: ${error})` : ''}`);
});

t.test('typed API: serve() in-process, raw client I/O, stats(), close()', async (t) => {
  const { api, from } = await loadApi();
  t.comment(`API loaded from ${from}`);
  const dir = makeTempDir();
  const img = path.join(dir, 'api.img');
  const socket = path.join(dir, 'api.sock');
  const { server, ports } = await api.serve({ images: [img], size: 4 * MiB, socket });
  t.same(ports, [], 'no TCP ports');
  t.same(
    server.exports().map((e) => [e.name, e.size, e.created, e.readOnly]),
    [['api', 4 * MiB, true, false]],
    'exports()',
  );
  const events: string[] = [];
  server.on('event', (ev: { type: string; export: string }) => events.push(`${ev.type}:${ev.export}`));
  const c = await RawClient.connect(socket);
  await c.go('api', { structured: true });
  const data = crypto.randomBytes(3 * 65536);
  for (let i = 0; i < 3; i++) t.equal((await c.write(i * 65536, data.subarray(i * 65536, (i + 1) * 65536))).error, 0, `write ${i}`);
  const r1 = await c.read(0, 65536);
  const r2 = await c.read(65536, 2 * 65536);
  t.ok(r1.data?.equals(data.subarray(0, 65536)) && r2.data?.equals(data.subarray(65536)), 'reads return the writes');
  t.equal((await c.read(4 * MiB, 1)).error, NBD.EINVAL, 'one refused read');
  const st = server.stats();
  const e = st.exports.api!;
  t.equal(e.writes, 3, 'stats: 3 writes');
  t.equal(e.reads, 2, 'stats: 2 reads');
  t.equal(e.bytesWritten, 3 * 65536, 'stats: bytes written');
  t.equal(e.bytesRead, 3 * 65536, 'stats: bytes read');
  t.equal(e.errors, 1, 'stats: 1 error');
  t.equal(e.size, 4 * MiB, 'stats: size');
  t.equal(e.connectionsActive, 1, 'stats: 1 active connection');
  t.equal(st.connectionsActive, 1, 'server stats: 1 active connection');
  await c.disconnect();
  // The server retires the connection and queues the event on its own threads: wait for that state.
  await waitFor(() => server.stats().exports.api!.connectionsActive === 0 && events.includes('disconnect:api'), 60_000);
  t.equal(server.stats().exports.api!.connectionsActive, 0, 'stats: connection gone after disconnect');
  t.ok(events.includes('connect:api') && events.includes('disconnect:api'), `connect/disconnect events (${events.join(', ')})`);

  let closedEvent = false;
  server.once('close', () => (closedEvent = true));
  await t.resolves(server.close(), 'close() resolves');
  t.ok(closedEvent, "'close' event");
  await t.resolves(server.close(), 'close() again resolves (idempotent)');
  t.notOk(fs.existsSync(socket), 'socket removed');
  t.throws(() => server.addImage({ path: img }), { code: 'SERVER_CLOSED' }, 'addImage after close: SERVER_CLOSED');
  t.ok(fs.readFileSync(img).subarray(0, 3 * 65536).equals(data), 'the writes are in the image file');
});

t.test('typed API: NbdServer directly — errors and handshake timeout', async (t) => {
  const { api } = await loadApi();
  const dir = makeTempDir();
  const empty = new api.NbdServer();
  empty.listenUnix(path.join(dir, 'e.sock'));
  t.throws(() => empty.start(), { code: 'START_FAILED' }, 'start() without exports: START_FAILED');
  await empty.close();
  const s = new api.NbdServer({ handshakeTimeoutMs: 300 });
  t.throws(() => s.addImage({ path: path.join(dir, 'nope.img') }), { code: 'IMAGE_NOT_FOUND' }, 'missing image: IMAGE_NOT_FOUND');
  const exp = s.addImage({ path: path.join(dir, 'one.img'), name: 'custom' }, MiB);
  t.equal(exp.name, 'custom', 'explicit export name');
  t.throws(() => s.addImage({ path: path.join(dir, 'one.img'), name: 'custom' }), { code: 'EXPORT_EXISTS' }, 'duplicate name: EXPORT_EXISTS');
  t.throws(() => s.listenUnix(path.join(dir, 'x'.repeat(200), 's.sock')), { code: 'LISTEN_FAILED' }, 'too long socket path: LISTEN_FAILED');
  const sock = path.join(dir, 'h.sock');
  s.listenUnix(sock);
  s.start();
  try {
    const idle = await RawClient.connect(sock);
    await idle.readGreeting();
    // Without the 300 ms handshake timeout it would stay open for good; the
    // long bound only keeps a broken server from hanging the test.
    const t0 = Date.now();
    t.ok(await idle.waitClosed(60_000), 'a client that never answers the greeting is dropped (handshake timeout 300 ms)');
    t.comment(`dropped after ${Date.now() - t0} ms`);
    idle.destroy();
    const c = await RawClient.connect(sock);
    const go = await c.go('custom');
    t.equal(go.size, BigInt(MiB), 'a normal client still connects');
    await sleep(600);
    t.equal((await c.read(0, 512)).error, 0, 'the handshake timeout does not apply in transmission');
    await c.disconnect();
    t.ok(s.stats().handshakesFailed >= 1, 'stats count the failed handshake');
  } finally {
    await s.close();
  }
});
