// transmission.cc — the transmission phase: request validation at the
// protocol edge, dispatch to the device chain, and reply encoding.
//
// Validation happens once, here, in receive_request(): magic, command,
// flags against what was advertised, zero lengths, ranges against the export
// size, payload limits. A bad request becomes a `PendingRequest` carrying an
// NBD error, which execute_request() turns into an error reply; the stream is
// dropped only when its framing is lost (bad magic). A WRITE payload is
// always consumed, even when the write is refused, so framing survives; a
// payload above the advertised maximum is drained in bounded pieces, never
// buffered.
//
// Replies: simple replies when structured replies were not negotiated.
// Otherwise READ is answered with OFFSET_DATA/OFFSET_HOLE chunks (runs of
// zero bytes of at least kHoleMin are sent as holes: a hole in a sparse file
// reads as zeroes, so it is found without extra syscalls), BLOCK_STATUS with
// one BLOCK_STATUS chunk, errors with an ERROR chunk carrying a message, and
// other successes with a simple reply (allowed by the spec).
#include "transmission.hh"

#include <algorithm>
#include <cstring>
#include <vector>

#include "byte_order.hh"
#include "change_map.hh"
#include "errors.hh"
#include "nbd_protocol.hh"

namespace nbd {

using namespace proto;

namespace {

constexpr uint32_t kGranule = 4096;        // zero detection granularity
constexpr uint32_t kHoleMin = 32 * 1024;   // shorter zero runs inside data stay data
constexpr uint32_t kMaxExtents = 1 << 16;  // descriptors per BLOCK_STATUS reply

bool is_zero(const uint8_t* p, size_t n) {
  if (n < 16) {
    for (size_t i = 0; i < n; ++i)
      if (p[i]) return false;
    return true;
  }
  static const uint8_t zeros[16] = {};
  return std::memcmp(p, zeros, 16) == 0 && std::memcmp(p, p + 16, n - 16) == 0;
}

bool refuse(PendingRequest& req, uint32_t error, const char* why) {
  req.error = error;
  req.why = why;
  return false;
}

// Checks flags and range for a request whose header has been decoded.
// Returns true if the request may execute.
bool validate(const Session& s, PendingRequest& req) {
  const uint16_t tx = s.tx_flags;
  const bool ro = tx & kTxReadOnly;
  const uint64_t size = s.exp->device->size();
  const uint64_t end = req.offset + req.length;
  const bool overflow = end < req.offset;
  const bool past_end = overflow || end > size;
  // FUA is valid on every command once SEND_FUA is advertised; commands that
  // do not write ignore it (doc/proto.md, "Command flags", bit 0).
  uint16_t allowed = (tx & kTxSendFua) ? kCmdFlagFua : 0;
  switch (req.type) {
    case kCmdRead:
      if (s.structured) allowed |= kCmdFlagDf;
      if (req.flags & ~allowed) return refuse(req, kEINVAL, "READ with a flag that was not negotiated");
      if (req.length > s.max_payload)
        return refuse(req, (req.flags & kCmdFlagDf) ? kEOVERFLOW : kEINVAL, "READ larger than the maximum payload");
      break;
    case kCmdWrite:
      if (ro) return refuse(req, kEPERM, "export is read-only");
      if (req.flags & ~allowed) return refuse(req, kEINVAL, "WRITE with a flag that was not negotiated");
      if (req.length > s.max_payload) return refuse(req, kEINVAL, "WRITE larger than the maximum payload");
      if (req.length && past_end) return refuse(req, kENOSPC, "WRITE past the end of the export");
      break;
    case kCmdFlush:
      if (req.flags & ~allowed) return refuse(req, kEINVAL, "FLUSH with a flag that was not negotiated");
      if (req.offset || req.length) return refuse(req, kEINVAL, "FLUSH offset and length must be zero");
      return true;
    case kCmdTrim:
      if (ro) return refuse(req, kEPERM, "export is read-only");
      if (!(tx & kTxSendTrim)) return refuse(req, kEINVAL, "TRIM was not negotiated");
      if (req.flags & ~allowed) return refuse(req, kEINVAL, "TRIM with a flag that was not negotiated");
      if (req.length && past_end) return refuse(req, kEINVAL, "TRIM past the end of the export");
      break;
    case kCmdCache:
      if (!(tx & kTxSendCache)) return refuse(req, kEINVAL, "CACHE was not negotiated");
      if (req.flags & ~allowed) return refuse(req, kEINVAL, "CACHE with a flag that was not negotiated");
      if (req.length && past_end) return refuse(req, kEINVAL, "CACHE past the end of the export");
      break;
    case kCmdWriteZeroes:
      if (ro) return refuse(req, kEPERM, "export is read-only");
      if (!(tx & kTxSendWriteZeroes)) return refuse(req, kEINVAL, "WRITE_ZEROES was not negotiated");
      allowed |= kCmdFlagNoHole;
      if (tx & kTxSendFastZero) allowed |= kCmdFlagFastZero;
      if (req.flags & ~allowed) return refuse(req, kEINVAL, "WRITE_ZEROES with a flag that was not negotiated");
      if (req.length && past_end) return refuse(req, kENOSPC, "WRITE_ZEROES past the end of the export");
      break;
    case kCmdBlockStatus:
      if (!s.base_allocation_id && !s.dirty_bitmap_id) return refuse(req, kEINVAL, "BLOCK_STATUS without a negotiated meta context");
      allowed |= kCmdFlagReqOne;
      if (req.flags & ~allowed) return refuse(req, kEINVAL, "BLOCK_STATUS with a flag that was not negotiated");
      if (req.length && past_end) return refuse(req, kEINVAL, "BLOCK_STATUS past the end of the export");
      break;
    default:
      return refuse(req, kEINVAL, "unknown command");
  }
  if (req.length == 0) return refuse(req, kEINVAL, "zero-length request");
  if (past_end) return refuse(req, kEINVAL, "request past the end of the export");
  return true;
}

// Small on-stack storage for chunk headers: header + offset + (hole length).
struct ChunkHead {
  uint8_t b[sizeof(StructuredReply) + 12];
};

void fill_chunk_header(uint8_t* p, uint16_t flags, uint16_t type, uint64_t cookie, uint32_t length) {
  StructuredReply h{be32(kStructuredReplyMagic), be16(flags), be16(type), cookie, be32(length)};
  std::memcpy(p, &h, sizeof h);
}

int send_simple(ReplySender& out, uint64_t cookie, uint32_t error, const void* data = nullptr, size_t len = 0) {
  SimpleReply h{be32(kSimpleReplyMagic), be32(error), cookie};
  struct iovec iov[2] = {{&h, sizeof h}, {const_cast<void*>(data), len}};
  return out.send(iov, data ? 2 : 1);
}

int send_error(ReplySender& out, const Session& s, const PendingRequest& req, uint32_t error, const char* why) {
  if (!s.structured) return send_simple(out, req.cookie, error);
  std::string msg = why ? why : "";
  if (msg.size() > 4096) msg.resize(4096);
  uint8_t head[sizeof(StructuredReply) + 6];
  fill_chunk_header(head, kReplyFlagDone, kReplyTypeError, req.cookie, static_cast<uint32_t>(6 + msg.size()));
  uint32_t e = be32(error);
  uint16_t ml = be16(static_cast<uint16_t>(msg.size()));
  std::memcpy(head + sizeof(StructuredReply), &e, 4);
  std::memcpy(head + sizeof(StructuredReply) + 4, &ml, 2);
  struct iovec iov[2] = {{head, sizeof head}, {msg.data(), msg.size()}};
  return out.send(iov, msg.empty() ? 1 : 2);
}

int reply_read(ReplySender& out, const Session& s, const PendingRequest& req, const uint8_t* data) {
  if (!s.structured) return send_simple(out, req.cookie, 0, data, req.length);

  // Split into runs: [start, end) and whether the run is a hole.
  struct Run { uint32_t start, end; bool hole; };
  std::vector<Run> runs;
  const uint32_t len = req.length;
  if (req.flags & kCmdFlagDf || len <= kGranule) {
    runs.push_back({0, len, is_zero(data, len)});
  } else {
    uint32_t pos = 0;
    // First granule ends at the next absolute kGranule boundary.
    while (pos < len) {
      uint32_t next = static_cast<uint32_t>(std::min<uint64_t>(
          len, (((req.offset + pos) / kGranule) + 1) * kGranule - req.offset));
      bool z = is_zero(data + pos, next - pos);
      if (!runs.empty() && runs.back().hole == z) runs.back().end = next;
      else runs.push_back({pos, next, z});
      pos = next;
    }
    // Short zero runs between data are not worth a chunk: fold them into data.
    if (runs.size() > 1) {
      std::vector<Run> merged;
      for (auto r : runs) {
        if (r.hole && r.end - r.start < kHoleMin) r.hole = false;
        if (!merged.empty() && merged.back().hole == r.hole) merged.back().end = r.end;
        else merged.push_back(r);
      }
      runs.swap(merged);
    }
  }
  std::vector<ChunkHead> heads(runs.size());
  std::vector<struct iovec> iov;
  iov.reserve(runs.size() * 2);
  for (size_t i = 0; i < runs.size(); ++i) {
    const Run& r = runs[i];
    uint16_t flags = i + 1 == runs.size() ? kReplyFlagDone : 0;
    uint8_t* p = heads[i].b;
    uint64_t off = be64(req.offset + r.start);
    if (r.hole) {
      fill_chunk_header(p, flags, kReplyTypeOffsetHole, req.cookie, 12);
      uint32_t hl = be32(r.end - r.start);
      std::memcpy(p + sizeof(StructuredReply), &off, 8);
      std::memcpy(p + sizeof(StructuredReply) + 8, &hl, 4);
      iov.push_back({p, sizeof(StructuredReply) + 12});
    } else {
      fill_chunk_header(p, flags, kReplyTypeOffsetData, req.cookie, 8 + (r.end - r.start));
      std::memcpy(p + sizeof(StructuredReply), &off, 8);
      iov.push_back({p, sizeof(StructuredReply) + 8});
      iov.push_back({const_cast<uint8_t*>(data + r.start), r.end - r.start});
    }
  }
  return out.send(iov.data(), static_cast<int>(iov.size()));
}

// One BLOCK_STATUS chunk body for context `id`: neighbours with equal flags
// merged, clipped to the request (REQ_ONE: one extent).
std::vector<uint8_t> block_status_body(uint32_t id, const PendingRequest& req, const std::vector<Extent>& ext) {
  std::vector<uint8_t> body;
  put_be32(body, id);
  uint64_t covered = 0;
  size_t n = 0;
  for (size_t i = 0; i < ext.size() && covered < req.length; ++i) {
    uint64_t l = std::min<uint64_t>(ext[i].length, req.length - covered);
    uint32_t f = ext[i].flags;
    while (i + 1 < ext.size() && ext[i + 1].flags == f && covered + l < req.length) {
      l = std::min<uint64_t>(l + ext[++i].length, req.length - covered);
    }
    put_be32(body, static_cast<uint32_t>(l));
    put_be32(body, f);
    covered += l;
    ++n;
    if (req.flags & kCmdFlagReqOne) break;
  }
  if (n == 0) {  // a device must return at least one extent; be safe anyway
    put_be32(body, req.length);
    put_be32(body, 0);
  }
  return body;
}

// One chunk per negotiated context, the last one flagged DONE, sent whole.
int reply_block_status(ReplySender& out, const PendingRequest& req,
                       const std::vector<std::pair<uint32_t, std::vector<Extent>>>& contexts) {
  std::vector<std::vector<uint8_t>> bodies;
  for (auto& [id, ext] : contexts) bodies.push_back(block_status_body(id, req, ext));
  std::vector<ChunkHead> heads(bodies.size());
  std::vector<struct iovec> iov;
  for (size_t i = 0; i < bodies.size(); ++i) {
    fill_chunk_header(heads[i].b, i + 1 == bodies.size() ? kReplyFlagDone : 0, kReplyTypeBlockStatus, req.cookie,
                      static_cast<uint32_t>(bodies[i].size()));
    iov.push_back({heads[i].b, sizeof(StructuredReply)});
    iov.push_back({bodies[i].data(), bodies[i].size()});
  }
  return out.send(iov.data(), static_cast<int>(iov.size()));
}

// qemu:dirty-bitmap:NAME over the request's range: flag 1 (dirty) for the
// chunks changed from snapshot NAME to the export's point, 0 elsewhere
// (change_map.hh; as qemu reports its dirty bitmaps).
int dirty_extents(const Session& s, const PendingRequest& req, std::vector<Extent>& out) {
  ChangeSource& src = *s.exp->changes;
  const uint64_t cs = src.chunk_size();
  const uint64_t first = req.offset / cs, last = (req.offset + req.length - 1) / cs;
  std::vector<ChunkRun> runs;
  ChangeError kind = ChangeError::kNone;
  std::string err;
  // The snapshot may have been deleted or failed since the negotiation.
  if (src.changed_chunks(s.dirty_from, s.exp->changes_at, runs, kind, err, first, last - first + 1)) return EIO;
  const uint64_t end = req.offset + req.length;
  uint64_t pos = req.offset;
  for (const ChunkRun& r : runs) {
    if (out.size() + 2 > kMaxExtents) return 0;  // a prefix of the range is a valid answer
    const uint64_t a = std::max(pos, r.start * cs), b = std::min(end, (r.start + r.count) * cs);
    if (a >= b) continue;
    if (a > pos) out.push_back({a - pos, 0});
    out.push_back({b - a, 1});
    pos = b;
  }
  if (pos < end) out.push_back({end - pos, 0});
  return 0;
}

}  // namespace

int ReplySender::send(struct iovec* iov, int n) {
  std::lock_guard<std::mutex> lk(mu);
  if (broken.load(std::memory_order_relaxed)) return EPIPE;
  int e = send_all(fd, iov, n);
  if (e) broken.store(true);
  return e;
}

RecvStatus receive_request(SocketReader& reader, const Session& s, IoBuffer& buf, PendingRequest& req) {
  Request raw;
  int e = reader.read_exact(&raw, sizeof raw);
  if (e) return RecvStatus::kEof;
  if (from_be32(raw.magic) != kRequestMagic) return RecvStatus::kCorrupt;
  req = PendingRequest{};
  req.type = from_be16(raw.type);
  req.flags = from_be16(raw.flags);
  req.cookie = raw.cookie;  // opaque: echoed back byte for byte
  req.offset = from_be64(raw.offset);
  req.length = from_be32(raw.length);
  if (req.type == kCmdDisc) return RecvStatus::kDisconnect;
  bool ok = validate(s, req);
  if (req.type == kCmdWrite) {
    // The payload follows whatever we think of the request; keep framing.
    if (req.length > s.max_payload || !ok) {
      if (reader.discard(req.length)) return RecvStatus::kEof;
      return RecvStatus::kRequest;
    }
    req.payload = buf.get(req.length);
    if (!req.payload) {
      if (reader.discard(req.length)) return RecvStatus::kEof;
      refuse(req, kENOMEM, "out of memory for WRITE payload");
      return RecvStatus::kRequest;
    }
    if (reader.read_exact(req.payload, req.length)) return RecvStatus::kEof;
  }
  return RecvStatus::kRequest;
}

int execute_request(ReplySender& out, const Session& s, PendingRequest& req, IoBuffer& buf) {
  Export& exp = *s.exp;
  Device& dev = *exp.device;
  ExportStats& st = exp.stats;
  if (req.error) {
    st.errors.fetch_add(1, std::memory_order_relaxed);
    return send_error(out, s, req, req.error, req.why);
  }
  int err = 0;
  IoFlags fl;
  fl.fua = req.flags & kCmdFlagFua;
  switch (req.type) {
    case kCmdRead: {
      uint8_t* data = buf.get(req.length);
      if (!data) { err = ENOMEM; break; }
      err = dev.pread(data, req.length, req.offset);
      if (err) break;
      st.reads.fetch_add(1, std::memory_order_relaxed);
      st.bytes_read.fetch_add(req.length, std::memory_order_relaxed);
      return reply_read(out, s, req, data);
    }
    case kCmdWrite:
      err = dev.pwrite(req.payload, req.length, req.offset, fl);
      if (!err) {
        st.writes.fetch_add(1, std::memory_order_relaxed);
        st.bytes_written.fetch_add(req.length, std::memory_order_relaxed);
      }
      break;
    case kCmdFlush:
      err = dev.flush();
      st.flushes.fetch_add(1, std::memory_order_relaxed);
      break;
    case kCmdTrim:
      err = dev.trim(req.length, req.offset, fl);
      st.trims.fetch_add(1, std::memory_order_relaxed);
      break;
    case kCmdCache:
      err = dev.cache(req.length, req.offset);
      st.caches.fetch_add(1, std::memory_order_relaxed);
      break;
    case kCmdWriteZeroes:
      fl.may_trim = !(req.flags & kCmdFlagNoHole);
      fl.fast_only = req.flags & kCmdFlagFastZero;
      err = dev.zero(req.length, req.offset, fl);
      st.zeroes.fetch_add(1, std::memory_order_relaxed);
      break;
    case kCmdBlockStatus: {
      std::vector<std::pair<uint32_t, std::vector<Extent>>> contexts;
      st.block_status.fetch_add(1, std::memory_order_relaxed);
      if (s.base_allocation_id) {
        contexts.push_back({s.base_allocation_id, {}});
        err = dev.extents(req.length, req.offset, (req.flags & kCmdFlagReqOne) ? 1 : kMaxExtents, contexts.back().second);
        if (err) break;
      }
      if (s.dirty_bitmap_id) {
        contexts.push_back({s.dirty_bitmap_id, {}});
        err = dirty_extents(s, req, contexts.back().second);
        if (err) break;
      }
      return reply_block_status(out, req, contexts);
    }
    default:
      err = EINVAL;
  }
  if (err) {
    st.errors.fetch_add(1, std::memory_order_relaxed);
    std::string why = std::string(command_name(req.type)) + " failed: " + strerror(err);
    return send_error(out, s, req, map_errno(err), why.c_str());
  }
  return send_simple(out, req.cookie, 0);
}

}  // namespace nbd
