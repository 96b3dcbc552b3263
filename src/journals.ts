// First-write journals as files (native/core/write_journal.hh,
// journal_state.hh): which one a volume has pending, journals in the journal
// directory that belong to no volume, and discarding a volume's pending
// journal on purpose.
//
// A journal belongs to a volume while the volume's IMAGE.nbd/journal.state
// names its id. Any other journal file is never replayed by anyone: it was
// left by a crash between creating a journal and recording it, or between
// forgetting a drained journal and deleting it, or by `journal discard`, or
// it is from an older build (format 1, named <dev>-<inode>-<birth>.journal).
// Such files pin memory in /dev/shm until removed: serve and info name them.
import * as fs from 'node:fs';
import * as path from 'node:path';
import { NbdError } from './errors';
import { native } from './native';
import { journalDir, journalDirProblem, journalStatePath, lockVolume } from './volume-meta';

export interface OrphanJournal {
  path: string;
  size: number;
  /** The image the journal says it belongs to ('' if unknown). */
  owner: string;
  why: string;
  /** Its volume could not be checked (not found where recorded): not known to be safe to remove. */
  unknown?: boolean;
}

/** Journal files in the journal directory (and beside none of the given volumes) that no volume's state names. */
export function orphanJournals(dir = journalDir()): OrphanJournal[] {
  let names: string[];
  try {
    names = fs.readdirSync(dir).filter((n) => n.endsWith('.journal'));
  } catch {
    return [];
  }
  const out: OrphanJournal[] = [];
  for (const n of names) {
    const file = path.join(dir, n);
    let size = 0;
    try {
      const st = fs.lstatSync(file);
      if (!st.isFile()) continue;
      size = st.size;
    } catch {
      continue; // removed meanwhile
    }
    const info = native.inspectJournal(file);
    if (!info) {
      out.push({ path: file, size, owner: '', why: 'not a journal this build reads (an older build\'s, or damaged)' });
      continue;
    }
    if (!info.owner || !path.isAbsolute(info.owner) || !fs.existsSync(info.owner)) {
      // Its volume is not where the journal says (moved with its IMAGE.nbd/,
      // or on a filesystem not mounted now): it may still be pending there.
      out.push({ path: file, size, owner: info.owner, why: `its volume ${info.owner || '(unrecorded)'} is not found: if it was moved, serving it replays this journal; remove it only if that volume is gone`, unknown: true });
      continue;
    }
    let named: { id: string; path: string } | null = null;
    try {
      named = native.readJournalState(journalStatePath(info.owner));
    } catch {
      continue; // the owner's state is damaged: its open reports that; do not call its journal an orphan
    }
    if (named?.id === info.id && samePath(named.path, file)) continue;
    out.push({ path: file, size, owner: info.owner, why: `volume ${info.owner} does not name it: nothing will replay it` });
  }
  return out;
}

function samePath(a: string, b: string): boolean {
  try {
    return fs.realpathSync(a) === fs.realpathSync(b);
  } catch {
    return false;
  }
}

/**
 * Removes the journals in `dir` that record `image` as their owner but that
 * its journal.state does not name: nothing will ever replay them (left by a
 * crash between making and recording a journal, or between forgetting and
 * deleting a drained one). Call it with the volume open (its lock held) and
 * its pending journal already replayed. Returns the removed paths.
 */
export function removeOwnOrphans(image: string, dir = journalDir()): string[] {
  const removed: string[] = [];
  if (journalDirProblem(dir)) return removed; // not ours (journalDirFor did not use it): delete nothing there
  let own: string;
  try {
    own = fs.realpathSync(image);
  } catch {
    return removed;
  }
  for (const j of orphanJournals(dir)) {
    let owner = '';
    try {
      owner = j.owner ? fs.realpathSync(j.owner) : '';
    } catch {
      continue;
    }
    if (owner !== own) continue;
    fs.rmSync(j.path, { force: true });
    removed.push(j.path);
  }
  return removed;
}

/** How to remove an orphan journal, for log lines and docs. */
export const ORPHAN_HINT = 'see: node-nbd-server journal list (each entry says whether it is safe to remove)';

/**
 * Forgets a volume's pending journal and deletes it: its acknowledged writes
 * that were not applied yet are lost. For when the journal is gone for good
 * (JOURNAL_MISSING) or damaged (JOURNAL_CORRUPT). Takes the volume lock, so
 * it refuses while a server or command has the volume open.
 */
export function discardJournal(image: string): { discarded: string | null } {
  if (!fs.existsSync(image)) throw new NbdError('IMAGE_NOT_FOUND', `image ${image} does not exist`);
  const unlock = lockVolume(image);
  try {
    const stateFile = journalStatePath(image);
    let st: { path: string } | null;
    try {
      st = native.readJournalState(stateFile);
    } catch {
      st = { path: '' }; // damaged: forget it all the same, that is what was asked
    }
    if (!st) return { discarded: null };
    native.clearJournalState(stateFile);
    if (st.path) fs.rmSync(st.path, { force: true });
    return { discarded: st.path || stateFile };
  } finally {
    unlock();
  }
}
