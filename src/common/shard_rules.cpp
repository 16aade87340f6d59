#include "common/shard_rules.hpp"

#include <algorithm>
#include <cctype>
#include <optional>

namespace companion {
namespace {

Error invalid(const std::string& message) {
  return make_error(StatusCode::kInvalidArgument, message);
}

bool is_space(char c) {
  return c == ' ' || c == '\t' || c == '\n' || c == '\r';
}

std::string_view trim(std::string_view s) {
  while (!s.empty() && is_space(s.front())) s.remove_prefix(1);
  while (!s.empty() && is_space(s.back())) s.remove_suffix(1);
  return s;
}

std::string lower(std::string_view s) {
  std::string out(s);
  std::transform(out.begin(), out.end(), out.begin(),
                 [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  return out;
}

// A decimal number of at most `max_digits` digits, or nullopt. The digit bound keeps the value
// far from overflow, so the callers' range checks see the number as written.
std::optional<uint32_t> parse_number(std::string_view s, size_t max_digits) {
  if (s.empty() || s.size() > max_digits) return std::nullopt;
  uint32_t v = 0;
  for (char c : s) {
    if (c < '0' || c > '9') return std::nullopt;
    v = v * 10 + static_cast<uint32_t>(c - '0');
  }
  return v;
}

// `text` is already lower case.
std::optional<SplitRule> parse_split(std::string_view text) {
  SplitRule rule;
  if (text == "replicated") return rule;
  std::string_view base = text;
  constexpr std::string_view kPacked = "-packed(";
  if (size_t at = text.find(kPacked); at != std::string_view::npos) {
    std::string_view rest = text.substr(at + kPacked.size());
    if (rest.empty() || rest.back() != ')') return std::nullopt;
    auto n = parse_number(rest.substr(0, rest.size() - 1), 4);
    if (!n || *n == 0 || *n > kMaxPackedParts) return std::nullopt;
    rule.packed = *n;
    base = text.substr(0, at);
  }
  if (base == "column") {
    rule.kind = SplitRule::Kind::kColumn;
  } else if (base == "row") {
    rule.kind = SplitRule::Kind::kRow;
  } else if (base.substr(0, 3) == "dim") {
    auto dim = parse_number(base.substr(3), 2);
    if (!dim || *dim >= kMaxSplitDims) return std::nullopt;
    rule.kind = SplitRule::Kind::kDim;
    rule.dim = *dim;
  } else {
    return std::nullopt;
  }
  return rule;
}

}  // namespace

Result<std::vector<ShardRule>> parse_shard_rules(std::string_view text) {
  std::vector<ShardRule> rules;
  if (text.find('\0') != std::string_view::npos) return invalid("shard rules contain a NUL byte");
  size_t start = 0;
  while (start <= text.size()) {
    size_t end = text.find(';', start);
    if (end == std::string_view::npos) end = text.size();
    std::string_view item = trim(text.substr(start, end - start));
    start = end + 1;
    if (item.empty()) continue;
    size_t eq = item.rfind('=');
    if (eq == std::string_view::npos)
      return invalid("shard rule '" + std::string(item) + "': expected pattern=rule");
    std::string_view pattern = trim(item.substr(0, eq));
    std::string rule_text = lower(trim(item.substr(eq + 1)));
    if (pattern.empty())
      return invalid("shard rule '" + std::string(item) + "': the pattern is empty");
    auto split = parse_split(rule_text);
    if (!split)
      return invalid("shard rule '" + std::string(item) + "': unknown rule '" + rule_text +
                     "' (rules: replicated, column, row, dim<K>; the splits may end in "
                     "-packed(N), as in column-packed(3))");
    rules.push_back(ShardRule{std::string(pattern), *split});
  }
  return rules;
}

std::string format_split_rule(const SplitRule& rule) {
  std::string out;
  switch (rule.kind) {
    case SplitRule::Kind::kReplicated:
      return "replicated";
    case SplitRule::Kind::kColumn:
      out = "column";
      break;
    case SplitRule::Kind::kRow:
      out = "row";
      break;
    case SplitRule::Kind::kDim:
      out = "dim" + std::to_string(rule.dim);
      break;
  }
  if (rule.packed != 1) out += "-packed(" + std::to_string(rule.packed) + ")";
  return out;
}

std::string format_shard_rules(const std::vector<ShardRule>& rules) {
  std::string out;
  for (const auto& r : rules) {
    if (!out.empty()) out += ";";
    out += r.pattern + "=" + format_split_rule(r.split);
  }
  return out;
}

}  // namespace companion
