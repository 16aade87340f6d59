#include "checkpoint/strict_json.hpp"

#include <exception>
#include <unordered_set>
#include <vector>

namespace companion::checkpoint {
namespace {

using json = nlohmann::json;

// A validating pass over the input: records the first repeated key, too-deep nesting or syntax
// error, and stops there. Building the value is left to a second, plain parse.
class StrictChecker {
 public:
  bool null() { return true; }
  bool boolean(bool) { return true; }
  bool number_integer(json::number_integer_t) { return true; }
  bool number_unsigned(json::number_unsigned_t) { return true; }
  bool number_float(json::number_float_t, const json::string_t&) { return true; }
  bool string(json::string_t&) { return true; }
  bool binary(json::binary_t&) { return true; }

  bool start_object(size_t) { return open(true); }
  bool end_object() { return close(); }
  bool start_array(size_t) { return open(false); }
  bool end_array() { return close(); }

  bool key(json::string_t& key) {
    if (scopes_.empty() || !scopes_.back().is_object) return true;
    if (!scopes_.back().keys.insert(key).second) {
      problem_ = "key '" + key + "' appears twice in the same object";
      return false;
    }
    return true;
  }

  bool parse_error(size_t, const std::string&, const nlohmann::detail::exception& e) {
    problem_ = e.what();
    return false;
  }

  const std::string& problem() const { return problem_; }

 private:
  struct Scope {
    bool is_object;
    std::unordered_set<std::string> keys;
  };

  bool open(bool is_object) {
    if (scopes_.size() >= kMaxJsonDepth) {
      problem_ = "nested deeper than " + std::to_string(kMaxJsonDepth) + " levels";
      return false;
    }
    scopes_.push_back(Scope{is_object, {}});
    return true;
  }
  bool close() {
    if (!scopes_.empty()) scopes_.pop_back();
    return true;
  }

  std::vector<Scope> scopes_;
  std::string problem_;
};

// One lexing pass (see measure_json): counts the keys of one object and the elements of every
// array, and stops at the first count past its cap.
class JsonMeasure {
 public:
  JsonMeasure(size_t cap, std::string_view within, std::string_view except, size_t max_array)
      : cap_(cap), max_array_(max_array), within_(within), except_(except) {}

  bool null() { return element(); }
  bool boolean(bool) { return element(); }
  bool number_integer(json::number_integer_t) { return element(); }
  bool number_unsigned(json::number_unsigned_t) { return element(); }
  bool number_float(json::number_float_t, const json::string_t&) { return element(); }
  bool string(json::string_t&) { return element(); }
  bool binary(json::binary_t&) { return element(); }
  bool start_object(size_t) { return open(kObject); }
  bool end_object() { return close(); }
  bool start_array(size_t) { return open(0); }
  bool end_array() { return close(); }

  bool key(json::string_t& key) {
    if (scopes_.size() == 1) top_key_ = key;
    if (!in_counted_) return true;
    if (scopes_.size() == 1 && key == except_) return true;
    counts_.too_many_entries = ++entries_ > cap_;
    return !counts_.too_many_entries;
  }
  bool parse_error(size_t, const std::string&, const nlohmann::detail::exception&) { return false; }

  const JsonCounts& counts() const { return counts_; }

 private:
  static constexpr size_t kObject = static_cast<size_t>(-1);

  // A value inside an array counts as one of its elements.
  bool element() {
    if (scopes_.empty() || scopes_.back() == kObject) return true;
    counts_.array_too_long = ++scopes_.back() > max_array_;
    return !counts_.array_too_long;
  }
  bool open(size_t scope) {
    if (!element()) return false;
    scopes_.push_back(scope);
    in_counted_ = counted_scope();
    return true;
  }
  bool close() {
    if (!scopes_.empty()) scopes_.pop_back();
    in_counted_ = counted_scope();
    return true;
  }
  // Arrays open scopes too but hold no keys, so only objects are ever counted in.
  bool counted_scope() const {
    return within_.empty() ? scopes_.size() == 1 : scopes_.size() == 2 && top_key_ == within_;
  }

  size_t cap_;
  size_t max_array_;
  std::string_view within_;
  std::string_view except_;
  size_t entries_ = 0;
  bool in_counted_ = false;
  std::string top_key_;
  std::vector<size_t> scopes_;  // elements so far of each open array; kObject for objects
  JsonCounts counts_;
};

}  // namespace

JsonCounts measure_json(std::string_view text, size_t cap, std::string_view within,
                        std::string_view except, size_t max_array_elements) {
  JsonMeasure measure(cap, within, except, max_array_elements);
  try {
    json::sax_parse(text.begin(), text.end(), &measure);
  } catch (const std::exception&) {
    // Limits of the parser itself: the full parse reports them.
  }
  return measure.counts();
}

bool has_more_entries_than(std::string_view text, size_t cap, std::string_view within,
                           std::string_view except) {
  return measure_json(text, cap, within, except, static_cast<size_t>(-1)).too_many_entries;
}

Result<nlohmann::json> parse_json_strict(std::string_view text, const std::string& what) {
  try {
    StrictChecker checker;
    bool ok = json::sax_parse(text.begin(), text.end(), &checker);
    if (!ok || !checker.problem().empty()) {
      std::string problem = checker.problem().empty() ? "invalid JSON" : checker.problem();
      return make_error(StatusCode::kBadCheckpoint, what + " is not valid JSON: " + problem);
    }
    json value = json::parse(text.begin(), text.end());
    return value;
  } catch (const std::exception& e) {
    // sax_parse reports syntax errors through parse_error, but a few limits still throw.
    return make_error(StatusCode::kBadCheckpoint, what + " is not valid JSON: " + e.what());
  }
}

}  // namespace companion::checkpoint
