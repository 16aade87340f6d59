// Client side: maps a received segment with the importer of its kind.
#include "memory/cuda_backend.hpp"
#include "memory/host_backend.hpp"

namespace companion::memory {

const char* segment_kind_name(SegmentKind kind) noexcept {
  switch (kind) {
    case SegmentKind::kHostMemfd:
      return "host-memfd";
    case SegmentKind::kCudaVmmFd:
      return "cuda-vmm-fd";
    case SegmentKind::kCudaIpcHandle:
      return "cuda-ipc-handle";
  }
  return "?";
}

Result<std::unique_ptr<MappedSegment>> import_segment(SegmentExport segment,
                                                      const ImportTarget& target, Access access) {
  switch (segment.kind) {
    case SegmentKind::kHostMemfd:
      return import_host_segment(std::move(segment.fd), segment.size, access);
    case SegmentKind::kCudaVmmFd:
      return import_cuda_vmm_segment(std::move(segment.fd), segment.size, target.device_ordinal,
                                     access);
    case SegmentKind::kCudaIpcHandle:
      // Legacy IPC mappings are read-write whatever access asks for.
      return import_cuda_ipc_segment(segment.ipc_handle, segment.size, target.device_ordinal);
  }
  return make_error(StatusCode::kProtocolError, "unknown segment kind");
}

}  // namespace companion::memory
