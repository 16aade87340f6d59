// parse_shard_rules on any text. ModelSpec::validate accepts what it accepts, exactly so for
// UTF-8 text within the spec's length limit (the client checks the spec, the server parses the
// rules), the rules it returns are within the limits the loader relies on, and
// format_shard_rules writes what parses back to the same rules.
#include <cstdint>
#include <cstdlib>
#include <string>
#include <string_view>

#include "checkpoint/checkpoint.hpp"
#include "common/shard_rules.hpp"
#include "common/util.hpp"
#include "companion/types.hpp"
#include "fuzz_check.hpp"
#include "protocol/limits.hpp"

namespace {

using namespace companion;

using fuzz::check;

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::string_view text(reinterpret_cast<const char*>(data), size);
  auto rules = parse_shard_rules(text);
  if (!rules.ok()) check(rules.error().code == StatusCode::kInvalidArgument);
  ModelSpec spec;
  spec.source = "model";
  spec.shard_rules = std::string(text);
  // The spec also bounds the rules' length and wants UTF-8 (what the server's keys need), so it
  // may refuse what the parser takes, never the other way round.
  bool spec_ok = spec.validate().ok();
  if (text.size() <= protocol::kMaxShardRulesBytes && is_valid_utf8(text))
    check(spec_ok == rules.ok());
  else if (spec_ok)
    check(rules.ok());
  if (!rules.ok()) return 0;
  for (const auto& rule : *rules) {
    check(!rule.pattern.empty());
    check(rule.split.packed >= 1 && rule.split.packed <= kMaxPackedParts);
    check(rule.split.dim < checkpoint::kMaxRank);
  }
  std::string written = format_shard_rules(*rules);
  auto again = parse_shard_rules(written);
  check(again.ok());
  check(*again == *rules);
  return 0;
}
