// The view planner (src/capi/view_plan): which tensors share a run, in what order, and what is
// left out. Every tensor of a run must be reachable as base + first offset + k * step.
#include "capi/view_plan.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <deque>
#include <set>
#include <vector>

#include "companion/types.hpp"

namespace companion::capi {
namespace {

struct Table {
  std::deque<std::vector<int64_t>> dims;  // stable addresses for the spans
  std::vector<PlanRecord> records;

  void add(uint64_t offset, std::vector<int64_t> shape, DType dtype = DType::kBF16,
           uint32_t segment = 0, uint64_t nbytes = 0) {
    std::vector<int64_t> strides(shape.size());
    int64_t step = 1;
    for (size_t i = shape.size(); i-- > 0;) {
      strides[i] = step;
      step *= std::max<int64_t>(shape[i], 1);
    }
    auto& both = dims.emplace_back(shape);
    both.insert(both.end(), strides.begin(), strides.end());
    PlanRecord r;
    r.offset = offset;
    r.nbytes = nbytes != 0 ? nbytes : static_cast<uint64_t>(step) * dtype_size(dtype);
    r.segment = segment;
    r.dtype = static_cast<int32_t>(dtype);
    r.shape = {both.data(), shape.size()};
    r.strides = {both.data() + shape.size(), shape.size()};
    records.push_back(r);
  }
};

// Every planned row once, each run's rows alike and evenly spaced by its step.
void check_plan(const Table& t, const ViewPlan& plan, size_t segments = 1) {
  ASSERT_EQ(plan.rows.size(), t.records.size());
  std::set<uint32_t> seen(plan.rows.begin(), plan.rows.end());
  EXPECT_EQ(seen.size(), plan.rows.size());
  size_t covered = 0;
  for (const auto& run : plan.runs) {
    ASSERT_GE(run.count, 1u);
    ASSERT_LE(run.first + run.count, plan.planned);
    const auto& lead = t.records[plan.rows[run.first]];
    for (uint32_t k = 0; k < run.count; ++k) {
      const auto& r = t.records[plan.rows[run.first + k]];
      EXPECT_EQ(r.offset, lead.offset + k * run.step);
      EXPECT_EQ(r.segment, lead.segment);
      EXPECT_EQ(r.dtype, lead.dtype);
      EXPECT_TRUE(std::equal(r.shape.begin(), r.shape.end(), lead.shape.begin(), lead.shape.end()));
    }
    covered += run.count;
  }
  EXPECT_EQ(covered, plan.planned);
  ASSERT_EQ(plan.segment_ends.size(), segments);
}

TEST(ViewPlan, LlamaLayersInterleavedGiveOneRunPerProjection) {
  Table t;
  uint64_t at = 0;
  const int layers = 32;
  for (int l = 0; l < layers; ++l) {
    for (auto shape : {std::vector<int64_t>{64, 64},
                       {16, 64},
                       {16, 64},
                       {64, 64},
                       {224, 64},
                       {224, 64},
                       {64, 224},
                       {64},
                       {64}}) {
      t.add(at, shape);
      at += t.records.back().nbytes;
    }
  }
  auto plan = plan_views(t.records, 1);
  check_plan(t, plan);
  EXPECT_EQ(plan.planned, t.records.size());
  // q/o, k/v, gate/up, down, the two norms: six groups of two or one progressions each.
  EXPECT_EQ(plan.runs.size(), 9u);
  EXPECT_EQ(plan.segment_ends[0], at);
}

TEST(ViewPlan, LeavesOutEmptyUnknownAndOutOfRangeRows) {
  Table t;
  t.add(0, {4});
  t.add(8, {0});                   // no elements
  t.add(8, {4}, DType::kBF16, 3);  // a segment the table does not have
  t.add(16, {4});
  t.records.push_back(t.records[0]);  // copy of row 0 ...
  t.records.back().dtype = 99;        // ... with a dtype nobody knows
  auto plan = plan_views(t.records, 1);
  check_plan(t, plan);
  EXPECT_EQ(plan.planned, 2u);
  EXPECT_EQ(std::vector<uint32_t>(plan.rows.begin() + 2, plan.rows.end()),
            (std::vector<uint32_t>{1, 2, 4}));
}

TEST(ViewPlan, OffsetsSharedByTwoTensorsStepByZero) {
  Table t;
  t.add(0, {4});
  t.add(0, {4});
  t.add(8, {4});
  auto plan = plan_views(t.records, 1);
  check_plan(t, plan);
  EXPECT_EQ(plan.planned, 3u);
}

TEST(ViewPlan, OddOffsetsSplitByResidueAndSegmentsApart) {
  Table t;
  t.add(1, {2}, DType::kF32);
  t.add(9, {2}, DType::kF32);
  t.add(16, {2}, DType::kF32);
  t.add(24, {2}, DType::kF32);
  t.add(0, {2}, DType::kF32, 1);
  auto plan = plan_views(t.records, 2);
  check_plan(t, plan, 2);
  EXPECT_EQ(plan.runs.size(), 3u);
  EXPECT_EQ(plan.segment_ends[0], 32u);
  EXPECT_EQ(plan.segment_ends[1], 8u);
}

TEST(ViewPlan, GroupsHashedAlikeAreStillToldApart) {
  Table t;
  uint64_t at = 0;
  for (int l = 0; l < 10; ++l) {
    for (auto shape : {std::vector<int64_t>{8, 8}, {4, 8}, {8}}) {
      t.add(at, shape);
      at += t.records.back().nbytes;
    }
  }
  auto same = [](const PlanRecord&) -> uint64_t { return 7; };
  auto plan = plan_views(t.records, 1, same);
  check_plan(t, plan);
  EXPECT_EQ(plan.runs.size(), 3u);
}

}  // namespace
}  // namespace companion::capi
