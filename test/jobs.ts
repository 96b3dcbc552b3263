// The one job mechanism (src/jobs.ts) under kills and cancels: job records in
// the manifest, resumed at the next open after kill -9 of the server or of an
// offline CLI, never taken over from another live owner; `jobs cancel`; the
// rollback merge on the same records.
//
// Backups are kept running with the test hook NBD_TEST_BACKUP_READ_DELAY_MS
// (every source read waits that long), and a kill counts as mid-way only by
// observed state: the record still running and the repository without the
// backup's manifest.
import t, { type Test } from 'tap';
import { spawn } from 'node:child_process';
import * as crypto from 'node:crypto';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { thisOwner } from '../src/jobs';
import { readManifest, writeManifest, type JobRecord } from '../src/volume-meta';
import { cli, expectError, expectOk } from './fixtures/cli-expect';
import { readExport, writeExport } from './fixtures/export-io';
import { CLI, makeTempDir, removeDir, startServer } from './fixtures/server';

const KiB = 1024;
const MiB = 1024 * KiB;
const DELAY = { NBD_TEST_BACKUP_READ_DELAY_MS: '500' };

interface Job {
  id: number;
  type: string;
  state: string;
  done: number;
  total: number;
  snapshot: string;
  backup: string;
  owner: { pid: number; host: string; start: string };
  resumed?: boolean;
  errorCode?: string;
  result?: { backup: string; stats: { chunksNew: number; chunksChanged: number } };
}

function dirs(): { dir: string; img: string; repo: string } {
  const dir = makeTempDir('nbd-jobs-');
  t.teardown(() => removeDir(dir));
  return { dir, img: path.join(dir, 'disk.img'), repo: path.join(dir, 'repo') };
}

async function jobs(img: string, all = false): Promise<Job[]> {
  const r = await cli(['jobs', img, '--json', ...(all ? ['--all'] : [])]);
  if (r.code !== 0) throw new Error(`jobs: ${r.stderr}`);
  return JSON.parse(r.stdout) as Job[];
}

