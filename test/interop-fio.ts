// Interop: fio's nbd ioengine (libnbd underneath, one connection per job)
// against the real CLI server, with crc32c verification.
import t, { type Test } from 'tap';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { type RunningServer, serverFor } from './fixtures/server';
import { exec } from './fixtures/exec';
import { requireTools } from './fixtures/tools';


const MiB = 1024 * 1024;

interface FioJob {
  jobname: string;
  error: number;
  read: { io_bytes: number; total_ios: number };
  write: { io_bytes: number; total_ios: number };
  trim: { io_bytes: number; total_ios: number };
  sync?: { total_ios: number };
}

function server(t: Test, size = '128M'): Promise<RunningServer> {
  return serverFor(t, { size });
}

/** Runs fio with JSON output; returns the exit code, jobs and stderr. */
async function fio(args: string[]) {
  // --verify_state_save=0: fio would otherwise drop *-verify.state files into the cwd.
  const r = await exec('fio', ['--output-format=json', '--verify_state_save=0', ...args], { timeoutMs: 90_000 });
  // The nbd engine prints "fio: connected to NBD server" lines before the JSON.
  const start = r.stdout.indexOf('{');
  const end = r.stdout.lastIndexOf('}');
  let jobs: FioJob[] = [];
  if (start >= 0 && end > start) {
    try {
      jobs = (JSON.parse(r.stdout.slice(start, end + 1)) as { jobs: FioJob[] }).jobs;
    } catch {
      jobs = [];
    }
  }
  return { code: r.code, jobs, stderr: r.stderr, stdout: r.stdout };
}

function common(uri: string): string[] {
  return ['--ioengine=nbd', `--uri=${uri}`];
}

t.test('fio randwrite + crc32c verify, iodepth 32, 2 jobs', async (t) => {
  if (!requireTools(t, ['fio'])) return;
  const srv = await server(t);
  const r = await fio([
    ...common(srv.uri('disk')),
    '--name=randwrite-verify',
    '--rw=randwrite',
    '--bsrange=4k-128k',
    '--size=32M',
    '--offset_increment=32M', // job N works on [N*32M, N*32M+32M): jobs never overlap
    '--numjobs=2',
    '--iodepth=32',
    '--verify=crc32c',
    '--verify_fatal=1',
  ]);
  t.equal(r.code, 0, `fio exits 0\n${r.stderr}`);
  t.equal(r.jobs.length, 2, 'two jobs reported');
  for (const j of r.jobs) {
    t.equal(j.error, 0, `${j.jobname}: no error`);
    t.equal(j.write.io_bytes, 32 * MiB, `${j.jobname}: wrote 32 MiB`);
    t.equal(j.read.io_bytes, 32 * MiB, `${j.jobname}: verified 32 MiB`);
    t.ok(j.write.total_ios > 256, `${j.jobname}: ${j.write.total_ios} writes`);
  }
  t.notMatch(r.stderr + r.stdout, /verify: bad|crc32c: wanted/, 'no verify failures');
});

t.test('fio: write, then verify from fresh connections; corruption is caught', async (t) => {
  if (!requireTools(t, ['fio'])) return;
  const srv = await server(t);
  const job = [
    ...common(srv.uri('disk')),
    '--name=persist',
    '--rw=randwrite',
    '--bs=16k',
    '--size=32M',
    '--offset_increment=32M',
    '--numjobs=2',
    '--iodepth=32',
    '--verify=crc32c',
    '--fsync=64', // NBD_CMD_FLUSH every 64 writes
  ];
  const w = await fio([...job, '--do_verify=0']);
  t.equal(w.code, 0, `write pass exits 0\n${w.stderr}`);
  for (const j of w.jobs) {
    t.equal(j.error, 0, 'write pass: no error');
    t.equal(j.write.io_bytes, 32 * MiB);
  }
  const v = await fio([...job, '--verify_only']);
  t.equal(v.code, 0, `verify-only pass exits 0\n${v.stderr}`);
  t.equal(v.jobs.length, 2);
  for (const j of v.jobs) {
    t.equal(j.error, 0, 'verify-only pass: no error');
    t.equal(j.read.io_bytes, 32 * MiB, 'verify-only pass read everything back');
  }

  // Negative control: flip bytes of one block in the image; verify must fail.
  const fd = fs.openSync(path.join(srv.dir, 'disk.img'), 'r+');
  fs.writeSync(fd, Buffer.alloc(16 * 1024, 0x5a), 0, 16 * 1024, 40 * MiB);
  fs.closeSync(fd);
  const bad = await fio([...job, '--verify_only']);
  t.not(bad.code, 0, 'verify-only after corruption fails');
  t.ok(bad.jobs.some((j) => j.error !== 0), 'fio reports the error in its JSON');
});

t.test('fio sequential large blocks (up to 32 MiB) with verify and flushes', async (t) => {
  if (!requireTools(t, ['fio'])) return;
  const srv = await server(t);
  const r = await fio([
    ...common(srv.uri('disk')),
    '--name=seq',
    '--rw=write',
    '--bsrange=1M-32M',
    '--size=96M',
    '--iodepth=4',
    '--fsync=2',
    '--verify=crc32c',
  ]);
  t.equal(r.code, 0, `fio exits 0\n${r.stderr}`);
  t.equal(r.jobs.length, 1);
  t.equal(r.jobs[0]?.error, 0, 'no error');
  t.equal(r.jobs[0]?.write.io_bytes, 96 * MiB, 'wrote 96 MiB');
  t.equal(r.jobs[0]?.read.io_bytes, 96 * MiB, 'verified 96 MiB');
});

t.test('fio randtrim punches holes', async (t) => {
  if (!requireTools(t, ['fio', 'nbdinfo'])) return;
  const srv = await server(t, '64M');
  const uri = srv.uri('disk');
  const w = await fio([...common(uri), '--name=fill', '--rw=write', '--bs=1M', '--size=32M', '--iodepth=8', '--buffer_pattern=0x33']);
  t.equal(w.code, 0, `fill: ${w.stderr}`);
  const tr = await fio([...common(uri), '--name=trim', '--rw=randtrim', '--bs=64k', '--size=16M', '--offset=8M', '--iodepth=16']);
  t.equal(tr.code, 0, `trim: ${tr.stderr}`);
  t.equal(tr.jobs[0]?.error, 0);
  t.equal(tr.jobs[0]?.trim.io_bytes, 16 * MiB, 'trimmed 16 MiB');
  const m = await exec('nbdinfo', ['--map', '--json', uri]);
  const map = (JSON.parse(m.stdout) as { offset: number; length: number; type: number }[]).map((e) => [e.offset, e.length, e.type]);
  t.same(
    map,
    [
      [0, 8 * MiB, 0],
      [8 * MiB, 16 * MiB, 3],
      [24 * MiB, 8 * MiB, 0],
      [32 * MiB, 32 * MiB, 3],
    ],
    'trimmed range is a hole; the rest is as written',
  );
  const f = fs.readFileSync(path.join(srv.dir, 'disk.img'));
  t.ok(f.subarray(0, 8 * MiB).every((b) => b === 0x33) && f.subarray(24 * MiB, 32 * MiB).every((b) => b === 0x33), 'untrimmed data intact');
  t.ok(f.subarray(8 * MiB, 24 * MiB).every((b) => b === 0), 'trimmed data reads zero');
});
