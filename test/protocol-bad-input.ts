// The server against hostile and broken clients on raw sockets. While the
// attacks run, two healthy clients (our raw client and python3-libnbd) keep
// writing and verifying data on their own regions of the same export, and are
// checked after every subtest to still be making correct progress.
import t, { type Test } from 'tap';
import * as crypto from 'node:crypto';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { exec, pyNbd, type ExecResult } from './fixtures/exec';
import { fdCount, isAlive, procStatus, sleep, waitFor } from './fixtures/proc';
import { NBD, RawClient, type Reply } from './fixtures/raw-client';
import { startServer, type RunningServer } from './fixtures/server';
import { requireTools } from './fixtures/tools';

const MiB = 1024 * 1024;
const SIZE = 64 * MiB;
// Regions of the export: each user writes only its own.
const HEALTHY_RAW = 0; // [0, 4 MiB)
const HEALTHY_PY = 4 * MiB; // [4, 8 MiB)
const SCRATCH = 16 * MiB; // attacks and checks from here on
const BLOCK = 64 * 1024;

let srv: RunningServer;
let pid: number;
let baseFds = 0;
let baseThreads = 0;

// ---- Healthy raw client: write a random block, read it back, compare ----------
class Healthy {
  ops = 0;
  failures: string[] = [];
  private stopped = false;
  private done?: Promise<void>;
  private expected = new Map<number, Buffer>();

  start(socket: string): void {
    this.done = this.run(socket);
  }

  private async run(socket: string): Promise<void> {
    let c: RawClient | undefined;
    try {
      c = await RawClient.connect(socket);
      await c.go('disk', { structured: true });
      let i = 0;
      while (!this.stopped) {
        const blk = i % 64;
        const off = HEALTHY_RAW + blk * BLOCK;
        const data = crypto.randomBytes(BLOCK);
        const w = await c.write(off, data);
        if (w.error) this.failures.push(`write ${off}: error ${w.error}`);
        else this.expected.set(blk, data);
        // Read back this block and an older one.
        for (const b of [blk, (blk * 7 + 3) % 64]) {
          const exp = this.expected.get(b);
          if (!exp) continue;
          const r = await c.read(HEALTHY_RAW + b * BLOCK, BLOCK);
          if (r.error) this.failures.push(`read ${b}: error ${r.error}`);
          else if (!r.data!.equals(exp)) this.failures.push(`read ${b}: wrong data`);
        }
        this.ops++;
        i++;
        if (i % 16 === 0) await sleep(1); // leave room for the event loop
      }
      await c.disconnect();
    } catch (err) {
      this.failures.push(`healthy client died: ${(err as Error).message}`);
      c?.destroy();
    }
  }

  async stop(): Promise<void> {
    this.stopped = true;
    await this.done;
  }
}

const healthy = new Healthy();
let pyResult: Promise<ExecResult> | undefined;
let pyStopFile = '';
let lastOps = 0;

const PY_HEALTHY = `
import nbd, os, sys, json, random, time
uri, stop = sys.argv[1], sys.argv[2]
h = nbd.NBD()
h.connect_uri(uri)
base, blk, n = ${HEALTHY_PY}, 65536, 64
expected = {}
ops = errors = 0
msgs = []
deadline = time.time() + 600
# At least 50 rounds whatever the machine's speed (the test counts them), then until told to stop.
while (ops < 50 or not os.path.exists(stop)) and time.time() < deadline:
    i = random.randrange(n)
    data = os.urandom(blk)
    try:
        h.pwrite(data, base + i * blk)
        expected[i] = data
        j = random.choice(list(expected))
        got = h.pread(blk, base + j * blk)
        if got != expected[j]:
            errors += 1
            msgs.append("mismatch at block %d" % j)
        ops += 1
    except Exception as e:
        errors += 1
        msgs.append(str(e))
        break
h.shutdown()
print(json.dumps({"ops": ops, "errors": errors, "msgs": msgs[:5]}))
`;

/** Asserts both healthy clients have progressed without a single bad byte. */
async function checkHealthy(tt: Test): Promise<void> {
  const progressed = await waitFor(() => healthy.ops > lastOps, 60_000);
  tt.ok(progressed, `healthy client keeps making progress (ops ${lastOps} -> ${healthy.ops})`);
  lastOps = healthy.ops;
  tt.same(healthy.failures, [], 'healthy client saw only correct data');
  tt.ok(isAlive(pid), 'server process is alive');
}

/** A fresh client in transmission phase on the export. */
async function fresh(opts: { structured?: boolean; blockStatus?: boolean; name?: string; socket?: string } = {}) {
  const c = await RawClient.connect(opts.socket ?? srv.socket);
  await c.go(opts.name ?? 'disk', opts);
  return c;
}

/** Closed by the server, having sent nothing more than what was read. */
async function expectClosed(tt: Test, c: RawClient, what: string): Promise<void> {
  const closed = await c.waitClosed(60_000);
  tt.ok(closed, `${what}: server closed the connection`);
  c.destroy();
}

function expectError(tt: Test, r: Reply, errno: number, what: string): void {
  tt.equal(r.error, errno, `${what}: error ${errno}`);
  tt.equal(r.data, undefined, `${what}: no data`);
}

/** Checks the connection still serves a correct read of the scratch pattern. */
async function expectUsable(tt: Test, c: RawClient, what: string): Promise<void> {
  const r = await c.read(SCRATCH, 4096);
  tt.equal(r.error, 0, `${what}: connection still serves reads`);
  tt.ok(r.data?.equals(scratchPattern.subarray(0, 4096)), `${what}: and the data is right`);
}


// Known content at SCRATCH, written once at setup.
const scratchPattern = crypto.randomBytes(4 * MiB);

