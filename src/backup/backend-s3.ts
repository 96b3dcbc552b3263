// A repository in an S3 bucket under a key prefix (s3://BUCKET/PREFIX), with
// @aws-sdk/client-s3. Objects are written with single PUTs (packs are at most
// a few tens of MiB, far below S3's 5 GiB single-PUT limit), which S3 makes
// atomic: a reader sees the old object, none, or the new one.
//
// Endpoint and credentials: the options given (CLI flags), else the usual
// AWS environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION,
// AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL, shared config files), plus
// S3_ENDPOINT as radosgw set-ups name it. A custom endpoint implies
// path-style addressing. Request checksums are computed only when an
// operation requires them: radosgw (Ceph 16) answers the SDK's default
// streaming checksums with 411; our own checksums cover every object anyway.
//
// Time: lock expiry is judged on the server's clock. Every response's Date
// header updates the measured skew, and now() is local time plus that skew.
import {
  DeleteObjectCommand,
  GetObjectCommand,
  HeadBucketCommand,
  HeadObjectCommand,
  ListObjectsV2Command,
  PutObjectCommand,
  S3Client,
} from '@aws-sdk/client-s3';
import { NbdError } from '../errors';
import { ObjectMissingError, type Backend, type ObjectInfo } from './backend';

export interface S3Options {
  bucket: string;
  /** Key prefix without leading or trailing '/' ('' = bucket root). */
  prefix: string;
  endpoint?: string;
  region?: string;
  accessKeyId?: string;
  secretAccessKey?: string;
  sessionToken?: string;
  /** Path-style addressing (default: true with a custom endpoint). */
  forcePathStyle?: boolean;
  /** Attempts per request, retries included (default 4). */
  maxAttempts?: number;
  /** TCP connect timeout, ms (default 5000). */
  connectTimeoutMs?: number;
}

/** Classifies an SDK error into a stable code. */
export function s3Error(location: string, what: string, err: unknown): Error {
  if (err instanceof NbdError || err instanceof ObjectMissingError) return err;
  const e = err as { name?: string; code?: string; message?: string; $metadata?: { httpStatusCode?: number }; errors?: unknown[] };
  const name = e.name ?? '';
  const code = e.code ?? '';
  const status = e.$metadata?.httpStatusCode;
  const msg = `${location}: ${what}: ${name || code || 'error'}${e.message ? ` (${e.message})` : ''}`;
  if (name === 'CredentialsProviderError' || /credential/i.test(name)) {
    return new NbdError('REPO_CREDENTIALS', `${location}: no S3 credentials (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or pass them): ${e.message ?? name}`, { cause: err });
  }
  if (['InvalidAccessKeyId', 'SignatureDoesNotMatch', 'AccessDenied', 'Forbidden', 'InvalidToken', 'ExpiredToken'].includes(name) || status === 403) {
    return new NbdError('REPO_CREDENTIALS', msg, { cause: err });
  }
  const netCodes = ['ECONNREFUSED', 'ENOTFOUND', 'EAI_AGAIN', 'ETIMEDOUT', 'ECONNRESET', 'EHOSTUNREACH', 'ENETUNREACH', 'EPIPE'];
  const inner = (e.errors ?? []).map((x) => (x as { code?: string }).code ?? '');
  if (netCodes.includes(code) || inner.some((c) => netCodes.includes(c)) || name === 'TimeoutError' || name === 'RequestTimeout' || /ECONNREFUSED|ENOTFOUND|EAI_AGAIN|ETIMEDOUT/.test(e.message ?? '')) {
    return new NbdError('REPO_UNREACHABLE', msg, { cause: err });
  }
  if (name === 'NoSuchBucket') return new NbdError('REPO_NOT_FOUND', `${location}: the bucket does not exist`, { cause: err });
  return new NbdError('REPO_IO_ERROR', msg, { cause: err });
}

function isNotFound(err: unknown): boolean {
  const e = err as { name?: string; $metadata?: { httpStatusCode?: number } };
  return e.name === 'NoSuchKey' || e.name === 'NotFound' || (e.$metadata?.httpStatusCode === 404 && e.name !== 'NoSuchBucket');
}

export class S3Backend implements Backend {
  readonly location: string;
  private readonly client: S3Client;
  private readonly bucket: string;
  private readonly prefix: string;
  private skewMs: number | undefined;

