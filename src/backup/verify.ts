// verify(): checks a repository, or one backup, and names every problem.
//
// Always (metadata): every selected manifest opens (checksum / GCM), its
// index opens and matches the manifest's SHA-256, every non-zero chunk id
// it names is in some packidx, and every pack those chunks live in is
// listed with a size that covers its blobs.
// With readData: every pack referenced by the selected backups is read in
// full; its SHA-256 must equal its name, and every blob the backups use must
// decode and match its id. A bad blob is named down to the pack, the chunk
// id and each (backup, chunk index) that uses it. Memory: `concurrency`
// whole packs at a time.
import { createHash } from 'node:crypto';
import { NbdError } from '../errors';
import { isObjectMissing } from './backend';
import type { BackupIndex } from './backup-index';
import { decodeChunk } from './chunk-codec';
import type { Manifest } from './manifest';
import { packKey, type PackEntry } from './pack';
import { idKey, type Repository } from './repository';
import { forEachLimit } from './bounded';

export type ProblemKind = 'PACKIDX_CORRUPT' | 'MANIFEST_CORRUPT' | 'INDEX_CORRUPT' | 'CHUNK_MISSING' | 'PACK_MISSING' | 'PACK_TRUNCATED' | 'PACK_CORRUPT' | 'CHUNK_CORRUPT';

export interface VerifyProblem {
  kind: ProblemKind;
  message: string;
  backup?: string;
  pack?: string;
  chunkId?: string;
  /** The volume chunks (per backup) that use a corrupt or missing chunk. */
  usedBy?: { backup: string; chunks: number[] }[];
}

export interface VerifyResult {
  ok: boolean;
  backups: number;
  chunksChecked: number;
  packsChecked: number;
  bytesRead: number;
  problems: VerifyProblem[];
}

export interface VerifyOptions {
  /** Only this backup (default: all). */
  backup?: string;
  readData?: boolean;
  concurrency?: number;
}

type Users = Map<string, { backup: string; chunks: number[] }[]>;

/** Which (backup, volume chunk) use each of `ids`: one more pass over the indexes, one at a time. */
async function usersOf(repo: Repository, ids: Set<string>, manifests: Manifest[]): Promise<Users> {
  const out: Users = new Map([...ids].map((h) => [h, []]));
  if (ids.size === 0) return out;
  for (const m of manifests) {
    const index = await repo.readIndex(m);
    const found = new Map<string, number[]>();
    for (let i = 0; i < index.count; i++) {
      const h = index.id(i).toString('hex');
      if (!ids.has(h)) continue;
      const l = found.get(h) ?? [];
      l.push(i);
      found.set(h, l);
    }
    for (const [h, chunks] of found) out.get(h)!.push({ backup: m.id, chunks });
  }
  return out;
}

export async function verify(repo: Repository, opts: VerifyOptions = {}): Promise<VerifyResult> {
  const problems: VerifyProblem[] = [];
  const result: VerifyResult = { ok: true, backups: 0, chunksChecked: 0, packsChecked: 0, bytesRead: 0, problems };
  const ids = opts.backup ? [opts.backup] : await repo.listBackupIds();
  const known = await repo.chunkMap((pack, err) => problems.push({ kind: 'PACKIDX_CORRUPT', pack, message: err.message }));
  const packSizes = await repo.listPackNames();

  // Indexes are read one at a time (32 B per volume chunk each); what is
  // kept is per stored chunk: the blobs each pack must hold.
  const needed = new Map<string, Map<string, PackEntry>>();
  const missing = new Set<string>();
  const loaded: Manifest[] = [];
  for (const id of ids) {
    let m: Manifest;
    try {
      m = await repo.readManifest(id);
    } catch (err) {
      if (err instanceof NbdError && (err.code === 'REPO_CORRUPT' || err.code === 'REPO_VERSION')) {
        problems.push({ kind: 'MANIFEST_CORRUPT', backup: id, message: err.message });
        continue;
      }
      throw err;
    }
    let index: BackupIndex;
    try {
      index = await repo.readIndex(m);
    } catch (err) {
      if (err instanceof NbdError && err.code === 'REPO_CORRUPT') {
        problems.push({ kind: 'INDEX_CORRUPT', backup: id, message: err.message });
        continue;
      }
      throw err;
    }
    loaded.push(m);
    for (let i = 0; i < index.count; i++) {
      if (index.isZero(i)) continue;
      const id = index.id(i);
      const loc = known.get(idKey(id));
      if (!loc) {
        missing.add(id.toString('hex'));
        continue;
      }
      let blobs = needed.get(loc.pack);
      if (!blobs) needed.set(loc.pack, (blobs = new Map()));
      blobs.set(idKey(id), loc.entry);
    }
  }
  result.backups = loaded.length;
  const missingUsers = await usersOf(repo, missing, loaded);
  for (const hex of missing) {
    const usedBy = missingUsers.get(hex)!;
    problems.push({
      kind: 'CHUNK_MISSING',
      chunkId: hex,
      usedBy,
      message: `chunk ${hex} is in no pack; used by ${usedBy.map((u) => `backup ${u.backup} chunks ${u.chunks.join(',')}`).join('; ')}`,
    });
  }
  for (const [pack, blobs] of needed) {
    const size = packSizes.get(pack);
    if (size === undefined) {
      problems.push({ kind: 'PACK_MISSING', pack, message: `pack ${packKey(pack)} is missing (${blobs.size} chunks in use)` });
      continue;
    }
    let end = 0;
    for (const e of blobs.values()) end = Math.max(end, e.offset + e.length);
    if (end > size) problems.push({ kind: 'PACK_TRUNCATED', pack, message: `pack ${packKey(pack)} has ${size} bytes; its index needs ${end}` });
    result.chunksChecked += blobs.size;
  }

  if (opts.readData) {
    const corrupt = new Map<string, string>(); // chunk id hex -> pack
    await forEachLimit([...needed.keys()].filter((p) => packSizes.has(p)), opts.concurrency ?? 2, async (pack) => {
      let data: Buffer;
      try {
        data = await repo.backend.get(packKey(pack));
      } catch (err) {
        if (isObjectMissing(err)) {
          problems.push({ kind: 'PACK_MISSING', pack, message: `pack ${packKey(pack)} is missing` });
          return;
        }
        throw err;
      }
      result.bytesRead += data.length;
      result.packsChecked++;
      let badBlobs = 0;
      for (const e of needed.get(pack)!.values()) {
        const blob = data.subarray(e.offset, e.offset + e.length);
        if (blob.length !== e.length || decodeChunk(repo.keys, e.id, blob, e.rawLength) === null) {
          corrupt.set(e.id.toString('hex'), pack);
          badBlobs++;
        }
      }
      if (badBlobs === 0 && createHash('sha256').update(data).digest('hex') !== pack) {
        problems.push({ kind: 'PACK_CORRUPT', pack, message: `pack ${packKey(pack)} fails its checksum outside the chunks in use` });
      }
    });
    const corruptUsers = await usersOf(repo, new Set(corrupt.keys()), loaded);
    for (const [hex, pack] of corrupt) {
      const usedBy = corruptUsers.get(hex)!;
      problems.push({
        kind: 'CHUNK_CORRUPT',
        pack,
        chunkId: hex,
        usedBy,
        message: `pack ${packKey(pack)}: chunk ${hex} fails verification; used by ${usedBy
          .map((u) => `backup ${u.backup} chunk${u.chunks.length > 1 ? 's' : ''} ${u.chunks.join(',')}`)
          .join('; ')}`,
      });
    }
  }
  result.ok = problems.length === 0;
  return result;
}
