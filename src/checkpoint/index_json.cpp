#include "checkpoint/index_json.hpp"

#include <set>

#include <nlohmann/json.hpp>

#include "checkpoint/strict_json.hpp"

namespace companion::checkpoint {
namespace {

Error bad(std::string message) {
  return make_error(StatusCode::kBadCheckpoint, std::move(message));
}

// A weight_map value must name a file in the index's own directory.
bool is_plain_file_name(std::string_view name) {
  return !name.empty() && name != "." && name != ".." && name.find('/') == std::string::npos &&
         name.find('\0') == std::string::npos;
}

}  // namespace

Result<IndexMap> parse_index_json(std::string_view text, const std::string& origin) {
  COMPANION_ASSIGN_OR_RETURN(nlohmann::json index, parse_json_strict(text, origin));
  if (!index.is_object()) return bad(origin + ": \"weight_map\" object missing");
  auto map = index.find("weight_map");
  if (map == index.end() || !map->is_object())
    return bad(origin + ": \"weight_map\" object missing");

  IndexMap out;
  std::set<std::string> files;
  for (const auto& [name, value] : map->items()) {
    if (name.empty()) return bad(origin + ": weight_map has an empty tensor name");
    if (!value.is_string())
      return bad(origin + ": weight_map entry for '" + name + "' must be a file name string");
    const auto& file_name = value.get_ref<const std::string&>();
    if (!is_plain_file_name(file_name))
      return bad(origin + ": weight_map maps '" + name + "' to \"" + file_name +
                 "\", which is not a plain file name in the same directory");
    files.insert(file_name);
    out.weight_map.emplace(name, file_name);
  }
  if (files.empty()) return bad(origin + ": weight_map is empty");
  out.files.assign(files.begin(), files.end());
  return out;
}

}  // namespace companion::checkpoint
