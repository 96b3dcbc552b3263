// The snapshot command line: `snapshot create|list|info|delete IMAGE ...`,
// online (through the serving server's IMAGE.nbd/control.sock) and offline
// (the command opens the volume itself under the volume lock); their output
// (--json shapes), every error code and exit status, no state change after a
// failed command, the volume lock (second server, stale locks), corrupt
// metadata (manifest, map header, map log records), snapshot exports as seen by
// nbdinfo, and the cost of `snapshot create` on a 1 TiB sparse image.
import t, { type Test } from 'tap';
import { spawn, spawnSync } from 'node:child_process';
import * as crypto from 'node:crypto';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { exec, type ExecResult } from './fixtures/exec';
import { isAlive, waitFor } from './fixtures/proc';
import { readExport, writeExport } from './fixtures/export-io';
import { NBD, RawClient } from './fixtures/raw-client';
import { CLI, tempDirs, startServer, type RunningServer } from './fixtures/server';
import { holdVolumeLock } from './fixtures/lock-child';
import { requireTools } from './fixtures/tools';

const KiB = 1024;
const MiB = 1024 * KiB;
const CHUNK = 16 * KiB; // the default chunk size

// Every test directory goes at the end (kept with NBD_KEEP_TEST_DIRS=1).
const makeTempDir = tempDirs(t);

// ---- helpers -------------------------------------------------------------------

