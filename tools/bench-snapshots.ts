// Snapshot benchmark: what copy-on-write snapshots cost node-nbd-server, next
// to qemu-nbd serving a qcow2 with internal snapshots. It measures and
// prints; it asserts nothing.
//
//   node dist/tools/bench-snapshots.js [--size 2G] [--runtime 10] [--ramp 2]
//        [--repeat 1] [--servers node,qemu] [--snapshots 32] [--between-writes 1024]
//        [--min-first-writes 0.9] [--creates 10] [--big-size 1T]
//        [--parts randwrite,create] [--dir DIR] [--json FILE] [--node-threads N] [--keep]
//
// Part "randwrite" (per repeat, node-nbd-server and qemu-nbd in turn, order
// rotated per repeat), fio's nbd engine over a unix socket, 4k randwrite QD32:
//   no-snap    no snapshot
//   first@1    right after snapshot 1: first writes (each mostly hits a chunk
//              not yet preserved); capped at a number of writes so that the
//              expected share of first writes stays >= --min-first-writes
//   (overwrite the whole volume once with 1 MiB sequential writes)
//   steady@1   after that overwrite: every chunk is already preserved
//   (snapshots 2..32, each after --between-writes random 4k writes)
//   first@32   right after the 32nd snapshot (first writes again, same cap)
//   (overwrite the whole volume once more)
//   steady@32  after that overwrite
// node-nbd-server serves a raw image (snapshots taken online with
// `node-nbd-server snapshot create`); qemu-nbd serves a qcow2 converted from
// the same raw image (cluster size = node-nbd-server's chunk size, --chunk-size
// size; `qemu-img snapshot -c` while qemu-nbd is stopped, then restarted).
//
// Part "create" (node-nbd-server; qemu-img as a reference): a sparse 1 TiB
// volume, snapshot create latency (online CLI total time, and the server's own
// `snapshot created` ms from its info log), server RSS with 0 and N snapshots.
//
// Each repeat starts with two 3 s fio probes of write + fdatasync on the disk
// under --dir: first writes wait for fdatasyncs, so their IOPS follow the
// disk's sync latency, which other load on the machine changes a lot.
import { spawn, ChildProcess } from 'child_process';
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import {
  cleanupProcesses,
  ensureImage,
  exited,
  firstLine,
  fmtBytes,
  fmtNum,
  killTree,
  live,
  log,
  median,
  parseSize,
  sleep,
  stopChild,
  table,
  tail,
  tempPaths,
  unixUri,
  verifyExport,
  waitSocket,
  which,
} from './bench-common';
import { DEFAULT_CHUNK_SIZE } from '../src/volume-meta';
import { parseSize as parseAnySize } from '../src/size';

const ROOT = path.resolve(__dirname, '..', '..');
const NODE_CLI = path.join(ROOT, 'bin', 'node-nbd-server.js');
const KiB = 1024;
const MiB = 1024 * KiB;
const GiB = 1024 * MiB;
const TiB = 1024 * GiB;
/**
 * Chunk size of node-nbd-server (`serve --chunk-size`) and cluster size of the
 * qcow2: --chunk-size, default node-nbd-server's default. Set once by parseArgs.
 */
let CHUNK = DEFAULT_CHUNK_SIZE;

// ---------------------------------------------------------------- options

type ServerId = 'node' | 'qemu';
const SERVER_IDS: ServerId[] = ['node', 'qemu'];
type Part = 'randwrite' | 'create';
const PARTS: Part[] = ['randwrite', 'create'];

interface Options {
  size: number;
  runtime: number;
  ramp: number;
  repeat: number;
  servers: ServerId[];
  snapshots: number;
  betweenWrites: number;
  minFirstWrites: number;
  creates: number;
  bigSize: number;
  parts: Part[];
  dir: string;
  json?: string;
  nodeThreads?: number;
  keep: boolean;
}

const USAGE = `usage: node dist/tools/bench-snapshots.js [options]

Copy-on-write snapshot benchmark: node-nbd-server (raw image, online
snapshots) next to qemu-nbd (qcow2, internal snapshots taken with qemu-img
while qemu-nbd is stopped), fio's nbd engine over unix sockets.

Part "randwrite", 4k randwrite QD32, in this order on one volume per server:
  no-snap     no snapshot
  first@1     right after snapshot 1 (first writes to not yet preserved chunks)
  steady@1    after the whole volume was overwritten once since snapshot 1
  first@N     right after snapshot N (snapshots 2..N each after some writes)
  steady@N    after the whole volume was overwritten once since snapshot N
  Targets: first@1 >= 0.5x no-snap; first@N >= 0.9x first@1 (and steady@N
  >= 0.9x steady@1). Ratios are computed per repeat, then the median is shown.
Part "create" (node-nbd-server): a sparse --big-size volume, snapshot create
  latency (CLI total and server-side) over --creates snapshots, server RSS with
  0 and --creates snapshots; qemu-img snapshot -c on a qcow2 as a reference.
Each repeat starts with 3 s probes of the disk's write + fdatasync rate (4k
overwrite; 64 KiB allocating append): first writes wait for fdatasyncs, and
other load on the machine changes how long those take.

  --size SIZE             randwrite volume size (default 2G): 1G, 2G, 4G
  --runtime SECONDS       measured time of the timed runs (default 10); also the
                          time limit of a first-writes run
  --ramp SECONDS          fio ramp_time of the timed runs (default 2; first-writes
                          runs have none: a ramp would use up fresh chunks)
  --repeat N              repeat everything N times, report medians (default 1)
  --servers LIST          comma list of ${SERVER_IDS.join(',')} (default both)
  --snapshots N           snapshots before the last first-writes run (default 32)
  --between-writes N      random 4k writes before each of snapshots 2..N (default 1024)
  --min-first-writes F    cap first-writes runs at the number of random 4k writes
                          for which the expected share of writes that hit a not
                          yet preserved chunk is >= F (default 0.9)
  --chunk-size SIZE       node-nbd-server chunk size and qcow2 cluster size
                          (default: node-nbd-server's default chunk size)
  --creates N             snapshots created on the big volume (default 10)
  --big-size SIZE         size of the sparse volume of part "create" (default 1T)
  --parts LIST            comma list of ${PARTS.join(',')} (default both)
  --dir DIR               where the images live (default ${path.join(os.tmpdir(), 'node-nbd-server-bench-snapshots')});
                          the raw image is kept for reuse, snapshot stores and
                          qcow2 files are removed at the end
  --json FILE             also write machine-readable results to FILE
  --node-threads N        pass --threads N to node-nbd-server
  --keep                  keep snapshot stores and qcow2 files at the end
  -h, --help              this text
`;


function integer(name: string, s: string | undefined, min: number): number {
  const n = Number(s);
  if (s === undefined || !Number.isInteger(n) || n < min) throw new Error(`${name} needs an integer >= ${min}, got "${s}"`);
  return n;
}

