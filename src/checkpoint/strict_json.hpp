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

}  // namespace companion::checkpoint
