// Bad input gets a clear error with a stable code: a location that is not a
// repository, init over an existing one, a wrong or missing key, an
// unknown backup or parent, an empty prune policy; for S3 missing and wrong
// credentials, a missing bucket and an unreachable endpoint. A failed
// backup leaves no manifest.
import t, { type Test } from 'tap';
import { randomBytes } from 'node:crypto';
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as path from 'node:path';
import { backup, FileChunkSource, FileTarget, initRepository, listBackups, openRepository, prune, restore } from '../src/backup';
import type { NbdError } from '../src/errors';
import { GatedSource, waitFor } from './fixtures/backup-volume';
import { startRgw } from './fixtures/rgw';
import { listLocks } from '../src/backup/locks';
import { tempDirs } from './fixtures/server';

const makeTempDir = tempDirs(t);
const tap = t;

async function code(p: Promise<unknown>): Promise<string> {
  try {
    await p;
    return 'resolved';
  } catch (err) {
    return (err as NbdError).code ?? String(err);
  }
}

async function expectCode(t: Test, p: Promise<unknown>, want: string, what: string): Promise<void> {
  t.equal(await code(p), want, what);
}

t.test('local: not a repository, exists, keys, unknown backup', async (t) => {
  const d = makeTempDir('nbd-bad-');
  await expectCode(t, openRepository(path.join(d, 'nope')), 'REPO_NOT_FOUND', 'a missing directory is not a repository');
  await expectCode(t, openRepository(d), 'REPO_NOT_FOUND', 'an empty directory is not a repository');
  fs.writeFileSync(path.join(d, 'file'), 'x');
  await expectCode(t, openRepository(path.join(d, 'file')), 'REPO_NOT_FOUND', 'a file is not a repository');
  fs.mkdirSync(path.join(d, 'other'));
  fs.writeFileSync(path.join(d, 'other', 'config'), '{"format":"something else"}\n');
  await expectCode(t, openRepository(path.join(d, 'other')), 'REPO_NOT_FOUND', "someone else's config file is not a repository");
  fs.mkdirSync(path.join(d, 'damaged'));
  const ours = path.join(d, 'damaged', 'r');
  (await initRepository(ours)).close();
  const cfg = fs.readFileSync(path.join(ours, 'config'), 'utf8');
  fs.writeFileSync(path.join(ours, 'config'), cfg.replace('"version":1', '"version":2'));
  await expectCode(t, openRepository(ours), 'REPO_CORRUPT', 'a damaged config fails its checksum');

  const key = path.join(d, 'key');
  const wrong = path.join(d, 'wrong');
  fs.writeFileSync(key, randomBytes(32));
  fs.writeFileSync(wrong, randomBytes(32));
  const repoDir = path.join(d, 'repo');
  (await initRepository(repoDir, { keyFile: key })).close();
  await expectCode(t, initRepository(repoDir, { keyFile: key }), 'REPO_EXISTS', 'init over a repository');
  await expectCode(t, openRepository(repoDir), 'BACKUP_KEY_REQUIRED', 'an encrypted repository without a key');
  await expectCode(t, openRepository(repoDir, { keyFile: wrong }), 'BACKUP_KEY_WRONG', 'a wrong key');
  await expectCode(t, openRepository(repoDir, { keyFile: path.join(d, 'missing-key') }), 'BAD_ARGUMENT', 'a key file that does not exist');
  const plainDir = path.join(d, 'plain');
  (await initRepository(plainDir)).close();
  await expectCode(t, openRepository(plainDir, { keyFile: key }), 'BACKUP_KEY_WRONG', 'a key for an unencrypted repository');

  const repo = await openRepository(repoDir, { keyFile: key });
  t.teardown(() => repo.close());
  await expectCode(t, restore(repo, '20260101T000000Z-00000000', new FileTarget(path.join(d, 'out'))), 'BACKUP_NOT_FOUND', 'restore of an unknown backup');
  const img = path.join(d, 'disk.img');
  fs.writeFileSync(img, randomBytes(256 * 1024));
  const src = await FileChunkSource.open(img, { chunkSize: 65536 });
  await expectCode(t, backup(repo, src, { parent: '20260101T000000Z-00000000' }), 'BACKUP_NOT_FOUND', 'an incremental with an unknown parent');
  t.same(await listBackups(repo), [], 'the failed backup left no manifest');
  await src.close();
  await expectCode(t, prune(repo, {}), 'BAD_ARGUMENT', 'prune without a policy');
  await expectCode(t, FileChunkSource.open(path.join(d, 'nope.img'), { chunkSize: 65536 }), 'IMAGE_NOT_FOUND', 'a missing source image');
});

