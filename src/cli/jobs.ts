// `node-nbd-server jobs IMAGE [--all] [--wait] [--json]` and
// `jobs cancel IMAGE ID` (or `jobs cancel ID --image IMAGE`): the volume's
// jobs of every kind (src/jobs.ts). Online the serving server answers
// (control socket); offline the command opens the volume itself: it lists
// the records (an interrupted job shows as running, owned by the killed
// process), and with --wait it runs them to their end here.
import { Command } from 'commander';
import { SingleBar } from 'cli-progress';
import { callControl } from '../control';
import { NbdError } from '../errors';
import { isFinished } from '../jobs';
import type { Volume, VolumeJob } from '../volume';
import { onVolume, output } from './volume-command';

/** What a job is about, for a progress bar or a line. */
function subject(j: VolumeJob): string {
  if (j.type === 'backup') return `backup of ${j.snapshot} to ${j.repo}`;
  return `merging ${j.snapshot}`;
}

/**
 * A progress bar on stderr for the first job shown: redrawn in place on a
 * terminal, a plain line every 2 s otherwise.
 */
export function jobBar(): { update(jobs: VolumeJob[]): void; stop(): void } {
  const bar = new SingleBar({
    format: '{subject} [{bar}] {percentage}% | {value}/{total} chunks | {duration_formatted}',
    stream: process.stderr,
    noTTYOutput: true,
    notTTYSchedule: 2000,
    hideCursor: true,
  });
  let started = false;
  let ended: string | undefined;
  return {
    update(jobs) {
      const j = jobs[0];
      if (!j || j.total === 0) return; // the total is known once the job reads
      ended = isFinished(j.state) ? j.state : undefined;
      if (!started) {
        bar.start(Math.max(j.total, 1), j.done, { subject: subject(j) });
        started = true;
      }
      bar.setTotal(Math.max(j.total, 1));
      bar.update(j.done, { subject: subject(j) });
    },
    stop() {
      // Waits that end with nothing left (jobs --wait) ended well; a job that failed or was canceled keeps its count.
      if (started && (ended === undefined || ended === 'done')) bar.update(bar.getTotal());
      bar.stop();
    },
  };
}

/** Waits until the volume has no unfinished job; online by polling the server, else running them here. */
export async function waitJobs(image: string, show: boolean): Promise<void> {
  const bar = show ? jobBar() : undefined;
  try {
    for (;;) {
      const online = await callControl(image, { op: 'jobs' });
      if (!online) {
        // No server (or it stopped): run them here.
        await onVolume(image, { op: 'ping' }, async (v: Volume) => {
          v.jobs.resume();
          await v.jobs.wait((j) => bar?.update(j));
        });
        return;
      }
      const jobs = online.result as VolumeJob[];
      bar?.update(jobs);
      if (jobs.length === 0) return;
      await new Promise((r) => setTimeout(r, 200));
    }
  } finally {
    bar?.stop();
  }
}

/**
 * Waits for job `id` of the volume served by another process to finish
 * (polling its control socket); resolves with it as it ended.
 */
export async function waitJobOnline(image: string, id: number, show: boolean): Promise<VolumeJob> {
  const bar = show ? jobBar() : undefined;
  try {
    for (;;) {
      const online = await callControl(image, { op: 'jobs', all: true });
      if (!online) throw new NbdError('SERVER_CLOSED', `the server serving ${image} stopped before job ${id} finished; it resumes at the next serve (or: node-nbd-server jobs ${image} --wait)`);
      const j = (online.result as VolumeJob[]).find((x) => x.id === id);
      if (!j) throw new NbdError('JOB_NOT_FOUND', `job ${id} is gone from ${image}`);
      bar?.update([j]);
      if (isFinished(j.state)) return j;
      await new Promise((r) => setTimeout(r, 200));
    }
  } finally {
    bar?.stop();
  }
}

