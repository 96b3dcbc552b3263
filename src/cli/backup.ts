// `node-nbd-server backup init|create|list|restore|verify|prune`.
//
// `backup create IMAGE --repo REPO` is a job of the volume (src/backup-job.ts):
// online the serving server runs it (control socket; the command returns once
// it is recorded, or with --wait when it ended); offline this process opens
// the volume and runs it to its end. The other commands are a thin layer over
// the backup library (src/backup/index.ts) and need no volume.
//
// REPO: a directory, or s3://BUCKET/PREFIX with the endpoint and credentials
// from the AWS environment (AWS_ENDPOINT_URL, AWS_REGION, AWS_ACCESS_KEY_ID,
// AWS_SECRET_ACCESS_KEY, ...) or the --s3-* flags.
import * as path from 'node:path';
import { Command } from 'commander';
import type { BackupJobInfo, BackupRequest } from '../backup-job';
import {
  FileTarget,
  NbdTarget,
  closeCodecPool,
  initRepository,
  listBackups,
  openRepository,
  prune,
  restore,
  verify,
  type BackupListEntry,
  type PrunePolicy,
  type Repository,
  type RestoreTarget,
  type S3Flags,
} from '../backup/index';
import { NbdError } from '../errors';
import { isFinished } from '../jobs';
import { formatSize } from '../size';
import type { Volume, VolumeJob } from '../volume';
import { jobBar, throwIfUnsuccessful, waitJobOnline } from './jobs';
import { nonNegativeInt } from './common';
import { onVolume, output } from './volume-command';

interface RepoOptions {
  keyFile?: string;
  s3Endpoint?: string;
  s3Region?: string;
  s3PathStyle?: boolean;
  accessKeyId?: string;
  secretAccessKey?: string;
  sessionToken?: string;
}

function addRepoOptions(cmd: Command): Command {
  return cmd
    .option('--key-file <file>', 'key file of an encrypted repository')
    .option('--s3-endpoint <url>', 'S3 endpoint (default: AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL, else AWS)')
    .option('--s3-region <region>', 'S3 region (default: AWS_REGION)')
    .option('--s3-path-style', 'path-style S3 addressing (the default with a custom endpoint)')
    .option('--access-key-id <id>', 'S3 access key id (default: AWS_ACCESS_KEY_ID)')
    .option('--secret-access-key <key>', 'S3 secret access key (default: AWS_SECRET_ACCESS_KEY)')
    .option('--session-token <token>', 'S3 session token (default: AWS_SESSION_TOKEN)');
}

function s3Flags(o: RepoOptions): S3Flags | undefined {
  const f: S3Flags = {
    ...(o.s3Endpoint ? { endpoint: o.s3Endpoint } : {}),
    ...(o.s3Region ? { region: o.s3Region } : {}),
    ...(o.s3PathStyle ? { forcePathStyle: true } : {}),
    ...(o.accessKeyId ? { accessKeyId: o.accessKeyId } : {}),
    ...(o.secretAccessKey ? { secretAccessKey: o.secretAccessKey } : {}),
    ...(o.sessionToken ? { sessionToken: o.sessionToken } : {}),
  };
  return Object.keys(f).length ? f : undefined;
}

/**
 * The S3 settings a backup job needs, for a request to the serving server:
 * the flags, else this command's AWS environment. The job runs in the
 * server, whose environment is not the user's; the secrets travel over the
 * control socket (0600, peer-checked) and stay in the server's memory only,
 * never in the job record.
 */
