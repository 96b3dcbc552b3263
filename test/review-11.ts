// Adversarial review 11: backups, change maps and diffs that must never be
// silently wrong. Each test reproduces one finding (see the commit messages).
import t, { type Test } from 'tap';
import { spawnSync } from 'node:child_process';
import * as crypto from 'node:crypto';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { readManifest } from '../src/volume-meta';
import { cli, cliJson, expectOk } from './fixtures/cli-expect';
import { writeExport } from './fixtures/export-io';
import { CLI, makeTempDir, removeDir, startServer, type RunningServer } from './fixtures/server';

const KiB = 1024;
const MiB = 1024 * KiB;
const SIZE = 8 * MiB;

interface Job {
  id: number;
  state: string;
  snapshot: string;
  backup: string;
  parent?: string | null;
  error?: string;
  errorCode?: string;
  result?: { backup: string; parent: string | null };
}

function dirs(): { dir: string; img: string; repo: string } {
  const dir = makeTempDir('nbd-review11-');
  t.teardown(() => removeDir(dir));
  return { dir, img: path.join(dir, 'disk.img'), repo: path.join(dir, 'repo') };
}


async function until<T>(fn: () => Promise<T | undefined>, ms = 180_000): Promise<T> {
  const end = Date.now() + ms;
  for (;;) {
    const v = await fn();
    if (v !== undefined) return v;
    if (Date.now() > end) throw new Error('timed out');
    await new Promise((r) => setTimeout(r, 200));
  }
}

/** Random non-zero 16 KiB-aligned writes into the live export, mirrored in `model`. */
async function scribble(srv: RunningServer, model: Buffer, n: number): Promise<void> {
  const writes: [number, Buffer][] = [];
  for (let i = 0; i < n; i++) {
    const len = (1 + crypto.randomInt(4)) * 16 * KiB;
    const off = crypto.randomInt((SIZE - len) / (16 * KiB)) * 16 * KiB;
    const data = crypto.randomBytes(len);
    writes.push([off, data]);
    data.copy(model, off);
  }
  const errors = await writeExport(srv.socket, 'disk', writes);
  if (errors.some((e) => e)) throw new Error(`writes failed: ${errors.join(',')}`);
}

/** Restores backup `id` and returns the chunks (16 KiB) that differ from `expected`. */
async function restoreDiff(t: Test, repo: string, id: string, expected: Buffer, what: string): Promise<number[]> {
  const out = path.join(path.dirname(repo), `restore-${id}.img`);
  expectOk(t, await cli(['backup', 'restore', repo, id, out]), `${what}: restore`);
  const got = fs.readFileSync(out);
  fs.rmSync(out, { force: true });
  const bad: number[] = [];
  for (let o = 0; o < expected.length; o += 16 * KiB) {
    if (!got.subarray(o, o + 16 * KiB).equals(expected.subarray(o, o + 16 * KiB))) bad.push(o / (16 * KiB));
  }
  return bad;
}

