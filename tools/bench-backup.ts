// Backup benchmark (issue 11): an incremental backup from the server's own
// change maps against restic and borg backing up the same snapshot export.
// It measures and prints; it asserts nothing.
//
//   npm run bench -- --backup [--size 8G] [--changes scattered,extents]
//                             [--tools ours,restic,borg,borg-fixed]
//                             [--repos local,s3] [--dir DIR] [--json FILE]
//   (or node dist/tools/bench-backup.js ...)
//
// Setup, per change pattern: a volume of --size, its first half random
// (incompressible) data and its second half a hole, served by this server
// from a unix socket. Snapshot s0; every tool makes a full backup of disk@s0.
// Then 1% of the volume changes, either (scattered) as 64 KiB writes at
// random 64 KiB-aligned offsets or (extents) as 8 contiguous extents, through
// NBD writes to the live export; snapshot s1; every tool makes an
// incremental backup of disk@s1, which is what the table reports:
//   - wall time of the incremental;
//   - bytes read from the volume: the server process's rchar (/proc/PID/io)
//     during the incremental, so the same meter for every tool;
//   - repository growth: the repository's bytes after minus before
//     (files under the directory, or objects under the S3 prefix), and that
//     growth over the changed bytes;
//   - restore MiB/s: volume bytes over the time to restore the incremental
//     into a raw file (checked byte for byte against disk@s1);
//   - verify MiB/s: volume bytes over the time of a full data check
//     (ours: `backup verify --read-data`; restic: `check --read-data`; borg:
//     `check --verify-data`).
// Peers read the export through `nbdcopy URI -` piped into `restic backup
// --stdin` / `borg create ... -` (they cannot see what changed, so they read
// everything; holes come through nbdcopy as zeros without a read from the
// server). borg has no S3 backend: it runs for local repositories only.
// restic and borg repositories are unencrypted / default-keyed (restic needs a
// password: a fixed one), ours unencrypted; compression: restic 0.14 has none,
// borg's default lz4, ours zstd.
import { spawn, spawnSync, type ChildProcess } from 'child_process';
import * as crypto from 'crypto';
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { NbdClient } from '../src/backup/nbd-client';
import { cleanupProcesses, fmtBytes, fmtNum, live, log, parseSize, sleep, stopChild, table, tempPaths, waitSocket, which } from './bench-common';

const ROOT = path.resolve(__dirname, '..', '..');
const CLI = path.join(ROOT, 'bin', 'node-nbd-server.js');
const MiB = 1024 * 1024;
const PASSWORD = 'bench-backup';

type Tool = 'ours' | 'restic' | 'borg' | 'borg-fixed';
type RepoKind = 'local' | 's3';
type Pattern = 'scattered' | 'extents';

interface Options {
  size: number;
  changes: Pattern[];
  tools: Tool[];
  repos: RepoKind[];
  dir: string;
  json?: string;
  keep: boolean;
}

function usage(): never {
  process.stdout.write(`usage: node dist/tools/bench-backup.js [--size 8G] [--changes scattered,extents]
       [--tools ours,restic,borg,borg-fixed] [--repos local,s3] [--dir DIR] [--json FILE] [--keep]
`);
  process.exit(2);
}

function parseArgs(argv: string[]): Options {
  const o: Options = {
    size: 8 * 1024 * MiB,
    changes: ['scattered', 'extents'],
    tools: ['ours', 'restic', 'borg', 'borg-fixed'],
    repos: ['local', 's3'],
    dir: path.join(os.tmpdir(), 'node-nbd-server-bench-backup'),
    keep: false,
  };
  const list = <T extends string>(v: string | undefined, allowed: readonly T[], what: string): T[] => {
    const xs = (v ?? '').split(',').filter(Boolean);
    for (const x of xs) if (!allowed.includes(x as T)) throw new Error(`unknown ${what} "${x}" (one of ${allowed.join(', ')})`);
    return xs as T[];
  };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i]!;
    const v = () => argv[++i] ?? usage();
    switch (a) {
      case '--backup':
        break; // as passed on by `npm run bench -- --backup`
      case '--size':
        o.size = parseSize(v());
        break;
      case '--changes':
        o.changes = list(v(), ['scattered', 'extents'] as const, 'change pattern');
        break;
      case '--tools':
        o.tools = list(v(), ['ours', 'restic', 'borg', 'borg-fixed'] as const, 'tool');
        break;
      case '--repos':
        o.repos = list(v(), ['local', 's3'] as const, 'repository kind');
        break;
      case '--dir':
        o.dir = v();
        break;
      case '--json':
        o.json = v();
        break;
      case '--keep':
        o.keep = true;
        break;
      default:
        usage();
    }
  }
  if (o.size % (64 * 1024 * 8) !== 0) throw new Error('--size must be a multiple of 512 KiB');
  return o;
}

