// Where this package lives on disk: the nearest ancestor of this file that
// holds binding.gyp. Works both from src/ (tests run TypeScript directly) and
// from dist/src/ (the compiled CLI).
import * as fs from 'node:fs';
import * as path from 'node:path';

let cached: string | undefined;

export function packageRoot(): string {
  if (cached) return cached;
  let dir = __dirname;
  for (;;) {
    if (fs.existsSync(path.join(dir, 'binding.gyp'))) return (cached = dir);
    const up = path.dirname(dir);
    if (up === dir) throw new Error(`cannot find the node-nbd-server package root above ${__dirname}`);
    dir = up;
  }
}

export function packageVersion(): string {
  return (JSON.parse(fs.readFileSync(path.join(packageRoot(), 'package.json'), 'utf8')) as { version: string }).version;
}
