#include "keeper/fd_store_names.hpp"

#include <charconv>

#include "protocol/limits.hpp"

namespace companion::keeper {
namespace {

constexpr std::string_view kPrefix = "companion.";

// A decimal number as std::to_string writes it: digits only, no leading zero, no overflow.
std::optional<uint64_t> parse_decimal(std::string_view text) {
  if (text.empty() || (text.size() > 1 && text[0] == '0')) return std::nullopt;
  uint64_t value = 0;
  auto [end, error] = std::from_chars(text.data(), text.data() + text.size(), value);
  if (error != std::errc() || end != text.data() + text.size()) return std::nullopt;
  return value;
}

}  // namespace

std::string stored_name(const StoredName& name) {
  std::string out = std::string(kPrefix) + std::to_string(name.id) + ".";
  switch (name.part) {
    case StoredName::Part::kSegment:
      return out + "s" + std::to_string(name.index);
    case StoredName::Part::kTable:
      return out + "table";
    case StoredName::Part::kCatalog:
      return out + "catalog";
  }
  return out;
}

std::optional<StoredName> parse_stored_name(std::string_view text) {
  if (!text.starts_with(kPrefix)) return std::nullopt;
  text.remove_prefix(kPrefix.size());
  size_t dot = text.find('.');
  if (dot == std::string_view::npos) return std::nullopt;
  auto id = parse_decimal(text.substr(0, dot));
  if (!id) return std::nullopt;
  std::string_view part = text.substr(dot + 1);
  StoredName name;
  name.id = *id;
  if (part == "table") {
    name.part = StoredName::Part::kTable;
  } else if (part == "catalog") {
    name.part = StoredName::Part::kCatalog;
  } else if (part.starts_with("s")) {
    auto index = parse_decimal(part.substr(1));
    if (!index || *index >= protocol::kMaxSegments) return std::nullopt;
    name.part = StoredName::Part::kSegment;
    name.index = static_cast<uint32_t>(*index);
  } else {
    return std::nullopt;
  }
  return name;
}

}  // namespace companion::keeper