t.before(async () => {
  srv = await startServer({ size: '64M' });
  pid = srv.proc.pid!;
  const c = await fresh();
  for (let o = 0; o < scratchPattern.length; o += MiB) {
    const r = await c.write(SCRATCH + o, scratchPattern.subarray(o, o + MiB));
    if (r.error) throw new Error(`setup write failed: ${r.error}`);
  }
  // A known last block, to prove refused writes past the end leave it alone.
  await c.write(SIZE - 4096, Buffer.alloc(4096, 0xee));
  await c.disconnect();
  healthy.start(srv.socket);
  pyStopFile = path.join(srv.dir, 'py-stop');
  if (requireTools(t, ['python3-libnbd'])) {
    fs.writeFileSync(path.join(srv.dir, 'healthy.py'), PY_HEALTHY);
    pyResult = exec('/usr/bin/python3', [path.join(srv.dir, 'healthy.py'), srv.uri('disk'), pyStopFile], {
      timeoutMs: 700_000,
    });
  }
  await waitFor(() => healthy.ops > 5, 60_000);
  await sleep(200);
  baseFds = fdCount(pid);
  baseThreads = procStatus(pid).threads;
});

t.teardown(async () => {
  await healthy.stop();
  if (pyResult) {
    fs.writeFileSync(pyStopFile, '');
    await pyResult;
  }
  await srv?.stop();
});

// ---- Handshake ---------------------------------------------------------------

t.test('greeting is fixed newstyle', async (t) => {
  const c = await RawClient.connect(srv.socket);
  const raw = await c.readExact(18);
  t.equal(raw.subarray(0, 8).toString(), 'NBDMAGIC');
  t.equal(raw.subarray(8, 16).toString(), 'IHAVEOPT');
  t.ok(raw.readUInt16BE(16) & NBD.FLAG_FIXED_NEWSTYLE, 'FIXED_NEWSTYLE set');
  c.destroy();
});

t.test('unknown client flags: server closes (proto.md: MUST close)', async (t) => {
  for (const flags of [NBD.FLAG_C_FIXED_NEWSTYLE | 4, 0x80000000, 0xffffffff]) {
    const c = await RawClient.connect(srv.socket);
    await c.readGreeting();
    await c.sendClientFlags(flags);
    // A well-formed option right after: it must not be answered.
    await c.sendOption(NBD.OPT_LIST).catch(() => {});
    await expectClosed(t, c, `flags 0x${flags.toString(16)}`);
    t.equal(c.available, 0, `flags 0x${flags.toString(16)}: no option reply was sent`);
  }
  await checkHealthy(t);
});

t.test('wrong option magic: server closes', async (t) => {
  const c = await RawClient.connect(srv.socket);
  await c.handshake();
  await c.sendOption(NBD.OPT_GO, RawClient.infoPayload('disk'), { magic: 0x4948415645ff5054n });
  await expectClosed(t, c, 'bad IHAVEOPT');
  t.equal(c.available, 0, 'nothing was sent back');
  await checkHealthy(t);
});

t.test('truncated handshakes: client leaves mid-greeting and mid-option', async (t) => {
  const steps: [string, (c: RawClient) => Promise<void>][] = [
    ['closes before reading the greeting', async () => {}],
    ['closes after 10 bytes of greeting', async (c) => void (await c.readExact(10))],
    ['sends 2 of 4 flag bytes', async (c) => {
      await c.readGreeting();
      await c.send(Buffer.from([0, 0]));
    }],
    ['sends half an option header', async (c) => {
      await c.handshake();
      await c.send(Buffer.from('IHAVEOPT\0\0'));
    }],
    ['sends a GO header announcing 20 bytes, then 5', async (c) => {
      await c.handshake();
      await c.sendOption(NBD.OPT_GO, Buffer.alloc(5), { length: 20 });
    }],
    ['sends NBD_OPT_ABORT and leaves without the reply', async (c) => {
      await c.handshake();
      await c.sendOption(NBD.OPT_ABORT);
    }],
  ];
  for (const [what, step] of steps) {
    const c = await RawClient.connect(srv.socket);
    await step(c);
    c.destroy();
    const d = await fresh();
    await expectUsable(t, d, `after a client that ${what}`);
    await d.disconnect();
  }
  await checkHealthy(t);
});

t.test('unknown option: NBD_REP_ERR_UNSUP, then GO works on the same connection', async (t) => {
  const c = await RawClient.connect(srv.socket);
  await c.handshake();
  for (const opt of [0x1234, 4 /* PEEK_EXPORT, withdrawn */, 0xffffffff]) {
    const r = await c.option(opt, Buffer.from('some data'));
    t.equal(r.length, 1, `option ${opt}: one reply`);
    t.equal(r[0]!.option, opt >>> 0, `option ${opt}: reply echoes the option`);
    t.equal(r[0]!.type, NBD.REP_ERR_UNSUP, `option ${opt}: NBD_REP_ERR_UNSUP`);
  }
  const go = await c.go('disk', { skipHandshake: true });
  t.equal(go.size, BigInt(SIZE), 'GO after errors reports the export size');
  await expectUsable(t, c, 'after unknown options');
  await c.disconnect();
  await checkHealthy(t);
});

t.test('option length 0xFFFFFFFF: disconnected without the server buffering it', async (t) => {
  const before = procStatus(pid);
  const c = await RawClient.connect(srv.socket);
  await c.handshake();
  await c.sendOption(NBD.OPT_GO, Buffer.alloc(1024), { length: 0xffffffff });
  // Keep sending for a while as a greedy client would; the server must hang up.
  const feed = (async () => {
    for (let i = 0; i < 64 && !c.isClosed; i++) {
      await c.send(Buffer.alloc(MiB)).catch(() => {});
    }
  })();
  const closed = await c.waitClosed(60_000);
  t.ok(closed, 'server closed the connection');
  c.destroy();
  await feed;
  const after = procStatus(pid);
  t.ok(after.hwm - before.hwm < 32 * MiB, `peak RSS grew by ${((after.hwm - before.hwm) / MiB).toFixed(1)} MiB (< 32)`);
  await checkHealthy(t);
});

