// How to make every tensor of a table as views of a few base tensors, in runs: tensors of one
// segment, dtype, shape and strides whose offsets step evenly become one strided view with a
// leading dimension (a consumer splits it: torch's unbind makes each view in C++). The plan is
// the part of building a state dict that is not the consumer's own API: computed here so that a
// Python caller does no work per tensor.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

namespace companion::capi {

// The fields of a table record the plan reads.
struct PlanRecord {
  uint64_t offset = 0;  // bytes from the start of its segment
  uint64_t nbytes = 0;
  uint32_t segment = 0;
  int32_t dtype = 0;                 // companion_dtype; an unknown code is left out
  std::span<const int64_t> shape;    // ndim sizes
  std::span<const int64_t> strides;  // ndim strides, in elements
};

struct ViewRun {
  uint64_t step = 0;   // bytes from one tensor of the run to the next (0: they share bytes)
  uint32_t first = 0;  // index into ViewPlan::rows of the run's first tensor
  uint32_t count = 0;  // tensors in the run, >= 1
};

struct ViewPlan {
  // Table rows, run by run, each run's by offset; then the rows left out (no bytes, a size of
  // 0 in the shape, an unknown dtype), in table order.
  std::vector<uint32_t> rows;
  size_t planned = 0;  // rows[0, planned) are in runs
  std::vector<ViewRun> runs;
  // Per segment: where its last planned tensor ends (bytes from the segment's start).
  std::vector<uint64_t> segment_ends;
};

// Records with a segment at or past `segments` are left out. A run's tensors share segment,
// dtype, offset modulo the item size, shape and strides, and step by one amount; a group whose
// sorted offsets interleave up to 8 progressions of one step each (q_proj and o_proj of every
// layer) gives one run per progression, else the longest evenly stepping runs in offset order.
// `hash` groups records before they are compared (tests pass a poor one: records hashed alike
// that are not alike must still be told apart).
using GroupHash = uint64_t (*)(const PlanRecord&);
uint64_t group_hash(const PlanRecord& record);
ViewPlan plan_views(std::span<const PlanRecord> records, size_t segments,
                    GroupHash hash = group_hash);

}  // namespace companion::capi
