// The index of a sharded checkpoint (model.safetensors.index.json): which file holds each tensor.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "checkpoint/name_table.hpp"
#include "companion/result.hpp"

namespace companion::checkpoint {

struct IndexMap {
  struct Entry {
    std::string tensor;
    uint32_t file = 0;  // into `files`
  };
  std::vector<Entry> entries;      // weight_map in the index's order, tensor names unique
  std::vector<std::string> files;  // the distinct file names, sorted (shard names sort in order)
  NameTable names;                 // of `entries`, by tensor

  // The entry of `tensor`, or nullptr.
  const Entry* find(std::string_view tensor) const {
    uint32_t i =
        names.find(tensor, [this](uint32_t e) -> std::string_view { return entries[e].tensor; });
    return i == NameTable::kNone ? nullptr : &entries[i];
  }
};

// Validates an index file's text. Pure: no I/O (whether the files exist is the caller's check).
// The text must be strict JSON (as parse_json_strict checks it) holding an object whose
// "weight_map" is a non-empty object of non-empty tensor names to plain file names (no '/', not
// "." or "..", no NUL) in the index's own directory. It is streamed into the map, without a
// document. Every failure is kBadCheckpoint, its message starting `origin`, except a weight_map of
// more than `max_tensors` entries: kLimitExceeded, found before the rest is read (and before any
// error after that point in the text).
Result<IndexMap> parse_index_json(std::string_view text, const std::string& origin,
                                  size_t max_tensors = static_cast<size_t>(-1));

}  // namespace companion::checkpoint
