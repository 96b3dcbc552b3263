#!/usr/bin/env node
// Kernel-path tests: the real Linux NBD client (nbd.ko + nbd-client), mkfs,
// mount, fsck and fio against node-nbd-server, inside user-mode Linux.
//
// The host kernel has no NBD driver; UML (Debian's user-mode-linux package)
// does. Each scenario boots its own `linux.uml` with the host filesystem as
// its root (hostfs), so one failure cannot poison the others. PID 1 in the
// guest is test/kernel/init.sh, which loads nbd.ko and runs the scenario's
// script from test/kernel/ (server, nbd-client, mkfs, mount, fio all run in
// the guest). The guest writes a step log and a verdict file into a
// per-scenario results dir on the host, then halts.
//
//   node tools/kernel-test.js                 run every scenario
//   node tools/kernel-test.js --list          list the scenarios
//   node tools/kernel-test.js --only REGEX    run the scenarios whose name matches
//   options: --jobs N (guests booted at once, default 2), --keep (keep the
//   results dirs of passing scenarios too; failing ones are always kept),
//   --cuts N (power cuts per power-loss scenario, default 50; also
//   NBD_POWER_CUTS), --seed N (seed of the power-loss scenarios)
//
// The power-loss scenarios are chains of boots on one disk, each ended by a
// kill -9 of the whole guest: see tools/kernel-power-loss.js.
//
// Ends with the plain line "N passed, N failed[, N skipped]"; exits 1 if any
// scenario failed. Missing system tools skip every scenario loudly (exit 0),
// or fail them under NBD_STRICT_TESTS=1.
'use strict';
const { spawn, spawnSync } = require('node:child_process');
const crypto = require('node:crypto');
const fs = require('node:fs');
const os = require('node:os');
const path = require('node:path');

const { runPowerLoss, DEFAULT_CUTS } = require('./kernel-power-loss');

const ROOT = path.resolve(__dirname, '..');
const CLI = path.join(ROOT, 'bin', 'node-nbd-server.js');
const GUEST_DIR = path.join(ROOT, 'test', 'kernel');
const STRICT = process.env.NBD_STRICT_TESTS === '1';
const UML_MEM = '1G';
const IO_LIMIT_AFTER_KILL = 60; // seconds: I/O after kill -9 of the server must fail within this

// ------------------------------------------------------------- scenarios

/**
 * name: unique; script: file in test/kernel/; env: KT_* for the guest;
 * timeout: seconds for the whole boot; gate: optional host-side check that
 * returns a skip reason (string) or null.
 */
