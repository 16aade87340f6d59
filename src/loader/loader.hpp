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

// One contiguous run of source bytes and where it lands, relative to the tensor's place in the
// slab. A whole tensor is one extent; a tensor-parallel shard of a row-split matrix is one extent
// per row.
struct ReadExtent {
  uint64_t file_offset = 0;  // absolute, in the tensor's file
  uint64_t bytes = 0;        // source bytes (whole elements)
  uint64_t dst_offset = 0;   // target bytes from the tensor's start in the slab (after casting)
};

struct TensorCopy {
  checkpoint::TensorEntry source;     // where the bytes are in the checkpoint
  DType target_dtype = DType::kU8;    // dtype in the slab (== source.dtype unless cast)
  std::vector<int64_t> target_shape;  // == source.shape unless sharded
  uint64_t target_bytes = 0;
  std::vector<ReadExtent> extents;  // what to read, in file order; covers target_bytes exactly
  Placement placement;
};

struct LoadPlan {
  std::vector<std::string> files;
  std::vector<TensorCopy> tensors;
  std::vector<uint64_t> segment_sizes;
  uint64_t bytes_to_read = 0;  // sum of extents' bytes; progress counts these
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
