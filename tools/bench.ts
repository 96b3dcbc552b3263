// Throughput/latency benchmark: node-nbd-server against nbdkit (file plugin),
// qemu-nbd and nbd-server, all serving the same raw file over a unix socket
// and driven by fio's nbd engine. It measures and prints; it asserts nothing.
//
//   npm run bench -- [--size 2G] [--runtime 10] [--ramp 2] [--repeat 1]
//                    [--servers node,nbdkit,qemu,nbd-server]
//                    [--workloads randread-4k,randwrite-4k,read-1m,write-1m]
//                    [--dir DIR] [--json FILE] [--node-threads N] [--remove-image]
//                    [--snapshots] [--snapshot-args "ARGS"]
//   npm run bench -- --backup [ARGS]   the backup benchmark (tools/bench-backup.ts) instead
//
// The image (default 2 GiB of non-zero pseudo-random data) is created once in
// --dir (default $TMPDIR/node-nbd-server-bench) and reused by later runs.
// For each workload every selected server is started, measured and stopped in
// turn, so background noise is spread over all of them.
//
// With --snapshots, the copy-on-write snapshot benchmark (tools/bench-snapshots.ts,
// also runnable alone as `node dist/tools/bench-snapshots.js`) runs after the
// serving table; it is off by default because it takes several minutes.
import { spawn, spawnSync, ChildProcess } from 'child_process';
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import {
  cleanupProcesses,
  ensureImage,
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
  waitExit,
  waitSocket,
  which,
} from './bench-common';

const ROOT = path.resolve(__dirname, '..', '..');
const NODE_CLI = path.join(ROOT, 'bin', 'node-nbd-server.js');
// --base DIR: another checkout of node-nbd-server, measured as 'node-base'.
let baseRoot: string | undefined;
const MiB = 1024 * 1024;
const GiB = 1024 * MiB;

// ---------------------------------------------------------------- options

interface Options {
  size: number;
  runtime: number;
  ramp: number;
  repeat: number;
  servers: ServerId[];
  workloads: Workload[];
  dir: string;
  json?: string;
  nodeThreads?: number;
  removeImage: boolean;
  snapshots: boolean;
  rollback: boolean;
  snapshotArgs: string[];
  serversGiven: boolean;
}

type ServerId = 'node' | 'node-base' | 'nbdkit' | 'qemu' | 'nbd-server';
const SERVER_IDS: ServerId[] = ['node', 'node-base', 'nbdkit', 'qemu', 'nbd-server'];

interface Workload {
  name: string;
  rw: 'randread' | 'randwrite' | 'read' | 'write';
  bs: string;
  iodepth: number;
}

const WORKLOADS: Workload[] = [
  { name: 'randread-4k', rw: 'randread', bs: '4k', iodepth: 32 },
  { name: 'randwrite-4k', rw: 'randwrite', bs: '4k', iodepth: 32 },
  { name: 'read-1m', rw: 'read', bs: '1m', iodepth: 8 },
  { name: 'write-1m', rw: 'write', bs: '1m', iodepth: 8 },
];

const USAGE = `usage: node dist/tools/bench.js [options]

  --size SIZE          image size (default 2G; at least 2G is recommended): 512M, 2G, 4G
  --runtime SECONDS    measured time per workload and server (default 10)
  --ramp SECONDS       fio ramp_time before measuring (default 2)
  --repeat N           run everything N times and report medians (default 1)
  --servers LIST       comma list of ${SERVER_IDS.join(',')} (default all;
                       node-base only with --base)
  --base DIR           also measure the node-nbd-server build in checkout DIR (built:
                       dist/ and build/Release), as server node-base, in the same run:
                       before/after tables side by side
  --workloads LIST     comma list of ${WORKLOADS.map((w) => w.name).join(',')} (default all)
                       (aliases: randread, randwrite, seqread, seqwrite)
  --dir DIR            where the image lives (default ${path.join(os.tmpdir(), 'node-nbd-server-bench')})
  --json FILE          also write machine-readable results to FILE
  --node-threads N     pass --threads N to node-nbd-server (default: its own default)
  --remove-image       delete the image at the end instead of keeping it for reuse
  --rollback           after the serving table, also run the rollback benchmark
                       (node dist/tools/bench-rollback.js: time-to-visible on 1 GiB and
                       1 TiB sparse volumes, background merge throughput vs cp)
  --snapshots          after the serving table, also run the snapshot benchmark
                       (node dist/tools/bench-snapshots.js: 4k randwrite QD32 with no
                       snapshot, first writes after a snapshot, steady state, 32
                       snapshots; snapshot create latency and RSS on a sparse 1 TiB
                       volume; node-nbd-server next to qemu-nbd with a qcow2). It gets
                       this run's --repeat, --runtime, --ramp, --node-threads, the
                       node/qemu part of --servers if given, and --json FILE as
                       FILE with .snapshots.json; off by default (several minutes)
  --snapshot-args ARGS more options for the snapshot benchmark, one string, e.g.
                       "--size 4G --creates 20" (implies --snapshots; see
                       node dist/tools/bench-snapshots.js --help)
  -h, --help           this text
`;