t.test('an aborted backup leaves no manifest and no lock', async (t) => {
  const d = makeTempDir('nbd-abort-');
  const img = path.join(d, 'disk.img');
  fs.writeFileSync(img, randomBytes(4 * 1024 * 1024));
  const repo = await initRepository(path.join(d, 'repo'));
  t.teardown(() => repo.close());
  const src = new GatedSource(await FileChunkSource.open(img, { chunkSize: 65536 }), 4);
  const ac = new AbortController();
  const p = backup(repo, src, { signal: ac.signal, readSize: 65536, readConcurrency: 2 });
  p.catch(() => undefined);
  await waitFor(() => src.reads > 4, 'the backup to block on a read');
  ac.abort();
  src.release();
  t.equal(await code(p), 'BACKUP_ABORTED', 'the backup rejects with BACKUP_ABORTED');
  await src.close();
  t.same(await listBackups(repo), [], 'no manifest');
  t.same(await listLocks(repo), [], 'no lock');
});

/** A TCP port on 127.0.0.1 that nothing listens on. */
async function closedPort(): Promise<number> {
  const srv = net.createServer();
  await new Promise<void>((r) => srv.listen(0, '127.0.0.1', r));
  const port = (srv.address() as net.AddressInfo).port;
  await new Promise((r) => srv.close(r));
  return port;
}

t.test('S3: credentials, bucket, endpoint', async (t) => {
  const g = await startRgw(t, tap);
  if (!g) return;
  const bucket = await g.bucket('bad-input');
  await expectCode(t, openRepository(`s3://${bucket}/none`, { s3: g.s3 }), 'REPO_NOT_FOUND', 'an empty prefix is not a repository');
  await expectCode(t, openRepository(`s3://no-such-bucket/x`, { s3: g.s3 }), 'REPO_NOT_FOUND', 'a missing bucket');
  await expectCode(t, initRepository(`s3://no-such-bucket/x`, { s3: g.s3 }), 'REPO_NOT_FOUND', 'init into a missing bucket');
  (await initRepository(`s3://${bucket}/r`, { s3: g.s3 })).close();
  await expectCode(t, openRepository(`s3://${bucket}/r`, { s3: { ...g.s3, secretAccessKey: 'wrong-secret-0000000000000000000000000000' } }), 'REPO_CREDENTIALS', 'a wrong secret key');
  await expectCode(t, openRepository(`s3://${bucket}/r`, { s3: { ...g.s3, accessKeyId: 'NOSUCHKEY0000000000', secretAccessKey: 'x' } }), 'REPO_CREDENTIALS', 'an unknown access key');

  // No credentials anywhere: no flags, no environment, no config files, no instance metadata.
  const saved = { ...process.env };
  t.teardown(() => {
    process.env = saved;
  });
  for (const k of Object.keys(process.env)) if (k.startsWith('AWS_')) delete process.env[k];
  process.env.AWS_EC2_METADATA_DISABLED = 'true';
  process.env.AWS_SHARED_CREDENTIALS_FILE = path.join(makeTempDir('nbd-aws-'), 'none');
  process.env.AWS_CONFIG_FILE = process.env.AWS_SHARED_CREDENTIALS_FILE;
  await expectCode(t, openRepository(`s3://${bucket}/r`, { s3: { endpoint: g.endpoint } }), 'REPO_CREDENTIALS', 'no credentials at all');
  process.env = saved;

  const port = await closedPort();
  await expectCode(t, openRepository(`s3://${bucket}/r`, { s3: { ...g.s3, endpoint: `http://127.0.0.1:${port}`, maxAttempts: 2 } }), 'REPO_UNREACHABLE', 'an endpoint nobody listens on');
  await expectCode(t, openRepository(`s3://${bucket}/r`, { s3: { ...g.s3, endpoint: 'http://no-such-host.invalid:9000', maxAttempts: 1 } }), 'REPO_UNREACHABLE', 'an endpoint that does not resolve');
  await expectCode(t, openRepository('ftp://host/x'), 'BAD_ARGUMENT', 'an unsupported URL scheme');
  await expectCode(t, openRepository('s3:///x'), 'BAD_ARGUMENT', 'an S3 URL without a bucket');
});