function scenarios(opts = {}) {
  const list = [];
  for (const fsType of ['ext4', 'xfs']) {
    for (const transport of ['tcp', 'unix']) {
      for (const conns of [1, 4]) {
        list.push({
          name: `${fsType}-${transport}-${conns}conn`,
          description: `${fsType} on ${transport === 'tcp' ? 'TCP 127.0.0.1' : 'a unix socket'}, nbd-client -C ${conns}: mkfs, mount, fio verify (libaio, psync), files, detach, re-attach, fsck, checksums`,
          script: 'fs-cycle.sh',
          env: { KT_FS: fsType, KT_TRANSPORT: transport, KT_CONNS: conns, KT_SIZE: fsType === 'xfs' ? '512M' : '256M' },
          timeout: fsType === 'xfs' ? 420 : 300,
        });
      }
    }
  }
  list.push({
    name: 'read-only',
    description: 'ext4 made in an earlier step, then served --read-only (default address 127.0.0.1:10809): mount -o ro, checksums, writes fail (EROFS/EPERM), dd to the device fails, image unchanged',
    script: 'read-only.sh',
    env: { KT_FS: 'ext4', KT_TRANSPORT: 'tcp-default', KT_CONNS: 1, KT_SIZE: '128M' },
    timeout: 240,
  });
  for (const [transport, conns] of [
    ['tcp', 1],
    ['unix', 4],
  ]) {
    list.push({
      name: `kill-server-${transport}-${conns}conn`,
      description: `kill -9 of the server under I/O (${transport}, -C ${conns}, -t 10): I/O fails within ${IO_LIMIT_AFTER_KILL}s, restart, re-attach, fsck, synced files intact`,
      script: 'kill-server.sh',
      env: { KT_FS: 'ext4', KT_TRANSPORT: transport, KT_CONNS: conns, KT_SIZE: '256M', KT_IO_LIMIT: IO_LIMIT_AFTER_KILL },
      timeout: 300,
    });
  }
  list.push({
    name: 'snapshot',
    description: 'ext4 mounted on /dev/nbd0 (unix, -C 4): files, sync, online `snapshot create` while mounted, overwrite/delete/refill + sync; disk@NAME read-only on /dev/nbd1, mount -o ro,noload: old files match their checksums (also after more live writes), writes refused; live fsck clean; offline list and delete',
    script: 'snapshot.sh',
    env: { KT_FS: 'ext4', KT_TRANSPORT: 'unix', KT_CONNS: 4, KT_SIZE: '256M' },
    timeout: 300,
  });
  list.push({
    name: 'snapshot-eio',
    description: 'snapshot store on a device-mapper device that starts failing (dm-flakey error_writes, then the error target): host writes through /dev/nbd0 (unix, -C 2) all succeed; the snapshot that could not preserve is listed failed with an I/O-error reason and logged, its export reads EIO; an older snapshot not involved stays active and exact; another volume\'s snapshot stays exact; live data and the raw image hold every write; SIGTERM exits 0; the other volume\'s journal is removed (disk\'s drained one may stay: its journal.state is on the failing device and cannot be removed)',
    script: 'snapshot-eio.sh',
    env: { KT_FS: 'ext4', KT_TRANSPORT: 'unix', KT_CONNS: 2, KT_SIZE: '32M' },
    timeout: 300,
  });
  // Faults on the live image (its filesystem on a dm device), the snapshot
  // stores healthy: one scenario per path, each booted on its own.
  for (const [kcase, what] of [
    ['queued-eio', 'first writes queued (default --cow-journal). dm-flakey error_writes: writes acknowledged and applied, then the FLUSH fails and latches the image: every later FLUSH, FUA and write fails, reads fail with EIO (also once clean pages are dropped), no snapshot is failed, snapshot create fails, SIGTERM exits 1 and logs it. Error target: a queued write that cannot be applied stalls the queue (create/delete/rollback fail QUEUE_STALLED), a FUA write latches the image, SIGTERM keeps the journal; healed, a restart on the same kernel replays it and serves data that does not revert when clean pages are dropped; every write a FLUSH covered is on the image, the others hold old or new data; healthy snapshots exact'],
    ['queued-enospc', 'first writes queued, the image\'s filesystem full (ENOSPC, no latch): FLUSH/FUA fail, reads show the writes, create/delete/rollback fail QUEUE_STALLED; freeing space drains the queue while serving; a stall over SIGTERM (exit 0) is replayed at the next start; every acknowledged write on the image, snapshots exact'],
    ['inline', '--cow-journal 0: the preserve copy succeeds and the live write fails (FUA under dm-flakey: the image latches, every later request fails, also once the device heals, until a restart; ENOSPC on a full filesystem: no latch, the failed ranges are rewritten once there is room): NBD errors, no FLUSH succeeds after a failure, SIGTERM exits 1 naming the latched export only, snapshots exact; after a restart every write a FLUSH covered is on the image and the failed ranges can be rewritten'],
    ['merge', 'a rollback merge (--merge-rate 128K) while the live device fails (flakey, then error): the merge\'s FUA latches the image, the merge reports the error and retries, pending chunks still read the snapshot, the rest fails with EIO, nothing hangs; healed, the merge stays unfinished until a restart (SIGTERM exits 1), then finishes: live = snapshot + the writes that landed'],
    ['handdown', 'snapshot delete (hand-down from the stores) while every I/O to the live image fails: succeeds, the older snapshot exact, nothing lost'],
  ]) {
    list.push({
      name: `live-eio-${kcase}`,
      description: `live image on a failing device, snapshot stores healthy (python3-libnbd clients, unix socket): ${what}`,
      script: 'live-eio.sh',
      env: { KT_CASE: kcase, KT_TRANSPORT: 'unix', KT_CONNS: 1, KT_FS: 'ext4', KT_SIZE: '16M' },
      timeout: 300,
    });
  }
  list.push({
    name: 'rollback',
    description: 'ext4 on /dev/nbd0 (unix, -C 4): files, `snapshot create golden`, modify/delete/add, umount, online `rollback` (device stays attached), raw writes during the merge survive it, fsck, old files back, new files gone; history/jobs; auto-rollback=on-disconnect: detach rolls back (history policy:on-disconnect); auto-rollback=off: detach keeps the changes',
    script: 'rollback.sh',
    env: { KT_FS: 'ext4', KT_TRANSPORT: 'unix', KT_CONNS: 4, KT_SIZE: '1G' },
    timeout: 300,
  });
  list.push({
    name: 'attach-cli',
    description: 'node-nbd-server attach IMAGE /dev/nbd0 (no nbd-client): mkfs, mount, fio verify, detach, attach exits 0; again with -C 4: fsck, checksums, SIGTERM, exits 0',
    script: 'attach.sh',
    env: { KT_FS: 'ext4', KT_TRANSPORT: 'none', KT_CONNS: 1, KT_SIZE: '256M' },
    timeout: 300,
    // Gated on the commands: skipped ("attach: not implemented yet") while
    // `attach --help` / `detach --help` do not print their own usage.
    gate: () => (hasCommand('attach') && hasCommand('detach') ? null : 'attach: not implemented yet'),
  });
  // Two chains of power cuts (each its own disk and seed), so that --jobs 2
  // runs them side by side.
  const cuts = opts.cuts ?? DEFAULT_CUTS;
  const seed = opts.seed ?? crypto.randomInt(1, 2 ** 31 - 2);
  for (const i of [1, 2]) {
    list.push({
      name: `power-loss-${i}`,
      description: `${cuts} power cuts (kill -9 of the whole guest) at random moments of a workload on a volume whose image and IMAGE.nbd/ are on an ext4 on a ubd disk (journal in the guest's /dev/shm): random 4 KiB writes (FUA, zeroes, trims) on 2 connections, FLUSH, snapshot create + first-write burst, delete, rollback with slow merges; after each cut the guest boots again, serves the volume with no manual step and checks every snapshot and the live volume against a model of what must have survived`,
      kind: 'power-loss',
      cuts,
      seed: seed + i - 1,
      seedOffset: i - 1,
      gate: () => (spawnSync('/usr/bin/python3', ['-c', 'import nbd'], { timeout: 30_000 }).status === 0 ? null : 'python3-libnbd missing (/usr/bin/python3 -c "import nbd" fails)'),
      strictGate: true,
    });
  }
  return list;
}

