#include "loader/layout.hpp"

#include <string>

#include "common/util.hpp"

namespace companion::loader {

Result<SlabLayout> plan_layout(std::span<const uint64_t> tensor_bytes, uint64_t alignment,
                               uint64_t granularity, uint64_t max_segment_bytes) {
  if (alignment == 0 || granularity == 0 || max_segment_bytes < granularity)
    return make_error(StatusCode::kInvalidArgument, "bad layout parameters");
  // Segments are rounded up to whole granules: the largest one that can be allocated is the max
  // rounded down, or rounding could take a full segment past the max.
  max_segment_bytes -= max_segment_bytes % granularity;
  SlabLayout layout;
  layout.placements.reserve(tensor_bytes.size());
  uint64_t used = 0;  // bytes used in the current segment
  uint32_t segment = 0;
  for (size_t i = 0; i < tensor_bytes.size(); ++i) {
    uint64_t size = tensor_bytes[i];
    if (size > max_segment_bytes)
      return make_error(StatusCode::kInvalidArgument, "tensor " + std::to_string(i) + " (" +
                                                          format_bytes(size) +
                                                          ") exceeds the largest segment (" +
                                                          format_bytes(max_segment_bytes) + ")");
    uint64_t offset = align_up(used, alignment);
    if (offset + size > max_segment_bytes) {
      layout.segment_sizes.push_back(align_up(used, granularity));
      ++segment;
      offset = 0;
    }
    layout.placements.push_back(Placement{segment, offset});
    used = offset + size;
  }
  // A model of only empty tensors still gets one (minimal) segment so that it can be mapped.
  layout.segment_sizes.push_back(align_up(used == 0 ? 1 : used, granularity));
  return layout;
}

}  // namespace companion::loader
