// bench-rollback.ts — rollback benchmark (`npm run bench -- --rollback`, or
// `node dist/tools/bench-rollback.js` alone).
//
// For each volume size (default 1 GiB and 1 TiB, sparse): serve it, take a
// snapshot, write --changed bytes as random 4 MiB writes spread over the whole
// volume (fio's nbd engine), then roll back to the snapshot:
//   time-to-visible  server side: from the request to live reads showing the
//                    snapshot (the rollback's `visibleMs`); and the CLI's wall
//                    time. It must not grow with the volume size.
//   merge            the background merge of the changed chunks, timed from
//                    the history (rollback -> merge-finished), as MiB/s and as
//                    a ratio to `cp` of the same amount of data between two
//                    files on the same disk (cp alone, and cp + fsync: the
//                    merge makes every step durable before recording it).
// Ratios are computed within one run, side by side; medians of --repeat.
import { spawn, spawnSync, type ChildProcess } from 'child_process';
import * as crypto from 'crypto';
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { parseSize } from '../src/size';
import { killTree, log, median, sleep, unixUri, waitExit, waitSocket, which } from './bench-common';

const MiB = 1024 * 1024;
const CLI = path.join(__dirname, '..', 'src', 'cli', 'main.js');

interface Options {
  sizes: number[];
  changed: number;
  repeat: number;
  dir: string;
  json?: string;
}

const USAGE = `usage: node dist/tools/bench-rollback.js [options]

  --sizes LIST     volume sizes, comma list (default 1G,1T), sparse files
  --changed SIZE   data changed after the snapshot, in random 4 MiB writes
                   (default 256M); this is what the merge copies back
  --repeat N       rollbacks per size (default 3), medians reported
  --dir DIR        where the images live (default a temp dir, removed after)
  --json FILE      also write the results as JSON
`;

function parseArgs(argv: string[]): Options {
  const o: Options = { sizes: [parseSize('1G'), parseSize('1T')], changed: 256 * MiB, repeat: 3, dir: '' };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    const next = () => {
      const v = argv[++i];
      if (v === undefined) throw new Error(`${a} needs a value`);
      return v;
    };
    if (a === '-h' || a === '--help') {
      process.stdout.write(USAGE);
      process.exit(0);
    } else if (a === '--sizes') o.sizes = next().split(',').map((s) => parseSize(s.trim()));
    else if (a === '--changed') o.changed = parseSize(next());
    else if (a === '--repeat') o.repeat = Math.max(1, Number(next()) | 0);
    else if (a === '--dir') o.dir = path.resolve(next());
    else if (a === '--json') o.json = path.resolve(next());
    else throw new Error(`unknown option "${a}"\n\n${USAGE}`);
  }
  return o;
}

function cli(args: string[]): { stdout: string; ms: number } {
  const t0 = process.hrtime.bigint();
  const r = spawnSync(process.execPath, [CLI, ...args], { encoding: 'utf8' });
  const ms = Number(process.hrtime.bigint() - t0) / 1e6;
  if (r.status !== 0) throw new Error(`node-nbd-server ${args.join(' ')} failed: ${r.stderr}`);
  return { stdout: r.stdout, ms };
}

async function startServer(image: string, sock: string, logFile: string): Promise<ChildProcess> {
  const fd = fs.openSync(logFile, 'a');
  const child = spawn(process.execPath, [CLI, 'serve', image, '--socket', sock, '--log-level', 'info'], {
    detached: true,
    stdio: ['ignore', fd, fd],
  });
  fs.closeSync(fd);
  await waitSocket(sock, child, logFile);
  return child;
}

/** Random 4 MiB writes spread over the whole volume, `bytes` in total (fio nbd engine). */
function scatterWrites(sock: string, size: number, bytes: number): void {
  const r = spawnSync(
    'fio',
    [
      '--name=scatter',
      '--ioengine=nbd',
      `--uri=${unixUri(sock)}`,
      '--rw=randwrite',
      '--bs=4M',
      '--iodepth=4',
      `--size=${size}`,
      `--io_size=${bytes}`,
      '--norandommap',
      `--randseed=${crypto.randomInt(1 << 30)}`,
      '--output-format=terse',
    ],
    { encoding: 'utf8' },
  );
  if (r.status !== 0) throw new Error(`fio failed: ${r.stderr}`);
}

interface HistoryEntry {
  event: string;
  ms?: number;
  chunks?: number;
}

async function waitMerged(image: string, before: number): Promise<HistoryEntry> {
  for (;;) {
    const h = JSON.parse(cli(['history', image, '--json']).stdout) as HistoryEntry[];
    const done = h.slice(before).find((e) => e.event === 'merge-finished');
    if (done) return done;
    await sleep(100);
  }
}

/** cp of `bytes` between two files on the same disk, alone and with an fsync after. */
function cpBaseline(dir: string, bytes: number): { cpMs: number; cpSyncMs: number } {
  const src = path.join(dir, 'cp-src');
  const dst = path.join(dir, 'cp-dst');
  const buf = crypto.randomBytes(4 * MiB);
  const fd = fs.openSync(src, 'w');
  for (let off = 0; off < bytes; off += buf.length) fs.writeSync(fd, buf, 0, Math.min(buf.length, bytes - off));
  fs.fsyncSync(fd);
  fs.closeSync(fd);
  fs.rmSync(dst, { force: true });
  let t0 = process.hrtime.bigint();
  spawnSync('cp', [src, dst]);
  const cpMs = Number(process.hrtime.bigint() - t0) / 1e6;
  fs.rmSync(dst, { force: true });
  t0 = process.hrtime.bigint();
  spawnSync('cp', [src, dst]);
  spawnSync('sync', [dst]);
  const cpSyncMs = Number(process.hrtime.bigint() - t0) / 1e6;
  fs.rmSync(src, { force: true });
  fs.rmSync(dst, { force: true });
  return { cpMs, cpSyncMs };
}