t.test('100 KiB option: NBD_REP_ERR_TOO_BIG and negotiation continues', async (t) => {
  const c = await RawClient.connect(srv.socket);
  await c.handshake();
  for (const opt of [NBD.OPT_GO, NBD.OPT_LIST, 0x777]) {
    const r = await c.option(opt, Buffer.alloc(100 * 1024, 0x41));
    t.equal(r.length, 1, `option ${opt}: one reply`);
    t.equal(r[0]!.option, opt, `option ${opt}: reply echoes the option`);
    t.equal(r[0]!.type, NBD.REP_ERR_TOO_BIG, `option ${opt}: NBD_REP_ERR_TOO_BIG`);
  }
  const list = await c.option(NBD.OPT_LIST);
  t.equal(list.at(-1)!.type, NBD.REP_ACK, 'NBD_OPT_LIST still works');
  const names = list.filter((r) => r.type === NBD.REP_SERVER).map((r) => r.data.subarray(4, 4 + r.data.readUInt32BE(0)).toString());
  t.same(names, ['disk'], 'and lists the export');
  await c.go('disk', { skipHandshake: true });
  await expectUsable(t, c, 'after TOO_BIG');
  await c.disconnect();
  await checkHealthy(t);
});

t.test('malformed INFO/GO payloads: NBD_REP_ERR_INVALID, negotiation continues', async (t) => {
  const c = await RawClient.connect(srv.socket);
  await c.handshake();
  const u32 = (v: number) => {
    const b = Buffer.alloc(4);
    b.writeUInt32BE(v >>> 0);
    return b;
  };
  const cases: [string, number, Buffer][] = [
    ['name length 1000 in a 10-byte option', NBD.OPT_GO, Buffer.concat([u32(1000), Buffer.from('disk'), Buffer.alloc(2)])],
    ['name length 0xFFFFFFFF', NBD.OPT_INFO, Buffer.concat([u32(0xffffffff), Buffer.from('disk'), Buffer.alloc(2)])],
    ['name length 5 where 4 bytes + count follow', NBD.OPT_GO, Buffer.concat([u32(5), Buffer.from('disk'), Buffer.from([0, 0])])],
    ['3-byte option (shorter than the name length)', NBD.OPT_GO, Buffer.from([0, 0, 0])],
    ['name but no request count', NBD.OPT_INFO, Buffer.concat([u32(4), Buffer.from('disk')])],
    ['5 info requests announced, 1 sent', NBD.OPT_GO, Buffer.concat([u32(4), Buffer.from('disk'), Buffer.from([0, 5, 0, 1])])],
    ['trailing garbage after the requests', NBD.OPT_GO, Buffer.concat([RawClient.infoPayload('disk', [1]), Buffer.from('xyz')])],
  ];
  for (const [what, opt, data] of cases) {
    const r = await c.option(opt, data);
    t.equal(r.at(-1)!.type, NBD.REP_ERR_INVALID, `${what}: NBD_REP_ERR_INVALID`);
    t.notOk(r.some((x) => x.type === NBD.REP_INFO), `${what}: no NBD_REP_INFO before the error`);
  }
  const unknown = await c.option(NBD.OPT_INFO, RawClient.infoPayload('no-such-export'));
  t.equal(unknown.at(-1)!.type, NBD.REP_ERR_UNKNOWN, 'INFO on an unknown export: NBD_REP_ERR_UNKNOWN');
  const info = await c.option(NBD.OPT_INFO, RawClient.infoPayload('disk', [NBD.INFO_NAME, NBD.INFO_BLOCK_SIZE]));
  t.equal(info.at(-1)!.type, NBD.REP_ACK, 'a good INFO still succeeds');
  const exp = info.find((r) => r.type === NBD.REP_INFO && r.data.readUInt16BE(0) === NBD.INFO_EXPORT);
  t.equal(exp && RawClient.parseInfoExport(exp.data).size, BigInt(SIZE), 'INFO_EXPORT carries the size');
  t.equal(exp?.data.length, 12, 'INFO_EXPORT length is 12');
  const bs = info.find((r) => r.type === NBD.REP_INFO && r.data.readUInt16BE(0) === NBD.INFO_BLOCK_SIZE);
  t.equal(bs?.data.length, 14, 'INFO_BLOCK_SIZE length is 14');
  t.equal(bs?.data.readUInt32BE(10), 32 * MiB, 'max payload 32 MiB');
  await c.go('disk', { skipHandshake: true });
  await expectUsable(t, c, 'after malformed options');
  await c.disconnect();
  await checkHealthy(t);
});

t.test('NBD_OPT_STARTTLS: error reply (NOTLS mode), negotiation continues', async (t) => {
  const c = await RawClient.connect(srv.socket);
  await c.handshake();
  const r = await c.option(NBD.OPT_STARTTLS);
  t.equal(r.length, 1, 'one reply');
  t.ok([NBD.REP_ERR_UNSUP, NBD.REP_ERR_POLICY].includes(r[0]!.type as never), `UNSUP or POLICY (got 0x${r[0]!.type.toString(16)})`);
  await c.go('disk', { skipHandshake: true, structured: true });
  await expectUsable(t, c, 'after STARTTLS');
  await c.disconnect();
  await checkHealthy(t);
});

t.test('meta contexts: SET before STRUCTURED_REPLY is refused; a failed SET clears the selection', async (t) => {
  const c = await RawClient.connect(srv.socket);
  await c.handshake();
  const early = await c.option(NBD.OPT_SET_META_CONTEXT, RawClient.metaPayload('disk', ['base:allocation']));
  t.equal(early.at(-1)!.type, NBD.REP_ERR_INVALID, 'SET_META_CONTEXT before STRUCTURED_REPLY: NBD_REP_ERR_INVALID');
  t.notOk(early.some((r) => r.type === NBD.REP_META_CONTEXT), 'no context was granted');
  const sr = await c.option(NBD.OPT_STRUCTURED_REPLY);
  t.equal(sr.at(-1)!.type, NBD.REP_ACK, 'STRUCTURED_REPLY acked');
  c.structured = true;
  const ok = await c.option(NBD.OPT_SET_META_CONTEXT, RawClient.metaPayload('disk', ['base:allocation']));
  t.equal(ok.at(-1)!.type, NBD.REP_ACK, 'SET_META_CONTEXT now succeeds');
  t.equal(ok.filter((r) => r.type === NBD.REP_META_CONTEXT).length, 1, 'one context');
  // Malformed SET: the query length runs past the option. Spec: INVALID, and
  // "replaces all previously-set metadata contexts (including when this command fails)".
  const bad = RawClient.metaPayload('disk', ['base:allocation']);
  bad.writeUInt32BE(1000, 4 + 4 + 4);
  const r = await c.option(NBD.OPT_SET_META_CONTEXT, bad);
  t.equal(r.at(-1)!.type, NBD.REP_ERR_INVALID, 'query past the end of the option: NBD_REP_ERR_INVALID');
  await c.go('disk', { skipHandshake: true });
  c.structured = true;
  const bs = await c.cmd(NBD.CMD_BLOCK_STATUS, 0, SCRATCH, 4096);
  t.equal(bs.error, NBD.EINVAL, 'BLOCK_STATUS after the failed SET: EINVAL (no context selected)');
  await expectUsable(t, c, 'after meta context errors');
  await c.disconnect();

  // And a good negotiation gives a working BLOCK_STATUS.
  const d = await fresh({ blockStatus: true });
  const ok2 = await d.cmd(NBD.CMD_BLOCK_STATUS, 0, SCRATCH, 65536);
  t.equal(ok2.error, 0, 'BLOCK_STATUS with base:allocation succeeds');
  const chunk = ok2.chunks.find((ch) => ch.type === NBD.REPLY_TYPE_BLOCK_STATUS);
  t.ok(chunk && chunk.extents!.length >= 1, 'one BLOCK_STATUS chunk with extents');
  t.equal(chunk?.extents![0]!.flags, 0, 'written scratch data is reported as data');
  await d.disconnect();
  await checkHealthy(t);
});

