// Reading and validating safetensors headers: 8-byte little-endian length, JSON, data section.
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <limits>
#include <string>

#include <nlohmann/json.hpp>

#include "checkpoint/checkpoint.hpp"
#include "checkpoint/strict_json.hpp"
#include "common/unique_fd.hpp"
#include "common/util.hpp"

namespace companion::checkpoint {
namespace {

using json = nlohmann::json;

constexpr uint64_t kLengthPrefixBytes = 8;

Error bad(std::string message) {
  return make_error(StatusCode::kBadCheckpoint, std::move(message));
}

std::string quoted(const std::string& name) {
  return "tensor '" + name + "'";
}

// Only the exact safetensors spellings: aliases such as "bf16" are not part of the format.
Result<DType> parse_header_dtype(const std::string& tensor, const json& value) {
  if (!value.is_string()) return bad(quoted(tensor) + ": \"dtype\" must be a string");
  const auto& text = value.get_ref<const std::string&>();
  for (int i = 0; i < kDTypeCount; ++i) {
    auto dtype = static_cast<DType>(i);
    if (text == dtype_name(dtype)) return dtype;
  }
  return make_error(StatusCode::kUnknownDtype, quoted(tensor) + ": unknown dtype \"" + text + "\"");
}

Result<uint64_t> parse_unsigned(const std::string& tensor, const char* field, const json& value) {
  if (!value.is_number_unsigned())
    return bad(quoted(tensor) + ": \"" + field + "\" entries must be non-negative integers, got " +
               value.dump());
  return value.get<uint64_t>();
}

struct ParsedRange {
  uint64_t begin = 0;
  uint64_t end = 0;
};

Result<TensorEntry> parse_tensor(const std::string& name, const json& value, uint64_t data_bytes,
                                 ParsedRange& range) {
  if (name.empty()) return bad("a tensor has an empty name");
  if (name.size() > kMaxTensorNameBytes)
    return bad("tensor name '" + name.substr(0, 64) + "...' is " + std::to_string(name.size()) +
               " bytes, over the limit of " + std::to_string(kMaxTensorNameBytes));
  if (!value.is_object()) return bad(quoted(name) + ": entry must be an object");
  for (const auto& [field, unused] : value.items()) {
    if (field != "dtype" && field != "shape" && field != "data_offsets")
      return bad(quoted(name) + ": unexpected field \"" + field + "\"");
  }
  for (const char* field : {"dtype", "shape", "data_offsets"}) {
    if (!value.contains(field)) return bad(quoted(name) + ": missing field \"" + field + "\"");
  }

  TensorEntry entry;
  entry.name = name;
  COMPANION_ASSIGN_OR_RETURN(entry.dtype, parse_header_dtype(name, value["dtype"]));

  const json& shape = value["shape"];
  if (!shape.is_array()) return bad(quoted(name) + ": \"shape\" must be an array");
  if (shape.size() > kMaxRank)
    return bad(quoted(name) + ": rank " + std::to_string(shape.size()) + " is over the limit of " +
               std::to_string(kMaxRank));
  bool has_zero_dim = false;
  // Even an empty tensor is described by int64 strides, products of its other dimensions.
  uint64_t nonzero_elements = 1;
  for (const json& dim_value : shape) {
    COMPANION_ASSIGN_OR_RETURN(uint64_t dim, parse_unsigned(name, "shape", dim_value));
    if (dim > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()))
      return bad(quoted(name) + ": dimension " + std::to_string(dim) + " is too large");
    has_zero_dim = has_zero_dim || dim == 0;
    if (dim != 0) {
      if (nonzero_elements > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()) / dim)
        return bad(quoted(name) + ": shape " + shape.dump() + " overflows 64-bit element counts");
      nonzero_elements *= dim;
    }
    entry.shape.push_back(static_cast<int64_t>(dim));
  }

  const json& offsets = value["data_offsets"];
  if (!offsets.is_array() || offsets.size() != 2)
    return bad(quoted(name) + ": \"data_offsets\" must be an array [begin, end]");
  COMPANION_ASSIGN_OR_RETURN(range.begin, parse_unsigned(name, "data_offsets", offsets[0]));
  COMPANION_ASSIGN_OR_RETURN(range.end, parse_unsigned(name, "data_offsets", offsets[1]));
  if (range.begin > range.end)
    return bad(quoted(name) + ": data_offsets begin " + std::to_string(range.begin) +
               " is after end " + std::to_string(range.end));

