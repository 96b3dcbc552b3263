// handshake.cc — the option haggling phase (doc/proto.md, "Fixed newstyle negotiation").
//
// Runs on the connection's first thread, blocking, before any other thread
// exists for the connection. Every length read from the client is checked
// before it is used: option payloads above kMaxOptionLength are drained and
// refused with NBD_REP_ERR_TOO_BIG, above kHardMaxOptionLength the client is
// disconnected (nothing legitimate is that large). NBD_OPT_EXPORT_NAME has no
// error reply, so an oversized one is drained and the connection closed.
// Strings inside options are bounds-checked against the option length; a
// mismatch is NBD_REP_ERR_INVALID and negotiation continues. Unknown options
// get NBD_REP_ERR_UNSUP.
#include "handshake.hh"

#include <cstring>
#include <vector>

#include "byte_order.hh"
#include "change_map.hh"
#include "nbd_protocol.hh"

namespace nbd {

using namespace proto;

namespace {

using Bytes = std::vector<uint8_t>;

struct Negotiator {
  int fd;
  SocketReader& reader;
  const HandshakeConfig& cfg;
  Session& session;
  bool no_zeroes = false;
  // Meta context state: the export the last SET_META_CONTEXT named, and
  // what it selected: base:allocation (context id 1) and at most one
  // qemu:dirty-bitmap:NAME (context id 2; the snapshot's id, 0 = none).
  std::string meta_export;
  bool meta_base_allocation = false;
  uint64_t meta_dirty_from = 0;

  int reply(uint32_t option, uint32_t type, const Bytes& data) {
    OptionReplyHeader h{be64(kOptReplyMagic), be32(option), be32(type), be32(static_cast<uint32_t>(data.size()))};
    struct iovec iov[2] = {{&h, sizeof h}, {const_cast<uint8_t*>(data.data()), data.size()}};
    return send_all(fd, iov, data.empty() ? 1 : 2);
  }
  int reply_error(uint32_t option, uint32_t type, const std::string& msg) {
    return reply(option, type, Bytes(msg.begin(), msg.end()));
  }

  // A cursor over an option payload that refuses to read past its end.
  // Invariant: pos <= b.size(), so b.size() - pos never wraps. Bytes are
  // reached through b.data() + pos, and only after the length check: never
  // b[pos], which is undefined (and aborts under -D_GLIBCXX_ASSERTIONS) when
  // pos == b.size(), as it is for an empty string at the end of an option.
  struct Cursor {
    const Bytes& b;
    size_t pos = 0;
    bool ok = true;
    uint32_t u32() {
      if (b.size() - pos < 4) { ok = false; return 0; }
      uint32_t v = load_be32(b.data() + pos); pos += 4; return v;
    }
    uint16_t u16() {
      if (b.size() - pos < 2) { ok = false; return 0; }
      uint16_t v = load_be16(b.data() + pos); pos += 2; return v;
    }
    std::string str(uint32_t len) {
      if (len > kMaxStringLength || b.size() - pos < len) { ok = false; return {}; }
      if (len == 0) return {};  // b.data() may be null for an empty payload
      std::string s(reinterpret_cast<const char*>(b.data() + pos), len); pos += len; return s;
    }
    bool done() const { return pos == b.size(); }
  };

  static Bytes export_info(const Export& e, uint16_t flags) {
    Bytes d;
    put_be16(d, kInfoExport);
    put_be64(d, e.device->size());
    put_be16(d, flags);
    return d;
  }

  int send_info_replies(uint32_t option, const Export& e, const std::vector<uint16_t>& requests) {
    uint16_t flags = transmission_flags(*e.device, session.structured);
    if (int r = reply(option, kRepInfo, export_info(e, flags))) return r;
    bool sent_name = false, sent_desc = false;
    for (uint16_t req : requests) {
      if (req == kInfoName && !sent_name) {
        Bytes d; put_be16(d, kInfoName); d.insert(d.end(), e.name.begin(), e.name.end());
        if (int r = reply(option, kRepInfo, d)) return r;
        sent_name = true;
      } else if (req == kInfoDescription && !sent_desc && !e.description.empty()) {
        Bytes d; put_be16(d, kInfoDescription); d.insert(d.end(), e.description.begin(), e.description.end());
        if (int r = reply(option, kRepInfo, d)) return r;
        sent_desc = true;
      }
    }
    // Block size is always sent: our minimum of 1 constrains no client.
    Bytes d;
    put_be16(d, kInfoBlockSize);
    put_be32(d, kMinBlockSize);
    put_be32(d, kPreferredBlockSize);
    put_be32(d, cfg.max_payload);
    return reply(option, kRepInfo, d);
  }

