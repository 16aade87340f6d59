// wsum64 (common/checksum.hpp) of host memory, fast enough for segments of many GB: the same
// value as companion::wsum64, computed with additions only (vectorizable) and, for large buffers,
// on several threads.
#pragma once

#include <cstddef>
#include <cstdint>

namespace companion::memory {

// wsum64(data, size), bit for bit. threads == 0: chosen from the size and the machine.
uint64_t host_wsum64(const void* data, size_t size, unsigned threads = 0) noexcept;

}  // namespace companion::memory