function parseArgs(argv: string[]): Options {
  const o: Options = {
    size: 2 * GiB,
    runtime: 10,
    ramp: 2,
    repeat: 1,
    servers: [...SERVER_IDS],
    snapshots: 32,
    betweenWrites: 1024,
    minFirstWrites: 0.9,
    creates: 10,
    bigSize: TiB,
    parts: [...PARTS],
    dir: path.join(os.tmpdir(), 'node-nbd-server-bench-snapshots'),
    keep: false,
  };
  for (let i = 0; i < argv.length; i++) {
    let arg = argv[i];
    let value: string | undefined;
    const eq = arg.indexOf('=');
    if (arg.startsWith('--') && eq > 0) {
      value = arg.slice(eq + 1);
      arg = arg.slice(0, eq);
    }
    const next = (): string => {
      if (value !== undefined) return value;
      if (i + 1 >= argv.length) throw new Error(`${arg} needs a value`);
      return argv[++i];
    };
    const list = <T extends string>(known: readonly T[], what: string): T[] => {
      const l = next().split(',').map((s) => s.trim()).filter(Boolean);
      for (const x of l) if (!known.includes(x as T)) throw new Error(`unknown ${what} "${x}" (known: ${known.join(', ')})`);
      return known.filter((k) => l.includes(k));
    };
    switch (arg) {
      case '-h':
      case '--help':
        process.stdout.write(USAGE);
        process.exit(0);
      case '--size':
        o.size = parseSize(next());
        break;
      case '--runtime':
        o.runtime = integer('--runtime', next(), 1);
        break;
      case '--ramp':
      case '--ramp-time':
        o.ramp = integer('--ramp', next(), 0);
        break;
      case '--repeat':
        o.repeat = integer('--repeat', next(), 1);
        break;
      case '--servers':
        o.servers = list(SERVER_IDS, 'server');
        break;
      case '--snapshots':
        o.snapshots = integer('--snapshots', next(), 2);
        break;
      case '--between-writes':
        o.betweenWrites = integer('--between-writes', next(), 0);
        break;
      case '--min-first-writes': {
        const v = Number(next());
        if (!(v > 0 && v < 1)) throw new Error('--min-first-writes needs a number between 0 and 1');
        o.minFirstWrites = v;
        break;
      }
      case '--chunk-size':
        CHUNK = parseAnySize(next());
        if (CHUNK < 4 * KiB || CHUNK > MiB || (CHUNK & (CHUNK - 1)) !== 0) throw new Error('--chunk-size must be a power of two from 4K to 1M');
        break;
      case '--creates':
        o.creates = integer('--creates', next(), 1);
        break;
      case '--big-size':
        o.bigSize = parseSize(next());
        break;
      case '--parts':
        o.parts = list(PARTS, 'part');
        break;
      case '--dir':
        o.dir = path.resolve(next());
        break;
      case '--json':
        o.json = path.resolve(next());
        break;
      case '--node-threads':
        o.nodeThreads = integer('--node-threads', next(), 1);
        break;
      case '--keep':
        o.keep = true;
        break;
      default:
        throw new Error(`unknown option "${arg}"\n\n${USAGE}`);
    }
  }
  if (o.servers.length === 0) throw new Error('--servers selects nothing');
  if (o.parts.length === 0) throw new Error('--parts selects nothing');
  if (o.size % CHUNK !== 0) throw new Error(`--size must be a multiple of the chunk size (${CHUNK})`);
  return o;
}

// ---------------------------------------------------------- process hygiene

// Every process we start is registered so that it is killed on any exit path.


function cleanupSync(): void {
  cleanupProcesses();
}

process.on('exit', cleanupSync);
for (const sig of ['SIGINT', 'SIGTERM', 'SIGHUP'] as const) {
  process.on(sig, () => {
    process.stderr.write(`\nbench-snapshots: ${sig}, stopping servers and cleaning up\n`);
    cleanupSync();
    process.exit(128 + (os.constants.signals[sig] ?? 1));
  });
}



function nowMs(): number {
  return Number(process.hrtime.bigint()) / 1e6;
}






interface CmdResult {
  code: number | null;
  stdout: string;
  stderr: string;
  ms: number;
}

/** Run a command to its end (own process group, registered for cleanup) and time it. */
async function runCmd(cmd: string, args: string[], timeoutMs = 120_000): Promise<CmdResult> {
  const t0 = nowMs();
  const child = spawn(cmd, args, { detached: true, stdio: ['ignore', 'pipe', 'pipe'] });
  live.add(child);
  let stdout = '';
  let stderr = '';
  child.stdout!.on('data', (d: Buffer) => (stdout += d.toString('utf8')));
  child.stderr!.on('data', (d: Buffer) => (stderr += d.toString('utf8')));
  const timer = setTimeout(() => killTree(child, 'SIGKILL'), timeoutMs);
  const code = await new Promise<number | null>((resolve) => {
    child.once('error', (e) => {
      stderr += e.message;
      resolve(-1);
    });
    child.once('close', (c) => resolve(c));
  });
  const ms = nowMs() - t0;
  clearTimeout(timer);
  live.delete(child);
  return { code, stdout, stderr, ms };
}

async function mustRun(cmd: string, args: string[], timeoutMs?: number): Promise<CmdResult> {
  const r = await runCmd(cmd, args, timeoutMs);
  if (r.code !== 0) throw new Error(`${cmd} ${args.join(' ')} failed (${r.code}): ${(r.stderr || r.stdout).trim()}`);
  return r;
}





/** VmRSS (or another /proc/PID/status kB field) of a process in bytes. */
function rssOf(pid: number | undefined, field = 'VmRSS'): number {
  if (!pid) return NaN;
  try {
    const m = new RegExp(`^${field}:\\s+(\\d+)\\s+kB`, 'm').exec(fs.readFileSync(`/proc/${pid}/status`, 'utf8'));
    return m ? Number(m[1]) * KiB : NaN;
  } catch {
    return NaN;
  }
}

function fsyncFile(file: string): void {
  const fd = fs.openSync(file, 'r+');
  try {
    fs.fsyncSync(fd);
  } finally {
    fs.closeSync(fd);
  }
}

/**
 * Modification times of what node-nbd-server runs from (its addon and the
 * compiled TypeScript), to tell when something was rebuilt during the run:
 * every server start and CLI command loads them afresh.
 */
function buildStamp(): Record<string, string> {
  const files = [path.join(ROOT, 'build', 'Release', 'nbd_native.node'), path.join(ROOT, 'dist', 'src', 'snapshots.js'), path.join(ROOT, 'dist', 'src', 'server.js')];
  const out: Record<string, string> = {};
  for (const f of files) {
    try {
      out[path.relative(ROOT, f)] = fs.statSync(f).mtime.toISOString();
    } catch {
      out[path.relative(ROOT, f)] = 'missing';
    }
  }
  return out;
}

// ------------------------------------------------------------------- image


// ----------------------------------------------------------------- servers

let tagN = 0;
function nextTag(what: string): string {
  return `${what}-${tagN++}`;
}

type LogEvent = Record<string, unknown>;

/** node-nbd-server serving one image on a unix socket, info log parsed from stderr. */
class NodeServer {
  readonly events: LogEvent[] = [];
  private waiters: Array<() => void> = [];
  private constructor(
    readonly child: ChildProcess,
    readonly sock: string,
    readonly uri: string,
    readonly logFile: string,
    private readonly logStream: fs.WriteStream,
  ) {}

