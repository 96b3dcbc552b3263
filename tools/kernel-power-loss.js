// Power-loss scenarios for tools/kernel-test.js: the host side.
//
// One scenario is a chain of boots of user-mode Linux on the same disk
// (ubd0 = RESULTS/disk.raw, a host file). Boot 0 makes an ext4 on it and a
// 4 MiB image; every boot runs test/kernel/power-loss.sh (through init.sh):
// serve the image from the guest's ext4, check what the previous cut left,
// then run a workload that logs every event to RESULTS/events-N.log on the
// host. Meanwhile this driver watches that log and, at a random moment, cuts
// the power: SIGKILL to the whole UML process group (tools/uml-run.py). The
// guest's page cache and tmpfs (/dev/shm, where the first-write journal
// lives) are gone; the disk file holds what the guest had written to it. The
// next boot writes the verdict on that cut to RESULTS/cut-N.json. The last
// boot checks the last cut and stops the server cleanly.
//
// When to cut (seeded): a third of the cuts at a uniform delay after the
// workload starts; the others aimed at a kind of moment, cut at a small
// random delay after the workload logs it: a snapshot create, delete or
// rollback request sent, a first-write burst begun, a merge seen running.
// Where a cut really landed is what the next boot finds from the log and
// the server (a merge resumed at open), and that is what is counted.
//
// Per boot, also seeded: the guest's writeback (default 30 s, or dirty pages
// older than 1 s written back, so that some unflushed writes reach the disk
// before the cut and others not), and a number of short processes started
// before the server, so that its PID differs from boot to boot as on a real
// machine (the stale IMAGE.nbd/lock of the previous boot then names some
// other PID, which may belong to a live process).
//
// Knobs: --cuts / NBD_POWER_CUTS and --seed (kernel-test.js);
// NBD_POWER_AIMS=create,delete,rollback,first-write-burst,merge,uniform
// restricts the cuts to those moments; NBD_POWER_CLEAR_LOCK=1 removes
// IMAGE.nbd/lock before each serve — a manual step, only to look past a
// stale lock to the rest.
'use strict';
const { spawn, spawnSync } = require('node:child_process');
const fs = require('node:fs');
const path = require('node:path');

const DEFAULT_CUTS = 50;
const SIZE_MIB = 4; // the volume: 1024 blocks of 4 KiB, 256 chunks of 16 KiB
const DISK_MIB = 128; // the guest's ext4: image, up to 4 snapshot stores, metadata
const MERGE_RATE = '4M'; // bytes/s: a merge of the whole 4 MiB volume takes about 1 s
const CLI_SHARE = 0.2; // share of create/delete/rollback sent through the CLI
const START_LIMIT_S = 240; // boot + server + check, even on a loaded machine
const FINAL_LIMIT_S = 360;
const AIM_LIMIT_S = 8; // an aimed cut whose moment never comes is made anyway

// Aimed cuts: what to look for in the event log, and the delay after it (s):
// through the control socket a create, delete or rollback takes some 30-80
// ms in the guest; through the CLI 2-3 s, mostly node starting.
const AIMS = [
  { aim: 'create', match: (l) => l.startsWith('C '), delay: (l, r) => (/ cli /.test(l) ? r() * 3 : r() * 0.04) },
  { aim: 'delete', match: (l) => l.startsWith('D '), delay: (l, r) => (/ cli /.test(l) ? r() * 3 : r() * 0.06) },
  { aim: 'rollback', match: (l) => l.startsWith('R '), delay: (l, r) => (/ cli /.test(l) ? r() * 3 : r() * 0.1) },
  { aim: 'first-write-burst', match: (l) => l.startsWith('B '), delay: (l, r) => r() * 0.25 },
  { aim: 'merge', match: (l) => /^J [1-9]/.test(l), delay: (l, r) => r() * 0.5 },
];

