// A repository in a local directory. Keys are relative paths under the root.
//
// Atomic put: the bytes go to ROOT/tmp/<random> (same file system as the
// target), are fsynced, renamed over the final name, and the target's
// directory is fsynced, so after put() resolves the object survives a power
// cut, and a crash before leaves at most a stray file in ROOT/tmp (never a
// partial object under its real name). Directories created on the way are
// fsynced into their parents the first time. Readers never look in tmp/.
import * as fs from 'node:fs';
import * as fsp from 'node:fs/promises';
import * as path from 'node:path';
import { randomBytes } from 'node:crypto';
import { NbdError } from '../errors';
import { ObjectMissingError, type Backend, type ObjectInfo } from './backend';

const TMP = 'tmp';

function ioError(location: string, what: string, err: unknown): NbdError {
  const code = (err as NodeJS.ErrnoException).code;
  return new NbdError('REPO_IO_ERROR', `${location}: ${what}: ${code ?? (err as Error).message}`, { cause: err });
}

async function fsyncDir(dir: string): Promise<void> {
  const h = await fsp.open(dir, fs.constants.O_RDONLY | fs.constants.O_DIRECTORY);
  try {
    await h.sync();
  } finally {
    await h.close();
  }
}

export class LocalBackend implements Backend {
  readonly location: string;
  private readonly root: string;
  /** Directories known to exist and be durable in their parent. */
  private readonly madeDirs = new Set<string>();

  constructor(root: string) {
    this.root = path.resolve(root);
    this.location = this.root;
  }

  private file(key: string): string {
    if (key === '' || key.startsWith('/') || key.split('/').some((p) => p === '..' || p === '.' || p === '')) {
      throw new NbdError('BAD_ARGUMENT', `bad object key ${JSON.stringify(key)}`);
    }
    return path.join(this.root, key);
  }

  /** mkdir -p that fsyncs each directory it creates into its parent. */
  private async ensureDir(dir: string): Promise<void> {
    if (this.madeDirs.has(dir)) return;
    const parent = path.dirname(dir);
    if (parent !== dir && dir !== this.root) await this.ensureDir(parent);
    try {
      await fsp.mkdir(dir);
      await fsyncDir(parent);
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'EEXIST') throw ioError(this.location, `mkdir ${dir}`, err);
    }
    this.madeDirs.add(dir);
  }

  async put(key: string, data: Buffer): Promise<void> {
    const target = this.file(key);
    const tmpDir = path.join(this.root, TMP);
    await this.ensureDir(tmpDir);
    await this.ensureDir(path.dirname(target));
    const tmp = path.join(tmpDir, `${randomBytes(8).toString('hex')}.tmp`);
    try {
      const h = await fsp.open(tmp, 'wx', 0o644);
      try {
        let off = 0;
        while (off < data.length) {
          const { bytesWritten } = await h.write(data, off, data.length - off, off);
          off += bytesWritten;
        }
        await h.sync();
      } finally {
        await h.close();
      }
      await fsp.rename(tmp, target);
      await fsyncDir(path.dirname(target));
    } catch (err) {
      await fsp.rm(tmp, { force: true }).catch(() => undefined);
      throw ioError(this.location, `write ${key}`, err);
    }
  }

  async get(key: string): Promise<Buffer> {
    try {
      return await fsp.readFile(this.file(key));
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') throw new ObjectMissingError(key, this.location);
      throw ioError(this.location, `read ${key}`, err);
    }
  }

  async getRange(key: string, offset: number, length: number): Promise<Buffer> {
    let h: fsp.FileHandle;
    try {
      h = await fsp.open(this.file(key), 'r');
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') throw new ObjectMissingError(key, this.location);
      throw ioError(this.location, `open ${key}`, err);
    }
    try {
      const buf = Buffer.allocUnsafe(length);
      let done = 0;
      while (done < length) {
        const { bytesRead } = await h.read(buf, done, length - done, offset + done);
        if (bytesRead === 0) break;
        done += bytesRead;
      }
      return done === length ? buf : buf.subarray(0, done);
    } catch (err) {
      throw ioError(this.location, `read ${key}`, err);
    } finally {
      await h.close();
    }
  }

  async list(prefix: string): Promise<ObjectInfo[]> {
    // Keys are at most two levels deep below a top-level prefix; walk the tree.
    const out: ObjectInfo[] = [];
    const walk = async (rel: string): Promise<void> => {
      let entries: fs.Dirent[];
      try {
        entries = await fsp.readdir(path.join(this.root, rel), { withFileTypes: true });
      } catch (err) {
        if ((err as NodeJS.ErrnoException).code === 'ENOENT') return;
        if ((err as NodeJS.ErrnoException).code === 'ENOTDIR') return;
        throw ioError(this.location, `list ${rel}`, err);
      }
      for (const e of entries) {
        const key = rel === '' ? e.name : `${rel}/${e.name}`;
        if (key === TMP) continue;
        if (e.isDirectory()) {
          if (key.startsWith(prefix) || prefix.startsWith(`${key}/`)) await walk(key);
        } else if (e.isFile() && key.startsWith(prefix)) {
          try {
            const st = await fsp.stat(path.join(this.root, key));
            out.push({ key, size: st.size, mtimeMs: st.mtimeMs });
          } catch (err) {
            if ((err as NodeJS.ErrnoException).code !== 'ENOENT') throw ioError(this.location, `stat ${key}`, err);
          }
        }
      }
    };
    const top = prefix.includes('/') ? prefix.slice(0, prefix.lastIndexOf('/')) : '';
    await walk(top);
    return out;
  }

  async delete(key: string): Promise<void> {
    try {
      await fsp.unlink(this.file(key));
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'ENOENT') throw ioError(this.location, `delete ${key}`, err);
    }
  }

  async exists(key: string): Promise<boolean> {
    try {
      await fsp.stat(this.file(key));
      return true;
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') return false;
      throw ioError(this.location, `stat ${key}`, err);
    }
  }

  async now(): Promise<number> {
    return Date.now();
  }

  /** Whether the root exists and is a directory (a missing root is "not a repository"). */
  rootIsDirectory(): boolean {
    try {
      return fs.statSync(this.root).isDirectory();
    } catch {
      return false;
    }
  }

  /**
   * Removes files in ROOT/tmp older than `olderThanMs` (left by a process
   * killed mid-put). Prune calls it only while no backup runs.
   */
  async sweepTemp(olderThanMs: number): Promise<number> {
    const dir = path.join(this.root, TMP);
    let n = 0;
    let names: string[];
    try {
      names = await fsp.readdir(dir);
    } catch {
      return 0;
    }
    for (const name of names) {
      try {
        const st = await fsp.stat(path.join(dir, name));
        if (Date.now() - st.mtimeMs > olderThanMs) {
          await fsp.rm(path.join(dir, name), { force: true });
          n++;
        }
      } catch {
        /* gone meanwhile */
      }
    }
    return n;
  }

  async close(): Promise<void> {}
}