t.test('other option misuse: data on LIST/STRUCTURED_REPLY, unknown EXPORT_NAME, ABORT', async (t) => {
  const c = await RawClient.connect(srv.socket);
  await c.handshake();
  const list = await c.option(NBD.OPT_LIST, Buffer.from('junk'));
  t.equal(list.at(-1)!.type, NBD.REP_ERR_INVALID, 'NBD_OPT_LIST with data: NBD_REP_ERR_INVALID');
  t.notOk(list.some((r) => r.type === NBD.REP_SERVER), 'and no export list');
  const sr = await c.option(NBD.OPT_STRUCTURED_REPLY, Buffer.from('junk'));
  t.equal(sr.at(-1)!.type, NBD.REP_ERR_INVALID, 'NBD_OPT_STRUCTURED_REPLY with data: NBD_REP_ERR_INVALID');
  // Not negotiated: READ replies must be simple.
  await c.go('disk', { skipHandshake: true });
  const r = await c.read(SCRATCH, 4096);
  t.ok(r.simple, 'structured replies were not enabled by the refused option');
  t.ok(r.data?.equals(scratchPattern.subarray(0, 4096)), 'data correct');
  await c.disconnect();

  // NBD_OPT_EXPORT_NAME for an unknown export cannot return an error: the server must close.
  const u = await RawClient.connect(srv.socket);
  await u.handshake();
  await u.sendOption(NBD.OPT_EXPORT_NAME, Buffer.from('no-such-export'));
  await expectClosed(t, u, 'EXPORT_NAME of an unknown export');
  t.equal(u.available, 0, 'no export data was sent');

  // NBD_OPT_EXPORT_NAME without NO_ZEROES: size, flags and 124 zero bytes.
  const z = await RawClient.connect(srv.socket);
  await z.handshake(NBD.FLAG_C_FIXED_NEWSTYLE);
  await z.sendOption(NBD.OPT_EXPORT_NAME, Buffer.from('disk'));
  const reply = await z.readExact(8 + 2 + 124);
  t.equal(reply.readBigUInt64BE(0), BigInt(SIZE), 'EXPORT_NAME: size');
  t.ok(reply.readUInt16BE(8) & NBD.FLAG_HAS_FLAGS, 'EXPORT_NAME: HAS_FLAGS');
  t.ok(reply.subarray(10).equals(Buffer.alloc(124)), 'EXPORT_NAME: 124 zero bytes');
  await expectUsable(t, z, 'after EXPORT_NAME with zero padding');
  await z.disconnect();

  // NBD_OPT_ABORT: the server replies ACK (MUST) and closes.
  const a = await RawClient.connect(srv.socket);
  await a.handshake();
  const ack = await a.option(NBD.OPT_ABORT);
  t.equal(ack[0]!.type, NBD.REP_ACK, 'NBD_OPT_ABORT: NBD_REP_ACK');
  await expectClosed(t, a, 'after NBD_OPT_ABORT');
  await checkHealthy(t);
});

// Issue 15, defect 8: zero-length strings at the very end of an option made
// the parser take &b[size] (undefined behaviour; a build with
// -D_GLIBCXX_ASSERTIONS, as binding.gyp now builds by default, aborted the
// whole server on these bytes).
t.test('empty strings at the end of an option: proper replies, no crash', async (t) => {
  const u32 = (v: number) => {
    const b = Buffer.alloc(4);
    b.writeUInt32BE(v >>> 0);
    return b;
  };
  // The exact 20 bytes of the report: client flags, then NBD_OPT_GO with no payload.
  const raw = await RawClient.connect(srv.socket);
  await raw.readGreeting();
  await raw.send(Buffer.from('0000000349484156454f50540000000700000000', 'hex'));
  const go = await raw.readOptionReplies();
  t.equal(go.length, 1, 'empty NBD_OPT_GO: one reply');
  t.equal(go[0]!.type, NBD.REP_ERR_INVALID, 'empty NBD_OPT_GO: NBD_REP_ERR_INVALID');
  const info = await raw.option(NBD.OPT_INFO, u32(0));
  t.equal(info.at(-1)!.type, NBD.REP_ERR_INVALID, 'NBD_OPT_INFO with payload 00000000: NBD_REP_ERR_INVALID');
  const sr = await raw.option(NBD.OPT_STRUCTURED_REPLY);
  t.equal(sr.at(-1)!.type, NBD.REP_ACK, 'STRUCTURED_REPLY acked');
  raw.structured = true;
  for (const [what, opt] of [
    ['LIST_META_CONTEXT', NBD.OPT_LIST_META_CONTEXT],
    ['SET_META_CONTEXT', NBD.OPT_SET_META_CONTEXT],
  ] as const) {
    const r = await raw.option(opt, RawClient.metaPayload('disk', ['']));
    t.equal(r.at(-1)!.type, NBD.REP_ACK, `${what} whose last query is empty: NBD_REP_ACK`);
    t.notOk(r.some((x) => x.type === NBD.REP_META_CONTEXT), `${what}: an empty query selects no context`);
  }
  await raw.go('disk', { skipHandshake: true });
  await expectUsable(t, raw, 'after empty strings');
  await raw.disconnect();
  t.ok(isAlive(pid), 'server process is alive');
  await checkHealthy(t);
});

