// Malformed headers and files: each must fail with the exact code and name what is wrong.
#include <fcntl.h>
#include <unistd.h>

#include <string>

#include <gtest/gtest.h>

#include "checkpoint/checkpoint.hpp"
#include "test_support.hpp"

namespace companion::checkpoint {
namespace {

using testing::expect_error;
using testing::TempDir;

constexpr StatusCode kBad = StatusCode::kBadCheckpoint;

Result<SafetensorsFile> parse(const std::string& header, uint64_t data_bytes = 64) {
  return parse_safetensors_header(header, data_bytes);
}

std::string entry(const std::string& dtype, const std::string& shape, const std::string& offsets) {
  return R"({"dtype":")" + dtype + R"(","shape":)" + shape + R"(,"data_offsets":)" + offsets + "}";
}

TEST(SafetensorsHeader, AcceptsAValidHeaderAndOrdersByOffset) {
  // JSON order differs from data order; the zero-size tensor sits inside another's range.
  std::string header =
      R"({"late":)" + entry("F32", "[]", "[8,12]") + R"(,"__metadata__":{"format":"pt"},"first":)" +
      entry("BF16", "[2,2]", "[0,8]") + R"(,"empty":)" + entry("I64", "[3,0]", "[4,4]") + "}   ";
  auto file = parse(header, 12);
  ASSERT_TRUE(file.ok()) << file.error().to_string();
  EXPECT_EQ(file->data_start, 8 + header.size());
  EXPECT_EQ(file->metadata.at("format"), "pt");
  ASSERT_EQ(file->tensors.size(), 3u);
  EXPECT_EQ(file->tensors[0].name, "first");
  EXPECT_EQ(file->tensors[0].dtype, DType::kBF16);
  EXPECT_EQ(file->tensors[0].shape, (std::vector<int64_t>{2, 2}));
  EXPECT_EQ(file->tensors[0].file_offset, 8 + header.size());
  EXPECT_EQ(file->tensors[0].nbytes, 8u);
  EXPECT_EQ(file->tensors[1].name, "empty");
  EXPECT_EQ(file->tensors[1].nbytes, 0u);
  EXPECT_EQ(file->tensors[1].file_offset, 8 + header.size() + 4);
  EXPECT_EQ(file->tensors[2].name, "late");
  EXPECT_TRUE(file->tensors[2].shape.empty());
  EXPECT_EQ(file->tensors[2].file_offset, 8 + header.size() + 8);
}

TEST(SafetensorsHeader, AcceptsEveryDtypeSpelling) {
  for (int i = 0; i < kDTypeCount; ++i) {
    auto dtype = static_cast<DType>(i);
    std::string size = std::to_string(dtype_size(dtype));
    auto file = parse(R"({"t":)" + entry(dtype_name(dtype), "[1]", "[0," + size + "]") + "}");
    ASSERT_TRUE(file.ok()) << dtype_name(dtype) << ": " << file.error().to_string();
    EXPECT_EQ(file->tensors[0].dtype, dtype);
  }
  ASSERT_TRUE(parse("{}", 0).ok());
}

TEST(SafetensorsHeader, RejectsMalformedJson) {
  expect_error(parse(R"({"w": )"), kBad, {"not valid JSON"});
  expect_error(parse(""), kBad, {"not valid JSON"});
  expect_error(parse(R"({"w":1} x)"), kBad, {"not valid JSON"});
  expect_error(parse("[1,2]"), kBad, {"JSON object", "array"});
  expect_error(parse(R"("text")"), kBad, {"JSON object"});
  expect_error(parse("{\"w\xff\":1}"), kBad, {"not valid JSON"});  // invalid UTF-8
  expect_error(parse(std::string(1000, '[') + std::string(1000, ']')), kBad, {"nested"});
}

TEST(SafetensorsHeader, RejectsDuplicateKeys) {
  std::string w = entry("F32", "[1]", "[0,4]");
  expect_error(parse(R"({"w":)" + w + R"(,"w":)" + w + "}"), kBad, {"'w'", "twice"});
  expect_error(parse(R"({"w":{"dtype":"F32","dtype":"F32","shape":[1],"data_offsets":[0,4]}})"),
               kBad, {"'dtype'", "twice"});
  expect_error(parse(R"({"__metadata__":{"k":"a","k":"b"}})"), kBad, {"'k'", "twice"});
}

TEST(SafetensorsHeader, RejectsBadEntries) {
  expect_error(parse(R"({"w":5})"), kBad, {"'w'", "object"});
  expect_error(parse(R"({"w":{"dtype":"F32","shape":[1]}})"), kBad, {"'w'", "data_offsets"});
  expect_error(parse(R"({"w":{"shape":[1],"data_offsets":[0,4]}})"), kBad, {"'w'", "dtype"});
  expect_error(parse(R"({"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4],"extra":1}})"), kBad,
               {"'w'", "extra"});
  expect_error(parse(R"({"w":)" + entry("F32", "[1]", "[0,4]") + R"(,"":)" +
                     entry("F32", "[1]", "[4,8]") + "}"),
               kBad, {"empty name"});
  std::string long_name(kMaxTensorNameBytes + 1, 'n');
  expect_error(parse(R"({")" + long_name + R"(":)" + entry("F32", "[1]", "[0,4]") + "}"), kBad,
               {"nnnn", std::to_string(kMaxTensorNameBytes)});
}

