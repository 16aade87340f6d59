// Where the loader's reader threads put checkpoint bytes: straight into host slabs, or into a
// bounded pool of staging buffers whose contents the sink copies into the slab (asynchronous
// copies on several streams for GPU slabs, Slab::write() otherwise). Thread-safe: every reader
// thread uses the same sink.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>

#include "companion/result.hpp"
#include "memory/backend.hpp"

namespace companion::loader {

// O_DIRECT needs buffers, file offsets and lengths aligned to the device's logical block size;
// 4096 covers every device in practice. Staging and bounce buffers are aligned to it and carry
// 2 × kDirectAlign bytes of slack, so that the aligned superset of any range fits.
inline constexpr uint64_t kDirectAlign = 4096;

// Copy `bytes` from the staging buffer (at `stage_offset` from the base passed to submit()) to
// `dst_offset` in `segment` of the slab.
struct CopyOp {
  uint64_t stage_offset = 0;
  uint64_t bytes = 0;
  uint32_t segment = 0;
  uint64_t dst_offset = 0;
};

struct SinkOptions {
  uint64_t buffer_bytes = 16ull << 20;  // usable bytes of one staging buffer (slack excluded)
  size_t max_buffers = 32;              // at least 1
  size_t streams = 4;                   // CUDA copy streams, at least 1
  // CUDA: staging from huge-page mappings pinned with cuMemHostRegister instead of
  // cuMemHostAlloc.
  bool registered_pinned = false;
  // CUDA: pinned buffers are kept (up to 256 MiB per GPU, process-wide) for the next load.
  bool keep_buffers = true;
  // Raised when the load stops (error, cancel): synchronous writes not yet made are skipped.
  const std::atomic<bool>* stop = nullptr;
};

struct SinkStats {
  const char* name = "";
  uint64_t buffer_bytes = 0;  // allocated size of one buffer (slack included)
  size_t max_buffers = 0;
  size_t buffers = 0;        // allocated (or reused)
  size_t reused = 0;         // of those, kept from an earlier load
  size_t peak_in_use = 0;    // most buffers acquired and not yet recycled at once
  double alloc_seconds = 0;  // spent allocating buffers
};

// One staging buffer: `capacity` bytes at `data`, aligned to kDirectAlign.
struct StagingBuffer {
  char* data = nullptr;
  uint64_t capacity = 0;
  bool reused = false;  // kept from an earlier load
  virtual ~StagingBuffer() = default;
};

class ChunkSink {
 public:
  virtual ~ChunkSink() = default;
  virtual const char* name() const noexcept = 0;
  // The host address of a segment that readers may fill directly, or nullptr: then bytes go
  // through acquire() and submit().
  virtual char* host_address(size_t segment) noexcept = 0;
  // Called once by each reader thread before it uses the sink (CUDA: makes the context current).
  virtual Result<void> prepare_thread() { return ok_result(); }
  // A free staging buffer, allocated if none is free and fewer than max_buffers exist; otherwise
  // waits for one to be recycled. nullptr (not an error) when `stop` was raised while waiting
  // (wake() interrupts the wait). An error when allocating the first buffer failed, or when an
  // asynchronous copy failed.
  virtual Result<StagingBuffer*> acquire(const std::atomic<bool>& stop) = 0;
  // Copies ops' bytes (relative to `base`, inside buffer) into the slab. The buffer goes back to
  // the pool once they are done (possibly later: asynchronous copies); the caller must not touch
  // it after this call, whatever the result.
  virtual Result<void> submit(StagingBuffer* buffer, const char* base,
                              std::span<const CopyOp> ops) = 0;
  // True when submit_pinned() copies page-locked host memory straight into the slab (CUDA).
  virtual bool copies_from_pinned_host() const noexcept { return false; }
  // Copies op.bytes at `src` (page-locked host memory, see Slab::pinned_host_bytes, that stays
  // valid until finish() returns) to op.dst_offset of op.segment, asynchronously; no staging
  // buffer is used. Only where copies_from_pinned_host().
  virtual Result<void> submit_pinned(const char* src, const CopyOp& op) {
    (void)src, (void)op;
    return make_error(StatusCode::kInternal, std::string(name()) + " copies through staging only");
  }
  // Gives back a buffer acquired but not submitted.
  virtual void release(StagingBuffer* buffer) = 0;
  // Wakes readers blocked in acquire() (the load is stopping).
  virtual void wake() = 0;
  // Waits for every submitted copy; the slab then holds every submitted byte. The first error
  // of any copy.
  virtual Result<void> finish() = 0;
  virtual SinkStats stats() const = 0;
};

// The best sink for the slab: direct writes when every segment has a host address, staged async
// copies for CUDA slabs, synchronous Slab::write() from bounded heap buffers otherwise. Nothing is
// allocated up front.
Result<std::unique_ptr<ChunkSink>> make_chunk_sink(memory::Slab& slab, const SinkOptions& options);

// The bytes allocated for a buffer of `usable` bytes: slack for aligning O_DIRECT reads on both
// sides, rounded up to kDirectAlign (staging and bounce buffers alike).
inline uint64_t staging_buffer_size(uint64_t usable) {
  uint64_t bytes = usable + 2 * kDirectAlign;
  return (bytes + kDirectAlign - 1) / kDirectAlign * kDirectAlign;
}

// GPU `ordinal`: pins the staging buffers a load with these options would allocate, and keeps
// them for it (as a finished load keeps its own), so that a process's first load does not pay for
// pinning. Returns how many were pinned (0 when buffers are not kept).
Result<size_t> pin_staging_ahead(int ordinal, const SinkOptions& options);

}  // namespace companion::loader
