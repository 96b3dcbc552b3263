#!/usr/bin/env node
// Runs the tap suite, then (with no file arguments) the kernel-path harness
// in user-mode Linux (tools/kernel-test.js), and ends with the plain line
// "N passed, N failed, N skipped" that CI reads, counting both. Extra
// arguments are test files (default: every test/*.ts). NBD_SKIP_KERNEL=1
// leaves the kernel harness out (it reports its own skips when its tools are
// missing).
// Under NBD_STRICT_TESTS=1 (CI), a test that lacks a system tool fails
// instead of skipping (see test/fixtures/tools.ts).
'use strict';
const { spawn } = require('node:child_process');
const fs = require('node:fs');
const path = require('node:path');

const root = path.resolve(__dirname, '..');
let files = process.argv.slice(2);
const runKernel = files.length === 0 && process.env.NBD_SKIP_KERNEL !== '1';
if (files.length === 0) {
  files = fs
    .readdirSync(path.join(root, 'test'))
    .filter((f) => f.endsWith('.ts'))
    .sort()
    .map((f) => path.join('test', f));
}
const tapBin = path.join(root, 'node_modules', 'tap', 'dist', 'esm', 'run.mjs');
// First-write journals of this run's servers go to a directory of their own
// (memory-backed like the default when /dev/shm exists), removed at the end:
// tests that SIGKILL a server and delete its image would otherwise leave
// journals in the shared default directory.
const shm = fs.existsSync('/dev/shm') ? '/dev/shm' : require('node:os').tmpdir();
const journalDir = process.env.NBD_JOURNAL_DIR || fs.mkdtempSync(path.join(shm, 'node-nbd-server-test-'));
process.on('exit', () => {
  if (process.env.NBD_JOURNAL_DIR) return;
  // Best effort: a failure here (a straggler still writing) must not turn a
  // passing run into exit 1 after its last line.
  try {
    fs.rmSync(journalDir, { recursive: true, force: true, maxRetries: 3 });
  } catch (e) {
    console.error(`# could not remove the test journal directory ${journalDir}: ${e.message}`);
  }
});
const child = spawn(
  process.execPath,
  [tapBin, '--disable-coverage', '--reporter=tap', '--timeout=900', '--jobs=2', ...files],
  { cwd: root, stdio: ['ignore', 'pipe', 'inherit'], env: { ...process.env, TAP_RCFILE: '/dev/null', NBD_JOURNAL_DIR: journalDir } },
);
let tail = '';
let passed = 0;
let failed = 0;
let skipped = 0;
const failures = [];
let buf = '';
child.stdout.on('data', (chunk) => {
  process.stdout.write(chunk);
  buf += chunk.toString();
  let i;
  while ((i = buf.indexOf('\n')) >= 0) {
    const line = buf.slice(0, i);
    buf = buf.slice(i + 1);
    // Count the subtests of each file (one level of indentation): these are
    // the named tests; leaf assertions are counted inside them.
    const m = /^ {4}(not ok|ok) \d+ - (.*?)(?: # (SKIP|TODO)\b(.*))?(?: # time=.*)?$/.exec(line);
    if (m) {
      if (m[3]) skipped++;
      else if (m[1] === 'ok') passed++;
      else {
        failed++;
        failures.push(m[2]);
      }
    }
    // A file that failed outside any subtest (crash, timeout) counts as a failure.
    const f = /^not ok \d+ - (.*?)(?: # time=.*)?$/.exec(line);
    if (f) tail = tail + `file failed: ${f[1]}\n`;
  }
});
function runKernelHarness() {
  return new Promise((resolve) => {
    const k = spawn(process.execPath, [path.join(root, 'tools', 'kernel-test.js')], {
      cwd: root,
      stdio: ['ignore', 'pipe', 'inherit'],
    });
    let out = '';
    k.stdout.on('data', (d) => {
      process.stdout.write(d);
      out += d.toString();
    });
    k.on('close', (code) => {
      const m = /^(\d+) passed, (\d+) failed(?:, (\d+) skipped)?\s*$/m.exec(out.split('\n').filter(Boolean).slice(-3).join('\n'));
      const r = m ? { passed: +m[1], failed: +m[2], skipped: +(m[3] || 0) } : { passed: 0, failed: 1, skipped: 0 };
      if (code !== 0 && r.failed === 0) r.failed = 1;
      for (const line of out.split('\n')) if (line.startsWith('not ok - ')) failures.push('kernel: ' + line.slice(9));
      resolve(r);
    });
  });
}

child.on('close', async (code) => {
  const fileFailures = tail.split('\n').filter(Boolean);
  if (code !== 0 && failed === 0) failed = Math.max(1, fileFailures.length);
  if (runKernel) {
    console.log('\n# kernel path (user-mode Linux): tools/kernel-test.js');
    const k = await runKernelHarness();
    passed += k.passed;
    failed += k.failed;
    skipped += k.skipped;
  }
  if (failures.length) console.log('\nfailed tests:\n' + failures.map((f) => '  - ' + f).join('\n'));
  if (fileFailures.length) console.log(fileFailures.map((f) => '  - ' + f).join('\n'));
  console.log(`\n${passed} passed, ${failed} failed, ${skipped} skipped`);
  process.exit(failed === 0 ? 0 : 1);
});