  static async start(image: string, work: string, opts: Options, size: number): Promise<NodeServer> {
    const tag = nextTag('node');
    const sock = path.join(work, `${tag}.sock`);
    const logFile = path.join(work, `${tag}.log`);
    // info level: the server logs `snapshot created` with its own ms there.
    const args = [NODE_CLI, 'serve', image, '--socket', sock, '--log-level', 'info', '--chunk-size', String(CHUNK)];
    if (opts.nodeThreads) args.push('--threads', String(opts.nodeThreads));
    const child = spawn(process.execPath, args, { detached: true, stdio: ['ignore', 'pipe', 'pipe'] });
    live.add(child);
    child.on('exit', () => live.delete(child));
    const logStream = fs.createWriteStream(logFile, { flags: 'a' });
    const srv = new NodeServer(child, sock, unixUri(sock), logFile, logStream);
    let errBuf = '';
    child.stderr!.on('data', (d: Buffer) => {
      logStream.write(d);
      errBuf += d.toString('utf8');
      let nl: number;
      while ((nl = errBuf.indexOf('\n')) >= 0) {
        const line = errBuf.slice(0, nl);
        errBuf = errBuf.slice(nl + 1);
        try {
          srv.events.push(JSON.parse(line) as LogEvent);
        } catch {
          /* not JSON */
        }
      }
      const w = srv.waiters;
      srv.waiters = [];
      for (const f of w) f();
    });
    try {
      await new Promise<void>((resolve, reject) => {
        let buf = '';
        let settled = false;
        const settle = (err?: Error) => {
          if (settled) return;
          settled = true;
          clearTimeout(timer);
          if (err) reject(err);
          else resolve();
        };
        const timer = setTimeout(() => settle(new Error(`node-nbd-server not ready within 30 s:\n${tail(logFile)}`)), 30_000);
        const fail = (why: string) => setTimeout(() => settle(new Error(`node-nbd-server ${why}:\n${tail(logFile)}`)), 100);
        child.once('error', (e) => fail(`failed to start: ${e.message}`));
        child.once('exit', (code, sig) => fail(`exited early (${code ?? sig})`));
        child.stdout!.on('data', (d: Buffer) => {
          buf += d.toString('utf8');
          for (const line of buf.split('\n')) {
            try {
              if ((JSON.parse(line) as { ready?: boolean }).ready === true) settle();
            } catch {
              /* not JSON (yet) */
            }
          }
        });
      });
      verifyExport(srv.uri, size, logFile);
    } catch (err) {
      await srv.stop();
      throw err;
    }
    return srv;
  }

  get pid(): number | undefined {
    return this.child.pid;
  }

  /** Waits (up to ms) for a log event matching pred. */
  async waitEvent(pred: (e: LogEvent) => boolean, ms: number): Promise<LogEvent | undefined> {
    const deadline = Date.now() + ms;
    for (;;) {
      const e = this.events.find(pred);
      if (e) return e;
      const left = deadline - Date.now();
      if (left <= 0 || exited(this.child)) return undefined;
      await new Promise<void>((resolve) => {
        const t = setTimeout(resolve, Math.min(left, 100));
        this.waiters.push(() => {
          clearTimeout(t);
          resolve();
        });
      });
    }
  }

  async stop(): Promise<void> {
    await stopChild(this.child);
    await new Promise<void>((r) => this.logStream.end(r));
    fs.rmSync(this.sock, { force: true });
  }
}

/** qemu-nbd serving a qcow2 on a unix socket. */
class QemuServer {
  private constructor(
    readonly child: ChildProcess,
    readonly sock: string,
    readonly uri: string,
  ) {}

  static async start(qcow2: string, work: string, size: number, verify: boolean): Promise<QemuServer> {
    const tag = nextTag('qemu');
    const sock = path.join(work, `${tag}.sock`);
    const logFile = path.join(work, `${tag}.log`);
    const fd = fs.openSync(logFile, 'a');
    let child: ChildProcess;
    try {
      const args = ['-t', '-f', 'qcow2', '--cache=writeback', '--shared=8', '-k', sock, qcow2];
      fs.writeSync(fd, `$ qemu-nbd ${args.join(' ')}\n`);
      child = spawn('qemu-nbd', args, { detached: true, stdio: ['ignore', fd, fd] });
    } finally {
      fs.closeSync(fd);
    }
    live.add(child);
    child.on('exit', () => live.delete(child));
    const srv = new QemuServer(child, sock, unixUri(sock));
    try {
      await waitSocket(sock, child, logFile);
      if (verify) verifyExport(srv.uri, size, logFile);
    } catch (err) {
      await srv.stop();
      throw err;
    }
    return srv;
  }

  async stop(): Promise<void> {
    // Waiting for the exit matters: qemu-nbd holds the image's write lock until then.
    await stopChild(this.child);
    fs.rmSync(this.sock, { force: true });
  }
}

// --------------------------------------------------------------------- fio

interface FioResult {
  iops: number;
  mibs: number;
  p99us: number;
  meanUs: number;
  ios: number; // write I/Os counted (after the ramp)
  secs: number; // measured time
}

interface FioRun {
  rw: 'randwrite' | 'write';
  bs: string;
  iodepth: number;
  size: number;
  timed?: { runtime: number; ramp: number }; // time_based
  numberIos?: number; // stop after this many I/Os
  limitSecs?: number; // runtime limit of a non-time-based run
  seed: number;
  norandommap?: boolean;
}

let currentFio: ChildProcess | undefined;

async function runFio(uri: string, r: FioRun, work: string): Promise<FioResult> {
  const out = path.join(work, `${nextTag('fio')}.json`);
  const args = [
    '--name=bench',
    '--ioengine=nbd',
    `--uri=${uri}`,
    `--rw=${r.rw}`,
    `--bs=${r.bs}`,
    `--iodepth=${r.iodepth}`,
    '--numjobs=1',
    // A thread of this fio process (not a forked session leader), so that
    // killing fio really stops the I/O.
    '--thread',
    `--size=${r.size}`,
    // Distinct, reproducible offsets per run (fio repeats the same sequence
    // by default), the same for both servers.
    `--randseed=${r.seed}`,
    '--output-format=json',
    `--output=${out}`,
  ];
  if (r.norandommap) args.push('--norandommap');
  if (r.timed) args.push('--time_based', `--runtime=${r.timed.runtime}`, `--ramp_time=${r.timed.ramp}`);
  else if (r.limitSecs) args.push(`--runtime=${r.limitSecs}`);
  if (r.numberIos !== undefined) args.push(`--number_ios=${r.numberIos}`);
  const child = spawn('fio', args, { detached: true, stdio: ['ignore', 'pipe', 'pipe'] });
  live.add(child);
  currentFio = child;
  let stderr = '';
  child.stderr!.on('data', (d: Buffer) => (stderr += d.toString('utf8')));
  child.stdout!.resume();
  const limitSecs = r.timed ? r.timed.runtime + r.timed.ramp : (r.limitSecs ?? 3600);
  const timer = setTimeout(() => killTree(child, 'SIGKILL'), (limitSecs + 120) * 1000);
  const code = await new Promise<number | null>((resolve) => {
    child.once('error', (e) => {
      stderr += e.message;
      resolve(-1);
    });
    child.once('exit', (c) => resolve(c));
  });
  clearTimeout(timer);
  live.delete(child);
  currentFio = undefined;
  let text = '';
  try {
    text = fs.readFileSync(out, 'utf8');
  } catch {
    /* no output */
  }
  fs.rmSync(out, { force: true });
  if (code !== 0) throw new Error(`fio exited with ${code}: ${stderr.trim() || text.trim().slice(0, 500)}`);
  const start = text.indexOf('{'); // fio may print informational lines first
  if (start < 0) throw new Error(`fio wrote no JSON: ${stderr.trim()}`);
  const doc = JSON.parse(text.slice(start)) as { jobs: Array<{ error: number; write: FioDir }> };
  const job = doc.jobs[0];
  if (job.error) throw new Error(`fio job error ${job.error}: ${stderr.trim()}`);
  const w = job.write;
  return {
    iops: w.iops,
    mibs: w.bw_bytes / MiB,
    p99us: (w.clat_ns?.percentile?.['99.000000'] ?? NaN) / 1000,
    meanUs: (w.clat_ns?.mean ?? NaN) / 1000,
    ios: w.total_ios,
    secs: w.runtime / 1000,
  };
}