function positive(name: string, s: string | undefined, allowZero = false): number {
  const n = Number(s);
  if (s === undefined || !Number.isFinite(n) || n < 0 || (!allowZero && n === 0) || !Number.isInteger(n)) {
    throw new Error(`${name} needs a ${allowZero ? 'non-negative' : 'positive'} integer, got "${s}"`);
  }
  return n;
}

function parseArgs(argv: string[]): Options {
  const o: Options = {
    size: 2 * GiB,
    runtime: 10,
    ramp: 2,
    repeat: 1,
    servers: [...SERVER_IDS],
    workloads: [...WORKLOADS],
    dir: path.join(os.tmpdir(), 'node-nbd-server-bench'),
    removeImage: false,
    snapshots: false,
    rollback: false,
    snapshotArgs: [],
    serversGiven: false,
  };
  const aliases: Record<string, string> = {
    randread: 'randread-4k',
    randwrite: 'randwrite-4k',
    seqread: 'read-1m',
    seqwrite: 'write-1m',
    read: 'read-1m',
    write: 'write-1m',
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
    switch (arg) {
      case '-h':
      case '--help':
        process.stdout.write(USAGE);
        process.exit(0);
      case '--size':
        o.size = parseSize(next());
        break;
      case '--runtime':
        o.runtime = positive('--runtime', next());
        break;
      case '--ramp':
      case '--ramp-time':
        o.ramp = positive('--ramp', next(), true);
        break;
      case '--repeat':
        o.repeat = positive('--repeat', next());
        break;
      case '--servers': {
        const list = next().split(',').map((s) => s.trim()).filter(Boolean);
        for (const s of list) {
          if (!SERVER_IDS.includes(s as ServerId)) throw new Error(`unknown server "${s}" (known: ${SERVER_IDS.join(', ')})`);
        }
        o.servers = SERVER_IDS.filter((s) => list.includes(s));
        o.serversGiven = true;
        break;
      }
      case '--workloads': {
        const list = next().split(',').map((s) => aliases[s.trim()] ?? s.trim()).filter(Boolean);
        for (const w of list) {
          if (!WORKLOADS.some((x) => x.name === w)) throw new Error(`unknown workload "${w}" (known: ${WORKLOADS.map((x) => x.name).join(', ')})`);
        }
        o.workloads = WORKLOADS.filter((w) => list.includes(w.name));
        break;
      }
      case '--dir':
        o.dir = path.resolve(next());
        break;
      case '--base':
        baseRoot = path.resolve(next());
        break;
      case '--json':
        o.json = path.resolve(next());
        break;
      case '--node-threads':
        o.nodeThreads = positive('--node-threads', next());
        break;
      case '--remove-image':
        o.removeImage = true;
        break;
      case '--snapshots':
        o.snapshots = true;
        break;
      case '--rollback':
        o.rollback = true;
        break;
      case '--snapshot-args':
        o.snapshotArgs.push(...next().split(/\s+/).filter(Boolean));
        o.snapshots = true;
        break;
      default:
        throw new Error(`unknown option "${arg}"\n\n${USAGE}`);
    }
  }
  if (baseRoot === undefined) {
    if (o.serversGiven && o.servers.includes('node-base')) throw new Error('--servers node-base needs --base DIR');
    o.servers = o.servers.filter((s) => s !== 'node-base');
  }
  if (o.servers.length === 0) throw new Error('--servers selects nothing');
  if (o.workloads.length === 0) throw new Error('--workloads selects nothing');
  return o;
}