// ------------------------------------------------------------ processes

interface Run {
  code: number | null;
  stdout: string;
  stderr: string;
  seconds: number;
}

/** Runs a shell command line; fails loudly on a non-zero exit. */
function sh(cmd: string, env: NodeJS.ProcessEnv = {}): Run {
  const t0 = performance.now();
  const r = spawnSync('bash', ['-o', 'pipefail', '-c', cmd], {
    env: { ...process.env, ...env },
    encoding: 'utf8',
    maxBuffer: 256 * MiB,
  });
  const run = { code: r.status, stdout: r.stdout ?? '', stderr: r.stderr ?? '', seconds: (performance.now() - t0) / 1000 };
  if (run.code !== 0) throw new Error(`command failed (exit ${run.code}): ${cmd}\n${run.stderr.slice(-2000)}`);
  return run;
}

const q = (s: string) => `'${s.replace(/'/g, `'\\''`)}'`;

function rchar(pid: number): number {
  const m = /^rchar: (\d+)$/m.exec(fs.readFileSync(`/proc/${pid}/io`, 'utf8'));
  return m ? Number(m[1]) : NaN;
}

function dirBytes(dir: string): number {
  let n = 0;
  const walk = (d: string) => {
    for (const e of fs.readdirSync(d, { withFileTypes: true })) {
      const p = path.join(d, e.name);
      if (e.isDirectory()) walk(p);
      else if (e.isFile()) n += fs.statSync(p).size;
    }
  };
  if (fs.existsSync(dir)) walk(dir);
  return n;
}

// ------------------------------------------------------------ S3 (radosgw)

interface S3 {
  endpoint: string;
  env: NodeJS.ProcessEnv;
  stateDir: string;
}

function startRgw(dir: string): S3 {
  const stateDir = path.join(dir, 'rgw');
  fs.rmSync(stateDir, { recursive: true, force: true });
  const script = path.join(ROOT, 'test', 'fixtures', 'rgw-start.sh');
  let out = '';
  for (let attempt = 0; attempt < 5 && !out; attempt++) {
    const port = 20000 + 2 * Math.floor(Math.random() * 10000);
    // bluestore: the repositories of an 8 GiB volume do not fit memstore's RAM.
    const r = spawnSync('bash', [script, stateDir, String(port)], { env: { ...process.env, OSD_STORE: 'bluestore' }, encoding: 'utf8', timeout: 300_000 });
    if (r.status === 0) out = r.stdout;
    else spawnSync('bash', [path.join(ROOT, 'test', 'fixtures', 'rgw-stop.sh'), stateDir]);
  }
  if (!out) throw new Error('radosgw did not start (test/fixtures/rgw-start.sh)');
  const env = Object.fromEntries(out.trim().split('\n').map((l) => [l.slice(0, l.indexOf('=')), l.slice(l.indexOf('=') + 1)]));
  return {
    endpoint: env.S3_ENDPOINT!,
    stateDir,
    env: { AWS_ACCESS_KEY_ID: env.AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY: env.AWS_SECRET_ACCESS_KEY, AWS_REGION: env.AWS_REGION, AWS_ENDPOINT_URL_S3: env.S3_ENDPOINT },
  };
}

async function s3Client(s3: S3) {
  const { S3Client } = await import('@aws-sdk/client-s3');
  return new S3Client({
    endpoint: s3.endpoint,
    region: String(s3.env.AWS_REGION),
    credentials: { accessKeyId: String(s3.env.AWS_ACCESS_KEY_ID), secretAccessKey: String(s3.env.AWS_SECRET_ACCESS_KEY) },
    forcePathStyle: true,
  });
}

async function createBucket(s3: S3, name: string): Promise<void> {
  const { CreateBucketCommand } = await import('@aws-sdk/client-s3');
  const c = await s3Client(s3);
  try {
    await c.send(new CreateBucketCommand({ Bucket: name }));
  } finally {
    c.destroy();
  }
}

async function bucketBytes(s3: S3, bucket: string): Promise<number> {
  const { ListObjectsV2Command } = await import('@aws-sdk/client-s3');
  const c = await s3Client(s3);
  let n = 0;
  try {
    let token: string | undefined;
    do {
      const r = await c.send(new ListObjectsV2Command({ Bucket: bucket, ContinuationToken: token }));
      for (const o of r.Contents ?? []) n += o.Size ?? 0;
      token = r.IsTruncated ? r.NextContinuationToken : undefined;
    } while (token);
  } finally {
    c.destroy();
  }
  return n;
}

// ------------------------------------------------------------ the volume

interface Served {
  child: ChildProcess;
  sock: string;
  image: string;
  name: string;
}

async function serve(image: string, sock: string, logFile: string): Promise<Served> {
  const out = fs.openSync(logFile, 'a');
  const child = spawn(process.execPath, [CLI, 'serve', image, '--socket', sock, '--log-level', 'warn'], { stdio: ['ignore', out, out], detached: true });
  fs.closeSync(out);
  live.add(child);
  await waitSocket(sock, child, logFile, 60_000);
  return { child, sock, image, name: path.basename(image).replace(/\.[^.]*$/, '') };
}

function uri(v: Served, snapshot?: string): string {
  return `nbd+unix:///${encodeURIComponent(snapshot ? `${v.name}@${snapshot}` : v.name)}?socket=${v.sock}`;
}