// Issue 15, defect 7: NBD_OPT_EXPORT_NAME has no error reply, so an oversized
// name must close the connection (as nbdkit and qemu-nbd do); an option reply
// would be read by an old client as an export size.
t.test('NBD_OPT_EXPORT_NAME over 64 KiB: closed without a reply', async (t) => {
  const c = await RawClient.connect(srv.socket);
  await c.handshake();
  await c.sendOption(NBD.OPT_EXPORT_NAME, Buffer.alloc(65 * 1024, 0x61)).catch(() => {});
  await expectClosed(t, c, 'EXPORT_NAME of 65 KiB');
  t.equal(c.available, 0, 'the server sent nothing after the greeting');
  const d = await fresh();
  await expectUsable(t, d, 'another client after the oversized EXPORT_NAME');
  await d.disconnect();
  await checkHealthy(t);
});

t.test('structured READ chunks: DF gives one content chunk, chunks never overlap', async (t) => {
  const c = await fresh({ blockStatus: true });
  // 64 KiB of data followed by 1 MiB that was never written (a hole).
  const holeAt = SCRATCH + 6 * MiB;
  t.equal((await c.write(holeAt - 65536, scratchPattern.subarray(0, 65536))).error, 0, 'write data before the hole');
  const df = await c.read(holeAt - 65536, 131072, NBD.CMD_FLAG_DF);
  t.equal(df.error, 0, 'DF read succeeds');
  const content = df.chunks.filter((ch) => ch.type === NBD.REPLY_TYPE_OFFSET_DATA || ch.type === NBD.REPLY_TYPE_OFFSET_HOLE);
  t.equal(content.length, 1, 'DF: exactly one content chunk');
  t.equal(content[0]?.type, NBD.REPLY_TYPE_OFFSET_DATA, 'DF over data + hole: OFFSET_DATA (proto.md: MUST)');
  t.ok(df.data?.subarray(0, 65536).equals(scratchPattern.subarray(0, 65536)), 'DF data correct');
  t.ok(df.data?.subarray(65536).equals(Buffer.alloc(65536)), 'DF zeroes correct');

  const frag = await c.read(holeAt - 65536, MiB + 65536);
  t.equal(frag.error, 0, 'fragmented read succeeds');
  const spans = frag.chunks
    .filter((ch) => ch.offset !== undefined && !(ch.type & 0x8000))
    .map((ch) => [Number(ch.offset), Number(ch.offset) + (ch.data?.length ?? ch.holeLength!)] as const)
    .sort((x, y) => x[0] - y[0]);
  let pos = holeAt - 65536;
  let ok = true;
  for (const [s, e] of spans) {
    if (s !== pos || e <= s) ok = false;
    pos = e;
  }
  t.ok(ok && pos === holeAt + MiB, `chunks tile the request exactly (${spans.length} chunks)`);
  t.ok(frag.chunks.some((ch) => ch.type === NBD.REPLY_TYPE_OFFSET_HOLE), 'the unwritten MiB comes as a hole');
  t.equal(frag.chunks.filter((ch) => ch.flags & NBD.REPLY_FLAG_DONE).length, 1, 'exactly one chunk has DONE');
  t.ok(frag.chunks.at(-1)!.flags & NBD.REPLY_FLAG_DONE, 'and it is the last');

  const one = await c.cmd(NBD.CMD_BLOCK_STATUS, NBD.CMD_FLAG_REQ_ONE, holeAt - 65536, MiB);
  const ext = one.chunks.find((ch) => ch.type === NBD.REPLY_TYPE_BLOCK_STATUS)?.extents ?? [];
  t.equal(ext.length, 1, 'REQ_ONE: one extent');
  t.ok(ext[0] && ext[0].length > 0 && ext[0].length <= MiB, 'REQ_ONE: extent within the request');
  await c.disconnect();
  await checkHealthy(t);
});

// ---- Transmission --------------------------------------------------------------

t.test('wrong request magic: server drops the connection', async (t) => {
  for (const magic of [0x12345678, NBD.SIMPLE_REPLY_MAGIC, 0x21e41c71 /* extended, not negotiated */]) {
    const c = await fresh();
    await c.request(NBD.CMD_READ, 0, 7n, SCRATCH, 4096, undefined, magic);
    await expectClosed(t, c, `magic 0x${magic.toString(16)}`);
    t.equal(c.available, 0, `magic 0x${magic.toString(16)}: no reply`);
  }
  await checkHealthy(t);
});

t.test('unknown command type: EINVAL, connection stays usable', async (t) => {
  for (const structured of [false, true]) {
    const c = await fresh({ structured });
    for (const type of [9, 42, 0xffff]) {
      const r = await c.cmd(type, 0, SCRATCH, 4096);
      expectError(t, r, NBD.EINVAL, `${structured ? 'structured' : 'simple'} type ${type}`);
      if (structured) {
        t.equal(r.chunks.at(-1)!.type, NBD.REPLY_TYPE_ERROR, 'error chunk');
        t.ok(r.chunks.at(-1)!.flags & NBD.REPLY_FLAG_DONE, 'with DONE');
      }
    }
    await expectUsable(t, c, 'after unknown commands');
    await c.disconnect();
  }
  await checkHealthy(t);
});