TEST(SafetensorsHeader, RejectsBadDtypes) {
  constexpr StatusCode kUnknown = StatusCode::kUnknownDtype;
  expect_error(parse(R"({"w":)" + entry("F4", "[1]", "[0,1]") + "}"), kUnknown, {"'w'", "F4"});
  // Aliases that parse_dtype accepts are not part of the file format.
  expect_error(parse(R"({"w":)" + entry("bf16", "[1]", "[0,2]") + "}"), kUnknown, {"'w'", "bf16"});
  expect_error(parse(R"({"w":{"dtype":7,"shape":[1],"data_offsets":[0,4]}})"), kBad,
               {"'w'", "dtype"});
}

TEST(SafetensorsHeader, RejectsBadShapes) {
  expect_error(parse(R"({"w":)" + entry("F32", "[-1]", "[0,4]") + "}"), kBad,
               {"'w'", "shape", "-1"});
  expect_error(parse(R"({"w":)" + entry("F32", "[1.0]", "[0,4]") + "}"), kBad, {"'w'", "shape"});
  expect_error(parse(R"({"w":)" + entry("F32", R"(["1"])", "[0,4]") + "}"), kBad, {"'w'", "shape"});
  expect_error(parse(R"({"w":)" + entry("F32", "4", "[0,4]") + "}"), kBad, {"'w'", "shape"});
  std::string rank17 = "[";
  for (size_t i = 0; i <= kMaxRank; ++i) rank17 += i ? ",1" : "1";
  rank17 += "]";
  expect_error(parse(R"({"w":)" + entry("F32", rank17, "[0,4]") + "}"), kBad, {"'w'", "rank 17"});
  // 2^62 * 2^62 * 4 wraps a 64-bit product to 0, which the offsets [0,0] would match.
  expect_error(
      parse(R"({"w":)" + entry("F32", "[4611686018427387904,4611686018427387904]", "[0,0]") + "}"),
      kBad, {"'w'", "overflow"});
  expect_error(parse(R"({"w":)" + entry("U8", "[18446744073709551615]", "[0,4]") + "}"), kBad,
               {"'w'", "too large"});
}

TEST(SafetensorsHeader, RejectsEmptyTensorsWhoseStridesOverflow) {
  // No bytes, but the server describes every tensor with int64 strides: here 2^32 * 2^32.
  expect_error(parse(R"({"w":)" + entry("F32", "[0,4294967296,4294967296]", "[0,0]") + "}"), kBad,
               {"'w'", "overflow"});
  auto fits = parse(R"({"w":)" + entry("F32", "[4294967296,0,2147483647]", "[0,0]") + "}");
  ASSERT_TRUE(fits.ok()) << fits.error().to_string();
  EXPECT_EQ(fits->tensors[0].nbytes, 0u);
}

