// CUDA backends (cuda-vmm, cuda-ipc) and GPU identity. The driver is reached through
// dlopen("libcuda.so.1"): on a machine without a driver every call here returns kUnavailable.
#pragma once

#include <array>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "memory/backend.hpp"

namespace companion::memory {

struct GpuIdentity {
  int ordinal = -1;        // local ordinal in this process (depends on CUDA_VISIBLE_DEVICES)
  std::string uuid;        // "GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx", stable across processes
  std::string pci_bus_id;  // "0000:3b:00.0"
  std::string name;        // "NVIDIA H100 80GB HBM3"
  uint64_t total_memory = 0;
};

// Ok when libcuda.so.1 loads and cuInit succeeds; kUnavailable with the reason otherwise.
Result<void> cuda_available();
Result<std::vector<GpuIdentity>> list_gpus();
// Accepts an ordinal ("0"), a UUID ("GPU-…", case-insensitive, the "GPU-" prefix optional) or a
// PCI bus id ("0000:3b:00.0" or "3b:00.0"). kNotFound when no visible GPU matches.
Result<GpuIdentity> resolve_gpu(const std::string& device);

// The driver's CUDA version (cuDriverGetVersion: 13000 for CUDA 13.0).
Result<int> cuda_driver_version();
// The NVIDIA kernel module's version ("580.159.04", what nvidia-smi calls the driver version),
// read from /proc/driver/nvidia/version; nullopt where that file is missing or unreadable.
std::optional<std::string> nvidia_driver_release();
// What a GPU offers the backends: cuda-vmm needs both (virtual memory management, and exporting
// memory as POSIX file descriptors); cuda-ipc works without them.
struct GpuSupport {
  bool virtual_memory = false;
  bool posix_fd_export = false;
};
Result<GpuSupport> gpu_support(int ordinal);

// Server side. ordinal is the local ordinal of the GPU to allocate on.
Result<std::unique_ptr<Backend>> make_cuda_vmm_backend(int ordinal);
Result<std::unique_ptr<Backend>> make_cuda_ipc_backend(int ordinal);

// Client side: map a received segment read-only on the local ordinal (cuda-vmm: read-write with
// Access::kReadWrite, for the writer of a published slab; legacy IPC mappings are always
// read-write).
Result<std::unique_ptr<MappedSegment>> import_cuda_vmm_segment(UniqueFd fd, uint64_t size,
                                                               int ordinal,
                                                               Access access = Access::kReadOnly);
Result<std::unique_ptr<MappedSegment>> import_cuda_ipc_segment(
    const std::array<uint8_t, kIpcHandleBytes>& handle, uint64_t size, int ordinal);

}  // namespace companion::memory
