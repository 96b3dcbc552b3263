// Pauses and memory of the first-write journal under load (issue: "pauses stay
// short", "memory bounded across volumes"). Two parts:
//
//   pauses:  one volume (default 4 GiB, sparse) with a snapshot; fio's nbd
//            engine runs 4k random writes at QD32 (almost all first writes:
//            the sustained case, where the queue is full) while a snapshot
//            is created every --interval seconds through the control socket.
//            Reports each create's latency (request to reply) and fio's write
//            completion latencies (max = the longest write stall).
//   volumes: --volumes N volumes (default 100 × 1 GiB, sparse), each with a
//            snapshot, served by one server; 8 MiB of first writes to each;
//            then the server's VmRSS and RssShmem (/proc/PID/status) and the
//            bytes in the journal directory.
//
// Usage: node dist/tools/bench-pauses.js [--part pauses|volumes|both]
//          [--server PATH/bin/node-nbd-server.js] [--size 4G] [--runtime 20]
//          [--interval 1] [--volumes 100] [--volume-size 1G] [--dir DIR]
// --server runs another build (for before/after tables side by side).
import { spawn, spawnSync, type ChildProcess } from 'child_process';
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { callControl } from '../src/control';
import { cleanupProcesses, fmtBytes, fmtNum, live, log, median, parseSize, sleep, stopChild, table, tempPaths, unixUri, waitSocket } from './bench-common';

interface Options {
  part: 'pauses' | 'volumes' | 'both';
  server: string;
  size: number;
  runtime: number;
  interval: number;
  volumes: number;
  volumeSize: number;
  dir: string;
}

function parseArgs(argv: string[]): Options {
  const o: Options = {
    part: 'both',
    server: path.resolve(__dirname, '..', '..', 'bin', 'node-nbd-server.js'),
    size: 4 * 2 ** 30,
    runtime: 20,
    interval: 1,
    volumes: 100,
    volumeSize: 2 ** 30,
    dir: os.tmpdir(),
  };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i]!;
    const v = () => {
      if (i + 1 >= argv.length) throw new Error(`${a} needs a value`);
      return argv[++i]!;
    };
    if (a === '--part') o.part = v() as Options['part'];
    else if (a === '--server') o.server = path.resolve(v());
    else if (a === '--size') o.size = parseSize(v());
    else if (a === '--runtime') o.runtime = Number(v());
    else if (a === '--interval') o.interval = Number(v());
    else if (a === '--volumes') o.volumes = Number(v());
    else if (a === '--volume-size') o.volumeSize = parseSize(v());
    else if (a === '--dir') o.dir = v();
    else if (a === '--help') {
      process.stdout.write(fs.readFileSync(__filename, 'utf8').split('\n').filter((l) => l.startsWith('//')).map((l) => l.slice(3)).join('\n') + '\n');
      process.exit(0);
    } else throw new Error(`unknown option ${a}`);
  }
  return o;
}

function startServer(o: Options, work: string, images: string[], sock: string, env: NodeJS.ProcessEnv): ChildProcess {
  const logFile = path.join(work, 'server.log');
  const out = fs.openSync(logFile, 'a');
  const child = spawn(process.execPath, [o.server, 'serve', ...images, '--socket', sock, '--log-level', 'warn'], {
    detached: true,
    stdio: ['ignore', out, out],
    env: { ...process.env, ...env },
  });
  live.add(child);
  return child;
}

/** Creates a snapshot through the control socket: the request-to-reply time, and how long writes were paused. */
async function snapshotCreate(image: string, name: string): Promise<{ ms: number; pausedMs: number; drainMs: number; preflushMs: number }> {
  const t0 = process.hrtime.bigint();
  const r = await callControl(image, { op: 'snapshot-create', name }, 120_000);
  if (!r) throw new Error(`no server answers for ${image}`);
  const res = r.result as { pausedMs?: number; drainMs?: number; preflushMs?: number };
  return { ms: Number(process.hrtime.bigint() - t0) / 1e6, pausedMs: res.pausedMs ?? NaN, drainMs: res.drainMs ?? NaN, preflushMs: res.preflushMs ?? NaN };
}

