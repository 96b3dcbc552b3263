#!/usr/bin/env node
// Runs the tap suite and ends with the plain line "N passed, N failed, N skipped"
// that CI reads. Extra arguments are test files (default: every test/*.ts).
// Under NBD_STRICT_TESTS=1 (CI), a test that lacks a system tool fails
// instead of skipping (see test/fixtures/tools.ts).
'use strict';
const { spawn } = require('node:child_process');
const fs = require('node:fs');
const path = require('node:path');

const root = path.resolve(__dirname, '..');
let files = process.argv.slice(2);
if (files.length === 0) {
  files = fs
    .readdirSync(path.join(root, 'test'))
    .filter((f) => f.endsWith('.ts'))
    .sort()
    .map((f) => path.join('test', f));
}
const tapBin = path.join(root, 'node_modules', 'tap', 'dist', 'esm', 'run.mjs');
const child = spawn(
  process.execPath,
  [tapBin, '--disable-coverage', '--reporter=tap', '--timeout=900', '--jobs=2', ...files],
  { cwd: root, stdio: ['ignore', 'pipe', 'inherit'], env: { ...process.env, TAP_RCFILE: '/dev/null' } },
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
child.on('close', (code) => {
  const fileFailures = tail.split('\n').filter(Boolean);
  if (code !== 0 && failed === 0) failed = Math.max(1, fileFailures.length);
  if (failures.length) console.log('\nfailed tests:\n' + failures.map((f) => '  - ' + f).join('\n'));
  if (fileFailures.length) console.log(fileFailures.map((f) => '  - ' + f).join('\n'));
  console.log(`\n${passed} passed, ${failed} failed, ${skipped} skipped`);
  process.exit(code === 0 && failed === 0 ? 0 : 1);
});