/** First half: random data (incompressible); second half: a hole. */
function makeImage(file: string, size: number): void {
  fs.rmSync(file, { force: true });
  fs.rmSync(`${file}.nbd`, { recursive: true, force: true });
  const fd = fs.openSync(file, 'w');
  try {
    const buf = Buffer.alloc(4 * MiB);
    for (let off = 0; off < size / 2; off += buf.length) {
      crypto.randomFillSync(buf);
      fs.writeSync(fd, buf, 0, Math.min(buf.length, size / 2 - off), off);
    }
    fs.ftruncateSync(fd, size);
    fs.fsyncSync(fd);
  } finally {
    fs.closeSync(fd);
  }
}

/** Changes 1% of the volume through NBD writes; returns the bytes changed. */
async function change(v: Served, size: number, pattern: Pattern): Promise<number> {
  const c = await NbdClient.connect(uri(v));
  const total = size / 100;
  const piece = 64 * 1024;
  let changed = 0;
  try {
    if (pattern === 'scattered') {
      const slots = size / piece;
      const picked = new Set<number>();
      while (picked.size * piece < total) picked.add(crypto.randomInt(slots));
      for (const s of picked) {
        await c.write(s * piece, crypto.randomBytes(piece));
        changed += piece;
      }
    } else {
      const extent = Math.floor(total / 8 / piece) * piece;
      const stride = Math.floor(size / 8 / piece) * piece;
      for (let e = 0; e < 8; e++) {
        const base = e * stride + crypto.randomInt(Math.max(1, (stride - extent) / piece)) * piece;
        for (let off = 0; off < extent; off += MiB) {
          const n = Math.min(MiB, extent - off);
          await c.write(base + off, crypto.randomBytes(n));
          changed += n;
        }
      }
    }
    await c.flush();
  } finally {
    await c.close();
  }
  return changed;
}

function snapshot(v: Served, name: string): void {
  sh(`${q(process.execPath)} ${q(CLI)} snapshot create ${q(v.image)} ${q(name)}`);
}

// ------------------------------------------------------------ the tools

interface Repo {
  tool: Tool;
  kind: RepoKind;
  /** Where it lives: a directory, or s3://bucket/prefix (restic: its own URL). */
  location: string;
  bytes(): Promise<number>;
  env: NodeJS.ProcessEnv;
}

interface Result {
  pattern: Pattern;
  tool: Tool;
  repo: RepoKind;
  changedBytes: number;
  fullSeconds: number;
  incrSeconds: number;
  bytesRead: number;
  growth: number;
  restoreMiBs: number;
  verifyMiBs: number;
  restoreExact: boolean;
}

function node(args: string): string {
  return `${q(process.execPath)} ${q(CLI)} ${args}`;
}