t.test('unknown and unadvertised command flags: EINVAL', async (t) => {
  const c = await fresh();
  const cases: [string, number, number, number, Buffer?][] = [
    ['READ with bit 15', NBD.CMD_READ, 0x8000, 4096],
    ['READ with DF (DF is only advertised with structured replies)', NBD.CMD_READ, NBD.CMD_FLAG_DF, 4096],
    ['WRITE with NO_HOLE', NBD.CMD_WRITE, NBD.CMD_FLAG_NO_HOLE, 4096, scratchPattern.subarray(0, 4096)],
    ['WRITE with bit 6 (PAYLOAD_LEN, not negotiated)', NBD.CMD_WRITE, 1 << 5, 4096, scratchPattern.subarray(0, 4096)],
    ['TRIM with REQ_ONE', NBD.CMD_TRIM, NBD.CMD_FLAG_REQ_ONE, 4096],
    ['FLUSH with bit 9', NBD.CMD_FLUSH, 1 << 9, 0],
  ];
  for (const [what, type, flags, len, payload] of cases) {
    const off = type === NBD.CMD_FLUSH ? 0 : SCRATCH;
    const r = await c.cmd(type, flags, off, len, payload);
    expectError(t, r, NBD.EINVAL, what);
  }
  await expectUsable(t, c, 'after bad flags (refused WRITE payloads were consumed)');
  await c.disconnect();
  await checkHealthy(t);
});

t.test('FUA is accepted on every command when SEND_FUA is advertised (proto.md: server MUST accept)', async (t) => {
  const c = await RawClient.connect(srv.socket);
  const go = await c.go('disk');
  t.ok(go.flags & NBD.FLAG_SEND_FUA, 'SEND_FUA advertised');
  const w = await c.write(SCRATCH + 8 * MiB, Buffer.alloc(4096, 1), NBD.CMD_FLAG_FUA);
  t.equal(w.error, 0, 'WRITE+FUA succeeds');
  const r = await c.read(SCRATCH, 4096, NBD.CMD_FLAG_FUA);
  t.equal(r.error, 0, 'READ+FUA succeeds');
  t.ok(r.data?.equals(scratchPattern.subarray(0, 4096)), 'READ+FUA returns the data');
  const f = await c.cmd(NBD.CMD_FLUSH, NBD.CMD_FLAG_FUA, 0, 0);
  t.equal(f.error, 0, 'FLUSH+FUA succeeds');
  const ca = await c.cmd(NBD.CMD_CACHE, NBD.CMD_FLAG_FUA, SCRATCH, 4096);
  t.equal(ca.error, 0, 'CACHE+FUA succeeds');
  await expectUsable(t, c, 'after FUA on other commands');
  await c.disconnect();
  const b = await fresh({ blockStatus: true });
  const bs = await b.cmd(NBD.CMD_BLOCK_STATUS, NBD.CMD_FLAG_FUA, SCRATCH, 4096);
  t.equal(bs.error, 0, 'BLOCK_STATUS+FUA succeeds');
  await b.disconnect();
  await checkHealthy(t);
});

t.test('READ longer than the 32 MiB max payload: EINVAL, no payload', async (t) => {
  for (const structured of [false, true]) {
    const c = await fresh({ structured });
    const r = await c.read(0, 32 * MiB + 1);
    expectError(t, r, NBD.EINVAL, `${structured ? 'structured' : 'simple'} READ 32 MiB + 1`);
    if (structured) t.notOk(r.simple, 'READ error comes as a structured reply (proto.md: MUST NOT use simple reply for READ)');
    const huge = await c.read(0, 0xffffffff);
    expectError(t, huge, NBD.EINVAL, 'READ 4 GiB - 1');
    // Nothing follows the error reply: the next reply parses cleanly.
    await expectUsable(t, c, 'after oversized READs');
    t.equal(c.available, 0, 'no stray payload bytes');
    await c.disconnect();
  }
  // Exactly the maximum is fine (sparse region, so cheap).
  const d = await fresh({ structured: true });
  const max = await d.read(SIZE - 32 * MiB, 32 * MiB);
  t.equal(max.error, 0, 'READ of exactly 32 MiB succeeds');
  t.equal(max.covered, 32 * MiB, 'and its chunks cover the whole range');
  await d.disconnect();
  await checkHealthy(t);
});

t.test('WRITE of 64 MiB (above max payload): drained and refused, no 64 MiB buffer', async (t) => {
  const c = await fresh();
  await sleep(200);
  const before = procStatus(pid);
  const len = 64 * MiB;
  const cookie = await c.request(NBD.CMD_WRITE, 0, undefined, SCRATCH, len);
  const piece = Buffer.alloc(MiB, 0x5a);
  let sendFailed = false;
  for (let sent = 0; sent < len && !c.isClosed; sent += MiB) {
    try {
      await c.send(piece);
    } catch {
      sendFailed = true;
      break;
    }
  }
  let outcome: string;
  try {
    const r = await c.readReply();
    t.equal(r.cookie, cookie, 'reply for the WRITE');
    t.equal(r.error, NBD.EINVAL, 'WRITE 64 MiB: EINVAL');
    await expectUsable(t, c, 'after the drained 64 MiB payload');
    outcome = 'drained the payload and replied EINVAL';
    await c.disconnect();
  } catch (err) {
    outcome = `closed the connection (${(err as Error).message}, sendFailed=${sendFailed})`;
    c.destroy();
  }
  t.comment(`server ${outcome}`);
  const after = procStatus(pid);
  const grew = after.hwm - before.hwm;
  t.comment(`VmRSS ${(before.rss / MiB).toFixed(1)} -> ${(after.rss / MiB).toFixed(1)} MiB, VmHWM +${(grew / MiB).toFixed(1)} MiB`);
  t.ok(grew < 32 * MiB, `peak RSS did not jump by the payload (grew ${(grew / MiB).toFixed(1)} MiB)`);
  t.ok(after.rss - before.rss < 32 * MiB, 'RSS did not jump by the payload');
  // The region was not written.
  const d = await fresh();
  await expectUsable(t, d, 'scratch data intact after the refused 64 MiB write');
  await d.disconnect();
  await checkHealthy(t);
});

