// `backup` commands as users and scripts run them: `backup create` as a job of
// the volume, online (the serving server runs it) and offline (the command
// runs it to its end); full, then incremental from the newest backup whose
// snapshot still exists; the base snapshot a backup made is deleted by the
// next backup to that repository, a user's snapshot never; every restore
// equals its snapshot byte for byte; list, verify, prune; bad input gets its
// stable code and records nothing.
import t, { type Test } from 'tap';
import * as crypto from 'node:crypto';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { readManifest, writeManifest } from '../src/volume-meta';
import { cli, cliJson, expectError, expectOk } from './fixtures/cli-expect';
import { readExport, writeExport } from './fixtures/export-io';
import { startRgw } from './fixtures/rgw';
import { makeTempDir, removeDir, startServer, type RunningServer } from './fixtures/server';

const KiB = 1024;
const MiB = 1024 * KiB;
const SIZE = 8 * MiB;

interface Job {
  id: number;
  type: string;
  state: string;
  snapshot: string;
  autoSnapshot: boolean;
  backup: string;
  parent?: string | null;
  resumed?: boolean;
  error?: string;
  errorCode?: string;
  result?: { backup: string; parent: string | null; stats: { chunksNew: number }; deleted: string[] };
}

interface Listed {
  id: string;
  parent: string | null;
  volume: string;
  snapshot: string | null;
}

function dirs(): { dir: string; img: string; repo: string } {
  const dir = makeTempDir('nbd-backup-cli-');
  t.teardown(() => removeDir(dir));
  return { dir, img: path.join(dir, 'disk.img'), repo: path.join(dir, 'repo') };
}


/** Chunk size of the volumes here (the default), for the chunks a scribble touches. */
const CHUNK = 16 * KiB;

/** Random writes of 4..64 KiB into the live export, applied to `model` too; adds the chunks written to `touched`. */
async function scribble(srv: RunningServer, model: Buffer, n: number, touched = new Set<number>()): Promise<void> {
  const writes: [number, Buffer][] = [];
  for (let i = 0; i < n; i++) {
    const len = (1 + crypto.randomInt(16)) * 4 * KiB;
    const off = crypto.randomInt((SIZE - len) / (4 * KiB)) * 4 * KiB;
    const data = i % 5 === 4 ? Buffer.alloc(len) : crypto.randomBytes(len);
    writes.push([off, data]);
    data.copy(model, off);
    for (let c = Math.floor(off / CHUNK); c * CHUNK < off + len; c++) touched.add(c);
  }
  const errors = await writeExport(srv.socket, 'disk', writes);
  if (errors.some((e) => e)) throw new Error(`writes failed: ${errors.join(',')}`);
}

async function snapshotNames(img: string): Promise<string[]> {
  const r = await cli(['snapshot', 'list', img, '--json']);
  if (r.code !== 0) throw new Error(`snapshot list: ${r.stderr}`);
  return (JSON.parse(r.stdout) as { name: string }[]).map((s) => s.name);
}

async function restoredEquals(t: Test, repo: string, id: string, expected: Buffer, what: string): Promise<void> {
  const out = path.join(path.dirname(repo), `restore-${id}.img`);
  const r = await cli(['backup', 'restore', repo, id, out]);
  expectOk(t, r, `${what}: restore`);
  t.ok(fs.existsSync(out) && fs.readFileSync(out).equals(expected), `${what}: the restore equals the snapshot byte for byte`);
  fs.rmSync(out, { force: true });
}