// ---------------------------------------------------------- process hygiene

// Every process we start is registered here so that it is killed on any exit
// path: normal end, thrown error, SIGINT/SIGTERM/SIGHUP.
const pidFiles = new Set<string>(); // daemons that fork away (nbd-server)


/** Pids of all descendants of pid (from /proc), deepest last. */
function descendants(pid: number): number[] {
  const parentOf = new Map<number, number>();
  for (const name of fs.readdirSync('/proc')) {
    if (!/^\d+$/.test(name)) continue;
    try {
      const stat = fs.readFileSync(`/proc/${name}/stat`, 'utf8');
      const ppid = Number(stat.slice(stat.lastIndexOf(')') + 2).split(' ')[1]);
      parentOf.set(Number(name), ppid);
    } catch {
      /* raced with exit */
    }
  }
  const out: number[] = [];
  const queue = [pid];
  while (queue.length) {
    const p = queue.shift()!;
    for (const [c, pp] of parentOf) {
      if (pp === p && !out.includes(c)) {
        out.push(c);
        queue.push(c);
      }
    }
  }
  return out;
}

/**
 * Signal the daemon named in a pid file and, since nbd-server forks one child
 * per connection that outlives a killed parent, every descendant of it too.
 */
function killPidFile(file: string, signal: NodeJS.Signals): void {
  let pid = 0;
  try {
    pid = Number(fs.readFileSync(file, 'utf8').trim());
  } catch {
    return; // no file
  }
  if (!(pid > 1)) return;
  let kids: number[] = [];
  try {
    kids = descendants(pid);
  } catch {
    /* no /proc */
  }
  for (const p of [pid, ...kids]) {
    try {
      process.kill(p, signal);
    } catch {
      /* already gone */
    }
  }
}

function cleanupSync(): void {
  cleanupProcesses();
  for (const f of pidFiles) killPidFile(f, 'SIGKILL');
  pidFiles.clear();
}

process.on('exit', cleanupSync);
// The snapshot benchmark child cleans up after itself on SIGTERM, so it is
// not SIGKILLed with the rest.
let snapshotChild: ChildProcess | undefined;

for (const sig of ['SIGINT', 'SIGTERM', 'SIGHUP'] as const) {
  process.on(sig, () => {
    process.stderr.write(`\nbench: ${sig}, stopping servers and cleaning up\n`);
    if (snapshotChild && snapshotChild.exitCode === null && snapshotChild.signalCode === null) snapshotChild.kill('SIGTERM');
    cleanupSync();
    process.exit(128 + (os.constants.signals[sig] ?? 1));
  });
}




// ------------------------------------------------------------------- image


/** Read the whole file once so every server starts from a warm page cache. */
function warmCache(file: string): void {
  const fd = fs.openSync(file, 'r');
  const buf = Buffer.allocUnsafe(16 * MiB);
  try {
    let off = 0;
    for (;;) {
      const n = fs.readSync(fd, buf, 0, buf.length, off);
      if (n <= 0) break;
      off += n;
    }
  } finally {
    fs.closeSync(fd);
  }
}

/** Push dirty pages of the image to disk so one server's writeback does not land in the next one's run. */
function flushImage(file: string): void {
  const fd = fs.openSync(file, 'r+');
  try {
    fs.fsyncSync(fd);
  } finally {
    fs.closeSync(fd);
  }
}

// ----------------------------------------------------------------- servers

interface Running {
  uri: string;
  transport: string;
  stop(): Promise<void>;
}

interface ServerDef {
  id: ServerId;
  label: string;
  bin: string; // what must be on PATH (or, for node, exist)
  available(): boolean;
  version(): string;
  start(ctx: StartCtx): Promise<Running>;
}