async function pauses(o: Options, work: string): Promise<string[][]> {
  const img = path.join(work, 'disk.img');
  fs.writeFileSync(img, '');
  fs.truncateSync(img, o.size);
  const sock = path.join(work, 'p.sock');
  const server = startServer(o, work, [img], sock, { NBD_JOURNAL_DIR: journalDir(work) });
  try {
    await waitSocket(sock, server, path.join(work, 'server.log'));
    await snapshotCreate(img, 's0');
    const json = path.join(work, 'fio.json');
    const fio = spawn(
      'fio',
      [
        '--name=w', '--ioengine=nbd', `--uri=${unixUri(sock, 'disk')}`, '--rw=randwrite', '--bs=4k', '--iodepth=32',
        '--time_based', `--runtime=${o.runtime}`, '--randrepeat=0', '--output-format=json', `--output=${json}`,
        '--percentile_list=50:99:99.9:100',
      ],
      { stdio: 'ignore' },
    );
    const creates: number[] = [];
    const paused: number[] = [];
    const drains: number[] = [];
    const preflushes: number[] = [];
    const done = new Promise<number | null>((r) => fio.once('exit', (c) => r(c)));
    let finished = false;
    void done.then(() => (finished = true));
    await sleep(2000); // past fio's start, into the sustained first writes
    for (let k = 1; !finished; k++) {
      const c = await snapshotCreate(img, `p${k}`);
      creates.push(c.ms);
      paused.push(c.pausedMs);
      drains.push(c.drainMs);
      preflushes.push(c.preflushMs);
      await sleep(o.interval * 1000);
    }
    if ((await done) !== 0) throw new Error('fio failed');
    const j = JSON.parse(fs.readFileSync(json, 'utf8')) as { jobs: { write: { iops: number; clat_ns: { max: number; percentile: Record<string, number> } } }[] };
    const w = j.jobs[0]!.write;
    const ms = (ns: number | undefined) => fmtNum((ns ?? NaN) / 1e6, 1);
    return [
      ['snapshot creates during the run', String(creates.length)],
      ['create latency, median / max (ms)', `${fmtNum(median(creates), 1)} / ${fmtNum(Math.max(...creates), 1)}`],
      ['  of it: queue applied, writes flowing, median / max (ms)', `${fmtNum(median(drains), 1)} / ${fmtNum(Math.max(...drains), 1)}`],
      ['  of it: image write-back, writes flowing, median / max (ms)', `${fmtNum(median(preflushes), 1)} / ${fmtNum(Math.max(...preflushes), 1)}`],
      ['writes paused by a create, median / max (ms)', `${fmtNum(median(paused), 1)} / ${fmtNum(Math.max(...paused), 1)}`],
      ['4k randwrite QD32 IOPS during the run', fmtNum(w.iops)],
      ['write completion latency p50 / p99 / p99.9 (ms)', `${ms(w.clat_ns.percentile['50.000000'])} / ${ms(w.clat_ns.percentile['99.000000'])} / ${ms(w.clat_ns.percentile['99.900000'])}`],
      ['longest write stall = max completion latency (ms)', ms(w.clat_ns.max)],
    ];
  } finally {
    await stopChild(server);
  }
}

/** A journal directory of the run's own, memory-backed like the default (/dev/shm). */
function journalDir(work: string): string {
  const d = fs.mkdtempSync(path.join(fs.existsSync('/dev/shm') ? '/dev/shm' : work, 'nbd-bench-journal-'));
  tempPaths.add(d);
  return d;
}

function procStatus(pid: number): Record<string, number> {
  const out: Record<string, number> = {};
  for (const line of fs.readFileSync(`/proc/${pid}/status`, 'utf8').split('\n')) {
    const m = /^(\w+):\s+(\d+) kB/.exec(line);
    if (m) out[m[1]!] = Number(m[2]) * 1024;
  }
  return out;
}

