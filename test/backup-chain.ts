// Backups over a chain of snapshots, on the product path: the serving
// server's change maps and backup jobs, driven through the CLI (issue 11).
//
// 1. "restores are exact over a chain": a full backup and 10 incrementals of
//    a 16 MiB volume, between them random writes, TRIMs and WRITE_ZEROES
//    (partial chunks, the last chunk), user snapshots made and deleted
//    between backups, one rollback to an older user snapshot and one offline
//    backup; every backup restores to its snapshot byte for byte, and each
//    incremental read at most 1.1x the chunks written since the previous
//    backup's snapshot (the model: the chunk-level union of what was written,
//    a rollback counting as writing every chunk changed since its target).
//    Run on a local directory without encryption and on S3 (radosgw) with an
//    encrypted repository.
// 2. "kills": 20 rounds of kill -9 of the serving server mid-backup (kept
//    running with the test hook NBD_TEST_BACKUP_READ_DELAY_MS; a kill counts
//    as mid-backup only by observed state: the record running and the
//    repository without the backup's manifest), restart, the job resumes and
//    completes; the repository verifies with --read-data and the backup
//    restores exactly. Each round's writes are fresh random data, so a clean
//    run would store exactly the chunks written (C). Re-uploaded bytes of a
//    round are defined as: the bytes of packs the killed run uploaded without
//    their packidx (seen right after the kill; the resumed run sends their
//    chunks again, maybe as the same pack), plus the bytes of uploads the
//    kill cut (files left in the local repository's tmp/), plus CHUNK x
//    (chunks the killed run indexed + chunks the resumed run stored (its
//    chunksNew) - C). They must stay within what the pipeline can have
//    in flight (src/backup/backup.ts), and the second term must be 0 (the
//    resumed run never stores a chunk the killed run had indexed).
import t, { type Test } from 'tap';
import * as crypto from 'node:crypto';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { openRepository } from '../src/backup/index';
import { readManifest } from '../src/volume-meta';
import { cli, expectError, expectOk } from './fixtures/cli-expect';
import { readExport } from './fixtures/export-io';
import { NBD, RawClient } from './fixtures/raw-client';
import { startRgw } from './fixtures/rgw';
import { makeTempDir, removeDir, startServer, type RunningServer } from './fixtures/server';
import { ChangeModel } from './fixtures/change-model';

const KiB = 1024;
const MiB = 1024 * KiB;
/** The default chunk size of a volume. */
const CHUNK = 16 * KiB;

interface Stats {
  chunksChanged: number;
  chunksNew: number;
  bytesRead: number;
  bytesStored: number;
  packsWritten: number;
}

interface Job {
  id: number;
  type: string;
  state: string;
  done: number;
  total: number;
  snapshot: string;
  autoSnapshot: boolean;
  backup: string;
  parent?: string | null;
  resumed?: boolean;
  error?: string;
  errorCode?: string;
  result?: { backup: string; parent: string | null; stats: Stats; deleted: string[] };
}

function lastErr(s: string): string {
  return s.trim().split('\n').at(-1) ?? '';
}

async function json<T>(args: string[]): Promise<T> {
  const r = await cli([...args, '--json']);
  if (r.code !== 0) throw new Error(`${args.slice(0, 2).join(' ')}: exit ${r.code}: ${lastErr(r.stderr)}`);
  return JSON.parse(r.stdout || 'null') as T;
}

async function jobs(img: string, all = false): Promise<Job[]> {
  return json<Job[]>(['jobs', img, ...(all ? ['--all'] : [])]);
}

