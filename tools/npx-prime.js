#!/usr/bin/env node
// Runs at the end of `npm install` / `npm ci` in a checkout (the
// `postprepare` script), so that the README's
//
//   npx node-nbd-server serve disk.img --size 1G
//
// starts the server in about a second and cannot be broken by a Ctrl-C.
//
// Why: inside a package whose own package.json has a bin of that name, npm
// (9 and later) does not look in node_modules/.bin: it installs the package
// directory itself into its npx cache (~/.npm/_npx/<hash>/, a link back to
// the checkout) the first time, running the package's lifecycle scripts
// there. If that first run is interrupted after the link was made but before
// npm wrote the entry's package.json, every later npx run fails with ENOENT
// on that package.json until the entry is deleted.
//
// So this script makes npx's one-time install happen now, as part of
// `npm install`: it removes entries of the npx cache that link to this
// checkout but lack their package.json (left by an interrupted run), then runs
// `npm exec --yes -- node-nbd-server --version` once, exactly the resolution
// the README command goes through. Later `npx node-nbd-server ...` runs find
// the entry complete and install nothing (npm does not even rewrite its
// package.json), so interrupting them at any point leaves nothing half-made.
// The lifecycle scripts that npm runs inside this priming install see that
// everything is built and skip (tools/build-if-stale.js).
//
// Best effort: any failure is a warning, never a failed `npm install`. It
// does nothing for a copy installed as a dependency or globally (npm runs
// root lifecycle scripts only for the project being installed; INIT_CWD must
// be this checkout), and nothing inside its own priming run.
'use strict';
const { spawnSync } = require('node:child_process');
const fs = require('node:fs');
const path = require('node:path');

const root = path.resolve(__dirname, '..');
const name = JSON.parse(fs.readFileSync(path.join(root, 'package.json'), 'utf8')).name;

function warn(msg) {
  console.warn(`node-nbd-server: warning: ${msg}; \`npx ${name}\` will install this checkout into npx's cache on its first run instead`);
}

function realpath(p) {
  try {
    return fs.realpathSync(p);
  } catch {
    return undefined;
  }
}

function main() {
  if (process.env.NBD_NPX_PRIMING === '1') return; // the priming run's own lifecycle scripts
  if (!['install', 'ci'].includes(process.env.npm_command ?? '')) return;
  if (realpath(process.env.INIT_CWD ?? '') !== realpath(root)) return;
  const npmCli = process.env.npm_execpath;
  if (!npmCli || !fs.existsSync(npmCli)) return warn('npm_execpath is not set: not run by npm');

  // Entries left by an interrupted first run: a link to this checkout, no package.json.
  const npxCache = process.env.npm_config_cache ? path.join(process.env.npm_config_cache, '_npx') : undefined;
  if (npxCache && fs.existsSync(npxCache)) {
    for (const entry of fs.readdirSync(npxCache)) {
      const dir = path.join(npxCache, entry);
      if (fs.existsSync(path.join(dir, 'package.json'))) continue;
      if (realpath(path.join(dir, 'node_modules', name)) !== realpath(root)) continue;
      fs.rmSync(dir, { recursive: true, force: true });
      console.log(`node-nbd-server: removed a half-made npx cache entry of this checkout (${dir})`);
    }
  }

  const r = spawnSync(process.execPath, [npmCli, 'exec', '--yes', '--', name, '--version'], {
    cwd: root,
    env: { ...process.env, NBD_NPX_PRIMING: '1' },
    encoding: 'utf8',
    timeout: 600_000,
  });
  if (r.status !== 0) {
    return warn(`priming npx failed (${r.error?.message ?? `exit ${r.status ?? r.signal}`}): ${(r.stderr ?? '').trim().split('\n').slice(-5).join(' | ')}`);
  }
  console.log(`node-nbd-server: \`npx ${name}\` is ready in this checkout (version ${r.stdout.trim()})`);
}

try {
  main();
} catch (err) {
  warn(err.message);
}