interface StartCtx {
  image: string;
  size: number;
  work: string; // per-run temp dir
  tag: string; // unique per start
  opts: Options;
}


function dpkgVersion(pkg: string): string | undefined {
  if (!which('dpkg-query')) return undefined;
  const r = spawnSync('dpkg-query', ['-W', '-f=${Version}', pkg], { encoding: 'utf8' });
  return r.status === 0 && r.stdout.trim() ? r.stdout.trim() : undefined;
}

/** Start a server as its own process group with stdout/stderr going to a log file. */
function launch(cmd: string, args: string[], logFile: string): ChildProcess {
  const fd = fs.openSync(logFile, 'a');
  try {
    fs.writeSync(fd, `$ ${[cmd, ...args].join(' ')}\n`);
    const child = spawn(cmd, args, { detached: true, stdio: ['ignore', fd, fd] });
    live.add(child);
    child.on('exit', () => live.delete(child));
    child.on('error', () => live.delete(child));
    return child;
  } finally {
    fs.closeSync(fd);
  }
}







/** Finish starting a server; if that fails, stop what was started before rethrowing. */
async function readyOrStop(running: Running, check: () => Promise<void> | void): Promise<Running> {
  try {
    await check();
    return running;
  } catch (err) {
    await running.stop().catch(() => undefined);
    throw err;
  }
}

/** Starts a peer server that listens on a unix socket given on its command line; ready when the socket answers. */
async function startOnSocket(ctx: StartCtx, cmd: string, args: (sock: string) => string[]): Promise<Running> {
  const sock = path.join(ctx.work, `${ctx.tag}.sock`);
  const logFile = path.join(ctx.work, `${ctx.tag}.log`);
  const child = launch(cmd, args(sock), logFile);
  const uri = unixUri(sock);
  const running: Running = {
    uri,
    transport: 'unix',
    stop: async () => {
      await stopChild(child, 5000);
      fs.rmSync(sock, { force: true });
    },
  };
  return readyOrStop(running, async () => {
    await waitSocket(sock, child, logFile);
    verifyExport(uri, ctx.size, logFile);
  });
}

/** Serves ctx.image with the node-nbd-server CLI at `cli` (this checkout's, or --base's). */
function startNode(ctx: Parameters<ServerDef['start']>[0], cli: string) {
  return startOnSocket(ctx, process.execPath, (sock) => [
    cli, 'serve', ctx.image, '--socket', sock, '--log-level', 'warn',
    ...(ctx.opts.nodeThreads ? ['--threads', String(ctx.opts.nodeThreads)] : []),
  ]);
}