/** Throws the error that ended a failed or canceled job (its stable code). */
export function throwIfUnsuccessful(j: VolumeJob): void {
  if (j.state === 'canceled') throw new NbdError('JOB_CANCELED', `job ${j.id} (${j.type}) was canceled${j.error && j.error !== 'canceled' ? `: ${j.error}` : ''}`);
  if (j.state === 'failed') {
    const code = (j.errorCode ?? 'BACKUP_SOURCE_FAILED') as ConstructorParameters<typeof NbdError>[0];
    throw new NbdError(code, `job ${j.id} (${j.type}) failed: ${j.error ?? 'unknown error'}`);
  }
}

export function printJobs(jobs: VolumeJob[]): void {
  if (jobs.length === 0) {
    process.stdout.write('no jobs\n');
    return;
  }
  for (const j of jobs) {
    const head = `job ${j.id} ${j.type} ${j.state}`;
    const prog = `${j.percent}% (${j.done}/${j.total} chunks)`;
    let line: string;
    if (j.type === 'backup') {
      line =
        `${head}: snapshot ${j.snapshot}${j.autoSnapshot ? ' (made by the job)' : ''} to ${j.repo} as backup ${j.backup}` +
        (j.parent ? ` (incremental from ${j.parent})` : j.parent === null ? ' (full)' : '') +
        `, ${prog}, started ${j.startedAt} by pid ${j.owner.pid} on ${j.owner.host}`;
    } else {
      line = `${head}: ${j.type}: to snapshot ${j.snapshot}, ${prog}, started ${j.startedAt} by ${j.trigger} (${j.by})`;
    }
    if (j.error) line += isFinished(j.state) ? `: ${j.error}` : `, retrying after: ${j.error}`;
    process.stdout.write(line + '\n');
  }
}

export function registerJobs(program: Command): void {
  const jobs = program
    .command('jobs')
    .description("Show the volume's jobs (rollback merges, backups) and their progress; `jobs cancel` cancels one.")
    .argument('<image>', 'image file')
    .option('--all', 'also the last finished jobs (done, failed, canceled)')
    .option('--json', 'machine-readable output')
    .option('--wait', 'wait until they finish (offline: run them here), with a progress bar')
    .action(async (image: string, o: { json?: boolean; wait?: boolean; all?: boolean }) => {
      if (o.wait) await waitJobs(image, !o.json);
      const list = (await onVolume(image, { op: 'jobs', all: o.all }, (v) => v.jobs.list({ all: o.all }))) as VolumeJob[];
      output(o, list, printJobs);
    });
  jobs
    .command('cancel')
    .description('Cancel a job: `jobs cancel IMAGE ID`, or `jobs cancel ID --image IMAGE`. A rollback merge cannot be canceled.')
    .argument('<image-or-id>', 'image file (or the job id, with --image)')
    .argument('[id]', 'job id')
    .option('--image <image>', 'image file, when only the id is given')
    .option('--json', 'machine-readable output')
    .action(async (a: string, b: string | undefined, o: { image?: string; json?: boolean }, cmd: Command) => {
      // `jobs` has --json too: commander gives it to the parent when it stands after the subcommand.
      const json = Boolean(o.json ?? (cmd.parent?.opts() as { json?: boolean } | undefined)?.json);
      const image = b !== undefined ? a : o.image;
      const idText = b !== undefined ? b : a;
      if (!image) throw new NbdError('BAD_ARGUMENT', 'which volume? use: node-nbd-server jobs cancel IMAGE ID (or ID --image IMAGE)');
      if (!/^\d+$/.test(idText)) throw new NbdError('BAD_ARGUMENT', `job id must be a number, got "${idText}"`);
      const id = Number(idText);
      const j = (await onVolume(image, { op: 'job-cancel', id }, (v) => v.jobs.cancel(id, v.image))) as VolumeJob;
      output({ json }, j, (x) => process.stdout.write(`job ${x.id} (${x.type}): ${x.state}\n`));
    });
}
