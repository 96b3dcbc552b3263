// What another local user can do to a served volume: nothing (issue 15,
// defects 4-6). The server runs as root under umask 000 (the loosest a
// process can have) with its image in a directory everyone may enter; the
// unprivileged user `nobody` (runuser) then tries the control socket, the
// snapshot stores and the shared paths an earlier version used.
//
// Needs root (to run commands as `nobody` and to plant files owned by it):
// without it the tests skip, and under NBD_STRICT_TESTS=1 fail.
import t, { type Test } from 'tap';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { exec, type ExecResult } from './fixtures/exec';
import { writeExport } from './fixtures/export-io';
import { journalState } from './fixtures/journal';
import { CLI, logLines, startServer, tempDirs, type RunningServer } from './fixtures/server';
import { STRICT } from './fixtures/tools';
import { lastLine } from './fixtures/cli-expect';

const MiB = 1024 * 1024;
const NOBODY = 65534;
const EUID = process.geteuid?.() ?? 0;

// Every process this file starts inherits it: files the server creates get
// exactly the mode it asks for.
process.umask(0o000);

const makeTempDir = tempDirs(t);

/** True when the test can act as root and as `nobody`; otherwise skips (fails when strict). */
function canSwitchUsers(tt: Test): boolean {
  if (process.getuid?.() === 0 && fs.existsSync('/usr/sbin/runuser')) return true;
  const msg = 'needs root and runuser to act as user nobody';
  if (STRICT) tt.fail(`${msg}; NBD_STRICT_TESTS=1 forbids skipping`);
  else tt.plan(0, `SKIP ${msg}`);
  return false;
}

/**
 * Runs a command as `nobody` (no supplementary groups), with a clean
 * environment: tap's NODE_OPTIONS loaders write where nobody may not.
 */
function asNobody(cmd: string, args: string[]): Promise<ExecResult> {
  // `env -i`: tap's process tracking adds NODE_OPTIONS (--import of its
  // processinfo hook) to every child's environment, whatever env we pass;
  // as nobody that hook cannot write .tap/processinfo and prints a stack
  // trace after the command's own last line.
  const path = process.env.PATH ?? '/usr/bin:/bin';
  return exec('/usr/sbin/runuser', ['-u', 'nobody', '--', '/usr/bin/env', '-i', `PATH=${path}`, 'LANG=C', cmd, ...args], {
    timeoutMs: 120_000,
    env: { PATH: path, LANG: 'C' },
  });
}

function cli(args: string[]): Promise<ExecResult> {
  return exec(process.execPath, [CLI, ...args], { timeoutMs: 120_000 });
}


/** A served 4 MiB image in a fresh directory that every user may enter (0755), as a shared images directory is. */
async function serveShared(prefix: string, args: string[] = []): Promise<{ srv: RunningServer; img: string; meta: string }> {
  const dir = makeTempDir(prefix);
  fs.chmodSync(dir, 0o755);
  const srv = await startServer({ dir, size: '4M', args });
  t.teardown(() => srv.stop());
  const img = path.join(dir, 'disk.img');
  return { srv, img, meta: `${img}.nbd` };
}

/** Every path under `root` (itself included) with its type and permission bits. */
function walk(root: string): { p: string; kind: 'dir' | 'file' | 'socket' | 'other'; mode: number }[] {
  const out: { p: string; kind: 'dir' | 'file' | 'socket' | 'other'; mode: number }[] = [];
  const visit = (p: string) => {
    const st = fs.lstatSync(p);
    const kind = st.isDirectory() ? 'dir' : st.isFile() ? 'file' : st.isSocket() ? 'socket' : 'other';
    out.push({ p, kind, mode: st.mode & 0o7777 });
    if (kind === 'dir') for (const n of fs.readdirSync(p)) visit(path.join(p, n));
  };
  visit(root);
  return out;
}

async function snapshotNames(img: string): Promise<string[]> {
  const r = await cli(['snapshot', 'list', img, '--json']);
  if (r.code !== 0) throw new Error(`snapshot list failed: ${r.stderr}`);
  return (JSON.parse(r.stdout) as { name: string }[]).map((s) => s.name);
}

// ---- Defect 5: snapshot stores are private -----------------------------------

