// Images: the raw files we serve. Opening checks what the user asked for
// against what is on disk, and creates a sparse file when asked to. The raw
// file always stays a plain image other tools can read. (A volume with
// snapshots, its metadata beside the image, is src/volume.ts.)
import * as fs from 'node:fs';
import * as path from 'node:path';
import { NbdError } from './errors';

export interface ImageSpec {
  /** Path to the image file (or block device). */
  path: string;
  /** Export name; defaults to the file's basename without extension. */
  name?: string;
  readOnly?: boolean;
  description?: string;
  /** Manage snapshots for this image (metadata in IMAGE.nbd/). Default false. */
  snapshots?: boolean;
  /** Chunk size for a volume that has no snapshot metadata yet. */
  chunkSize?: number;
}

export interface PreparedImage {
  path: string;
  name: string;
  size: number;
  created: boolean;
  readOnly: boolean;
  description?: string;
}

/** disk.img -> "disk"; archive.tar.gz -> "archive.tar"; noext -> "noext". */
export function exportNameFor(imagePath: string): string {
  const base = path.basename(imagePath);
  const ext = path.extname(base);
  return ext && ext !== base ? base.slice(0, -ext.length) : base;
}

/**
 * Makes sure an image exists: an existing file is used as it is (never
 * truncated or grown); a missing one is created sparse when `size` is given,
 * and is an IMAGE_NOT_FOUND error otherwise.
 */
export function prepareImage(spec: ImageSpec, size?: number): PreparedImage {
  const name = spec.name ?? exportNameFor(spec.path);
  let st: fs.Stats | undefined;
  try {
    st = fs.statSync(spec.path);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'ENOENT') {
      throw new NbdError('IMAGE_OPEN_FAILED', `cannot stat ${spec.path}: ${(err as Error).message}`);
    }
  }
  if (st) {
    if (!st.isFile() && !st.isBlockDevice()) {
      throw new NbdError('IMAGE_OPEN_FAILED', `${spec.path} is not a regular file or block device`);
    }
    return {
      path: spec.path,
      name,
      size: st.isFile() ? st.size : 0,
      created: false,
      readOnly: spec.readOnly ?? false,
      description: spec.description,
    };
  }
  if (size === undefined) {
    throw new NbdError('IMAGE_NOT_FOUND', `image ${spec.path} does not exist; pass --size to create it (e.g. --size 1G)`);
  }
  if (spec.readOnly) {
    throw new NbdError('IMAGE_NOT_FOUND', `image ${spec.path} does not exist, and a read-only export cannot create it`);
  }
  try {
    const fd = fs.openSync(spec.path, fs.constants.O_RDWR | fs.constants.O_CREAT | fs.constants.O_EXCL, 0o644);
    try {
      fs.ftruncateSync(fd, size);
    } finally {
      fs.closeSync(fd);
    }
  } catch (err) {
    throw new NbdError('IMAGE_CREATE_FAILED', `cannot create ${spec.path}: ${(err as Error).message}`);
  }
  return { path: spec.path, name, size, created: true, readOnly: false, description: spec.description };
}
