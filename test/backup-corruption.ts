// Corruption is found and named, and never restored: a byte flipped in a
// pack blob (verify --read-data names the pack, the chunk and each backup
// chunk that uses it; restore refuses and leaves no file), a byte flipped
// in a pack's trailer (the pack checksum), a damaged manifest or index, a
// missing pack. Local directory (plain and encrypted) and S3 (radosgw).
import t, { type Test } from 'tap';
import { randomBytes } from 'node:crypto';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { backup, FileTarget, initRepository, listBackups, prune, restore, verify, type Repository } from '../src/backup';
import { NbdError } from '../src/errors';
import { TestVolume } from './fixtures/backup-volume';
import { startRgw } from './fixtures/rgw';
import { tempDirs } from './fixtures/server';

const KiB = 1024;
const MiB = 1024 * KiB;
const CHUNK = 64 * KiB;
const makeTempDir = tempDirs(t);
const tap = t;

async function flipByte(repo: Repository, key: string, offset: number): Promise<void> {
  const data = await repo.backend.get(key);
  data[offset] ^= 0x5a;
  await repo.backend.put(key, data);
}

async function rejectsWith(t: Test, p: Promise<unknown>, code: string, pattern: RegExp, what: string): Promise<void> {
  try {
    await p;
    t.fail(`${what}: resolved, expected ${code}`);
  } catch (err) {
    t.equal((err as NbdError).code, code, `${what}: ${code}`);
    t.match((err as Error).message, pattern, `${what}: the message names it`);
  }
}

