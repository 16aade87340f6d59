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
#include <new>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include <gtest/gtest.h>

#include "companion/result.hpp"
#include "companion/types.hpp"
#include "memory/backend.hpp"
#include "memory/host_backend.hpp"
#include "support/safetensors_files.hpp"

namespace companion::server::testing {

using companion::testing::element_count;
using companion::testing::le64;
using companion::testing::random_bytes;
using companion::testing::random_tensor;
using companion::testing::safetensors_file;
using companion::testing::TempDir;
using companion::testing::TensorData;
using companion::testing::write_file;

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
  // What available_bytes() reports: -1 = unknown (kUnavailable), else these bytes free of
  // `total_bytes`.
  std::atomic<int64_t> available_bytes{-1};
  std::atomic<uint64_t> total_bytes{64ull << 30};
  std::atomic<bool> allocation_is_resident{false};  // as GPU backends: taken at allocate()
  // allocate() throws: 0 = never, 1 = std::bad_alloc, 2 = std::runtime_error (then resets).
  std::atomic<int> throw_on_allocate{0};
  std::atomic<bool> throw_on_seal{false};   // the next seal() throws std::bad_alloc
  std::atomic<bool> corrupt_writes{false};  // write() stores its first byte flipped
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
    if (counters_->corrupt_writes.load() && bytes > 0) {
      std::string changed(static_cast<const char*>(src), bytes);
      changed[0] = static_cast<char>(~changed[0]);
      return inner_->write(i, offset, changed.data(), bytes);
    }
    return inner_->write(i, offset, src, bytes);
  }
  Result<void> read(size_t i, uint64_t offset, void* dst, uint64_t bytes) override {
    return inner_->read(i, offset, dst, bytes);
  }
  Result<void> seal() override {
    if (counters_->throw_on_seal.exchange(false)) throw std::bad_alloc();
    return inner_->seal();
  }
  Result<std::vector<memory::SegmentExport>> export_segments() override {
    return inner_->export_segments();
  }
  Result<std::vector<memory::SegmentExport>> export_writable() override {
    return inner_->export_writable();
  }
  Result<uint64_t> digest(size_t segment) override { return inner_->digest(segment); }

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
    switch (counters_->throw_on_allocate.exchange(0)) {
      case 1:
        throw std::bad_alloc();
      case 2:
        throw std::runtime_error("allocate() threw");
      default:
        break;
    }
    COMPANION_ASSIGN_OR_RETURN(auto slab, inner_->allocate(sizes, label));
    return std::unique_ptr<memory::Slab>(
        std::make_unique<CountingSlab>(std::move(slab), counters_));
  }
  bool allocation_is_resident() const noexcept override {
    return counters_->allocation_is_resident.load();
  }
  Result<memory::MemoryAvailability> available_bytes() const override {
    int64_t available = counters_->available_bytes.load();
    if (available < 0) return make_error(StatusCode::kUnavailable, "not told");
    return memory::MemoryAvailability{static_cast<uint64_t>(available),
                                      counters_->total_bytes.load()};
  }

 private:
  std::unique_ptr<memory::Backend> inner_;
  std::shared_ptr<BackendCounters> counters_;
};

}  // namespace companion::server::testing