async function initRepo(tool: Tool, kind: RepoKind, work: string, s3: S3 | null, tag: string): Promise<Repo> {
  if (kind === 's3') {
    const bucket = `bench-${tag}-${tool}`.toLowerCase();
    await createBucket(s3!, bucket);
    const env = { ...s3!.env, RESTIC_PASSWORD: PASSWORD };
    const location = tool === 'restic' ? `s3:${s3!.endpoint}/${bucket}/repo` : `s3://${bucket}/repo`;
    if (tool === 'restic') sh(`restic -r ${q(location)} init`, env);
    if (tool === 'ours') sh(node(`backup init ${q(location)}`), env);
    return { tool, kind, location, env, bytes: () => bucketBytes(s3!, bucket) };
  }
  const location = path.join(work, `repo-${tool}`);
  fs.rmSync(location, { recursive: true, force: true });
  const env: NodeJS.ProcessEnv = { RESTIC_PASSWORD: PASSWORD, BORG_PASSPHRASE: '', BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK: 'yes', BORG_RELOCATED_REPO_ACCESS_IS_OK: 'yes' };
  if (tool === 'restic') sh(`restic -r ${q(location)} init`, env);
  if (tool === 'ours') sh(node(`backup init ${q(location)}`), env);
  if (tool === 'borg' || tool === 'borg-fixed') sh(`borg init --encryption=none ${q(location)}`, env);
  return { tool, kind, location, env, bytes: async () => dirBytes(location) };
}

/** One backup of disk@snap; returns the tool's id for it. */
function backupWith(r: Repo, v: Served, snap: string): string {
  const src = uri(v, snap);
  switch (r.tool) {
    case 'ours': {
      const out = sh(node(`backup create ${q(v.image)} --repo ${q(r.location)} --snapshot ${q(snap)} --wait --json`), r.env).stdout;
      const j = JSON.parse(out) as { state?: string; backup?: string; result?: { backup?: string } };
      if (j.state !== 'done') throw new Error(`backup create ended ${j.state}: ${out.slice(0, 500)}`);
      const id = j.result?.backup ?? j.backup;
      if (!id) throw new Error(`backup create printed no id: ${out.slice(0, 500)}`);
      return id;
    }
    case 'restic':
      sh(`nbdcopy ${q(src)} - | restic -r ${q(r.location)} backup --stdin --stdin-filename disk.img --tag ${q(snap)} -q`, r.env);
      return snap;
    case 'borg':
    case 'borg-fixed': {
      const chunker = r.tool === 'borg-fixed' ? '--chunker-params fixed,4194304' : '';
      sh(`nbdcopy ${q(src)} - | borg create ${chunker} ${q(`${r.location}::${snap}`)} -`, r.env);
      return snap;
    }
  }
}

function restoreWith(r: Repo, id: string, target: string): void {
  fs.rmSync(target, { force: true });
  switch (r.tool) {
    case 'ours':
      sh(node(`backup restore ${q(r.location)} ${q(id)} ${q(target)}`), r.env);
      return;
    case 'restic':
      sh(`restic -r ${q(r.location)} dump --tag ${q(id)} latest disk.img > ${q(target)}`, r.env);
      return;
    case 'borg':
    case 'borg-fixed':
      sh(`borg extract --stdout ${q(`${r.location}::${id}`)} > ${q(target)}`, r.env);
  }
}

function verifyWith(r: Repo, id: string): void {
  switch (r.tool) {
    case 'ours':
      sh(node(`backup verify ${q(r.location)} ${q(id)} --read-data`), r.env);
      return;
    case 'restic':
      sh(`restic -r ${q(r.location)} check --read-data -q`, r.env);
      return;
    case 'borg':
    case 'borg-fixed':
      sh(`borg check --verify-data ${q(r.location)}`, r.env);
  }
}

function available(tool: Tool): string | null {
  if (tool === 'ours') return fs.existsSync(path.join(ROOT, 'dist', 'src', 'cli', 'main.js')) ? null : 'not built';
  if (!which('nbdcopy')) return 'nbdcopy missing (libnbd-bin)';
  if (tool === 'restic') return which('restic') ? null : 'restic missing';
  return which('borg') ? null : 'borg missing (borgbackup)';
}

// ------------------------------------------------------------ main

