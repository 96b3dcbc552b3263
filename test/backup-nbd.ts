// NBD on both ends: a backup read from an NBD export (NbdChunkSource), and
// restores written to an NBD export (NbdTarget) whose zero runs go out as
// NBD_CMD_WRITE_ZEROES, so a target full of old data ends up byte-exact.
// Servers: nbdkit's file plugin (an independent implementation) and this
// project's own server.
import t, { type Test } from 'tap';
import { spawn, type ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { backup, initRepository, NbdChunkSource, NbdTarget, restore, runsOf } from '../src/backup';
import type { NbdError } from '../src/errors';
import { TestVolume, waitFor } from './fixtures/backup-volume';
import { startServer, tempDirs } from './fixtures/server';
import { requireTools } from './fixtures/tools';

const KiB = 1024;
const MiB = 1024 * KiB;
const CHUNK = 64 * KiB;
const makeTempDir = tempDirs(t);

/** nbdkit serving `file` on a unix socket, stopped at teardown. */
async function nbdkit(t: Test, file: string, extra: string[] = []): Promise<string> {
  const sock = `${file}.sock`;
  const p: ChildProcess = spawn('nbdkit', ['-f', '-U', sock, ...extra, 'file', file], { stdio: 'ignore' });
  t.teardown(() => {
    p.kill('SIGTERM');
  });
  await waitFor(() => fs.existsSync(sock), 'nbdkit to listen');
  return `nbd+unix:///?socket=${sock}`;
}

async function roundTrip(t: Test, serve: (file: string) => Promise<string>): Promise<void> {
  const dir = makeTempDir('nbd-backup-nbd-');
  const vol = new TestVolume(dir, 16 * MiB, CHUNK);
  vol.randomOps(60);
  const s0 = vol.snapshot(dir);
  const repo = await initRepository(path.join(dir, 'repo'));
  t.teardown(() => repo.close());

  // Full backup read over NBD.
  let src = await NbdChunkSource.open(await serve(s0.copy), { chunkSize: CHUNK, volume: 'disk' });
  t.equal(src.size, 16 * MiB, 'the source reports the export size');
  const b0 = await backup(repo, src, { packSize: 512 * KiB });
  await src.close();
  // Incremental read over NBD with a change map.
  vol.randomOps(30);
  const s1 = vol.snapshot(dir);
  src = await NbdChunkSource.open(await serve(s1.copy), { chunkSize: CHUNK, volume: 'disk', runs: runsOf(s1.changed) });
  const b1 = await backup(repo, src, { packSize: 512 * KiB, parent: b0.id });
  await src.close();
  t.equal(b1.stats.bytesRead, s1.changed.length * CHUNK, 'the incremental reads only the changed chunks');

  for (const [b, copy] of [
    [b0, s0.copy],
    [b1, s1.copy],
  ] as const) {
    // A target full of old data: zero runs must be written as zeros.
    const target = path.join(dir, `target-${b.id}.img`);
    fs.writeFileSync(target, randomBytes(16 * MiB));
    await restore(repo, b.id, new NbdTarget(await serve(target)));
    t.ok(fs.readFileSync(target).equals(fs.readFileSync(copy)), `backup ${b.parent ? 'incremental' : 'full'} restored over NBD is byte-exact`);
  }

  // A target that is too small is refused before anything is written.
  const small = path.join(dir, 'small.img');
  fs.writeFileSync(small, Buffer.alloc(MiB, 7));
  try {
    await restore(repo, b0.id, new NbdTarget(await serve(small)));
    t.fail('restore into a too small export');
  } catch (err) {
    t.equal((err as NbdError).code, 'BAD_SIZE', 'a too small export: BAD_SIZE');
  }
  t.ok(fs.readFileSync(small).equals(Buffer.alloc(MiB, 7)), 'and it is left untouched');
}

t.test('nbdkit file plugin', async (t) => {
  if (!requireTools(t, ['nbdkit'])) return;
  await roundTrip(t, (file) => nbdkit(t, file));
});

t.test("this project's server", async (t) => {
  await roundTrip(t, async (file) => {
    const srv = await startServer({ images: [file], dir: makeTempDir('nbd-srv-') });
    t.teardown(() => srv.stop());
    return srv.uri('');
  });
});

t.test('an unreachable NBD target gets NBD_CONNECT_FAILED', async (t) => {
  const dir = makeTempDir('nbd-backup-nbd-bad-');
  try {
    await NbdChunkSource.open(`nbd+unix:///?socket=${path.join(dir, 'none.sock')}`, { chunkSize: CHUNK, volume: 'x' });
    t.fail('connected to nothing');
  } catch (err) {
    t.equal((err as NbdError).code, 'NBD_CONNECT_FAILED');
  }
});
