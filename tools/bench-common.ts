// Helpers shared by the benchmarks (tools/bench.ts, tools/bench-snapshots.ts,
// tools/bench-rollback.ts): process and socket handling, the registry of
// children and temporary paths to clean up, the test image, small formatting
// and statistics.
import { spawnSync, type ChildProcess } from 'child_process';
import * as crypto from 'crypto';
import * as fs from 'fs';
import * as net from 'net';
import * as path from 'path';

export function canConnect(sock: string): Promise<boolean> {
  return new Promise((resolve) => {
    const s = net.connect(sock);
    const done = (ok: boolean) => {
      s.removeAllListeners();
      s.destroy();
      resolve(ok);
    };
    s.once('connect', () => done(true));
    s.once('error', () => done(false));
    s.setTimeout(1000, () => done(false));
  });
}

export function exited(child: ChildProcess): boolean {
  return child.exitCode !== null || child.signalCode !== null;
}

export function firstLine(cmd: string, args: string[]): string {
  const r = spawnSync(cmd, args, { encoding: 'utf8', timeout: 10_000 });
  const out = `${r.stdout ?? ''}\n${r.stderr ?? ''}`.split('\n').map((l) => l.trim()).filter(Boolean);
  return out[0] ?? (r.error ? String(r.error.message) : '?');
}

export function killTree(child: ChildProcess, signal: NodeJS.Signals): void {
  if (child.pid === undefined || child.exitCode !== null || child.signalCode !== null) return;
  try {
    process.kill(-child.pid, signal); // detached => own process group
  } catch {
    try {
      child.kill(signal);
    } catch {
      /* already gone */
    }
  }
}

export function log(msg: string): void {
  process.stderr.write(`${msg}\n`);
}

export function median(xs: number[]): number {
  const s = xs.filter((x) => Number.isFinite(x)).sort((a, b) => a - b);
  if (s.length === 0) return NaN;
  const m = s.length >> 1;
  return s.length % 2 ? s[m] : (s[m - 1] + s[m]) / 2;
}

export function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}

export function tail(file: string, lines = 15): string {
  try {
    return fs.readFileSync(file, 'utf8').trimEnd().split('\n').slice(-lines).join('\n');
  } catch {
    return '';
  }
}

export function unixUri(sock: string, exportName = ''): string {
  return `nbd+unix:///${encodeURIComponent(exportName)}?socket=${sock}`;
}

/** Check the export through a real NBD handshake (nbdinfo) and its size. */
export function verifyExport(uri: string, size: number, logFile: string): void {
  if (!which('nbdinfo')) return;
  const r = spawnSync('nbdinfo', ['--size', uri], { encoding: 'utf8', timeout: 15_000 });
  if (r.status !== 0) throw new Error(`nbdinfo --size ${uri} failed: ${(r.stderr || r.stdout || String(r.error)).trim()}\n${tail(logFile)}`);
  const got = Number(r.stdout.trim());
  if (got !== size) throw new Error(`export ${uri} has size ${got}, expected ${size}`);
}

export function waitExit(child: ChildProcess, ms: number): Promise<boolean> {
  if (exited(child) || child.pid === undefined) return Promise.resolve(true);
  return new Promise((resolve) => {
    const t = setTimeout(() => resolve(false), ms);
    child.once('exit', () => {
      clearTimeout(t);
      resolve(true);
    });
  });
}

export function which(bin: string): string | undefined {
  for (const dir of (process.env.PATH ?? '').split(path.delimiter)) {
    if (!dir) continue;
    const p = path.join(dir, bin);
    try {
      fs.accessSync(p, fs.constants.X_OK);
      if (fs.statSync(p).isFile()) return p;
    } catch {
      /* not here */
    }
  }
  return undefined;
}

// ---------------------------------------------------------------- registry
// Every child process and temporary path a benchmark makes is registered
// here, so that any exit path can kill and remove them (cleanupProcesses).

export const live = new Set<ChildProcess>();
export const tempPaths = new Set<string>();

export function cleanupProcesses(): void {
  for (const c of live) killTree(c, 'SIGKILL');
  live.clear();
  for (const p of tempPaths) fs.rmSync(p, { recursive: true, force: true });
  tempPaths.clear();
}

/** SIGTERM, then SIGKILL after `graceMs`; forgets the child. */
export async function stopChild(child: ChildProcess, graceMs = 10_000): Promise<void> {
  killTree(child, 'SIGTERM');
  if (!(await waitExit(child, graceMs))) {
    killTree(child, 'SIGKILL');
    await waitExit(child, graceMs / 2);
  }
  live.delete(child);
}