t.test('a resumed backup whose parent snapshot was deleted and made again under the same name restores exactly', async (t) => {
  const { dir, img, repo } = dirs();
  expectOk(t, await cli(['backup', 'init', repo]), 'init');
  let srv = await startServer({ dir, size: '8M' });
  const model = Buffer.alloc(SIZE);
  await scribble(srv, model, 60);
  expectOk(t, await cli(['snapshot', 'create', img, 'p']), 'snapshot p');
  const b1 = await cliJson<Job>(t, ['backup', 'create', img, '--repo', repo, '--snapshot', 'p', '--wait'], 'backup 1 of p');
  t.match(b1, { state: 'done', parent: null }, 'full');
  await scribble(srv, model, 60); // live (and s, p' and s' below) now differ from backup 1
  expectOk(t, await cli(['snapshot', 'create', img, 's']), 'snapshot s');
  t.equal(await srv.stop(), 0, 'stop');
  srv = await startServer({ dir, images: ['disk.img'], env: { NBD_TEST_BACKUP_READ_DELAY_MS: '3000' } });
  const started = await cliJson<Job>(t, ['backup', 'create', img, '--repo', repo, '--snapshot', 's'], 'backup 2 of s, throttled');
  await until(async () => (readManifest(img)?.jobs?.find((j) => j.id === started.id)?.params as { parent?: string } | undefined)?.parent !== undefined || undefined);
  t.equal((readManifest(img)?.jobs?.find((j) => j.id === started.id)?.params as { parent?: string }).parent, b1.backup, 'parent chosen: backup 1 (of p)');
  await srv.stop('SIGKILL');
  // While nobody runs the job: p and s are deleted and made again (same names, new content: live's).
  t.equal((await cli(['snapshot', 'delete', img, 's'])).code, 0, 'delete s (a warning about the kill\'s leftovers may be logged)');
  expectOk(t, await cli(['snapshot', 'delete', img, 'p']), 'delete p');
  expectOk(t, await cli(['snapshot', 'create', img, 'p']), 'create p again');
  expectOk(t, await cli(['snapshot', 'create', img, 's']), 'create s again');
  srv = await startServer({ dir, images: ['disk.img'] });
  t.teardown(() => srv.stop());
  const done = await until(async () => (await cliJson<Job[]>(t, ['jobs', img, '--all'], 'jobs --all')).find((j) => j.id === started.id && j.state !== 'running'));
  t.equal(done.state, 'done', 'resumed and done');
  const bad = await restoreDiff(t, repo, done.backup, model, 'backup 2');
  t.same(bad.slice(0, 20), [], `backup 2 restores s exactly (${bad.length} chunks differ)`);
});

t.test('backing up an older snapshot after a newer one, and the same snapshot twice: done and exact', async (t) => {
  const { dir, img, repo } = dirs();
  expectOk(t, await cli(['backup', 'init', repo]), 'init');
  const srv = await startServer({ dir, size: '8M' });
  t.teardown(() => srv.stop());
  const model = Buffer.alloc(SIZE);
  await scribble(srv, model, 40);
  expectOk(t, await cli(['snapshot', 'create', img, 'old']), 'snapshot old');
  const eOld = Buffer.from(model);
  await scribble(srv, model, 40);
  expectOk(t, await cli(['snapshot', 'create', img, 'new']), 'snapshot new');
  const bNew = await cliJson<Job>(t, ['backup', 'create', img, '--repo', repo, '--snapshot', 'new', '--wait'], 'backup of new');
  t.equal(bNew.state, 'done', 'backup of new: done');
  const bOld = await cliJson<Job>(t, ['backup', 'create', img, '--repo', repo, '--snapshot', 'old', '--wait'], 'backup of old (after new)');
  t.equal(bOld?.state, 'done', 'backup of old after new: done');
  if (bOld?.state === 'done') t.same(await restoreDiff(t, repo, bOld.backup, eOld, 'old'), [], 'old restores exactly');
  const again = await cliJson<Job>(t, ['backup', 'create', img, '--repo', repo, '--snapshot', 'new', '--wait'], 'backup of new again');
  t.equal(again?.state, 'done', 'backup of new again: done');
  if (again?.state === 'done') t.same(await restoreDiff(t, repo, again.backup, model, 'new again'), [], 'new again restores exactly');
});