t.test('online and offline, full then incremental: each restore is exact; the base a backup made is rotated, a user snapshot kept', async (t) => {
  const { dir, img, repo } = dirs();
  expectOk(t, await cli(['backup', 'init', repo]), 'init');
  let srv = await startServer({ dir, size: '8M' });
  const model = Buffer.alloc(SIZE);
  await scribble(srv, model, 200);
  const expected: Buffer[] = [];

  // 1. online, full: the job makes backup-1.
  const j1 = await cliJson<Job>(t, ['backup', 'create', img, '--repo', repo, '--wait'], 'online create 1');
  expected.push(Buffer.from(model));
  t.match(j1, { type: 'backup', state: 'done', snapshot: 'backup-1', autoSnapshot: true, parent: null }, 'job 1: done, full, its own snapshot');
  const snap1 = await readExport(srv.socket, 'disk@backup-1', 0, SIZE);
  t.ok(snap1.data?.equals(expected[0]!), 'disk@backup-1 shows the volume at the backup');

  // 2. online, a user's snapshot: incremental from backup 1; backup-1 (made by the job) is deleted.
  const touched = new Set<number>();
  await scribble(srv, model, 50, touched);
  expectOk(t, await cli(['snapshot', 'create', img, 'mine']), 'snapshot create mine');
  const [mineInfo] = (JSON.parse((await cli(['snapshot', 'list', img, '--json'])).stdout) as { name: string; chunkSize: number }[]).filter((x) => x.name === 'mine');
  t.equal(mineInfo?.chunkSize, CHUNK, 'the volume has the default chunk size');
  expected.push(Buffer.from(model));
  await scribble(srv, model, 20); // after the snapshot: not in backup 2
  const j2 = await cliJson<Job>(t, ['backup', 'create', img, '--repo', repo, '--snapshot', 'mine', '--wait'], 'online create 2');
  t.match(j2, { state: 'done', snapshot: 'mine', autoSnapshot: false, parent: j1.backup }, 'job 2: incremental from backup 1');
  // The change map, not a full read: exactly the chunks written between the two snapshots.
  const stats2 = j2.result?.stats as { chunksChanged?: number; bytesRead?: number } | undefined;
  t.equal(stats2?.chunksChanged, touched.size, `job 2 read only the changed chunks (${stats2?.chunksChanged} of ${SIZE / CHUNK}; ${touched.size} written)`);
  t.ok((stats2?.bytesRead ?? Infinity) <= touched.size * CHUNK, `job 2 read ${stats2?.bytesRead} bytes, at most the changed chunks`);
  t.same(j2.result?.deleted, ['backup-1'], 'job 2 deleted the base backup 1 made');
  t.same(await snapshotNames(img), ['mine'], 'only the user snapshot is left');
  expected.push(Buffer.from(model)); // backup 3 (offline) sees the live volume as it is now
  t.equal(await srv.stop(), 0, 'server stops');

  // 3. offline, its own snapshot: incremental from backup 2 (mine still exists); mine is kept.
  const j3 = await cliJson<Job>(t, ['backup', 'create', img, '--repo', repo], 'offline create 3');
  t.match(j3, { state: 'done', snapshot: 'backup-3', autoSnapshot: true, parent: j2.backup }, 'job 3 (offline): done, incremental from backup 2');
  t.same(j3.result?.deleted, [], 'nothing to rotate: the only other snapshot is the user\'s');
  t.same(await snapshotNames(img), ['mine', 'backup-3'], 'mine and backup-3');

  // 4. online writes, then offline again: backup-3 is rotated, mine kept.
  srv = await startServer({ dir, size: '8M' });
  await scribble(srv, model, 50);
  t.equal(await srv.stop(), 0, 'server stops');
  expected.push(Buffer.from(model));
  const j4 = await cliJson<Job>(t, ['backup', 'create', img, '--repo', repo], 'offline create 4');
  t.match(j4, { state: 'done', snapshot: 'backup-4', parent: j3.backup }, 'job 4: incremental from backup 3');
  t.same(j4.result?.deleted, ['backup-3'], 'job 4 deleted the base job 3 made');
  t.same(await snapshotNames(img), ['mine', 'backup-4'], 'the user snapshot is never deleted');

  const list = await cliJson<Listed[]>(t, ['backup', 'list', repo], 'list');
  t.same(
    list.map((b) => [b.id, b.parent, b.snapshot]),
    [
      [j1.backup, null, 'backup-1'],
      [j2.backup, j1.backup, 'mine'],
      [j3.backup, j2.backup, 'backup-3'],
      [j4.backup, j3.backup, 'backup-4'],
    ],
    'list: four backups, each the parent of the next',
  );
  t.equal(list[0]!.volume, fs.realpathSync(img), 'the volume is named by its real path');
  for (const [i, id] of [j1.backup, j2.backup, j3.backup, j4.backup].entries()) await restoredEquals(t, repo, id, expected[i]!, `backup ${i + 1}`);
  const v = await cliJson<{ ok: boolean; backups: number }>(t, ['backup', 'verify', repo, '--read-data'], 'verify --read-data');
  t.match(v, { ok: true, backups: 4 }, 'the repository verifies');

  // The jobs are listed as finished records.
  const all = await cliJson<Job[]>(t, ['jobs', img, '--all'], 'jobs --all');
  t.same(
    all.map((j) => [j.id, j.type, j.state]),
    [
      [1, 'backup', 'done'],
      [2, 'backup', 'done'],
      [3, 'backup', 'done'],
      [4, 'backup', 'done'],
    ],
    'jobs --all: the four backup jobs, done',
  );
  t.same(await cliJson<Job[]>(t, ['jobs', img], 'jobs'), [], 'jobs: none unfinished');

  // Restore into an NBD target.
  const target = path.join(dir, 'target.img');
  fs.writeFileSync(target, crypto.randomBytes(SIZE));
  const tsrv = await startServer({ dir: makeTempDir('nbd-backup-target-'), images: [target] });
  t.teardown(async () => {
    await tsrv.stop();
    removeDir(tsrv.dir);
  });
  expectOk(t, await cli(['backup', 'restore', repo, j2.backup, tsrv.uri('target')]), 'restore to nbd+unix://');
  t.ok((await readExport(tsrv.socket, 'target', 0, SIZE)).data?.equals(expected[1]!), 'the NBD target holds backup 2 exactly');

  // prune keeps the newest; the rest still restores.
  const p = await cliJson<{ kept: string[]; forgotten: string[] }>(t, ['backup', 'prune', repo, '--keep-last', '1'], 'prune --keep-last 1');
  t.same(p.kept, [j4.backup], 'prune kept the newest');
  await restoredEquals(t, repo, j4.backup, expected[3]!, 'backup 4 after the prune');
  t.match(await cliJson<{ ok: boolean }>(t, ['backup', 'verify', repo, '--read-data'], 'verify after prune'), { ok: true }, 'verifies after the prune');
});

