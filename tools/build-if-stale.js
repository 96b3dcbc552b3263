#!/usr/bin/env node
// The package's build steps as npm lifecycle scripts: `install` builds the
// addon (node-gyp rebuild), `prepare` compiles the TypeScript (tsc).
//
//   node tools/build-if-stale.js addon|ts
//
// Under `npm install` / `npm ci` (and anything but `npm exec`) the step
// always runs, as a plain "node-gyp rebuild" / "tsc" script would.
//
// Under `npm exec` / `npx` it runs only when its outputs are missing or older
// than their sources. The reason: `npx node-nbd-server ...` run inside this
// checkout makes npm (9 and later) install the checkout itself into its npx
// cache, as a link, the first time, and that install runs these scripts in
// the checkout. `npm install` has just built everything, so rebuilding (40 s
// of silence before the server starts) is wasted, and a Ctrl-C during it
// leaves a half-made npx cache entry that breaks every later npx run. A copy
// installed from the registry has no build yet, so it is built there as before.
'use strict';
const { spawnSync } = require('node:child_process');
const fs = require('node:fs');
const path = require('node:path');

const root = path.resolve(__dirname, '..');

/** Every file under `dir` (recursively), as absolute paths; none if it does not exist. */
function filesUnder(dir) {
  if (!fs.existsSync(dir)) return [];
  const out = [];
  for (const e of fs.readdirSync(dir, { withFileTypes: true })) {
    const p = path.join(dir, e.name);
    if (e.isDirectory()) out.push(...filesUnder(p));
    else if (e.isFile()) out.push(p);
  }
  return out;
}

const mtime = (f) => fs.statSync(f).mtimeMs;

/** The addon is current when the .node file is newer than binding.gyp and every native source. */
function addonCurrent() {
  const out = path.join(root, 'build', 'Release', 'nbd_native.node');
  if (!fs.existsSync(out)) return false;
  const built = mtime(out);
  return [path.join(root, 'binding.gyp'), ...filesUnder(path.join(root, 'native'))].every((f) => mtime(f) <= built);
}

/** The TypeScript is current when each compiled input has its .js in dist/, newer than it and than tsconfig.json. */
function tsCurrent() {
  const config = mtime(path.join(root, 'tsconfig.json'));
  const inputs = ['src', 'tools'].flatMap((d) => filesUnder(path.join(root, d))).filter((f) => f.endsWith('.ts') && !f.endsWith('.d.ts'));
  return inputs.every((f) => {
    const js = path.join(root, 'dist', path.relative(root, f)).replace(/\.ts$/, '.js');
    return fs.existsSync(js) && mtime(js) >= Math.max(mtime(f), config);
  });
}

const steps = {
  // node-gyp and tsc come from this package's node_modules/.bin, which npm puts on PATH for scripts.
  addon: { current: addonCurrent, cmd: 'node-gyp', args: ['rebuild'] },
  ts: { current: tsCurrent, cmd: 'tsc', args: ['-p', 'tsconfig.json'] },
};

const which = process.argv[2];
const step = steps[which];
if (!step) {
  console.error(`usage: node tools/build-if-stale.js ${Object.keys(steps).join('|')}`);
  process.exit(2);
}
if (process.env.npm_command === 'exec' && step.current()) {
  console.log(`node-nbd-server: ${which === 'addon' ? 'the addon' : 'the TypeScript'} is already built and current: not rebuilt`);
  process.exit(0);
}
const r = spawnSync(step.cmd, step.args, { cwd: root, stdio: 'inherit' });
if (r.error) {
  console.error(`node-nbd-server: cannot run ${step.cmd}: ${r.error.message}`);
  process.exit(1);
}
process.exit(r.status ?? 1);
