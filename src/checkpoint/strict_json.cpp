#include "checkpoint/strict_json.hpp"

#include <exception>

namespace companion::checkpoint {
namespace {

using json = nlohmann::json;

// parse_json_strict's validating pass: the guard alone. Building the value is left to a second,
// plain parse.
class StrictChecker {
 public:
  bool null() { return guard_.element(); }
  bool boolean(bool) { return guard_.element(); }
  bool number_integer(json::number_integer_t) { return guard_.element(); }
  bool number_unsigned(json::number_unsigned_t) { return guard_.element(); }
  bool number_float(json::number_float_t, const json::string_t&) { return guard_.element(); }
  bool string(json::string_t&) { return guard_.element(); }
  bool binary(json::binary_t&) { return guard_.element(); }
  bool start_object(size_t) { return open(true); }
  bool end_object() { return close(); }
  bool start_array(size_t) { return open(false); }
  bool end_array() { return close(); }
  bool key(json::string_t& key) {
    guard_.key(key);
    return !guard_.failed();
  }
  bool parse_error(size_t, const std::string&, const nlohmann::detail::exception& e) {
    guard_.syntax_error(e.what());
    return false;
  }

  StrictJsonGuard& guard() { return guard_; }

 private:
  bool open(bool is_object) {
    guard_.element();
    guard_.open(is_object);
    return !guard_.failed();
  }
  bool close() {
    guard_.close();
    return true;
  }

  StrictJsonGuard guard_;
};

}  // namespace

bool StrictJsonGuard::element() {
  if (scopes_.empty() || scopes_.back().elements == kObject) return true;
  array_too_long_ = ++scopes_.back().elements > max_array_elements_;
  return !array_too_long_;
}

void StrictJsonGuard::open(bool is_object, bool keys_checked_by_handler) {
  if (scopes_.size() >= kMaxJsonDepth && problem_.empty())
    problem_ = "nested deeper than " + std::to_string(kMaxJsonDepth) + " levels";
  scopes_.push_back(Scope{is_object ? kObject : 0, keys_checked_by_handler, nullptr});
}

void StrictJsonGuard::close() {
  if (!scopes_.empty()) scopes_.pop_back();
}

void StrictJsonGuard::key(const std::string& key) {
  if (failed() || scopes_.empty() || scopes_.back().own_keys) return;
  auto& keys = scopes_.back().keys;
  if (!keys) keys = std::make_unique<std::unordered_set<std::string>>();
  if (!keys->insert(key).second) repeated_key(key);
}

void StrictJsonGuard::repeated_key(const std::string& key) {
  if (problem_.empty()) problem_ = "key '" + key + "' appears twice in the same object";
}

void StrictJsonGuard::syntax_error(const std::string& what) {
  if (problem_.empty()) problem_ = what;
}

Result<nlohmann::json> parse_json_strict(std::string_view text, const std::string& what) {
  StrictChecker checker;
  try {
    bool ok = json::sax_parse(text.begin(), text.end(), &checker);
    if (!ok || checker.guard().failed()) {
      std::string problem =
          checker.guard().failed() ? checker.guard().problem() : std::string("invalid JSON");
      return make_error(StatusCode::kBadCheckpoint, what + " is not valid JSON: " + problem);
    }
    json value = json::parse(text.begin(), text.end());
    return value;
  } catch (const std::exception& e) {
    // sax_parse reports syntax errors through parse_error, but a few limits still throw.
    checker.guard().syntax_error(e.what());
    return make_error(StatusCode::kBadCheckpoint,
                      what + " is not valid JSON: " + checker.guard().problem());
  }
}

}  // namespace companion::checkpoint