async function benchPattern(o: Options, pattern: Pattern, s3: S3 | null): Promise<Result[]> {
  const work = path.join(o.dir, pattern);
  fs.mkdirSync(work, { recursive: true });
  const image = path.join(work, 'disk.img');
  log(`[${pattern}] volume: ${fmtBytes(o.size)}, first half random`);
  makeImage(image, o.size);
  const v = await serve(image, path.join(work, 'nbd.sock'), path.join(work, 'server.log'));
  const results: Result[] = [];
  try {
    snapshot(v, 's0');
    const repos: Repo[] = [];
    for (const kind of o.repos) {
      for (const tool of o.tools) {
        if (kind === 's3' && tool.startsWith('borg')) continue; // borg has no S3 backend
        repos.push(await initRepo(tool, kind, work, s3, `${pattern}-${kind}`));
      }
    }
    const full = new Map<Repo, number>();
    for (const r of repos) {
      log(`[${pattern}] full backup: ${r.tool} (${r.kind})`);
      const t0 = performance.now();
      backupWith(r, v, 's0');
      full.set(r, (performance.now() - t0) / 1000);
    }
    const changedBytes = await change(v, o.size, pattern);
    snapshot(v, 's1');
    const expected = path.join(work, 'expected.img');
    sh(`nbdcopy ${q(uri(v, 's1'))} ${q(expected)}`);
    for (const r of repos) {
      log(`[${pattern}] incremental: ${r.tool} (${r.kind})`);
      const before = await r.bytes();
      const read0 = rchar(v.child.pid!);
      const t0 = performance.now();
      const id = backupWith(r, v, 's1');
      const incrSeconds = (performance.now() - t0) / 1000;
      const bytesRead = rchar(v.child.pid!) - read0;
      const growth = (await r.bytes()) - before;
      const target = path.join(work, 'restored.img');
      const t1 = performance.now();
      restoreWith(r, id, target);
      const restoreSeconds = (performance.now() - t1) / 1000;
      const restoreExact = spawnSync('cmp', ['-s', expected, target]).status === 0;
      fs.rmSync(target, { force: true });
      const t2 = performance.now();
      verifyWith(r, id);
      const verifySeconds = (performance.now() - t2) / 1000;
      results.push({
        pattern,
        tool: r.tool,
        repo: r.kind,
        changedBytes,
        fullSeconds: full.get(r)!,
        incrSeconds,
        bytesRead,
        growth,
        restoreMiBs: o.size / MiB / restoreSeconds,
        verifyMiBs: o.size / MiB / verifySeconds,
        restoreExact,
      });
    }
  } finally {
    await stopChild(v.child);
    if (!o.keep) fs.rmSync(work, { recursive: true, force: true });
  }
  return results;
}

async function main(): Promise<void> {
  const o = parseArgs(process.argv.slice(2));
  const missing = o.tools.map((t) => [t, available(t)] as const).filter(([, why]) => why);
  for (const [t, why] of missing) log(`skipping ${t}: ${why}`);
  o.tools = o.tools.filter((t) => !missing.some(([m]) => m === t));
  fs.mkdirSync(o.dir, { recursive: true });
  if (!o.keep) tempPaths.add(o.dir);
  const s3 = o.repos.includes('s3') ? startRgw(o.dir) : null;
  const results: Result[] = [];
  try {
    for (const p of o.changes) results.push(...(await benchPattern(o, p, s3)));
  } finally {
    if (s3) spawnSync('bash', [path.join(ROOT, 'test', 'fixtures', 'rgw-stop.sh'), s3.stateDir], { stdio: 'ignore' });
  }
  process.stdout.write(
    `\nincremental backup of 1% changed (${fmtBytes(o.size)} volume, half random data); ` +
      `full backup time for reference; ratios against ours on the same repository kind\n\n`,
  );
  const ours = (r: Result) => results.find((x) => x.tool === 'ours' && x.pattern === r.pattern && x.repo === r.repo);
  const rows = [['changes', 'tool', 'repo', 'full s', 'incr s', 'x ours', 'read', 'growth', 'growth/changed', 'restore MiB/s', 'verify MiB/s', 'restore exact']];
  for (const r of results) {
    const base = ours(r);
    rows.push([
      r.pattern,
      r.tool,
      r.repo,
      fmtNum(r.fullSeconds, 1),
      fmtNum(r.incrSeconds, 2),
      base ? fmtNum(r.incrSeconds / base.incrSeconds, 1) : '-',
      fmtBytes(r.bytesRead),
      fmtBytes(r.growth),
      fmtNum(r.growth / r.changedBytes, 2),
      fmtNum(r.restoreMiBs, 0),
      fmtNum(r.verifyMiBs, 0),
      r.restoreExact ? 'yes' : 'NO',
    ]);
  }
  process.stdout.write(table(rows, [false, false, false, true, true, true, true, true, true, true, true, false]) + '\n');
  if (o.json) fs.writeFileSync(o.json, JSON.stringify({ size: o.size, results }, null, 2));
}

process.on('SIGINT', () => {
  cleanupProcesses();
  process.exit(130);
});
main()
  .catch((err) => {
    log(String(err instanceof Error ? (err.stack ?? err.message) : err));
    process.exitCode = 1;
  })
  .finally(() => {
    cleanupProcesses();
    void sleep(0);
  });