function mulberry32(seed) {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

function shq(v) {
  return `'${String(v).replace(/'/g, `'\\''`)}'`;
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

function readJson(file) {
  try {
    return JSON.parse(fs.readFileSync(file, 'utf8'));
  } catch {
    return null;
  }
}

/**
 * Boots once; cuts the power according to `plan` once the workload has
 * started (plan null: the final boot, which halts by itself).
 * Resolves { cut, aimHit, exited, status, noStart, secs }.
 */
function bootOnce(ctx, bootDir, eventsFile, plan, rnd) {
  const consoleLog = fs.openSync(path.join(bootDir, 'console.log'), 'w');
  // The wrapper cuts by itself after a limit, and when this process dies.
  const hardLimit = plan ? START_LIMIT_S + AIM_LIMIT_S + 60 : FINAL_LIMIT_S + 60;
  const args = [
    ctx.wrapper,
    '--limit',
    String(hardLimit),
    ctx.uml,
    `mem=${ctx.mem}`,
    'rootfstype=hostfs',
    'rootflags=/',
    'rw',
    `init=${path.join(bootDir, 'init')}`,
    `uml_dir=${path.join(bootDir, 'uml')}`,
    `ubd0=${ctx.disk}`,
    'con=null',
    'con0=fd:0,fd:1',
  ];
  const t0 = Date.now();
  const child = spawn(ctx.python, args, { stdio: ['ignore', consoleLog, consoleLog], cwd: bootDir });
  child.powerCut = true; // kernel-test's SIGINT handler cuts it like this too
  ctx.running.add(child);
  let exited = null;
  const done = new Promise((resolve) => {
    child.on('error', (err) => {
      exited = { status: `cannot start: ${err.message}` };
      resolve();
    });
    child.on('exit', (code, signal) => {
      exited = { status: code ?? signal };
      resolve();
    });
  });
  const result = { cut: null, aimHit: false, exited: false, noStart: false, secs: 0 };
  const run = async () => {
    const limit = (plan ? START_LIMIT_S : FINAL_LIMIT_S) * 1000;
    let started = 0;
    let offset = 0;
    let partial = '';
    let cutAt = 0;
    while (!exited) {
      const t = Date.now();
      if (!plan) {
        if (t - t0 > limit) {
          result.noStart = true;
          break;
        }
        await sleep(50);
        continue;
      }
      if (!started) {
        if (fs.existsSync(eventsFile) && fs.statSync(eventsFile).size > 0) {
          started = t;
          if (plan.kind === 'uniform') cutAt = t + plan.delay * 1000;
        } else if (t - t0 > limit) {
          result.noStart = true;
          break;
        }
      }
      if (started && plan.kind === 'aimed' && !cutAt) {
        // Read what the workload logged since the last look.
        const fd = fs.openSync(eventsFile, 'r');
        const buf = Buffer.alloc(1 << 20);
        let n;
        while ((n = fs.readSync(fd, buf, 0, buf.length, offset)) > 0) {
          offset += n;
          partial += buf.toString('utf8', 0, n);
        }
        fs.closeSync(fd);
        const lines = partial.split('\n');
        partial = lines.pop();
        for (const l of lines) {
          if (plan.target.match(l)) {
            cutAt = Date.now() + plan.target.delay(l, rnd) * 1000;
            result.aimHit = true;
            break;
          }
        }
        if (!cutAt && t - started > AIM_LIMIT_S * 1000) cutAt = t;
      }
      if (cutAt && Date.now() >= cutAt) {
        result.cut = { afterStartS: (Date.now() - started) / 1000 };
        break;
      }
      await sleep(cutAt ? Math.max(1, Math.min(10, cutAt - Date.now())) : 10);
    }
    if (!exited) child.kill('SIGUSR1'); // the power cut (or the limit)
    else result.exited = true;
    await done;
    ctx.running.delete(child);
    fs.closeSync(consoleLog);
    result.status = exited.status;
    result.secs = (Date.now() - t0) / 1000;
    return result;
  };
  return run();
}

// NBD_POWER_AIMS=create,merge,... restricts the cuts to those aims
// ("uniform" too), e.g. to soak one kind of moment.
function choosePlan(rnd) {
  const only = (process.env.NBD_POWER_AIMS || '').split(',').filter(Boolean);
  const aims = only.length ? AIMS.filter((a) => only.includes(a.aim)) : AIMS;
  const uniform = only.length ? (only.includes('uniform') ? 1 / (aims.length + 1) : 0) : 1 / 3;
  if (rnd() < uniform || aims.length === 0) return { kind: 'uniform', delay: 0.05 + rnd() * 4, aim: 'uniform' };
  const target = aims[Math.floor(rnd() * aims.length)];
  return { kind: 'aimed', target, aim: target.aim };
}

function summarize(verdicts) {
  const phases = {};
  let landedCreate = 0;
  let crashStateCreate = 0;
  let landedRollback = 0;
  for (const v of verdicts) {
    for (const p of v.phases || []) phases[p] = (phases[p] || 0) + 1;
    for (const n of v.notes || []) {
      if (/present \(create in flight/.test(n)) landedCreate++;
      if (/showing the volume as the cut left it/.test(n)) crashStateCreate++;
      if (/rollback in flight took effect/.test(n)) landedRollback++;
    }
  }
  const ms = {};
  for (const v of verdicts) for (const [k, list] of Object.entries(v.opMs || {})) (ms[k] ||= []).push(...list);
  const median = (l) => l.slice().sort((x, y) => x - y)[Math.floor(l.length / 2)];
  const timing = Object.keys(ms)
    .sort()
    .map((k) => `${k} ${ms[k].length}x median ${median(ms[k])} ms`)
    .join(', ');
  const order = ['first-write-burst', 'merge', 'create', 'delete', 'rollback', 'writes'];
  const parts = order.filter((p) => phases[p]).map((p) => `${p} ${phases[p]}`);
  for (const p of Object.keys(phases)) if (!order.includes(p)) parts.push(`${p} ${phases[p]}`);
  return {
    phases,
    text: `cuts landed: ${parts.join(', ') || 'none'} (in-flight creates listed after the cut: ${landedCreate} at their point in time, ${crashStateCreate} as the volume the cut left; in-flight rollbacks that took effect: ${landedRollback}); operations (C create, D delete, R rollback; ctl: control socket, cli: the CLI): ${timing}`,
  };
}

function readVerdictFile(bootDir) {
  try {
    return fs.readFileSync(path.join(bootDir, 'verdict'), 'utf8').trim().split('\n')[0].replace(/^fail:\s*/, '');
  } catch {
    return '';
  }
}

/**
 * Runs one power-loss scenario. base: { root, node, uml, python, mem,
 * running (kernel-test's set of live children), guestDir }. Resolves like
 * kernel-test's runScenario, { sc, dir, secs, ok, reason }, plus summary
 * lines; on failure `dir` is the boot that found it.
 */
async function runPowerLoss(sc, runDir, base) {
  const t0 = Date.now();
  const dir = path.join(runDir, sc.name);
  fs.mkdirSync(dir, { recursive: true });
  const disk = path.join(dir, 'disk.raw');
  fs.closeSync(fs.openSync(disk, 'w'));
  fs.truncateSync(disk, DISK_MIB * 1024 * 1024);
  const ctx = { ...base, disk, wrapper: path.join(base.root, 'tools', 'uml-run.py') };
  const rnd = mulberry32(sc.seed);
  const verdicts = [];
  const say = (s) => fs.appendFileSync(path.join(dir, 'cuts.log'), s + '\n');
  const rerun = `node tools/kernel-test.js --only ${sc.name} --seed ${sc.seed - sc.seedOffset} --cuts ${sc.cuts}`;
  const finish = (ok, reason, failDir) => {
    const sum = summarize(verdicts);
    fs.writeFileSync(path.join(dir, 'summary.json'), JSON.stringify({ cuts: verdicts.length, seed: sc.seed, ...sum }, null, 2));
    say(sum.text);
    const secs = (Date.now() - t0) / 1000;
    return {
      sc,
      dir: ok ? dir : failDir,
      secs,
      ok,
      reason: ok ? '' : `${reason} [seed ${sc.seed}; again: ${rerun}]`,
      summary: [`${verdicts.length} cuts checked in ${secs.toFixed(0)}s (${(secs / Math.max(1, verdicts.length)).toFixed(1)}s a cut), seed ${sc.seed}`, sum.text],
    };
  };
  // The model first, on the host: a broken model must not pass as a sound volume.
  const self = spawnSync(ctx.python, [path.join(ctx.guestDir, 'power_loss.py'), 'selftest'], { encoding: 'utf8', timeout: 60_000 });
  if (self.status !== 0) return finish(false, `the model's self-test failed: ${(self.stdout + self.stderr).trim()}`, dir);
  say(`power-loss ${sc.name}: ${sc.cuts} cuts, seed ${sc.seed}; model self-test: ${self.stdout.trim()}`);

  for (let boot = 0; boot <= sc.cuts; boot++) {
    const final = boot === sc.cuts;
    const bootDir = path.join(dir, `boot-${String(boot).padStart(3, '0')}`);
    fs.mkdirSync(path.join(bootDir, 'uml'), { recursive: true });
    const env = {
      KT_ROOT: ctx.root,
      KT_NODE: ctx.node,
      KT_RESULTS: bootDir,
      KT_SCENARIO: `${sc.name} boot ${boot}`,
      KT_SCRIPT: 'power-loss.sh',
      KT_FS: 'ext4',
      KT_TRANSPORT: 'unix',
      KT_CONNS: 2,
      KT_SIZE: `${SIZE_MIB}M`,
      KT_PL_DIR: dir,
      PL_BOOT: boot,
      PL_MODE: final ? 'final' : 'work',
      PL_SEED: sc.seed,
      PL_SIZE_MIB: SIZE_MIB,
      PL_MERGE_RATE: MERGE_RATE,
      PL_CLI_SHARE: CLI_SHARE,
      PL_PID_SHIFT: Math.floor(rnd() * 16),
      PL_WRITEBACK: rnd() < 0.5 ? 'fast' : 'default',
      PL_CLEAR_LOCK: process.env.NBD_POWER_CLEAR_LOCK === '1' ? 1 : 0,
    };
    fs.writeFileSync(
      path.join(bootDir, 'config.sh'),
      Object.entries(env)
        .map(([k, v]) => `export ${k}=${shq(v)}\n`)
        .join(''),
    );
    fs.writeFileSync(path.join(bootDir, 'init'), `#!/bin/sh\n. ${shq(path.join(bootDir, 'config.sh'))}\nexec /bin/sh ${shq(path.join(ctx.guestDir, 'init.sh'))}\n`, {
      mode: 0o755,
    });
    const plan = final ? null : choosePlan(rnd);
    const r = await bootOnce(ctx, bootDir, path.join(dir, `events-${boot}.log`), plan, rnd);
    if (boot > 0) {
      // This boot's verdict on the cut that ended the previous one.
      const v = readJson(path.join(dir, `cut-${boot - 1}.json`));
      if (!v) return finish(false, `boot ${boot} wrote no verdict on cut ${boot - 1} (${r.noStart ? 'timed out' : readVerdictFile(bootDir) || `guest ended: ${r.status}`})`, bootDir);
      verdicts.push(v);
      say(`cut ${boot - 1}: ${v.ok ? 'ok' : 'FAIL'}, landed: ${(v.phases || []).join(', ')}${(v.notes || []).length ? `; ${v.notes.join('; ')}` : ''}`);
      if (!v.ok) return finish(false, `cut ${boot - 1} (landed: ${(v.phases || []).join(', ')}): ${(v.failures || []).join(' | ')}`, bootDir);
    }
    if (final) {
      const verdict = readVerdictFile(bootDir);
      if (verdict !== 'ok') return finish(false, `final boot: ${verdict || (r.noStart ? `no verdict after ${FINAL_LIMIT_S}s` : 'no verdict')}`, bootDir);
      break;
    }
    if (r.noStart) return finish(false, `boot ${boot}: the workload did not start within ${START_LIMIT_S}s`, bootDir);
    if (r.exited) return finish(false, `boot ${boot} ended before its cut: ${readVerdictFile(bootDir) || `guest exit ${r.status}`}`, bootDir);
    const how = plan.kind === 'uniform' ? 'at random' : `aimed at ${plan.aim}${r.aimHit ? '' : ' (it never came: cut anyway)'}`;
    say(`boot ${boot}: cut ${how}, ${r.cut.afterStartS.toFixed(2)}s into the workload (boot ${r.secs.toFixed(1)}s, writeback ${env.PL_WRITEBACK})`);
    fs.rmSync(path.join(bootDir, 'uml'), { recursive: true, force: true });
  }
  return finish(true, '');
}

module.exports = { runPowerLoss, DEFAULT_CUTS };
