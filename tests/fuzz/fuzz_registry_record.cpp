// registry::record_from_json on any text. What it accepts is a valid record, and writing it back
// with record_to_json reads back as the same record.
#include <cstdint>
#include <cstdlib>
#include <string>

#include "fuzz_check.hpp"
#include "registry/registry.hpp"

namespace {

using namespace companion;

using fuzz::check;

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::string text(reinterpret_cast<const char*>(data), size);
  auto record = registry::record_from_json(text);
  if (!record.ok()) {
    check(record.error().code == StatusCode::kInvalidArgument);
    return 0;
  }
  check(registry::validate_record(*record).ok());
  std::string written = registry::record_to_json(*record);
  auto again = registry::record_from_json(written);
  check(again.ok());
  check(registry::record_to_json(*again) == written);
  return 0;
}
