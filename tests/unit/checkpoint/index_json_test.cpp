// The sharded index's validation, without files: what parse_index_json accepts and refuses.
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "checkpoint/index_json.hpp"
#include "test_support.hpp"

namespace companion::checkpoint {
namespace {

using testing::expect_error;

constexpr StatusCode kBad = StatusCode::kBadCheckpoint;
const std::string kOrigin = "/models/m/model.safetensors.index.json";

Result<IndexMap> parse(const std::string& text) {
  return parse_index_json(text, kOrigin);
}

std::string file_of(const IndexMap& index, const std::string& tensor) {
  const IndexMap::Entry* entry = index.find(tensor);
  return entry == nullptr ? "(none)" : index.files.at(entry->file);
}

TEST(IndexJson, MapsTensorsToFilesAndListsTheFilesSorted) {
  auto index = parse(R"({"metadata":{"total_size":96},"weight_map":{
      "b":"model-00002-of-00002.safetensors","a":"model-00001-of-00002.safetensors",
      "c":"model-00001-of-00002.safetensors"}})");
  ASSERT_TRUE(index.ok()) << index.error().to_string();
  EXPECT_EQ(index->files, (std::vector<std::string>{"model-00001-of-00002.safetensors",
                                                    "model-00002-of-00002.safetensors"}));
  ASSERT_EQ(index->entries.size(), 3u);
  EXPECT_EQ(file_of(*index, "a"), "model-00001-of-00002.safetensors");
  EXPECT_EQ(file_of(*index, "b"), "model-00002-of-00002.safetensors");
  EXPECT_EQ(file_of(*index, "c"), "model-00001-of-00002.safetensors");
  EXPECT_EQ(index->find("d"), nullptr);
  // The index's own order.
  EXPECT_EQ(index->entries[0].tensor, "b");
  EXPECT_EQ(index->entries[2].tensor, "c");
}

TEST(IndexJson, AcceptsNamesThatOnlyLookOdd) {
  auto index = parse(R"({"weight_map":{"x.y":"..shard","\u00e9":"a b.safetensors"}})");
  ASSERT_TRUE(index.ok()) << index.error().to_string();
  EXPECT_EQ(index->files, (std::vector<std::string>{"..shard", "a b.safetensors"}));
}

TEST(IndexJson, RefusesWhatIsNotAnIndex) {
  expect_error(parse(""), kBad, {kOrigin, "not valid JSON"});
  expect_error(parse("{"), kBad, {kOrigin, "not valid JSON"});
  expect_error(parse("[]"), kBad, {kOrigin, "\"weight_map\" object missing"});
  expect_error(parse("{}"), kBad, {"\"weight_map\" object missing"});
  expect_error(parse(R"({"weight_map":[]})"), kBad, {"\"weight_map\" object missing"});
  expect_error(parse(R"({"weight_map":"a.safetensors"})"), kBad, {"object missing"});
  expect_error(parse(R"({"weight_map":{}})"), kBad, {"weight_map is empty"});
}

TEST(IndexJson, RefusesRepeatedKeysAndDeepNesting) {
  expect_error(parse(R"({"weight_map":{"a":"x","a":"y"}})"), kBad, {"appears twice"});
  expect_error(parse(R"({"weight_map":{"a":"x"},"weight_map":{"b":"y"}})"), kBad,
               {"appears twice"});
  expect_error(parse(std::string(100, '[') + std::string(100, ']')), kBad, {"nested deeper"});
}

TEST(IndexJson, RefusesBadEntries) {
  expect_error(parse(R"({"weight_map":{"":"a.safetensors"}})"), kBad, {"empty tensor name"});
  expect_error(parse(R"({"weight_map":{"t":1}})"), kBad, {"'t' must be a file name string"});
  expect_error(parse(R"({"weight_map":{"t":null}})"), kBad, {"must be a file name string"});
  for (const char* file : {"", ".", "..", "../x.safetensors", "/etc/passwd", "sub/x.safetensors",
                           "x\\u0000.safetensors"}) {
    SCOPED_TRACE(file);
    expect_error(parse(std::string(R"({"weight_map":{"t":")") + file + "\"}}"), kBad,
                 {"not a plain file name"});
  }
}

// Streamed, yet refused for the same problem a document parse would find first: a syntax error
// or repeated key anywhere, else the first bad entry in name order.
TEST(IndexJson, ReportsTheProblemADocumentParseWould) {
  expect_error(parse(R"({"weight_map":{"b":1,"a":"x/y"}})"), kBad, {"'a'", "x/y"});
  expect_error(parse(R"({"weight_map":{"b":1,"":"f"}})"), kBad, {"empty tensor name"});
  expect_error(parse(R"({"weight_map":{"b":1},"x":)"), kBad, {"not valid JSON"});
  expect_error(parse(R"({"weight_map":{"b":1},"m":{"k":1,"k":2}})"), kBad, {"'k'", "twice"});
  expect_error(parse(R"({"m":[{"k":1,"k":2}]})"), kBad, {"'k'", "twice"});
  expect_error(parse(R"({"weight_map":{"b":"f"},"weight_map":5})"), kBad, {"twice"});
}

}  // namespace
}  // namespace companion::checkpoint
