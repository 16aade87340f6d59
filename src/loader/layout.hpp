// Placement of a model's tensors in a slab: every tensor at an aligned offset, none crossing a
// segment boundary, segments rounded to the backend's granularity.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "companion/result.hpp"

namespace companion::loader {

// Tensor offsets are multiples of this: enough for any vectorised load on CPU or GPU.
inline constexpr uint64_t kTensorAlignment = 256;

struct Placement {
  uint32_t segment = 0;
  uint64_t offset = 0;
};

struct SlabLayout {
  std::vector<uint64_t> segment_sizes;  // each a multiple of the granularity, at least one
  std::vector<Placement> placements;    // one per tensor, in input order
};

// Packs tensors in order, starting a new segment when the next one would pass max_segment_bytes.
// A single tensor larger than max_segment_bytes is kInvalidArgument.
Result<SlabLayout> plan_layout(std::span<const uint64_t> tensor_bytes, uint64_t alignment,
                               uint64_t granularity, uint64_t max_segment_bytes);

}  // namespace companion::loader
