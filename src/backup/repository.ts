// A backup repository on a backend: its config (format version, encryption),
// the object layout, and typed reads and writes of each object kind.
//
// Layout (docs/backup-format.md):
//   config                    JSON + SHA-256 line: format, version, id, encryption
//   packs/<hh>/<sha256>       chunk blobs (pack.ts)
//   packidx/<sha256>          the pack's index, on its own
//   indexes/<backup id>       per-volume-chunk ids (backup-index.ts)
//   backups/<backup id>       manifest, written last (manifest.ts)
//   locks/<lock id>           live backups and prunes (locks.ts)
//
// The chunk map (chunkMap()) is every chunk id in every packidx: a backup
// skips chunks already in it, restore and verify find blobs with it. Memory
// is about 120 bytes per stored chunk; it is loaded once per operation.
import { createHash, randomBytes } from 'node:crypto';
import { NbdError } from '../errors';
import { isObjectMissing, type Backend } from './backend';
import { LocalBackend } from './backend-local';
import { BackupIndex, indexKey } from './backup-index';
import { forEachLimit } from './bounded';
import { newEncryption, openEncryption, type EncryptionConfig, type RepoKeys } from './keys';
import { isBackupId, manifestKey, openManifest, sealManifest, type Manifest } from './manifest';
import { openPackIndex, packIndexKey, packKey, sealPackIndex, type PackEntry } from './pack';

export const FORMAT_NAME = 'node-nbd-server backup repository';
export const FORMAT_VERSION = 1;
export const CONFIG_KEY = 'config';

export interface RepoConfig {
  format: string;
  version: number;
  id: string;
  created: string;
  encryption: EncryptionConfig | null;
}

export interface ChunkLocation {
  pack: string;
  entry: PackEntry;
}

/** Chunk id (as a latin1 string of its 32 bytes) -> where it is stored. */
export type ChunkMap = Map<string, ChunkLocation>;

export function idKey(id: Buffer): string {
  return id.toString('latin1');
}

function encodeConfig(c: RepoConfig): Buffer {
  const json = JSON.stringify(c);
  return Buffer.from(`${json}\n${createHash('sha256').update(json).digest('hex')}\n`);
}

function decodeConfig(data: Buffer, where: string): RepoConfig {
  const text = data.toString('utf8');
  // Someone else's file named config (a git directory, say): not a repository, rather than a damaged one.
  if (!text.includes(JSON.stringify(FORMAT_NAME))) throw new NbdError('REPO_NOT_FOUND', `${where} is not a node-nbd-server backup repository`);
  const [json, sum] = text.split('\n');
  if (json === undefined || sum === undefined || createHash('sha256').update(json).digest('hex') !== sum) {
    throw new NbdError('REPO_CORRUPT', `${where}: the repository config fails its checksum`);
  }
  let c: RepoConfig;
  try {
    c = JSON.parse(json) as RepoConfig;
  } catch (err) {
    throw new NbdError('REPO_CORRUPT', `${where}: the repository config is not JSON`, { cause: err });
  }
  if (c.format !== FORMAT_NAME) throw new NbdError('REPO_NOT_FOUND', `${where} is not a node-nbd-server backup repository`);
  if (c.version > FORMAT_VERSION) {
    throw new NbdError('REPO_VERSION', `${where}: repository format version ${c.version}; this version reads ${FORMAT_VERSION}`);
  }
  return c;
}

export interface OpenOptions {
  /** The key file's bytes (encrypted repositories). */
  key?: Buffer;
}

export class Repository {
  readonly backend: Backend;
  readonly config: RepoConfig;
  readonly keys: RepoKeys | null;

  private constructor(backend: Backend, config: RepoConfig, keys: RepoKeys | null) {
    this.backend = backend;
    this.config = config;
    this.keys = keys;
  }

  /** Creates a repository; REPO_EXISTS when the location holds one already. */
  static async init(backend: Backend, opts: OpenOptions = {}): Promise<Repository> {
    const probe = (backend as Partial<ProbeCapable>).probe;
    if (typeof probe === 'function') await probe.call(backend);
    if (await backend.exists(CONFIG_KEY)) throw new NbdError('REPO_EXISTS', `${backend.location} already holds a backup repository`);
    const enc = opts.key ? newEncryption(opts.key) : null;
    const config: RepoConfig = {
      format: FORMAT_NAME,
      version: FORMAT_VERSION,
      id: randomBytes(16).toString('hex'),
      created: new Date().toISOString(),
      encryption: enc?.config ?? null,
    };
    await backend.put(CONFIG_KEY, encodeConfig(config));
    return new Repository(backend, config, enc?.keys ?? null);
  }

  /** Opens a repository: REPO_NOT_FOUND, BACKUP_KEY_REQUIRED, BACKUP_KEY_WRONG, REPO_VERSION. */
  static async open(backend: Backend, opts: OpenOptions = {}): Promise<Repository> {
    if (backend instanceof LocalBackend && !backend.rootIsDirectory()) {
      throw new NbdError('REPO_NOT_FOUND', `${backend.location} is not a backup repository (no such directory; create one with: node-nbd-server backup init ${backend.location})`);
    }
    let data: Buffer;
    try {
      data = await backend.get(CONFIG_KEY);
    } catch (err) {
      if (isObjectMissing(err)) throw new NbdError('REPO_NOT_FOUND', `${backend.location} is not a backup repository (it has no config; an empty location becomes one with: node-nbd-server backup init ${backend.location})`);
      throw err;
    }
    const config = decodeConfig(data, backend.location);
    let keys: RepoKeys | null = null;
    if (config.encryption) {
      if (!opts.key) throw new NbdError('BACKUP_KEY_REQUIRED', `${backend.location} is encrypted: give its key file (--key-file)`);
      keys = openEncryption(config.encryption, opts.key);
    } else if (opts.key) {
      throw new NbdError('BACKUP_KEY_WRONG', `${backend.location} is not encrypted, but a key file was given`);
    }
    return new Repository(backend, config, keys);
  }

