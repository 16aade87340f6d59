// The names of kept descriptors in systemd's file-descriptor store: written names read back, and
// anything else (another program's descriptors, near misses) is not taken for a generation's.
#include <gtest/gtest.h>

#include "keeper/fd_store_names.hpp"
#include "protocol/limits.hpp"

namespace companion::keeper {
namespace {

using Part = StoredName::Part;

TEST(FdStoreNames, WrittenNamesReadBack) {
  for (const StoredName& name :
       {StoredName{1, Part::kSegment, 0}, StoredName{42, Part::kSegment, 7},
        StoredName{UINT64_MAX, Part::kTable, 0}, StoredName{3, Part::kCatalog, 0}}) {
    auto parsed = parse_stored_name(stored_name(name));
    ASSERT_TRUE(parsed.has_value()) << stored_name(name);
    EXPECT_EQ(*parsed, name);
  }
  EXPECT_EQ(stored_name({12, Part::kSegment, 3}), "companion.12.s3");
  EXPECT_EQ(stored_name({12, Part::kTable, 0}), "companion.12.table");
  EXPECT_EQ(stored_name({12, Part::kCatalog, 0}), "companion.12.catalog");
}

TEST(FdStoreNames, OtherNamesAreNotAGenerations) {
  for (const char* text :
       {"", "stored", "varlink", "companion", "companion.", "companion.1", "companion.1.",
        "companion..table", "companion.01.table", "companion.-1.table", "companion.1.tables",
        "companion.1.s", "companion.1.s01", "companion.1.s-1", "companion.1.S0",
        "companion.18446744073709551616.table", "companion.1.table.x", "Companion.1.table",
        "companion.1.s99999999999999999999"}) {
    EXPECT_FALSE(parse_stored_name(text).has_value()) << text;
  }
  // A segment index past what one generation can have.
  EXPECT_FALSE(parse_stored_name("companion.1.s" + std::to_string(protocol::kMaxSegments)));
  EXPECT_TRUE(parse_stored_name("companion.1.s" + std::to_string(protocol::kMaxSegments - 1)));
}

}  // namespace
}  // namespace companion::keeper
