// The volume's history: IMAGE.nbd/history.jsonl, one JSON object per line,
// appended and fsynced — every rollback (when, to which snapshot, triggered
// by whom or by which policy) and every merge that finished. Append-only, so
// a crash can only leave a torn last line, which reading skips; a bad line
// before the end is corruption and an error.
//
// Crash consistency (src/rollback.ts): entries carry the merge job's id. A
// rollback's entry is appended after the manifest records the job; if a
// crash comes between, the next open finds the job in the manifest without
// its entry and appends it from the manifest's record. A merge's
// "merge-finished" entry is appended before the manifest drops the job; if a
// crash comes between, the resumed job finishes again and its entry is not
// appended twice.
import * as fs from 'node:fs';
import * as path from 'node:path';
import { NbdError } from './errors';
import { metaDir } from './volume-meta';

export interface HistoryEntry {
  at: string;
  event: 'rollback' | 'merge-finished';
  /** the merge job (rollback-<jobId>.merge) */
  jobId?: number;
  snapshot: string;
  snapshotId: number;
  /** rollback: 'command', 'policy:on-disconnect' or 'policy:on-start' */
  trigger?: string;
  /** rollback: user@host and PID of the command, or the policy's snapshot */
  by?: string;
  /** rollback: the running rollback it replaced */
  replaced?: string;
  /** rollback: chunks to merge; merge-finished: chunks merged */
  chunks?: number;
  /** merge-finished: how long the merge ran */
  ms?: number;
  /** rollback: appended at the next open, after a crash lost the original append */
  recovered?: boolean;
}

export function historyPath(image: string): string {
  return path.join(metaDir(image), 'history.jsonl');
}

export function appendHistory(image: string, entry: HistoryEntry): void {
  const file = historyPath(image);
  const fd = fs.openSync(file, 'a', 0o600); // private, as all of IMAGE.nbd/ (src/volume-meta.ts)
  try {
    fs.writeSync(fd, JSON.stringify(entry) + '\n');
    fs.fsyncSync(fd);
  } finally {
    fs.closeSync(fd);
  }
}

export function readHistory(image: string): HistoryEntry[] {
  const file = historyPath(image);
  let text: string;
  try {
    text = fs.readFileSync(file, 'utf8');
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return [];
    throw new NbdError('METADATA_CORRUPT', `cannot read ${file}: ${(err as Error).message}`);
  }
  const lines = text.split('\n');
  const out: HistoryEntry[] = [];
  lines.forEach((line, i) => {
    if (!line) return;
    let e: HistoryEntry | undefined;
    try {
      e = JSON.parse(line) as HistoryEntry;
    } catch {
      e = undefined;
    }
    const last = i === lines.length - 1; // no newline after it: a torn append
    if (!e || typeof e.at !== 'string' || typeof e.event !== 'string') {
      if (last) return;
      throw new NbdError('METADATA_CORRUPT', `${file} line ${i + 1} is damaged (corrupt metadata)`);
    }
    out.push(e);
  });
  return out;
}