interface FioDir {
  iops: number;
  bw_bytes: number;
  total_ios: number;
  runtime: number; // ms
  clat_ns?: { mean?: number; percentile?: Record<string, number> };
}

interface SyncProbe {
  iops: number; // writes, each followed by fdatasync
  syncMeanUs: number;
  syncP99Us: number;
}

type ProbeKind = 'overwrite' | 'append';

/**
 * How fast the disk under --dir completes fdatasync right now, 3 s of fio psync:
 *   overwrite: 4k random writes into a laid-out file, fdatasync after each
 *              (no metadata to commit);
 *   append:    64 KiB sequential writes into a new file without fallocate,
 *              fdatasync after each (block allocation: a journal commit each),
 *              which is what preserving a chunk in a snapshot store resembles.
 * First writes wait for fdatasyncs (group-committed), so these are the
 * yardstick for first@ runs; they vary with other load on the machine.
 */
async function syncProbe(kind: ProbeKind, dir: string, work: string): Promise<SyncProbe> {
  const file = path.join(dir, `sync-probe-${kind}-${process.pid}.tmp`);
  const out = path.join(work, `${nextTag('probe')}.json`);
  tempPaths.add(file);
  fs.rmSync(file, { force: true });
  const shape =
    kind === 'overwrite'
      ? ['--size=64M', '--rw=randwrite', '--bs=4k', '--time_based']
      : ['--size=1G', '--rw=write', '--bs=64k', '--fallocate=none'];
  try {
    await mustRun('fio', [
      '--name=probe',
      `--filename=${file}`,
      ...shape,
      '--ioengine=psync',
      '--fdatasync=1',
      '--runtime=3',
      '--output-format=json',
      `--output=${out}`,
    ]);
    const text = fs.readFileSync(out, 'utf8');
    const doc = JSON.parse(text.slice(text.indexOf('{'))) as {
      jobs: Array<{ write: FioDir; sync?: { lat_ns?: { mean?: number; percentile?: Record<string, number> } } }>;
    };
    const j = doc.jobs[0];
    return {
      iops: j.write.iops,
      syncMeanUs: (j.sync?.lat_ns?.mean ?? NaN) / 1000,
      syncP99Us: (j.sync?.lat_ns?.percentile?.['99.000000'] ?? NaN) / 1000,
    };
  } finally {
    fs.rmSync(file, { force: true });
    fs.rmSync(out, { force: true });
    tempPaths.delete(file);
  }
}

// ------------------------------------------------------ first-write budget

/**
 * Expected share of k uniformly random writes over n chunks that land on a
 * chunk no earlier write of the run touched: (n/k)(1 - (1 - 1/n)^k).
 */
function expectedFirstShare(k: number, n: number): number {
  if (k <= 0) return 1;
  return (n / k) * (1 - Math.pow(1 - 1 / n, k));
}

/** Largest number of writes whose expected first-write share is >= minShare. */
function firstWriteBudget(n: number, minShare: number): number {
  let lo = 1;
  let hi = 100 * n;
  while (lo < hi) {
    const mid = Math.ceil((lo + hi) / 2);
    if (expectedFirstShare(mid, n) >= minShare) lo = mid;
    else hi = mid - 1;
  }
  return lo;
}

// --------------------------------------------------------------- targets

interface CreateSample {
  /** node: `snapshot create` CLI wall time (online); qemu: `qemu-img snapshot -c` wall time (offline). */
  cmdMs: number;
  /** node: the server's own `snapshot created` ms. */
  serverMs?: number;
  /** qemu: qemu-nbd stop + qemu-img snapshot -c + qemu-nbd start until it listens. */
  downtimeMs?: number;
}

interface Target {
  id: ServerId;
  label: string;
  uri(): string;
  /** Fresh volume without snapshots, server started. */
  setUp(): Promise<void>;
  snapshot(name: string): Promise<CreateSample>;
  /** Chunks preserved in the named snapshot, when the server can tell. */
  preserved(name: string): Promise<number | undefined>;
  tearDown(): Promise<void>;
  /** Remove per-run files (snapshot stores, qcow2). */
  clean(): void;
}

class NodeTarget implements Target {
  readonly id = 'node' as const;
  readonly label = 'node-nbd-server';
  private srv?: NodeServer;
  constructor(
    private readonly image: string,
    private readonly work: string,
    private readonly opts: Options,
  ) {}

  uri(): string {
    return this.srv!.uri;
  }

  async setUp(): Promise<void> {
    // No server runs on the image now, so its metadata may go: no snapshots.
    fs.rmSync(`${this.image}.nbd`, { recursive: true, force: true });
    fsyncFile(this.image);
    this.srv = await NodeServer.start(this.image, this.work, this.opts, this.opts.size);
  }

  async snapshot(name: string): Promise<CreateSample> {
    return nodeCreate(this.srv!, this.image, name);
  }

  async preserved(name: string): Promise<number | undefined> {
    return nodePreserved(this.image, name);
  }

  async tearDown(): Promise<void> {
    if (this.srv) await this.srv.stop();
    this.srv = undefined;
  }

  clean(): void {
    if (!this.opts.keep) fs.rmSync(`${this.image}.nbd`, { recursive: true, force: true });
  }
}

async function nodeCreate(srv: NodeServer, image: string, name: string): Promise<CreateSample> {
  const r = await mustRun(process.execPath, [NODE_CLI, 'snapshot', 'create', image, name]);
  const e = await srv.waitEvent((x) => x.msg === 'snapshot created' && x.snapshot === name, 5000);
  const serverMs = e && typeof e.ms === 'number' ? e.ms : undefined;
  return { cmdMs: r.ms, serverMs };
}

async function nodePreserved(image: string, name: string): Promise<number | undefined> {
  const r = await mustRun(process.execPath, [NODE_CLI, 'snapshot', 'list', image, '--json']);
  const list = JSON.parse(r.stdout) as Array<{ name: string; preservedChunks?: number }>;
  return list.find((s) => s.name === name)?.preservedChunks;
}

class QemuTarget implements Target {
  readonly id = 'qemu' as const;
  readonly label = 'qemu-nbd qcow2';
  private srv?: QemuServer;
  readonly qcow2: string;
  constructor(
    private readonly image: string,
    private readonly work: string,
    private readonly opts: Options,
  ) {
    this.qcow2 = image.replace(/\.img$/, '') + '.qcow2';
  }

  uri(): string {
    return this.srv!.uri;
  }

