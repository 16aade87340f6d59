// Tensor-parallel shard rules as written in ModelSpec::shard_rules: "pattern=rule;pattern=rule;..."
// One parser serves both the spec's validation (common) and the loader's shard plans, so the two
// cannot disagree on which strings are rules.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "companion/result.hpp"
#include "protocol/limits.hpp"

namespace companion {

// How one tensor is cut across the ranks.
struct SplitRule {
  enum class Kind : uint8_t {
    kReplicated,  // the whole tensor on every rank
    kColumn,      // dim 0: Linear weights [out, in] and their biases, embeddings, lm_head
    kRow,         // dim 1 of a Linear weight; a tensor of rank < 2 (its bias) is replicated
    kDim,         // exactly `dim`
  };
  Kind kind = Kind::kReplicated;
  uint32_t dim = 0;     // kDim only
  uint32_t packed = 1;  // equal parts along the split dimension, each split on its own

  friend bool operator==(const SplitRule&, const SplitRule&) = default;
};

struct ShardRule {
  std::string pattern;  // glob over tensor names: '*' any run of characters, '?' one character
  SplitRule split;

  friend bool operator==(const ShardRule&, const ShardRule&) = default;
};

inline constexpr uint32_t kMaxPackedParts = 1024;
// dim<K> names a dimension of a tensor the server can describe, so K < the largest rank (the
// checkpoint reader's limit is this same constant).
inline constexpr uint32_t kMaxSplitDims = static_cast<uint32_t>(protocol::kMaxRank);

// Parses "pattern=rule;pattern=rule;...". A rule is `replicated`, `column`, `row` or `dim<K>`
// (K < 16), in any case, and the three splits may end in `-packed(N)` (1 <= N <= 1024, as in
// `column-packed(3)`). Items are split at their last '='; whitespace around patterns and rules is
// ignored, and so are empty items. Errors are kInvalidArgument naming the item.
Result<std::vector<ShardRule>> parse_shard_rules(std::string_view text);
// The canonical spelling: parse_shard_rules(format_shard_rules(r)) == r.
std::string format_shard_rules(const std::vector<ShardRule>& rules);
std::string format_split_rule(const SplitRule& rule);

}  // namespace companion
