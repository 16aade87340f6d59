// cuda-ipc: each segment is one cuMemAlloc allocation shared through a 64-byte cuIpcGetMemHandle
// handle; clients open it with cuIpcOpenMemHandle (legacy CUDA IPC: the mapping is read-write).
#include <array>
#include <cstdint>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "common/log.hpp"
#include "common/util.hpp"
#include "memory/cuda_backend.hpp"
#include "memory/cuda_checksum.hpp"
#include "memory/cuda_driver.hpp"
#include "memory/cuda_slab.hpp"

namespace companion::memory {
namespace {

constexpr const char* kBackendName = "cuda-ipc";
constexpr uint64_t kGranularity = uint64_t{2} << 20;  // alignment of segment sizes
constexpr uint64_t kMaxSegmentBytes = uint64_t{16} << 30;

static_assert(kIpcHandleBytes == cu::kIpcHandleSize);

struct IpcSegment {
  cu::CUdeviceptr ptr = 0;
  uint64_t size = 0;
};

class IpcSlab final : public CudaSlab {
 public:
  IpcSlab(const cuda::DriverApi* api, int ordinal, std::string label)
      : api_(api), ordinal_(ordinal), label_(std::move(label)) {}

  ~IpcSlab() override {
    if (segments_.empty()) return;
    auto scope = cuda::ScopedContext::enter(ordinal_);
    if (!scope.ok()) {
      log::warn("cuda-ipc: cannot free slab '" + label_ + "': " + scope.error().message);
      return;
    }
    for (const auto& segment : segments_) {
      if (auto r = COMPANION_CU(*api_, cuMemFree, segment.ptr); !r.ok()) {
        log::warn("cuda-ipc: freeing slab '" + label_ + "': " + r.error().message);
      }
    }
    log::debug("cuda-ipc: freed slab '" + label_ + "'");
  }

  // Allocates one more segment. Needs the context current.
  Result<void> add_segment(const std::vector<uint64_t>& sizes) {
    const size_t index = segments_.size();
    cu::CUdeviceptr ptr = 0;
    auto r = COMPANION_CU(*api_, cuMemAlloc, &ptr, sizes[index]);
    if (!r.ok()) {
      return cuda::with_context(
          std::move(r).error(),
          cuda::describe_allocation(kBackendName, label_, ordinal_, index, sizes));
    }
    segments_.push_back(IpcSegment{ptr, sizes[index]});
    return ok_result();
  }

  SegmentKind kind() const noexcept override { return SegmentKind::kCudaIpcHandle; }
  size_t segment_count() const noexcept override { return segments_.size(); }
  uint64_t segment_size(size_t segment) const noexcept override {
    return segment < segments_.size() ? segments_[segment].size : 0;
  }
  void* host_address(size_t) noexcept override { return nullptr; }
  int device_ordinal() const noexcept override { return ordinal_; }
  uint64_t device_pointer(size_t segment) const noexcept override {
    return segment < segments_.size() ? segments_[segment].ptr : 0;
  }

  Result<void> write(size_t segment, uint64_t offset, const void* src, uint64_t bytes) override {
    COMPANION_TRY(cuda::check_write(label_, sealed_, segment, segments_.size(),
                                    segment_size(segment), offset, bytes));
    auto r = cuda::copy_to_device(ordinal_, segments_[segment].ptr + offset, src, bytes);
    if (!r.ok())
      return cuda::with_context(std::move(r).error(), "cuda-ipc: writing slab '" + label_ + "'");
    return ok_result();
  }

  Result<void> seal() override {
    if (sealed_) return ok_result();
    // Legacy IPC has no read-only mappings: sealing only makes sure every copy has landed.
    auto r = cuda::synchronize_device(ordinal_);
    if (!r.ok())
      return cuda::with_context(std::move(r).error(), "cuda-ipc: sealing slab '" + label_ + "'");
    COMPANION_TRY(take_handles());
    sealed_ = true;
    return ok_result();
  }

  Result<std::vector<SegmentExport>> export_segments() override {
    if (!sealed_) {
      return make_error(StatusCode::kNotReady, "cuda-ipc: slab '" + label_ + "' is not sealed yet");
    }
    return make_exports();
  }

  // The same handles as readers get: legacy IPC mappings are read-write anyway.
  Result<std::vector<SegmentExport>> export_writable() override {
    if (sealed_) {
      return make_error(
          StatusCode::kInvalidArgument,
          "cuda-ipc: slab '" + label_ + "' is sealed: it cannot be exported writable");
    }
    COMPANION_TRY(take_handles());
    return make_exports();
  }

