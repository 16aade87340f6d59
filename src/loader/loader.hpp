// Copies a checkpoint's tensors into a slab, converting dtypes on the way.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "checkpoint/checkpoint.hpp"
#include "companion/result.hpp"
#include "loader/layout.hpp"
#include "memory/backend.hpp"

namespace companion::loader {

struct TensorCopy {
  checkpoint::TensorEntry source;   // where the bytes are in the checkpoint
  DType target_dtype = DType::kU8;  // dtype in the slab (== source.dtype unless cast)
  uint64_t target_bytes = 0;
  Placement placement;
};

struct LoadPlan {
  std::vector<std::string> files;
  std::vector<TensorCopy> tensors;
  std::vector<uint64_t> segment_sizes;
  uint64_t bytes_to_read = 0;  // progress counts these
};

// Builds the plan: casts floating tensors to `cast_to` when set (other dtypes stay as stored),
// lays tensors out for `backend`.
Result<LoadPlan> make_load_plan(const checkpoint::Checkpoint& checkpoint,
                                std::optional<DType> cast_to, const memory::Backend& backend);

// (bytes done, bytes total); called from the loading thread.
using ProgressFn = std::function<void(uint64_t, uint64_t)>;

// Reads every tensor into the slab. Stops with kCancelled soon after `cancel` becomes true.
// A file that changed under us (shorter than its header says) is kBadCheckpoint.
Result<void> load_into_slab(const LoadPlan& plan, memory::Slab& slab, const ProgressFn& progress,
                            const std::atomic<bool>& cancel);

}  // namespace companion::loader
