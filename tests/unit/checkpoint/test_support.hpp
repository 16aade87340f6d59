// Helpers shared by the checkpoint tests: temp trees, raw safetensors bytes, crc32, error checks.
#pragma once

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <array>
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <initializer_list>
#include <sstream>
#include <string>

#include <gtest/gtest.h>

#include "companion/result.hpp"

namespace companion::checkpoint::testing {

// zlib's crc32 (reflected polynomial 0xEDB88320), to compare with Python's zlib.crc32.
inline uint32_t crc32(const void* data, size_t size) {
  static const std::array<uint32_t, 256> table = [] {
    std::array<uint32_t, 256> t{};
    for (uint32_t i = 0; i < 256; ++i) {
      uint32_t c = i;
      for (int k = 0; k < 8; ++k) c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
      t[i] = c;
    }
    return t;
  }();
  uint32_t crc = 0xFFFFFFFFu;
  const auto* p = static_cast<const unsigned char*>(data);
  for (size_t i = 0; i < size; ++i) crc = table[(crc ^ p[i]) & 0xFF] ^ (crc >> 8);
  return crc ^ 0xFFFFFFFFu;
}

// A fresh directory under $TMPDIR, removed with everything in it at scope exit.
class TempDir {
 public:
  TempDir() {
    const char* base = std::getenv("TMPDIR");
    std::string pattern = std::string(base && *base ? base : "/tmp") + "/companion_ckpt_XXXXXX";
    char* made = ::mkdtemp(pattern.data());
    EXPECT_NE(made, nullptr) << "mkdtemp " << pattern;
    // Canonical, so paths compare equal to what realpath returns.
    path_ = std::filesystem::canonical(pattern).string();
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;

  const std::string& path() const { return path_; }
  std::string operator/(const std::string& rel) const { return path_ + "/" + rel; }

 private:
  std::string path_;
};

inline void write_file(const std::string& path, const std::string& bytes) {
  std::filesystem::create_directories(std::filesystem::path(path).parent_path());
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  ASSERT_TRUE(out.good()) << "write " << path;
}

inline std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream s;
  s << in.rdbuf();
  return s.str();
}

inline std::string le64(uint64_t v) {
  std::string out(8, '\0');
  for (int i = 0; i < 8; ++i) out[i] = static_cast<char>((v >> (8 * i)) & 0xFF);
  return out;
}

// A whole .safetensors file: length prefix, header, data (byte i of the data is i % 251).
inline std::string safetensors_bytes(const std::string& header, size_t data_bytes) {
  std::string data(data_bytes, '\0');
  for (size_t i = 0; i < data_bytes; ++i) data[i] = static_cast<char>(i % 251);
  return le64(header.size()) + header + data;
}

// Asserts `result` failed with `code` and that its message contains every one of `parts`.
template <typename T>
void expect_error(const Result<T>& result, StatusCode code,
                  std::initializer_list<std::string> parts) {
  ASSERT_FALSE(result.ok()) << "expected " << status_code_name(code) << ", got success";
  EXPECT_EQ(result.error().code, code)
      << status_code_name(result.error().code) << ": " << result.error().message;
  for (const std::string& part : parts)
    EXPECT_NE(result.error().message.find(part), std::string::npos)
        << "message \"" << result.error().message << "\" does not mention \"" << part << "\"";
}

// The generated reference data (tests.cmake runs make_reference.py first). Missing data is a
// failure, not a skip: a silently skipped reference test proves nothing.
inline std::string reference_dir() {
  const char* dir = std::getenv("COMPANION_TEST_DATA");
  if (dir == nullptr || *dir == '\0') {
    ADD_FAILURE() << "COMPANION_TEST_DATA is not set: run through ctest, which generates the data "
                     "with make_reference.py (test checkpoint_reference_data)";
    return "";
  }
  if (!std::filesystem::exists(std::string(dir) + "/manifest.json")) {
    ADD_FAILURE() << dir << "/manifest.json is missing: make_reference.py has not run there";
    return "";
  }
  return dir;
}

}  // namespace companion::checkpoint::testing