  // On the GPU, in the server's context, over the server's own allocation.
  Result<uint64_t> digest(size_t segment) override {
    if (segment >= segments_.size()) {
      return make_error(StatusCode::kInvalidArgument,
                        "cuda-ipc: segment " + std::to_string(segment) + " out of range");
    }
    std::lock_guard lock(checksum_mutex_);
    COMPANION_ASSIGN_OR_RETURN(auto scope, cuda::ScopedContext::enter(ordinal_));
    if (!checksum_) {
      COMPANION_ASSIGN_OR_RETURN(checksum_, DeviceChecksum::create(ordinal_));
    }
    auto sum = checksum_->run(segments_[segment].ptr, segments_[segment].size);
    if (!sum.ok()) {
      return cuda::with_context(std::move(sum).error(),
                                "cuda-ipc: digest of slab '" + label_ + "'");
    }
    return sum;
  }

 private:
  // The handles never change: take them once, not on every attach.
  Result<void> take_handles() {
    if (handles_.size() == segments_.size()) return ok_result();
    COMPANION_ASSIGN_OR_RETURN(auto scope, cuda::ScopedContext::enter(ordinal_));
    for (size_t i = handles_.size(); i < segments_.size(); ++i) {
      cu::CUipcMemHandle handle{};
      auto h = COMPANION_CU(*api_, cuIpcGetMemHandle, &handle, segments_[i].ptr);
      if (!h.ok())
        return cuda::with_context(std::move(h).error(),
                                  "cuda-ipc: exporting slab '" + label_ + "'");
      handles_.push_back(handle);
    }
    return ok_result();
  }

  std::vector<SegmentExport> make_exports() const {
    std::vector<SegmentExport> exports;
    exports.reserve(segments_.size());
    for (size_t i = 0; i < segments_.size(); ++i) {
      SegmentExport e;
      e.kind = SegmentKind::kCudaIpcHandle;
      e.size = segments_[i].size;
      std::memcpy(e.ipc_handle.data(), handles_[i].reserved, kIpcHandleBytes);
      exports.push_back(std::move(e));
    }
    return exports;
  }

  const cuda::DriverApi* api_;
  int ordinal_;
  std::string label_;
  std::vector<IpcSegment> segments_;
  std::vector<cu::CUipcMemHandle> handles_;  // taken at seal() or export_writable()
  bool sealed_ = false;
  std::mutex checksum_mutex_;                 // digest(): one kernel and result buffer
  std::unique_ptr<DeviceChecksum> checksum_;  // made by the first digest()
};

class IpcBackend final : public Backend {
 public:
  IpcBackend(const cuda::DriverApi* api, int ordinal) : api_(api), ordinal_(ordinal) {}

  std::string name() const override { return kBackendName; }
  uint64_t granularity() const noexcept override { return kGranularity; }
  uint64_t max_segment_bytes() const noexcept override { return kMaxSegmentBytes; }

  Result<std::unique_ptr<Slab>> allocate(const std::vector<uint64_t>& segment_sizes,
                                         const std::string& label) override {
    COMPANION_TRY(
        cuda::check_segment_sizes(segment_sizes, kGranularity, kMaxSegmentBytes, kBackendName));
    COMPANION_ASSIGN_OR_RETURN(auto scope, cuda::ScopedContext::enter(ordinal_));
    // On failure the slab's destructor frees the segments allocated so far.
    auto slab = std::make_unique<IpcSlab>(api_, ordinal_, label);
    for (size_t i = 0; i < segment_sizes.size(); ++i)
      COMPANION_TRY(slab->add_segment(segment_sizes));
    log::debug("cuda-ipc: allocated slab '" + label + "' (" + format_bytes(slab->total_bytes()) +
               " in " + std::to_string(segment_sizes.size()) + " segment(s)) on GPU " +
               std::to_string(ordinal_));
    return std::unique_ptr<Slab>(std::move(slab));
  }

  bool allocation_is_resident() const noexcept override { return true; }
  Result<MemoryAvailability> available_bytes() const override {
    COMPANION_ASSIGN_OR_RETURN(auto info, cuda::device_memory_info(ordinal_));
    return MemoryAvailability{info.first, info.second};
  }

