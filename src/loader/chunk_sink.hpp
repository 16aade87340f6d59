// Where the loader puts checkpoint bytes, chunk by chunk: straight into host slabs, or through
// pinned staging buffers and asynchronous copies into GPU slabs.
#pragma once

#include <cstdint>
#include <memory>

#include "companion/result.hpp"
#include "memory/backend.hpp"

namespace companion::loader {

// Largest chunk a sink hands out at once.
inline constexpr uint64_t kSinkChunkBytes = 32ull << 20;

class ChunkSink {
 public:
  virtual ~ChunkSink() = default;
  // Host memory for `bytes` (≤ kSinkChunkBytes) bytes destined for (segment, offset). The caller
  // fills it, then calls commit(); one chunk at a time.
  virtual Result<void*> acquire(size_t segment, uint64_t offset, uint64_t bytes) = 0;
  virtual Result<void> commit() = 0;
  // Waits for everything in flight; the slab then holds every committed byte.
  virtual Result<void> finish() = 0;
};

// The best sink for the slab: direct writes for host memory, staged async copies for CUDA slabs,
// synchronous Slab::write() otherwise.
Result<std::unique_ptr<ChunkSink>> make_chunk_sink(memory::Slab& slab);

}  // namespace companion::loader