t.test('diff apply to a volume whose live content moved on since the from-snapshot: DIFF_MISMATCH and no snapshot b, never a silent wrong copy', async (t) => {
  const { dir } = dirs();
  const SZ = 2 * MiB;
  const image = path.join(dir, 'src.img');
  const replica = path.join(dir, 'replica.img');
  const s0 = crypto.randomBytes(SZ);
  fs.writeFileSync(image, s0);
  fs.writeFileSync(replica, s0);
  expectOk(t, await cli(['snapshot', 'create', image, 'a']), 'source: snapshot a');
  expectOk(t, await cli(['snapshot', 'create', replica, 'a']), 'replica: snapshot a');
  // The source moves on at chunk 0; the replica's live is written at chunk 10 after a.
  let srv = await startServer({ dir, images: [image] });
  t.same(await writeExport(srv.socket, 'src', [[0, crypto.randomBytes(16 * KiB)]]), [0], 'source write');
  t.equal(await srv.stop(), 0, 'stop source');
  expectOk(t, await cli(['snapshot', 'create', image, 'b']), 'source: snapshot b');
  srv = await startServer({ dir, images: [replica] });
  t.same(await writeExport(srv.socket, 'replica', [[10 * 16 * KiB, crypto.randomBytes(16 * KiB)]]), [0], 'replica write after a');
  t.equal(await srv.stop(), 0, 'stop replica');
  const d = path.join(dir, 'a-b.rbd');
  const out = fs.openSync(d, 'w');
  const r0 = spawnSync(process.execPath, [CLI, 'diff', image, '--from', 'a', '--to', 'b', '--format', 'rbd'], { stdio: ['ignore', out, 'pipe'] });
  fs.closeSync(out);
  t.equal(r0.status, 0, 'diff --format rbd');
  const srcB = fs.readFileSync(image);
  const r = await cli(['diff', 'apply', replica, '--file', d, '--json']);
  if (r.code === 0) {
    t.ok(fs.readFileSync(replica).equals(srcB), 'applied: the replica reads b exactly');
  } else {
    t.match(r.stderr, /DIFF_MISMATCH/, 'refused: DIFF_MISMATCH');
    const list = await cli(['snapshot', 'list', replica, '--json']);
    t.same((JSON.parse(list.stdout) as { name: string }[]).map((s) => s.name), ['a'], 'no snapshot b made on the replica');
  }
});

t.test('rollback between two backups (to a snapshot older than the parent\'s), then writes: the incremental restores exactly', async (t) => {
  const { dir, img, repo } = dirs();
  expectOk(t, await cli(['backup', 'init', repo]), 'init');
  const srv = await startServer({ dir, size: '8M' });
  t.teardown(() => srv.stop());
  const model = Buffer.alloc(SIZE);
  await scribble(srv, model, 40);
  expectOk(t, await cli(['snapshot', 'create', img, 'u']), 'snapshot u');
  const eU = Buffer.from(model);
  await scribble(srv, model, 40);
  const b1 = await cliJson<Job>(t, ['backup', 'create', img, '--repo', repo, '--wait'], 'backup 1');
  t.equal(b1?.state, 'done', 'backup 1 done');
  await scribble(srv, model, 40);
  t.equal((await cli(['rollback', img, 'u', '--wait'])).code, 0, 'rollback to u');
  eU.copy(model);
  await scribble(srv, model, 20);
  const b2 = await cliJson<Job>(t, ['backup', 'create', img, '--repo', repo, '--wait'], 'backup 2');
  t.match(b2, { state: 'done', parent: b1.backup }, 'backup 2: incremental from 1');
  t.same(await restoreDiff(t, repo, b2.backup, model, 'backup 2'), [], 'backup 2 restores exactly');
  // And a rollback to the parent's own base, then a backup of the live volume again.
  const names = (JSON.parse((await cli(['snapshot', 'list', img, '--json'])).stdout) as { name: string }[]).map((s) => s.name);
  const base2 = names.find((n) => n.startsWith('backup-'))!;
  t.equal((await cli(['rollback', img, base2, '--wait'])).code, 0, `rollback to ${base2}`);
  const eBase2 = Buffer.from(model);
  const b3 = await cliJson<Job>(t, ['backup', 'create', img, '--repo', repo, '--wait'], 'backup 3');
  t.equal(b3?.state, 'done', 'backup 3 done');
  t.same(await restoreDiff(t, repo, b3.backup, eBase2, 'backup 3'), [], 'backup 3 restores exactly');
});

