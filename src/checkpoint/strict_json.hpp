// JSON parsing for checkpoint headers and index files, stricter than nlohmann's default.
#pragma once

#include <cstddef>
#include <memory>
#include <string>
#include <string_view>
#include <unordered_set>
#include <vector>

#include <nlohmann/json.hpp>

#include "companion/result.hpp"

namespace companion::checkpoint {

// Deeper nesting than this is refused: valid headers and index files nest three levels.
inline constexpr size_t kMaxJsonDepth = 64;

// Parses `text` as JSON, refusing objects with a repeated key (nlohmann would silently keep the
// last one, so two readers could disagree about a tensor) and absurd nesting. Every failure is
// kBadCheckpoint with `what` ("config.json") in the message.
Result<nlohmann::json> parse_json_strict(std::string_view text, const std::string& what);

// The checks of parse_json_strict, and a cap on array lengths, for parsers that stream a document
// (nlohmann::json::sax_parse) into their own records instead of building it. Their SAX handler
// calls the guard from each event. A problem (repeated key, nesting, syntax) is recorded, not
// fatal: the parse may go on counting, so that a cap met later in the text still wins (it is
// checked as if counted in a pass of its own first), but what the handler builds no longer counts.
class StrictJsonGuard {
 public:
  explicit StrictJsonGuard(size_t max_array_elements = static_cast<size_t>(-1))
      : max_array_elements_(max_array_elements) {}

  // A value starts (a scalar, or a container before open()): it counts as an element of the
  // array it is in. False once an array has more than max_array_elements: stop parsing.
  bool element();
  // A container starts. An object whose keys the handler checks for repeats itself (one it
  // indexes anyway: a header's tensors) passes `keys_checked_by_handler` and costs no key set.
  void open(bool is_object, bool keys_checked_by_handler = false);
  void close();
  // A key of the innermost object.
  void key(const std::string& key);
  // The handler found `key` twice in an object it checks itself.
  void repeated_key(const std::string& key);
  // nlohmann's parse_error event, or an exception from sax_parse: the parse stops here.
  void syntax_error(const std::string& what);

  bool array_too_long() const { return array_too_long_; }
  // The first problem in text order ("" while there is none), as parse_json_strict reports it.
  const std::string& problem() const { return problem_; }
  bool failed() const { return !problem_.empty(); }
  // Containers open around the current event.
  size_t depth() const { return scopes_.size(); }

 private:
  static constexpr size_t kObject = static_cast<size_t>(-1);
  struct Scope {
    size_t elements;  // of an array so far; kObject for an object
    bool own_keys;
    std::unique_ptr<std::unordered_set<std::string>> keys;  // made at the first key
  };

  size_t max_array_elements_;
  bool array_too_long_ = false;
  std::vector<Scope> scopes_;
  std::string problem_;
};

}  // namespace companion::checkpoint
