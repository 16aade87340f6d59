// Shard-rule strings: the one parser (common/shard_rules) and ModelSpec::validate, which uses it,
// give the same verdict and the same message for every string of the shared table; the parsed
// values, the limits and the canonical spelling.
#include "common/shard_rules.hpp"

#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "companion/types.hpp"
#include "protocol/limits.hpp"
#include "support/shard_rule_strings.hpp"

namespace companion {
namespace {

using testing::kBadShardRules;
using testing::kGoodShardRules;

ModelSpec spec_with_rules(const std::string& rules) {
  ModelSpec spec;
  spec.source = "/m";
  spec.tp_size = 2;
  spec.shard_rules = rules;
  return spec;
}

TEST(ShardRules, GoodStringsParseValidateAndSpellBackToTheSameRules) {
  for (const auto& text : kGoodShardRules) {
    SCOPED_TRACE(text);
    auto rules = parse_shard_rules(text);
    ASSERT_TRUE(rules.ok()) << rules.error().to_string();
    auto valid = spec_with_rules(text).validate();
    EXPECT_TRUE(valid.ok()) << valid.error().to_string();
    auto again = parse_shard_rules(format_shard_rules(*rules));
    ASSERT_TRUE(again.ok()) << again.error().to_string();
    EXPECT_EQ(*again, *rules);
  }
}

TEST(ShardRules, BadStringsAreRefusedWithTheSameMessageByParserAndSpec) {
  for (const auto& bad : kBadShardRules) {
    SCOPED_TRACE(bad.text);
    auto rules = parse_shard_rules(bad.text);
    ASSERT_FALSE(rules.ok());
    EXPECT_EQ(rules.error().code, StatusCode::kInvalidArgument);
    EXPECT_EQ(rules.error().message, bad.message);
    auto valid = spec_with_rules(bad.text).validate();
    ASSERT_FALSE(valid.ok());
    EXPECT_EQ(valid.error().code, StatusCode::kInvalidArgument);
    EXPECT_EQ(valid.error().message, bad.message);
  }
}

TEST(ShardRules, ParsedValues) {
  using Kind = SplitRule::Kind;
  auto rules = parse_shard_rules(
      " a = Replicated ;; b=DIM15 ;weird=name=dim0;c=column-packed(1);"
      "x=column-packed(3);y=dim1-packed(1024);z=ROW-packed(2)");
  ASSERT_TRUE(rules.ok()) << rules.error().to_string();
  const std::vector<ShardRule> expected = {
      {"a", {Kind::kReplicated, 0, 1}},   {"b", {Kind::kDim, 15, 1}},
      {"weird=name", {Kind::kDim, 0, 1}}, {"c", {Kind::kColumn, 0, 1}},
      {"x", {Kind::kColumn, 0, 3}},       {"y", {Kind::kDim, 1, kMaxPackedParts}},
      {"z", {Kind::kRow, 0, 2}},
  };
  EXPECT_EQ(*rules, expected);
  EXPECT_EQ(format_shard_rules(*rules),
            "a=replicated;b=dim15;weird=name=dim0;c=column;x=column-packed(3);"
            "y=dim1-packed(1024);z=row-packed(2)");
  EXPECT_EQ(kMaxSplitDims, 16u);  // dim15 is the last, as the table's dim16 says
}

TEST(ShardRules, TheSpecAlsoBoundsTheLength) {
  // Only empty items: the parser takes any number of them, the spec not past its byte limit.
  std::string many(protocol::kMaxShardRulesBytes + 1, ';');
  EXPECT_TRUE(parse_shard_rules(many).ok());
  auto valid = spec_with_rules(many).validate();
  ASSERT_FALSE(valid.ok());
  EXPECT_EQ(valid.error().code, StatusCode::kInvalidArgument);
  EXPECT_TRUE(spec_with_rules(std::string(protocol::kMaxShardRulesBytes, ';')).validate().ok());
}

}  // namespace
}  // namespace companion
