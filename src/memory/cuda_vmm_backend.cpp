// cuda-vmm: each segment is one cuMemCreate allocation exportable as a POSIX fd. The server maps it
// read-write in its own address space to fill it; clients import the fd and map it read-only.
#include <fcntl.h>

#include <cerrno>

#include <cstdint>
#include <memory>
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

constexpr const char* kBackendName = "cuda-vmm";
constexpr uint64_t kMaxSegmentBytes = uint64_t{16} << 30;

cu::CUmemAllocationProp allocation_prop(int ordinal) {
  cu::CUmemAllocationProp prop{};
  prop.type = cu::kMemAllocationTypePinned;
  prop.requestedHandleTypes = cu::kMemHandleTypePosixFileDescriptor;
  prop.location.type = cu::kMemLocationTypeDevice;
  prop.location.id = ordinal;
  return prop;
}

cu::CUmemAccessDesc access(int ordinal, cu::CUmemAccessFlags flags) {
  cu::CUmemAccessDesc desc{};
  desc.location.type = cu::kMemLocationTypeDevice;
  desc.location.id = ordinal;
  desc.flags = flags;
  return desc;
}

// One allocation mapped at one address range; each step recorded so a partial one unwinds.
struct VmmMapping {
  cu::CUmemGenericAllocationHandle handle = 0;
  cu::CUdeviceptr va = 0;
  uint64_t size = 0;
  bool mapped = false;

  // Needs the device's context current. Errors are logged: nothing else to do with them.
  void release(const cuda::DriverApi& api) noexcept {
    if (mapped) {
      if (auto r = COMPANION_CU(api, cuMemUnmap, va, size); !r.ok()) log::warn(r.error().message);
      mapped = false;
    }
    if (va != 0) {
      if (auto r = COMPANION_CU(api, cuMemAddressFree, va, size); !r.ok()) {
        log::warn(r.error().message);
      }
      va = 0;
    }
    if (handle != 0) {
      if (auto r = COMPANION_CU(api, cuMemRelease, handle); !r.ok()) log::warn(r.error().message);
      handle = 0;
    }
  }

  // Reserves an address range for the allocation, maps it and grants the device `flags` access.
  Result<void> map(const cuda::DriverApi& api, int ordinal, uint64_t alignment,
                   cu::CUmemAccessFlags flags) {
    cu::CUdeviceptr ptr = 0;
    COMPANION_TRY(COMPANION_CU(api, cuMemAddressReserve, &ptr, size, alignment, 0, 0));
    va = ptr;
    COMPANION_TRY(COMPANION_CU(api, cuMemMap, va, size, 0, handle, 0));
    mapped = true;
    const cu::CUmemAccessDesc desc = access(ordinal, flags);
    COMPANION_TRY(COMPANION_CU(api, cuMemSetAccess, va, size, &desc, 1));
    return ok_result();
  }
};

class VmmSlab final : public DeviceSlab {
 public:
  VmmSlab(const cuda::DriverApi* api, int ordinal, std::string label, uint64_t granularity)
      : DeviceSlab(api, ordinal, std::move(label), kBackendName), granularity_(granularity) {}

  ~VmmSlab() override {
    if (mappings_.empty()) return;
    auto scope = cuda::ScopedContext::enter(ordinal_);
    if (!scope.ok()) {
      log::warn("cuda-vmm: cannot free slab '" + label_ + "': " + scope.error().message);
      return;
    }
    for (auto& mapping : mappings_) mapping.release(*api_);
    log::debug("cuda-vmm: freed slab '" + label_ + "'");
  }

  SegmentKind kind() const noexcept override { return SegmentKind::kCudaVmmFd; }

  // A segment of an earlier server's slab, from its shareable fd (held by the keeper meanwhile):
  // imported and mapped read-write for this server (digests run over its own mapping), the fd
  // kept as the one clients' exports are dup'ed from. Needs the device's context current.
  Result<void> adopt_segment(UniqueFd fd, uint64_t size) {
    if (size == 0 || size % granularity_ != 0)
      return make_error(StatusCode::kProtocolError,
                        "cuda-vmm: a kept segment of " + std::to_string(size) +
                            " bytes is not a multiple of the granularity");
    VmmMapping& mapping = mappings_.emplace_back();
    mapping.size = size;
    cu::CUmemGenericAllocationHandle handle = 0;
    auto r = COMPANION_CU(*api_, cuMemImportFromShareableHandle, &handle,
                          reinterpret_cast<void*>(static_cast<intptr_t>(fd.get())),
                          cu::kMemHandleTypePosixFileDescriptor);
    if (r.ok()) {
      mapping.handle = handle;
      r = mapping.map(*api_, ordinal_, granularity_, cu::kMemAccessFlagsProtReadWrite);
    }
    if (!r.ok()) return slab_error(std::move(r).error(), "adopting a kept segment of");
    add_segment(mapping.va, mapping.size);
    exported_.push_back(std::move(fd));
    return ok_result();
  }

