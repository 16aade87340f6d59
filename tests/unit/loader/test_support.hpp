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
#include "support/safetensors_files.hpp"

namespace companion::loader::testing {

using companion::testing::element_count;
using companion::testing::le64;
using companion::testing::random_bytes;
using companion::testing::random_tensor;
using companion::testing::safetensors_file;
using companion::testing::TempDir;
using companion::testing::TensorData;
using companion::testing::write_file;

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
  Result<std::vector<memory::SegmentExport>> export_writable() override {
    return inner_->export_writable();
  }
  Result<uint64_t> digest(size_t segment) override { return inner_->digest(segment); }

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
