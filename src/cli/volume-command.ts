// Runs a volume command online or offline: when a server serves IMAGE, it
// does the work (through IMAGE.nbd/control.sock); otherwise the command opens
// the volume itself, under the volume lock, and closes it again.
import * as fs from 'node:fs';
import { callControl, type ControlRequest } from '../control';
import { NbdError } from '../errors';
import { createLogger } from '../logger';
import { NbdServer } from '../server';
import type { Volume } from '../volume';

export async function onVolume(image: string, req: ControlRequest, offline: (v: Volume) => Promise<unknown> | unknown): Promise<unknown> {
  const online = await callControl(image, req);
  if (online) return online.result;
  if (!fs.existsSync(image)) throw new NbdError('IMAGE_NOT_FOUND', `image ${image} does not exist`);
  const server = new NbdServer({ logger: createLogger('warn') });
  try {
    const exp = server.addImage({ path: image, snapshots: true });
    return await offline(server.volume(exp.name));
  } finally {
    await server.close();
  }
}

/** Prints `value` as JSON with --json, else as text. */
export function output<T>(o: { json?: boolean }, value: T, text: (v: T) => void): void {
  if (o.json) process.stdout.write(JSON.stringify(value, null, 2) + '\n');
  else text(value);
}