  void enter_transmission(std::shared_ptr<Export> e, const std::string& name) {
    session.exp = std::move(e);
    session.export_name = name;
    session.tx_flags = transmission_flags(*session.exp->device, session.structured);
    session.max_payload = cfg.max_payload;
    // Block status only if the final SET_META_CONTEXT named this export.
    bool same = meta_export == name ||
                cfg.exports->find(meta_export) == session.exp;
    session.base_allocation_id = (session.structured && meta_base_allocation && same) ? 1 : 0;
    session.dirty_from = session.structured && same && session.exp->changes ? meta_dirty_from : 0;
    session.dirty_bitmap_id = session.dirty_from ? 2 : 0;
  }

  // Parses a meta-context request: the export name and the queries.
  uint32_t parse_meta(const Bytes& data, std::string& name, std::vector<std::string>& queries, std::string& why) {
    Cursor c{data};
    uint32_t nlen = c.u32();
    name = c.str(nlen);
    uint32_t nq = c.u32();
    if (!c.ok) { why = "malformed meta context request"; return kRepErrInvalid; }
    for (uint32_t i = 0; i < nq; ++i) {
      uint32_t qlen = c.u32();
      std::string q = c.str(qlen);
      if (!c.ok) { why = "meta context query runs past the option"; return kRepErrInvalid; }
      queries.push_back(std::move(q));
    }
    if (!c.done()) { why = "trailing bytes after meta context queries"; return kRepErrInvalid; }
    return 0;
  }

  // The contexts `queries` select on export `e`. LIST: no query lists
  // everything, "base:" and "qemu:" / "qemu:dirty-bitmap:" list their
  // namespace. SET: exact names only, one dirty bitmap at most (qemu's
  // clients use one). qemu:dirty-bitmap:NAME exists on a volume's exports
  // for each healthy snapshot NAME older than the export's point (the live
  // volume, or snapshot B for disk@B): the chunks changed from NAME to it
  // (change_map.hh).
  struct MetaMatch {
    bool base_alloc = false;
    std::vector<std::pair<std::string, uint64_t>> dirty;  // (context name, snapshot id)
  };
  static MetaMatch match_meta(const Export& e, bool is_set, const std::vector<std::string>& queries) {
    static const std::string kDirty = "qemu:dirty-bitmap:";
    MetaMatch m;
    auto all_dirty = [&] {
      if (!e.changes) return;
      for (auto& n : e.changes->bitmaps_at(e.changes_at))
        if (uint64_t id = e.changes->bitmap_from(n, e.changes_at)) m.dirty.push_back({kDirty + n, id});
    };
    if (queries.empty() && !is_set) {  // LIST with no query lists everything; SET selects nothing
      m.base_alloc = true;
      all_dirty();
      return m;
    }
    for (auto& q : queries) {
      if (q == "base:allocation" || (!is_set && q == "base:")) m.base_alloc = true;
      else if (!is_set && (q == "qemu:" || q == kDirty)) all_dirty();
      else if (q.compare(0, kDirty.size(), kDirty) == 0 && q.size() > kDirty.size() && e.changes &&
               !(is_set && !m.dirty.empty())) {
        if (uint64_t id = e.changes->bitmap_from(q.substr(kDirty.size()), e.changes_at)) m.dirty.push_back({q, id});
      }
    }
    return m;
  }