t.test('requests past the end: READ EINVAL, WRITE ENOSPC with payload consumed', async (t) => {
  const c = await fresh({ blockStatus: true });
  expectError(t, await c.read(SIZE - 512, 1024), NBD.EINVAL, 'READ straddling the end');
  expectError(t, await c.read(SIZE, 1), NBD.EINVAL, 'READ at the end');
  expectError(t, await c.read(SIZE + 4096, 4096), NBD.EINVAL, 'READ beyond the end');
  const w = await c.write(SIZE - 512, Buffer.alloc(1024, 0x11));
  t.equal(w.error, NBD.ENOSPC, 'WRITE straddling the end: ENOSPC');
  await expectUsable(t, c, 'after WRITE past the end (payload consumed)');
  const w2 = await c.write(SIZE, Buffer.alloc(65536, 0x22));
  t.equal(w2.error, NBD.ENOSPC, 'WRITE at the end: ENOSPC');
  await expectUsable(t, c, 'after a 64 KiB WRITE at the end');
  t.equal((await c.cmd(NBD.CMD_TRIM, 0, SIZE - 512, 1024)).error, NBD.EINVAL, 'TRIM past the end: EINVAL');
  t.equal((await c.cmd(NBD.CMD_WRITE_ZEROES, 0, SIZE - 512, 1024)).error, NBD.ENOSPC, 'WRITE_ZEROES past the end: ENOSPC');
  t.equal((await c.cmd(NBD.CMD_BLOCK_STATUS, 0, SIZE - 512, 1024)).error, NBD.EINVAL, 'BLOCK_STATUS past the end: EINVAL');
  t.equal((await c.cmd(NBD.CMD_CACHE, 0, SIZE, 4096)).error, NBD.EINVAL, 'CACHE past the end: EINVAL');
  const last = await c.read(SIZE - 4096, 4096);
  t.ok(last.data?.equals(Buffer.alloc(4096, 0xee)), 'the last block was not touched by refused writes');
  await c.disconnect();
  await checkHealthy(t);
});

t.test('offset + length overflowing 2^64', async (t) => {
  const c = await fresh();
  const top = 2n ** 64n - 512n;
  expectError(t, await c.read(top, 1024), NBD.EINVAL, 'READ wrapping 2^64');
  expectError(t, await c.read(2n ** 64n - 1n, 1), NBD.EINVAL, 'READ at 2^64-1');
  const w = await c.write(top, Buffer.alloc(1024, 0x33));
  t.equal(w.error, NBD.ENOSPC, 'WRITE wrapping 2^64: ENOSPC');
  t.equal((await c.cmd(NBD.CMD_TRIM, 0, top, 1024)).error, NBD.EINVAL, 'TRIM wrapping 2^64: EINVAL');
  t.equal((await c.cmd(NBD.CMD_WRITE_ZEROES, 0, top, 1024)).error, NBD.ENOSPC, 'WRITE_ZEROES wrapping 2^64: ENOSPC');
  // Block 0 must not have been written through a wrapped offset.
  const first = await c.read(0, 512);
  t.notOk(first.data?.equals(Buffer.alloc(512, 0x33)), 'offset 0 was not written by the wrapping WRITE');
  await expectUsable(t, c, 'after wrapping requests');
  await c.disconnect();
  await checkHealthy(t);
});

t.test('zero-length requests: answered, connection not dropped', async (t) => {
  for (const structured of [false, true]) {
    const c = await fresh({ structured });
    const mode = structured ? 'structured' : 'simple';
    for (const [name, type] of [['READ', NBD.CMD_READ], ['WRITE', NBD.CMD_WRITE], ['TRIM', NBD.CMD_TRIM], ['WRITE_ZEROES', NBD.CMD_WRITE_ZEROES], ['CACHE', NBD.CMD_CACHE]] as const) {
      const r = await c.cmd(type, 0, SCRATCH, 0);
      t.ok(r.error === 0 || r.error === NBD.EINVAL, `${mode} ${name} len 0: success or EINVAL (got ${r.error})`);
      if (type === NBD.CMD_READ && structured) t.notOk(r.simple, 'zero-length READ: structured reply');
    }
    await expectUsable(t, c, `${mode}: after zero-length requests`);
    await c.disconnect();
  }
  await checkHealthy(t);
});

t.test('BLOCK_STATUS without a meta context: EINVAL', async (t) => {
  for (const structured of [false, true]) {
    const c = await fresh({ structured });
    const r = await c.cmd(NBD.CMD_BLOCK_STATUS, 0, SCRATCH, 4096);
    expectError(t, r, NBD.EINVAL, `${structured ? 'structured' : 'simple'} BLOCK_STATUS`);
    t.notOk(r.chunks.some((ch) => ch.type === NBD.REPLY_TYPE_BLOCK_STATUS), 'no block status chunk');
    await expectUsable(t, c, 'after refused BLOCK_STATUS');
    await c.disconnect();
  }
  await checkHealthy(t);
});

t.test('--read-only export: writes get EPERM and the payload is consumed', async (t) => {
  const dir = fs.mkdtempSync(path.join(srv.dir, 'ro-'));
  const content = crypto.randomBytes(MiB);
  fs.writeFileSync(path.join(dir, 'ro.img'), content);
  const server = await startServer({ dir, images: ['ro.img'], args: ['--read-only'] });
  try {
    const c = await RawClient.connect(server.socket);
    const go = await c.go('ro');
    t.ok(go.flags & NBD.FLAG_READ_ONLY, 'READ_ONLY transmission flag');
    t.notOk(go.flags & NBD.FLAG_SEND_FUA, 'no SEND_FUA on a read-only export');
    const w = await c.write(0, Buffer.alloc(65536, 0x77));
    t.equal(w.error, NBD.EPERM, 'WRITE: EPERM');
    const r = await c.read(0, 65536);
    t.equal(r.error, 0, 'READ after refused WRITE works (payload consumed)');
    t.ok(r.data?.equals(content.subarray(0, 65536)), 'and returns the original content');
    t.equal((await c.cmd(NBD.CMD_TRIM, 0, 0, 4096)).error, NBD.EPERM, 'TRIM: EPERM');
    t.equal((await c.cmd(NBD.CMD_WRITE_ZEROES, 0, 0, 4096)).error, NBD.EPERM, 'WRITE_ZEROES: EPERM');
    const big = await c.write(4096, Buffer.alloc(2 * MiB, 0x78));
    t.equal(big.error, NBD.EPERM, '2 MiB WRITE: EPERM');
    const r2 = await c.read(0, 4096);
    t.ok(r2.data?.equals(content.subarray(0, 4096)), 'connection still in sync after a 2 MiB refused payload');
    t.equal((await c.cmd(NBD.CMD_FLUSH, 0, 0, 0)).error, 0, 'FLUSH on a read-only export succeeds');
    await c.disconnect();
  } finally {
    t.equal(await server.stop(), 0, 'read-only server exits 0');
  }
  t.ok(fs.readFileSync(path.join(server.dir, 'ro.img')).equals(content), 'the read-only image file is unchanged');
  await checkHealthy(t);
});