  async setUp(): Promise<void> {
    fs.rmSync(this.qcow2, { force: true });
    if (!this.opts.keep) tempPaths.add(this.qcow2);
    // Every cluster allocated with the raw image's data, as the raw image is.
    await mustRun('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', '-o', `cluster_size=${CHUNK}`, this.image, this.qcow2], 3600_000);
    fsyncFile(this.qcow2);
    this.srv = await QemuServer.start(this.qcow2, this.work, this.opts.size, true);
  }

  async snapshot(name: string): Promise<CreateSample> {
    const t0 = nowMs();
    await this.srv!.stop();
    this.srv = undefined;
    const r = await mustRun('qemu-img', ['snapshot', '-c', name, this.qcow2]);
    this.srv = await QemuServer.start(this.qcow2, this.work, this.opts.size, false);
    return { cmdMs: r.ms, downtimeMs: nowMs() - t0 };
  }

  async preserved(): Promise<number | undefined> {
    return undefined;
  }

  async tearDown(): Promise<void> {
    if (this.srv) await this.srv.stop();
    this.srv = undefined;
  }

  clean(): void {
    if (this.opts.keep) return;
    fs.rmSync(this.qcow2, { force: true });
    tempPaths.delete(this.qcow2);
  }
}

// ------------------------------------------------------- randwrite part

type PhaseId = 'no-snap' | 'first@1' | 'steady@1' | 'first@N' | 'steady@N';
const PHASES: PhaseId[] = ['no-snap', 'first@1', 'steady@1', 'first@N', 'steady@N'];

interface PhaseSample extends FioResult {
  /** Measured share of writes that hit a not yet preserved chunk (node: preserved chunks / writes). */
  firstShare?: number;
  /** Expected share for uniformly random writes. */
  expectedFirstShare?: number;
}

interface OverwriteSample {
  after: 1 | 'N';
  mibs: number;
  secs: number;
  /** node: share of chunks preserved in the newest snapshot afterwards (should be 1). */
  preservedShare?: number;
}

interface SequenceResult {
  server: ServerId;
  repeat: number;
  phases: Partial<Record<PhaseId, PhaseSample>>;
  overwrites: OverwriteSample[];
  creates: Array<CreateSample & { index: number }>;
  error?: string;
}

async function runSequence(t: Target, rep: number, opts: Options, work: string): Promise<SequenceResult> {
  const res: SequenceResult = { server: t.id, repeat: rep, phases: {}, overwrites: [], creates: [] };
  const chunks = opts.size / CHUNK;
  const budget = firstWriteBudget(chunks, opts.minFirstWrites);
  const N = opts.snapshots;
  const tag = `[${rep + 1}/${opts.repeat}] ${t.label.padEnd(15)}`;
  const seed = (k: number) => 1000 * (rep + 1) + k; // same offsets for both servers in one repeat
  const timedRun = (): FioRun => ({
    rw: 'randwrite',
    bs: '4k',
    iodepth: 32,
    size: opts.size,
    timed: { runtime: opts.runtime, ramp: opts.ramp },
    seed: seed(0),
  });
  const firstRun = (k: number): FioRun => ({
    rw: 'randwrite',
    bs: '4k',
    iodepth: 32,
    size: opts.size,
    numberIos: budget,
    limitSecs: opts.runtime,
    seed: seed(k),
  });
  const show = (p: PhaseId, s: PhaseSample) => {
    const share = s.firstShare !== undefined ? `  first writes ${(100 * s.firstShare).toFixed(0)}%` : '';
    const exp = s.expectedFirstShare !== undefined ? ` (expected ${(100 * s.expectedFirstShare).toFixed(0)}%)` : '';
    log(
      `  ${tag} ${p.replace('@N', `@${N}`).padEnd(10)} ${fmtNum(s.iops).padStart(8)} IOPS  p99 ${fmtNum(s.p99us).padStart(8)} us  ` +
        `${s.ios} writes in ${s.secs.toFixed(1)} s${share}${exp}`,
    );
  };
  const first = async (p: PhaseId, name: string, k: number) => {
    const r = await runFio(t.uri(), firstRun(k), work);
    const s: PhaseSample = { ...r, expectedFirstShare: expectedFirstShare(r.ios, chunks) };
    const pres = await t.preserved(name);
    if (pres !== undefined && r.ios > 0) s.firstShare = pres / r.ios;
    res.phases[p] = s;
    show(p, s);
  };
  const overwrite = async (after: 1 | 'N', name: string, k: number) => {
    const r = await runFio(
      t.uri(),
      { rw: 'write', bs: '1m', iodepth: 8, size: opts.size, seed: seed(k), limitSecs: Math.max(3600, opts.size / MiB) },
      work,
    );
    const o: OverwriteSample = { after, mibs: r.mibs, secs: r.secs };
    const pres = await t.preserved(name);
    if (pres !== undefined) o.preservedShare = pres / chunks;
    res.overwrites.push(o);
    log(
      `  ${tag} overwrite ${fmtBytes(opts.size)} after snapshot ${after === 1 ? 1 : N}: ${fmtNum(r.mibs, 1)} MiB/s, ${r.secs.toFixed(1)} s` +
        (o.preservedShare !== undefined ? `, ${(100 * o.preservedShare).toFixed(1)}% of chunks preserved` : ''),
    );
  };
  const snap = async (i: number) => {
    const c = await t.snapshot(`s${i}`);
    res.creates.push({ ...c, index: i });
    return c;
  };

  try {
    await t.setUp();
    res.phases['no-snap'] = await runFio(t.uri(), timedRun(), work);
    show('no-snap', res.phases['no-snap']);

    const c1 = await snap(1);
    log(`  ${tag} snapshot 1 created: ${fmtCreate(c1)}`);
    await first('first@1', 's1', 1);
    await overwrite(1, 's1', 2);
    res.phases['steady@1'] = await runFio(t.uri(), timedRun(), work);
    show('steady@1', res.phases['steady@1']);

    for (let i = 2; i <= N; i++) {
      if (opts.betweenWrites > 0) {
        await runFio(
          t.uri(),
          { rw: 'randwrite', bs: '4k', iodepth: 32, size: opts.size, numberIos: opts.betweenWrites, limitSecs: 10 * opts.runtime, seed: seed(100 + i) },
          work,
        );
      }
      await snap(i);
    }
    const rest = res.creates.filter((c) => c.index >= 2);
    log(`  ${tag} snapshots 2..${N} created (median ${fmtCreate(medianCreate(rest))})`);
    await first('first@N', `s${N}`, 3);
    await overwrite('N', `s${N}`, 4);
    res.phases['steady@N'] = await runFio(t.uri(), timedRun(), work);
    show('steady@N', res.phases['steady@N']);
  } catch (err) {
    res.error = (err as Error).message ?? String(err);
    log(`  ${tag} FAILED: ${res.error}`);
  } finally {
    await t.tearDown().catch(() => undefined);
    t.clean();
  }
  return res;
}

function medianCreate(cs: CreateSample[]): CreateSample {
  return {
    cmdMs: median(cs.map((c) => c.cmdMs)),
    serverMs: cs.some((c) => c.serverMs !== undefined) ? median(cs.map((c) => c.serverMs ?? NaN)) : undefined,
    downtimeMs: cs.some((c) => c.downtimeMs !== undefined) ? median(cs.map((c) => c.downtimeMs ?? NaN)) : undefined,
  };
}

function fmtCreate(c: CreateSample): string {
  const parts = [`command ${fmtMs(c.cmdMs)}`];
  if (c.serverMs !== undefined) parts.push(`server ${fmtMs(c.serverMs)}`);
  if (c.downtimeMs !== undefined) parts.push(`downtime ${fmtMs(c.downtimeMs)}`);
  return parts.join(', ');
}

// ---------------------------------------------------------- create part

