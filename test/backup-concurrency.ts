// Concurrency: a prune while a backup runs never deletes what the backup
// needs (packs it deduplicated against, packs it already uploaded); a
// backup waits for a running prune; two backups into one repository at once
// both restore exactly and leave a repository that verifies.
// Backups are held mid-way with GatedSource (reads wait for permission),
// never by timing.
import t, { type Test } from 'tap';
import { randomBytes } from 'node:crypto';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { backup, FileTarget, initRepository, prune, restore, verify, type Repository } from '../src/backup';
import { listLocks, RepoLock } from '../src/backup/locks';
import type { NbdError } from '../src/errors';
import { GatedSource, TestVolume, waitFor } from './fixtures/backup-volume';
import { startRgw } from './fixtures/rgw';
import { tempDirs } from './fixtures/server';

const KiB = 1024;
const MiB = 1024 * KiB;
const CHUNK = 64 * KiB;
const makeTempDir = tempDirs(t);
const tap = t;
const opts = { packSize: 256 * KiB, readSize: CHUNK, readConcurrency: 2 };

async function restoresExactly(t: Test, repo: Repository, id: string, copy: string, dir: string, what: string): Promise<void> {
  const out = path.join(dir, `r-${randomBytes(4).toString('hex')}.img`);
  await restore(repo, id, new FileTarget(out));
  t.ok(fs.readFileSync(out).equals(fs.readFileSync(copy)), what);
  fs.rmSync(out);
}

async function pruneDuringBackup(t: Test, repoUrl: string, access: Parameters<typeof initRepository>[1]): Promise<void> {
  const dir = makeTempDir('nbd-backup-prune-');
  const vol = new TestVolume(dir, 16 * MiB, CHUNK);
  const repo = await initRepository(repoUrl, access);
  t.teardown(() => repo.close());
  const old = randomBytes(16 * CHUNK);
  vol.write(0, old);
  vol.write(64 * CHUNK, randomBytes(32 * CHUNK));
  const s0 = vol.snapshot(dir);
  let src = await vol.source(s0.copy);
  const b0 = await backup(repo, src, opts);
  await src.close();
  vol.write(0, randomBytes(16 * CHUNK)); // b0's chunks 0-15 are now only in b0
  const s1 = vol.snapshot(dir);
  src = await vol.source(s1.copy, s1.changed);
  const b1 = await backup(repo, src, { ...opts, parent: b0.id });
  await src.close();

  // b2 writes the old content back (deduplicated against b0's packs) and new data (its own packs).
  vol.write(0, old.subarray(0, 8 * CHUNK));
  vol.write(120 * CHUNK, randomBytes(40 * CHUNK));
  const s2 = vol.snapshot(dir);
  const gated = new GatedSource(await vol.source(s2.copy, s2.changed), 12);
  let packs = 0;
  const running = backup(repo, gated, { ...opts, parent: b1.id, onProgress: (p) => (packs = p.packsWritten) });
  running.catch(() => undefined);
  await waitFor(() => packs >= 1 && gated.reads > 12, 'the backup to upload a pack and block on a read');

  const during = await prune(repo, { keepLast: 1 });
  t.same(during.forgotten, [b0.id], 'prune forgets the older backup');
  t.ok(during.deferred, 'prune defers deleting packs while a backup runs');
  t.equal(during.packsDeleted, 0, 'no pack is deleted');

  gated.release();
  const b2 = await running;
  await gated.close();
  t.ok(b2.stats.chunksNew < s2.changed.length, 'the running backup deduplicated against the forgotten backup\'s chunks');
  t.same((await verify(repo, { readData: true })).problems, [], 'the repository verifies after the backup');
  await restoresExactly(t, repo, b2.id, s2.copy, dir, 'the backup that ran during the prune restores exactly');

  const after = await prune(repo, { keepLast: 1 });
  t.notOk(after.deferred, 'with no backup running, prune deletes packs');
  t.ok(after.packsDeleted > 0, `prune deleted ${after.packsDeleted} unreferenced packs`);
  t.same((await verify(repo, { readData: true })).problems, [], 'the repository verifies after the second prune');
  await restoresExactly(t, repo, b2.id, s2.copy, dir, 'the kept backup still restores exactly');
  t.same((await listLocks(repo)).map((l) => l.key), [], 'no lock is left behind');
}

t.test('prune during a running backup, local directory', (t) => pruneDuringBackup(t, path.join(makeTempDir('nbd-repo-'), 'repo'), {}));

t.test('prune during a running backup, S3 (radosgw), encrypted', async (t) => {
  const g = await startRgw(t, tap);
  if (!g) return;
  const d = makeTempDir('nbd-key-');
  fs.writeFileSync(path.join(d, 'key'), randomBytes(32));
  await pruneDuringBackup(t, `s3://${await g.bucket('prune')}/r`, { s3: g.s3, keyFile: path.join(d, 'key') });
});