function jobS3(repo: string, o: RepoOptions): S3Flags | undefined {
  const f = s3Flags(o);
  if (!repo.startsWith('s3://')) return f;
  const env = process.env;
  const pick = (...names: string[]) => names.map((n) => env[n]).find((v) => v !== undefined && v !== '');
  const fromEnv: S3Flags = {};
  const endpoint = pick('AWS_ENDPOINT_URL_S3', 'AWS_ENDPOINT_URL', 'S3_ENDPOINT');
  const region = pick('AWS_REGION', 'AWS_DEFAULT_REGION');
  const accessKeyId = pick('AWS_ACCESS_KEY_ID');
  const secretAccessKey = pick('AWS_SECRET_ACCESS_KEY');
  const sessionToken = pick('AWS_SESSION_TOKEN');
  if (endpoint) fromEnv.endpoint = endpoint;
  if (region) fromEnv.region = region;
  if (accessKeyId && secretAccessKey) {
    fromEnv.accessKeyId = accessKeyId;
    fromEnv.secretAccessKey = secretAccessKey;
    if (sessionToken) fromEnv.sessionToken = sessionToken;
  }
  const merged = { ...fromEnv, ...(f ?? {}) };
  return Object.keys(merged).length ? merged : undefined;
}

/** A local REPO made absolute (the server that runs a job has its own working directory). */
function repoLocation(repo: string): string {
  if (repo.startsWith('s3://')) {
    // The AWS SDK warns on stderr, once per process, that its releases after
    // January 2027 need Node 22: nothing a user of this command can act on
    // (this package supports Node 20), and it would break the one-error-line
    // stderr contract. AWS_SDK_JS_NODE_VERSION_SUPPORT_WARNING_DISABLED=false
    // brings it back.
    process.env.AWS_SDK_JS_NODE_VERSION_SUPPORT_WARNING_DISABLED ??= 'true';
  }
  return /^[a-z][a-z0-9+.-]*:\/\//i.test(repo) ? repo : path.resolve(repo);
}

async function withRepo<T>(repo: string, o: RepoOptions, fn: (r: Repository) => Promise<T>): Promise<T> {
  const r = await openRepository(repoLocation(repo), { keyFile: o.keyFile, s3: s3Flags(o) });
  try {
    return await fn(r);
  } finally {
    await r.close().catch(() => undefined);
    await closeCodecPool();
  }
}

function printList(list: BackupListEntry[]): void {
  if (list.length === 0) {
    process.stdout.write('no backups\n');
    return;
  }
  const rows = list.map((b) => [b.id, b.time, b.volume, b.snapshot ?? '-', b.parent ?? '(full)', formatSize(b.size), String(b.stats.chunksChanged), formatSize(b.stats.bytesStored)]);
  const head = ['ID', 'TIME', 'VOLUME', 'SNAPSHOT', 'PARENT', 'SIZE', 'CHANGED', 'STORED'];
  const w = head.map((h, i) => Math.max(h.length, ...rows.map((r) => r[i]!.length)));
  for (const r of [head, ...rows]) process.stdout.write(r.map((c, i) => c.padEnd(w[i]!)).join('  ').trimEnd() + '\n');
}

/** Offline: waits here for job `id` (which this process runs) to end. */
async function waitHere(v: Volume, id: number, show: boolean): Promise<VolumeJob> {
  const bar = show ? jobBar() : undefined;
  try {
    for (;;) {
      const j = v.jobs.list({ all: true }).find((x) => x.id === id);
      if (!j) throw new NbdError('JOB_NOT_FOUND', `job ${id} is gone from ${v.image}`);
      bar?.update([j]);
      if (isFinished(j.state)) return j;
      if (!v.jobs.running(v.backups)) throw new NbdError('BACKUP_ABORTED', `backup job ${id} stopped unfinished (${j.state}); see the log`);
      await new Promise((r) => setTimeout(r, 200));
    }
  } finally {
    bar?.stop();
  }
}

function describeJob(j: BackupJobInfo, image: string): string {
  if (!isFinished(j.state)) {
    return `${j.resumed ? 'resumed' : 'started'} backup job ${j.id}: snapshot ${j.snapshot} of ${image} to ${j.repo} as backup ${j.backup} (node-nbd-server jobs ${image})\n`;
  }
  const r = j.result;
  return (
    `backup ${r?.backup ?? j.backup} of snapshot ${j.snapshot} (job ${j.id}) ${r?.parent ? `incremental from ${r.parent}` : 'full'}: ` +
    `${r?.stats.chunksChanged ?? 0} chunks read, ${r?.stats.chunksNew ?? 0} new, ${formatSize(r?.stats.bytesStored ?? 0)} stored` +
    (r?.deleted.length ? `; deleted the previous base snapshot(s) ${r.deleted.join(', ')}` : '') +
    '\n'
  );
}