t.test('IMAGE.nbd/ is 0700 and everything in it 0600 under umask 000; nobody cannot read a store', async (t) => {
  if (!canSwitchUsers(t)) return;
  // A slow merge (1 MiB at 4 KiB/s), so its job file is there to check.
  const { srv, img, meta } = await serveShared('nbd-modes-', ['--merge-rate', '4K']);
  const old = Buffer.alloc(MiB, 0x5a);
  t.same(await writeExport(srv.socket, 'disk', [[0, old]]), [0], 'wrote the data the snapshot keeps');
  const created = await cli(['snapshot', 'create', img, 's1']);
  t.equal(created.code, 0, `snapshot create (${lastLine(created.stderr)})`);
  t.same(await writeExport(srv.socket, 'disk', [[0, Buffer.alloc(MiB, 0xa5)]]), [0], 'overwrote it: the old data is in the store now');
  const created2 = await cli(['snapshot', 'create', img, 's2']);
  t.equal(created2.code, 0, `a second snapshot (${lastLine(created2.stderr)})`);
  const rolled = await cli(['rollback', img, 's1']);
  t.equal(rolled.code, 0, `rollback (${lastLine(rolled.stderr)})`);

  const entries = walk(meta);
  t.ok(entries.some((e) => /snap-\d+\.snap$/.test(e.p)), 'a snapshot store exists');
  t.ok(entries.some((e) => e.p.endsWith('manifest.json')), 'the manifest exists');
  t.ok(entries.some((e) => e.p.endsWith('history.jsonl')), 'the history exists');
  t.ok(entries.some((e) => /rollback-\d+\.merge$/.test(e.p)), 'the running merge job file exists');
  for (const e of entries) {
    if (e.kind === 'dir') t.equal(e.mode, 0o700, `${path.relative(srv.dir, e.p)}/: mode 0700`);
    else if (e.kind === 'file') t.equal(e.mode, 0o600, `${path.relative(srv.dir, e.p)}: mode 0600`);
  }
  const store = entries.find((e) => /snap-1\.snap$/.test(e.p))!.p;
  const read = await asNobody('/bin/cat', [store]);
  t.not(read.code, 0, `nobody cannot read ${path.basename(store)} (${lastLine(read.stderr)})`);
  t.equal(read.stdout, '', 'and got no byte of it');
  const list = await asNobody('/bin/ls', [meta]);
  t.not(list.code, 0, 'nobody cannot list IMAGE.nbd/');
});

t.test('an IMAGE.nbd/ left loose by an older version is made private when the volume opens', async (t) => {
  if (!canSwitchUsers(t)) return;
  const dir = makeTempDir('nbd-modes-old-');
  fs.chmodSync(dir, 0o755);
  const first = await startServer({ dir, size: '4M' });
  const img = path.join(dir, 'disk.img');
  const meta = `${img}.nbd`;
  const created = await cli(['snapshot', 'create', img, 's1']);
  t.equal(created.code, 0, `snapshot create (${lastLine(created.stderr)})`);
  await first.stop();
  // What an earlier version left: a world-readable directory and files.
  fs.chmodSync(meta, 0o755);
  for (const n of fs.readdirSync(meta)) fs.chmodSync(path.join(meta, n), 0o644);
  const srv = await startServer({ dir, size: '4M', args: ['--log-level', 'info'] });
  t.teardown(() => srv.stop());
  for (const e of walk(meta)) {
    if (e.kind === 'dir') t.equal(e.mode, 0o700, `${path.relative(dir, e.p)}/: tightened to 0700`);
    else if (e.kind === 'file') t.equal(e.mode, 0o600, `${path.relative(dir, e.p)}: tightened to 0600`);
  }
  t.ok(
    logLines(srv).some((l) => /made private/.test(l.msg ?? '')),
    'the server logged that it tightened the modes',
  );
  const read = await asNobody('/bin/cat', [path.join(meta, 'manifest.json')]);
  t.not(read.code, 0, 'nobody cannot read the manifest');
});

// ---- Defect 4: the control socket is the server's user's only ----------------

t.test('control socket: private under umask 000, and nobody cannot create a snapshot through it', async (t) => {
  if (!canSwitchUsers(t)) return;
  const { img, meta } = await serveShared('nbd-control-');
  const sock = path.join(meta, 'control.sock');
  const st = fs.lstatSync(sock);
  t.ok(st.isSocket(), 'control.sock is a socket');
  t.equal(st.mode & 0o777, 0o600, 'control.sock: mode 0600');
  const evil = await asNobody(process.execPath, [CLI, 'snapshot', 'create', img, 'evil']);
  t.not(evil.code, 0, `nobody's snapshot create fails (${lastLine(evil.stderr)})`);
  t.notOk((await snapshotNames(img)).includes('evil'), 'no snapshot "evil" exists');
  const mine = await cli(['snapshot', 'create', img, 'mine']);
  t.equal(mine.code, 0, `root's snapshot create still works (${lastLine(mine.stderr)})`);
});