t.test('a volume with a short last chunk: incremental backup and diff | apply are exact after writes, a TRIM and WRITE_ZEROES in the last chunk', async (t) => {
  const { dir, img, repo } = dirs();
  const SZ = 1 * MiB + 5000;
  const model = crypto.randomBytes(SZ);
  fs.writeFileSync(img, model);
  const replica = path.join(dir, 'replica.img');
  fs.writeFileSync(replica, model);
  expectOk(t, await cli(['snapshot', 'create', replica, 'a']), 'replica: snapshot a');
  expectOk(t, await cli(['backup', 'init', repo]), 'init');
  expectOk(t, await cli(['snapshot', 'create', img, 'a']), 'snapshot a');
  const b1 = await cliJson<Job>(t, ['backup', 'create', img, '--repo', repo, '--snapshot', 'a', '--wait'], 'backup of a');
  t.equal(b1?.state, 'done', 'backup 1 done');
  const srv = await startServer({ dir, images: ['disk.img'] });
  const tail = crypto.randomBytes(3000);
  t.same(await writeExport(srv.socket, 'disk', [[SZ - 3000, tail]]), [0], 'write in the short last chunk');
  tail.copy(model, SZ - 3000);
  t.equal(await srv.stop(), 0, 'stop');
  expectOk(t, await cli(['snapshot', 'create', img, 'b']), 'snapshot b');
  const b2 = await cliJson<Job>(t, ['backup', 'create', img, '--repo', repo, '--snapshot', 'b', '--wait'], 'backup of b');
  t.match(b2, { state: 'done', parent: b1.backup }, 'backup 2 incremental');
  t.same(await restoreDiff(t, repo, b2.backup, model, 'b'), [], 'b restores exactly');
  const d = path.join(dir, 'a-b.rbd');
  const out = fs.openSync(d, 'w');
  const r0 = spawnSync(process.execPath, [CLI, 'diff', img, '--from', 'a', '--to', 'b', '--format', 'rbd'], { stdio: ['ignore', out, 'pipe'] });
  fs.closeSync(out);
  t.equal(r0.status, 0, 'diff --format rbd');
  expectOk(t, await cli(['diff', 'apply', replica, '--file', d]), 'diff apply');
  t.ok(fs.readFileSync(replica).equals(model), 'the replica reads b');
});

t.test('another volume at the same path (a second host, a replaced image) with a snapshot of the same name, made before the backup: never taken for the parent', async (t) => {
  const { img, repo } = dirs();
  const other = makeTempDir('nbd-review11-other-');
  t.teardown(() => removeDir(other));
  const SZ = 1 * MiB;
  const otherImg = path.join(other, 'disk.img');
  const eOther = crypto.randomBytes(SZ);
  fs.writeFileSync(otherImg, eOther);
  expectOk(t, await cli(['snapshot', 'create', otherImg, 'daily']), 'the other volume: snapshot daily (first)');
  fs.writeFileSync(img, crypto.randomBytes(SZ));
  expectOk(t, await cli(['backup', 'init', repo]), 'init');
  expectOk(t, await cli(['snapshot', 'create', img, 'daily']), 'this volume: snapshot daily');
  const b1 = await cliJson<Job>(t, ['backup', 'create', img, '--repo', repo, '--snapshot', 'daily', '--wait'], 'backup of daily');
  t.equal(b1?.state, 'done', 'backup 1 done');
  // The other volume takes this path (as on a second host sharing the repository).
  fs.rmSync(img);
  fs.rmSync(`${img}.nbd`, { recursive: true, force: true });
  fs.renameSync(otherImg, img);
  fs.renameSync(`${otherImg}.nbd`, `${img}.nbd`);
  expectOk(t, await cli(['snapshot', 'create', img, 'next']), 'snapshot next');
  const b2 = await cliJson<Job>(t, ['backup', 'create', img, '--repo', repo, '--snapshot', 'next', '--wait'], 'backup of next');
  t.equal(b2?.state, 'done', 'backup 2 done');
  t.same(await restoreDiff(t, repo, b2.backup, eOther, 'next'), [], 'backup 2 restores the other volume exactly');
});
