// The pipeline's bounds and shortcuts: reads in flight never exceed
// readConcurrency and pack uploads never exceed uploadConcurrency, whatever
// the volume size; runs are read as one request per segment (coalesced, and
// split at readSize); runs the source knows are zero are never read; holes
// and zero chunks cost nothing in the repository. Counted with a counting
// source and a counting backend around the real file source and the real
// local backend.
import t from 'tap';
import { randomBytes } from 'node:crypto';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { backup, FileChunkSource, FileTarget, LocalBackend, Repository, restore, type ChunkSource, type ChunkRun, type Backend, type ObjectInfo } from '../src/backup';
import { tempDirs } from './fixtures/server';

const KiB = 1024;
const MiB = 1024 * KiB;
const CHUNK = 64 * KiB;
const makeTempDir = tempDirs(t);

class CountingSource implements ChunkSource {
  reads = 0;
  inFlight = 0;
  maxInFlight = 0;
  constructor(
    private readonly inner: FileChunkSource,
    private readonly runs: ChunkRun[],
  ) {}
  get size() {
    return this.inner.size;
  }
  get chunkSize() {
    return this.inner.chunkSize;
  }
  get volume() {
    return this.inner.volume;
  }
  get snapshot() {
    return null;
  }
  async *changedRuns(): AsyncIterable<ChunkRun> {
    yield* this.runs;
  }
  async read(offset: number, buf: Buffer): Promise<void> {
    this.reads++;
    this.maxInFlight = Math.max(this.maxInFlight, ++this.inFlight);
    // Yield to the event loop a few times so that reads could pile up if the pipeline let them.
    for (let i = 0; i < 3; i++) await new Promise((r) => setImmediate(r));
    try {
      await this.inner.read(offset, buf);
    } finally {
      this.inFlight--;
    }
  }
  close() {
    return this.inner.close();
  }
}

class CountingBackend implements Backend {
  packPuts = 0;
  inFlight = 0;
  maxInFlight = 0;
  constructor(private readonly inner: LocalBackend) {}
  get location() {
    return this.inner.location;
  }
  async put(key: string, data: Buffer): Promise<void> {
    if (!key.startsWith('packs/')) return this.inner.put(key, data);
    this.packPuts++;
    this.maxInFlight = Math.max(this.maxInFlight, ++this.inFlight);
    try {
      for (let i = 0; i < 3; i++) await new Promise((r) => setImmediate(r));
      await this.inner.put(key, data);
    } finally {
      this.inFlight--;
    }
  }
  get(key: string) {
    return this.inner.get(key);
  }
  getRange(key: string, o: number, l: number) {
    return this.inner.getRange(key, o, l);
  }
  list(prefix: string): Promise<ObjectInfo[]> {
    return this.inner.list(prefix);
  }
  delete(key: string) {
    return this.inner.delete(key);
  }
  exists(key: string) {
    return this.inner.exists(key);
  }
  now() {
    return this.inner.now();
  }
  close() {
    return this.inner.close();
  }
}

t.test('bounded reads and uploads, coalesced runs, zero runs unread, holes free', async (t) => {
  const dir = makeTempDir('nbd-backup-pipe-');
  const img = path.join(dir, 'disk.img');
  const size = 64 * MiB;
  fs.writeFileSync(img, '');
  fs.truncateSync(img, size);
  const fd = fs.openSync(img, 'r+');
  // Data in chunks 0-99, 200, 300-301 and 900-979; chunks 500-599 hold data
  // that the source will declare zero (as a TRIMmed range would be).
  for (const [a, n] of [[0, 100], [200, 1], [300, 2], [900, 80], [500, 100]] as const) fs.writeSync(fd, randomBytes(n * CHUNK), 0, n * CHUNK, a * CHUNK);
  fs.closeSync(fd);
  fs.mkdirSync(path.join(dir, 'repo'));
  const backend = new CountingBackend(new LocalBackend(path.join(dir, 'repo')));
  const repo = await Repository.init(backend);
  const runs: ChunkRun[] = [
    { start: 0, count: 100 },
    { start: 200, count: 1 },
    { start: 300, count: 2 },
    { start: 500, count: 100, zero: true },
    { start: 900, count: 80 },
  ];
  const src = new CountingSource(await FileChunkSource.open(img, { chunkSize: CHUNK }), runs);
  const m = await backup(repo, src, { readSize: 16 * CHUNK, readConcurrency: 3, uploadConcurrency: 2, packSize: MiB });
  await src.close();
  t.ok(src.maxInFlight <= 3, `at most readConcurrency reads in flight (max ${src.maxInFlight})`);
  t.ok(backend.maxInFlight <= 2, `at most uploadConcurrency pack uploads in flight (max ${backend.maxInFlight})`);
  t.ok(backend.maxInFlight >= 1 && backend.packPuts >= 10, `${backend.packPuts} packs uploaded`);
  t.equal(src.reads, Math.ceil(100 / 16) + 1 + 1 + Math.ceil(80 / 16), 'one read per segment: runs coalesced, split at readSize');
  t.equal(m.stats.bytesRead, (100 + 1 + 2 + 80) * CHUNK, 'zero runs are not read');
  t.equal(m.stats.chunksZero, 100, 'the zero run is recorded as ZERO');
  const repoBytes = (await backend.list('')).reduce((n, o) => n + o.size, 0);
  t.ok(repoBytes < 1.05 * 183 * CHUNK + 64 * KiB, `holes cost nothing: ${repoBytes} bytes stored for ${183 * CHUNK} bytes of data in a ${size}-byte volume`);

  // The restore reproduces the source with the declared-zero run as zeros.
  const out = path.join(dir, 'out.img');
  await restore(repo, m.id, new FileTarget(out));
  const want = fs.readFileSync(img);
  want.fill(0, 500 * CHUNK, 600 * CHUNK);
  t.ok(fs.readFileSync(out).equals(want), 'restore is exact (the declared-zero run reads as zeros)');
  await repo.close();
});
