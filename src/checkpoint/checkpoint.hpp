// Safetensors checkpoints: reading and validating headers, single files and sharded layouts.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <string_view>
#include <vector>

#include "companion/result.hpp"
#include "companion/types.hpp"

namespace companion::checkpoint {

// The reference implementation's cap on the JSON header.
inline constexpr uint64_t kMaxHeaderBytes = 100ull << 20;
inline constexpr size_t kMaxRank = 16;
inline constexpr size_t kMaxTensorNameBytes = 4096;

struct TensorEntry {
  std::string name;
  DType dtype = DType::kU8;
  std::vector<int64_t> shape;
  uint32_t file_index = 0;   // index into Checkpoint::files (0 for a single file)
  uint64_t file_offset = 0;  // absolute byte offset in that file (8 + header length + begin)
  uint64_t nbytes = 0;
};

struct SafetensorsFile {
  std::string path;
  uint64_t file_size = 0;
  uint64_t data_start = 0;                      // 8 + header length
  std::map<std::string, std::string> metadata;  // "__metadata__"
  std::vector<TensorEntry> tensors;             // in data-offset order
};

// Validates a header's JSON against a data section of data_bytes bytes. Pure: no I/O.
// Every failure is kBadCheckpoint, except an unknown dtype string: kUnknownDtype.
Result<SafetensorsFile> parse_safetensors_header(std::string_view header_json, uint64_t data_bytes);
// Opens a .safetensors file and validates its header (length cap, JSON shape, dtypes, sizes,
// ranges inside the file and not overlapping).
Result<SafetensorsFile> read_safetensors_file(const std::string& path);

struct Checkpoint {
  std::string location;              // the directory or file it was opened from
  std::vector<std::string> files;    // absolute paths of the .safetensors files
  std::vector<TensorEntry> tensors;  // all tensors of all files, names unique
  uint64_t total_bytes = 0;
};

// Opens a checkpoint at `path`: a .safetensors file, or a directory holding either
// model.safetensors.index.json (sharded; weight_map names files in the same directory) or
// .safetensors files. Every file's real path must lie under one of `allowed_roots`
// (already canonical) or the result is kNotPermitted. A path that does not exist is kNotFound.
Result<Checkpoint> open_checkpoint(const std::string& path,
                                   const std::vector<std::string>& allowed_roots);

}  // namespace companion::checkpoint