async function until<T>(what: string, fn: () => Promise<T | undefined> | T | undefined, ms = 300_000): Promise<T> {
  const end = Date.now() + ms;
  for (;;) {
    const v = await fn();
    if (v !== undefined) return v;
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

function chunksOf(off: number, len: number): number[] {
  const out: number[] = [];
  for (let c = Math.floor(off / CHUNK); c * CHUNK < off + len; c++) out.push(c);
  return out;
}

type Op = { kind: 'write' | 'trim' | 'zero'; off: number; len: number; flags?: number; data?: Buffer };

/** Applies ops through one connection, then FLUSH; adds their chunks to the model. */
async function apply(srv: RunningServer, model: ChangeModel, ops: Op[]): Promise<void> {
  const c = await RawClient.connect(srv.socket);
  const touched = new Set<number>();
  try {
    await c.go('disk');
    for (const op of ops) {
      const r =
        op.kind === 'write'
          ? await c.write(op.off, op.data!)
          : await c.cmd(op.kind === 'trim' ? NBD.CMD_TRIM : NBD.CMD_WRITE_ZEROES, op.flags ?? 0, op.off, op.len);
      if (r.error) throw new Error(`${op.kind} ${op.off}+${op.len}: NBD error ${r.error}`);
      for (const ch of chunksOf(op.off, op.len)) touched.add(ch);
    }
    const f = await c.cmd(NBD.CMD_FLUSH, 0, 0, 0);
    if (f.error) throw new Error(`flush: NBD error ${f.error}`);
  } finally {
    await c.disconnect();
  }
  model.add(touched);
}

/** n random writes, TRIMs and WRITE_ZEROES (partial chunks included), and one op that ends at the volume's end. */
function randomOps(size: number, n: number): Op[] {
  const ops: Op[] = [];
  for (let k = 0; k <= n; k++) {
    const len = crypto.randomInt(10) < 3 ? 1 + crypto.randomInt(4 * KiB) : 4 * KiB + crypto.randomInt(60 * KiB);
    const off = k === n ? size - len : crypto.randomInt(size - len + 1);
    const p = crypto.randomInt(10);
    if (p < 6) ops.push({ kind: 'write', off, len, data: crypto.randomBytes(len) });
    else if (p < 8) ops.push({ kind: 'trim', off, len });
    else ops.push({ kind: 'zero', off, len, flags: crypto.randomInt(2) ? NBD.CMD_FLAG_NO_HOLE : 0 });
  }
  return ops;
}

async function readAll(srv: RunningServer, name: string, size: number): Promise<Buffer> {
  const r = await readExport(srv.socket, name, 0, size);
  if (r.error || !r.data) throw new Error(`read ${name}: NBD error ${r.error}`);
  return r.data;
}

async function restoreEquals(t: Test, repo: string, id: string, extra: string[], scratch: string, expected: Buffer, what: string): Promise<void> {
  const out = path.join(scratch, `restore-${id}.img`);
  const r = await cli(['backup', 'restore', repo, id, out, ...extra]);
  expectOk(t, r, `${what}: restore`);
  const got = fs.existsSync(out) ? fs.readFileSync(out) : undefined;
  let firstDiff = -1;
  if (got && got.length === expected.length) for (let i = 0; i < got.length && firstDiff < 0; i += CHUNK) if (!got.subarray(i, i + CHUNK).equals(expected.subarray(i, i + CHUNK))) firstDiff = i / CHUNK;
  t.ok(got?.equals(expected), `${what}: the restore equals the snapshot byte for byte${got && firstDiff >= 0 ? ` (first differing chunk ${firstDiff})` : ''}`);
  fs.rmSync(out, { force: true });
}

async function snapshotCmd(t: Test, args: string[], what: string): Promise<void> {
  const r = await cli(args);
  t.equal(r.code, 0, `${what}${r.code ? `: ${lastErr(r.stderr)}` : ''}`);
}

/**
 * The chain: backups k = 0..10 (0 full, then incrementals), each after random
 * ops; user snapshots made and deleted between backups; a rollback to the
 * user snapshot "old" before backup 6; backup 8 offline.
 */
async function chain(t: Test, repo: string, extra: string[]): Promise<void> {
  const SIZE = 16 * MiB;
  const NCHUNKS = SIZE / CHUNK;
  const dir = makeTempDir('nbd-backup-chain-');
  t.teardown(() => removeDir(dir));
  const img = path.join(dir, 'disk.img');
  let srv = await startServer({ dir, size: '16M' });
  t.teardown(() => srv.stop());
  const model = new ChangeModel();
  await apply(srv, model, [{ kind: 'write', off: 0, len: SIZE, data: crypto.randomBytes(SIZE) }]);
  const backups: { id: string; content: Buffer }[] = [];
  let prevMark: string | null = null;
  for (let k = 0; k <= 10; k++) {
    await apply(srv, model, randomOps(SIZE, 20));
    if (k === 1) {
      await snapshotCmd(t, ['snapshot', 'create', img, 'old'], 'snapshot create old');
      model.snapshot('old');
      await apply(srv, model, randomOps(SIZE, 10));
    }
    if (k % 2 === 1 && k < 10) {
      // A user snapshot made now, deleted before the next backup (k + 1).
      await snapshotCmd(t, ['snapshot', 'create', img, `u${k}`], `snapshot create u${k}`);
      await apply(srv, model, randomOps(SIZE, 10));
    }
    if (k % 2 === 0 && k > 0 && k < 10) {
      await snapshotCmd(t, ['snapshot', 'delete', img, `u${k - 1}`], `snapshot delete u${k - 1} (between backups)`);
      await apply(srv, model, randomOps(SIZE, 5));
    }
    if (k === 4) {
      // Made and deleted within one interval.
      await snapshotCmd(t, ['snapshot', 'create', img, 'brief'], 'snapshot create brief');
      await apply(srv, model, randomOps(SIZE, 10));
      await snapshotCmd(t, ['snapshot', 'delete', img, 'brief'], 'snapshot delete brief');
    }
    if (k === 6) {
      await snapshotCmd(t, ['rollback', img, 'old', '--wait', '--json'], 'rollback to old (an older user snapshot) --wait');
      model.rollback('old');
      await apply(srv, model, randomOps(SIZE, 10));
    }
    if (k === 9) {
      await snapshotCmd(t, ['snapshot', 'delete', img, 'old'], 'snapshot delete old');
      await apply(srv, model, randomOps(SIZE, 5));
    }
    const offline = k === 8;
    const live = await readAll(srv, 'disk', SIZE);
    if (offline) t.equal(await srv.stop(), 0, 'server stopped for the offline backup');
    const mark = `b${k}`;
    model.snapshot(mark);
    const j = await json<Job>(['backup', 'create', img, '--repo', repo, '--wait', ...extra]);
    if (offline) srv = await startServer({ dir, images: ['disk.img'] });
    const content = await readAll(srv, `disk@${j.snapshot}`, SIZE);
    t.ok(content.equals(live), `backup ${k}${offline ? ' (offline)' : ''}: disk@${j.snapshot} equals the live volume before the backup`);
    t.match(j, { state: 'done', autoSnapshot: true, parent: k === 0 ? null : backups.at(-1)!.id }, `backup ${k}: done, ${k === 0 ? 'full' : 'incremental from the previous backup'}`);
    const st = j.result!.stats;
    if (prevMark === null) {
      t.equal(st.chunksChanged, NCHUNKS, `backup 0 is full: ${st.chunksChanged} chunks`);
    } else {
      const written = model.written(prevMark, mark).size;
      t.ok(st.chunksChanged <= 1.1 * written, `backup ${k}: ${st.chunksChanged} chunks read <= 1.1 x ${written} written since the previous backup's snapshot`);
      t.ok(st.chunksChanged < NCHUNKS, `backup ${k}: not a full read (${st.chunksChanged} of ${NCHUNKS})`);
    }
    backups.push({ id: j.backup, content });
    prevMark = mark;
  }
  const list = await json<{ id: string; parent: string | null }[]>(['backup', 'list', repo, ...extra]);
  t.same(
    list.map((b) => [b.id, b.parent]),
    backups.map((b, i) => [b.id, i === 0 ? null : backups[i - 1]!.id]),
    'list: 11 backups, each the parent of the next',
  );
  for (const [i, b] of backups.entries()) await restoreEquals(t, repo, b.id, extra, dir, b.content, `backup ${i}`);
  const v = await cli(['backup', 'verify', repo, '--read-data', '--json', ...extra]);
  t.equal(v.code, 0, `verify --read-data: exit 0${v.code ? ` (${lastErr(v.stderr)})` : ''}`);
  t.match(JSON.parse(v.stdout || '{}'), { ok: true, backups: 11 }, 'the repository verifies');
  const keyAt = extra.indexOf('--key-file');
  if (keyAt >= 0) {
    const out = path.join(dir, 'no-key.img');
    const withoutKey = [...extra.slice(0, keyAt), ...extra.slice(keyAt + 2)];
    expectError(t, await cli(['backup', 'restore', repo, backups.at(-1)!.id, out, ...withoutKey]), 26, 'BACKUP_KEY_REQUIRED', 'the repository is encrypted: a restore without the key');
  }
}

t.test('restores are exact over a chain: local directory, no encryption', async (t) => {
  const dir = makeTempDir('nbd-backup-chain-repo-');
  t.teardown(() => removeDir(dir));
  const repo = path.join(dir, 'repo');
  expectOk(t, await cli(['backup', 'init', repo]), 'init');
  await chain(t, repo, []);
});

t.test('restores are exact over a chain: S3 (radosgw), encrypted', async (t) => {
  const rgw = await startRgw(t);
  if (!rgw) return;
  const bucket = await rgw.bucket('backup-chain');
  const repo = `s3://${bucket}/chain`;
  const dir = makeTempDir('nbd-backup-chain-key-');
  t.teardown(() => removeDir(dir));
  const key = path.join(dir, 'key');
  fs.writeFileSync(key, crypto.randomBytes(32));
  const extra = ['--s3-endpoint', rgw.endpoint, '--s3-region', rgw.region, '--access-key-id', rgw.accessKeyId, '--secret-access-key', rgw.secretAccessKey, '--key-file', key];
  expectOk(t, await cli(['backup', 'init', repo, ...extra]), 'init s3:// --key-file');
  await chain(t, repo, extra);
});

/** Pack files (name -> bytes) and packidx names of a local repository. */
function packsOf(repo: string): { packs: Map<string, number>; idx: Set<string> } {
  const packs = new Map<string, number>();
  const pd = path.join(repo, 'packs');
  if (fs.existsSync(pd)) for (const sub of fs.readdirSync(pd)) for (const f of fs.readdirSync(path.join(pd, sub))) packs.set(f, fs.statSync(path.join(pd, sub, f)).size);
  const id = path.join(repo, 'packidx');
  return { packs, idx: new Set(fs.existsSync(id) ? fs.readdirSync(id) : []) };
}

/** Temporary files of a local repository (uploads not yet renamed into place; local backend) -> bytes. */
function tmpOf(repo: string): Map<string, number> {
  const d = path.join(repo, 'tmp');
  return new Map(fs.existsSync(d) ? fs.readdirSync(d).map((f) => [f, fs.statSync(path.join(d, f)).size] as const) : []);
}

async function chunkCount(repo: string): Promise<number> {
  const r = await openRepository(repo, {});
  try {
    return (await r.chunkMap()).size;
  } finally {
    await r.close();
  }
}

t.test('kills: kill -9 of the serving server mid-backup, 20 rounds; each resumes, completes, verifies and restores exactly; re-uploads stay within what is in flight', async (t) => {
  const SIZE = 20 * MiB;
  const dir = makeTempDir('nbd-backup-kills-');
  t.teardown(() => removeDir(dir));
  const img = path.join(dir, 'disk.img');
  const repo = path.join(dir, 'repo');
  fs.writeFileSync(img, crypto.randomBytes(SIZE));
  expectOk(t, await cli(['backup', 'init', repo]), 'init');
  const env = { NBD_TEST_BACKUP_READ_DELAY_MS: '150' };
  let srv = await startServer({ dir, images: ['disk.img'], env });
  t.teardown(() => srv.stop());
  const full = await json<Job>(['backup', 'create', img, '--repo', repo, '--wait']);
  t.match(full, { state: 'done', parent: null }, 'the full backup (not killed)');
  // What the pipeline can have in flight (src/backup/backup.ts defaults):
  // readConcurrency (4) x readSize (1 MiB), and uploadConcurrency (2) uploads,
  // each a pack of at most packSize (16 MiB) plus one blob and its trailer,
  // then its packidx (44 bytes an entry, plus the envelope). The open pack is
  // never uploaded before the kill, so it is not in the bound.
  const readInFlight = 4 * 1 * MiB;
  const maxEntries = Math.ceil((16 * MiB) / CHUNK) + 1;
  const packMax = 16 * MiB + CHUNK + 96 * maxEntries + 4096;
  const idxMax = 4 + 44 * maxEntries + 4096;
  const bound = readInFlight + 2 * (packMax + idxMax);
  const figures: string[] = [];
  let kills = 0;
  for (let round = 1; kills < 20; round++) {
    if (round > 40) {
      t.fail(`only ${kills} of 20 kills landed mid-backup in 40 rounds`);
      break;
    }
    // Every third round writes more than a pack, and is killed once a pack of it is indexed;
    // the others are killed once the job's cursor is > 0.
    const big = round % 3 === 0;
    const ops: Op[] = [];
    if (big) {
      const start = crypto.randomInt(SIZE / CHUNK - 1080) * CHUNK + crypto.randomInt(CHUNK);
      ops.push({ kind: 'write', off: start, len: 1070 * CHUNK, data: crypto.randomBytes(1070 * CHUNK) });
    }
    for (let i = 0; i < (big ? 10 : 60); i++) {
      const len = 1 + crypto.randomInt(48 * KiB);
      ops.push({ kind: 'write', off: crypto.randomInt(SIZE - len + 1), len, data: crypto.randomBytes(len) });
    }
    const model = new ChangeModel();
    await apply(srv, model, ops);
    const C = model.events[0]!.size; // fresh random data: exactly these chunks are new
    const k0 = await chunkCount(repo);
    const before = packsOf(repo);
    const tmpBefore = tmpOf(repo);
    const started = await json<Job>(['backup', 'create', img, '--repo', repo]);
    let at: string;
    if (big) {
      await until('a pack of this backup to be indexed', () => ([...packsOf(repo).idx].some((n) => !before.idx.has(n)) ? true : undefined));
      at = 'a pack indexed';
    } else {
      const j = await until('the job cursor > 0', async () => (await jobs(img)).find((x) => x.id === started.id && x.state === 'running' && x.done > 0));
      at = `cursor ${j.done}/${j.total}`;
    }
    await srv.stop('SIGKILL');
    const midway = readManifest(img)?.jobs?.find((j) => j.id === started.id)?.state === 'running' && !fs.existsSync(path.join(repo, 'backups', started.backup));
    const k1 = await chunkCount(repo);
    const atKill = packsOf(repo);
    // Uploads cut by the kill (a pack or packidx still being written).
    let partialBytes = 0;
    for (const [name, bytes] of tmpOf(repo)) if (!tmpBefore.has(name)) partialBytes += bytes;
    srv = await startServer({ dir, images: ['disk.img'], env });
    const done = await until('the resumed job to end', async () => (await jobs(img, true)).find((x) => x.id === started.id && x.state !== 'running'));
    t.match(done, { state: 'done', backup: started.backup }, `round ${round}: the job ${midway ? 'resumed after the kill and ' : ''}completed`);
    if (midway) {
      kills++;
      // Packs the killed run uploaded without their packidx: their chunks were sent again.
      let orphanBytes = 0;
      for (const [name, bytes] of atKill.packs) if (!before.packs.has(name) && !atKill.idx.has(name)) orphanBytes += bytes;
      const R = done.result!.stats.chunksNew;
      const extra = k1 - k0 + R - C;
      const resent = orphanBytes + partialBytes + extra * CHUNK;
      figures.push(`${round}:${resent}`);
      t.comment(`round ${round} (kill ${kills}, at ${at}): killed run indexed ${k1 - k0} chunks, resumed run stored ${R}, clean run stores ${C}; orphan pack bytes ${orphanBytes}, cut uploads ${partialBytes} bytes; re-uploaded ${resent} bytes`);
      t.equal(extra, 0, `round ${round}: the resumed run stored no chunk the killed run had indexed (${k1 - k0} + ${R} = ${C})`);
      t.ok(resent <= bound, `round ${round}: re-uploaded ${resent} bytes <= ${bound} in flight`);
    } else {
      t.comment(`round ${round}: the backup completed before the kill landed; not counted`);
    }
    const v = await cli(['backup', 'verify', repo, '--read-data', '--json']);
    t.equal(v.code, 0, `round ${round}: verify --read-data exit 0${v.code ? ` (${lastErr(v.stderr)})` : ''}`);
    const expected = await readAll(srv, `disk@${started.snapshot}`, SIZE);
    await restoreEquals(t, repo, started.backup, [], dir, expected, `round ${round}`);
  }
  t.comment(`re-uploaded bytes per killed round (round:bytes): ${figures.join(' ')}`);
});
