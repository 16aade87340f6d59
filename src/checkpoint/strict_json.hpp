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

// True if any array in `text` has more than `cap` elements, found the same way (lexing only,
// stopping at the first one): a safetensors header whose one shape lists millions of numbers is
// refused before a document of them is built.
bool has_array_longer_than(std::string_view text, size_t cap);

}  // namespace companion::checkpoint
