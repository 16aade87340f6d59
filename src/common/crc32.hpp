// CRC-32 (IEEE 802.3, as zlib's crc32): checksums of tensor bytes that any tool can reproduce.
#pragma once

#include <cstddef>
#include <cstdint>

namespace companion {

uint32_t crc32(const void* data, size_t size, uint32_t crc = 0) noexcept;

}  // namespace companion
