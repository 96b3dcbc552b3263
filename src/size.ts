// Human sizes: "512M", "1G", "1T", "4096", "1.5G", "64k" (binary units, as
// dd, qemu-img and nbdkit use them).
import { NbdError } from './errors';

const UNITS: Record<string, number> = {
  '': 1,
  b: 1,
  k: 2 ** 10,
  m: 2 ** 20,
  g: 2 ** 30,
  t: 2 ** 40,
  p: 2 ** 50,
  e: 2 ** 60,
};

/** Largest size we accept: the largest file Linux allows (2^63 - 1 rounded down to a safe JS integer). */
export const MAX_SIZE = Number.MAX_SAFE_INTEGER;

export function parseSize(text: string): number {
  const m = /^\s*(\d+(?:\.\d+)?)\s*([kmgtpe]?)(?:i?b)?\s*$/i.exec(text);
  if (!m) throw new NbdError('BAD_SIZE', `invalid size "${text}": use a number with an optional unit K, M, G, T (e.g. 512M, 1G)`);
  const unit = UNITS[m[2]!.toLowerCase()]!;
  const value = Number(m[1]) * unit;
  if (!Number.isFinite(value) || value > MAX_SIZE) throw new NbdError('BAD_SIZE', `size "${text}" is too large`);
  if (!Number.isInteger(value)) throw new NbdError('BAD_SIZE', `size "${text}" is not a whole number of bytes`);
  if (value <= 0) throw new NbdError('BAD_SIZE', `size "${text}" must be greater than zero`);
  return value;
}

export function formatSize(bytes: number): string {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB'];
  let v = bytes;
  let i = 0;
  while (v >= 1024 && i < units.length - 1) {
    v /= 1024;
    i++;
  }
  return `${Number.isInteger(v) ? v : v.toFixed(1)} ${units[i]}`;
}