interface CreatePartResult {
  repeat: number;
  nodeCmdMs: number[];
  nodeServerMs: number[];
  rss0?: number;
  rssN?: number;
  rssNWrites?: number;
  rssReopen?: number;
  /** RssShmem with N snapshots: the first-write journal's mapping (memory-backed, allocated once per volume). */
  shmN?: number;
  shm0?: number;
  qemuImgMs: number[];
  errors: string[];
}

const BIG_WRITES = 4096;

async function runCreatePart(rep: number, opts: Options, work: string, servers: ServerId[]): Promise<CreatePartResult> {
  const res: CreatePartResult = { repeat: rep, nodeCmdMs: [], nodeServerMs: [], qemuImgMs: [], errors: [] };
  const tag = `[${rep + 1}/${opts.repeat}]`;
  const big = path.join(opts.dir, `snap-bench-sparse-${opts.bigSize}.img`);
  if (servers.includes('node')) {
    fs.rmSync(`${big}.nbd`, { recursive: true, force: true });
    fs.rmSync(big, { force: true });
    tempPaths.add(big);
    tempPaths.add(`${big}.nbd`);
    fs.writeFileSync(big, '');
    fs.truncateSync(big, opts.bigSize);
    let srv: NodeServer | undefined;
    try {
      srv = await NodeServer.start(big, work, opts, opts.bigSize);
      await sleep(500);
      res.rss0 = rssOf(srv.pid);
      res.shm0 = rssOf(srv.pid, 'RssShmem');
      for (let i = 1; i <= opts.creates; i++) {
        const c = await nodeCreate(srv, big, `s${i}`);
        res.nodeCmdMs.push(c.cmdMs);
        if (c.serverMs !== undefined) res.nodeServerMs.push(c.serverMs);
      }
      await sleep(500);
      res.rssN = rssOf(srv.pid);
      res.shmN = rssOf(srv.pid, 'RssShmem');
      // Random 4k writes spread over the whole volume: first writes to chunks
      // all over the address space (what a sparse per-chunk structure would feel).
      await runFio(
        srv.uri,
        { rw: 'randwrite', bs: '4k', iodepth: 32, size: opts.bigSize, numberIos: BIG_WRITES, limitSecs: 20 * opts.runtime, seed: 7 + rep, norandommap: true },
        work,
      );
      await sleep(500);
      res.rssNWrites = rssOf(srv.pid);
      await srv.stop();
      srv = undefined;
      srv = await NodeServer.start(big, work, opts, opts.bigSize);
      await sleep(500);
      res.rssReopen = rssOf(srv.pid);
      log(
        `  ${tag} node-nbd-server ${fmtBytes(opts.bigSize)} sparse: create median command ${fmtMs(median(res.nodeCmdMs))}, ` +
          `server ${fmtMs(median(res.nodeServerMs))}; RSS ${fmtBytes(res.rss0)} -> ${fmtBytes(res.rssN)} with ${opts.creates} snapshots, ` +
          `${fmtBytes(res.rssNWrites)} after ${BIG_WRITES} random writes, ${fmtBytes(res.rssReopen)} after a restart`,
      );
    } catch (err) {
      const msg = (err as Error).message ?? String(err);
      res.errors.push(`node: ${msg}`);
      log(`  ${tag} node-nbd-server create part FAILED: ${msg}`);
    } finally {
      if (srv) await srv.stop().catch(() => undefined);
      fs.rmSync(`${big}.nbd`, { recursive: true, force: true });
      fs.rmSync(big, { force: true });
      tempPaths.delete(big);
      tempPaths.delete(`${big}.nbd`);
    }
  }
  if (servers.includes('qemu')) {
    const q = path.join(opts.dir, `snap-bench-sparse-${opts.bigSize}.qcow2`);
    tempPaths.add(q);
    try {
      fs.rmSync(q, { force: true });
      await mustRun('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', `cluster_size=${CHUNK}`, q, String(opts.bigSize)]);
      for (let i = 1; i <= opts.creates; i++) res.qemuImgMs.push((await mustRun('qemu-img', ['snapshot', '-c', `s${i}`, q])).ms);
      log(`  ${tag} qemu-img snapshot -c on a ${fmtBytes(opts.bigSize)} qcow2: median ${fmtMs(median(res.qemuImgMs))}`);
    } catch (err) {
      const msg = (err as Error).message ?? String(err);
      res.errors.push(`qemu: ${msg}`);
      log(`  ${tag} qemu-img create part FAILED: ${msg}`);
    } finally {
      fs.rmSync(q, { force: true });
      tempPaths.delete(q);
    }
  }
  return res;
}

// ------------------------------------------------------------------ output



function fmtMs(n: number | undefined): string {
  if (n === undefined || !Number.isFinite(n)) return '-';
  return n >= 100 ? `${n.toFixed(0)} ms` : `${n.toFixed(1)} ms`;
}



function fmtRange(xs: number[]): string {
  const s = xs.filter((x) => Number.isFinite(x));
  if (!s.length) return '-';
  return `${fmtMs(median(s))} (${fmtMs(Math.min(...s))}..${fmtMs(Math.max(...s))}, n=${s.length})`;
}


interface RatioDef {
  phase: PhaseId;
  base: PhaseId;
  target?: number;
}

const RATIOS: RatioDef[] = [
  { phase: 'first@1', base: 'no-snap', target: 0.5 },
  { phase: 'steady@1', base: 'no-snap' },
  { phase: 'first@N', base: 'first@1', target: 0.9 },
  { phase: 'steady@N', base: 'steady@1', target: 0.9 },
];

/** Median over repeats of the per-repeat ratio phase/base (both measured in the same sequence). */
function ratioOf(seqs: SequenceResult[], phase: PhaseId, base: PhaseId): number {
  return median(
    seqs.map((s) => {
      const a = s.phases[phase];
      const b = s.phases[base];
      return a && b && b.iops > 0 ? a.iops / b.iops : NaN;
    }),
  );
}

// -------------------------------------------------------------------- main