// `node-nbd-server CMD --help` exits 0 and prints CMD's own usage. (commander
// prints the top-level help and exits 0 for an unknown command followed by
// --help, so the exit status alone proves nothing.)
function hasCommand(cmd) {
  const r = spawnSync(process.execPath, [CLI, cmd, '--help'], { encoding: 'utf8', timeout: 30_000 });
  return r.status === 0 && new RegExp(`^Usage: \\S+ ${cmd}\\b`, 'm').test(r.stdout);
}

// ----------------------------------------------------------------- tools

const EXTRA_PATH = ['/usr/local/sbin', '/usr/sbin', '/sbin'];

function which(name) {
  const dirs = (process.env.PATH || '').split(':').concat(EXTRA_PATH);
  for (const d of dirs) {
    if (!d) continue;
    const p = path.join(d, name);
    try {
      fs.accessSync(p, fs.constants.X_OK);
      return p;
    } catch {}
  }
  return null;
}

const TOOLS = [
  ['linux.uml', 'user-mode-linux'],
  ['busybox', 'busybox-static'],
  ['nbd-client', 'nbd-client'],
  ['mkfs.ext4', 'e2fsprogs'],
  ['e2fsck', 'e2fsprogs'],
  ['mkfs.xfs', 'xfsprogs'],
  ['xfs_repair', 'xfsprogs'],
  ['fio', 'fio'],
  ['timeout', 'coreutils'],
  ['sha256sum', 'coreutils'],
  ['blockdev', 'util-linux'],
  ['dmsetup', 'dmsetup'],
  ['losetup', 'mount'],
];

