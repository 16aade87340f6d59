// Helpers for the checkpoint tests: raw safetensors bytes, error checks, the reference data; temp
// trees, file writing and crc32 come from the shared test support.
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
#include <vector>

#include <gtest/gtest.h>

#include "common/checksum.hpp"
#include "companion/result.hpp"
#include "support/safetensors_files.hpp"

namespace companion::checkpoint::testing {

using companion::crc32;  // zlib's crc32, to compare with Python's zlib.crc32
using companion::testing::le64;
using companion::testing::TempDir;
using companion::testing::write_file;

inline std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream s;
  s << in.rdbuf();
  return s.str();
}

// A whole .safetensors file: length prefix, header, data (byte i of the data is i % 251).
inline std::string safetensors_bytes(const std::string& header, size_t data_bytes) {
  std::string data(data_bytes, '\0');
  for (size_t i = 0; i < data_bytes; ++i) data[i] = static_cast<char>(i % 251);
  return le64(header.size()) + header + data;
}

// A .safetensors file of one U8 tensor of 4 bytes per name, in the order given.
inline std::string file_with(const std::vector<std::string>& names) {
  std::string header = "{";
  uint64_t offset = 0;
  for (const std::string& name : names) {
    if (header.size() > 1) header += ",";
    header += "\"" + name + R"(":{"dtype":"U8","shape":[4],"data_offsets":[)" +
              std::to_string(offset) + "," + std::to_string(offset + 4) + "]}";
    offset += 4;
  }
  return safetensors_bytes(header + "}", offset);
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
