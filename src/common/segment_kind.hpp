// How a segment of a slab travels to a client: a vocabulary shared by the wire protocol and the
// memory backends, so that the protocol library does not depend on the backends.
#pragma once

#include <cstddef>
#include <cstdint>

namespace companion::memory {

// Numbering is part of the wire protocol.
enum class SegmentKind : uint8_t {
  kHostMemfd = 0,      // sealed memfd, mapped read-only with mmap
  kCudaVmmFd = 1,      // cuMemExportToShareableHandle POSIX fd, imported with cuMemImport...
  kCudaIpcHandle = 2,  // 64-byte cuIpcGetMemHandle handle, opened with cuIpcOpenMemHandle
};

inline constexpr size_t kIpcHandleBytes = 64;

}  // namespace companion::memory
