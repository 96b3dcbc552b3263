// Orphan journals must never be called safe to remove while a volume may
// still replay them (regression tests from an adversarial review; fixed in
// native/binding/snapshot_methods.cc, src/journals.ts, write_journal.cc):
//
//   A. `serve disk.img` with a relative path: the journal's owner record is
//      the image's absolute path, so `journal list` from any directory finds
//      the volume's journal.state and does not list the live journal.
//   B. the image and IMAGE.nbd/ moved with a journal pending: `journal list`
//      may list it, but only as "volume not found ... remove only if that
//      volume is gone" (unknown), never as safe; the moved volume replays it.
//   C. the OLDER superblock slot damaged (its version field): the volume
//      opens from the intact current slot (the CRC is checked before the
//      version), and replays what the journal holds.
import t, { type Test } from 'tap';
import { spawn, type ChildProcess } from 'node:child_process';
import * as crypto from 'node:crypto';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { cli, expectOk } from './fixtures/cli-expect';
import { readExport } from './fixtures/export-io';
import { journalState, pendingEntries } from './fixtures/journal';
import { RawClient } from './fixtures/raw-client';
import { CLI, makeTempDir, removeDir, startServer } from './fixtures/server';

const KiB = 1024;
const PAUSED = { NBD_TEST_FIRST_WRITE_DELAY_MS: '120000' };

const dirs: string[] = [];
t.teardown(() => dirs.forEach(removeDir));

function newDir(): string {
  const d = makeTempDir('nbd-review-');
  dirs.push(d);
  return d;
}

function newJournalDir(): string {
  const d = fs.mkdtempSync(path.join(fs.existsSync('/dev/shm') ? '/dev/shm' : '/tmp', 'nbd-review-j-'));
  dirs.push(d);
  return d;
}

/** `serve IMAGE` with IMAGE exactly as given (relative to cwd), as a user types it. */
async function serveRelative(t: Test, cwd: string, image: string, env: NodeJS.ProcessEnv): Promise<{ socket: string; proc: ChildProcess }> {
  const socket = path.join(cwd, 'nbd.sock');
  const proc = spawn(process.execPath, [CLI, 'serve', image, '--size', '16M', '--socket', socket, '--log-level', 'warn'], {
    cwd,
    stdio: ['ignore', 'pipe', 'pipe'],
    env: { ...process.env, ...env },
  });
  const exited = new Promise<void>((r) => proc.once('exit', () => r()));
  t.teardown(async () => {
    if (proc.exitCode === null && proc.signalCode === null) proc.kill('SIGKILL');
    await exited;
  });
  await new Promise<void>((resolve, reject) => {
    let out = '';
    proc.stdout!.on('data', (d: Buffer) => {
      out += d.toString();
      if (out.includes('{"ready"')) resolve();
    });
    proc.once('exit', (code) => reject(new Error(`serve exited with ${code} before ready`)));
  });
  return { socket, proc };
}

function orphansNamed(stdout: string): string[] {
  return (JSON.parse(stdout) as { orphans: { path: string }[] }).orphans.map((o) => o.path);
}

t.test('A: a relative image path: `journal list` from another cwd does not call the live, pending journal an orphan', async (t) => {
  const dir = newDir();
  const J = newJournalDir();
  const env = { ...PAUSED, NBD_JOURNAL_DIR: J };
  const srv = await serveRelative(t, dir, 'disk.img', env);
  const img = path.join(dir, 'disk.img');
  expectOk(t, await cli(['snapshot', 'create', img, 's1'], env), 'snapshot create s1');
  const c = await RawClient.connect(srv.socket);
  await c.go('disk');
  t.equal((await c.write(0, crypto.randomBytes(4 * KiB))).error, 0, 'a first write, acknowledged (queued: the thread is paused)');
  await c.disconnect();
  const st = journalState(img);
  t.ok(st && fs.existsSync(st.path), 'journal.state names the journal');
  t.ok(st && pendingEntries(fs.readFileSync(st.path)).length > 0, 'the journal holds the acknowledged write');
  // cli() runs in the test runner's cwd (the repo), not in `dir`.
  const list = await cli(['journal', 'list', '--json'], env);
  expectOk(t, list, 'journal list');
  t.notOk(st && orphansNamed(list.stdout).includes(st.path), 'journal list does not call the journal journal.state names an orphan');
});

