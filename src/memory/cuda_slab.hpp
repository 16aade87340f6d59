// What the loader needs beyond Slab for the CUDA backends: the device pointer of a segment, to
// fill it with async copies from pinned staging buffers (cuda::Stream, cuda::PinnedHostBuffer).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include "companion/result.hpp"
#include "memory/backend.hpp"

namespace companion::memory {

// Base of the cuda-vmm and cuda-ipc slabs.
class CudaSlab : public Slab {
 public:
  // Local ordinal of the GPU the slab lives on.
  virtual int device_ordinal() const noexcept = 0;
  // The segment's device pointer in the server's primary context of that GPU (a read-write
  // mapping). 0 for an index out of range.
  virtual uint64_t device_pointer(size_t segment) const noexcept = 0;
};

// Device pointer of one segment of a cuda-vmm / cuda-ipc slab, valid in the primary context of
// cuda_slab_device_ordinal(). kInvalidArgument for a host slab or an index out of range. Writes
// through it must be finished (stream synchronized) before seal().
inline Result<uint64_t> cuda_segment_device_pointer(Slab& slab, size_t segment) {
  auto* cuda = dynamic_cast<CudaSlab*>(&slab);
  if (cuda == nullptr) {
    return make_error(StatusCode::kInvalidArgument, "not a CUDA slab: it has no device pointer");
  }
  if (segment >= cuda->segment_count()) {
    return make_error(StatusCode::kInvalidArgument,
                      "segment " + std::to_string(segment) + " out of range (" +
                          std::to_string(cuda->segment_count()) + " segments)");
  }
  return cuda->device_pointer(segment);
}

// Local ordinal of the GPU a CUDA slab lives on; kInvalidArgument for a host slab.
inline Result<int> cuda_slab_device_ordinal(const Slab& slab) {
  const auto* cuda = dynamic_cast<const CudaSlab*>(&slab);
  if (cuda == nullptr) return make_error(StatusCode::kInvalidArgument, "not a CUDA slab");
  return cuda->device_ordinal();
}

}  // namespace companion::memory
