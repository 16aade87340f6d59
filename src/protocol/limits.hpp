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
inline constexpr size_t kMaxTensors = 200'000;
inline constexpr size_t kMaxSegments = kMaxFdsPerFrame;
inline constexpr size_t kMaxRank = 16;
inline constexpr size_t kMaxNameBytes = 4096;
inline constexpr size_t kMaxStringBytes = 8192;
inline constexpr size_t kMaxModels = 100'000;
inline constexpr size_t kMaxVerifierDepth = 16;
inline constexpr size_t kMaxCounters = 1024;  // named counters in one HealthReply

}  // namespace companion::protocol
