// checkpoint::parse_index_json on any text. What it accepts maps non-empty tensor names, each once
// and each found by its name, to plain file names, and lists exactly those files, sorted and once
// each.
#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <set>
#include <string>
#include <string_view>

#include "checkpoint/index_json.hpp"
#include "fuzz_check.hpp"

namespace {

using namespace companion;

using fuzz::check;

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::string_view text(reinterpret_cast<const char*>(data), size);
  auto index = checkpoint::parse_index_json(text, "index");
  if (!index.ok()) {
    check(index.error().code == StatusCode::kBadCheckpoint);
    check(index.error().message.rfind("index", 0) == 0);
    return 0;
  }
  check(!index->entries.empty() && !index->files.empty());
  check(std::is_sorted(index->files.begin(), index->files.end()));
  check(std::adjacent_find(index->files.begin(), index->files.end()) == index->files.end());
  std::set<std::string> named;
  std::set<std::string_view> tensors;
  for (const auto& entry : index->entries) {
    check(!entry.tensor.empty());
    check(tensors.insert(entry.tensor).second);  // each tensor once
    check(index->find(entry.tensor) == &entry);
    check(entry.file < index->files.size());
    const std::string& file = index->files[entry.file];
    check(!file.empty() && file != "." && file != "..");
    check(file.find('/') == std::string::npos && file.find('\0') == std::string::npos);
    named.insert(file);
  }
  check(std::equal(named.begin(), named.end(), index->files.begin(), index->files.end()));
  return 0;
}