t.test('encrypted repository: create and restore with --key-file; a missing key is refused', async (t) => {
  const { dir, img, repo } = dirs();
  const key = path.join(dir, 'key');
  fs.writeFileSync(key, crypto.randomBytes(32));
  const model = crypto.randomBytes(SIZE);
  fs.writeFileSync(img, model);
  expectOk(t, await cli(['backup', 'init', repo, '--key-file', key]), 'init encrypted');
  expectError(t, await cli(['backup', 'create', img, '--repo', repo]), 26, 'BACKUP_KEY_REQUIRED', 'create without the key');
  t.same(await snapshotNames(img), [], 'the refused create made no snapshot');
  const j = await cliJson<Job>(t, ['backup', 'create', img, '--repo', repo, '--key-file', key], 'create with the key');
  t.equal(j.state, 'done', 'done');
  const out = path.join(dir, 'out.img');
  expectError(t, await cli(['backup', 'restore', repo, j.backup, out]), 26, 'BACKUP_KEY_REQUIRED', 'restore without the key');
  expectOk(t, await cli(['backup', 'restore', repo, j.backup, out, '--key-file', key]), 'restore with the key');
  t.ok(fs.readFileSync(out).equals(model), 'exact');
});

t.test('bad input: clear codes, no job recorded, no snapshot made, no backup written', async (t) => {
  const { dir, img, repo } = dirs();
  fs.writeFileSync(img, crypto.randomBytes(SIZE));
  const notRepo = path.join(dir, 'not-a-repo');
  fs.mkdirSync(notRepo);
  fs.writeFileSync(path.join(notRepo, 'something'), 'x');
  expectError(t, await cli(['backup', 'create', img, '--repo', notRepo]), 20, 'REPO_NOT_FOUND', 'a directory that is not a repository');
  expectError(t, await cli(['backup', 'create', img, '--repo', path.join(dir, 'missing')]), 20, 'REPO_NOT_FOUND', 'a missing directory');
  expectError(t, await cli(['backup', 'list', notRepo]), 20, 'REPO_NOT_FOUND', 'list of a directory that is not a repository');
  expectOk(t, await cli(['backup', 'init', repo]), 'init');
  expectError(t, await cli(['backup', 'init', repo]), 21, 'REPO_EXISTS', 'init twice');
  expectError(t, await cli(['backup', 'create', img, '--repo', repo, '--snapshot', 'nope']), 8, 'SNAPSHOT_NOT_FOUND', 'an unknown snapshot (offline)');
  expectOk(t, await cli(['snapshot', 'create', img, 's1']), 'snapshot s1');
  // A failed snapshot as the server records it (state "failed" in the manifest).
  const m = readManifest(img)!;
  writeManifest(img, { ...m, snapshots: m.snapshots.map((s) => ({ ...s, state: 'failed' as const, failure: { reason: 'marked failed by the test', at: new Date().toISOString() } })) });
  const failed = await cli(['backup', 'create', img, '--repo', repo, '--snapshot', 's1']);
  expectError(t, failed, 12, 'SNAPSHOT_FAILED', 'a failed snapshot');
  t.match(failed.stderr, /marked failed by the test/, 'the refusal names the reason');
  const srv = await startServer({ dir, images: ['disk.img'] });
  t.teardown(() => srv.stop());
  expectError(t, await cli(['backup', 'create', img, '--repo', repo, '--snapshot', 'nope']), 8, 'SNAPSHOT_NOT_FOUND', 'an unknown snapshot (online)');
  expectError(t, await cli(['backup', 'create', img, '--repo', repo, '--snapshot', 's1']), 12, 'SNAPSHOT_FAILED', 'a failed snapshot (online)');
  expectError(t, await cli(['backup', 'create', img, '--repo', notRepo]), 20, 'REPO_NOT_FOUND', 'not a repository (online)');
  expectError(t, await cli(['backup', 'restore', repo, '20990101T000000Z-00000000', path.join(dir, 'x.img')]), 8, 'BACKUP_NOT_FOUND', 'restore of an unknown backup');
  t.notOk(fs.existsSync(path.join(dir, 'x.img')), 'no target file left');
  t.same(await cliJson<Job[]>(t, ['jobs', img, '--all'], 'jobs --all'), [], 'no job was recorded by any refused create');
  t.same(await snapshotNames(img), ['s1'], 'no snapshot was made');
  t.same(await cliJson<Listed[]>(t, ['backup', 'list', repo], 'list'), [], 'no backup was written');
  expectError(t, await cli(['jobs', 'cancel', img, '99']), 8, 'JOB_NOT_FOUND', 'cancel of an unknown job');
  expectError(t, await cli(['jobs', 'cancel', '99']), 2, 'BAD_ARGUMENT', 'cancel without the image');
});