  get location(): string {
    return this.backend.location;
  }

  // --- packs ---------------------------------------------------------------

  /** Writes a pack, then its packidx (that order: see pack.ts). */
  async putPack(name: string, data: Buffer, entries: PackEntry[]): Promise<void> {
    await this.backend.put(packKey(name), data);
    await this.backend.put(packIndexKey(name), sealPackIndex(this.keys, name, entries));
  }

  async listPackNames(): Promise<Map<string, number>> {
    const out = new Map<string, number>();
    for (const o of await this.backend.list('packs/')) {
      const name = o.key.slice(o.key.lastIndexOf('/') + 1);
      if (/^[0-9a-f]{64}$/.test(name) && o.key === packKey(name)) out.set(name, o.size);
    }
    return out;
  }

  async listPackIndexNames(): Promise<string[]> {
    return (await this.backend.list('packidx/')).map((o) => o.key.slice('packidx/'.length)).filter((n) => /^[0-9a-f]{64}$/.test(n));
  }

  async readPackIndex(name: string): Promise<PackEntry[]> {
    return openPackIndex(this.keys, name, await this.backend.get(packIndexKey(name)));
  }

  /**
   * Every stored chunk: loads all packidx objects (16 at a time). A packidx
   * that fails its checksum throws REPO_CORRUPT, unless `onCorrupt` takes it
   * (its chunks are then left out of the map).
   */
  async chunkMap(onCorrupt?: (pack: string, err: NbdError) => void): Promise<ChunkMap> {
    const map: ChunkMap = new Map();
    const names = await this.listPackIndexNames();
    await forEachLimit(names, 16, async (name) => {
      let entries: PackEntry[];
      try {
        entries = await this.readPackIndex(name);
      } catch (err) {
        if (isObjectMissing(err)) return; // deleted by a prune since the listing
        if (onCorrupt && err instanceof NbdError && (err.code === 'REPO_CORRUPT' || err.code === 'REPO_VERSION')) {
          onCorrupt(name, err);
          return;
        }
        throw err;
      }
      for (const entry of entries) map.set(idKey(entry.id), { pack: name, entry });
    });
    return map;
  }

  readPackRange(name: string, offset: number, length: number): Promise<Buffer> {
    return this.backend.getRange(packKey(name), offset, length);
  }

  // --- backups -------------------------------------------------------------

  async putIndex(backupId: string, index: BackupIndex): Promise<{ key: string; sha256: string }> {
    const data = index.seal(this.keys, backupId);
    const key = indexKey(backupId);
    await this.backend.put(key, data);
    return { key, sha256: createHash('sha256').update(data).digest('hex') };
  }

  async putManifest(m: Manifest): Promise<void> {
    await this.backend.put(manifestKey(m.id), sealManifest(this.keys, m));
  }

  async listBackupIds(): Promise<string[]> {
    return (await this.backend.list('backups/'))
      .map((o) => o.key.slice('backups/'.length))
      .filter(isBackupId)
      .sort();
  }

  async readManifest(id: string): Promise<Manifest> {
    try {
      return openManifest(this.keys, id, await this.backend.get(manifestKey(id)));
    } catch (err) {
      if (isObjectMissing(err)) throw new NbdError('BACKUP_NOT_FOUND', `${this.location}: no backup ${id}`);
      throw err;
    }
  }

  /** All finished backups, oldest first. */
  async listManifests(): Promise<Manifest[]> {
    const ids = await this.listBackupIds();
    const out: (Manifest | undefined)[] = new Array(ids.length);
    await forEachLimit(ids.keys(), 16, async (i) => {
      try {
        out[i] = await this.readManifest(ids[i]!);
      } catch (err) {
        if (!(err instanceof NbdError && err.code === 'BACKUP_NOT_FOUND')) throw err; // pruned since the listing
      }
    });
    return out.filter((m): m is Manifest => m !== undefined);
  }

  async readIndex(m: Manifest): Promise<BackupIndex> {
    let data: Buffer;
    try {
      data = await this.backend.get(m.index.key);
    } catch (err) {
      if (isObjectMissing(err)) throw new NbdError('REPO_CORRUPT', `${this.location}: backup ${m.id} has no index (${m.index.key})`);
      throw err;
    }
    if (createHash('sha256').update(data).digest('hex') !== m.index.sha256) {
      throw new NbdError('REPO_CORRUPT', `${this.location}: the index of backup ${m.id} does not match its manifest`);
    }
    const idx = BackupIndex.open(this.keys, m.id, data);
    if (idx.size !== m.size || idx.chunkSize !== m.chunkSize) throw new NbdError('REPO_CORRUPT', `backup ${m.id}: index and manifest disagree on the volume`);
    return idx;
  }

  async close(): Promise<void> {
    await this.backend.close();
  }
}

/** Backends that can check reachability and credentials up front (S3). */
interface ProbeCapable {
  probe(): Promise<void>;
}
