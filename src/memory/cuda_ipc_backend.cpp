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
#include "memory/cuda_device_slab.hpp"
#include "memory/cuda_driver.hpp"

namespace companion::memory {
namespace {

constexpr const char* kBackendName = "cuda-ipc";
constexpr uint64_t kGranularity = uint64_t{2} << 20;  // alignment of segment sizes
constexpr uint64_t kMaxSegmentBytes = uint64_t{16} << 30;

static_assert(kIpcHandleBytes == cu::kIpcHandleSize);

class IpcSlab final : public DeviceSlab {
 public:
  IpcSlab(const cuda::DriverApi* api, int ordinal, std::string label)
      : DeviceSlab(api, ordinal, std::move(label), kBackendName) {}

  ~IpcSlab() override {
    if (segments().empty()) return;
    auto scope = cuda::ScopedContext::enter(ordinal_);
    if (!scope.ok()) {
      log::warn("cuda-ipc: cannot free slab '" + label_ + "': " + scope.error().message);
      return;
    }
    for (const auto& segment : segments()) {
      if (auto r = COMPANION_CU(*api_, cuMemFree, segment.ptr); !r.ok()) {
        log::warn("cuda-ipc: freeing slab '" + label_ + "': " + r.error().message);
      }
    }
    log::debug("cuda-ipc: freed slab '" + label_ + "'");
  }

  SegmentKind kind() const noexcept override { return SegmentKind::kCudaIpcHandle; }

  // cuMemAlloc: the only memory cuIpcGetMemHandle shares.
  Result<void> allocate_segment(const std::vector<uint64_t>& sizes) override {
    const size_t index = segments().size();
    cu::CUdeviceptr ptr = 0;
    auto r = COMPANION_CU(*api_, cuMemAlloc, &ptr, sizes[index]);
    if (!r.ok()) return allocation_error(std::move(r).error(), index, sizes);
    add_segment(ptr, sizes[index]);
    return ok_result();
  }

 private:
  // Legacy IPC has no read-only mappings: writers and readers get the same handles, and their
  // mappings are read-write (see import_cuda_ipc_segment).
  Result<void> export_new_segments() override {
    if (handles_.size() == segments().size()) return ok_result();
    COMPANION_ASSIGN_OR_RETURN(auto scope, cuda::ScopedContext::enter(ordinal_));
    for (size_t i = handles_.size(); i < segments().size(); ++i) {
      cu::CUipcMemHandle handle{};
      auto h = COMPANION_CU(*api_, cuIpcGetMemHandle, &handle, segments()[i].ptr);
      if (!h.ok()) return slab_error(std::move(h).error(), "exporting");
      handles_.push_back(handle);
    }
    return ok_result();
  }

  Result<std::vector<SegmentExport>> client_exports() override {
    std::vector<SegmentExport> exports;
    exports.reserve(segments().size());
    for (size_t i = 0; i < segments().size(); ++i) {
      SegmentExport e;
      e.kind = SegmentKind::kCudaIpcHandle;
      e.size = segments()[i].size;
      std::memcpy(e.ipc_handle.data(), handles_[i].reserved, kIpcHandleBytes);
      exports.push_back(std::move(e));
    }
    return exports;
  }

  std::vector<cu::CUipcMemHandle> handles_;  // taken at seal() or export_writable()
};

class IpcBackend final : public DeviceBackend {
 public:
  IpcBackend(const cuda::DriverApi* api, int ordinal)
      : DeviceBackend(api, ordinal, kBackendName, kGranularity, kMaxSegmentBytes) {}

 private:
  std::unique_ptr<DeviceSlab> new_slab(const std::string& label) const override {
    return std::make_unique<IpcSlab>(api_, ordinal_, label);
  }
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