function missingTools() {
  const missing = [];
  for (const [tool, pkg] of TOOLS) if (!which(tool)) missing.push({ what: tool, pkg });
  // The live-eio scenarios' clients (test/kernel/live-eio.py) run with the
  // guest's /usr/bin/python3 and its libnbd binding.
  if (spawnSync('/usr/bin/python3', ['-c', 'import nbd'], { stdio: 'ignore', timeout: 30_000 }).status !== 0) {
    missing.push({ what: '/usr/bin/python3 with the nbd module', pkg: 'python3-libnbd' });
  }
  if (which('linux.uml')) {
    const modRoot = '/usr/lib/uml/modules';
    const found = fs.existsSync(modRoot) && fs.readdirSync(modRoot).some((v) => fs.existsSync(path.join(modRoot, v, 'kernel/drivers/block/nbd.ko')));
    if (!found) missing.push({ what: `${modRoot}/*/kernel/drivers/block/nbd.ko`, pkg: 'user-mode-linux' });
  }
  return missing;
}

function projectProblem() {
  for (const f of ['dist/src/cli/main.js', 'build/Release/nbd_native.node']) {
    if (!fs.existsSync(path.join(ROOT, f))) return `project not built (${f} missing): run npm run build`;
  }
  return null;
}

// ------------------------------------------------------------------ run

function shq(v) {
  return `'${String(v).replace(/'/g, `'\\''`)}'`;
}

function tail(file, n) {
  try {
    const lines = fs.readFileSync(file, 'utf8').split('\n');
    if (lines[lines.length - 1] === '') lines.pop();
    return lines.slice(-n).join('\n');
  } catch {
    return `(no ${path.basename(file)})`;
  }
}

const running = new Set();

function runScenario(sc, runDir) {
  const dir = path.join(runDir, sc.name);
  fs.mkdirSync(dir, { recursive: true });
  const env = {
    KT_ROOT: ROOT,
    KT_NODE: process.execPath,
    KT_RESULTS: dir,
    KT_SCENARIO: sc.name,
    KT_SCRIPT: sc.script,
    ...sc.env,
  };
  fs.writeFileSync(
    path.join(dir, 'config.sh'),
    Object.entries(env)
      .map(([k, v]) => `export ${k}=${shq(v)}\n`)
      .join(''),
  );
  const init = path.join(dir, 'init');
  fs.writeFileSync(init, `#!/bin/sh\n. ${shq(path.join(dir, 'config.sh'))}\nexec /bin/sh ${shq(path.join(GUEST_DIR, 'init.sh'))}\n`, { mode: 0o755 });
  fs.mkdirSync(path.join(dir, 'uml'), { recursive: true });
  const consoleLog = path.join(dir, 'console.log');
  const out = fs.openSync(consoleLog, 'w');
  const args = [
    '--kill-after=15',
    String(sc.timeout),
    which('linux.uml'),
    `mem=${UML_MEM}`,
    'rootfstype=hostfs',
    'rootflags=/',
    'rw',
    `init=${init}`,
    `uml_dir=${path.join(dir, 'uml')}`,
    'con=null',
    'con0=fd:0,fd:1',
  ];
  const t0 = Date.now();
  return new Promise((resolve) => {
    // timeout(1) puts itself and UML in their own process group and signals
    // the whole group when the time is up.
    const child = spawn(which('timeout'), args, { stdio: ['ignore', out, out], cwd: dir });
    running.add(child);
    child.on('error', (err) => {
      running.delete(child);
      fs.closeSync(out);
      resolve({ sc, dir, secs: (Date.now() - t0) / 1000, ok: false, reason: `cannot start linux.uml: ${err.message}` });
    });
    child.on('exit', (code, signal) => {
      running.delete(child);
      fs.closeSync(out);
      const secs = (Date.now() - t0) / 1000;
      let verdict = '';
      try {
        verdict = fs.readFileSync(path.join(dir, 'verdict'), 'utf8').trim().split('\n')[0];
      } catch {}
      if (verdict === 'ok') return resolve({ sc, dir, secs, ok: true });
      let reason;
      if (verdict) reason = verdict.replace(/^fail:\s*/, '');
      else if (code === 124 || code === 137) reason = `timed out after ${sc.timeout}s (no verdict)`;
      else reason = `no verdict from the guest (linux.uml exit ${code ?? signal})`;
      resolve({ sc, dir, secs, ok: false, reason });
    });
  });
}