  // Sizes come from untrusted input: every multiplication is checked before it can wrap.
  uint64_t nbytes = 0;
  if (!has_zero_dim) {
    nbytes = dtype_size(entry.dtype);
    for (int64_t dim : entry.shape) {
      auto d = static_cast<uint64_t>(dim);
      if (nbytes > std::numeric_limits<uint64_t>::max() / d)
        return bad(quoted(name) + ": shape " + shape.dump() + " overflows 64-bit byte counts");
      nbytes *= d;
    }
  }
  if (nbytes != range.end - range.begin)
    return bad(quoted(name) + ": shape " + shape.dump() + " of " + dtype_name(entry.dtype) +
               " needs " + std::to_string(nbytes) + " bytes but data_offsets [" +
               std::to_string(range.begin) + ", " + std::to_string(range.end) + "] span " +
               std::to_string(range.end - range.begin));
  if (range.end > data_bytes)
    return bad(quoted(name) + ": data_offsets end " + std::to_string(range.end) +
               " is past the end of the data section (" + std::to_string(data_bytes) + " bytes)");
  entry.nbytes = nbytes;
  return entry;
}

Result<std::map<std::string, std::string>> parse_metadata(const json& value) {
  if (!value.is_object()) return bad("\"__metadata__\" must be an object of strings");
  std::map<std::string, std::string> metadata;
  for (const auto& [key, item] : value.items()) {
    if (!item.is_string())
      return bad("\"__metadata__\" value for \"" + key + "\" must be a string, got " + item.dump());
    metadata.emplace(key, item.get<std::string>());
  }
  return metadata;
}

// Reads exactly `size` bytes at `offset`, retrying short reads.
Result<void> pread_exact(int fd, void* buf, size_t size, uint64_t offset, const std::string& path) {
  auto* out = static_cast<char*>(buf);
  size_t done = 0;
  while (done < size) {
    ssize_t n = ::pread(fd, out + done, size - done, static_cast<off_t>(offset + done));
    if (n < 0) {
      if (errno == EINTR) continue;
      return errno_error(StatusCode::kIoError, "read " + path, errno);
    }
    if (n == 0) return bad(path + ": file ended while reading its header (was it truncated?)");
    done += static_cast<size_t>(n);
  }
  return ok_result();
}

}  // namespace

Result<SafetensorsFile> parse_safetensors_header(std::string_view header_json,
                                                 uint64_t data_bytes) {
  COMPANION_ASSIGN_OR_RETURN(json header, parse_json_strict(header_json, "header"));
  if (!header.is_object())
    return bad("header must be a JSON object, got " + std::string(header.type_name()));

  SafetensorsFile file;
  file.data_start = kLengthPrefixBytes + header_json.size();
  file.file_size = file.data_start + data_bytes;

  std::vector<std::pair<ParsedRange, TensorEntry>> parsed;
  parsed.reserve(header.size());
  for (const auto& [name, value] : header.items()) {
    if (name == "__metadata__") {
      COMPANION_ASSIGN_OR_RETURN(file.metadata, parse_metadata(value));
      continue;
    }
    ParsedRange range;
    COMPANION_ASSIGN_OR_RETURN(TensorEntry entry, parse_tensor(name, value, data_bytes, range));
    entry.file_offset = file.data_start + range.begin;
    parsed.emplace_back(range, std::move(entry));
  }

  // Data order, ties (zero-size tensors) by name so the result does not depend on JSON order.
  std::sort(parsed.begin(), parsed.end(), [](const auto& a, const auto& b) {
    if (a.first.begin != b.first.begin) return a.first.begin < b.first.begin;
    if (a.first.end != b.first.end) return a.first.end < b.first.end;
    return a.second.name < b.second.name;
  });
  // In begin order, any overlap shows up between neighbours (a range overlapping an earlier one
  // also overlaps the one right before it). Empty ranges hold no bytes, so they overlap nothing.
  const std::pair<ParsedRange, TensorEntry>* previous = nullptr;
  for (const auto& item : parsed) {
    if (item.first.begin == item.first.end) continue;
    if (previous && item.first.begin < previous->first.end) {
      const auto& [prev_range, prev] = *previous;
      return bad(quoted(prev.name) + " [" + std::to_string(prev_range.begin) + ", " +
                 std::to_string(prev_range.end) + ") and " + quoted(item.second.name) + " [" +
                 std::to_string(item.first.begin) + ", " + std::to_string(item.first.end) +
                 ") overlap");
    }
    previous = &item;
  }

  file.tensors.reserve(parsed.size());
  for (auto& item : parsed) file.tensors.push_back(std::move(item.second));
  return file;
}

