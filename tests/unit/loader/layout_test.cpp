// plan_layout: aligned offsets, no tensor across a segment, segments rounded to the granularity.
#include <algorithm>
#include <cstdint>
#include <random>
#include <tuple>
#include <vector>

#include <gtest/gtest.h>

#include "loader/layout.hpp"

namespace companion::loader {
namespace {

constexpr uint64_t kPage = 4096;

// Checks every invariant of a layout against its input.
void check_layout(const std::vector<uint64_t>& sizes, const SlabLayout& layout, uint64_t alignment,
                  uint64_t granularity, uint64_t max_segment) {
  ASSERT_EQ(layout.placements.size(), sizes.size());
  ASSERT_FALSE(layout.segment_sizes.empty());
  for (uint64_t s : layout.segment_sizes) {
    EXPECT_GT(s, 0u);
    EXPECT_EQ(s % granularity, 0u) << s;
    EXPECT_LE(s, max_segment) << s;
  }
  uint32_t last_segment = 0;
  uint64_t last_end = 0;
  for (size_t i = 0; i < sizes.size(); ++i) {
    const Placement& p = layout.placements[i];
    ASSERT_LT(p.segment, layout.segment_sizes.size()) << "tensor " << i;
    EXPECT_EQ(p.offset % alignment, 0u) << "tensor " << i;
    EXPECT_LE(p.offset + sizes[i], layout.segment_sizes[p.segment]) << "tensor " << i;
    // In input order, never going back; no overlap with the previous tensor.
    EXPECT_GE(p.segment, last_segment) << "tensor " << i;
    if (p.segment == last_segment) {
      EXPECT_GE(p.offset, last_end) << "tensor " << i;
    }
    last_segment = p.segment;
    last_end = p.offset + sizes[i];
  }
  EXPECT_EQ(last_segment + 1u, layout.segment_sizes.size()) << "a trailing segment holds nothing";
}

TEST(PlanLayout, OffsetsAlignedAndPacked) {
  std::vector<uint64_t> sizes = {1, 255, 256, 257, 4096, 3, 0, 12345, 2, 1 << 20};
  auto layout = plan_layout(sizes, kTensorAlignment, kPage, 1ull << 30);
  ASSERT_TRUE(layout.ok()) << layout.error().to_string();
  check_layout(sizes, *layout, kTensorAlignment, kPage, 1ull << 30);
  ASSERT_EQ(layout->segment_sizes.size(), 1u);
  // Packed: each tensor at the first aligned offset after the previous one.
  uint64_t expected = 0;
  for (size_t i = 0; i < sizes.size(); ++i) {
    expected = (expected + kTensorAlignment - 1) / kTensorAlignment * kTensorAlignment;
    EXPECT_EQ(layout->placements[i].offset, expected) << "tensor " << i;
    expected += sizes[i];
  }
  EXPECT_EQ(layout->segment_sizes[0], (expected + kPage - 1) / kPage * kPage);
}

TEST(PlanLayout, RandomSizesKeepInvariants) {
  std::mt19937_64 rng(42);
  for (int round = 0; round < 200; ++round) {
    uint64_t granularity = (round % 3 == 0) ? 4096 : (round % 3 == 1 ? 65536 : 2u << 20);
    uint64_t max_segment = granularity * (1 + rng() % 8);
    std::vector<uint64_t> sizes(rng() % 40);
    for (auto& s : sizes) {
      switch (rng() % 4) {
        case 0:
          s = 0;
          break;
        case 1:
          s = rng() % 300;
          break;
        case 2:
          s = rng() % (granularity + 1);
          break;
        default:
          s = rng() % (max_segment + 1);
          break;
      }
    }
    auto layout = plan_layout(sizes, kTensorAlignment, granularity, max_segment);
    ASSERT_TRUE(layout.ok()) << layout.error().to_string();
    check_layout(sizes, *layout, kTensorAlignment, granularity, max_segment);
  }
}

TEST(PlanLayout, SplitsIntoSeveralSegmentsWhenMaxIsSmall) {
  // Each tensor takes 3000 bytes (3072 aligned); two pages hold two of them.
  std::vector<uint64_t> sizes(7, 3000);
  auto layout = plan_layout(sizes, kTensorAlignment, kPage, 2 * kPage);
  ASSERT_TRUE(layout.ok()) << layout.error().to_string();
  check_layout(sizes, *layout, kTensorAlignment, kPage, 2 * kPage);
  ASSERT_EQ(layout->segment_sizes.size(), 4u);
  for (size_t i = 0; i < sizes.size(); ++i) {
    EXPECT_EQ(layout->placements[i].segment, i / 2) << i;
    EXPECT_EQ(layout->placements[i].offset, (i % 2) * 3072) << i;
  }
  EXPECT_EQ(layout->segment_sizes[0], 2 * kPage);
  EXPECT_EQ(layout->segment_sizes[3], kPage);  // the last one holds one 3000-byte tensor
}

TEST(PlanLayout, TensorExactlyMaxFitsOneSegment) {
  std::vector<uint64_t> sizes = {1, 2 * kPage, 1};
  auto layout = plan_layout(sizes, kTensorAlignment, kPage, 2 * kPage);
  ASSERT_TRUE(layout.ok()) << layout.error().to_string();
  check_layout(sizes, *layout, kTensorAlignment, kPage, 2 * kPage);
  ASSERT_EQ(layout->segment_sizes.size(), 3u);
  EXPECT_EQ(layout->placements[1].segment, 1u);
  EXPECT_EQ(layout->placements[1].offset, 0u);
  EXPECT_EQ(layout->segment_sizes[1], 2 * kPage);
}

TEST(PlanLayout, TensorBiggerThanMaxIsInvalidArgument) {
  std::vector<uint64_t> sizes = {10, 2 * kPage + 1};
  auto layout = plan_layout(sizes, kTensorAlignment, kPage, 2 * kPage);
  ASSERT_FALSE(layout.ok());
  EXPECT_EQ(layout.error().code, StatusCode::kInvalidArgument);
  EXPECT_NE(layout.error().message.find("tensor 1"), std::string::npos) << layout.error().message;
}

TEST(PlanLayout, BadParametersAreInvalidArgument) {
  std::vector<uint64_t> sizes = {1};
  for (auto [alignment, granularity, max] :
       {std::tuple<uint64_t, uint64_t, uint64_t>{0, kPage, kPage},
        {256, 0, kPage},
        {256, kPage, kPage - 1}}) {
    auto layout = plan_layout(sizes, alignment, granularity, max);
    ASSERT_FALSE(layout.ok());
    EXPECT_EQ(layout.error().code, StatusCode::kInvalidArgument);
  }
}

TEST(PlanLayout, ZeroSizeTensors) {
  std::vector<uint64_t> sizes = {0, 0, 5, 0, 0};
  auto layout = plan_layout(sizes, kTensorAlignment, kPage, 1ull << 20);
  ASSERT_TRUE(layout.ok()) << layout.error().to_string();
  check_layout(sizes, *layout, kTensorAlignment, kPage, 1ull << 20);
  ASSERT_EQ(layout->segment_sizes.size(), 1u);
  EXPECT_EQ(layout->segment_sizes[0], kPage);
  EXPECT_EQ(layout->placements[0].offset, 0u);
  EXPECT_EQ(layout->placements[2].offset, 0u);
  EXPECT_EQ(layout->placements[3].offset, 256u);

  std::vector<uint64_t> only_empty = {0, 0, 0};
  auto empty_layout = plan_layout(only_empty, kTensorAlignment, kPage, 1ull << 20);
  ASSERT_TRUE(empty_layout.ok());
  check_layout(only_empty, *empty_layout, kTensorAlignment, kPage, 1ull << 20);
  ASSERT_EQ(empty_layout->segment_sizes.size(), 1u);
  EXPECT_EQ(empty_layout->segment_sizes[0], kPage);
}

TEST(PlanLayout, EmptyModelGetsOneSegment) {
  std::vector<uint64_t> sizes;
  auto layout = plan_layout(sizes, kTensorAlignment, kPage, 1ull << 20);
  ASSERT_TRUE(layout.ok()) << layout.error().to_string();
  EXPECT_TRUE(layout->placements.empty());
  ASSERT_EQ(layout->segment_sizes.size(), 1u);
  EXPECT_EQ(layout->segment_sizes[0], kPage);
}

TEST(PlanLayout, SegmentsNeverExceedMaxThatIsNotAMultipleOfTheGranularity) {
  // Rounding a segment up to the granularity must not take it past the largest segment.
  const uint64_t max = kPage + kPage / 2;
  std::vector<uint64_t> sizes = {1000, 1000, 1000, 1000, 1000};
  auto layout = plan_layout(sizes, kTensorAlignment, kPage, max);
  ASSERT_TRUE(layout.ok()) << layout.error().to_string();
  check_layout(sizes, *layout, kTensorAlignment, kPage, max);
  for (uint64_t s : layout->segment_sizes) EXPECT_LE(s, max);
  // A tensor that fits the max but not any whole number of granules within it cannot be placed.
  std::vector<uint64_t> big = {kPage + 1};
  auto refused = plan_layout(big, kTensorAlignment, kPage, max);
  ASSERT_FALSE(refused.ok());
  EXPECT_EQ(refused.error().code, StatusCode::kInvalidArgument);
}

TEST(PlanLayout, ExactlyFullSegmentIsNotPadded) {
  std::vector<uint64_t> sizes = {kPage, kPage};
  auto layout = plan_layout(sizes, kTensorAlignment, kPage, kPage);
  ASSERT_TRUE(layout.ok()) << layout.error().to_string();
  check_layout(sizes, *layout, kTensorAlignment, kPage, kPage);
  ASSERT_EQ(layout->segment_sizes.size(), 2u);
  EXPECT_EQ(layout->segment_sizes[0], kPage);
  EXPECT_EQ(layout->segment_sizes[1], kPage);
}

}  // namespace
}  // namespace companion::loader
