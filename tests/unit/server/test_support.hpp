// Helpers for the ModelStore tests: temp dirs, safetensors files written in C++, and a host
// backend wrapper that counts allocations and live slabs and can slow down or hide writes.
#pragma once

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include <gtest/gtest.h>

#include "companion/result.hpp"
#include "companion/types.hpp"
#include "memory/backend.hpp"
#include "memory/host_backend.hpp"

namespace companion::server::testing {

// A fresh directory under $TMPDIR, removed with everything in it at scope exit.
class TempDir {
 public:
  TempDir() {
    const char* base = std::getenv("TMPDIR");
    std::string pattern = std::string(base && *base ? base : "/tmp") + "/companion_store_XXXXXX";
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

inline uint64_t page_size() {
  return static_cast<uint64_t>(::sysconf(_SC_PAGESIZE));
}

// Shared between a test and the backend it handed to a ModelStore.
struct BackendCounters {
  std::atomic<int> allocations{0};
  std::atomic<int> live_slabs{0};
  std::atomic<int> writes{0};
  std::atomic<int> write_delay_ms{0};     // each write() sleeps this long
  std::atomic<bool> hide_address{false};  // new slabs have no host address: write() is used
};

class CountingSlab final : public memory::Slab {
 public:
  CountingSlab(std::unique_ptr<memory::Slab> inner, std::shared_ptr<BackendCounters> counters)
      : inner_(std::move(inner)),
        counters_(std::move(counters)),
        hide_address_(counters_->hide_address.load()) {
    counters_->live_slabs++;
  }
  ~CountingSlab() override { counters_->live_slabs--; }
  memory::SegmentKind kind() const noexcept override { return inner_->kind(); }
  size_t segment_count() const noexcept override { return inner_->segment_count(); }
  uint64_t segment_size(size_t i) const noexcept override { return inner_->segment_size(i); }
  void* host_address(size_t i) noexcept override {
    return hide_address_ ? nullptr : inner_->host_address(i);
  }
  Result<void> write(size_t i, uint64_t offset, const void* src, uint64_t bytes) override {
    counters_->writes++;
    int delay = counters_->write_delay_ms.load();
    if (delay > 0) std::this_thread::sleep_for(std::chrono::milliseconds(delay));
    return inner_->write(i, offset, src, bytes);
  }
  Result<void> seal() override { return inner_->seal(); }
  Result<std::vector<memory::SegmentExport>> export_segments() override {
    return inner_->export_segments();
  }

 private:
  std::unique_ptr<memory::Slab> inner_;
  std::shared_ptr<BackendCounters> counters_;
  bool hide_address_;
};

class CountingBackend final : public memory::Backend {
 public:
  explicit CountingBackend(std::shared_ptr<BackendCounters> counters)
      : inner_(memory::make_host_backend()), counters_(std::move(counters)) {}
  std::string name() const override { return inner_->name(); }
  uint64_t granularity() const noexcept override { return inner_->granularity(); }
  uint64_t max_segment_bytes() const noexcept override { return inner_->max_segment_bytes(); }
  Result<std::unique_ptr<memory::Slab>> allocate(const std::vector<uint64_t>& sizes,
                                                 const std::string& label) override {
    counters_->allocations++;
    COMPANION_ASSIGN_OR_RETURN(auto slab, inner_->allocate(sizes, label));
    return std::unique_ptr<memory::Slab>(
        std::make_unique<CountingSlab>(std::move(slab), counters_));
  }

 private:
  std::unique_ptr<memory::Backend> inner_;
  std::shared_ptr<BackendCounters> counters_;
};

}  // namespace companion::server::testing
