// Kill -9 a backup mid-way, many rounds: each rerun completes or is killed
// again; a rerun never re-sends a chunk that was durable (in a pack with a
// packidx) before it started, so it re-sends at most what was in flight;
// nothing in the repository ever references missing data; every finished
// backup restores exactly. The bytes re-sent are reported.
// The backups run in a child process on the compiled library (run `npx tsc
// -p tsconfig.json` first); reads are throttled so the kill lands mid-way,
// and the test kills on a state (a number of packs uploaded), not a time.
import t, { type Test } from 'tap';
import { createHash, randomBytes } from 'node:crypto';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { FileTarget, initRepository, openRepository, prune, restore, verify, type Repository, type S3Flags } from '../src/backup';
import { listLocks } from '../src/backup/locks';
import { BackupChild } from './fixtures/backup-child';
import { TestVolume, waitFor } from './fixtures/backup-volume';
import { startRgw } from './fixtures/rgw';
import { tempDirs } from './fixtures/server';

const KiB = 1024;
const MiB = 1024 * KiB;
const CHUNK = 64 * KiB;
const PACK = 512 * KiB;
const makeTempDir = tempDirs(t);
const tap = t;

/** Distinct non-zero chunk contents of an image, as ids (plain repositories: SHA-256). */
function distinctChunks(file: string): Set<string> {
  const data = fs.readFileSync(file);
  const out = new Set<string>();
  for (let o = 0; o < data.length; o += CHUNK) {
    const c = data.subarray(o, o + CHUNK);
    if (c.some((b) => b !== 0)) out.add(createHash('sha256').update(c).digest('hex'));
  }
  return out;
}

async function durableChunks(repo: Repository): Promise<Set<string>> {
  const map = await repo.chunkMap();
  return new Set([...map.keys()].map((k) => Buffer.from(k, 'latin1').toString('hex')));
}

async function killRounds(t: Test, repoUrl: string, rounds: number, env: NodeJS.ProcessEnv, s3?: S3Flags): Promise<void> {
  const dir = makeTempDir('nbd-backup-kill-');
  const vol = new TestVolume(dir, 16 * MiB, CHUNK);
  for (let c = 0; c < 256; c++) if (c % 5 !== 0) vol.write(c * CHUNK, randomBytes(CHUNK));
  (await initRepository(repoUrl, { s3 })).close();
  const repo = await openRepository(repoUrl, { s3 });
  t.teardown(() => repo.close());

  let snap = vol.snapshot(dir);
  let parent: string | undefined;
  const finished: { id: string; copy: string }[] = [];
  let kills = 0;
  let resentBytes = 0;
  let resentChunks = 0;
  let run = 0;
  while (kills < rounds || finished.length === 0 || finished.at(-1)!.copy !== snap.copy) {
    const before = await durableChunks(repo);
    const needed = distinctChunks(snap.copy);
    const missingBefore = [...needed].filter((id) => !before.has(id)).length;
    const child = new BackupChild({ repo: repoUrl, image: snap.copy, chunkSize: CHUNK, packSize: PACK, delayMs: 3, parent, env });
    const target = 1 + (run++ % 3); // kill after 1, 2 or 3 packs of this run
    await waitFor(() => child.last.packsWritten >= target || child.done !== undefined || child.proc.exitCode !== null, 'the child to upload packs');
    if (child.done === undefined && kills < rounds) {
      if (kills === 0) {
        const locks = await listLocks(repo);
        t.ok(locks.some((l) => l.kind === 'backup' && l.live && l.owner?.pid === child.proc.pid), "a running child's lock is live");
      }
      const reported = child.last.chunksNew;
      await child.kill();
      kills++;
      const after = await durableChunks(repo);
      const madeDurable = [...after].filter((id) => !before.has(id)).length;
      // What the killed run had packed but not made durable: re-sent by the next run.
      const lost = Math.max(0, reported - madeDurable);
      resentChunks += lost;
      resentBytes += lost * CHUNK;
      t.ok(lost * CHUNK <= 3 * (PACK + CHUNK) + 2 * CHUNK, `kill ${kills}: in flight at the kill: ${lost} chunks (bound: 2 uploads + the open pack + reads)`);
      // Nothing references missing data: every finished backup still verifies.
      const v = await verify(repo);
      if (v.problems.length) t.same(v.problems, [], `kill ${kills}: the repository verifies`);
      continue;
    }
    const code = await child.exited;
    t.equal(code, 0, `run ${run} completes${code !== 0 ? `: ${child.stderr}` : ''}`);
    if (!child.done) return;
    t.equal(child.done.stats.chunksNew, missingBefore, `run ${run}: stores exactly the ${missingBefore} chunks that were not durable, none again`);
    finished.push({ id: child.done.id, copy: snap.copy });
    parent = child.done.id;
    if (kills < rounds) {
      // Next: an incremental (the child backs up all chunks; dedup skips the unchanged ones).
      vol.randomOps(40);
      for (let c = 0; c < 64; c++) vol.write(Math.floor(Math.random() * 256) * CHUNK, randomBytes(CHUNK));
      snap = vol.snapshot(dir);
    }
  }
  // The killed children's locks name dead processes of this host: a prune
  // need not wait for them to expire.
  const pr = await prune(repo, { keepLast: 100 });
  t.notOk(pr.deferred, "prune does not wait for the killed backups' locks");
  t.same((await listLocks(repo)).map((l) => l.key), [], 'and removes them');
  t.comment(`${kills} kills: ${resentChunks} chunks (${(resentBytes / MiB).toFixed(2)} MiB) were in flight and re-sent; ${finished.length} backups finished`);
  t.same((await verify(repo, { readData: true })).problems, [], 'the repository verifies with --read-data');
  for (const [i, f] of finished.entries()) {
    const out = path.join(dir, `restored-${i}.img`);
    await restore(repo, f.id, new FileTarget(out));
    t.ok(fs.readFileSync(out).equals(fs.readFileSync(f.copy)), `finished backup ${i} restores exactly`);
    fs.rmSync(out);
  }
}

t.test('kill -9 mid-way, 20 rounds, local directory', (t) => killRounds(t, path.join(makeTempDir('nbd-repo-'), 'repo'), 20, {}));

t.test('kill -9 mid-way, 5 rounds, S3 (radosgw)', async (t) => {
  const g = await startRgw(t, tap);
  if (!g) return;
  const bucket = await g.bucket('kill');
  const env = { S3_ENDPOINT: g.endpoint, AWS_ACCESS_KEY_ID: g.accessKeyId, AWS_SECRET_ACCESS_KEY: g.secretAccessKey, AWS_REGION: g.region };
  await killRounds(t, `s3://${bucket}/r`, 5, env, g.s3);
});
