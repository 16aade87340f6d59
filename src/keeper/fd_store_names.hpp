// The names a server gives its descriptors in systemd's file-descriptor store (FDNAME=): one
// name per descriptor, so that each can be told apart when systemd passes them back
// (LISTEN_FDNAMES) in whatever order it keeps them, and removed (FDSTOREREMOVE) by name.
//   companion.<id>.s<i>      segment i of generation id
//   companion.<id>.table     its tensor table's memfd
//   companion.<id>.catalog   a sealed memfd holding its catalog entry (encode_catalog)
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

namespace companion::keeper {

struct StoredName {
  enum class Part : uint8_t { kSegment, kTable, kCatalog };
  uint64_t id = 0;
  Part part = Part::kSegment;
  uint32_t index = 0;  // the segment's, for kSegment
  bool operator==(const StoredName&) const = default;
};

std::string stored_name(const StoredName& name);
// nullopt for a name that is not one stored_name() writes (another program's descriptor).
std::optional<StoredName> parse_stored_name(std::string_view name);

}  // namespace companion::keeper