TEST(SafetensorsHeader, RejectsBadOffsets) {
  expect_error(parse(R"({"w":)" + entry("F32", "[1]", "[0,4.0]") + "}"), kBad,
               {"'w'", "data_offsets"});
  expect_error(parse(R"({"w":)" + entry("F32", "[1]", "[-4,0]") + "}"), kBad,
               {"'w'", "data_offsets"});
  expect_error(parse(R"({"w":)" + entry("F32", "[1]", "[0,4,8]") + "}"), kBad,
               {"'w'", "data_offsets"});
  expect_error(parse(R"({"w":)" + entry("F32", "[1]", "{}") + "}"), kBad, {"'w'", "data_offsets"});
  expect_error(parse(R"({"w":)" + entry("F32", "[0]", "[8,4]") + "}"), kBad, {"'w'", "begin 8"});
  expect_error(parse(R"({"w":)" + entry("F32", "[2]", "[0,4]") + "}"), kBad,
               {"'w'", "8 bytes", "span 4"});
  expect_error(parse(R"({"w":)" + entry("F32", "[2]", "[60,68]") + "}", 64), kBad,
               {"'w'", "end 68", "64 bytes"});
  expect_error(parse(R"({"a":)" + entry("F32", "[2]", "[0,8]") + R"(,"b":)" +
                     entry("F32", "[2]", "[4,12]") + "}"),
               kBad, {"'a'", "'b'", "overlap"});
  // Overlap with a tensor that is not the previous one in offset order.
  expect_error(
      parse(R"({"big":)" + entry("U8", "[32]", "[0,32]") + R"(,"s1":)" +
            entry("U8", "[4]", "[4,8]") + R"(,"s2":)" + entry("U8", "[4]", "[16,20]") + "}"),
      kBad, {"'big'", "overlap"});
}

TEST(SafetensorsHeader, RejectsBadMetadata) {
  expect_error(parse(R"({"__metadata__":[]})"), kBad, {"__metadata__"});
  expect_error(parse(R"({"__metadata__":"pt"})"), kBad, {"__metadata__"});
  expect_error(parse(R"({"__metadata__":{"total":5}})"), kBad, {"__metadata__", "total"});
}

// The header is streamed, not parsed into a document first, yet a header with several problems
// is refused for the same one: a syntax error or repeated key anywhere, else the first bad entry
// in name order, and within an entry the checks in their fixed order.
TEST(SafetensorsHeader, ReportsTheProblemADocumentParseWould) {
  constexpr StatusCode kUnknown = StatusCode::kUnknownDtype;
  std::string w = entry("F32", "[1]", "[0,4]");
  expect_error(parse(R"({"b":)" + entry("F32", "[2]", "[0,4]") + R"(,"a":)" +
                     entry("F4", "[1]", "[4,8]") + "}"),
               kUnknown, {"'a'", "F4"});
  expect_error(parse(R"({"a":)" + entry("F4", "[1]", "[0,4]") + R"(,"b":)"), kBad,
               {"not valid JSON"});
  expect_error(
      parse(R"({"a":)" + entry("F4", "[1]", "[0,4]") + R"(,"w":)" + w + R"(,"w":)" + w + "}"), kBad,
      {"'w'", "twice"});
  expect_error(parse(R"({"a":)" + entry("F4", "[1]", "[0,4]") + R"(,"x":{"y":[{"z":1,"z":2}]}})"),
               kBad, {"'z'", "twice"});
  // __metadata__ sorts among the tensor names ('A' < '_' < 'z').
  expect_error(parse(R"({"z":5,"__metadata__":{"k":1}})"), kBad, {"__metadata__", "\"k\""});
  expect_error(parse(R"({"A":5,"__metadata__":{"k":1}})"), kBad, {"'A'", "object"});
  // The checks' order, not the fields' order.
  expect_error(parse(R"({"w":{"data_offsets":[0],"shape":[1.5],"dtype":"F4"}})"), kUnknown,
               {"'w'", "F4"});
  expect_error(parse(R"({"w":{"zz":1,"data_offsets":[0,4],"shape":[1],"dtype":"F32","yy":2}})"),
               kBad, {"'w'", "unexpected field \"yy\""});
}