async function main(): Promise<void> {
  const opts = parseArgs(process.argv.slice(2));
  if (!which('fio')) throw new Error('fio is not installed (it drives every server); install the "fio" package');
  if (!fs.existsSync(path.join(ROOT, 'dist', 'src', 'cli', 'main.js'))) throw new Error('dist/ is missing: run npx tsc -p tsconfig.json');
  const versions: Record<string, string> = {
    fio: firstLine('fio', ['--version']),
    node: `node-nbd-server ${(JSON.parse(fs.readFileSync(path.join(ROOT, 'package.json'), 'utf8')) as { version?: string }).version ?? '?'} (node ${process.version})`,
  };
  let servers = [...opts.servers];
  if (servers.includes('qemu')) {
    if (!which('qemu-nbd') || !which('qemu-img')) {
      log('qemu-nbd/qemu-img: missing, qemu skipped');
      servers = servers.filter((s) => s !== 'qemu');
    } else versions.qemu = `${firstLine('qemu-nbd', ['--version'])}; ${firstLine('qemu-img', ['--version'])}`;
  }
  if (servers.length === 0) throw new Error('no server to measure');
  fs.mkdirSync(opts.dir, { recursive: true });
  const work = fs.mkdtempSync(path.join(os.tmpdir(), 'nbd-bench-snap-'));
  tempPaths.add(work);
  const image = path.join(opts.dir, `snap-bench-${opts.size}.img`);
  const chunks = opts.size / CHUNK;
  const budget = firstWriteBudget(chunks, opts.minFirstWrites);
  const loadBefore = os.loadavg();
  const buildBefore = buildStamp();

  if (opts.parts.includes('randwrite')) {
    ensureImage(image, opts.size);
    // A leftover .nbd from an interrupted run is reset by setUp.
    log(
      `bench-snapshots: ${fmtBytes(opts.size)} volume = ${chunks} chunks of ${fmtBytes(CHUNK)}; first-writes runs stop after ` +
        `${budget} random 4k writes (expected first-write share ${(100 * expectedFirstShare(budget, chunks)).toFixed(1)}%) or ${opts.runtime} s`,
    );
  }

  const seqs: SequenceResult[] = [];
  const createParts: CreatePartResult[] = [];
  const probes: Record<ProbeKind, SyncProbe[]> = { overwrite: [], append: [] };
  const probeText: Record<ProbeKind, string> = {
    overwrite: '4k overwrite + fdatasync',
    append: '64 KiB append (allocating) + fdatasync',
  };
  for (let rep = 0; rep < opts.repeat; rep++) {
    for (const kind of ['overwrite', 'append'] as const) {
      try {
        const p = await syncProbe(kind, opts.dir, work);
        probes[kind].push(p);
        log(
          `  [${rep + 1}/${opts.repeat}] disk: ${probeText[kind]} ${fmtNum(p.iops)}/s, fdatasync mean ${fmtNum(p.syncMeanUs)} us, p99 ${fmtNum(p.syncP99Us)} us`,
        );
      } catch (err) {
        log(`  [${rep + 1}/${opts.repeat}] disk probe (${kind}) failed: ${(err as Error).message}`);
      }
    }
    if (opts.parts.includes('randwrite')) {
      // Rotate the server order per repeat so that no one always goes first.
      const order = servers.map((_, i) => servers[(i + rep) % servers.length]);
      for (const id of order) {
        const t: Target = id === 'node' ? new NodeTarget(image, work, opts) : new QemuTarget(image, work, opts);
        seqs.push(await runSequence(t, rep, opts, work));
      }
    }
    if (opts.parts.includes('create')) createParts.push(await runCreatePart(rep, opts, work, servers));
  }
  const loadAfter = os.loadavg();
  const buildAfter = buildStamp();
  const rebuilt = Object.keys(buildBefore).filter((k) => buildBefore[k] !== buildAfter[k]);

  // ---- report
  const N = opts.snapshots;
  const pname = (p: PhaseId) => p.replace('@N', `@${N}`);
  const out: string[] = [''];
  out.push(
    `node-nbd-server snapshot benchmark: fio nbd engine over unix sockets, 1 job, ${opts.repeat} repeat(s)` +
      `${opts.repeat > 1 ? ' (medians; ratios are medians of per-repeat ratios)' : ''}`,
  );
  out.push(`host: ${os.cpus().length} CPU(s) ${os.cpus()[0]?.model ?? ''}, ${fmtBytes(os.totalmem())} RAM, ${os.type()} ${os.release()}`);
  out.push(`load average (1/5/15 min): ${loadBefore.map((x) => x.toFixed(2)).join(' ')} at start, ${loadAfter.map((x) => x.toFixed(2)).join(' ')} at end`);
  for (const kind of ['overwrite', 'append'] as const) {
    const ps = probes[kind];
    if (!ps.length) continue;
    out.push(
      `disk under ${opts.dir}, ${probeText[kind]} (fio psync, 3 s per repeat): ${fmtNum(median(ps.map((p) => p.iops)))}/s, ` +
        `fdatasync mean ${fmtNum(median(ps.map((p) => p.syncMeanUs)))} us, p99 ${fmtNum(median(ps.map((p) => p.syncP99Us)))} us (medians)`,
    );
  }

  const json: Record<string, unknown> = {
    date: new Date().toISOString(),
    host: { cpus: os.cpus().length, cpuModel: os.cpus()[0]?.model ?? null, memBytes: os.totalmem(), kernel: os.release(), loadBefore, loadAfter },
    options: { ...opts },
    versions,
    syncProbes: probes,
  };
  json.build = { before: buildBefore, after: buildAfter };

  if (opts.parts.includes('randwrite')) {
    out.push('');
    out.push(
      `4k randwrite QD32 on a ${fmtBytes(opts.size)} volume (${chunks} chunks of ${fmtBytes(CHUNK)}), timed runs ${opts.runtime} s + ${opts.ramp} s ramp; ` +
        `first-writes runs: no ramp, at most ${budget} writes or ${opts.runtime} s; ${opts.betweenWrites} random 4k writes before each of snapshots 2..${N}`,
    );
    out.push('');
    const rows: string[][] = [['phase', 'server', 'IOPS', 'p99 us', 'ratio', 'target', 'verdict', 'node/qemu', 'first writes', 'run']];
    const byServer = new Map<ServerId, SequenceResult[]>();
    for (const id of servers) byServer.set(id, seqs.filter((s) => s.server === id));
    const med = (id: ServerId, p: PhaseId, f: (s: PhaseSample) => number | undefined) =>
      median((byServer.get(id) ?? []).map((s) => (s.phases[p] ? (f(s.phases[p]!) ?? NaN) : NaN)));
    const phaseDesc: Record<PhaseId, string> = {
      'no-snap': 'no snapshot',
      'first@1': 'first writes after snapshot 1',
      'steady@1': 'steady state, 1 snapshot',
      'first@N': `first writes after snapshot ${N}`,
      'steady@N': `steady state, ${N} snapshots`,
    };
    const verdicts: Array<Record<string, unknown>> = [];
    for (const p of PHASES) {
      for (const id of servers) {
        const iops = med(id, p, (s) => s.iops);
        const p99 = med(id, p, (s) => s.p99us);
        const rd = RATIOS.find((r) => r.phase === p);
        const ratio = rd ? ratioOf(byServer.get(id) ?? [], p, rd.base) : NaN;
        let verdict = '';
        if (rd?.target !== undefined && Number.isFinite(ratio)) verdict = ratio >= rd.target ? 'met' : 'MISSED';
        if (id !== 'node' && verdict) verdict = `(${verdict.toLowerCase()})`;
        let vsQemu = '';
        if (id === 'node' && servers.includes('qemu')) {
          // Per-repeat node/qemu ratio of the same phase, median.
          const r = median(
            (byServer.get('node') ?? []).map((s) => {
              const q = (byServer.get('qemu') ?? []).find((x) => x.repeat === s.repeat)?.phases[p];
              const n = s.phases[p];
              return n && q && q.iops > 0 ? n.iops / q.iops : NaN;
            }),
          );
          vsQemu = Number.isFinite(r) ? `${r.toFixed(2)}x` : '-';
        }
        let share = '';
        if (p.startsWith('first')) {
          const m = med(id, p, (s) => s.firstShare);
          const e = med(id, p, (s) => s.expectedFirstShare);
          share = Number.isFinite(m) ? `${(100 * m).toFixed(0)}% (exp. ${(100 * e).toFixed(0)}%)` : `exp. ${(100 * e).toFixed(0)}%`;
        }
        const ios = med(id, p, (s) => s.ios);
        const secs = med(id, p, (s) => s.secs);
        rows.push([
          `${pname(p)}: ${phaseDesc[p]}`,
          id === 'node' ? 'node-nbd-server' : 'qemu-nbd qcow2',
          fmtNum(iops),
          fmtNum(p99),
          rd && Number.isFinite(ratio) ? `${ratio.toFixed(2)}x ${pname(rd.base)}` : '',
          rd?.target !== undefined ? `>= ${rd.target.toFixed(2)}x` : '',
          verdict,
          vsQemu,
          share,
          Number.isFinite(ios) ? `${fmtNum(ios)} in ${secs.toFixed(1)} s` : '',
        ]);
        if (rd) verdicts.push({ server: id, phase: p, base: rd.base, ratio: Number.isFinite(ratio) ? ratio : null, target: rd.target ?? null, met: rd.target !== undefined && Number.isFinite(ratio) ? ratio >= rd.target : null });
      }
    }
    out.push(table(rows, [false, false, true, true, false, false, false, true, false, true]));
    out.push('');
    out.push(`ratio = IOPS of the phase / IOPS of the named phase of the same server in the same repeat. Targets apply to`);
    out.push(`node-nbd-server; qemu's verdicts are in parentheses for reference. "first writes" = share of the run's writes`);
    out.push(`that hit a chunk not yet preserved in the newest snapshot: measured (node: preserved chunks / writes) and`);
    out.push(`expected for uniformly random offsets. "run" = writes counted and measured seconds (median).`);

    // Overwrites and create latency within the sequence.
    out.push('');
    const rows2: string[][] = [['server', 'overwrite after snap 1', `overwrite after snap ${N}`, 'create snap 1 (after no-snap run)', `create snaps 2..${N} (median)`]];
    for (const id of servers) {
      const ss = byServer.get(id) ?? [];
      const ow = (a: 1 | 'N') => {
        const os_ = ss.map((s) => s.overwrites.find((o) => o.after === a)).filter((o): o is OverwriteSample => !!o);
        if (!os_.length) return '-';
        const ps = median(os_.map((o) => o.preservedShare ?? NaN));
        return `${fmtNum(median(os_.map((o) => o.mibs)), 0)} MiB/s, ${median(os_.map((o) => o.secs)).toFixed(1)} s` + (Number.isFinite(ps) ? `, ${(100 * ps).toFixed(0)}% preserved` : '');
      };
      const c1 = ss.flatMap((s) => s.creates.filter((c) => c.index === 1));
      const cN = ss.flatMap((s) => s.creates.filter((c) => c.index >= 2));
      rows2.push([id === 'node' ? 'node-nbd-server' : 'qemu-nbd qcow2', ow(1), ow('N'), c1.length ? fmtCreate(medianCreate(c1)) : '-', cN.length ? fmtCreate(medianCreate(cN)) : '-']);
    }
    out.push(`sequential 1 MiB QD8 overwrite of the whole ${fmtBytes(opts.size)} volume after a snapshot, and snapshot creation inside the sequence:`);
    out.push(table(rows2, [false, false, false, false, false]));
    out.push(`node: command = \`node-nbd-server snapshot create\` wall time (online), server = its logged ms;`);
    out.push(`qemu: command = \`qemu-img snapshot -c\` (offline), downtime = qemu-nbd stop + qemu-img + qemu-nbd start.`);
    json.randwrite = { sizeBytes: opts.size, chunks, firstWriteBudget: budget, sequences: seqs, verdicts };
  }

  if (opts.parts.includes('create')) {
    out.push('');
    out.push(`snapshot create latency and server RSS, sparse ${fmtBytes(opts.bigSize)} volume, ${opts.creates} snapshots per repeat:`);
    const rows3: string[][] = [['measure', 'value']];
    const all = (f: (c: CreatePartResult) => number[]) => createParts.flatMap(f);
    const medv = (f: (c: CreatePartResult) => number | undefined) => median(createParts.map((c) => f(c) ?? NaN));
    if (servers.includes('node')) {
      rows3.push(['node-nbd-server: `snapshot create` CLI total (online), median (min..max)', fmtRange(all((c) => c.nodeCmdMs))]);
      rows3.push(['node-nbd-server: server-side (`snapshot created` ms), median (min..max)', fmtRange(all((c) => c.nodeServerMs))]);
      rows3.push(['node-nbd-server: VmRSS, 0 snapshots', fmtBytes(medv((c) => c.rss0))]);
      rows3.push([`node-nbd-server: VmRSS, ${opts.creates} snapshots`, fmtBytes(medv((c) => c.rssN))]);
      rows3.push([`node-nbd-server: VmRSS, ${opts.creates} snapshots + ${BIG_WRITES} random 4k writes over the volume`, fmtBytes(medv((c) => c.rssNWrites))]);
      rows3.push([`node-nbd-server: VmRSS, restarted with ${opts.creates} snapshots`, fmtBytes(medv((c) => c.rssReopen))]);
      rows3.push([`node-nbd-server: of which RssShmem, ${opts.creates} snapshots (the first-write journal mapping, once per volume)`, fmtBytes(medv((c) => c.shmN))]);
      const per = (medv((c) => (c.rssN ?? NaN) - (c.shmN ?? 0)) - medv((c) => (c.rss0 ?? NaN) - (c.shm0 ?? 0))) / opts.creates;
      rows3.push(['node-nbd-server: VmRSS growth per snapshot, journal mapping aside', Number.isFinite(per) ? fmtBytes(per) : '-']);
    }
    if (servers.includes('qemu')) rows3.push(['qemu-img snapshot -c on a sparse qcow2 (offline, reference), median (min..max)', fmtRange(all((c) => c.qemuImgMs))]);
    out.push(table(rows3, [false, true]));
    json.create = { bigSizeBytes: opts.bigSize, creates: opts.creates, randomWrites: BIG_WRITES, results: createParts };
  }

  out.push('');
  out.push('versions:');
  for (const [k, v] of Object.entries(versions)) out.push(`  ${k}: ${v}`);
  out.push(`  build: ${Object.entries(buildBefore).map(([k, v]) => `${k} ${v}`).join(', ')}`);
  if (rebuilt.length) {
    out.push('');
    out.push(`WARNING: rebuilt during the run, so the results mix builds: ${rebuilt.map((k) => `${k} (${buildBefore[k]} -> ${buildAfter[k]})`).join(', ')}`);
  }
  const errors = [
    ...seqs.filter((s) => s.error).map((s) => `randwrite / ${s.server} / repeat ${s.repeat + 1}: ${s.error}`),
    ...createParts.flatMap((c) => c.errors.map((e) => `create / repeat ${c.repeat + 1}: ${e}`)),
  ];
  if (errors.length) {
    out.push('');
    out.push('errors:');
    for (const e of errors) out.push(`  ${e.split('\n').join('\n    ')}`);
  }
  process.stdout.write(out.join('\n') + '\n');

  if (opts.json) {
    fs.writeFileSync(opts.json, JSON.stringify(json, null, 2) + '\n');
    log(`bench-snapshots: wrote ${opts.json}`);
  }
  if (!opts.keep) {
    fs.rmSync(`${image}.nbd`, { recursive: true, force: true });
    fs.rmSync(image.replace(/\.img$/, '') + '.qcow2', { force: true });
  }
  if (errors.length) process.exitCode = 1;
}

main().then(
  () => cleanupSync(),
  (err: unknown) => {
    if (currentFio) killTree(currentFio, 'SIGKILL');
    process.stderr.write(`bench-snapshots: error: ${(err as Error)?.message ?? String(err)}\n`);
    cleanupSync();
    process.exitCode = 1;
  },
);
