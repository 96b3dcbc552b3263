// REPO strings: a local directory path, or s3://BUCKET[/PREFIX]. This is the
// one place that picks a backend and reads key files.
import * as fsp from 'node:fs/promises';
import { NbdError } from '../errors';
import type { Backend } from './backend';
import { LocalBackend } from './backend-local';
import type { S3Options } from './backend-s3';
import { Repository } from './repository';

/** S3 settings that CLI flags may give; the rest comes from the AWS environment. */
export type S3Flags = Omit<S3Options, 'bucket' | 'prefix'>;

export function parseS3Url(repo: string): { bucket: string; prefix: string } {
  const m = /^s3:\/\/([^/]+)\/?(.*)$/.exec(repo);
  if (!m || m[1] === '') throw new NbdError('BAD_ARGUMENT', `bad S3 location ${JSON.stringify(repo)}: expected s3://BUCKET/PREFIX`);
  return { bucket: m[1]!, prefix: m[2]!.replace(/\/+$/, '') };
}

export function openBackend(repo: string, s3: S3Flags = {}): Backend {
  if (repo.startsWith('s3://')) {
    // Loaded on first use: the AWS SDK adds ~0.2 s to start-up, which local repositories need not pay.
    // eslint-disable-next-line @typescript-eslint/no-require-imports
    const { S3Backend } = require('./backend-s3') as typeof import('./backend-s3');
    return new S3Backend({ ...parseS3Url(repo), ...s3 });
  }
  if (/^[a-z][a-z0-9+.-]*:\/\//i.test(repo)) {
    throw new NbdError('BAD_ARGUMENT', `unsupported repository location ${JSON.stringify(repo)}: use a directory or s3://BUCKET/PREFIX`);
  }
  return new LocalBackend(repo);
}

export interface RepoAccess {
  /** Path of the key file (encrypted repositories). */
  keyFile?: string;
  s3?: S3Flags;
}

async function readKeyFile(file: string | undefined): Promise<Buffer | undefined> {
  if (file === undefined) return undefined;
  try {
    return await fsp.readFile(file);
  } catch (err) {
    throw new NbdError('BAD_ARGUMENT', `cannot read the key file ${file}: ${(err as NodeJS.ErrnoException).code ?? err}`, { cause: err });
  }
}

/** Opens the repository at a REPO string. */
export async function openRepository(repo: string, access: RepoAccess = {}): Promise<Repository> {
  const key = await readKeyFile(access.keyFile);
  const backend = openBackend(repo, access.s3);
  try {
    return await Repository.open(backend, { key });
  } catch (err) {
    await backend.close();
    throw err;
  }
}

/** Creates a repository at a REPO string (a local directory is created if missing). */
export async function initRepository(repo: string, access: RepoAccess = {}): Promise<Repository> {
  const key = await readKeyFile(access.keyFile);
  const backend = openBackend(repo, access.s3);
  try {
    if (backend instanceof LocalBackend) await fsp.mkdir(repo, { recursive: true });
    return await Repository.init(backend, { key });
  } catch (err) {
    await backend.close();
    throw err;
  }
}
