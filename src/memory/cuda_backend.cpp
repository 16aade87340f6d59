// Placeholder until the CUDA driver table lands: every CUDA entry point reports kUnavailable.
#include "memory/cuda_backend.hpp"

namespace companion::memory {
namespace {
Error unavailable() { return make_error(StatusCode::kUnavailable, "CUDA backends are not built yet"); }
}  // namespace
Result<void> cuda_available() { return unavailable(); }
Result<std::vector<GpuIdentity>> list_gpus() { return unavailable(); }
Result<GpuIdentity> resolve_gpu(const std::string&) { return unavailable(); }
Result<std::unique_ptr<Backend>> make_cuda_vmm_backend(int) { return unavailable(); }
Result<std::unique_ptr<Backend>> make_cuda_ipc_backend(int) { return unavailable(); }
Result<std::unique_ptr<MappedSegment>> import_cuda_vmm_segment(UniqueFd, uint64_t, int) {
  return unavailable();
}
Result<std::unique_ptr<MappedSegment>> import_cuda_ipc_segment(
    const std::array<uint8_t, kIpcHandleBytes>&, uint64_t, int) {
  return unavailable();
}
}  // namespace companion::memory
