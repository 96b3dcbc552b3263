// nbd_protocol.hh — the NBD wire format: magics, option/command/reply numbers, flags, errors.
//
// Only constants and packed layouts live here, no logic (see nbdkit's
// common/protocol/nbd-protocol.h for the same idea). All multi-byte fields on
// the wire are big-endian; the encode/decode helpers are in byte_order.hh.
// Reference: doc/proto.md of the NBD reference implementation.
#pragma once

#include <cstdint>

namespace nbd::proto {

// ---- Handshake (fixed newstyle) -------------------------------------------
constexpr uint64_t kNbdMagic = 0x4e42444d41474943ULL;      // "NBDMAGIC"
constexpr uint64_t kIHaveOpt = 0x49484156454F5054ULL;      // "IHAVEOPT"
constexpr uint64_t kOptReplyMagic = 0x0003e889045565a9ULL;

// Server handshake flags (16 bits).
constexpr uint16_t kFlagFixedNewstyle = 1 << 0;
constexpr uint16_t kFlagNoZeroes = 1 << 1;
// Client flags (32 bits).
constexpr uint32_t kClientFixedNewstyle = 1 << 0;
constexpr uint32_t kClientNoZeroes = 1 << 1;

// Options.
constexpr uint32_t kOptExportName = 1;
constexpr uint32_t kOptAbort = 2;
constexpr uint32_t kOptList = 3;
constexpr uint32_t kOptPeekExport = 4;
constexpr uint32_t kOptStartTls = 5;
constexpr uint32_t kOptInfo = 6;
constexpr uint32_t kOptGo = 7;
constexpr uint32_t kOptStructuredReply = 8;
constexpr uint32_t kOptListMetaContext = 9;
constexpr uint32_t kOptSetMetaContext = 10;
constexpr uint32_t kOptExtendedHeaders = 11;

// Option reply types.
constexpr uint32_t kRepAck = 1;
constexpr uint32_t kRepServer = 2;
constexpr uint32_t kRepInfo = 3;
constexpr uint32_t kRepMetaContext = 4;
constexpr uint32_t kRepFlagError = 1U << 31;
constexpr uint32_t kRepErrUnsup = kRepFlagError | 1;
constexpr uint32_t kRepErrPolicy = kRepFlagError | 2;
constexpr uint32_t kRepErrInvalid = kRepFlagError | 3;
constexpr uint32_t kRepErrPlatform = kRepFlagError | 4;
constexpr uint32_t kRepErrTlsReqd = kRepFlagError | 5;
constexpr uint32_t kRepErrUnknown = kRepFlagError | 6;
constexpr uint32_t kRepErrShutdown = kRepFlagError | 7;
constexpr uint32_t kRepErrBlockSizeReqd = kRepFlagError | 8;
constexpr uint32_t kRepErrTooBig = kRepFlagError | 9;

// NBD_OPT_INFO / NBD_OPT_GO information types.
constexpr uint16_t kInfoExport = 0;
constexpr uint16_t kInfoName = 1;
constexpr uint16_t kInfoDescription = 2;
constexpr uint16_t kInfoBlockSize = 3;

// Transmission flags (16 bits), sent with the export size.
constexpr uint16_t kTxHasFlags = 1 << 0;
constexpr uint16_t kTxReadOnly = 1 << 1;
constexpr uint16_t kTxSendFlush = 1 << 2;
constexpr uint16_t kTxSendFua = 1 << 3;
constexpr uint16_t kTxRotational = 1 << 4;
constexpr uint16_t kTxSendTrim = 1 << 5;
constexpr uint16_t kTxSendWriteZeroes = 1 << 6;
constexpr uint16_t kTxSendDf = 1 << 7;
constexpr uint16_t kTxCanMultiConn = 1 << 8;
constexpr uint16_t kTxSendResize = 1 << 9;
constexpr uint16_t kTxSendCache = 1 << 10;
constexpr uint16_t kTxSendFastZero = 1 << 11;

// ---- Transmission ---------------------------------------------------------
constexpr uint32_t kRequestMagic = 0x25609513;
constexpr uint32_t kSimpleReplyMagic = 0x67446698;
constexpr uint32_t kStructuredReplyMagic = 0x668e33ef;

// Commands.
constexpr uint16_t kCmdRead = 0;
constexpr uint16_t kCmdWrite = 1;
constexpr uint16_t kCmdDisc = 2;
constexpr uint16_t kCmdFlush = 3;
constexpr uint16_t kCmdTrim = 4;
constexpr uint16_t kCmdCache = 5;
constexpr uint16_t kCmdWriteZeroes = 6;
constexpr uint16_t kCmdBlockStatus = 7;
constexpr uint16_t kCmdResize = 8;

// Command flags.
constexpr uint16_t kCmdFlagFua = 1 << 0;
constexpr uint16_t kCmdFlagNoHole = 1 << 1;
constexpr uint16_t kCmdFlagDf = 1 << 2;
constexpr uint16_t kCmdFlagReqOne = 1 << 3;
constexpr uint16_t kCmdFlagFastZero = 1 << 4;
constexpr uint16_t kCmdFlagPayloadLen = 1 << 5;

// Structured reply chunk types and flags.
constexpr uint16_t kReplyFlagDone = 1 << 0;
constexpr uint16_t kReplyTypeNone = 0;
constexpr uint16_t kReplyTypeOffsetData = 1;
constexpr uint16_t kReplyTypeOffsetHole = 2;
constexpr uint16_t kReplyTypeBlockStatus = 5;
constexpr uint16_t kReplyTypeError = (1 << 15) + 1;
constexpr uint16_t kReplyTypeErrorOffset = (1 << 15) + 2;

// Errors on the wire (not host errno values, although most coincide).
constexpr uint32_t kEPERM = 1;
constexpr uint32_t kEIO = 5;
constexpr uint32_t kENOMEM = 12;
constexpr uint32_t kEINVAL = 22;
constexpr uint32_t kENOSPC = 28;
constexpr uint32_t kEOVERFLOW = 75;
constexpr uint32_t kENOTSUP = 95;
constexpr uint32_t kESHUTDOWN = 108;

// base:allocation block status flags.
constexpr uint32_t kStateHole = 1 << 0;
constexpr uint32_t kStateZero = 1 << 1;

// ---- Packed layouts ---------------------------------------------------------
#pragma pack(push, 1)
struct OptionHeader {        // client -> server, after the client flags
  uint64_t magic;            // kIHaveOpt
  uint32_t option;
  uint32_t length;
};
struct OptionReplyHeader {   // server -> client
  uint64_t magic;            // kOptReplyMagic
  uint32_t option;
  uint32_t reply;
  uint32_t length;
};
struct Request {             // client -> server, 28 bytes
  uint32_t magic;            // kRequestMagic
  uint16_t flags;
  uint16_t type;
  uint64_t cookie;
  uint64_t offset;
  uint32_t length;
};
struct SimpleReply {         // 16 bytes
  uint32_t magic;            // kSimpleReplyMagic
  uint32_t error;
  uint64_t cookie;
};
struct StructuredReply {     // 20 bytes, followed by `length` bytes of payload
  uint32_t magic;            // kStructuredReplyMagic
  uint16_t flags;
  uint16_t type;
  uint64_t cookie;
  uint32_t length;
};
#pragma pack(pop)

static_assert(sizeof(OptionHeader) == 16, "wire layout");
static_assert(sizeof(OptionReplyHeader) == 20, "wire layout");
static_assert(sizeof(Request) == 28, "wire layout");
static_assert(sizeof(SimpleReply) == 16, "wire layout");
static_assert(sizeof(StructuredReply) == 20, "wire layout");

// Limits we advertise and enforce.
constexpr uint32_t kMaxStringLength = 4096;          // export names, queries
constexpr uint32_t kMaxOptionLength = 64 * 1024;     // larger options are drained
constexpr uint32_t kHardMaxOptionLength = 16 << 20;  // beyond this we disconnect
constexpr uint32_t kMinBlockSize = 1;
constexpr uint32_t kPreferredBlockSize = 4096;
constexpr uint32_t kDefaultMaxPayload = 32 << 20;    // 32 MiB

// Names for logs.
const char* option_name(uint32_t option);
const char* command_name(uint16_t type);

}  // namespace nbd::proto