// A scenario that records its checks one by one (test/kernel/live-eio.sh)
// leaves "ok - NAME" / "not ok - NAME" lines in RESULTS/checks: shown
// indented under the scenario's own line.
function readChecks(dir) {
  let text;
  try {
    text = fs.readFileSync(path.join(dir, 'checks'), 'utf8');
  } catch {
    return null;
  }
  const lines = text.split('\n').filter((l) => /^(not )?ok - /.test(l));
  return lines.length ? lines.map((l) => `    ${l}`).join('\n') : null;
}

function printFailure(r) {
  const indent = (s) =>
    s
      .split('\n')
      .map((l) => `    ${l}`)
      .join('\n');
  console.log(`  # results: ${r.dir}`);
  console.log(`  # --- guest console (last 80 lines of ${path.join(r.dir, 'console.log')})`);
  console.log(indent(tail(path.join(r.dir, 'console.log'), 80)));
  console.log(`  # --- step log (last 200 lines of ${path.join(r.dir, 'steps.log')})`);
  console.log(indent(tail(path.join(r.dir, 'steps.log'), 200)));
  let logs = [];
  try {
    logs = fs.readdirSync(r.dir).filter((f) => /^(server|attach)-\d+\.log$/.test(f)).sort();
  } catch {}
  for (const f of logs) {
    console.log(`  # --- ${f} (last 30 lines)`);
    console.log(indent(tail(path.join(r.dir, f), 30)));
  }
}

function parseArgs(argv) {
  const envCuts = process.env.NBD_POWER_CUTS;
  const o = { only: null, list: false, jobs: Math.max(1, Math.min(2, os.cpus().length)), keep: false, cuts: envCuts ? Number(envCuts) : undefined, seed: undefined };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    if (a === '--list') o.list = true;
    else if (a === '--keep') o.keep = true;
    else if (a === '--only' || a === '--jobs' || a === '--cuts' || a === '--seed') {
      const v = argv[++i];
      if (v === undefined) usage(`${a} needs a value`);
      if (a === '--only') o.only = v;
      else o[a.slice(2)] = Number(v);
    } else if (a.startsWith('--only=')) o.only = a.slice(7);
    else if (a.startsWith('--jobs=')) o.jobs = Number(a.slice(7));
    else if (a.startsWith('--cuts=')) o.cuts = Number(a.slice(7));
    else if (a.startsWith('--seed=')) o.seed = Number(a.slice(7));
    else if (a === '-h' || a === '--help') usage();
    else usage(`unknown argument ${a}`);
  }
  if (!Number.isInteger(o.jobs) || o.jobs < 1) usage('--jobs must be a positive integer');
  if (o.cuts !== undefined && (!Number.isInteger(o.cuts) || o.cuts < 1)) usage('--cuts (NBD_POWER_CUTS) must be a positive integer');
  if (o.seed !== undefined && (!Number.isInteger(o.seed) || o.seed < 1 || o.seed >= 2 ** 31 - 2)) usage('--seed must be an integer from 1 to 2^31-3');
  return o;
}

function usage(err) {
  const text =
    'usage: node tools/kernel-test.js [--list] [--only REGEX] [--jobs N] [--keep] [--cuts N] [--seed N]\n' +
    '  --list        list the scenarios\n' +
    '  --only REGEX  run only the scenarios whose name matches (case-insensitive)\n' +
    '  --jobs N      boot up to N guests at once (default 2, or 1 on one core)\n' +
    '  --keep        keep the results dirs of passing scenarios too\n' +
    `  --cuts N      power cuts per power-loss scenario (default ${DEFAULT_CUTS}; env NBD_POWER_CUTS)\n` +
    '  --seed N      seed of the power-loss scenarios (default: random, printed)\n';
  if (err) {
    process.stderr.write(`kernel-test: ${err}\n${text}`);
    process.exit(2);
  }
  process.stdout.write(text);
  process.exit(0);
}

