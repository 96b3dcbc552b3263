// Restores are exact: a full backup and 10 incrementals of a volume that
// takes random writes, zero writes, TRIMs and two resizes in between; every
// backup restores to its snapshot byte for byte, from the repository alone.
// Both repository kinds (a local directory and S3 on a real radosgw), with
// and without encryption. Each incremental reads only the changed chunks
// (the change map the server would give), and the repository grows by at
// most 1.2x the changed bytes.
import t, { type Test } from 'tap';
import { randomBytes } from 'node:crypto';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { backup, FileChunkSource, FileTarget, initRepository, listBackups, restore, verify, type Repository } from '../src/backup';
import { TestVolume } from './fixtures/backup-volume';
import { startRgw, type Rgw } from './fixtures/rgw';
import { tempDirs } from './fixtures/server';

const KiB = 1024;
const MiB = 1024 * KiB;
const CHUNK = 64 * KiB;
const makeTempDir = tempDirs(t);

async function repoBytes(repo: Repository): Promise<number> {
  return (await repo.backend.list('')).reduce((n, o) => n + o.size, 0);
}

function nonZeroBytes(file: string, chunks: number[], chunkSize: number): number {
  const fd = fs.openSync(file, 'r');
  const buf = Buffer.alloc(chunkSize);
  let n = 0;
  try {
    for (const c of chunks) {
      const got = fs.readSync(fd, buf, 0, chunkSize, c * chunkSize);
      if (buf.subarray(0, got).some((b) => b !== 0)) n += got;
    }
  } finally {
    fs.closeSync(fd);
  }
  return n;
}

async function exactRestores(t: Test, repoUrl: string, access: Parameters<typeof initRepository>[1]): Promise<void> {
  const dir = makeTempDir('nbd-backup-restore-');
  const vol = new TestVolume(dir, 16 * MiB, CHUNK);
  const repo = await initRepository(repoUrl, access);
  t.teardown(() => repo.close());
  const opts = { packSize: 512 * KiB };
  // Full backup of a volume with some data and holes.
  vol.randomOps(60);
  let snap = vol.snapshot(dir);
  let src = await vol.source(snap.copy);
  const full = await backup(repo, src, opts);
  await src.close();
  const backups = [{ id: full.id, copy: snap.copy }];
  t.equal(full.stats.bytesRead, 16 * MiB, 'the full backup reads the whole volume');

  let parent = full.id;
  for (let k = 1; k <= 10; k++) {
    vol.randomOps(25);
    if (k === 4) vol.resize(20 * MiB + 12345); // grow to a short last chunk
    if (k === 7) vol.resize(18 * MiB + 100); // shrink to another short last chunk
    snap = vol.snapshot(dir);
    const before = await repoBytes(repo);
    src = await vol.source(snap.copy, snap.changed);
    const m = await backup(repo, src, { ...opts, parent });
    await src.close();
    const growth = (await repoBytes(repo)) - before;
    const changedData = nonZeroBytes(snap.copy, snap.changed, CHUNK);
    t.ok(m.stats.bytesRead <= (snap.changed.length + 2) * CHUNK, `incremental ${k} reads only changed chunks (${m.stats.bytesRead} bytes, ${snap.changed.length} chunks changed)`);
    t.ok(growth <= 1.2 * changedData + 16 * KiB, `incremental ${k}: repository grew ${growth} bytes for ${changedData} changed bytes`);
    backups.push({ id: m.id, copy: snap.copy });
    parent = m.id;
  }
  t.equal((await listBackups(repo)).length, 11, 'list shows 11 backups');
  // Dedup across volumes: a full backup of another volume with the same content stores nothing new.
  const other = await FileChunkSource.open(snap.copy, { chunkSize: CHUNK, volume: 'other' });
  const copyBackup = await backup(repo, other, opts);
  await other.close();
  t.equal(copyBackup.stats.chunksNew, 0, 'a second volume with the same content stores no chunk again');

  for (const [k, b] of backups.entries()) {
    const out = path.join(dir, `restored-${k}.img`);
    await restore(repo, b.id, new FileTarget(out));
    const want = fs.readFileSync(b.copy);
    const got = fs.readFileSync(out);
    t.ok(got.equals(want), `backup ${k} restores byte for byte (${got.length} bytes)`);
    // Zero chunks are holes in the restored file.
    if (k === 0) t.ok(fs.statSync(out).blocks * 512 < got.length, 'zero regions are written as holes');
    fs.rmSync(out);
  }
  const v = await verify(repo, { readData: true });
  t.same(v.problems, [], 'verify --read-data finds no problem');
  t.equal(v.backups, 12, 'verify checked every backup');
}

const tap = t;
let rgw: Rgw | null | undefined;
async function s3(t: Test): Promise<Rgw | null> {
  if (rgw === undefined) rgw = await startRgw(t, tap);
  return rgw;
}

t.test('local directory, plain', (t) => exactRestores(t, path.join(makeTempDir('nbd-repo-'), 'repo'), {}));

t.test('local directory, encrypted', async (t) => {
  const d = makeTempDir('nbd-repo-');
  fs.writeFileSync(path.join(d, 'key'), randomBytes(32));
  await exactRestores(t, path.join(d, 'repo'), { keyFile: path.join(d, 'key') });
});

t.test('S3 (radosgw), plain', async (t) => {
  const g = await s3(t);
  if (!g) return;
  await exactRestores(t, `s3://${await g.bucket('plain')}/repo1`, { s3: g.s3 });
});

t.test('S3 (radosgw), encrypted', async (t) => {
  const g = await s3(t);
  if (!g) return;
  const d = makeTempDir('nbd-key-');
  fs.writeFileSync(path.join(d, 'key'), randomBytes(32));
  await exactRestores(t, `s3://${await g.bucket('enc')}/some/prefix`, { s3: g.s3, keyFile: path.join(d, 'key') });
});