const SERVERS: ServerDef[] = [
  {
    id: 'node',
    label: 'node-nbd-server',
    bin: NODE_CLI,
    available: () => fs.existsSync(NODE_CLI) && fs.existsSync(path.join(ROOT, 'dist', 'src', 'cli', 'main.js')),
    version: () => {
      const pkg = JSON.parse(fs.readFileSync(path.join(ROOT, 'package.json'), 'utf8')) as { version?: string };
      return `node-nbd-server ${pkg.version ?? '?'} (node ${process.version})`;
    },
    start: (ctx) => startNode(ctx, NODE_CLI),
  },
  {
    id: 'node-base',
    label: 'node-nbd-server (--base)',
    bin: 'node-base',
    available: () => baseRoot !== undefined && fs.existsSync(path.join(baseRoot, 'dist', 'src', 'cli', 'main.js')),
    version: () => {
      const r = spawnSync('git', ['-C', baseRoot!, 'log', '-1', '--format=%h %s'], { encoding: 'utf8' });
      return `node-nbd-server at ${baseRoot} (${(r.stdout ?? '').trim().slice(0, 60)})`;
    },
    start: (ctx) => startNode(ctx, path.join(baseRoot!, 'bin', 'node-nbd-server.js')),
  },
  {
    id: 'nbdkit',
    label: 'nbdkit file',
    bin: 'nbdkit',
    available: () => which('nbdkit') !== undefined,
    version: () => firstLine('nbdkit', ['--version']),
    // -f: foreground; --exit-with-parent: dies with us even on SIGKILL.
    // Thread count and file plugin options are nbdkit's defaults.
    start: (ctx) => startOnSocket(ctx, 'nbdkit', (sock) => ['-f', '--exit-with-parent', '-U', sock, 'file', `file=${ctx.image}`]),
  },
  {
    id: 'qemu',
    label: 'qemu-nbd',
    bin: 'qemu-nbd',
    available: () => which('qemu-nbd') !== undefined,
    version: () => firstLine('qemu-nbd', ['--version']),
    // --shared=8 so the readiness probe, nbdinfo and fio may overlap.
    start: (ctx) => startOnSocket(ctx, 'qemu-nbd', (sock) => ['-t', '-f', 'raw', '--cache=writeback', '--shared=8', '-k', sock, ctx.image]),
  },
  {
    id: 'nbd-server',
    label: 'nbd-server',
    bin: 'nbd-server',
    available: () => which('nbd-server') !== undefined,
    version: () => {
      const v = firstLine('nbd-server', ['-V']);
      const deb = dpkgVersion('nbd-server');
      return deb ? `${v} (deb ${deb})` : v;
    },
    async start(ctx) {
      const sock = path.join(ctx.work, `${ctx.tag}.sock`);
      const logFile = path.join(ctx.work, `${ctx.tag}.log`);
      const conf = path.join(ctx.work, `${ctx.tag}.conf`);
      const pidFile = path.join(ctx.work, `${ctx.tag}.pid`);
      // nbd-server's -d ("do not fork") serves a single connection and then
      // exits, so it runs as its usual daemon (one forked child per client)
      // and is tracked through its pid file. With unixsock set it listens on
      // the unix socket only. The export name is the section name.
      fs.writeFileSync(conf, `[generic]\nunixsock = ${sock}\n\n[bench]\nexportname = ${ctx.image}\n`);
      pidFiles.add(pidFile);
      const child = launch('nbd-server', ['-C', conf, '-p', pidFile], logFile);
      await waitExit(child, 10_000); // the launcher returns once the daemon is forked off
      if (child.exitCode !== 0) {
        await stopChild(child, 5000);
        killPidFile(pidFile, 'SIGKILL');
        pidFiles.delete(pidFile);
        throw new Error(`nbd-server failed to start (exit ${child.exitCode ?? child.signalCode ?? 'timeout'}):\n${tail(logFile)}`);
      }
      const uri = unixUri(sock, 'bench');
      const running: Running = {
        uri,
        transport: 'unix',
        stop: async () => {
          let pid = 0;
          try {
            pid = Number(fs.readFileSync(pidFile, 'utf8').trim());
          } catch {
            /* gone */
          }
          if (pid > 1) {
            killPidFile(pidFile, 'SIGTERM');
            const deadline = Date.now() + 5000;
            while (Date.now() < deadline && alive(pid)) await sleep(50);
            if (alive(pid)) killPidFile(pidFile, 'SIGKILL');
          }
          pidFiles.delete(pidFile);
          fs.rmSync(sock, { force: true });
        },
      };
      return readyOrStop(running, async () => {
        await waitSocket(sock, undefined, logFile);
        verifyExport(uri, ctx.size, logFile);
      });
    },
  },
];

function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
  } catch {
    return false;
  }
  // A zombie still answers signal 0; look at its state.
  try {
    const stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
    return !/^\d+ \(.*\) Z/.test(stat);
  } catch {
    return false;
  }
}

// --------------------------------------------------------------------- fio

interface Sample {
  iops: number;
  mibs: number;
  p99us: number;
  meanUs: number;
}

let currentFio: ChildProcess | undefined;