 private:
  const cuda::DriverApi* api_;
  int ordinal_;
};

// ---- client side: one open per (device, handle) per process, shared by its MappedSegments ----
//
// cuIpcOpenMemHandle of a handle already open in the context is not reliably reference-counted by
// the driver, so the process keeps its own count and opens / closes each handle once.

using IpcKey = std::pair<int, std::array<uint8_t, kIpcHandleBytes>>;
struct IpcOpen {
  cu::CUdeviceptr ptr = 0;
  uint64_t size = 0;  // of the whole allocation (cuMemGetAddressRange)
  size_t references = 0;
};

struct IpcTable {
  std::mutex mutex;
  std::map<IpcKey, IpcOpen> open;
};
IpcTable& ipc_table() {
  static auto* table = new IpcTable;  // never destroyed: mappings may outlive static destruction
  return *table;
}

class IpcImport final : public MappedSegment {
 public:
  IpcImport(const cuda::DriverApi* api, IpcKey key, cu::CUdeviceptr ptr, uint64_t size)
      : api_(api), key_(std::move(key)), ptr_(ptr), size_(size) {}
  ~IpcImport() override {
    IpcTable& table = ipc_table();
    std::lock_guard lock(table.mutex);
    auto it = table.open.find(key_);
    if (it == table.open.end() || --it->second.references > 0) return;
    table.open.erase(it);
    auto scope = cuda::ScopedContext::enter(key_.first);
    if (!scope.ok()) {
      log::warn("cuda-ipc: cannot close a segment: " + scope.error().message);
      return;
    }
    if (auto r = COMPANION_CU(*api_, cuIpcCloseMemHandle, ptr_); !r.ok()) {
      log::warn("cuda-ipc: closing a segment: " + r.error().message);
    }
  }

  const void* address() const noexcept override {
    return reinterpret_cast<const void*>(static_cast<uintptr_t>(ptr_));
  }
  uint64_t size() const noexcept override { return size_; }
  bool on_device() const noexcept override { return true; }
  // Legacy IPC mappings cannot be made read-only: they stay writable, and make_read_only() is a
  // no-op that succeeds (writable() stays true). Readers of cuda-ipc slabs are trusted.
  bool writable() const noexcept override { return true; }
  Result<void> make_read_only() override { return ok_result(); }

 private:
  const cuda::DriverApi* api_;
  IpcKey key_;
  cu::CUdeviceptr ptr_;
  uint64_t size_;
};

}  // namespace

Result<std::unique_ptr<Backend>> make_cuda_ipc_backend(int ordinal) {
  COMPANION_ASSIGN_OR_RETURN(const cuda::DriverApi* api, cuda::driver());
  COMPANION_TRY(cuda::check_ordinal(*api, ordinal));
  COMPANION_TRY(cuda::primary_context(ordinal));
  return std::unique_ptr<Backend>(std::make_unique<IpcBackend>(api, ordinal));
}

Result<std::unique_ptr<MappedSegment>> import_cuda_ipc_segment(
    const std::array<uint8_t, kIpcHandleBytes>& handle, uint64_t size, int ordinal) {
  COMPANION_ASSIGN_OR_RETURN(const cuda::DriverApi* api, cuda::driver());
  COMPANION_TRY(cuda::check_ordinal(*api, ordinal));
  if (size == 0) return make_error(StatusCode::kInvalidArgument, "cuda-ipc: segment of 0 bytes");
  IpcKey key{ordinal, handle};
  IpcTable& table = ipc_table();
  std::lock_guard lock(table.mutex);
  auto it = table.open.find(key);
  if (it == table.open.end()) {
    COMPANION_ASSIGN_OR_RETURN(auto scope, cuda::ScopedContext::enter(ordinal));
    cu::CUipcMemHandle h{};
    std::memcpy(h.reserved, handle.data(), kIpcHandleBytes);
    cu::CUdeviceptr ptr = 0;
    auto r = COMPANION_CU(*api, cuIpcOpenMemHandle, &ptr, h, cu::kIpcMemLazyEnablePeerAccess);
    if (!r.ok()) {
      return cuda::with_context(std::move(r).error(), "cuda-ipc: opening a segment handle on GPU " +
                                                          std::to_string(ordinal));
    }
    // The allocation's size, to refuse a segment announced larger than it. Should the driver not
    // answer for an IPC mapping, trust the announced size.
    cu::CUdeviceptr base = 0;
    size_t range = 0;
    if (auto q = COMPANION_CU(*api, cuMemGetAddressRange, &base, &range, ptr); !q.ok()) {
      log::debug("cuda-ipc: " + q.error().message);
      range = size;
    }
    it = table.open.emplace(key, IpcOpen{ptr, range, 0}).first;
  }
  IpcOpen& open = it->second;
  if (size > open.size) {
    Error error = make_error(StatusCode::kInvalidArgument,
                             "cuda-ipc: segment announced as " + std::to_string(size) +
                                 " bytes but its allocation has " + std::to_string(open.size));
    if (open.references == 0) {  // opened just now for this call: close it again
      auto scope = cuda::ScopedContext::enter(ordinal);
      (void)api->cuIpcCloseMemHandle(open.ptr);
      table.open.erase(it);
    }
    return error;
  }
  ++open.references;
  return std::unique_ptr<MappedSegment>(std::make_unique<IpcImport>(api, key, open.ptr, size));
}

}  // namespace companion::memory
