// What a server reads back from its keeper or from systemd's file-descriptor store: the keeper's
// messages (keeper::decode), catalog entries (keeper::decode_catalog) and the descriptors' names
// (keeper::parse_stored_name). The first byte picks the decoder, the rest is its input. What
// decodes must encode again, and that encoding must decode and re-encode to the same bytes; a
// name that parses is exactly the name stored_name writes for it.
#include <cstdint>
#include <string_view>
#include <vector>

#include "fuzz_check.hpp"
#include "keeper/fd_store_names.hpp"
#include "keeper/keeper_protocol.hpp"

namespace {

using namespace companion::keeper;
using companion::StatusCode;
using companion::fuzz::check;

void message(const std::vector<uint8_t>& bytes) {
  auto decoded = decode(bytes);
  if (!decoded.ok()) {
    check(decoded.error().code == StatusCode::kProtocolError);
    return;
  }
  auto once = encode(*decoded);
  check(once.ok());
  auto again = decode(*once);
  check(again.ok());
  check(again->index() == decoded->index());
  check(encode(*again).value() == *once);
}

void catalog(const std::vector<uint8_t>& bytes) {
  auto decoded = decode_catalog(bytes);
  if (!decoded.ok()) {
    check(decoded.error().code == StatusCode::kProtocolError);
    return;
  }
  check(!decoded->segment_sizes.empty() &&
        decoded->digests.size() == decoded->segment_sizes.size());
  std::vector<uint8_t> once = encode_catalog(*decoded);
  auto again = decode_catalog(once);
  check(again.ok());
  check(again->store_key == decoded->store_key && again->number == decoded->number &&
        again->digests == decoded->digests && again->segment_sizes == decoded->segment_sizes &&
        again->fingerprint == decoded->fingerprint && again->table_bytes == decoded->table_bytes);
  check(encode_catalog(*again) == once);
}

void name(std::string_view text) {
  auto parsed = parse_stored_name(text);
  if (parsed) check(stored_name(*parsed) == text);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  std::vector<uint8_t> rest(data + 1, data + size);
  switch (data[0] % 3) {
    case 0:
      message(rest);
      break;
    case 1:
      catalog(rest);
      break;
    default:
      name(std::string_view(reinterpret_cast<const char*>(data + 1), size - 1));
      break;
  }
  return 0;
}
