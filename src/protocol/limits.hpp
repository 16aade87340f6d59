// Hard caps on what a peer may send. Checked on every inbound frame before anything else.
#pragma once

#include <cstddef>
#include <cstdint>

namespace companion::protocol {

inline constexpr uint32_t kFrameMagic = 0x314d5043;  // "CPM1" little-endian
inline constexpr size_t kFrameHeaderBytes = 12;
inline constexpr uint32_t kMaxPayloadBytes = 64u << 20;  // 10,000 tensors take ~1.4 MB
inline constexpr uint16_t kMaxFdsPerFrame = 250;         // SCM_MAX_FD is 253
// At ~140 bytes a tensor on the wire, this many fit well inside kMaxPayloadBytes.
// Tensors inline in a Parameters reply (clients of protocol 1.0/1.1, and PublishDeclare).
inline constexpr size_t kMaxTensors = 200'000;
// 1.2: a table memfd (TensorTable) holds at most this many tensors in at most this many bytes
// (1M tensors with 60-byte names take ~140 MB).
inline constexpr size_t kMaxTableTensors = 4'000'000;
inline constexpr uint64_t kMaxTableBytes = 1ull << 30;
inline constexpr size_t kMaxSegments = kMaxFdsPerFrame - 1;  // one descriptor for the table
inline constexpr size_t kMaxRank = 16;
inline constexpr size_t kMaxNameBytes = 4096;
inline constexpr size_t kMaxStringBytes = 8192;
inline constexpr size_t kMaxModels = 100'000;

// What a ModelSpec may carry (ModelSpec::validate). Chosen so that the canonical key built from
// them ("source=<path>;dtype=..;tp=a/b;rules=<escaped>;tag=<tag>", rules escaped up to 3x) always
// fits kMaxStringBytes: the server never emits a key its own clients refuse.
inline constexpr size_t kMaxSourceBytes = 4096;  // PATH_MAX: resolved paths are no longer
inline constexpr size_t kMaxRevisionBytes = 256;
inline constexpr size_t kMaxTagBytes = 1024;
inline constexpr size_t kMaxShardRulesBytes = 960;
inline constexpr size_t kMaxKeyFixedBytes =
    96;  // "source=", ";dtype=F8_E4M3", ";tp=<u32>/<u32>", ...
static_assert(kMaxKeyFixedBytes + kMaxSourceBytes + 3 * kMaxShardRulesBytes + kMaxTagBytes <=
              kMaxStringBytes);
// Error text in a model's status is cut to this (file and tensor names can be long).
inline constexpr size_t kMaxStatusMessageBytes = 1024;
// One ModelStatus on the wire: key, source and message at their bounds, short id and backend
// name, eight numbers, FlatBuffers' offsets and padding.
// Publishing (1.1): a published key, a fingerprint, the generations a status lists.
inline constexpr size_t kMaxPublishKeyBytes = 1024;
inline constexpr size_t kMaxFingerprintFields = 64;
inline constexpr size_t kMaxFingerprintBytes = 2048;  // names and values together
inline constexpr size_t kMaxGenerationsPerKey = 4;    // --max-generations is at most this
inline constexpr size_t kMaxListedDigests = 32;       // per generation in a status
// One generation in a status: its numbers, fingerprint and digests ("wsum64:" + 16 hex digits).
inline constexpr size_t kMaxGenerationWireBytes =
    kMaxFingerprintBytes + kMaxFingerprintFields * 16 + kMaxListedDigests * 40 + 256;
inline constexpr size_t kMaxModelStatusWireBytes = 40 << 10;
static_assert(kMaxStringBytes + kMaxSourceBytes + kMaxStatusMessageBytes + 1024 +
                  kMaxFingerprintBytes + kMaxFingerprintFields * 16 +
                  kMaxGenerationsPerKey * kMaxGenerationWireBytes <=
              kMaxModelStatusWireBytes);
// Entries a list reply may carry: by construction far below kMaxPayloadBytes. The server's
// --max-models plus --max-error-entries must not exceed it.
inline constexpr size_t kMaxListedModels =
    (kMaxPayloadBytes - (64 << 10)) / kMaxModelStatusWireBytes;
static_assert(kMaxListedModels <= kMaxModels);
inline constexpr size_t kMaxVerifierDepth = 16;
inline constexpr size_t kMaxCounters = 1024;  // named counters in one HealthReply

}  // namespace companion::protocol