function cli(args: string[], opts: { cwd?: string; timeoutMs?: number } = {}): Promise<ExecResult> {
  if (!opts.cwd) return exec(process.execPath, [CLI, ...args], { timeoutMs: opts.timeoutMs ?? 60_000 });
  return new Promise((resolve, reject) => {
    const p = spawn(process.execPath, [CLI, ...args], { cwd: opts.cwd, stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    p.stdout.on('data', (d: Buffer) => (stdout += d.toString()));
    p.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
    const timer = setTimeout(() => p.kill('SIGKILL'), opts.timeoutMs ?? 60_000);
    p.on('error', reject);
    p.on('close', (code, signal) => {
      clearTimeout(timer);
      resolve({ code, signal, stdout, stderr });
    });
  });
}

const lastLine = (s: string) => s.trim().split('\n').at(-1) ?? '';

/** A command succeeded: exit 0 and nothing on stderr. */
function expectOk(tt: Test, r: ExecResult, what: string): void {
  tt.equal(r.code, 0, `${what}: exit 0${r.code ? ` (stderr: ${lastLine(r.stderr)})` : ''}`);
  tt.equal(r.stderr, '', `${what}: nothing on stderr`);
}

/**
 * A command failed with exactly one error line `node-nbd-server: error: MESSAGE [CODE]`
 * on stderr, nothing on stdout (and never a readiness line), and the exit status.
 * `serve` also logs (pino JSON lines on stderr, info level by default): those
 * are allowed before the error line when `logs` is set.
 */
function expectError(tt: Test, r: ExecResult, exit: number, code: string, what: string, opts: { logs?: boolean } = {}): void {
  tt.equal(r.code, exit, `${what}: exit ${exit} (stderr: ${lastLine(r.stderr)})`);
  const lines = r.stderr.split('\n').filter((l) => l.length > 0 && !(opts.logs && l.startsWith('{"level":')));
  tt.equal(lines.length, 1, `${what}: one line on stderr (got ${lines.length}: ${JSON.stringify(lines.slice(0, 3))})`);
  tt.match(lines.at(-1) ?? '', new RegExp(`^node-nbd-server: error: .+ \\[${code}\\]$`), `${what}: "node-nbd-server: error: ... [${code}]"`);
  tt.equal(lastLine(r.stderr), lines.at(-1), `${what}: the error line is the last line`);
  tt.notMatch(r.stdout, /"ready"/, `${what}: never became ready`);
}

/** Every file in a directory (recursively) with its size and SHA-256; sockets and dirs by type. */
function dirState(dir: string): Record<string, string> {
  const out: Record<string, string> = {};
  if (!fs.existsSync(dir)) return out;
  const walk = (d: string, rel: string) => {
    for (const e of fs.readdirSync(d, { withFileTypes: true })) {
      const p = path.join(d, e.name);
      const r = rel ? `${rel}/${e.name}` : e.name;
      if (e.isDirectory()) {
        out[r + '/'] = 'dir';
        walk(p, r);
      } else if (e.isFile()) {
        out[r] = `${fs.statSync(p).size}:${crypto.createHash('sha256').update(fs.readFileSync(p)).digest('hex')}`;
      } else out[r] = e.isSocket() ? 'socket' : 'other';
    }
  };
  walk(dir, '');
  return out;
}

function sha256(file: string): string {
  return crypto.createHash('sha256').update(fs.readFileSync(file)).digest('hex');
}

/** A fresh directory with IMAGE (random content, or sparse when `sparse`). */
function makeImage(size: number, opts: { name?: string; sparse?: boolean } = {}): { dir: string; img: string; meta: string; content?: Buffer } {
  const dir = makeTempDir('nbd-snapcli-');
  const img = path.join(dir, opts.name ?? 'disk.img');
  let content: Buffer | undefined;
  if (opts.sparse) {
    fs.writeFileSync(img, '');
    fs.truncateSync(img, size);
  } else {
    content = crypto.randomBytes(size);
    fs.writeFileSync(img, content);
  }
  return { dir, img, meta: `${img}.nbd`, content };
}

interface SnapJson {
  id: number;
  name: string;
  createdAt: string;
  state: 'active' | 'failed';
  failure?: { reason: string; at: string };
  export: string;
  chunkSize: number;
  preservedChunks: number;
  preservedBytes: number;
}

async function listJson(tt: Test, img: string, what: string): Promise<SnapJson[]> {
  const r = await cli(['snapshot', 'list', img, '--json']);
  expectOk(tt, r, `${what}: snapshot list --json`);
  try {
    return JSON.parse(r.stdout) as SnapJson[];
  } catch {
    tt.fail(`${what}: snapshot list --json prints JSON (got ${JSON.stringify(r.stdout.slice(0, 200))})`);
    return [];
  }
}

/** Checks the documented --json shape of one snapshot. */
function checkShape(tt: Test, s: SnapJson, want: { id?: number; name: string; exportName?: string }, what: string): void {
  const keys = Object.keys(s).sort();
  tt.same(
    keys,
    ['autoRollback', 'basisOf', 'chunkSize', 'createdAt', 'export', 'id', 'name', 'preservedBytes', 'preservedChunks', 'state', 'volume'],
    `${what}: exactly the documented keys (no failure or merge key while active and not merging)`,
  );
  const extra = s as unknown as { autoRollback: unknown; basisOf: unknown; volume: unknown };
  tt.equal(extra.autoRollback, 'off', `${what}: autoRollback off`);
  tt.same(extra.basisOf, [], `${what}: basisOf [] (no rollback yet)`);
  tt.ok(typeof extra.volume === 'string' && path.isAbsolute(extra.volume as string), `${what}: volume is the image's absolute path`);
  if (want.id !== undefined) tt.equal(s.id, want.id, `${what}: id ${want.id}`);
  tt.ok(Number.isInteger(s.id) && s.id > 0, `${what}: id is a positive integer`);
  tt.equal(s.name, want.name, `${what}: name`);
  tt.equal(s.state, 'active', `${what}: state active`);
  tt.equal(s.export, `${want.exportName ?? 'disk'}@${want.name}`, `${what}: export ${want.exportName ?? 'disk'}@${want.name}`);
  tt.equal(s.chunkSize, CHUNK, `${what}: chunkSize 16 KiB (default)`);
  tt.ok(Number.isInteger(s.preservedChunks) && s.preservedChunks >= 0, `${what}: preservedChunks is a count`);
  tt.equal(s.preservedBytes, s.preservedChunks * s.chunkSize, `${what}: preservedBytes = preservedChunks * chunkSize`);
  const at = Date.parse(s.createdAt);
  tt.ok(/^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$/.test(s.createdAt) && Math.abs(Date.now() - at) < 3600_000, `${what}: createdAt is a recent ISO time (${s.createdAt})`);
}

async function exportNames(socket: string): Promise<string[]> {
  const c = await RawClient.connect(socket);
  try {
    await c.handshake();
    const list = await c.option(NBD.OPT_LIST);
    return list
      .filter((r) => r.type === NBD.REP_SERVER)
      .map((r) => r.data.subarray(4, 4 + r.data.readUInt32BE(0)).toString());
  } finally {
    c.destroy();
  }
}

/** Starts `serve IMAGE` on a unix socket in the image's directory. */
function serveImage(dir: string, img: string, args: string[] = []): Promise<RunningServer> {
  return startServer({ dir, images: [img], args });
}

/** The PID of a process that has exited (for stale locks). */
function deadPid(): number {
  const r = spawnSync('sh', ['-c', 'echo $$'], { encoding: 'utf8' });
  const pid = Number(r.stdout.trim());
  if (!pid || isAlive(pid)) throw new Error('could not get the PID of an exited process');
  return pid;
}

interface MapRecord {
  offset: number;
  type: number;
  length: number;
}

/** Parses the record log of a snapshot file (16-byte record headers from log_base, header offset 40). */
function mapRecords(file: string): MapRecord[] {
  const b = fs.readFileSync(file);
  const out: MapRecord[] = [];
  let off = Number(b.readBigUInt64LE(40));
  while (off + 16 <= b.length) {
    if (b.readUInt32LE(off) !== 0x5245434e) break;
    const len = b.readUInt32LE(off + 8);
    if (off + 16 + len > b.length) break;
    out.push({ offset: off, type: b.readUInt16LE(off + 4), length: len });
    off += 16 + len;
  }
  return out;
}

const manifestFile = (img: string) => path.join(`${img}.nbd`, 'manifest.json');
const snapFile = (img: string, id: number) => path.join(`${img}.nbd`, `snap-${id}.snap`);
/** Where a snapshot file's data region starts (format 2: 1 MiB) and its log (past the data region). */
const DATA_BASE = MiB;
const logBase = (volumeSize: number) => DATA_BASE + Math.ceil(volumeSize / MiB) * MiB;

// ---- offline ---------------------------------------------------------------------

t.test('offline: create, list, info, delete (text and --json), on-disk files, ids never reused', async (t) => {
  const { img, meta, content } = makeImage(4 * MiB);

  const none = await cli(['snapshot', 'list', img]);
  expectOk(t, none, 'list with no snapshots');
  t.equal(none.stdout, 'no snapshots\n', 'list says "no snapshots"');
  t.same(await listJson(t, img, 'no snapshots'), [], 'list --json with no snapshots: []');
  t.notOk(fs.existsSync(path.join(meta, 'manifest.json')), 'listing creates no manifest');

  const c1 = await cli(['snapshot', 'create', img, 's1']);
  expectOk(t, c1, 'create s1');
  t.equal(c1.stdout, 'created snapshot s1 (export disk@s1)\n', 'create prints the snapshot and its export');
  for (const f of ['manifest.json', 'snap-1.snap']) t.ok(fs.existsSync(path.join(meta, f)), `${f} exists`);
  t.notOk(fs.existsSync(path.join(meta, 'lock')), 'no lock left behind by an offline command');
  t.notOk(fs.existsSync(path.join(meta, 'control.sock')), 'no control socket from an offline command');
  t.equal(fs.statSync(snapFile(img, 1)).size, logBase(4 * MiB), 'snap-1.snap ends at its log base (header, data region, no records)');
  t.ok(fs.statSync(snapFile(img, 1)).blocks * 512 < 64 * KiB, 'snap-1.snap is sparse (nothing preserved yet)');
  const map = fs.readFileSync(snapFile(img, 1));
  t.equal(map.subarray(0, 8).toString('latin1'), 'NBDSNAP2', 'magic NBDSNAP2');
  t.equal(map.readUInt32LE(8), 2, 'format version 2');
  t.equal(map.readUInt32LE(12), CHUNK, 'chunk size');
  t.equal(map.readBigUInt64LE(16), BigInt(4 * MiB), 'volume size');
  t.equal(map.readBigUInt64LE(24), 1n, 'snapshot id');
  t.equal(map.readBigUInt64LE(32), BigInt(DATA_BASE), 'data base');
  t.equal(map.readBigUInt64LE(40), BigInt(logBase(4 * MiB)), 'log base');
  t.ok(map.subarray(52, 4096).every((b) => b === 0), 'the rest of the header is zero (no failure marker)');

  const m = JSON.parse(fs.readFileSync(manifestFile(img), 'utf8')) as { manifest: Record<string, unknown>; sha256: string };
  t.equal(m.sha256, crypto.createHash('sha256').update(JSON.stringify(m.manifest)).digest('hex'), 'manifest sha256 is over JSON.stringify(manifest)');
  t.match(m.manifest, { format: 'node-nbd-server-volume', version: 2, chunkSize: CHUNK, size: 4 * MiB, nextId: 2 }, 'manifest fields');

  const c2 = await cli(['snapshot', 'create', img, 's2']);
  expectOk(t, c2, 'create s2');
  const list = await listJson(t, img, 'two snapshots');
  t.same(list.map((s) => [s.id, s.name]), [[1, 's1'], [2, 's2']], 'list: oldest first, ids 1 and 2');
  if (list.length === 2) {
    checkShape(t, list[0]!, { id: 1, name: 's1' }, 'list[0]');
    checkShape(t, list[1]!, { id: 2, name: 's2' }, 'list[1]');
    t.equal(list[0]!.preservedChunks, 0, 'nothing preserved offline');
    t.ok(Date.parse(list[0]!.createdAt) <= Date.parse(list[1]!.createdAt), 'createdAt in creation order');
  }

  const info = await cli(['snapshot', 'info', img, 's2', '--json']);
  expectOk(t, info, 'info --json');
  const one = JSON.parse(info.stdout) as SnapJson;
  t.notOk(Array.isArray(one), 'info --json prints one object, not a list');
  t.same(one, list[1], 'info --json equals the list entry');

  const text = await cli(['snapshot', 'list', img]);
  expectOk(t, text, 'list (text)');
  const rows = text.stdout.trimEnd().split('\n');
  t.match(rows[0] ?? '', /^NAME\s+ID\s+CREATED\s+STATE\s+PRESERVED\s+AUTO-ROLLBACK\s+EXPORT$/, 'text list header');
  t.equal(rows.length, 3, 'header and one row per snapshot');
  t.match(rows[1] ?? '', /^s1\s+1\s+\S+\s+active\s+0 B\s+off\s+disk@s1$/, 'row for s1');
  const infoText = await cli(['snapshot', 'info', img, 's1']);
  expectOk(t, infoText, 'info (text)');
  t.match(infoText.stdout, /^NAME.*\ns1\s+1\s+.*disk@s1\n$/, 'info (text): header and the row');

  const d = await cli(['snapshot', 'delete', img, 's1']);
  expectOk(t, d, 'delete s1');
  t.equal(d.stdout, 'deleted snapshot s1\n', 'delete prints what it deleted');
  t.notOk(fs.existsSync(snapFile(img, 1)), 'snap-1.snap removed');
  t.same((await listJson(t, img, 'after delete')).map((s) => s.name), ['s2'], 'only s2 is left');

  expectOk(t, await cli(['snapshot', 'create', img, 's1']), 'create s1 again');
  t.same((await listJson(t, img, 'recreated')).map((s) => [s.id, s.name]), [[2, 's2'], [3, 's1']], 'a re-created name gets a new id (3): ids are never reused');
  t.ok(fs.readFileSync(img).equals(content!), 'offline snapshot commands never touch the image');
  t.notOk(fs.existsSync(path.join(meta, 'lock')), 'still no lock left behind');
});

// ---- online ----------------------------------------------------------------------

t.test('online: the commands go through the running server; exports appear and go at once', async (t) => {
  const { dir, img, meta, content } = makeImage(4 * MiB);
  expectOk(t, await cli(['snapshot', 'create', img, 'offline1']), 'offline create before serving');
  const srv = await serveImage(dir, img, ['--log-level', 'info']);
  try {
    t.equal(fs.readFileSync(path.join(meta, 'lock'), 'utf8').trim(), String(srv.proc.pid), 'the lock holds the server PID');
    t.ok(fs.statSync(path.join(meta, 'control.sock')).isSocket(), 'IMAGE.nbd/control.sock is a socket');
    t.same(await exportNames(srv.socket), ['disk', 'disk@offline1'], 'a snapshot created offline is exported at start');

    const c = await cli(['snapshot', 'create', img, 'on1']);
    expectOk(t, c, 'online create');
    t.equal(c.stdout, 'created snapshot on1 (export disk@on1)\n', 'online create output');
    t.ok(await waitFor(() => /"msg":"snapshot created"/.test(srv.stderr()) && /"snapshot":"on1"/.test(srv.stderr()), 60_000), 'the server logged "snapshot created" (the server did the work)');
    t.same(await exportNames(srv.socket), ['disk', 'disk@offline1', 'disk@on1'], 'disk@on1 exported at once, no restart');
    t.equal(fs.readFileSync(path.join(meta, 'lock'), 'utf8').trim(), String(srv.proc.pid), 'the lock still holds the server PID');

    // Two first writes in chunks 0 and 2 of the newest snapshot (4 KiB each).
    const w1 = crypto.randomBytes(4096);
    const w2 = crypto.randomBytes(4096);
    t.same(await writeExport(srv.socket, 'disk', [[100, w1], [2 * CHUNK + 8192, w2]]), [0, 0], 'two writes succeed');
    const list = await listJson(t, img, 'online');
    t.same(list.map((s) => [s.id, s.name]), [[1, 'offline1'], [2, 'on1']], 'online list: both, oldest first');
    if (list.length === 2) {
      checkShape(t, list[0]!, { id: 1, name: 'offline1' }, 'online list[0]');
      checkShape(t, list[1]!, { id: 2, name: 'on1' }, 'online list[1]');
      t.equal(list[1]!.preservedChunks, 2, 'on1 preserved 2 chunks (one per first write)');
      t.equal(list[1]!.preservedBytes, 2 * CHUNK, 'on1 preservedBytes 32 KiB (two chunks)');
      t.equal(list[0]!.preservedChunks, 0, 'offline1 preserved nothing (the newest snapshot takes the copies)');
    }
    const info = await cli(['snapshot', 'info', img, 'on1', '--json']);
    expectOk(t, info, 'online info --json');
    t.same(JSON.parse(info.stdout), list[1], 'online info --json equals the list entry');

    for (const name of ['disk@offline1', 'disk@on1']) {
      const r = await readExport(srv.socket, name, 0, 4 * MiB);
      t.equal(r.error, 0, `${name}: read succeeds`);
      t.ok(r.data?.equals(content!), `${name}: reads the content at snapshot time`);
    }
    const live = await readExport(srv.socket, 'disk', 0, 4 * MiB);
    const want = Buffer.from(content!);
    w1.copy(want, 100);
    w2.copy(want, 2 * CHUNK + 8192);
    t.ok(live.data?.equals(want), 'the live export has the writes');
    const wr = await RawClient.connect(srv.socket);
    const go = await wr.go('disk@on1');
    t.ok(go.flags & NBD.FLAG_READ_ONLY, 'the snapshot export is read-only');
    t.equal(go.size, BigInt(4 * MiB), 'the snapshot export has the volume size');
    t.not((await wr.write(0, Buffer.alloc(512))).error, 0, 'a write to the snapshot export fails');
    await wr.disconnect();

    const del = await cli(['snapshot', 'delete', img, 'on1']);
    expectOk(t, del, 'online delete');
    t.same(await exportNames(srv.socket), ['disk', 'disk@offline1'], 'disk@on1 no longer exported');
    t.notOk(fs.existsSync(snapFile(img, 2)), 'snap-2.snap removed');
    const r1 = await readExport(srv.socket, 'disk@offline1', 0, 4 * MiB);
    t.ok(r1.data?.equals(content!), 'offline1 is still exact after deleting the newer snapshot (chunks handed down)');
    t.equal((await listJson(t, img, 'after online delete'))[0]?.preservedChunks, 2, 'offline1 now holds the 2 handed-down chunks');
    expectError(t, await cli(['snapshot', 'info', img, 'on1']), 8, 'SNAPSHOT_NOT_FOUND', 'online info of the deleted snapshot');
    t.match(srv.stderr(), /"msg":"snapshot deleted"/, 'the server logged the delete');
  } finally {
    t.equal(await srv.stop(), 0, 'server exits 0');
  }
  t.notOk(fs.existsSync(path.join(meta, 'lock')), 'lock removed when the server stops');
  t.notOk(fs.existsSync(path.join(meta, 'control.sock')), 'control socket removed when the server stops');
  const after = await listJson(t, img, 'offline after stop');
  t.same(after.map((s) => [s.id, s.name, s.preservedChunks]), [[1, 'offline1', 2]], 'offline list after stop matches what the server had');
});

t.test('online with several images: each volume has its own control socket and snapshots', async (t) => {
  const dir = makeTempDir('nbd-snapcli-');
  const a = path.join(dir, 'alpha.img');
  const b = path.join(dir, 'beta.img');
  const ca = crypto.randomBytes(MiB);
  const cb = crypto.randomBytes(2 * MiB);
  fs.writeFileSync(a, ca);
  fs.writeFileSync(b, cb);
  const srv = await startServer({ dir, images: [a, b] });
  try {
    expectOk(t, await cli(['snapshot', 'create', a, 'x']), 'create alpha x');
    expectOk(t, await cli(['snapshot', 'create', b, 'x']), 'create beta x (same name, other volume)');
    expectOk(t, await cli(['snapshot', 'create', b, 'y']), 'create beta y');
    const names = (await exportNames(srv.socket)).slice().sort();
    t.same(names, ['alpha', 'alpha@x', 'beta', 'beta@x', 'beta@y'], 'each snapshot exported under its own volume name');
    t.same((await listJson(t, a, 'alpha')).map((s) => s.export), ['alpha@x'], 'alpha lists only its snapshot');
    t.same((await listJson(t, b, 'beta')).map((s) => s.export), ['beta@x', 'beta@y'], 'beta lists its two');
    t.same(await writeExport(srv.socket, 'beta', [[0, Buffer.alloc(2 * MiB, 1)]]), [0], 'overwrite beta');
    t.ok((await readExport(srv.socket, 'beta@x', 0, 2 * MiB)).data?.equals(cb), 'beta@x exact');
    t.ok((await readExport(srv.socket, 'beta@y', 0, 2 * MiB)).data?.equals(cb), 'beta@y exact');
    t.ok((await readExport(srv.socket, 'alpha@x', 0, MiB)).data?.equals(ca), 'alpha@x untouched');
    t.equal((await listJson(t, a, 'alpha after'))[0]?.preservedChunks, 0, 'writes to beta preserve nothing into alpha');
    expectOk(t, await cli(['snapshot', 'delete', b, 'x']), 'delete beta x');
    t.same((await exportNames(srv.socket)).slice().sort(), ['alpha', 'alpha@x', 'beta', 'beta@y'], 'only beta@x went away');
  } finally {
    t.equal(await srv.stop(), 0, 'exits 0');
  }
});

// ---- errors ----------------------------------------------------------------------

const BAD_NAMES = ['', 'a b', '.hidden', '_x', 'a/b', '../x', 'a@b', 'é', 'x'.repeat(65), 'tab\tname', 'a:b', 'a*'];
const GOOD_NAMES = ['A', '9', 'a.b_c-d', 'x'.repeat(64), '0.-_'];

for (const mode of ['offline', 'online'] as const) {
  t.test(`${mode}: every error case, with its code and exit status, and no state change`, async (t) => {
    const { dir, img, meta, content } = makeImage(2 * MiB);
    expectOk(t, await cli(['snapshot', 'create', img, 'keep']), 'setup: create "keep"');
    const srv = mode === 'online' ? await serveImage(dir, img) : undefined;
    try {
      const before = dirState(meta);
      const exportsBefore = srv ? await exportNames(srv.socket) : [];
      const unchanged = async (what: string) => {
        t.same(dirState(meta), before, `${what}: IMAGE.nbd/ unchanged`);
        if (srv) t.same(await exportNames(srv.socket), exportsBefore, `${what}: the exports are unchanged`);
      };

      const dup = await cli(['snapshot', 'create', img, 'keep']);
      expectError(t, dup, 9, 'SNAPSHOT_EXISTS', 'duplicate name');
      t.match(dup.stderr, /"keep"/, 'duplicate: names the snapshot');
      await unchanged('duplicate name');

      for (const bad of BAD_NAMES) {
        const r = await cli(['snapshot', 'create', img, '--', bad]);
        expectError(t, r, 2, 'BAD_SNAPSHOT_NAME', `create ${JSON.stringify(bad)}`);
      }
      const dash = await cli(['snapshot', 'create', img, '--', '-x']);
      expectError(t, dash, 2, 'BAD_SNAPSHOT_NAME', 'create "-x" (after --)');
      const opt = await cli(['snapshot', 'create', img, '-x']);
      t.equal(opt.code, 2, '"-x" without -- is an unknown option: exit 2');
      await unchanged('invalid names');

      for (const cmd of ['info', 'delete']) {
        const r = await cli(['snapshot', cmd, img, 'nope']);
        expectError(t, r, 8, 'SNAPSHOT_NOT_FOUND', `${cmd} of an unknown snapshot`);
        t.match(r.stderr, /"nope"/, `${cmd}: names the snapshot`);
      }
      expectError(t, await cli(['snapshot', 'info', img, 'KEEP']), 8, 'SNAPSHOT_NOT_FOUND', 'names are case-sensitive');
      expectError(t, await cli(['snapshot', 'delete', img, 'disk@keep']), 8, 'SNAPSHOT_NOT_FOUND', 'delete by export name is not by snapshot name');
      await unchanged('unknown snapshots');

      const usage = await cli(['snapshot', 'create', img]);
      t.equal(usage.code, 2, 'create without a name: usage error, exit 2');
      await unchanged('usage error');

      t.same((await listJson(t, img, 'after the errors')).map((s) => s.name), ['keep'], 'still exactly one snapshot');
      if (srv) {
        const r = await readExport(srv.socket, 'disk@keep', 0, 2 * MiB);
        t.ok(r.data?.equals(content!), 'the existing snapshot export still serves');
      }
    } finally {
      if (srv) t.equal(await srv.stop(), 0, 'server exits 0');
    }
    t.ok(fs.readFileSync(img).equals(content!), 'image unchanged');
  });
}

t.test('an invalid name holding a newline is still reported on one error line', async (t) => {
  const { img, meta } = makeImage(MiB, { sparse: true });
  const r = await cli(['snapshot', 'create', img, 'new\nline']);
  expectError(t, r, 2, 'BAD_SNAPSHOT_NAME', 'create "new\\nline"');
  t.same(Object.keys(dirState(meta)), [], 'no files in IMAGE.nbd/');
});

t.test('name rules: the edge names that are valid work, online and offline', async (t) => {
  const { dir, img } = makeImage(MiB, { sparse: true });
  for (const n of GOOD_NAMES.slice(0, 3)) expectOk(t, await cli(['snapshot', 'create', img, n]), `offline create ${JSON.stringify(n)}`);
  const srv = await serveImage(dir, img);
  try {
    for (const n of GOOD_NAMES.slice(3)) expectOk(t, await cli(['snapshot', 'create', img, n]), `online create ${JSON.stringify(n.length > 20 ? `${n.length} chars` : n)}`);
    const names = (await listJson(t, img, 'names')).map((s) => s.name);
    t.same(names, GOOD_NAMES, 'every valid name listed, in order');
    const exps = await exportNames(srv.socket);
    t.same(exps, ['disk', ...GOOD_NAMES.map((n) => `disk@${n}`)], 'every snapshot exported as disk@NAME');
    for (const n of GOOD_NAMES) expectOk(t, await cli(['snapshot', 'info', img, n, '--json']), `info ${n.slice(0, 20)}`);
  } finally {
    t.equal(await srv.stop(), 0, 'server exits 0');
  }
});

t.test('a failed command on an image without metadata leaves no files in IMAGE.nbd/', async (t) => {
  const { img, meta, content } = makeImage(MiB);
  for (const [args, exit, code] of [
    [['snapshot', 'create', img, 'a b'], 2, 'BAD_SNAPSHOT_NAME'],
    [['snapshot', 'info', img, 'x'], 8, 'SNAPSHOT_NOT_FOUND'],
    [['snapshot', 'delete', img, 'x'], 8, 'SNAPSHOT_NOT_FOUND'],
  ] as const) {
    expectError(t, await cli([...args]), exit, code, args.slice(0, 2).join(' ') + ' ' + args[3]);
    const files = Object.keys(dirState(meta));
    t.same(files, [], `no files in IMAGE.nbd/ afterwards (${fs.existsSync(meta) ? 'an empty IMAGE.nbd/ exists' : 'no IMAGE.nbd/'})`);
  }
  t.ok(fs.readFileSync(img).equals(content!), 'image unchanged');
});

t.test('unknown image: IMAGE_NOT_FOUND, exit 3, nothing created', async (t) => {
  const dir = makeTempDir('nbd-snapcli-');
  for (const img of [path.join(dir, 'missing.img'), path.join(dir, 'no-such-dir', 'x.img')]) {
    for (const args of [['create', img, 's'], ['list', img], ['list', img, '--json'], ['info', img, 's'], ['delete', img, 's']]) {
      const r = await cli(['snapshot', ...args]);
      expectError(t, r, 3, 'IMAGE_NOT_FOUND', `snapshot ${args[0]} ${path.relative(dir, img)}`);
      t.match(r.stderr, img, 'names the image');
    }
  }
  t.same(fs.readdirSync(dir), [], 'nothing created (no image, no IMAGE.nbd/)');
});

// ---- the volume lock --------------------------------------------------------------

t.test('second serve on the same image: VOLUME_BUSY, exit 7; the first keeps serving', async (t) => {
  const { dir, img, meta, content } = makeImage(2 * MiB);
  const srv = await serveImage(dir, img);
  try {
    const pid = String(srv.proc.pid);
    const attempts: [string, string[], string | undefined][] = [
      ['same path', ['serve', img, '--socket', path.join(dir, 'b.sock')], undefined],
      ['same path with --size', ['serve', img, '--size', '2M', '--socket', path.join(dir, 'c.sock')], undefined],
      ['relative path from its directory', ['serve', 'disk.img', '--socket', path.join(dir, 'd.sock')], dir],
      ['read-only', ['serve', img, '--read-only', '--socket', path.join(dir, 'e.sock')], undefined],
    ];
    for (const [what, args, cwd] of attempts) {
      const r = await cli(args, { cwd, timeoutMs: 30_000 });
      expectError(t, r, 7, 'VOLUME_BUSY', `second serve (${what})`, { logs: true });
      t.match(r.stderr, pid, `${what}: names the PID that holds the volume`);
      t.equal(fs.readFileSync(path.join(meta, 'lock'), 'utf8').trim(), pid, `${what}: the lock still holds the first server's PID`);
      t.ok(fs.existsSync(path.join(meta, 'control.sock')), `${what}: the first server's control socket is still there`);
    }
    t.notOk(['b.sock', 'c.sock', 'd.sock', 'e.sock'].some((s) => fs.existsSync(path.join(dir, s))), 'no second listening socket left');
    t.equal(srv.proc.exitCode, null, 'the first server is still running');
    const data = crypto.randomBytes(8192);
    t.same(await writeExport(srv.socket, 'disk', [[4096, data]]), [0], 'the first server still takes writes');
    const r = await readExport(srv.socket, 'disk', 4096, 8192);
    t.ok(r.data?.equals(data), 'and reads them back');
    expectOk(t, await cli(['snapshot', 'create', img, 'after-busy']), 'an online snapshot still works (control socket intact)');
    t.ok(srv.stderr().includes('"snapshot":"after-busy"') || (await exportNames(srv.socket)).includes('disk@after-busy'), 'created by the first server');
    content!.set(data, 4096);
  } finally {
    t.equal(await srv.stop(), 0, 'the first server exits 0');
  }
  t.ok(fs.readFileSync(img).equals(content!), 'image holds exactly the first server\'s writes');
  const again = await serveImage(dir, img);
  t.same(again.ready.exports, ['disk'], 'once the first server is gone, the image can be served again');
  t.equal(await again.stop(), 0, 'exits 0');
});

/**
 * Runs `serve ARGS` until it exits or prints its readiness line (then stops it
 * with SIGTERM). Returns the exit status and output, and whether it got ready.
 */
function tryServe(args: string[], ms = 30_000): Promise<ExecResult & { ready: boolean }> {
  return new Promise((resolve, reject) => {
    const p = spawn(process.execPath, [CLI, 'serve', ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    let ready = false;
    p.stdout.on('data', (d: Buffer) => {
      stdout += d.toString();
      if (!ready && stdout.includes('"ready"')) {
        ready = true;
        p.kill('SIGTERM');
      }
    });
    p.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
    const timer = setTimeout(() => p.kill('SIGKILL'), ms);
    p.on('error', reject);
    p.on('close', (code, signal) => {
      clearTimeout(timer);
      resolve({ code, signal, stdout, stderr, ready });
    });
  });
}

t.test('the same image through a symlink: a second server or an offline snapshot is refused while it is served', async (t) => {
  const { dir, img, meta, content } = makeImage(MiB);
  const link = path.join(dir, 'alias.img');
  fs.symlinkSync(img, link);
  const srv = await serveImage(dir, img);
  try {
    expectOk(t, await cli(['snapshot', 'create', img, 'S']), 'online snapshot S through the real path');
    const r = await tryServe([link, '--socket', path.join(dir, 'alias-probe.sock')]);
    if (t.notOk(r.ready, 'serve alias.img (a symlink to the served disk.img) must not start serving the same file')) {
      expectError(t, r, 7, 'VOLUME_BUSY', 'serve through a symlink while the target is served', { logs: true });
    } else {
      // Show what a second server on the same file does to the first one's snapshot.
      fs.mkdirSync(path.join(dir, 'second'));
      const second = await startServer({ dir: path.join(dir, 'second'), images: [link] }).catch(() => undefined);
      if (second) {
        const errs = await writeExport(second.socket, 'alias', [[0, Buffer.alloc(CHUNK, 0xee)]]);
        const snap = await readExport(srv.socket, 'disk@S', 0, MiB);
        t.ok(
          snap.data?.equals(content!),
          `snapshot disk@S stays exact (a write through the second server ${errs[0] === 0 ? 'succeeded' : 'failed'}; ` +
            `the snapshot now reads ${snap.data?.subarray(0, CHUNK).equals(Buffer.alloc(CHUNK, 0xee)) ? 'the NEW data at chunk 0' : 'other data'})`,
        );
        await second.stop();
      }
    }
    // Through the symlink the CLI must reach the serving server (its control
    // socket) or be refused; never work offline behind the server's back.
    const off = await cli(['snapshot', 'create', link, 'T']);
    if (off.code === 0) {
      const listed = await cli(['snapshot', 'list', img, '--json']);
      t.ok(
        (JSON.parse(listed.stdout) as { name: string }[]).some((s) => s.name === 'T'),
        'snapshot create through the symlink was carried out by the serving server (listed for disk.img)',
      );
      const exps = await exec('nbdinfo', ['--list', '--json', `nbd+unix:///?socket=${srv.socket}`]);
      t.match(exps.stdout, /"disk@T"/, 'and the serving server exports disk@T');
    } else {
      t.match(off.stderr, /\[VOLUME_BUSY\]/, `or it is refused with VOLUME_BUSY (${lastLine(off.stderr)})`);
    }
    t.equal(fs.readFileSync(path.join(meta, 'lock'), 'utf8').trim(), String(srv.proc.pid), 'the lock still holds the first server\'s PID');
  } finally {
    t.equal(await srv.stop(), 0, 'server exits 0');
  }
});

t.test('offline command while a live process holds the lock without a control socket: VOLUME_BUSY, exit 7', async (t) => {
  const { img, meta, content } = makeImage(MiB);
  expectOk(t, await cli(['snapshot', 'create', img, 'keep']), 'setup');
  const holder = await holdVolumeLock(img); // a process holding the volume lock (lockVolume), serving nothing
  try {
    t.equal(fs.readFileSync(path.join(meta, 'lock'), 'utf8').trim(), String(holder.proc.pid), 'the lock file names the holder');
    const before = dirState(meta);
    for (const args of [['create', img, 'new'], ['list', img], ['list', img, '--json'], ['info', img, 'keep'], ['delete', img, 'keep']]) {
      const r = await cli(['snapshot', ...args]);
      expectError(t, r, 7, 'VOLUME_BUSY', `snapshot ${args[0]}${args[2] === '--json' ? ' --json' : ''}`);
      t.match(r.stderr, String(holder.proc.pid), 'names the PID holding the lock');
    }
    const s = await cli(['serve', img, '--socket', path.join(path.dirname(img), 's.sock')], { timeoutMs: 30_000 });
    expectError(t, s, 7, 'VOLUME_BUSY', 'serve', { logs: true });
    t.same(dirState(meta), before, 'IMAGE.nbd/ unchanged (the lock too)');
  } finally {
    await holder.kill();
  }
  t.ok(fs.readFileSync(img).equals(content!), 'image unchanged');
});

t.test('a stale lock (PID of a dead process) is replaced', async (t) => {
  const { dir, img, meta } = makeImage(MiB);
  expectOk(t, await cli(['snapshot', 'create', img, 'keep']), 'setup');
  const lock = path.join(meta, 'lock');
  fs.writeFileSync(lock, `${deadPid()}\n`);
  t.same((await listJson(t, img, 'stale lock')).map((s) => s.name), ['keep'], 'offline list works over a stale lock');
  t.notOk(fs.existsSync(lock), 'the stale lock is gone after the command');
  fs.writeFileSync(lock, `${deadPid()}\n`);
  expectOk(t, await cli(['snapshot', 'create', img, 'second']), 'offline create works over a stale lock');
  fs.writeFileSync(lock, 'garbage\n');
  const g = await cli(['snapshot', 'list', img]);
  t.comment(`a lock with garbage content: exit ${g.code} ${lastLine(g.stderr)} (informational)`);
  fs.writeFileSync(lock, `${deadPid()}\n`);
  const srv = await serveImage(dir, img);
  try {
    t.equal(fs.readFileSync(lock, 'utf8').trim(), String(srv.proc.pid), 'serve replaced the stale lock with its own PID');
    t.same(await exportNames(srv.socket), ['disk', 'disk@keep', 'disk@second'], 'and serves the volume');
  } finally {
    t.equal(await srv.stop(), 0, 'exits 0');
  }
});

t.test('after kill -9 of the server (stale lock and control socket), commands work offline and serve works', async (t) => {
  const { dir, img, meta, content } = makeImage(2 * MiB);
  const srv = await serveImage(dir, img);
  expectOk(t, await cli(['snapshot', 'create', img, 'before-kill']), 'online create');
  const data = crypto.randomBytes(CHUNK);
  t.same(await writeExport(srv.socket, 'disk', [[0, data]]), [0], 'a write');
  await srv.stop('SIGKILL');
  t.ok(fs.existsSync(path.join(meta, 'lock')) && fs.existsSync(path.join(meta, 'control.sock')), 'the killed server left its lock and control socket');
  const list = await listJson(t, img, 'after kill -9');
  t.same(list.map((s) => [s.name, s.state, s.preservedChunks]), [['before-kill', 'active', 1]], 'offline list after kill -9');
  expectOk(t, await cli(['snapshot', 'create', img, 'offline-after-kill']), 'offline create after kill -9');
  const again = await serveImage(dir, img);
  try {
    const r = await readExport(again.socket, 'disk@before-kill', 0, 2 * MiB);
    t.ok(r.data?.equals(content!), 'the snapshot is exact after kill -9 and restart');
    expectOk(t, await cli(['snapshot', 'list', img]), 'online list via the new server');
  } finally {
    t.equal(await again.stop(), 0, 'exits 0');
  }
});

// ---- corrupt metadata ------------------------------------------------------------

/** serve and every snapshot command refuse the volume; nothing changes. */
async function expectRefused(t: Test, dir: string, img: string, code: string, what: string): Promise<void> {
  const meta = `${img}.nbd`;
  const before = dirState(meta);
  const imgSum = sha256(img);
  const sock = path.join(dir, 'refused.sock');
  const s = await cli(['serve', img, '--socket', sock], { timeoutMs: 30_000 });
  expectError(t, s, 6, code, `${what}: serve`, { logs: true });
  t.notOk(fs.existsSync(sock), `${what}: not served (no socket)`);
  for (const args of [['list', img], ['list', img, '--json'], ['info', img, 'one'], ['create', img, 'new'], ['delete', img, 'one']]) {
    expectError(t, await cli(['snapshot', ...args]), 6, code, `${what}: snapshot ${args[0]}${args[2] === '--json' ? ' --json' : ''}`);
  }
  t.same(dirState(meta), before, `${what}: IMAGE.nbd/ unchanged (no lock left, metadata not rewritten)`);
  t.equal(sha256(img), imgSum, `${what}: image unchanged`);
}

/** An image with snapshot "one" whose map log has 3 CHUNKS records (chunks 0, 5, 9). */
async function imageWithRecords(t: Test): Promise<{ dir: string; img: string; content: Buffer }> {
  const { dir, img, content } = makeImage(2 * MiB);
  const srv = await serveImage(dir, img);
  try {
    expectOk(t, await cli(['snapshot', 'create', img, 'one']), 'setup: create "one"');
    for (const c of [0, 5, 9]) {
      t.same(await writeExport(srv.socket, 'disk', [[c * CHUNK, Buffer.alloc(4096, c + 1)]]), [0], `setup: first write to chunk ${c}`);
      // First writes are preserved in the background; list waits for it, so each write gets its own record.
      expectOk(t, await cli(['snapshot', 'list', img]), `setup: list after chunk ${c}`);
    }
  } finally {
    t.equal(await srv.stop(), 0, 'setup: server exits 0');
  }
  const recs = mapRecords(snapFile(img, 1));
  t.same(recs.map((r) => [r.type, r.length]), [[1, 16], [1, 16], [1, 16]], 'setup: the log holds 3 CHUNKS records of one chunk each');
  return { dir, img, content: content! };
}

t.test('corrupt manifest.json: METADATA_CORRUPT, exit 6; not served, nothing modified', async (t) => {
  const { dir, img } = makeImage(MiB);
  expectOk(t, await cli(['snapshot', 'create', img, 'one']), 'setup');
  const file = manifestFile(img);
  const good = fs.readFileSync(file);

  // A byte inside a value: still valid JSON, fails its sha256.
  const flipped = Buffer.from(good);
  const at = flipped.indexOf('"one"') + 2;
  flipped[at] = 'x'.charCodeAt(0);
  fs.writeFileSync(file, flipped);
  await expectRefused(t, dir, img, 'METADATA_CORRUPT', 'name byte flipped (sha256 mismatch)');

  // A byte of the digest itself.
  const badSum = Buffer.from(good);
  const s = badSum.indexOf('"sha256": "') + 11;
  badSum[s] = badSum[s] === 0x30 ? 0x31 : 0x30;
  fs.writeFileSync(file, badSum);
  await expectRefused(t, dir, img, 'METADATA_CORRUPT', 'sha256 byte flipped');

  // A byte that breaks the JSON.
  const broken = Buffer.from(good);
  broken[broken.indexOf('{', 1)] = 0x5b; // '[' for the inner '{'
  fs.writeFileSync(file, broken);
  await expectRefused(t, dir, img, 'METADATA_CORRUPT', 'not JSON');

  fs.writeFileSync(file, good.subarray(0, good.length >> 1));
  await expectRefused(t, dir, img, 'METADATA_CORRUPT', 'truncated');

  fs.writeFileSync(file, '');
  await expectRefused(t, dir, img, 'METADATA_CORRUPT', 'empty');

  fs.writeFileSync(file, good);
  t.same((await listJson(t, img, 'restored manifest')).map((x) => x.name), ['one'], 'the restored manifest works again');
});

t.test('corrupt map header: SNAPSHOT_CORRUPT, exit 6; not served, nothing modified', async (t) => {
  const { dir, img } = await imageWithRecords(t);
  const file = snapFile(img, 1);
  const good = fs.readFileSync(file);
  for (const [what, offset] of [
    ['magic', 0],
    ['version', 8],
    ['chunk size', 13],
    ['volume size', 18],
    ['id', 24],
    ['data base', 33],
    ['log base', 41],
    ['header CRC', 49],
  ] as const) {
    const bad = Buffer.from(good);
    bad[offset] ^= 0x01;
    fs.writeFileSync(file, bad);
    await expectRefused(t, dir, img, 'SNAPSHOT_CORRUPT', `map header ${what} byte flipped`);
  }
  fs.writeFileSync(file, good.subarray(0, 20));
  await expectRefused(t, dir, img, 'SNAPSHOT_CORRUPT', 'file shorter than its header');
  fs.writeFileSync(file, good.subarray(0, 8192));
  await expectRefused(t, dir, img, 'SNAPSHOT_CORRUPT', 'file cut short inside its data region');
  fs.writeFileSync(file, good);
  expectOk(t, await cli(['snapshot', 'list', img]), 'the restored map works again');
});

t.test('corrupt map log record in the middle: SNAPSHOT_CORRUPT, exit 6; nothing modified', async (t) => {
  const { dir, img } = await imageWithRecords(t);
  const file = snapFile(img, 1);
  const good = fs.readFileSync(file);
  const recs = mapRecords(file);
  if (recs.length !== 3) return;
  for (const [what, rec, offset] of [
    ['first record payload', 0, 16],
    ['middle record payload', 1, 16],
    ['middle record CRC', 1, 12],
    ['middle record type', 1, 4],
    ['middle record magic', 1, 0],
  ] as const) {
    const bad = Buffer.from(good);
    bad[recs[rec]!.offset + offset] ^= 0x40;
    fs.writeFileSync(file, bad);
    await expectRefused(t, dir, img, 'SNAPSHOT_CORRUPT', what);
  }
  fs.writeFileSync(file, good);
  expectOk(t, await cli(['snapshot', 'list', img]), 'the restored map works again');
});

t.test('a torn last map record (a few bytes cut off) is dropped and the volume is accepted', async (t) => {
  const { dir, img, content } = await imageWithRecords(t);
  const file = snapFile(img, 1);
  const good = fs.readFileSync(file);
  const recs = mapRecords(file);
  for (const cut of [3, 16, 20]) {
    fs.writeFileSync(file, good.subarray(0, good.length - cut));
    const list = await listJson(t, img, `cut ${cut} bytes`);
    t.same(list.map((s) => [s.name, s.state, s.preservedChunks]), [['one', 'active', 2]], `cut ${cut} bytes: accepted, the torn record dropped (2 chunks left)`);
    if (recs.length === 3) t.equal(fs.statSync(file).size, recs[2]!.offset, `cut ${cut} bytes: the map is cut back to the last whole record`);
  }
  fs.writeFileSync(file, good.subarray(0, good.length - 5));
  const srv = await serveImage(dir, img);
  try {
    t.same(srv.ready.exports, ['disk'], 'serve accepts the volume with a torn last record');
    const r = await readExport(srv.socket, 'disk@one', 0, 2 * MiB);
    t.equal(r.error, 0, 'the snapshot export reads');
    // Chunks 0 and 5 are still preserved; chunk 9's record was torn (in a real
    // crash its live write never happened; here it did, so chunk 9 is not compared).
    for (const c of [0, 5, 1, 2, 20]) {
      t.ok(r.data?.subarray(c * CHUNK, (c + 1) * CHUNK).equals(content.subarray(c * CHUNK, (c + 1) * CHUNK)), `chunk ${c} of the snapshot is exact`);
    }
    const l = await listJson(t, img, 'served');
    t.equal(l[0]?.preservedChunks, 2, 'the server counts 2 preserved chunks');
  } finally {
    t.equal(await srv.stop(), 0, 'exits 0');
  }
});

t.test('the newest record whose chunk data fails its CRC (its sync never completed) is dropped; older records are kept', async (t) => {
  const { img } = await imageWithRecords(t);
  const file = snapFile(img, 1);
  const recs = mapRecords(file);
  const fd = fs.openSync(file, 'r+');
  try {
    const b = Buffer.alloc(1);
    fs.readSync(fd, b, 0, 1, DATA_BASE + 9 * CHUNK + 100);
    b[0] ^= 0xff;
    fs.writeSync(fd, b, 0, 1, DATA_BASE + 9 * CHUNK + 100); // chunk 9: the newest record's data
  } finally {
    fs.closeSync(fd);
  }
  const list = await listJson(t, img, 'after damaging the newest record\'s data');
  t.same(list.map((s) => [s.name, s.state, s.preservedChunks]), [['one', 'active', 2]], 'chunks 0 and 5 stay preserved; chunk 9 is not');
  if (recs.length === 3) t.equal(fs.statSync(file).size, recs[2]!.offset, 'the log is cut back to before the dropped record');
});

// ---- scale and interop ------------------------------------------------------------

// Cheap is checked by what the create writes (the metadata of two 1 TiB
// snapshots allocates < 1 MiB), not by how long it takes: the times are
// printed only (tools/bench-snapshots.ts measures them).
t.test('snapshot create on a 1 TiB sparse image is cheap (offline and online)', async (t) => {
  const { dir, img, meta } = makeImage(1024 * 1024 * MiB, { sparse: true });
  let t0 = process.hrtime.bigint();
  const off = await cli(['snapshot', 'create', img, 'tera-offline']);
  const offMs = Number(process.hrtime.bigint() - t0) / 1e6;
  expectOk(t, off, 'offline create on 1 TiB');
  t.comment(`offline snapshot create on a 1 TiB sparse image: ${offMs.toFixed(0)} ms (whole CLI process)`);
  const srv = await serveImage(dir, img, ['--log-level', 'info']);
  try {
    t0 = process.hrtime.bigint();
    const on = await cli(['snapshot', 'create', img, 'tera-online']);
    const onMs = Number(process.hrtime.bigint() - t0) / 1e6;
    expectOk(t, on, 'online create on 1 TiB');
    const logged = /"snapshot":"tera-online".*?"ms":([\d.]+)/.exec(srv.stderr());
    t.comment(`online snapshot create on a 1 TiB sparse image: ${onMs.toFixed(0)} ms (CLI), ${logged ? Number(logged[1]).toFixed(1) : '?'} ms (server log)`);
    let allocated = 0;
    for (const f of fs.readdirSync(meta)) {
      const st = fs.statSync(path.join(meta, f));
      if (st.isFile()) allocated += st.blocks * 512;
    }
    t.ok(allocated < MiB, `the metadata of two 1 TiB snapshots allocates ${allocated} bytes (< 1 MiB)`);
    t.equal(fs.statSync(snapFile(img, 2)).size, logBase(1024 * 1024 * MiB), 'snap-2.snap spans 1 TiB of data region, sparse');
    const c = await RawClient.connect(srv.socket);
    const go = await c.go('disk@tera-online');
    t.equal(go.size, BigInt(1024 * 1024 * MiB), 'the snapshot export is 1 TiB');
    const r = await c.read(1024 * 1024 * MiB - 4096, 4096);
    t.ok(r.error === 0 && r.data?.equals(Buffer.alloc(4096)), 'its last 4 KiB read as zeroes');
    await c.disconnect();
  } finally {
    t.equal(await srv.stop(), 0, 'exits 0');
  }
});

t.test('nbdinfo --list shows disk@NAME; nbdinfo --map works on a snapshot export', async (t) => {
  if (!requireTools(t, ['nbdinfo'])) return;
  // 4 MiB: data in [0, 1 MiB), a hole in [1 MiB, 4 MiB).
  const { dir, img } = makeImage(4 * MiB, { sparse: true });
  const head = crypto.randomBytes(MiB);
  const fd = fs.openSync(img, 'r+');
  fs.writeSync(fd, head, 0, head.length, 0);
  fs.closeSync(fd);
  const srv = await serveImage(dir, img);
  try {
    expectOk(t, await cli(['snapshot', 'create', img, 'snap']), 'create');
    const li = await exec('nbdinfo', ['--list', '--json', srv.uri()], { timeoutMs: 30_000 });
    t.equal(li.code, 0, `nbdinfo --list exits 0 ${li.stderr}`);
    const j = JSON.parse(li.stdout || '{}') as { exports?: { 'export-name': string; 'export-size': number; is_read_only?: boolean; description?: string }[] };
    const names = (j.exports ?? []).map((e) => e['export-name']);
    t.same(names, ['disk', 'disk@snap'], 'nbdinfo --list: disk and disk@snap');
    const se = (j.exports ?? []).find((e) => e['export-name'] === 'disk@snap');
    t.equal(se?.['export-size'], 4 * MiB, 'disk@snap has the volume size');
    t.equal(se?.is_read_only, true, 'disk@snap is read-only');
    const text = await exec('nbdinfo', ['--list', srv.uri()], { timeoutMs: 30_000 });
    t.match(text.stdout, /export="disk@snap"/, 'nbdinfo --list (text) shows export="disk@snap"');

    // Change the live volume: overwrite the data, fill part of the hole.
    t.same(await writeExport(srv.socket, 'disk', [[0, Buffer.alloc(MiB, 7)], [2 * MiB, Buffer.alloc(CHUNK, 9)]]), [0, 0], 'live writes');
    interface MapEntry { offset: number; length: number; type: number; description: string }
    const m = await exec('nbdinfo', ['--map', '--json', srv.uri('disk@snap')], { timeoutMs: 30_000 });
    t.equal(m.code, 0, `nbdinfo --map on disk@snap exits 0 ${m.stderr}`);
    const map = JSON.parse(m.stdout || '[]') as MapEntry[];
    t.comment(`disk@snap map: ${map.map((e) => `${e.offset}+${e.length}:${e.type}`).join(' ')}`);
    let pos = 0;
    for (const e of map) {
      if (e.offset !== pos) break;
      pos += e.length;
    }
    t.equal(pos, 4 * MiB, 'the extents cover the export contiguously');
    const typeAt = (off: number) => map.find((e) => e.offset <= off && off < e.offset + e.length)?.type;
    t.equal(typeAt(0), 0, 'the preserved data at 0 is data');
    t.equal(typeAt(MiB - 1), 0, 'data up to 1 MiB');
    t.equal(typeAt(MiB + CHUNK), 3, 'the hole after 1 MiB is hole,zero');
    t.equal(typeAt(4 * MiB - 1), 3, 'the hole at the end is hole,zero');
    t.not(typeAt(2 * MiB), undefined, 'the chunk written live after the snapshot has an extent');
    const text2 = await exec('nbdinfo', ['--map', srv.uri('disk@snap')], { timeoutMs: 30_000 });
    t.equal(text2.code, 0, 'nbdinfo --map (text) exits 0');
    const snapData = await readExport(srv.socket, 'disk@snap', 0, 4 * MiB);
    const want = Buffer.alloc(4 * MiB);
    head.copy(want, 0);
    t.ok(snapData.data?.equals(want), 'disk@snap still reads the content at snapshot time');
  } finally {
    t.equal(await srv.stop(), 0, 'exits 0');
  }
});