function dirBytes(dir: string): number {
  let n = 0;
  try {
    for (const f of fs.readdirSync(dir)) n += fs.statSync(path.join(dir, f)).blocks * 512;
  } catch {
    /* none */
  }
  return n;
}

async function volumes(o: Options, work: string): Promise<string[][]> {
  const images: string[] = [];
  for (let i = 0; i < o.volumes; i++) {
    const img = path.join(work, `v${i}.img`);
    fs.writeFileSync(img, '');
    fs.truncateSync(img, o.volumeSize);
    images.push(img);
  }
  const sock = path.join(work, 'v.sock');
  const jdir = journalDir(work);
  const server = startServer(o, work, images, sock, { NBD_JOURNAL_DIR: jdir });
  try {
    await waitSocket(sock, server, path.join(work, 'server.log'), 300_000);
    const idle = procStatus(server.pid!);
    for (let i = 0; i < o.volumes; i++) await snapshotCreate(images[i]!, 's1');
    // 8 MiB of first writes per volume: 4k writes spread over the volume, QD16.
    const py = [
      'import nbd, sys',
      'sock, n, vsize = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])',
      'buf = b"\\x5a" * 4096',
      'for i in range(n):',
      '    h = nbd.NBD(); h.connect_uri(f"nbd+unix:///v{i}?socket={sock}")',
      '    step = vsize // 2048',
      '    for k in range(2048): h.aio_pwrite(buf, k * step)',
      '    while h.aio_in_flight() > 0: h.poll(-1)',
      '    h.shutdown()',
    ].join('\n');
    const r = spawnSync('/usr/bin/python3', ['-c', py, sock, String(o.volumes), String(o.volumeSize)], { encoding: 'utf8' });
    if (r.status !== 0) throw new Error(`first writes failed: ${r.stderr}`);
    const loaded = procStatus(server.pid!);
    const modes = new Map<string, number>();
    for (const img of images.slice(0, o.volumes)) {
      const info = (await callControl(img, { op: 'info' }))?.result as { firstWrites?: { mode: string } } | undefined;
      const m = (info?.firstWrites?.mode ?? '?').replace(/\(.*$/, '(...)');
      modes.set(m, (modes.get(m) ?? 0) + 1);
    }
    return [
      [`volumes served (${fmtBytes(o.volumeSize)} each, one snapshot)`, String(o.volumes)],
      ['VmRSS before any first write', fmtBytes(idle.VmRSS)],
      ['VmRSS after 8 MiB of first writes per volume', fmtBytes(loaded.VmRSS)],
      ['  of which RssShmem (journal mappings)', fmtBytes(loaded.RssShmem)],
      ['journal directory (allocated bytes)', fmtBytes(dirBytes(jdir))],
      ['threads', String(loaded.Threads ?? fs.readdirSync(`/proc/${server.pid}/task`).length)],
      ['first-write modes', [...modes].map(([m, n]) => `${m}: ${n}`).join(', ')],
    ];
  } finally {
    await stopChild(server, 120_000);
  }
}

async function main(): Promise<void> {
  const o = parseArgs(process.argv.slice(2));
  const work = fs.mkdtempSync(path.join(o.dir, 'nbd-bench-pauses-'));
  tempPaths.add(work);
  log(`server: ${o.server}`);
  try {
    if (o.part !== 'volumes') {
      log(`pauses: ${fmtBytes(o.size)} volume, ${o.runtime} s of 4k randwrite QD32, a snapshot every ${o.interval} s`);
      process.stdout.write(table([['pauses', ''], ...(await pauses(o, work))], [false, true]) + '\n');
    }
    if (o.part !== 'pauses') {
      log(`volumes: ${o.volumes} × ${fmtBytes(o.volumeSize)}`);
      process.stdout.write(table([['volumes', ''], ...(await volumes(o, work))], [false, true]) + '\n');
    }
  } finally {
    cleanupProcesses();
    for (const p of tempPaths) fs.rmSync(p, { recursive: true, force: true });
  }
}

main().catch((err: unknown) => {
  cleanupProcesses();
  log(`bench-pauses: ${(err as Error).stack ?? String(err)}`);
  process.exit(1);
});
