#include "loader/loader.hpp"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <memory>

#include "checkpoint/dtype_convert.hpp"
#include "common/unique_fd.hpp"
#include "loader/load_engine.hpp"
#include "loader/shard_plan.hpp"

namespace companion::loader {
Result<LoadPlan> make_load_plan(const checkpoint::Checkpoint& ckpt, std::optional<DType> cast_to,
                                const memory::Backend& backend, const ShardOptions& shard) {
  if (shard.tp_size == 0 || shard.tp_rank >= shard.tp_size)
    return make_error(StatusCode::kInvalidArgument, "tp_rank " + std::to_string(shard.tp_rank) +
                                                        " is not below tp_size " +
                                                        std::to_string(shard.tp_size));
  std::optional<ShardPlanner> planner;
  if (shard.tp_size > 1) {
    COMPANION_ASSIGN_OR_RETURN(planner, ShardPlanner::create(shard, ckpt.tensors));
  }
  LoadPlan plan;
  plan.files = ckpt.files;
  plan.file_fds = ckpt.fds;
  plan.tensors.reserve(ckpt.tensors.size());
  std::vector<uint64_t> sizes;
  sizes.reserve(ckpt.tensors.size());
  for (const auto& t : ckpt.tensors) {
    TensorCopy copy;
    copy.source = t;
    copy.target_dtype = t.dtype;
    if (cast_to && dtype_is_float_convertible(t.dtype)) copy.target_dtype = *cast_to;
    if (planner) {
      COMPANION_ASSIGN_OR_RETURN(
          TensorShard part, shard_tensor(t, planner->rule_for(t.name), shard.tp_size, shard.tp_rank,
                                         copy.target_dtype));
      copy.target_shape = std::move(part.shape);
      copy.target_bytes = part.target_bytes;
      copy.extents = std::move(part.extents);
      plan.bytes_to_read += part.source_bytes;
    } else {
      copy.target_shape = t.shape;
      copy.target_bytes = t.nbytes / dtype_size(t.dtype) * dtype_size(copy.target_dtype);
      if (t.nbytes > 0) copy.extents.push_back(ReadExtent{t.file_offset, t.nbytes, 0});
      plan.bytes_to_read += t.nbytes;
    }
    sizes.push_back(copy.target_bytes);
    plan.tensors.push_back(std::move(copy));
  }
  COMPANION_ASSIGN_OR_RETURN(
      SlabLayout layout,
      plan_layout(sizes, kTensorAlignment, backend.granularity(), backend.max_segment_bytes()));
  for (size_t i = 0; i < plan.tensors.size(); ++i) plan.tensors[i].placement = layout.placements[i];
  plan.segment_sizes = std::move(layout.segment_sizes);
  return plan;
}

Result<void> load_into_slab(const LoadPlan& plan, memory::Slab& slab, const ProgressFn& progress,
                            const std::atomic<bool>& cancel, const LoadOptions& options) {
  return engine::run(plan, slab, progress, cancel, options);
}

Result<void> load_into_slab(const LoadPlan& plan, memory::Slab& slab, const ProgressFn& progress,
                            const std::atomic<bool>& cancel) {
  return load_into_slab(plan, slab, progress, cancel, LoadOptions{});
}

}  // namespace companion::loader
