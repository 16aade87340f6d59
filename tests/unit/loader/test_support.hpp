// Helpers for the loader tests: temp dirs, safetensors files written in C++, backend wrappers
// (small segments, slabs without a host address) and reading a slab back through its exports.
#pragma once

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <memory>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "companion/result.hpp"
#include "companion/types.hpp"
#include "memory/backend.hpp"
#include "memory/host_backend.hpp"

namespace companion::loader::testing {

// A fresh directory under $TMPDIR, removed with everything in it at scope exit.
class TempDir {
 public:
  TempDir() {
    const char* base = std::getenv("TMPDIR");
    std::string pattern = std::string(base && *base ? base : "/tmp") + "/companion_loader_XXXXXX";
    char* made = ::mkdtemp(pattern.data());
    EXPECT_NE(made, nullptr) << "mkdtemp " << pattern;
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
  out.close();
  ASSERT_TRUE(out.good()) << "write " << path;
}

inline std::string le64(uint64_t v) {
  std::string out(8, '\0');
  for (int i = 0; i < 8; ++i)
    out[static_cast<size_t>(i)] = static_cast<char>((v >> (8 * i)) & 0xFF);
  return out;
}

// Deterministic pseudo-random bytes (splitmix64: cheap even in unoptimised builds).
inline std::string random_bytes(size_t n, uint32_t seed) {
  uint64_t state = 0x9E3779B97F4A7C15ull * (seed + 1);
  std::string out(n, '\0');
  for (size_t i = 0; i < n; i += 8) {
    uint64_t z = (state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    std::memcpy(out.data() + i, &z, std::min<size_t>(8, n - i));
  }
  return out;
}

struct TensorData {
  std::string name;
  DType dtype = DType::kU8;
  std::vector<int64_t> shape;
  std::string bytes;  // little-endian element bytes, product(shape) * dtype_size
};

inline uint64_t element_count(const std::vector<int64_t>& shape) {
  uint64_t n = 1;
  for (int64_t d : shape) n *= static_cast<uint64_t>(d);
  return n;
}

// A tensor of random bytes of the right size for its shape.
inline TensorData random_tensor(std::string name, DType dtype, std::vector<int64_t> shape,
                                uint32_t seed) {
  TensorData t;
  t.name = std::move(name);
  t.dtype = dtype;
  t.bytes = random_bytes(element_count(shape) * dtype_size(dtype), seed);
  t.shape = std::move(shape);
  return t;
}

// A whole .safetensors file holding `tensors` in the given order, data packed back to back.
inline std::string safetensors_file(const std::vector<TensorData>& tensors) {
  std::string header = "{";
  std::string data;
  for (size_t i = 0; i < tensors.size(); ++i) {
    const TensorData& t = tensors[i];
    if (i > 0) header += ",";
    header += "\"" + t.name + "\":{\"dtype\":\"" + dtype_name(t.dtype) + "\",\"shape\":[";
    for (size_t d = 0; d < t.shape.size(); ++d) {
      if (d > 0) header += ",";
      header += std::to_string(t.shape[d]);
    }
    header += "],\"data_offsets\":[" + std::to_string(data.size()) + "," +
              std::to_string(data.size() + t.bytes.size()) + "]}";
    data += t.bytes;
  }
  header += "}";
  while (header.size() % 8 != 0) header += ' ';
  return le64(header.size()) + header + data;
}

// Forwards to a host slab; can hide the host address (forcing the loader's write() path) and
// counts writes.
class WrappedSlab final : public memory::Slab {
 public:
  WrappedSlab(std::unique_ptr<memory::Slab> inner, bool hide_address)
      : inner_(std::move(inner)), hide_address_(hide_address) {}
  memory::SegmentKind kind() const noexcept override { return inner_->kind(); }
  size_t segment_count() const noexcept override { return inner_->segment_count(); }
  uint64_t segment_size(size_t i) const noexcept override { return inner_->segment_size(i); }
  void* host_address(size_t i) noexcept override {
    return hide_address_ ? nullptr : inner_->host_address(i);
  }
  Result<void> write(size_t i, uint64_t offset, const void* src, uint64_t bytes) override {
    ++writes;
    return inner_->write(i, offset, src, bytes);
  }
  Result<void> seal() override { return inner_->seal(); }
  Result<std::vector<memory::SegmentExport>> export_segments() override {
    return inner_->export_segments();
  }

  int writes = 0;

 private:
  std::unique_ptr<memory::Slab> inner_;
  bool hide_address_;
};

// The host backend with a smaller largest segment and, optionally, slabs without host addresses.
class WrappedBackend final : public memory::Backend {
 public:
  WrappedBackend(uint64_t max_segment_bytes, bool hide_address)
      : inner_(memory::make_host_backend()),
        max_segment_bytes_(max_segment_bytes),
        hide_address_(hide_address) {}
  std::string name() const override { return "wrapped-host"; }
  uint64_t granularity() const noexcept override { return inner_->granularity(); }
  uint64_t max_segment_bytes() const noexcept override { return max_segment_bytes_; }
  Result<std::unique_ptr<memory::Slab>> allocate(const std::vector<uint64_t>& sizes,
                                                 const std::string& label) override {
    COMPANION_ASSIGN_OR_RETURN(auto slab, inner_->allocate(sizes, label));
    return std::unique_ptr<memory::Slab>(
        std::make_unique<WrappedSlab>(std::move(slab), hide_address_));
  }

 private:
  std::unique_ptr<memory::Backend> inner_;
  uint64_t max_segment_bytes_;
  bool hide_address_;
};

inline uint64_t page_size() {
  return static_cast<uint64_t>(::sysconf(_SC_PAGESIZE));
}

// Seals the slab and reads every segment back through export + import, as a client would.
inline std::vector<std::string> read_back(memory::Slab& slab) {
  std::vector<std::string> out;
  auto sealed = slab.seal();
  EXPECT_TRUE(sealed.ok()) << sealed.error().to_string();
  auto exports = slab.export_segments();
  EXPECT_TRUE(exports.ok()) << exports.error().to_string();
  if (!exports.ok()) return out;
  for (auto& e : *exports) {
    uint64_t size = e.size;
    auto mapped = memory::import_segment(std::move(e), memory::ImportTarget{});
    EXPECT_TRUE(mapped.ok()) << mapped.error().to_string();
    if (!mapped.ok()) return out;
    const auto* p = static_cast<const char*>((*mapped)->address());
    out.push_back(size == 0 ? std::string() : std::string(p, size));
  }
  return out;
}

}  // namespace companion::loader::testing