Result<SafetensorsFile> read_safetensors_header(const OpenedFile& opened,
                                                const CheckpointLimits& limits,
                                                size_t max_tensors) {
  const std::string& path = opened.path;
  const UniqueFd& fd = opened.fd;
  if (!S_ISREG(opened.st.st_mode)) {
    count_refusal(Refusal::kNotRegular);
    return bad(path + ": not a regular file");
  }
  auto file_size = static_cast<uint64_t>(opened.st.st_size);
  if (file_size < kLengthPrefixBytes)
    return bad(path + ": file is " + std::to_string(file_size) +
               " bytes, too short for the 8-byte header length");

  unsigned char prefix[kLengthPrefixBytes];
  COMPANION_TRY(pread_exact(fd.get(), prefix, sizeof(prefix), 0, path));
  uint64_t header_bytes = 0;
  for (int i = 7; i >= 0; --i) header_bytes = (header_bytes << 8) | prefix[i];
  if (header_bytes > kMaxHeaderBytes)
    return bad(path + ": header length " + std::to_string(header_bytes) + " is over the limit of " +
               std::to_string(kMaxHeaderBytes) + " bytes");
  if (header_bytes > limits.max_header_bytes) {
    count_refusal(Refusal::kHeaderBytes);
    return make_error(StatusCode::kLimitExceeded,
                      path + ": header length " + std::to_string(header_bytes) +
                          " is over this server's limit of " +
                          std::to_string(limits.max_header_bytes) + " bytes (--max-header-bytes)");
  }
  if (header_bytes > file_size - kLengthPrefixBytes)
    return bad(path + ": header length " + std::to_string(header_bytes) +
               " runs past the end of the " + std::to_string(file_size) +
               "-byte file (truncated?)");

  std::string header(static_cast<size_t>(header_bytes), '\0');
  COMPANION_TRY(pread_exact(fd.get(), header.data(), header.size(), kLengthPrefixBytes, path));
  // Counted without building anything, stopping past the limit: a header of millions of tiny
  // entries is refused after reading a fraction of it, before the strict parse and its document.
  // Every array of a header is a shape (at most kMaxRank numbers) or a pair of data offsets.
  JsonCounts counts = measure_json(header, max_tensors, "", "__metadata__", kMaxRank);
  if (counts.too_many_entries) {
    count_refusal(Refusal::kTensors);
    return make_error(StatusCode::kLimitExceeded,
                      path + ": more tensors than this server's limit of " +
                          std::to_string(limits.max_tensors) +
                          " for one checkpoint (--max-tensors)");
  }
  if (counts.array_too_long)
    return bad(path + ": an array in the header has more than " + std::to_string(kMaxRank) +
               " elements (a shape's rank is at most " + std::to_string(kMaxRank) + ")");
  auto parsed = parse_safetensors_header(header, file_size - kLengthPrefixBytes - header_bytes);
  if (!parsed.ok()) {
    Error error = std::move(parsed).error();
    error.message = path + ": " + error.message;
    return error;
  }
  SafetensorsFile file = std::move(parsed).value();
  file.path = path;
  return file;
}

Result<SafetensorsFile> read_safetensors_file(const std::string& path) {
  OpenedFile opened;
  opened.path = path;
  opened.fd.reset(::open(path.c_str(), O_RDONLY | O_NONBLOCK | O_CLOEXEC | O_NOCTTY));
  if (!opened.fd) {
    int err = errno;
    return errno_error(err == ENOENT ? StatusCode::kNotFound : StatusCode::kIoError, "open " + path,
                       err);
  }
  if (::fstat(opened.fd.get(), &opened.st) != 0)
    return errno_error(StatusCode::kIoError, "stat " + path, errno);
  CheckpointLimits limits;
  return read_safetensors_header(opened, limits, limits.max_tensors);
}

}  // namespace companion::checkpoint