t.test('client vanishes mid-WRITE payload: nothing is written, server fine', async (t) => {
  const off = SCRATCH + MiB;
  const c = await fresh();
  await c.request(NBD.CMD_WRITE, 0, undefined, off, MiB);
  await c.send(Buffer.alloc(300 * 1024, 0x99));
  await sleep(50);
  c.destroy();
  await sleep(100);
  const d = await fresh();
  const r = await d.read(off, MiB);
  t.ok(r.data?.equals(scratchPattern.subarray(MiB, 2 * MiB)), 'the half-sent WRITE was not applied');
  await d.disconnect();
  await checkHealthy(t);
});

t.test('client sends many READs and vanishes without reading replies', async (t) => {
  for (const structured of [false, true]) {
    const c = await fresh({ structured });
    const reqs: Buffer[] = [];
    for (let i = 0; i < 256; i++) {
      const h = Buffer.alloc(28);
      h.writeUInt32BE(NBD.REQUEST_MAGIC, 0);
      h.writeUInt16BE(NBD.CMD_READ, 6);
      h.writeBigUInt64BE(BigInt(i), 8);
      h.writeBigUInt64BE(BigInt(SCRATCH + (i % 4) * MiB), 16);
      h.writeUInt32BE(MiB, 24);
      reqs.push(h);
    }
    await c.send(Buffer.concat(reqs));
    await sleep(20);
    c.destroy();
  }
  const settled = await waitFor(() => fdCount(pid) <= baseFds + 4, 60_000);
  t.ok(settled, `server fds back to baseline (${fdCount(pid)} vs ${baseFds})`);
  const d = await fresh();
  await expectUsable(t, d, 'after abandoned replies');
  await d.disconnect();
  await checkHealthy(t);
});

t.test('1000 quick connect/disconnect cycles', async (t) => {
  let i = 0;
  const errors: string[] = [];
  let verified = 0;
  const worker = async () => {
    while (i < 1000) {
      const n = i++;
      let c: RawClient | undefined;
      try {
        c = await RawClient.connect(srv.socket);
        switch (n % 5) {
          case 0: // closes right after connect
            break;
          case 1: // mid-greeting
            await c.readExact(1 + (n % 17));
            break;
          case 2: // mid-handshake: flags and part of an option
            await c.handshake();
            await c.sendOption(NBD.OPT_GO, RawClient.infoPayload('disk').subarray(0, 3), { length: 10 });
            break;
          case 3: // after GO, hard close
            await c.go('disk', { structured: n % 2 === 0 });
            break;
          case 4: { // after GO, one read, soft disconnect
            await c.go('disk');
            const r = await c.read(SCRATCH, 4096);
            if (r.error || !r.data!.equals(scratchPattern.subarray(0, 4096))) errors.push(`cycle ${n}: bad read`);
            else verified++;
            await c.request(NBD.CMD_DISC, 0, undefined, 0, 0);
            break;
          }
        }
      } catch (err) {
        errors.push(`cycle ${n}: ${(err as Error).message}`);
      } finally {
        c?.destroy();
      }
    }
  };
  await Promise.all(Array.from({ length: 25 }, worker));
  t.same(errors.slice(0, 10), [], 'no cycle failed');
  t.equal(verified, 200, 'every cycle that read got the right data');
  const fdsOk = await waitFor(() => fdCount(pid) <= baseFds + 4, 60_000);
  t.ok(fdsOk, `no fd leak (${fdCount(pid)} fds, baseline ${baseFds})`);
  // Healthy connections may have grown their worker pools; 1000 leaked
  // connections would show up as hundreds of threads.
  const thrOk = await waitFor(() => procStatus(pid).threads <= baseThreads + 40, 60_000);
  t.ok(thrOk, `no thread leak (${procStatus(pid).threads} threads, baseline ${baseThreads})`);
  await checkHealthy(t);
});

t.test('after all that: server alive, healthy clients correct, nbdinfo works', async (t) => {
  t.ok(isAlive(pid), 'server process alive');
  t.equal(srv.proc.exitCode, null, 'server has not exited');
  // At least 50 rounds whatever the machine's speed (a state, not a race with the other tests).
  await waitFor(() => healthy.ops > 50 || healthy.failures.length > 0, 120_000);
  await healthy.stop();
  t.same(healthy.failures, [], 'raw healthy client: no failures');
  t.ok(healthy.ops > 50, `raw healthy client did ${healthy.ops} verified rounds`);
  if (pyResult) {
    fs.writeFileSync(pyStopFile, '');
    const res = await pyResult;
    pyResult = undefined;
    t.equal(res.code, 0, `python libnbd client exited 0 ${res.stderr}`);
    const out = JSON.parse(res.stdout.trim().split('\n').at(-1) || '{}') as { ops: number; errors: number; msgs: string[] };
    t.equal(out.errors, 0, `python libnbd client: no errors ${JSON.stringify(out.msgs)}`);
    t.ok(out.ops > 50, `python libnbd client did ${out.ops} verified rounds`);
  } else {
    requireTools(t, ['python3-libnbd']);
  }
  if (requireTools(t, ['nbdinfo'])) {
    const r = await exec('nbdinfo', ['--json', srv.uri('disk')], { timeoutMs: 30_000 });
    t.equal(r.code, 0, `nbdinfo exits 0 ${r.stderr}`);
    const info = JSON.parse(r.stdout) as { exports: { 'export-size': number }[] };
    t.equal(info.exports[0]!['export-size'], SIZE, 'nbdinfo reports the export size');
  }
  if (requireTools(t, ['python3-libnbd'])) {
    const r = await pyNbd(
      srv.dir,
      `import nbd, sys\nh = nbd.NBD()\nh.connect_uri(sys.argv[1])\nprint(h.pread(4096, ${SCRATCH}).hex())\nh.shutdown()\n`,
      srv.uri('disk'),
    );
    t.equal(r.stdout.trim(), scratchPattern.subarray(0, 4096).toString('hex'), 'libnbd reads the right data after the abuse');
  }
});