/** Waits until `sock` accepts connections; fails early if `child` exits. */
export async function waitSocket(sock: string, child: ChildProcess | undefined, logFile: string, timeoutMs = 20_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (Date.now() < deadline) {
    if (child && exited(child)) throw new Error(`server exited early (code ${child.exitCode ?? child.signalCode}):\n${tail(logFile)}`);
    if (fs.existsSync(sock) && (await canConnect(sock))) return;
    await sleep(20);
  }
  throw new Error(`server did not listen on ${sock} within ${timeoutMs / 1000} s:\n${tail(logFile)}`);
}

// ------------------------------------------------------------------- image

/**
 * A fully allocated raw image of non-zero pseudo-random data, reused when one
 * of the right size is already there. One random MiB is written over and
 * over; each 4 KiB sector gets its MiB index and its own index stamped in so
 * that no two sectors are equal.
 */
export function ensureImage(file: string, size: number): void {
  try {
    const st = fs.statSync(file);
    if (st.isFile() && st.size === size && st.blocks * 512 >= size) {
      log(`image: reusing ${file} (${fmtBytes(size)})`);
      return;
    }
    log(`image: ${file} has the wrong size or is sparse; recreating`);
  } catch {
    /* absent */
  }
  fs.mkdirSync(path.dirname(file), { recursive: true });
  const tmp = `${file}.partial-${process.pid}`;
  tempPaths.add(tmp);
  const t0 = Date.now();
  const block = crypto.randomBytes(MiB);
  for (let i = 0; i < block.length; i++) if (block[i] === 0) block[i] = 0x5a;
  const fd = fs.openSync(tmp, 'w');
  try {
    for (let off = 0, n = 0; off < size; off += MiB, n++) {
      for (let s = 0; s < MiB; s += 4096) {
        block.writeUInt32LE((n ^ 0xa5a5a5a5) >>> 0, s);
        block.writeUInt32LE(((s / 4096 + 1) * 0x9e3779b1) >>> 0 || 1, s + 4);
      }
      fs.writeSync(fd, block, 0, MiB, off);
    }
    fs.fsyncSync(fd);
  } finally {
    fs.closeSync(fd);
  }
  fs.renameSync(tmp, file);
  tempPaths.delete(tmp);
  log(`image: wrote ${file} (${fmtBytes(size)}) in ${((Date.now() - t0) / 1000).toFixed(1)} s`);
}

// ------------------------------------------------------------------ format

const KiB = 1024;
const MiB = 1024 * KiB;
const GiB = 1024 * MiB;
const TiB = 1024 * GiB;

/** A size option of a benchmark: "512M", "2G", "1T"; a positive multiple of 1 MiB. */
export function parseSize(s: string): number {
  const m = /^(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?$/i.exec(s.trim());
  if (!m) throw new Error(`bad size "${s}"`);
  const mult: Record<string, number> = { '': 1, k: KiB, m: MiB, g: GiB, t: TiB };
  const n = Math.floor(Number(m[1]) * mult[m[2].toLowerCase()]);
  if (n < MiB || n % MiB !== 0) throw new Error(`size must be a positive multiple of 1 MiB, got "${s}"`);
  return n;
}

export function fmtBytes(n: number | undefined): string {
  if (n === undefined || !Number.isFinite(n)) return '-';
  if (n >= TiB) return `${(n / TiB).toFixed(n % TiB ? 2 : 0)} TiB`;
  if (n >= GiB) return `${(n / GiB).toFixed(n % GiB ? 2 : 0)} GiB`;
  return `${(n / MiB).toFixed(n % MiB ? 1 : 0)} MiB`;
}

export function fmtNum(n: number | undefined, digits = 0): string {
  if (n === undefined || !Number.isFinite(n)) return '-';
  return n.toLocaleString('en-US', { minimumFractionDigits: digits, maximumFractionDigits: digits });
}

/** Rows as columns two spaces apart; `rightAlign[c]` for numbers. */
export function table(rows: string[][], rightAlign: boolean[]): string {
  const widths = rows[0].map((_, c) => Math.max(...rows.map((r) => (r[c] ?? '').length)));
  return rows
    .map((r) =>
      r
        .map((v, c) => (rightAlign[c] ? (v ?? '').padStart(widths[c]) : (v ?? '').padEnd(widths[c])))
        .join('  ')
        .trimEnd(),
    )
    .join('\n');
}
