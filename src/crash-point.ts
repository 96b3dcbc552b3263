// A test hook, the control plane's half of native/core/crash_point.hh: with
// NBD_TEST_CRASH_AT=NAME or NAME:N, the N-th call (default the first) of
// crashPoint(NAME) writes one line "crash-point NAME[:N]" to stderr and kills
// this process with SIGKILL on the spot: nothing is flushed or cleaned up,
// exactly like kill -9. Unset, a point costs one comparison. Points: the
// steps of snapshot create and delete (src/snapshots.ts); the native points
// and what each one checks are listed in docs/architecture.md ("Crash
// invariants"), tested by test/journal-crash-points.ts.
import * as fs from 'node:fs';

const spec = process.env.NBD_TEST_CRASH_AT;
const colon = spec ? spec.lastIndexOf(':') : -1;
const target = spec ? (colon >= 0 ? spec.slice(0, colon) : spec) : undefined;
const nth = spec && colon >= 0 ? Number(spec.slice(colon + 1)) : 1;
let hits = 0;

export function crashPoint(name: string): void {
  if (target === undefined || name !== target || ++hits !== nth) return;
  fs.writeSync(2, `crash-point ${spec}\n`);
  process.kill(process.pid, 'SIGKILL');
}