t.test('control socket: a peer of another uid is refused even when the modes let it connect (SO_PEERCRED)', async (t) => {
  if (!canSwitchUsers(t)) return;
  const { srv, img, meta } = await serveShared('nbd-peercred-');
  // Loosen by hand what the server made private, as a careless admin (or a
  // directory owned by someone else) could: only the credential check remains.
  fs.chmodSync(meta, 0o711);
  fs.chmodSync(path.join(meta, 'control.sock'), 0o777);
  const evil = await asNobody(process.execPath, [CLI, 'snapshot', 'create', img, 'evil']);
  t.equal(evil.code, 18, `nobody's request is refused: exit 18 (${lastLine(evil.stderr)})`);
  t.match(lastLine(evil.stderr), /\[CONTROL_DENIED\]$/, `CONTROL_DENIED is the last stderr line (stderr: ${JSON.stringify(evil.stderr.slice(-400))})`);
  t.notOk((await snapshotNames(img)).includes('evil'), 'no snapshot "evil" exists');
  t.ok(
    logLines<{ uid?: number }>(srv).some((l) => l.uid === NOBODY && /refused/.test(l.msg ?? '')),
    'the server logged the refused peer and its uid',
  );
  const mine = await cli(['snapshot', 'create', img, 'mine']);
  t.equal(mine.code, 0, `root's snapshot create still works (${lastLine(mine.stderr)})`);
});

// ---- Defect 6: the first-write journal directory is per user and verified ----

/**
 * Serves a fresh image with the journal directory left at its default, under
 * `shm` (a stand-in for /dev/shm: world-writable and sticky), makes one first
 * write after a snapshot (which creates the volume's journal) and returns
 * where the journal went.
 */
async function journalWithDefaultDir(tt: Test, shm: string, prefix: string): Promise<{ journal: string; meta: string; srv: RunningServer }> {
  const dir = makeTempDir(prefix);
  const srv = await startServer({ dir, size: '4M', env: { NBD_JOURNAL_DIR: '', NBD_TEST_SHM_DIR: shm } });
  tt.teardown(() => srv.stop());
  const img = path.join(dir, 'disk.img');
  const created = await cli(['snapshot', 'create', img, 's1']);
  tt.equal(created.code, 0, `snapshot create (${lastLine(created.stderr)})`);
  tt.same(await writeExport(srv.socket, 'disk', [[0, Buffer.alloc(64 * 1024, 1)]]), [0], 'a first write after the snapshot');
  const st = journalState(img);
  tt.ok(st, 'journal.state names a journal');
  return { journal: st?.path ?? '', meta: fs.realpathSync(`${img}.nbd`), srv };
}

function fakeShm(): string {
  const shm = makeTempDir('nbd-fake-shm-');
  fs.chmodSync(shm, 0o1777);
  return shm;
}

t.test('journal directory: per user by default, created 0700', async (t) => {
  if (!canSwitchUsers(t)) return;
  const shm = fakeShm();
  const own = path.join(shm, `node-nbd-server-${EUID}`);
  const { journal } = await journalWithDefaultDir(t, shm, 'nbd-jdir-default-');
  t.equal(path.dirname(journal), own, `the journal is in ${path.basename(own)}/`);
  const st = fs.lstatSync(own);
  t.ok(st.isDirectory(), 'a directory');
  t.equal(st.uid, EUID, 'owned by the server\'s user');
  t.equal(st.mode & 0o777, 0o700, 'mode 0700');
});

t.test('journal directory: a directory planted by nobody at the predictable name is not used', async (t) => {
  if (!canSwitchUsers(t)) return;
  const shm = fakeShm();
  const planted = path.join(shm, `node-nbd-server-${EUID}`);
  fs.mkdirSync(planted, { mode: 0o777 });
  fs.chownSync(planted, NOBODY, NOBODY);
  const { journal, meta, srv } = await journalWithDefaultDir(t, shm, 'nbd-jdir-planted-');
  t.equal(path.dirname(journal), meta, 'the journal went to IMAGE.nbd/ instead');
  t.same(fs.readdirSync(planted), [], 'nothing was written in the planted directory');
  t.ok(
    logLines<{ dir?: string }>(srv).some((l) => l.dir === planted && /journal directory refused/.test(l.msg ?? '')),
    'the server logged why it refused the directory',
  );
});

t.test('journal directory: a symlink planted at the predictable name is not followed', async (t) => {
  if (!canSwitchUsers(t)) return;
  const shm = fakeShm();
  const target = makeTempDir('nbd-jdir-target-'); // root's own 0700 directory: a place we could write
  const planted = path.join(shm, `node-nbd-server-${EUID}`);
  fs.symlinkSync(target, planted);
  fs.lchownSync(planted, NOBODY, NOBODY);
  const { journal, meta } = await journalWithDefaultDir(t, shm, 'nbd-jdir-symlink-');
  t.equal(path.dirname(journal), meta, 'the journal went to IMAGE.nbd/ instead');
  t.same(fs.readdirSync(target), [], 'nothing was written where the symlink points');
  t.ok(fs.lstatSync(planted).isSymbolicLink(), 'the symlink is left as it was');
});