async function runFio(w: Workload, uri: string, ctx: StartCtx): Promise<Sample> {
  const out = path.join(ctx.work, `${ctx.tag}.fio.json`);
  const args = [
    `--name=${w.name}`,
    '--ioengine=nbd',
    `--uri=${uri}`,
    `--rw=${w.rw}`,
    `--bs=${w.bs}`,
    `--iodepth=${w.iodepth}`,
    '--numjobs=1',
    // Run the job as a thread of this fio process (not a forked session
    // leader) so that killing fio really stops the I/O.
    '--thread',
    `--size=${ctx.size}`,
    '--time_based',
    `--runtime=${ctx.opts.runtime}`,
    `--ramp_time=${ctx.opts.ramp}`,
    '--output-format=json',
    `--output=${out}`,
  ];
  const child = spawn('fio', args, { detached: true, stdio: ['ignore', 'pipe', 'pipe'] });
  live.add(child);
  currentFio = child;
  let stderr = '';
  child.stderr!.on('data', (d: Buffer) => (stderr += d.toString('utf8')));
  child.stdout!.resume();
  const limitMs = (ctx.opts.runtime + ctx.opts.ramp + 60) * 1000;
  const timer = setTimeout(() => killTree(child, 'SIGKILL'), limitMs);
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
  if (code !== 0) throw new Error(`fio exited with ${code}: ${stderr.trim() || text.trim().slice(0, 500)}`);
  // fio may print informational lines before the JSON document.
  const start = text.indexOf('{');
  if (start < 0) throw new Error(`fio wrote no JSON: ${stderr.trim()}`);
  const doc = JSON.parse(text.slice(start)) as {
    jobs: Array<{
      error: number;
      read: FioDir;
      write: FioDir;
    }>;
  };
  const job = doc.jobs[0];
  if (job.error) throw new Error(`fio job error ${job.error}: ${stderr.trim()}`);
  const dir = w.rw.includes('read') ? job.read : job.write;
  return {
    iops: dir.iops,
    mibs: dir.bw_bytes / MiB,
    p99us: (dir.clat_ns?.percentile?.['99.000000'] ?? NaN) / 1000,
    meanUs: (dir.clat_ns?.mean ?? NaN) / 1000,
  };
}

interface FioDir {
  iops: number;
  bw_bytes: number;
  clat_ns?: { mean?: number; percentile?: Record<string, number> };
}

// ------------------------------------------------------------------ output





interface Cell {
  samples: Sample[];
  errors: string[];
}


// -------------------------------------------------------------------- main