  constructor(opts: S3Options) {
    this.bucket = opts.bucket;
    this.prefix = opts.prefix === '' ? '' : `${opts.prefix.replace(/^\/+|\/+$/g, '')}/`;
    this.location = `s3://${opts.bucket}/${this.prefix}`;
    const endpoint = opts.endpoint ?? process.env.AWS_ENDPOINT_URL_S3 ?? process.env.AWS_ENDPOINT_URL ?? process.env.S3_ENDPOINT;
    const credentials =
      opts.accessKeyId !== undefined && opts.secretAccessKey !== undefined
        ? { accessKeyId: opts.accessKeyId, secretAccessKey: opts.secretAccessKey, sessionToken: opts.sessionToken }
        : undefined;
    this.client = new S3Client({
      region: opts.region ?? process.env.AWS_REGION ?? process.env.AWS_DEFAULT_REGION ?? 'us-east-1',
      ...(endpoint !== undefined ? { endpoint } : {}),
      forcePathStyle: opts.forcePathStyle ?? endpoint !== undefined,
      ...(credentials ? { credentials } : {}),
      maxAttempts: opts.maxAttempts ?? 4,
      requestChecksumCalculation: 'WHEN_REQUIRED',
      responseChecksumValidation: 'WHEN_REQUIRED',
      requestHandler: { connectionTimeout: opts.connectTimeoutMs ?? 5000, requestTimeout: 120_000 },
    });
    // Measure the server clock from each response's Date header.
    this.client.middlewareStack.add(
      (next) => async (args) => {
        const res = await next(args);
        const headers = (res.response as { headers?: Record<string, string> }).headers;
        const date = headers?.date ?? headers?.Date;
        if (date) {
          const t = Date.parse(date);
          if (!Number.isNaN(t)) this.skewMs = t - Date.now();
        }
        return res;
      },
      { step: 'deserialize', name: 'nbdServerClock' },
    );
  }

  private k(key: string): string {
    return this.prefix + key;
  }

  async put(key: string, data: Buffer): Promise<void> {
    try {
      await this.client.send(new PutObjectCommand({ Bucket: this.bucket, Key: this.k(key), Body: data, ContentLength: data.length }));
    } catch (err) {
      throw s3Error(this.location, `put ${key}`, err);
    }
  }

  private async getBytes(key: string, range?: string): Promise<Buffer> {
    try {
      const res = await this.client.send(new GetObjectCommand({ Bucket: this.bucket, Key: this.k(key), ...(range ? { Range: range } : {}) }));
      if (!res.Body) return Buffer.alloc(0);
      const bytes = await res.Body.transformToByteArray();
      return Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength);
    } catch (err) {
      if (isNotFound(err)) throw new ObjectMissingError(key, this.location);
      throw s3Error(this.location, `get ${key}`, err);
    }
  }

  get(key: string): Promise<Buffer> {
    return this.getBytes(key);
  }

  getRange(key: string, offset: number, length: number): Promise<Buffer> {
    if (length === 0) return Promise.resolve(Buffer.alloc(0));
    return this.getBytes(key, `bytes=${offset}-${offset + length - 1}`);
  }

  async list(prefix: string): Promise<ObjectInfo[]> {
    const out: ObjectInfo[] = [];
    let token: string | undefined;
    try {
      do {
        const res = await this.client.send(
          new ListObjectsV2Command({ Bucket: this.bucket, Prefix: this.k(prefix), ContinuationToken: token, MaxKeys: 1000 }),
        );
        for (const o of res.Contents ?? []) {
          if (o.Key === undefined) continue;
          out.push({ key: o.Key.slice(this.prefix.length), size: o.Size ?? 0, mtimeMs: o.LastModified?.getTime() ?? 0 });
        }
        token = res.IsTruncated ? res.NextContinuationToken : undefined;
      } while (token !== undefined);
    } catch (err) {
      throw s3Error(this.location, `list ${prefix}`, err);
    }
    return out;
  }

  async delete(key: string): Promise<void> {
    try {
      await this.client.send(new DeleteObjectCommand({ Bucket: this.bucket, Key: this.k(key) }));
    } catch (err) {
      if (isNotFound(err)) return;
      throw s3Error(this.location, `delete ${key}`, err);
    }
  }

  async exists(key: string): Promise<boolean> {
    try {
      await this.client.send(new HeadObjectCommand({ Bucket: this.bucket, Key: this.k(key) }));
      return true;
    } catch (err) {
      if (isNotFound(err)) return false;
      throw s3Error(this.location, `head ${key}`, err);
    }
  }

  /** Checks that the bucket exists and the credentials work. */
  async probe(): Promise<void> {
    try {
      await this.client.send(new HeadBucketCommand({ Bucket: this.bucket }));
    } catch (err) {
      const e = err as { name?: string; $metadata?: { httpStatusCode?: number } };
      if (e.name === 'NotFound' || e.$metadata?.httpStatusCode === 404) {
        throw new NbdError('REPO_NOT_FOUND', `${this.location}: the bucket does not exist`, { cause: err });
      }
      throw s3Error(this.location, 'head bucket', err);
    }
  }

  async now(): Promise<number> {
    if (this.skewMs === undefined) await this.probe();
    return Date.now() + (this.skewMs ?? 0);
  }

  async close(): Promise<void> {
    this.client.destroy();
  }
}