TEST(SafetensorsHeader, ShowsOffendingValuesWhole) {
  expect_error(parse(R"({"__metadata__":{"b":[1,{"x":null}],"a":2.5}})"), kBad,
               {"\"a\"", "got 2.5"});
  expect_error(parse(R"({"__metadata__":{"b":[1,{"x":null}]}})"), kBad,
               {"\"b\"", R"(got [1,{"x":null}])"});
  expect_error(parse(R"({"w":)" + entry("F32", R"([2,{"a":[-1]}])", "[0,8]") + "}"), kBad,
               {"'w'", R"(got {"a":[-1]})"});
  expect_error(parse(R"({"w":)" + entry("F32", "[1]", R"([0,[4]])") + "}"), kBad,
               {"'w'", "data_offsets", "got [4]"});
  // The whole shape, past the dimension that overflows and whatever it holds.
  expect_error(
      parse(R"({"w":)" + entry("F32", R"([4611686018427387904,4611686018427387904,"x"])", "[0,0]") +
            "}"),
      kBad, {"'w'", R"(shape [4611686018427387904,4611686018427387904,"x"] overflows)"});
  expect_error(parse(R"({"w":)" + entry("F32", "[3,5]", "[0,8]") + "}"), kBad,
               {"'w'", "shape [3,5] of F32 needs 60 bytes"});
}

class SafetensorsFiles : public ::testing::Test {
 protected:
  std::string write(const std::string& name, const std::string& bytes) {
    std::string path = tmp_ / name;
    testing::write_file(path, bytes);
    return path;
  }
  TempDir tmp_;
};

TEST_F(SafetensorsFiles, ReadsAValidFile) {
  std::string header = R"({"w":)" + entry("U8", "[4]", "[0,4]") + "}";
  std::string path = write("ok.safetensors", testing::safetensors_bytes(header, 4));
  auto file = read_safetensors_file(path);
  ASSERT_TRUE(file.ok()) << file.error().to_string();
  EXPECT_EQ(file->path, path);
  EXPECT_EQ(file->file_size, 8 + header.size() + 4);
  EXPECT_EQ(file->tensors.at(0).file_offset, 8 + header.size());
}

TEST_F(SafetensorsFiles, RejectsShortAndTruncatedFiles) {
  std::string path = write("empty.safetensors", "");
  expect_error(read_safetensors_file(path), kBad, {path, "too short"});
  path = write("five.safetensors", std::string("\x02\0\0\0\0", 5));
  expect_error(read_safetensors_file(path), kBad, {path, "too short"});
  path = write("beyond.safetensors", testing::le64(100) + "{}");
  expect_error(read_safetensors_file(path), kBad, {path, "header length 100", "past the end"});
  // The header is whole but the data section lost its tail.
  std::string header = R"({"w":)" + entry("F32", "[4]", "[0,16]") + "}";
  path = write("cut.safetensors",
               testing::safetensors_bytes(header, 16).substr(0, 8 + header.size() + 10));
  expect_error(read_safetensors_file(path), kBad, {path, "'w'", "end 16"});
  path = write("junk.safetensors", testing::le64(4) + "nope");
  expect_error(read_safetensors_file(path), kBad, {path, "not valid JSON"});
}

TEST_F(SafetensorsFiles, RejectsHeaderOverTheCapWithoutReadingIt) {
  // Sparse: big enough that only the cap, not truncation, can refuse it.
  std::string path = tmp_ / "huge.safetensors";
  testing::write_file(path, testing::le64(kMaxHeaderBytes + 1));
  ASSERT_EQ(::truncate(path.c_str(), static_cast<off_t>(kMaxHeaderBytes + 64)), 0);
  expect_error(read_safetensors_file(path), kBad,
               {path, std::to_string(kMaxHeaderBytes + 1), "limit"});
  path = write("absurd.safetensors", testing::le64(~0ull) + "{}");
  expect_error(read_safetensors_file(path), kBad, {path, "limit"});
}

TEST_F(SafetensorsFiles, ReportsMissingFilesAndDirectories) {
  expect_error(read_safetensors_file(tmp_ / "absent.safetensors"), StatusCode::kNotFound,
               {"absent.safetensors"});
  expect_error(read_safetensors_file(tmp_.path()), kBad, {tmp_.path(), "not a regular file"});
}

}  // namespace
}  // namespace companion::checkpoint
