// A ChunkSource over an NBD export (nbd:// or nbd+unix://), e.g. the
// server's own disk@SNAP: every chunk (full backup) or the runs given (the
// change map the caller computed). Reads are NBD_CMD_READ, pipelined on one
// connection. This is the seam the CLI uses until change maps come from the
// addon directly; the qemu:dirty-bitmap meta context can feed `runs` too.
import { NbdClient } from './nbd-client';
import { givenRuns, type ChunkRun, type ChunkSource } from './source';

export interface NbdSourceOptions {
  chunkSize: number;
  runs?: ChunkRun[];
  volume: string;
  snapshot?: string | null;
}

export class NbdChunkSource implements ChunkSource {
  readonly size: number;
  readonly chunkSize: number;
  readonly volume: string;
  readonly snapshot: string | null;
  private readonly client: NbdClient;
  private readonly runs: ChunkRun[] | undefined;

  private constructor(client: NbdClient, opts: NbdSourceOptions) {
    this.client = client;
    this.size = client.size;
    this.chunkSize = opts.chunkSize;
    this.volume = opts.volume;
    this.snapshot = opts.snapshot ?? null;
    this.runs = opts.runs;
  }

  static async open(uri: string, opts: NbdSourceOptions): Promise<NbdChunkSource> {
    if (!Number.isInteger(opts.chunkSize) || opts.chunkSize < 4096 || opts.chunkSize > 64 * 1024 * 1024) {
      throw new RangeError(`chunk size must be an integer from 4096 to 64 MiB, got ${opts.chunkSize}`);
    }
    return new NbdChunkSource(await NbdClient.connect(uri), opts);
  }

  changedRuns(): AsyncIterable<ChunkRun> {
    return givenRuns(this.size, this.chunkSize, this.runs);
  }

  read(offset: number, buf: Buffer): Promise<void> {
    return this.client.read(offset, buf);
  }

  close(): Promise<void> {
    return this.client.close();
  }
}