async function until<T>(what: string, fn: () => Promise<T | undefined> | T | undefined, ms = 180_000): Promise<T> {
  const end = Date.now() + ms;
  for (;;) {
    const v = await fn();
    if (v !== undefined) return v;
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

function recordOf(img: string, id: number): JobRecord | undefined {
  return readManifest(img)?.jobs?.find((j) => j.id === id);
}

function backupsIn(repo: string): string[] {
  return fs.existsSync(path.join(repo, 'backups')) ? fs.readdirSync(path.join(repo, 'backups')) : [];
}

async function checkRepo(t: Test, repo: string, id: string, expected: Buffer, what: string): Promise<void> {
  const v = await cli(['backup', 'verify', repo, '--read-data', '--json']);
  t.equal(v.code, 0, `${what}: verify --read-data exit 0`);
  t.match(JSON.parse(v.stdout || '{}'), { ok: true }, `${what}: the repository verifies`);
  const out = path.join(path.dirname(repo), `restored-${id}.img`);
  expectOk(t, await cli(['backup', 'restore', repo, id, out]), `${what}: restore`);
  t.ok(fs.readFileSync(out).equals(expected), `${what}: the restore equals the snapshot byte for byte`);
  fs.rmSync(out);
}

t.test('kill -9 of the serving server mid-backup: the next serve resumes the job, which completes; the repository verifies', async (t) => {
  const { dir, img, repo } = dirs();
  const content = crypto.randomBytes(32 * MiB);
  fs.writeFileSync(img, content);
  expectOk(t, await cli(['backup', 'init', repo]), 'init');
  let srv = await startServer({ dir, images: ['disk.img'], env: DELAY });
  const r = await cli(['backup', 'create', img, '--repo', repo, '--json']);
  expectOk(t, r, 'backup create (online, returns once recorded)');
  const started = JSON.parse(r.stdout) as Job;
  t.match(started, { id: 1, type: 'backup', state: 'running', snapshot: 'backup-1' }, 'job 1 runs');
  const running = await until('the backup to make progress', async () => (await jobs(img)).find((j) => j.id === 1 && j.done > 0 && j.state === 'running'));
  t.ok(running.done < running.total, `running: ${running.done}/${running.total} chunks`);
  await srv.stop('SIGKILL');
  const rec = recordOf(img, 1);
  t.equal(rec?.state, 'running', 'after the kill the record is still running');
  t.equal(rec?.owner.pid, srv.proc.pid, 'owned by the killed server');
  t.same(backupsIn(repo), [], 'the repository has no manifest of it: the kill landed mid-way');

  srv = await startServer({ dir, images: ['disk.img'] });
  t.teardown(() => srv.stop());
  const done = await until('the resumed job to finish', async () => (await jobs(img, true)).find((j) => j.id === 1 && j.state !== 'running'));
  t.match(done, { id: 1, state: 'done', backup: started.backup }, 'the resumed job is done, under the backup id it was recorded with');
  t.equal(done.owner.pid, srv.proc.pid, 'the new server took it over');
  t.same(backupsIn(repo), [started.backup], 'one backup in the repository');
  await checkRepo(t, repo, started.backup, content, 'after the resume');
  t.ok((await readExport(srv.socket, 'disk@backup-1', 0, 32 * MiB)).data?.equals(content), 'disk@backup-1 is kept as the base');
});

t.test('kill -9 of an offline backup CLI mid-way: the rerun resumes it and re-sends only what was in flight', async (t) => {
  const { img, repo } = dirs();
  const content = crypto.randomBytes(32 * MiB); // two 16 MiB packs
  fs.writeFileSync(img, content);
  expectOk(t, await cli(['backup', 'init', repo]), 'init');
  const child = spawn(process.execPath, [CLI, 'backup', 'create', img, '--repo', repo, '--json'], { env: { ...process.env, ...DELAY }, stdio: 'ignore' });
  const exited = new Promise<NodeJS.Signals | null>((r) => child.once('exit', (_c, s) => r(s)));
  const packidx = path.join(repo, 'packidx');
  await until('the first pack to be uploaded', () => (fs.existsSync(packidx) && fs.readdirSync(packidx).length > 0 ? true : undefined));
  child.kill('SIGKILL');
  t.equal(await exited, 'SIGKILL', 'the CLI was killed');
  const rec = recordOf(img, 1);
  t.equal(rec?.state, 'running', 'the record is still running');
  t.same(backupsIn(repo), [], 'no manifest yet: killed mid-way');
  const packsAtKill = fs.readdirSync(packidx).length;

  const r = await cli(['backup', 'create', img, '--repo', repo, '--json']);
  expectOk(t, r, 'the rerun');
  const j = JSON.parse(r.stdout) as Job;
  t.match(j, { id: 1, state: 'done', resumed: true, backup: (rec?.params as { backupId?: string }).backupId }, 'the rerun resumed job 1 and finished it');
  t.ok(j.result!.stats.chunksNew < j.result!.stats.chunksChanged, `the rerun stored ${j.result!.stats.chunksNew} of ${j.result!.stats.chunksChanged} chunks: the ${packsAtKill} pack(s) uploaded before the kill were not sent again`);
  t.same(backupsIn(repo), [j.backup], 'one backup');
  t.same((await jobs(img, true)).map((x) => [x.id, x.state]), [[1, 'done']], 'no second job was made');
  await checkRepo(t, repo, j.backup, content, 'after the rerun');
});

t.test('jobs cancel: the backup stops, its snapshot and nothing else is removed, the waiting create exits JOB_CANCELED', async (t) => {
  const { dir, img, repo } = dirs();
  const content = crypto.randomBytes(32 * MiB);
  fs.writeFileSync(img, content);
  expectOk(t, await cli(['backup', 'init', repo]), 'init');
  const srv = await startServer({ dir, images: ['disk.img'], env: DELAY });
  t.teardown(() => srv.stop());
  const waiting = cli(['backup', 'create', img, '--repo', repo, '--wait', '--json']); // --json: no progress lines on stderr
  const running = await until('the backup to make progress', async () => (await jobs(img)).find((j) => j.state === 'running' && j.done > 0));
  const c = await cli(['jobs', 'cancel', img, String(running.id), '--json']);
  expectOk(t, c, 'jobs cancel IMAGE ID');
  t.match(JSON.parse(c.stdout), { id: running.id, state: 'canceled', errorCode: 'JOB_CANCELED' }, 'canceled');
  const w = await waiting;
  expectError(t, w, 29, 'JOB_CANCELED', 'the waiting backup create');
  const snaps = JSON.parse((await cli(['snapshot', 'list', img, '--json'])).stdout) as { name: string }[];
  t.same(snaps, [], 'the snapshot the job made is deleted');
  t.same(backupsIn(repo), [], 'no backup');
  const again = await cli(['jobs', 'cancel', String(running.id), '--image', img, '--json']);
  expectOk(t, again, 'jobs cancel ID --image IMAGE of a canceled job');
  t.match(JSON.parse(again.stdout), { state: 'canceled' }, 'still canceled');
  // A new backup runs to its end afterwards (job ids are never reused).
  const next = await cli(['backup', 'create', img, '--repo', repo, '--wait', '--json']);
  expectOk(t, next, 'a new backup');
  const nj = JSON.parse(next.stdout) as Job;
  t.match(nj, { id: running.id + 1, state: 'done' }, 'done, under a new id');
  t.same((await jobs(img, true)).map((x) => [x.id, x.state]), [[running.id, 'canceled'], [nj.id, 'done']], 'jobs --all lists both');
});

t.test('a backup job owned by another live process is not taken over', async (t) => {
  const { dir, img, repo } = dirs();
  fs.writeFileSync(img, crypto.randomBytes(4 * MiB));
  expectOk(t, await cli(['backup', 'init', repo]), 'init');
  expectOk(t, await cli(['snapshot', 'create', img, 's']), 'snapshot');
  // A record as a backup running in this (live) test process would leave it.
  const m = readManifest(img)!;
  const now = new Date().toISOString();
  const rec: JobRecord = {
    id: 7,
    kind: 'backup',
    volume: img,
    state: 'running',
    cursor: { done: 0, total: 256 },
    owner: thisOwner(),
    createdAt: now,
    updatedAt: now,
    params: { repo, snapshot: 's', autoSnapshot: false, backupId: '20260101T000000Z-0000abcd' },
  };
  writeManifest(img, { ...m, nextJobId: 8, jobs: [rec] });
  const srv = await startServer({ dir, images: ['disk.img'] });
  t.teardown(() => srv.stop());
  const r = await cli(['backup', 'create', img, '--repo', repo]);
  expectError(t, r, 9, 'JOB_EXISTS', 'a second backup while the live owner runs one');
  const listed = (await jobs(img)).find((j) => j.id === 7);
  t.match(listed, { state: 'running', owner: { pid: process.pid } }, 'still running, still owned by the test process');
  t.match(srv.stderr(), /not taken over/, 'the server says why it left it');
  t.same(backupsIn(repo), [], 'the server did not run it');
  await srv.stop();
  // Once the owner is gone (a record owned by a PID that does not run), the next open takes it over.
  const dead = { ...thisOwner(), start: 'gone' };
  const m2 = readManifest(img)!;
  writeManifest(img, { ...m2, jobs: m2.jobs!.map((j) => (j.id === 7 ? { ...j, owner: dead } : j)) });
  const r2 = await cli(['backup', 'create', img, '--repo', repo, '--json']);
  expectOk(t, r2, 'offline create with the owner gone');
  t.match(JSON.parse(r2.stdout), { id: 7, resumed: true, state: 'done' }, 'it resumed job 7 and finished it');
});

t.test('the rollback merge is a job on the same records: listed, not cancelable, resumed after kill -9, then done', async (t) => {
  const { dir, img } = dirs();
  const size = 8 * MiB;
  const p0 = crypto.randomBytes(size);
  fs.writeFileSync(img, p0);
  let srv = await startServer({ dir, images: ['disk.img'], args: ['--merge-rate', '512K'] });
  expectOk(t, await cli(['snapshot', 'create', img, 'a']), 'snapshot a');
  const p1 = crypto.randomBytes(size);
  const writes: [number, Buffer][] = [];
  for (let off = 0; off < size; off += 4 * MiB) writes.push([off, p1.subarray(off, off + 4 * MiB)]);
  t.same((await writeExport(srv.socket, 'disk', writes)).filter((e) => e), [], 'volume rewritten');
  expectOk(t, await cli(['rollback', img, 'a']), 'rollback a');
  const [j] = await jobs(img);
  t.match(j, { id: 1, type: 'rollback-merge', state: 'running', snapshot: 'a', owner: { pid: srv.proc.pid } }, 'jobs lists the merge as job 1, running');
  t.ok(j!.done < j!.total, `merging: ${j!.done}/${j!.total}`);
  expectError(t, await cli(['jobs', 'cancel', img, '1']), 2, 'BAD_ARGUMENT', 'a merge cannot be canceled');
  await srv.stop('SIGKILL');
  t.equal(recordOf(img, 1)?.state, 'running', 'after the kill the record is running');
  srv = await startServer({ dir, images: ['disk.img'] });
  t.teardown(() => srv.stop());
  t.ok((await readExport(srv.socket, 'disk', 0, size)).data?.equals(p0), 'live shows a after the restart');
  expectOk(t, await cli(['jobs', img, '--wait', '--json']), 'jobs --wait');
  const all = await jobs(img, true);
  t.match(all, [{ id: 1, type: 'rollback-merge', state: 'done', owner: { pid: srv.proc.pid } }], 'job 1 is done, finished by the new server');
  t.equal(all[0]!.done, all[0]!.total, 'every chunk merged');
  t.ok((await readExport(srv.socket, 'disk', 0, size)).data?.equals(p0), 'live equals a');
});

t.test('an offline rollback finishes its merge with an interrupted backup recorded (waits only for jobs that run)', async (t) => {
  const { img, repo } = dirs();
  fs.writeFileSync(img, crypto.randomBytes(4 * MiB));
  expectOk(t, await cli(['backup', 'init', repo]), 'init');
  expectOk(t, await cli(['snapshot', 'create', img, 'a']), 'snapshot a');
  // An interrupted backup: running, owned by a process that is gone.
  const m = readManifest(img)!;
  const now = new Date().toISOString();
  const rec: JobRecord = {
    id: 1,
    kind: 'backup',
    volume: img,
    state: 'running',
    cursor: { done: 0, total: 256 },
    owner: { ...thisOwner(), start: 'gone' },
    createdAt: now,
    updatedAt: now,
    params: { repo, snapshot: 'a', autoSnapshot: false, backupId: '20260101T000000Z-0000abce' },
  };
  writeManifest(img, { ...m, nextJobId: 2, jobs: [rec] });
  const r = await cli(['rollback', img, 'a', '--json']);
  expectOk(t, r, 'offline rollback (merges to its end, does not wait for the backup nobody runs)');
  const all = await jobs(img, true);
  t.same(all.map((j) => [j.id, j.type, j.state]), [[1, 'backup', 'running'], [2, 'rollback-merge', 'done']], 'the merge is done; the backup is still recorded, for the next run');
  expectOk(t, await cli(['jobs', img, '--wait', '--json']), 'jobs --wait runs the backup here (--json: no progress lines)');
  t.same((await jobs(img, true)).map((j) => [j.id, j.state]), [[1, 'done'], [2, 'done']], 'both done');
  t.same(backupsIn(repo), ['20260101T000000Z-0000abce'], 'the backup is in the repository under its recorded id');
});