t.test('S3 (radosgw): online full + incremental with credentials as flags; a kill -9 mid-backup resumes with the credentials from the environment', async (t) => {
  const rgw = await startRgw(t);
  if (!rgw) return;
  const bucket = await rgw.bucket('backup-cli');
  const repo = `s3://${bucket}/volumes`;
  const flags = ['--s3-endpoint', rgw.endpoint, '--s3-region', rgw.region, '--access-key-id', rgw.accessKeyId, '--secret-access-key', rgw.secretAccessKey];
  const { dir, img } = dirs();
  expectOk(t, await cli(['backup', 'init', repo, ...flags]), 'init s3://');
  let srv = await startServer({ dir, size: '8M' });
  const model = Buffer.alloc(SIZE);
  await scribble(srv, model, 100);
  const j1 = await cliJson<Job>(t, ['backup', 'create', img, '--repo', repo, '--wait', ...flags], 'create 1 (S3)');
  t.match(j1, { state: 'done', parent: null }, 'full');
  const e1 = Buffer.from(model);
  await scribble(srv, model, 30);
  t.equal(await srv.stop(), 0, 'stop');
  // Throttled, killed mid-way, restarted with the credentials in its environment only.
  srv = await startServer({ dir, images: ['disk.img'], env: { NBD_TEST_BACKUP_READ_DELAY_MS: '3000' } });
  const started = await cliJson<Job>(t, ['backup', 'create', img, '--repo', repo, ...flags], 'create 2 (S3), throttled');
  await until(async () => ((await cliJson<Job[]>(t, ['jobs', img], 'jobs')).some((j) => j.id === started.id && j.state === 'running') ? true : undefined));
  await srv.stop('SIGKILL');
  t.equal(readManifest(img)?.jobs?.find((j) => j.id === started.id)?.state, 'running', 'running after the kill');
  srv = await startServer({
    dir,
    images: ['disk.img'],
    env: { AWS_ACCESS_KEY_ID: rgw.accessKeyId, AWS_SECRET_ACCESS_KEY: rgw.secretAccessKey, AWS_REGION: rgw.region },
  });
  t.teardown(() => srv.stop());
  const done = await until(async () => (await cliJson<Job[]>(t, ['jobs', img, '--all'], 'jobs --all')).find((j) => j.id === started.id && j.state !== 'running'));
  t.match(done, { state: 'done', parent: j1.backup, backup: started.backup }, 'resumed with the environment\'s credentials and done, incremental from 1');
  for (const [id, e] of [
    [j1.backup, e1],
    [started.backup, model],
  ] as const) {
    const out = path.join(dir, `r-${id}.img`);
    expectOk(t, await cli(['backup', 'restore', repo, id, out, ...flags]), `restore ${id}`);
    t.ok(fs.readFileSync(out).equals(e), `restore of ${id} is exact`);
  }
  t.match(await cliJson<{ ok: boolean }>(t, ['backup', 'verify', repo, '--read-data', ...flags], 'verify (S3)'), { ok: true }, 'the S3 repository verifies');

  // The credentials in the command's environment only (no flags), the server
  // started without them: the job runs in the server and must get them from
  // the request (it failed with REPO_CREDENTIALS when only flags were sent).
  t.equal(await srv.stop(), 0, 'stop');
  srv = await startServer({ dir, images: ['disk.img'] });
  await scribble(srv, model, 10);
  const env = { AWS_ACCESS_KEY_ID: rgw.accessKeyId, AWS_SECRET_ACCESS_KEY: rgw.secretAccessKey, AWS_REGION: rgw.region, AWS_ENDPOINT_URL_S3: rgw.endpoint };
  const r3 = await cli(['backup', 'create', img, '--repo', repo, '--wait', '--json'], env);
  expectOk(t, r3, 'create 3 with the credentials in the environment only');
  const j3 = JSON.parse(r3.stdout || 'null') as Job | null;
  t.match(j3, { state: 'done', parent: started.backup }, 'done, incremental');
  const out3 = path.join(dir, 'r-3.img');
  expectOk(t, await cli(['backup', 'restore', repo, j3?.backup ?? '?', out3], env), 'restore 3 with the environment\'s credentials');
  t.ok(fs.existsSync(out3) && fs.readFileSync(out3).equals(model), 'restore 3 is exact');
});

async function until<T>(fn: () => Promise<T | undefined>, ms = 180_000): Promise<T> {
  const end = Date.now() + ms;
  for (;;) {
    const v = await fn();
    if (v !== undefined) return v;
    if (Date.now() > end) throw new Error('timed out');
    await new Promise((r) => setTimeout(r, 200));
  }
}
