// checkpoint::parse_safetensors_header: the input's first 8 bytes give the data section's size
// (as a file's length would), the rest is the header's JSON. What it accepts must describe
// tensors that lie inside the data section, do not overlap, have the size their shape says, and
// whose strides fit in int64.
#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string_view>

#include "checkpoint/checkpoint.hpp"
#include "fuzz_check.hpp"

namespace {

using namespace companion;

using fuzz::check;

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 8) return 0;
  uint64_t data_bytes = 0;
  std::memcpy(&data_bytes, data, 8);
  // Mostly small sections, so that data_offsets written by the mutator can fall either side;
  // the top bit keeps the full range (huge files) reachable.
  if ((data_bytes >> 63) == 0) data_bytes %= 1u << 20;
  std::string_view header(reinterpret_cast<const char*>(data) + 8, size - 8);
  auto file = checkpoint::parse_safetensors_header(header, data_bytes);
  if (!file.ok()) {
    check(file.error().code == StatusCode::kBadCheckpoint ||
          file.error().code == StatusCode::kUnknownDtype);
    return 0;
  }
  check(file->data_start == 8 + header.size());
  check(file->file_size == file->data_start + data_bytes);
  uint64_t previous_begin = 0, covered_end = 0;
  for (const auto& t : file->tensors) {
    check(!t.name.empty() && t.name.size() <= checkpoint::kMaxTensorNameBytes);
    check(t.shape.size() <= checkpoint::kMaxRank);
    check(t.file_offset >= file->data_start);
    uint64_t begin = t.file_offset - file->data_start;
    check(begin <= data_bytes && t.nbytes <= data_bytes - begin);
    check(begin >= previous_begin);  // data order
    previous_begin = begin;
    if (t.nbytes > 0) {
      check(begin >= covered_end);  // no overlap
      covered_end = begin + t.nbytes;
    }
    // A zero dimension makes the tensor empty whatever the others are.
    uint64_t elements = std::count(t.shape.begin(), t.shape.end(), 0) > 0 ? 0 : 1;
    for (int64_t d : t.shape) check(d >= 0);
    for (int64_t d : t.shape) {
      if (elements == 0) break;
      check(elements <= std::numeric_limits<uint64_t>::max() / static_cast<uint64_t>(d));
      elements *= static_cast<uint64_t>(d);
    }
    check(elements * dtype_size(t.dtype) == t.nbytes);
    // The server describes tensors with int64 row-major strides, empty ones too.
    int64_t stride = 1;
    for (size_t d = t.shape.size(); d-- > 0;)
      check(!__builtin_mul_overflow(stride, t.shape[d], &stride));
  }
  return 0;
}