async function main(): Promise<void> {
  // --backup: the backup benchmark alone (tools/bench-backup.ts), with every
  // other argument passed on to it.
  if (process.argv.includes('--backup')) {
    await runChildBench('backup', [path.join(__dirname, 'bench-backup.js'), ...process.argv.slice(2).filter((a) => a !== '--backup')]);
    return;
  }
  const opts = parseArgs(process.argv.slice(2));
  if (!which('fio')) throw new Error('fio is not installed (it drives every server); install the "fio" package');
  const image = path.join(opts.dir, `bench-${opts.size}.img`);
  const work = fs.mkdtempSync(path.join(os.tmpdir(), 'nbd-bench-'));
  tempPaths.add(work);

  const selected = SERVERS.filter((s) => opts.servers.includes(s.id));
  const versions: Record<string, string> = {};
  const present: ServerDef[] = [];
  for (const s of selected) {
    if (s.available()) {
      versions[s.id] = s.version();
      present.push(s);
    } else {
      versions[s.id] = 'missing';
      log(`${s.label}: missing (${s.bin} not found), skipped`);
    }
  }
  const fioVersion = firstLine('fio', ['--version']);

  ensureImage(image, opts.size);
  const perRun = opts.runtime + opts.ramp + 2;
  const estimate = opts.repeat * opts.workloads.length * present.length * perRun;
  log(
    `bench: ${present.length} server(s) x ${opts.workloads.length} workload(s) x ${opts.repeat} repeat(s), ` +
      `${opts.runtime} s + ${opts.ramp} s ramp each: about ${Math.ceil(estimate / 60)} min`,
  );

  const cells = new Map<string, Cell>();
  const key = (w: string, s: string) => `${w}\u0000${s}`;
  for (const w of opts.workloads) for (const s of present) cells.set(key(w.name, s.id), { samples: [], errors: [] });
  const transports: Record<string, string> = {};

  let tagN = 0;
  for (let rep = 0; rep < opts.repeat; rep++) {
    for (const w of opts.workloads) {
      // Rotate the server order per repeat so that no one always goes first.
      const order = present.map((_, i) => present[(i + rep) % present.length]);
      for (const s of order) {
        const cell = cells.get(key(w.name, s.id))!;
        const tag = `${s.id}-${w.name}-${rep}-${tagN++}`;
        const ctx: StartCtx = { image, size: opts.size, work, tag, opts };
        flushImage(image);
        if (w.rw.includes('read')) warmCache(image);
        let running: Running | undefined;
        try {
          running = await s.start(ctx);
          transports[s.id] = running.transport;
          const sample = await runFio(w, running.uri, ctx);
          cell.samples.push(sample);
          log(
            `  [${rep + 1}/${opts.repeat}] ${w.name.padEnd(12)} ${s.label.padEnd(16)} ` +
              `${fmtNum(sample.iops).padStart(9)} IOPS ${fmtNum(sample.mibs, 1).padStart(8)} MiB/s  p99 ${fmtNum(sample.p99us).padStart(7)} us`,
          );
        } catch (err) {
          const msg = (err as Error).message ?? String(err);
          cell.errors.push(msg);
          log(`  [${rep + 1}/${opts.repeat}] ${w.name.padEnd(12)} ${s.label.padEnd(16)} FAILED: ${msg}`);
        } finally {
          if (running) await running.stop();
        }
      }
    }
  }
  flushImage(image);

  // ---- report
  const rows: string[][] = [['workload', 'server', 'IOPS', 'MiB/s', 'p99 us', 'node/best']];
  const results: Array<Record<string, unknown>> = [];
  for (const w of opts.workloads) {
    const med = new Map<ServerId, Sample>();
    for (const s of present) {
      const c = cells.get(key(w.name, s.id))!;
      if (c.samples.length === 0) continue;
      med.set(s.id, {
        iops: median(c.samples.map((x) => x.iops)),
        mibs: median(c.samples.map((x) => x.mibs)),
        p99us: median(c.samples.map((x) => x.p99us)),
        meanUs: median(c.samples.map((x) => x.meanUs)),
      });
    }
    let best: { id: ServerId; iops: number } | undefined;
    for (const [id, m] of med) if (id !== 'node' && (!best || m.iops > best.iops)) best = { id, iops: m.iops };
    const nodeM = med.get('node');
    const ratio = nodeM && best && best.iops > 0 ? nodeM.iops / best.iops : undefined;
    const label = `${w.name} QD${w.iodepth}`;
    for (const s of selected) {
      const m = med.get(s.id);
      const c = cells.get(key(w.name, s.id));
      let status = 'ok';
      if (versions[s.id] === 'missing') status = 'missing';
      else if (!m) status = 'failed';
      const ratioText =
        s.id === 'node' && ratio !== undefined ? `${ratio.toFixed(2)}x vs ${SERVERS.find((x) => x.id === best!.id)!.label}` : '';
      rows.push([
        label,
        s.label,
        m ? fmtNum(m.iops) : status,
        m ? fmtNum(m.mibs, 1) : '',
        m ? fmtNum(m.p99us) : '',
        ratioText,
      ]);
      results.push({
        workload: w.name,
        rw: w.rw,
        bs: w.bs,
        iodepth: w.iodepth,
        server: s.id,
        status,
        iops: m?.iops ?? null,
        mibPerSec: m?.mibs ?? null,
        p99LatencyUs: m?.p99us ?? null,
        meanLatencyUs: m?.meanUs ?? null,
        samples: c?.samples ?? [],
        errors: c?.errors ?? [],
        nodeToBestPeerIopsRatio: s.id === 'node' ? (ratio ?? null) : undefined,
        bestPeer: s.id === 'node' ? (best?.id ?? null) : undefined,
      });
    }
  }

  const out: string[] = [];
  out.push('');
  out.push(
    `node-nbd-server benchmark: image ${fmtBytes(opts.size)} (${image}), fio nbd engine over unix sockets, ` +
      `1 job, runtime ${opts.runtime} s + ramp ${opts.ramp} s, ${opts.repeat} repeat(s)${opts.repeat > 1 ? ' (medians)' : ''}`,
  );
  out.push(`host: ${os.cpus().length} CPU(s) ${os.cpus()[0]?.model ?? ''}, ${fmtBytes(os.totalmem())} RAM, ${os.type()} ${os.release()}`);
  out.push('');
  out.push(table(rows, [false, false, true, true, true, false]));
  out.push('');
  out.push('node/best = node-nbd-server IOPS / IOPS of the fastest other server for that workload.');
  if (opts.repeat > 1) out.push(`Each column is the median of its own ${opts.repeat} samples (see --json for all samples).`);
  out.push('');
  out.push('versions:');
  out.push(`  fio: ${fioVersion}`);
  for (const s of selected) out.push(`  ${s.label}: ${versions[s.id]}`);
  const failures = [...cells.entries()].filter(([, c]) => c.errors.length > 0);
  if (failures.length) {
    out.push('');
    out.push('errors:');
    for (const [k, c] of failures) {
      const [wn, sid] = k.split('\u0000');
      for (const e of c.errors) out.push(`  ${wn} / ${sid}: ${e.split('\n').join('\n    ')}`);
    }
  }
  process.stdout.write(out.join('\n') + '\n');

  if (opts.json) {
    const doc = {
      date: new Date().toISOString(),
      host: { cpus: os.cpus().length, cpuModel: os.cpus()[0]?.model ?? null, memBytes: os.totalmem(), kernel: os.release() },
      image: { path: image, sizeBytes: opts.size },
      fio: { version: fioVersion, runtimeSec: opts.runtime, rampSec: opts.ramp, repeat: opts.repeat, numjobs: 1 },
      versions,
      transports,
      results,
    };
    fs.writeFileSync(opts.json, JSON.stringify(doc, null, 2) + '\n');
    log(`bench: wrote ${opts.json}`);
  }
  if (opts.removeImage) fs.rmSync(image, { force: true });
  if (opts.snapshots) await runSnapshotBench(opts);
  if (opts.rollback) {
    const args = [path.join(__dirname, 'bench-rollback.js'), '--repeat', String(opts.repeat)];
    if (opts.json) args.push('--json', opts.json.replace(/(\.json)?$/, '.rollback.json'));
    await runChildBench('rollback', args);
  }
}

