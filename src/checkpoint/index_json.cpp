#include "checkpoint/index_json.hpp"

#include <algorithm>
#include <exception>
#include <optional>
#include <unordered_map>
#include <utility>

#include <nlohmann/json.hpp>

#include "checkpoint/strict_json.hpp"

namespace companion::checkpoint {
namespace {

using json = nlohmann::json;

constexpr std::string_view kWeightMapKey = "weight_map";

Error bad(std::string message) {
  return make_error(StatusCode::kBadCheckpoint, std::move(message));
}

// A weight_map value must name a file in the index's own directory.
bool is_plain_file_name(std::string_view name) {
  return !name.empty() && name != "." && name != ".." && name.find('/') == std::string::npos &&
         name.find('\0') == std::string::npos;
}

// An index streamed (json::sax_parse) straight into its entries. Errors keep the precedence of
// the document-based validation it replaced (weight_map's entries counted first, then
// parse_json_strict, then the entries in name order), so a bad index gets the same error.
class IndexParser {
 public:
  IndexParser(const std::string& origin, size_t max_tensors)
      : origin_(origin), max_tensors_(max_tensors) {}

  bool null() { return value(nullptr); }
  bool boolean(bool) { return value(nullptr); }
  bool number_integer(json::number_integer_t) { return value(nullptr); }
  bool number_unsigned(json::number_unsigned_t) { return value(nullptr); }
  bool number_float(json::number_float_t, const json::string_t&) { return value(nullptr); }
  bool binary(json::binary_t&) { return value(nullptr); }
  bool string(json::string_t& text) { return value(&text); }

  bool start_object(size_t) { return open(true); }
  bool start_array(size_t) { return open(false); }
  bool end_object() { return close(); }
  bool end_array() { return close(); }

  bool key(json::string_t& key) {
    // Counted as a pass of its own would: the keys of the object under the top-level key
    // "weight_map" (of each, should there be two).
    if (guard_.depth() == 1) under_weight_map_ = key == kWeightMapKey;
    if (guard_.depth() == 2 && under_weight_map_ && ++counted_ > max_tensors_) {
      over_cap_ = true;
      return false;
    }
    guard_.key(key);
    if (guard_.failed()) return true;
    if (role() == Role::kWeightMap) {
      auto index = static_cast<uint32_t>(map_.entries.size());
      map_.entries.push_back(IndexMap::Entry{key, NameTable::kNone});
      auto name_of = [this](uint32_t i) -> std::string_view { return map_.entries[i].tensor; };
      if (map_.names.insert(key, index, name_of) != NameTable::kNone) guard_.repeated_key(key);
    }
    return true;
  }

  bool parse_error(size_t, const std::string&, const nlohmann::detail::exception& e) {
    guard_.syntax_error(e.what());
    return false;
  }
  void syntax_error(const std::string& what) { guard_.syntax_error(what); }

  Result<IndexMap> finish() {
    if (over_cap_)
      return make_error(StatusCode::kLimitExceeded, origin_ + ": weight_map has more than " +
                                                        std::to_string(max_tensors_) + " entries");
    if (guard_.failed()) return bad(origin_ + " is not valid JSON: " + guard_.problem());
    if (!weight_map_is_object_) return bad(origin_ + ": \"weight_map\" object missing");
    if (first_bad_) return std::move(first_bad_->second);
    if (map_.entries.empty()) return bad(origin_ + ": weight_map is empty");

    // Number the files in name order.
    std::vector<uint32_t> order(file_names_.size());
    for (uint32_t i = 0; i < order.size(); ++i) order[i] = i;
    std::sort(order.begin(), order.end(),
              [this](uint32_t a, uint32_t b) { return file_names_[a] < file_names_[b]; });
    std::vector<uint32_t> renumbered(order.size());
    map_.files.reserve(order.size());
    for (uint32_t i = 0; i < order.size(); ++i) {
      renumbered[order[i]] = i;
      map_.files.push_back(std::move(file_names_[order[i]]));
    }
    for (auto& entry : map_.entries) entry.file = renumbered[entry.file];
    return std::move(map_);
  }

 private:
  enum class Role : uint8_t { kNone, kTop, kWeightMap, kOther };

  Role role() const { return roles_.empty() ? Role::kNone : roles_.back(); }

  // A scalar; `text` when it is a string.
  bool value(const std::string* text) {
    if (!guard_.element()) return false;
    if (!guard_.failed() && role() == Role::kWeightMap) entry_value(text);
    return true;
  }

  bool open(bool is_object) {
    if (!guard_.element()) return false;
    Role next = Role::kOther;
    if (!guard_.failed()) {
      if (role() == Role::kNone && is_object) {
        next = Role::kTop;
      } else if (role() == Role::kTop && is_object && under_weight_map_) {
        weight_map_is_object_ = true;
        next = Role::kWeightMap;
      } else if (role() == Role::kWeightMap) {
        entry_value(nullptr);
      }
    }
    guard_.open(is_object, next == Role::kWeightMap);
    roles_.push_back(next);
    return true;
  }

  bool close() {
    if (!roles_.empty()) roles_.pop_back();
    guard_.close();
    return true;
  }

  // The value of weight_map's latest key: a file name string, or `file` is nullptr.
  void entry_value(const std::string* file) {
    IndexMap::Entry& entry = map_.entries.back();
    const std::string& name = entry.tensor;
    if (name.empty())
      return note_error(name, bad(origin_ + ": weight_map has an empty tensor name"));
    if (file == nullptr)
      return note_error(
          name, bad(origin_ + ": weight_map entry for '" + name + "' must be a file name string"));
    if (!is_plain_file_name(*file))
      return note_error(name, bad(origin_ + ": weight_map maps '" + name + "' to \"" + *file +
                                  "\", which is not a plain file name in the same directory"));
    // Neighbouring entries mostly name the same file.
    if (last_file_ == NameTable::kNone || file_names_[last_file_] != *file) {
      auto [it, added] = file_ids_.emplace(*file, static_cast<uint32_t>(file_names_.size()));
      if (added) file_names_.push_back(*file);
      last_file_ = it->second;
    }
    entry.file = last_file_;
  }

  // Of the wrong entries, the first in name order is reported (a document iterates so).
  void note_error(const std::string& name, Error error) {
    if (first_bad_ && first_bad_->first <= name) return;
    first_bad_.emplace(name, std::move(error));
  }

  const std::string& origin_;
  size_t max_tensors_;
  StrictJsonGuard guard_;
  std::vector<Role> roles_;        // one per open container, as the guard's scopes
  bool under_weight_map_ = false;  // the latest top-level key is "weight_map"
  size_t counted_ = 0;
  bool over_cap_ = false;
  bool weight_map_is_object_ = false;
  IndexMap map_;
  std::unordered_map<std::string, uint32_t> file_ids_;  // file name -> into file_names_
  std::vector<std::string> file_names_;                 // in the order first named
  uint32_t last_file_ = NameTable::kNone;
  std::optional<std::pair<std::string, Error>> first_bad_;  // (tensor name, its error)
};

}  // namespace

Result<IndexMap> parse_index_json(std::string_view text, const std::string& origin,
                                  size_t max_tensors) {
  IndexParser parser(origin, max_tensors);
  try {
    json::sax_parse(text.begin(), text.end(), &parser);
  } catch (const std::exception& e) {
    // sax_parse reports syntax errors through parse_error, but a few limits still throw.
    parser.syntax_error(e.what());
  }
  return parser.finish();
}

}  // namespace companion::checkpoint