async function scenario(t: Test, repoUrl: string, access: Parameters<typeof initRepository>[1]): Promise<void> {
  const dir = makeTempDir('nbd-backup-corrupt-');
  const vol = new TestVolume(dir, 8 * MiB, CHUNK);
  const repo = await initRepository(repoUrl, access);
  t.teardown(() => repo.close());
  vol.randomOps(40);
  const s0 = vol.snapshot(dir);
  let src = await vol.source(s0.copy);
  const b0 = await backup(repo, src, { packSize: 256 * KiB });
  await src.close();
  for (let c = 0; c < 6; c++) vol.write((10 + 7 * c) * CHUNK, randomBytes(CHUNK));
  const s1 = vol.snapshot(dir);
  src = await vol.source(s1.copy, s1.changed);
  const b1 = await backup(repo, src, { packSize: 256 * KiB, parent: b0.id });
  await src.close();
  t.equal(b1.stats.packsWritten, 2, 'the incremental wrote its own packs');

  // A blob that only the incremental uses: chunk 10 + 7*2 = 24.
  const index1 = await repo.readIndex(await repo.readManifest(b1.id));
  const victim = 24;
  const id = index1.id(victim);
  const loc = (await repo.chunkMap()).get(id.toString('latin1'))!;
  const packKey = `packs/${loc.pack.slice(0, 2)}/${loc.pack}`;
  await flipByte(repo, packKey, loc.entry.offset + Math.floor(loc.entry.length / 2));

  const meta = await verify(repo);
  t.same(meta.problems, [], 'verify without --read-data does not read packs');
  const v = await verify(repo, { readData: true });
  t.notOk(v.ok, 'verify --read-data fails');
  const p = v.problems.find((x) => x.kind === 'CHUNK_CORRUPT');
  t.ok(p, 'it reports a corrupt chunk');
  t.equal(p?.pack, loc.pack, 'it names the pack');
  t.equal(p?.chunkId, id.toString('hex'), 'it names the chunk id');
  t.same(p?.usedBy, [{ backup: b1.id, chunks: [victim] }], 'it names the backup and the volume chunk');
  t.match(p?.message, new RegExp(`${loc.pack}.*backup ${b1.id} chunk ${victim}`), 'the message names pack, backup and chunk');

  const out = path.join(dir, 'restored.img');
  await rejectsWith(t, restore(repo, b1.id, new FileTarget(out)), 'BACKUP_DATA_CORRUPT', new RegExp(`${loc.pack}.*backup ${b1.id}, chunk ${victim}`), 'restore of the damaged backup');
  t.notOk(fs.existsSync(out), 'the refused restore leaves no target file');
  t.same(fs.readdirSync(dir).filter((f) => f.startsWith('restored')), [], '... and no partial file');
  await restore(repo, b0.id, new FileTarget(out));
  t.ok(fs.readFileSync(out).equals(fs.readFileSync(s0.copy)), 'a backup that does not use the damaged chunk still restores exactly');
  fs.rmSync(out);

  // Undo, then damage the pack's trailer (outside every blob): the pack checksum catches it.
  await flipByte(repo, packKey, loc.entry.offset + Math.floor(loc.entry.length / 2));
  t.ok((await verify(repo, { readData: true })).ok, 'undone: verify passes again');
  const packLen = (await repo.backend.get(packKey)).length;
  await flipByte(repo, packKey, packLen - 20);
  const v2 = await verify(repo, { readData: true });
  t.same(
    v2.problems.map((x) => [x.kind, x.pack]),
    [['PACK_CORRUPT', loc.pack]],
    'a byte flipped in the trailer: the pack is named as failing its checksum',
  );
  await flipByte(repo, packKey, packLen - 20);

  // A damaged index: verify names the backup, restore refuses.
  await flipByte(repo, `indexes/${b1.id}`, 12);
  const v3 = await verify(repo);
  t.same(v3.problems.map((x) => [x.kind, x.backup]), [['INDEX_CORRUPT', b1.id]], 'a damaged index is named');
  await rejectsWith(t, restore(repo, b1.id, new FileTarget(out)), 'REPO_CORRUPT', new RegExp(b1.id), 'restore with a damaged index');
  await flipByte(repo, `indexes/${b1.id}`, 12);

  // A damaged manifest.
  await flipByte(repo, `backups/${b0.id}`, 10);
  const v4 = await verify(repo);
  t.same(v4.problems.map((x) => [x.kind, x.backup]), [['MANIFEST_CORRUPT', b0.id]], 'a damaged manifest is named');
  await rejectsWith(t, listBackups(repo), 'REPO_CORRUPT', new RegExp(`backups/${b0.id}`), 'list with a damaged manifest');
  await flipByte(repo, `backups/${b0.id}`, 10);

  // A damaged pack index: verify names it, restore of a backup that does not
  // use the pack still works, prune refuses to run.
  await flipByte(repo, `packidx/${loc.pack}`, 12);
  const v6 = await verify(repo);
  t.same(v6.problems.filter((x) => x.kind === 'PACKIDX_CORRUPT').map((x) => x.pack), [loc.pack], 'a damaged pack index is named');
  t.ok(v6.problems.some((x) => x.kind === 'CHUNK_MISSING' && x.usedBy?.[0]?.backup === b1.id), "and the chunks it held show as missing from the backup that uses them");
  await restore(repo, b0.id, new FileTarget(out));
  t.ok(fs.readFileSync(out).equals(fs.readFileSync(s0.copy)), 'a backup that does not use that pack restores exactly');
  fs.rmSync(out);
  await rejectsWith(t, restore(repo, b1.id, new FileTarget(out)), 'REPO_CORRUPT', new RegExp(`packidx/${loc.pack}`), 'restore of a backup that uses it');
  await rejectsWith(t, prune(repo, { keepLast: 5 }), 'REPO_CORRUPT', new RegExp(`packidx/${loc.pack}`), 'prune');
  await flipByte(repo, `packidx/${loc.pack}`, 12);

  // A missing pack: found by verify without reading data; restore refuses.
  const saved = await repo.backend.get(packKey);
  await repo.backend.delete(packKey);
  const v5 = await verify(repo, { backup: b1.id });
  t.same(v5.problems.map((x) => [x.kind, x.pack]), [['PACK_MISSING', loc.pack]], 'a missing pack is named');
  await rejectsWith(t, restore(repo, b1.id, new FileTarget(out)), 'BACKUP_DATA_CORRUPT', new RegExp(`${loc.pack} is missing`), 'restore with a missing pack');
  await repo.backend.put(packKey, saved);
  t.ok((await verify(repo, { readData: true })).ok, 'restored: the repository verifies');
}

t.test('local directory, plain', (t) => scenario(t, path.join(makeTempDir('nbd-repo-'), 'repo'), {}));

t.test('local directory, encrypted', async (t) => {
  const d = makeTempDir('nbd-repo-');
  fs.writeFileSync(path.join(d, 'key'), randomBytes(32));
  await scenario(t, path.join(d, 'repo'), { keyFile: path.join(d, 'key') });
});

t.test('S3 (radosgw), encrypted', async (t) => {
  const g = await startRgw(t, tap);
  if (!g) return;
  const d = makeTempDir('nbd-key-');
  fs.writeFileSync(path.join(d, 'key'), randomBytes(32));
  await scenario(t, `s3://${await g.bucket('corrupt')}/r`, { s3: g.s3, keyFile: path.join(d, 'key') });
});