interface Sample {
  visibleMs: number;
  cliMs: number;
  mergeMs: number;
  mergedBytes: number;
  cpMs: number;
  cpSyncMs: number;
}

async function main(): Promise<void> {
  const opts = parseArgs(process.argv.slice(2));
  if (!which('fio')) throw new Error('fio is needed (apt-get install fio)');
  const own = !opts.dir;
  const dir = opts.dir || fs.mkdtempSync(path.join(os.tmpdir(), 'nbd-bench-rollback-'));
  fs.mkdirSync(dir, { recursive: true });
  const results: Record<string, Sample[]> = {};
  try {
    for (const size of opts.sizes) {
      const label = size >= 1024 ** 4 ? `${size / 1024 ** 4} TiB` : `${size / 1024 ** 3} GiB`;
      const image = path.join(dir, `rollback-${size}.img`);
      fs.rmSync(image, { force: true });
      fs.rmSync(`${image}.nbd`, { recursive: true, force: true });
      fs.writeFileSync(image, '');
      fs.truncateSync(image, size);
      const sock = path.join(dir, `rollback-${size}.sock`);
      const server = await startServer(image, sock, path.join(dir, `rollback-${size}.log`));
      const samples: Sample[] = [];
      try {
        cli(['snapshot', 'create', image, 'base']);
        const { chunkSize } = JSON.parse(cli(['info', image, '--json']).stdout) as { chunkSize: number };
        for (let rep = 0; rep < opts.repeat; rep++) {
          log(`${label}: writing ${opts.changed / MiB} MiB at random, then rollback (repeat ${rep + 1}/${opts.repeat})`);
          scatterWrites(sock, size, opts.changed);
          const before = (JSON.parse(cli(['history', image, '--json']).stdout) as HistoryEntry[]).length;
          const r = cli(['rollback', image, 'base', '--json']);
          const res = JSON.parse(r.stdout) as { visibleMs: number; total: number };
          const done = await waitMerged(image, before);
          const mergedBytes = (done.chunks ?? res.total) * chunkSize;
          const cp = cpBaseline(dir, mergedBytes);
          samples.push({ visibleMs: res.visibleMs, cliMs: r.ms, mergeMs: done.ms ?? NaN, mergedBytes, ...cp });
        }
      } finally {
        killTree(server, 'SIGTERM');
        await waitExit(server, 30_000);
      }
      results[label] = samples;
      fs.rmSync(image, { force: true });
      fs.rmSync(`${image}.nbd`, { recursive: true, force: true });
    }
  } finally {
    if (own) fs.rmSync(dir, { recursive: true, force: true });
  }
  const rows = [['volume', 'changed', 'visible (server)', 'rollback CLI', 'merge', 'merge MiB/s', 'cp MiB/s', 'merge/cp', 'cp+fsync MiB/s', 'merge/(cp+fsync)']];
  for (const [label, s] of Object.entries(results)) {
    const m = (f: (x: Sample) => number) => median(s.map(f));
    const mibs = (bytes: number, ms: number) => bytes / MiB / (ms / 1000);
    const merge = m((x) => mibs(x.mergedBytes, x.mergeMs));
    const cp = m((x) => mibs(x.mergedBytes, x.cpMs));
    const cps = m((x) => mibs(x.mergedBytes, x.cpSyncMs));
    rows.push([
      label,
      `${(m((x) => x.mergedBytes) / MiB).toFixed(0)} MiB`,
      `${m((x) => x.visibleMs).toFixed(1)} ms`,
      `${m((x) => x.cliMs).toFixed(0)} ms`,
      `${(m((x) => x.mergeMs) / 1000).toFixed(2)} s`,
      merge.toFixed(0),
      cp.toFixed(0),
      `${m((x) => mibs(x.mergedBytes, x.mergeMs) / mibs(x.mergedBytes, x.cpMs)).toFixed(2)}x`,
      cps.toFixed(0),
      `${m((x) => mibs(x.mergedBytes, x.mergeMs) / mibs(x.mergedBytes, x.cpSyncMs)).toFixed(2)}x`,
    ]);
  }
  const w = rows[0]!.map((_, c) => Math.max(...rows.map((r) => r[c]!.length)));
  process.stdout.write('\nrollback: time-to-visible and background merge (medians of ' + opts.repeat + ')\n');
  for (const r of rows) process.stdout.write(r.map((v, c) => (c === 0 ? v.padEnd(w[c]!) : v.padStart(w[c]!))).join('  ') + '\n');
  process.stdout.write(
    'visible (server) = rollback request to live reads showing the snapshot (server-side, includes the job file sync);\n' +
      'merge = rollback to merge-finished (history); cp = copying the same bytes between two files on the same disk.\n',
  );
  if (opts.json) fs.writeFileSync(opts.json, JSON.stringify(results, null, 2));
}

main().catch((err: Error) => {
  process.stderr.write(`bench-rollback: error: ${err.message}\n`);
  process.exit(1);
});
