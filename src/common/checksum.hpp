// Checksums of tensor bytes that any tool can reproduce.
#pragma once

#include <cstddef>
#include <cstdint>

namespace companion {

// CRC-32 (IEEE 802.3, as zlib's crc32).
uint32_t crc32(const void* data, size_t size, uint32_t crc = 0) noexcept;

// Sum over little-endian 32-bit words w[i] of w[i] * (2i + 1), mod 2^64, the last word padded
// with zero bytes. Order-independent, so a GPU computes it in parallel (memory/cuda_checksum.hpp);
// numpy reproduces it in one line.
uint64_t wsum64(const void* data, size_t size) noexcept;

}  // namespace companion
