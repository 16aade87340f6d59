// JSON parsing for checkpoint headers and index files, stricter than nlohmann's default.
#pragma once

#include <string>
#include <string_view>

#include <nlohmann/json.hpp>

#include "companion/result.hpp"

namespace companion::checkpoint {

// Deeper nesting than this is refused: valid headers and index files nest three levels.
inline constexpr size_t kMaxJsonDepth = 64;

// Parses `text` as JSON, refusing objects with a repeated key (nlohmann would silently keep the
// last one, so two readers could disagree about a tensor) and absurd nesting. Every failure is
// kBadCheckpoint with `what` ("header", "index file x") in the message.
Result<nlohmann::json> parse_json_strict(std::string_view text, const std::string& what);

// True if the top-level object of `text` (or, when `within` is not empty, the object under its
// top-level key `within`) has more than `cap` keys, not counting a top-level key `except`.
// Lexes only as far as needed and builds nothing, so that an input of millions of entries is
// refused at a small cost. Syntax errors count as false: the full parse reports them.
bool has_more_entries_than(std::string_view text, size_t cap, std::string_view within,
                           std::string_view except);

// What has_more_entries_than counts, and whether any array has more than `max_array_elements`
// elements, in the same single pass (it stops at the first count past its cap): a safetensors
// header is measured once before it is parsed.
struct JsonCounts {
  bool too_many_entries = false;
  bool array_too_long = false;
};
JsonCounts measure_json(std::string_view text, size_t cap, std::string_view within,
                        std::string_view except, size_t max_array_elements);

}  // namespace companion::checkpoint