  // Returns: 1 = continue negotiating, 0 = enter transmission, -1 = close quietly, -2 = fatal.
  int handle(uint32_t option, const Bytes& data, std::string& error) {
    switch (option) {
      case kOptExportName: {
        std::string name(data.begin(), data.end());
        auto e = data.size() <= kMaxStringLength ? cfg.exports->find(name) : nullptr;
        if (!e) { error = "unknown export '" + name + "' requested with NBD_OPT_EXPORT_NAME"; return -2; }
        enter_transmission(e, name);
        uint8_t buf[8 + 2 + 124] = {};
        uint64_t size = be64(e->device->size());
        uint16_t fl = be16(session.tx_flags);
        std::memcpy(buf, &size, 8);
        std::memcpy(buf + 8, &fl, 2);
        if (send_all(fd, buf, no_zeroes ? 10 : sizeof buf)) return -1;
        return 0;
      }
      case kOptAbort:
        reply(option, kRepAck, {});  // best effort; the client may already be gone
        return -1;
      case kOptList: {
        if (!data.empty()) return reply_error(option, kRepErrInvalid, "NBD_OPT_LIST takes no data") ? -1 : 1;
        for (auto& e : cfg.exports->list()) {
          Bytes d;
          put_be32(d, static_cast<uint32_t>(e->name.size()));
          d.insert(d.end(), e->name.begin(), e->name.end());
          d.insert(d.end(), e->description.begin(), e->description.end());
          if (reply(option, kRepServer, d)) return -1;
        }
        return reply(option, kRepAck, {}) ? -1 : 1;
      }
      case kOptStartTls:
        return reply_error(option, kRepErrUnsup, "STARTTLS refused: this server does not support TLS yet; connect without TLS")
                   ? -1 : 1;
      case kOptStructuredReply:
        if (!data.empty())
          return reply_error(option, kRepErrInvalid, "NBD_OPT_STRUCTURED_REPLY takes no data") ? -1 : 1;
        session.structured = true;
        return reply(option, kRepAck, {}) ? -1 : 1;
      case kOptInfo:
      case kOptGo: {
        Cursor c{data};
        uint32_t nlen = c.u32();
        std::string name = c.str(nlen);
        uint16_t nreq = c.u16();
        std::vector<uint16_t> reqs;
        for (uint16_t i = 0; c.ok && i < nreq; ++i) reqs.push_back(c.u16());
        if (!c.ok || !c.done())
          return reply_error(option, kRepErrInvalid, "malformed NBD_OPT_INFO/GO request") ? -1 : 1;
        auto e = cfg.exports->find(name);
        if (!e) return reply_error(option, kRepErrUnknown, "unknown export '" + name + "'") ? -1 : 1;
        if (send_info_replies(option, *e, reqs)) return -1;
        if (reply(option, kRepAck, {})) return -1;
        if (option == kOptGo) {
          enter_transmission(e, name);
          return 0;
        }
        return 1;
      }
      case kOptListMetaContext:
      case kOptSetMetaContext: {
        bool is_set = option == kOptSetMetaContext;
        auto forget = [&] {
          if (is_set) { meta_export.clear(); meta_base_allocation = false; meta_dirty_from = 0; }
        };
        if (!session.structured)
          return reply_error(option, kRepErrInvalid, "negotiate NBD_OPT_STRUCTURED_REPLY first") ? -1 : 1;
        std::string name, why;
        std::vector<std::string> queries;
        if (uint32_t err = parse_meta(data, name, queries, why)) {
          forget();
          return reply_error(option, err, why) ? -1 : 1;
        }
        auto e = cfg.exports->find(name);
        if (!e) {
          forget();
          return reply_error(option, kRepErrUnknown, "unknown export '" + name + "'") ? -1 : 1;
        }
        MetaMatch m = match_meta(*e, is_set, queries);
        auto send_ctx = [&](uint32_t id, const std::string& ctx) {
          Bytes d;
          put_be32(d, is_set ? id : 0);
          d.insert(d.end(), ctx.begin(), ctx.end());
          return reply(option, kRepMetaContext, d);
        };
        if (m.base_alloc && send_ctx(1, "base:allocation")) return -1;
        for (auto& [ctx, id] : m.dirty)
          if (send_ctx(2, ctx)) return -1;
        if (is_set) {
          meta_export = name;
          meta_base_allocation = m.base_alloc;
          meta_dirty_from = m.dirty.empty() ? 0 : m.dirty.front().second;
        }
        return reply(option, kRepAck, {}) ? -1 : 1;
      }
      default:
        return reply_error(option, kRepErrUnsup,
                           std::string("option ") + std::to_string(option) + " (" + option_name(option) +
                               ") is not supported")
                   ? -1 : 1;
    }
  }
};

}  // namespace

uint16_t transmission_flags(const Device& dev, bool structured) {
  uint16_t f = kTxHasFlags | kTxSendFlush;
  if (!dev.can_write()) f |= kTxReadOnly;
  if (dev.can_fua()) f |= kTxSendFua;
  if (dev.can_trim()) f |= kTxSendTrim;
  if (dev.can_zero()) f |= kTxSendWriteZeroes;
  if (dev.can_zero() && dev.can_fast_zero()) f |= kTxSendFastZero;
  if (structured) f |= kTxSendDf;
  if (dev.can_multi_conn()) f |= kTxCanMultiConn;
  if (dev.can_cache()) f |= kTxSendCache;
  return f;
}

HandshakeResult run_handshake(int fd, SocketReader& reader, const HandshakeConfig& cfg, Session& session) {
  Negotiator n{fd, reader, cfg, session};
  uint8_t hello[18];
  uint64_t m1 = be64(kNbdMagic), m2 = be64(kIHaveOpt);
  uint16_t hf = be16(kFlagFixedNewstyle | kFlagNoZeroes);
  std::memcpy(hello, &m1, 8);
  std::memcpy(hello + 8, &m2, 8);
  std::memcpy(hello + 16, &hf, 2);
  if (send_all(fd, hello, sizeof hello)) return {HandshakeOutcome::kClosed, {}};

  uint32_t cflags;
  if (reader.read_exact(&cflags, 4)) return {HandshakeOutcome::kClosed, {}};
  cflags = from_be32(cflags);
  if (cflags & ~(kClientFixedNewstyle | kClientNoZeroes))
    return {HandshakeOutcome::kRejected, "client sent unknown handshake flags " + std::to_string(cflags)};
  n.no_zeroes = cflags & kClientNoZeroes;

  for (unsigned count = 0;; ++count) {
    if (count > 10000) return {HandshakeOutcome::kRejected, "too many options"};
    OptionHeader h;
    if (reader.read_exact(&h, sizeof h)) return {HandshakeOutcome::kClosed, {}};
    if (from_be64(h.magic) != kIHaveOpt)
      return {HandshakeOutcome::kRejected, "bad option magic (not IHAVEOPT)"};
    uint32_t option = from_be32(h.option), len = from_be32(h.length);
    if (len > kHardMaxOptionLength)
      return {HandshakeOutcome::kRejected, "option length " + std::to_string(len) + " is absurd"};
    if (len > kMaxOptionLength) {
      if (reader.discard(len)) return {HandshakeOutcome::kClosed, {}};
      // NBD_OPT_EXPORT_NAME has no error reply (an old client would read
      // one as the export size): close, as nbdkit and qemu-nbd do. Drained
      // first, so the client sees a clean end of stream, not a reset.
      if (option == kOptExportName)
        return {HandshakeOutcome::kRejected, "NBD_OPT_EXPORT_NAME of " + std::to_string(len) + " bytes is too long"};
      if (n.reply_error(option, kRepErrTooBig, "option data too large")) return {HandshakeOutcome::kClosed, {}};
      continue;
    }
    Bytes data(len);
    if (len && reader.read_exact(data.data(), len)) return {HandshakeOutcome::kClosed, {}};
    std::string error;
    int r = n.handle(option, data, error);
    if (r == 0) return {HandshakeOutcome::kTransmission, {}};
    if (r == -1) return {HandshakeOutcome::kClosed, {}};
    if (r == -2) return {HandshakeOutcome::kRejected, error};
  }
}

}  // namespace nbd