t.test('a backup waits for a running prune', async (t) => {
  const dir = makeTempDir('nbd-backup-wait-');
  const vol = new TestVolume(dir, 4 * MiB, CHUNK);
  vol.randomOps(20);
  const s0 = vol.snapshot(dir);
  const repo = await initRepository(path.join(dir, 'repo'));
  t.teardown(() => repo.close());
  const pruneLock = await RepoLock.acquire(repo, 'prune');
  let src = await vol.source(s0.copy);
  try {
    await backup(repo, src, { ...opts, pruneWaitMs: 0 });
    t.fail('the backup ran beside a prune');
  } catch (err) {
    t.equal((err as NbdError).code, 'REPO_LOCKED', 'with no time to wait: REPO_LOCKED');
  }
  await src.close();
  t.same((await listLocks(repo)).map((l) => l.kind), ['prune'], 'the refused backup removed its lock');

  src = await vol.source(s0.copy);
  const gated = new GatedSource(src, Number.MAX_SAFE_INTEGER / 2);
  const waiting = backup(repo, gated, opts);
  waiting.catch(() => undefined);
  await waitFor(async () => (await listLocks(repo)).some((l) => l.kind === 'backup'), 'the backup to take its lock');
  t.equal(gated.reads, 0, 'the backup has its lock but has not started reading');
  await pruneLock.release();
  const m = await waiting;
  await src.close();
  await restoresExactly(t, repo, m.id, s0.copy, dir, 'it runs once the prune is done, and restores exactly');
});

async function twoBackups(t: Test, repoUrl: string, access: Parameters<typeof initRepository>[1]): Promise<void> {
  const dir = makeTempDir('nbd-backup-two-');
  const a = new TestVolume(dir, 8 * MiB, CHUNK, 'a');
  const b = new TestVolume(dir, 8 * MiB, CHUNK, 'b');
  const shared = randomBytes(24 * CHUNK); // the same content in both: both may store it at once
  a.write(0, shared);
  b.write(8 * CHUNK, shared);
  a.randomOps(30);
  b.randomOps(30);
  const repo = await initRepository(repoUrl, access);
  t.teardown(() => repo.close());

  const runBoth = async (parents: [string | null, string | null]) => {
    const sa = a.snapshot(dir);
    const sb = b.snapshot(dir);
    const ga = new GatedSource(await a.source(sa.copy, parents[0] ? sa.changed : undefined));
    const gb = new GatedSource(await b.source(sb.copy, parents[1] ? sb.changed : undefined));
    const pa = backup(repo, ga, { ...opts, parent: parents[0] });
    const pb = backup(repo, gb, { ...opts, parent: parents[1] });
    pa.catch(() => undefined);
    pb.catch(() => undefined);
    // Both hold their locks and have loaded the chunk map before either reads.
    await waitFor(() => ga.reads > 0 && gb.reads > 0, 'both backups to start reading');
    t.equal((await listLocks(repo)).filter((l) => l.kind === 'backup').length, 2, 'two backup locks at once');
    ga.release();
    gb.release();
    const [ma, mb] = await Promise.all([pa, pb]);
    await ga.close();
    await gb.close();
    return [
      { m: ma, copy: sa.copy },
      { m: mb, copy: sb.copy },
    ];
  };
  const full = await runBoth([null, null]);
  a.randomOps(20);
  b.randomOps(20);
  a.write(100 * CHUNK, shared.subarray(0, 4 * CHUNK));
  const incr = await runBoth([full[0]!.m.id, full[1]!.m.id]);
  t.same((await verify(repo, { readData: true })).problems, [], 'the repository verifies');
  for (const [i, x] of [...full, ...incr].entries()) await restoresExactly(t, repo, x.m.id, x.copy, dir, `backup ${i} (${x.m.parent ? 'incremental' : 'full'}) restores exactly`);
  const pr = await prune(repo, { keepLast: 1 });
  t.equal(pr.forgotten.length, 2, 'prune keeps the newest backup per volume');
  t.same((await verify(repo, { readData: true })).problems, [], 'the repository verifies after prune');
  for (const x of incr) await restoresExactly(t, repo, x.m.id, x.copy, dir, 'the kept backups still restore exactly');
}

t.test('two backups at once, local directory', (t) => twoBackups(t, path.join(makeTempDir('nbd-repo-'), 'repo'), {}));

t.test('two backups at once, S3 (radosgw)', async (t) => {
  const g = await startRgw(t, tap);
  if (!g) return;
  await twoBackups(t, `s3://${await g.bucket('two')}/r`, { s3: g.s3 });
});