async function main() {
  const opts = parseArgs(process.argv.slice(2));
  let list = scenarios(opts);
  if (opts.only) {
    let re;
    try {
      re = new RegExp(opts.only, 'i');
    } catch (e) {
      usage(`bad --only pattern: ${e.message}`);
    }
    list = list.filter((s) => re.test(s.name));
    if (list.length === 0) usage(`--only ${opts.only} matches no scenario (see --list)`);
  }
  if (opts.list) {
    for (const s of list) console.log(`${s.name.padEnd(22)} ${s.description}`);
    return 0;
  }

  let passed = 0;
  let failed = 0;
  let skipped = 0;
  const summary = () => `${passed} passed, ${failed} failed` + (skipped ? `, ${skipped} skipped` : '');

  const missing = missingTools();
  if (missing.length) {
    const what = missing.map((m) => m.what).join(', ');
    const pkgs = [...new Set(missing.map((m) => m.pkg))].join(' ');
    const bar = '#'.repeat(78);
    console.log(`${bar}\n# KERNEL TESTS ${STRICT ? 'FAILED' : 'SKIPPED'}: missing ${what}`);
    console.log(`# install with: apt-get install -y ${pkgs}`);
    if (STRICT) console.log('# NBD_STRICT_TESTS=1 forbids skipping them.');
    console.log(bar);
    for (const s of list) {
      if (STRICT) {
        console.log(`not ok - ${s.name}: missing ${what}`);
        failed++;
      } else {
        console.log(`ok - ${s.name} # SKIP missing ${what}`);
        skipped++;
      }
    }
    console.log(summary());
    return STRICT ? 1 : 0;
  }
  const problem = projectProblem();
  if (problem) {
    for (const s of list) console.log(`not ok - ${s.name}: ${problem}`);
    failed = list.length;
    console.log(summary());
    return 1;
  }

  const runDir = fs.mkdtempSync(path.join(os.tmpdir(), 'nbd-kernel-'));
  console.log(`# kernel tests: ${list.length} scenario(s) in user-mode Linux, results under ${runDir}`);
  const started = Date.now();
  const queue = [];
  for (const s of list) {
    const reason = s.gate ? s.gate() : null;
    if (reason && STRICT && s.strictGate) {
      console.log(`not ok - ${s.name}: ${reason} (NBD_STRICT_TESTS=1 forbids skipping it)`);
      failed++;
    } else if (reason) {
      console.log(`ok - ${s.name} # SKIP ${reason}`);
      skipped++;
    } else queue.push(s);
  }
  const failures = [];
  const worker = async () => {
    while (queue.length) {
      const sc = queue.shift();
      const r = sc.kind === 'power-loss' ? await runPowerLoss(sc, runDir, powerLossContext()) : await runScenario(sc, runDir);
      const checks = readChecks(r.dir);
      if (r.ok) {
        passed++;
        console.log(`ok - ${sc.name} (${r.secs.toFixed(1)}s)`);
        if (checks) console.log(checks);
        for (const l of r.summary || []) console.log(`  # ${l}`);
        if (!opts.keep) fs.rmSync(r.dir, { recursive: true, force: true });
      } else {
        failed++;
        failures.push(r);
        console.log(`not ok - ${sc.name} (${r.secs.toFixed(1)}s): ${r.reason}`);
        if (checks) console.log(checks);
        for (const l of r.summary || []) console.log(`  # ${l}`);
        printFailure(r);
      }
    }
  };
  await Promise.all(Array.from({ length: Math.min(opts.jobs, queue.length || 1) }, worker));
  if (failures.length === 0 && !opts.keep) fs.rmSync(runDir, { recursive: true, force: true });
  else console.log(`# results kept in ${runDir}`);
  console.log(`# total ${((Date.now() - started) / 1000).toFixed(1)}s`);
  if (failures.length) console.log('\nfailed scenarios:\n' + failures.map((r) => `  - ${r.sc.name}: ${r.reason}`).join('\n'));
  console.log(summary());
  return failed ? 1 : 0;
}

function powerLossContext() {
  return { root: ROOT, node: process.execPath, uml: which('linux.uml'), python: '/usr/bin/python3', mem: UML_MEM, running, guestDir: GUEST_DIR };
}

function killAll(sig) {
  for (const c of running) {
    if (c.powerCut) {
      c.kill('SIGUSR1'); // tools/uml-run.py kills the guest's whole process group
      continue;
    }
    try {
      process.kill(-c.pid, 'SIGKILL'); // timeout's process group: UML and its helpers
    } catch {}
    try {
      c.kill('SIGKILL');
    } catch {}
  }
  process.exit(sig === 'SIGINT' ? 130 : 143);
}
process.on('SIGINT', () => killAll('SIGINT'));
process.on('SIGTERM', () => killAll('SIGTERM'));

main().then(
  (code) => process.exit(code),
  (err) => {
    console.error(err);
    console.log('0 passed, 1 failed');
    process.exit(1);
  },
);
