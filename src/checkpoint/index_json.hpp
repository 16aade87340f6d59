// The index of a sharded checkpoint (model.safetensors.index.json): which file holds each tensor.
#pragma once

#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "companion/result.hpp"

namespace companion::checkpoint {

struct IndexMap {
  std::unordered_map<std::string, std::string> weight_map;  // tensor name -> file name
  std::vector<std::string> files;  // the distinct file names, sorted (shard names sort in order)
};

// Validates an index file's text. Pure: no I/O (whether the files exist is the caller's check).
// The text must be strict JSON (parse_json_strict) holding an object whose "weight_map" is a
// non-empty object of non-empty tensor names to plain file names (no '/', not "." or "..", no NUL)
// in the index's own directory. Every failure is kBadCheckpoint, its message starting `origin`.
Result<IndexMap> parse_index_json(std::string_view text, const std::string& origin);

}  // namespace companion::checkpoint