  // cuMemCreate, mapped read-write for the server.
  Result<void> allocate_segment(const std::vector<uint64_t>& sizes) override {
    const size_t index = mappings_.size();
    VmmMapping& mapping = mappings_.emplace_back();
    mapping.size = sizes[index];
    const cu::CUmemAllocationProp prop = allocation_prop(ordinal_);
    cu::CUmemGenericAllocationHandle handle = 0;
    auto created = COMPANION_CU(*api_, cuMemCreate, &handle, mapping.size, &prop, 0);
    if (created.ok()) {
      mapping.handle = handle;
      created = mapping.map(*api_, ordinal_, granularity_, cu::kMemAccessFlagsProtReadWrite);
    }
    if (!created.ok()) return allocation_error(std::move(created).error(), index, sizes);
    add_segment(mapping.va, mapping.size);
    return ok_result();
  }

 private:
  // One shareable fd per segment: every client (and the writer) gets a dup of it (cheap) instead
  // of a new cuMemExportToShareableHandle call on the attach path.
  Result<void> export_new_segments() override {
    if (exported_.size() == mappings_.size()) return ok_result();
    COMPANION_ASSIGN_OR_RETURN(auto scope, cuda::ScopedContext::enter(ordinal_));
    for (size_t i = exported_.size(); i < mappings_.size(); ++i) {
      int fd = -1;
      auto e = COMPANION_CU(*api_, cuMemExportToShareableHandle, &fd, mappings_[i].handle,
                            cu::kMemHandleTypePosixFileDescriptor, 0);
      if (!e.ok()) return slab_error(std::move(e).error(), "exporting");
      // Never leak segment fds into processes the server starts.
      if (int flags = ::fcntl(fd, F_GETFD); flags >= 0) ::fcntl(fd, F_SETFD, flags | FD_CLOEXEC);
      exported_.emplace_back(fd);
    }
    return ok_result();
  }

  Result<std::vector<SegmentExport>> client_exports() override {
    std::vector<SegmentExport> exports;
    exports.reserve(mappings_.size());
    for (size_t i = 0; i < mappings_.size(); ++i) {
      SegmentExport e;
      e.kind = SegmentKind::kCudaVmmFd;
      e.size = mappings_[i].size;
      e.fd.reset(::fcntl(exported_[i].get(), F_DUPFD_CLOEXEC, 0));
      if (!e.fd)
        return errno_error(StatusCode::kInternal, "cuda-vmm: dup of an exported fd", errno);
      exports.push_back(std::move(e));
    }
    return exports;
  }

  const uint64_t granularity_;
  std::vector<VmmMapping> mappings_;  // one per segment (the last may be partly made)
  std::vector<UniqueFd> exported_;    // one shareable fd per segment, made at seal() or before
};

class VmmBackend final : public DeviceBackend {
 public:
  VmmBackend(const cuda::DriverApi* api, int ordinal, uint64_t granularity)
      : DeviceBackend(api, ordinal, kBackendName, granularity, kMaxSegmentBytes) {}

  bool handles_outlive_process() const noexcept override { return true; }
  Result<std::unique_ptr<Slab>> adopt(std::vector<SegmentExport> segments,
                                      const std::string& label) const override {
    COMPANION_ASSIGN_OR_RETURN(auto scope, cuda::ScopedContext::enter(ordinal_));
    auto slab = std::make_unique<VmmSlab>(api_, ordinal_, label, granularity());
    for (auto& segment : segments) {
      if (segment.kind != SegmentKind::kCudaVmmFd || !segment.fd)
        return make_error(StatusCode::kProtocolError, "kept segment is not a cuda-vmm fd");
      COMPANION_TRY(slab->adopt_segment(std::move(segment.fd), segment.size));
    }
    // Synchronises and marks the slab sealed; every segment already has its exported fd.
    COMPANION_TRY(slab->seal());
    return std::unique_ptr<Slab>(std::move(slab));
  }

 private:
  std::unique_ptr<DeviceSlab> new_slab(const std::string& label) const override {
    return std::make_unique<VmmSlab>(api_, ordinal_, label, granularity());
  }
};

// A client's read-only mapping of an imported segment.
class VmmImport final : public MappedSegment {
 public:
  VmmImport(const cuda::DriverApi* api, int ordinal, uint64_t size, bool writable)
      : api_(api), ordinal_(ordinal), writable_(writable) {
    mapping_.size = size;
  }
  ~VmmImport() override {
    auto scope = cuda::ScopedContext::enter(ordinal_);
    if (!scope.ok()) {
      log::warn("cuda-vmm: cannot unmap a segment: " + scope.error().message);
      return;
    }
    mapping_.release(*api_);
  }

