// F16/BF16/F32 conversions: bit-exact against torch's casts, hand-checked cases, round trips.
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "checkpoint/dtype_convert.hpp"
#include "test_support.hpp"

namespace companion::checkpoint {
namespace {

template <typename T>
std::vector<T> load(const std::string& dir, const std::string& name) {
  std::string bytes = testing::read_file(dir + "/convert/" + name + ".bin");
  EXPECT_FALSE(bytes.empty()) << dir << "/convert/" << name << ".bin missing or empty";
  EXPECT_EQ(bytes.size() % sizeof(T), 0u) << name;
  std::vector<T> out(bytes.size() / sizeof(T));
  std::memcpy(out.data(), bytes.data(), out.size() * sizeof(T));
  return out;
}

std::string hex(uint64_t v) {
  char buf[24];
  std::snprintf(buf, sizeof(buf), "0x%llx", static_cast<unsigned long long>(v));
  return buf;
}

// Converts `input` and compares every element with torch's output, reporting the first few
// differences by bit pattern.
template <typename From, typename To>
void expect_matches_torch(DType from, DType to, const std::vector<From>& input,
                          const std::vector<To>& expected) {
  SCOPED_TRACE(std::string(dtype_name(from)) + " -> " + dtype_name(to));
  ASSERT_EQ(input.size(), expected.size());
  ASSERT_GT(input.size(), 1000u);
  std::vector<To> got(input.size());
  ASSERT_TRUE(convert_elements(from, to, input.data(), got.data(), input.size()).ok());
  size_t mismatches = 0;
  for (size_t i = 0; i < input.size(); ++i) {
    if (got[i] == expected[i]) continue;
    if (++mismatches <= 5)
      ADD_FAILURE() << "input " << hex(input[i]) << ": got " << hex(got[i]) << ", torch gives "
                    << hex(expected[i]);
  }
  EXPECT_EQ(mismatches, 0u);
}

TEST(DtypeConvert, MatchesTorchBitForBit) {
  std::string dir = testing::reference_dir();
  ASSERT_FALSE(dir.empty());
  auto f32 = load<uint32_t>(dir, "f32");
  auto all16 = load<uint16_t>(dir, "u16_all");
  ASSERT_EQ(all16.size(), 65536u);
  expect_matches_torch(DType::kF32, DType::kBF16, f32, load<uint16_t>(dir, "f32_to_bf16"));
  expect_matches_torch(DType::kF32, DType::kF16, f32, load<uint16_t>(dir, "f32_to_f16"));
  expect_matches_torch(DType::kBF16, DType::kF32, all16, load<uint32_t>(dir, "bf16_to_f32"));
  expect_matches_torch(DType::kF16, DType::kF32, all16, load<uint32_t>(dir, "f16_to_f32"));
  expect_matches_torch(DType::kBF16, DType::kF16, all16, load<uint16_t>(dir, "bf16_to_f16"));
  expect_matches_torch(DType::kF16, DType::kBF16, all16, load<uint16_t>(dir, "f16_to_bf16"));
}

uint16_t to16(DType to, uint32_t f32_bits) {
  uint16_t out = 0;
  EXPECT_TRUE(convert_elements(DType::kF32, to, &f32_bits, &out, 1).ok());
  return out;
}

uint32_t to32(DType from, uint16_t bits) {
  uint32_t out = 0;
  EXPECT_TRUE(convert_elements(from, DType::kF32, &bits, &out, 1).ok());
  return out;
}

// Values worked out by hand, so a wrong reference file cannot make a wrong rule pass.
TEST(DtypeConvert, HandCheckedCases) {
  EXPECT_EQ(to16(DType::kF16, 0x3f800000), 0x3c00);  // 1.0
  EXPECT_EQ(to16(DType::kF16, 0x3f801000), 0x3c00);  // 1 + 2^-11: tie, to even (down)
  EXPECT_EQ(to16(DType::kF16, 0x3f803000), 0x3c02);  // 1 + 3*2^-11: tie, to even (up)
  EXPECT_EQ(to16(DType::kF16, 0x477fe000), 0x7bff);  // 65504, the largest half
  EXPECT_EQ(to16(DType::kF16, 0x477fefff), 0x7bff);  // just below the tie with 65536
  EXPECT_EQ(to16(DType::kF16, 0x477ff000), 0x7c00);  // 65520 rounds to inf
  EXPECT_EQ(to16(DType::kF16, 0xc7800000), 0xfc00);  // -65536
  EXPECT_EQ(to16(DType::kF16, 0x33800000), 0x0001);  // 2^-24, the smallest subnormal
  EXPECT_EQ(to16(DType::kF16, 0x33000000), 0x0000);  // 2^-25: tie, to even (zero)
  EXPECT_EQ(to16(DType::kF16, 0x33000001), 0x0001);
  EXPECT_EQ(to16(DType::kF16, 0x387fe000),
            0x0400);  // tie past the largest subnormal: to the normal
  EXPECT_EQ(to16(DType::kF16, 0x80000000), 0x8000);   // -0
  EXPECT_EQ(to16(DType::kF16, 0xffc00000), 0xfe00);   // -NaN keeps its sign
  EXPECT_EQ(to16(DType::kF16, 0x7f800001), 0x7e00);   // signalling NaN comes out quiet
  EXPECT_EQ(to16(DType::kBF16, 0x3f808000), 0x3f80);  // tie, to even (down)
  EXPECT_EQ(to16(DType::kBF16, 0x3f818000), 0x3f82);  // tie, to even (up)
  EXPECT_EQ(to16(DType::kBF16, 0x7f7fffff), 0x7f80);  // f32 max overflows to inf
  EXPECT_EQ(to16(DType::kBF16, 0x00000001), 0x0000);  // tiny subnormal rounds to zero
  EXPECT_EQ(to16(DType::kBF16, 0xffc00000), 0x7fc0);  // c10::BFloat16: every NaN is 0x7fc0
  EXPECT_EQ(to32(DType::kF16, 0x0001), 0x33800000u);
  EXPECT_EQ(to32(DType::kF16, 0x03ff), 0x387fc000u);  // largest subnormal
  EXPECT_EQ(to32(DType::kF16, 0x8400), 0xb8800000u);
  EXPECT_EQ(to32(DType::kF16, 0xfc00), 0xff800000u);
  EXPECT_EQ(to32(DType::kF16, 0x7c01), 0x7fc02000u);   // payload kept, made quiet
  EXPECT_EQ(to32(DType::kBF16, 0x7f81), 0x7f810000u);  // bf16 -> f32 is a plain shift
}

bool f16_is_nan(uint16_t v) {
  return (v & 0x7c00) == 0x7c00 && (v & 0x3ff) != 0;
}
bool bf16_is_nan(uint16_t v) {
  return (v & 0x7f80) == 0x7f80 && (v & 0x7f) != 0;
}

TEST(DtypeConvert, RoundTripsThroughF32AreExact) {
  std::vector<uint16_t> all(65536);
  for (size_t i = 0; i < all.size(); ++i) all[i] = static_cast<uint16_t>(i);
  std::vector<uint32_t> wide(all.size());
  std::vector<uint16_t> back(all.size());
  for (DType narrow : {DType::kF16, DType::kBF16}) {
    SCOPED_TRACE(dtype_name(narrow));
    ASSERT_TRUE(convert_elements(narrow, DType::kF32, all.data(), wide.data(), all.size()).ok());
    ASSERT_TRUE(convert_elements(DType::kF32, narrow, wide.data(), back.data(), all.size()).ok());
    auto is_nan = narrow == DType::kF16 ? f16_is_nan : bf16_is_nan;
    size_t failures = 0;
    for (size_t i = 0; i < all.size(); ++i) {
      bool ok = is_nan(all[i]) ? is_nan(back[i]) : back[i] == all[i];
      if (!ok && ++failures <= 5) ADD_FAILURE() << hex(all[i]) << " came back as " << hex(back[i]);
    }
    EXPECT_EQ(failures, 0u);
  }
}

TEST(DtypeConvert, UnalignedBuffersCopiesAndRefusals) {
  // Odd addresses: checkpoint tensors need not be aligned to their element size.
  alignas(8) unsigned char src[1 + 3 * 4];
  alignas(8) unsigned char dst[1 + 3 * 2];
  const uint32_t values[3] = {0x3f800000, 0xc0000000, 0x7f800000};  // 1, -2, inf
  std::memcpy(src + 1, values, sizeof(values));
  ASSERT_TRUE(convert_elements(DType::kF32, DType::kBF16, src + 1, dst + 1, 3).ok());
  uint16_t out[3];
  std::memcpy(out, dst + 1, sizeof(out));
  EXPECT_EQ(out[0], 0x3f80);
  EXPECT_EQ(out[1], 0xc000);
  EXPECT_EQ(out[2], 0x7f80);

  uint16_t copy[3] = {};
  ASSERT_TRUE(convert_elements(DType::kBF16, DType::kBF16, out, copy, 3).ok());
  EXPECT_EQ(std::memcmp(copy, out, sizeof(out)), 0);
  EXPECT_TRUE(convert_elements(DType::kF16, DType::kF32, nullptr, nullptr, 0).ok());

  testing::expect_error(convert_elements(DType::kF64, DType::kF32, src, dst, 1),
                        StatusCode::kUnknownDtype, {"F64"});
  testing::expect_error(convert_elements(DType::kF32, DType::kI8, src, dst, 1),
                        StatusCode::kUnknownDtype, {"I8"});
}

}  // namespace
}  // namespace companion::checkpoint