t.test('B: image and IMAGE.nbd/ moved with a journal pending: never called safe to remove, and the volume replays it', async (t) => {
  const dir = newDir();
  const J = newJournalDir();
  const img = path.join(dir, 'disk.img');
  const content = crypto.randomBytes(4 * 1024 * KiB);
  fs.writeFileSync(img, content);
  let srv = await startServer({ dir, env: { ...PAUSED, NBD_JOURNAL_DIR: J } });
  expectOk(t, await cli(['snapshot', 'create', img, 's1'], { NBD_JOURNAL_DIR: J }), 'snapshot create s1');
  const w = crypto.randomBytes(4 * KiB);
  const c = await RawClient.connect(srv.socket);
  await c.go('disk');
  t.equal((await c.write(64 * KiB, w)).error, 0, 'a first write, acknowledged (queued)');
  await c.disconnect();
  await srv.stop('SIGKILL');
  const moved = path.join(dir, 'moved.img');
  fs.renameSync(img, moved);
  fs.renameSync(`${img}.nbd`, `${moved}.nbd`);
  const st = journalState(moved);
  t.ok(st && fs.existsSync(st.path), 'the moved volume\'s journal.state names the journal');
  const list = await cli(['journal', 'list', '--json'], { NBD_JOURNAL_DIR: J });
  expectOk(t, list, 'journal list');
  const listed = (JSON.parse(list.stdout) as { orphans: { path: string; unknown?: boolean; why: string }[] }).orphans.find((o) => o.path === st?.path);
  t.ok(!listed || (listed.unknown === true && /not found/.test(listed.why)), `journal list never calls the pending journal safe to remove (${listed?.why ?? 'not listed'})`);
  // It was pending: serving the moved volume replays it.
  srv = await startServer({ dir, images: ['moved.img'], env: { NBD_JOURNAL_DIR: J } });
  t.teardown(() => srv.stop('SIGKILL'));
  const r = await readExport(srv.socket, 'moved', 64 * KiB, 4 * KiB);
  t.ok(r.data?.equals(w), 'the moved volume replays the journal: the acknowledged write is there');
  t.equal(await srv.stop('SIGTERM'), 0, 'graceful stop');
});

// C. The stale superblock slot damaged (its version field; magic intact),
//    the current slot intact: the journal must open from the current slot
//    (write_journal.hh: "the valid one with the higher generation wins").
//    WriteJournal::load_super checks the version BEFORE the CRC and returns
//    at once, so the volume refuses to open (JOURNAL_CORRUPT) and the error
//    says the only way out is `journal discard` (losing what it holds).
t.test('C: damage to the stale superblock slot only: the journal still opens from the current slot', async (t) => {
  const dir = newDir();
  const J = newJournalDir();
  const img = path.join(dir, 'disk.img');
  let srv = await startServer({ dir, size: '16M', env: { NBD_JOURNAL_DIR: J } });
  expectOk(t, await cli(['snapshot', 'create', img, 's1'], { NBD_JOURNAL_DIR: J }), 'snapshot create s1');
  const c = await RawClient.connect(srv.socket);
  await c.go('disk');
  t.equal((await c.write(0, crypto.randomBytes(4 * KiB))).error, 0, 'a first write');
  t.equal((await c.cmd(0x3 /* FLUSH */, 0, 0, 0)).error, 0, 'FLUSH: applied, checkpoint written (second superblock slot)');
  await c.disconnect();
  await srv.stop('SIGKILL');
  const st = journalState(img);
  if (!st) return t.fail('journal.state names a journal');
  const j = fs.readFileSync(st.path);
  const gen = (slot: number) => j.readBigUInt64LE(slot + 32);
  t.ok(j.subarray(0, 8).toString() === 'NBDJRNL1' && j.subarray(2048, 2056).toString() === 'NBDJRNL1', 'both slots hold a superblock');
  const stale = gen(0) < gen(2048) ? 0 : 2048;
  const fd = fs.openSync(st.path, 'r+');
  fs.writeSync(fd, Buffer.from([7, 0, 0, 0]), 0, 4, stale + 8); // the stale slot's version field
  fs.closeSync(fd);
  srv = await startServer({ dir, env: { NBD_JOURNAL_DIR: J } }).catch((err: Error) => {
    t.fail(`the volume opens from the intact current slot: ${err.message.split('\n').filter((l) => /error:/.test(l)).join(' ')}`);
    return undefined as never;
  });
  if (!srv) return;
  t.pass('the volume opens from the intact current slot');
  t.equal(await srv.stop('SIGTERM'), 0, 'graceful stop');
});