  VmmMapping& mapping() noexcept { return mapping_; }
  const void* address() const noexcept override {
    return reinterpret_cast<const void*>(static_cast<uintptr_t>(mapping_.va));
  }
  uint64_t size() const noexcept override { return mapping_.size; }
  bool on_device() const noexcept override { return true; }
  bool writable() const noexcept override { return writable_; }

  // The same mapping, read-only from now on (writes through it fault).
  Result<void> make_read_only() override {
    if (!writable_) return ok_result();
    COMPANION_ASSIGN_OR_RETURN(auto scope, cuda::ScopedContext::enter(ordinal_));
    // Writes queued through the mapping land before the access changes.
    COMPANION_TRY(COMPANION_CU(*api_, cuCtxSynchronize));
    const cu::CUmemAccessDesc desc = access(ordinal_, cu::kMemAccessFlagsProtRead);
    auto r = COMPANION_CU(*api_, cuMemSetAccess, mapping_.va, mapping_.size, &desc, 1);
    if (!r.ok()) {
      return cuda::with_context(std::move(r).error(), "cuda-vmm: making a mapping read-only");
    }
    writable_ = false;
    return ok_result();
  }

 private:
  const cuda::DriverApi* api_;
  int ordinal_;
  bool writable_;
  VmmMapping mapping_;
};

}  // namespace

Result<std::unique_ptr<Backend>> make_cuda_vmm_backend(int ordinal) {
  COMPANION_ASSIGN_OR_RETURN(const cuda::DriverApi* api, cuda::driver());
  COMPANION_ASSIGN_OR_RETURN(GpuSupport support, gpu_support(ordinal));
  if (!support.virtual_memory || !support.posix_fd_export) {
    return make_error(
        StatusCode::kUnavailable,
        "GPU " + std::to_string(ordinal) +
            (!support.virtual_memory ? " does not support CUDA virtual memory management"
                                     : " cannot export memory as POSIX file descriptors") +
            ": use the cuda-ipc backend");
  }
  COMPANION_ASSIGN_OR_RETURN(auto scope, cuda::ScopedContext::enter(ordinal));
  COMPANION_ASSIGN_OR_RETURN(uint64_t granularity, cuda::vmm_granularity(ordinal));
  return std::unique_ptr<Backend>(std::make_unique<VmmBackend>(api, ordinal, granularity));
}

Result<std::unique_ptr<MappedSegment>> import_cuda_vmm_segment(UniqueFd fd, uint64_t size,
                                                               int ordinal, Access access) {
  COMPANION_ASSIGN_OR_RETURN(const cuda::DriverApi* api, cuda::driver());
  COMPANION_TRY(cuda::check_ordinal(*api, ordinal));
  if (!fd) return make_error(StatusCode::kInvalidArgument, "cuda-vmm: import without an fd");
  COMPANION_ASSIGN_OR_RETURN(auto scope, cuda::ScopedContext::enter(ordinal));
  COMPANION_ASSIGN_OR_RETURN(uint64_t granularity, cuda::vmm_granularity(ordinal));
  if (size == 0 || size % granularity != 0) {
    return make_error(StatusCode::kInvalidArgument,
                      "cuda-vmm: segment size " + std::to_string(size) +
                          " is not a multiple of GPU " + std::to_string(ordinal) +
                          "'s granularity " + std::to_string(granularity));
  }
  const bool writable = access == Access::kReadWrite;
  auto segment = std::make_unique<VmmImport>(api, ordinal, size, writable);
  VmmMapping& mapping = segment->mapping();
  cu::CUmemGenericAllocationHandle handle = 0;
  auto r = COMPANION_CU(*api, cuMemImportFromShareableHandle, &handle,
                        reinterpret_cast<void*>(static_cast<intptr_t>(fd.get())),
                        cu::kMemHandleTypePosixFileDescriptor);
  fd.reset();  // the allocation handle keeps the memory alive; the fd is no longer needed
  if (r.ok()) {
    mapping.handle = handle;
    r = mapping.map(*api, ordinal, granularity,
                    writable ? cu::kMemAccessFlagsProtReadWrite : cu::kMemAccessFlagsProtRead);
  }
  if (!r.ok()) {
    return cuda::with_context(std::move(r).error(), "cuda-vmm: importing a " + format_bytes(size) +
                                                        " segment on GPU " +
                                                        std::to_string(ordinal));
  }
  return std::unique_ptr<MappedSegment>(std::move(segment));
}

}  // namespace companion::memory