export function registerBackup(program: Command): void {
  const b = program.command('backup').description('Incremental, deduplicated, optionally encrypted backups of volumes into a directory or S3.');

  addRepoOptions(
    b
      .command('init')
      .description('Create a repository (a directory is created if missing); with --key-file it is encrypted with that key.')
      .argument('<repo>', 'directory or s3://BUCKET/PREFIX'),
  ).action(async (repo: string, o: RepoOptions) => {
    const r = await initRepository(repoLocation(repo), { keyFile: o.keyFile, s3: s3Flags(o) });
    await r.close();
    process.stdout.write(`created ${o.keyFile ? 'an encrypted' : 'a'} backup repository at ${repoLocation(repo)}\n`);
  });

  addRepoOptions(
    b
      .command('create')
      .description(
        'Back up a snapshot of the volume (a job). Without --snapshot the job makes one (backup-<job id>), keeps it as the base of the next ' +
          'incremental and deletes the base it made before; incremental from the newest backup whose snapshot still exists.',
      )
      .argument('<image>', 'image file')
      .requiredOption('--repo <repo>', 'repository: directory or s3://BUCKET/PREFIX')
      .option('--snapshot <name>', 'back up this existing snapshot (never deleted by backups)')
      .option('--wait', 'online: return when the job ended, with a progress bar (offline the command always runs it to its end)')
      .option('--json', 'machine-readable output'),
  ).action(async (image: string, o: RepoOptions & { repo: string; snapshot?: string; wait?: boolean; json?: boolean }) => {
    const req: BackupRequest = {
      repo: repoLocation(o.repo),
      ...(o.keyFile ? { keyFile: path.resolve(o.keyFile) } : {}),
      ...(jobS3(o.repo, o) ? { s3: jobS3(o.repo, o) } : {}),
      ...(o.snapshot !== undefined ? { snapshot: o.snapshot } : {}),
    };
    let offline = false;
    let j = (await onVolume(image, { op: 'backup-create', backup: req }, async (v) => {
      offline = true;
      const started = await v.backups.create(req);
      const ended = await waitHere(v, started.id, Boolean(o.wait) && !o.json);
      return { ...ended, ...(started.resumed ? { resumed: true } : {}) };
    })) as BackupJobInfo;
    if (!offline && o.wait) j = { ...((await waitJobOnline(image, j.id, !o.json)) as BackupJobInfo), ...(j.resumed ? { resumed: true } : {}) };
    await closeCodecPool();
    if (isFinished(j.state)) throwIfUnsuccessful(j);
    output(o, j, (x) => process.stdout.write(describeJob(x, image)));
  });

  addRepoOptions(
    b
      .command('list')
      .description('List the backups of a repository, oldest first.')
      .argument('<repo>', 'directory or s3://BUCKET/PREFIX')
      .option('--json', 'machine-readable output'),
  ).action(async (repo: string, o: RepoOptions & { json?: boolean }) => {
    const list = await withRepo(repo, o, (r) => listBackups(r));
    output(o, list, printList);
  });

  addRepoOptions(
    b
      .command('restore')
      .description('Restore a backup to a raw file (created; refused if it exists) or an NBD export (nbd://HOST[:PORT]/EXPORT, nbd+unix:///EXPORT?socket=PATH).')
      .argument('<repo>', 'directory or s3://BUCKET/PREFIX')
      .argument('<backup>', 'backup id (backup list)')
      .argument('<target>', 'raw file or NBD URI')
      .option('--json', 'machine-readable output'),
  ).action(async (repo: string, id: string, target: string, o: RepoOptions & { json?: boolean }) => {
    const t: RestoreTarget = /^nbd(\+unix)?:\/\//.test(target) ? new NbdTarget(target) : new FileTarget(target);
    const r = await withRepo(repo, o, (rr) => restore(rr, id, t));
    output(o, r, (x) =>
      process.stdout.write(`restored backup ${x.backup} to ${target}: ${formatSize(x.size)} (${formatSize(x.bytesWritten)} written, ${formatSize(x.bytesZero)} as zeros)\n`),
    );
  });

  addRepoOptions(
    b
      .command('verify')
      .description('Check a repository (or one backup): metadata always, every pack it uses with --read-data. Exit 27 when a problem is found.')
      .argument('<repo>', 'directory or s3://BUCKET/PREFIX')
      .argument('[backup]', 'only this backup')
      .option('--read-data', 'read and check every pack the backups use')
      .option('--json', 'machine-readable output'),
  ).action(async (repo: string, id: string | undefined, o: RepoOptions & { readData?: boolean; json?: boolean }) => {
    const r = await withRepo(repo, o, (rr) => verify(rr, { ...(id ? { backup: id } : {}), readData: Boolean(o.readData) }));
    output(o, r, (x) => {
      process.stdout.write(`${x.ok ? 'ok' : 'PROBLEMS'}: ${x.backups} backup(s), ${x.chunksChecked} chunks, ${x.packsChecked} packs checked, ${formatSize(x.bytesRead)} read\n`);
      for (const p of x.problems) process.stdout.write(`${p.kind}: ${p.message}\n`);
    });
    if (!r.ok) {
      const first = r.problems[0];
      throw new NbdError('BACKUP_DATA_CORRUPT', `verify found ${r.problems.length} problem(s)${first ? `, first: ${first.message}` : ''}`);
    }
  });

  const keep = (name: string) => nonNegativeInt(name, 1_000_000);
  addRepoOptions(
    b
      .command('prune')
      .description('Forget backups by a retention policy (per volume) and delete the data no remaining backup needs.')
      .argument('<repo>', 'directory or s3://BUCKET/PREFIX')
      .option('--keep-last <n>', 'keep the n newest backups', keep('--keep-last'))
      .option('--keep-hourly <n>', 'keep the newest backup of each of the last n hours that have one', keep('--keep-hourly'))
      .option('--keep-daily <n>', 'the same per day', keep('--keep-daily'))
      .option('--keep-weekly <n>', 'the same per ISO week', keep('--keep-weekly'))
      .option('--keep-monthly <n>', 'the same per month', keep('--keep-monthly'))
      .option('--keep-yearly <n>', 'the same per year', keep('--keep-yearly'))
      .option('--dry-run', 'only show what would be forgotten')
      .option('--json', 'machine-readable output'),
  ).action(async (repo: string, o: RepoOptions & PrunePolicy & { dryRun?: boolean; json?: boolean }) => {
    const policy: PrunePolicy = {
      ...(o.keepLast !== undefined ? { keepLast: o.keepLast } : {}),
      ...(o.keepHourly !== undefined ? { keepHourly: o.keepHourly } : {}),
      ...(o.keepDaily !== undefined ? { keepDaily: o.keepDaily } : {}),
      ...(o.keepWeekly !== undefined ? { keepWeekly: o.keepWeekly } : {}),
      ...(o.keepMonthly !== undefined ? { keepMonthly: o.keepMonthly } : {}),
      ...(o.keepYearly !== undefined ? { keepYearly: o.keepYearly } : {}),
    };
    const r = await withRepo(repo, o, (rr) => prune(rr, policy, { dryRun: Boolean(o.dryRun) }));
    output(o, r, (x) =>
      process.stdout.write(
        `kept ${x.kept.length}, forgot ${x.forgotten.length} backup(s)${x.forgotten.length ? ` (${x.forgotten.join(', ')})` : ''}; ` +
          `deleted ${x.packsDeleted} pack(s), ${formatSize(x.bytesDeleted)}` +
          (x.deferred ? '; packs kept: a backup is running (run prune again later)' : '') +
          '\n',
      ),
    );
  });
}