/** Runs dist/tools/bench-snapshots.js with this run's settings; its output goes straight to ours. */
async function runSnapshotBench(opts: Options): Promise<void> {
  const script = path.join(__dirname, 'bench-snapshots.js');
  const args = [script, '--repeat', String(opts.repeat), '--runtime', String(opts.runtime), '--ramp', String(opts.ramp)];
  if (opts.nodeThreads) args.push('--node-threads', String(opts.nodeThreads));
  if (opts.serversGiven) {
    const s = [opts.servers.includes('node') ? 'node' : '', opts.servers.includes('qemu') ? 'qemu' : ''].filter(Boolean);
    if (s.length) args.push('--servers', s.join(','));
  }
  if (opts.json) args.push('--json', opts.json.replace(/(\.json)?$/, '.snapshots.json'));
  args.push(...opts.snapshotArgs); // later options win
  await runChildBench('snapshot', args);
}

/** Runs another benchmark script (args[0]); its output goes straight to ours. */
async function runChildBench(what: string, args: string[]): Promise<void> {
  log(`\nbench: ${what} benchmark: node ${path.relative(process.cwd(), args[0]!)} ${args.slice(1).join(' ')}`);
  const child = spawn(process.execPath, args, { stdio: 'inherit' });
  snapshotChild = child;
  const code = await new Promise<number | null>((resolve) => {
    child.once('error', (e) => {
      log(`bench: cannot run the ${what} benchmark: ${e.message}`);
      resolve(-1);
    });
    child.once('exit', (c, sig) => resolve(c ?? (sig ? 128 : null)));
  });
  snapshotChild = undefined;
  if (code !== 0) {
    log(`bench: the ${what} benchmark failed (exit ${code})`);
    process.exitCode = 1;
  }
}

main().then(
  () => cleanupSync(),
  (err: unknown) => {
    if (currentFio) killTree(currentFio, 'SIGKILL');
    process.stderr.write(`bench: error: ${(err as Error)?.message ?? String(err)}\n`);
    cleanupSync();
    process.exitCode = 1;
  },
);
