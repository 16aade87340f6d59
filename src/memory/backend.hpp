// Memory backends: where a model's slab lives (host memfd, CUDA VMM, legacy CUDA IPC) and how a
// client process maps it. The server allocates and fills slabs; clients import segments.
#pragma once

#include <array>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "common/segment_kind.hpp"
#include "common/unique_fd.hpp"
#include "companion/result.hpp"

namespace companion::memory {

const char* segment_kind_name(SegmentKind kind) noexcept;

// One exported segment, ready to be sent in one reply.
struct SegmentExport {
  SegmentKind kind = SegmentKind::kHostMemfd;
  uint64_t size = 0;                                  // bytes the client maps
  UniqueFd fd;                                        // for kHostMemfd / kCudaVmmFd (a fresh dup)
  std::array<uint8_t, kIpcHandleBytes> ipc_handle{};  // for kCudaIpcHandle
};

// A model's memory: a few segments, written once by the loader, then sealed and shared.
class Slab {
 public:
  virtual ~Slab() = default;
  virtual SegmentKind kind() const noexcept = 0;
  virtual size_t segment_count() const noexcept = 0;
  virtual uint64_t segment_size(size_t segment) const noexcept = 0;
  uint64_t total_bytes() const noexcept {
    uint64_t total = 0;
    for (size_t i = 0; i < segment_count(); ++i) total += segment_size(i);
    return total;
  }

  // A host address the loader may write into directly (host backend), or nullptr when the memory
  // is not host-addressable (GPU backends: use write()).
  virtual void* host_address(size_t segment) noexcept = 0;
  // Copies host bytes into the slab. Synchronous: when it returns, src may be reused.
  virtual Result<void> write(size_t segment, uint64_t offset, const void* src, uint64_t bytes) = 0;
  // Copies bytes of the slab out into host memory (the host tier's offload), sealed or not.
  // Synchronous: when it returns, dst holds them. kInvalidArgument for a slab that cannot be
  // read back.
  virtual Result<void> read(size_t segment, uint64_t offset, void* dst, uint64_t bytes) {
    (void)segment, (void)offset, (void)dst, (void)bytes;
    return make_error(StatusCode::kInvalidArgument, "this slab cannot be read back");
  }
  // Bytes of a segment in host memory that is page-locked for DMA by the device the slab is
  // copied to (a host-tier copy registered with the driver), or nullptr: copies into device
  // memory may then read them directly, without staging. Read-only, valid while the slab lives.
  virtual const void* pinned_host_bytes(size_t segment) const noexcept {
    (void)segment;
    return nullptr;
  }
  // Ends writing: seals the memory so that clients can only read it. Exports need it done.
  // Host: kModelInUse while any process still has a writable mapping of it (a publisher that did
  // not drop its mapping), and the slab stays unsealed.
  virtual Result<void> seal() = 0;
  // New handles for one client (fds are dup'ed: the caller owns and closes them).
  virtual Result<std::vector<SegmentExport>> export_segments() = 0;
  // Handles for the one writer of a published slab, before seal(): the writer maps them with
  // import_segment(..., Access::kReadWrite). kInvalidArgument once sealed.
  virtual Result<std::vector<SegmentExport>> export_writable() = 0;
  // The digest of one segment's bytes as they are now: wsum64 (common/checksum.hpp) of the whole
  // segment, computed where the memory is (the CPU for host, the GPU for device memory).
  virtual Result<uint64_t> digest(size_t segment) = 0;
};

// What a device could still give to a new slab, and its size.
struct MemoryAvailability {
  uint64_t available = 0;
  uint64_t total = 0;
};

// Host memory page-locked for one device's DMA while this lives (see Backend::pin_host_range).
class PinnedHostRange {
 public:
  virtual ~PinnedHostRange() = default;
};

// Allocates slabs on one device.
class Backend {
 public:
  virtual ~Backend() = default;
  virtual std::string name() const = 0;  // "host" | "cuda-vmm" | "cuda-ipc"
  // Segment sizes are rounded up to this (page size, VMM granularity...).
  virtual uint64_t granularity() const noexcept = 0;
  // Largest single segment worth allocating; bigger models get several segments.
  virtual uint64_t max_segment_bytes() const noexcept = 0;
  // Allocates one slab with the given segment sizes (each a multiple of granularity()).
  // Out of memory gives kOutOfMemory.
  virtual Result<std::unique_ptr<Slab>> allocate(const std::vector<uint64_t>& segment_sizes,
                                                 const std::string& label) = 0;
  // Memory the device has free now (host: MemAvailable, or the room left under the process's
  // cgroup limit where lower; GPU: cuMemGetInfo's free). The server admits loads against it.
  // kUnavailable where the backend cannot tell: loads are then admitted unchecked.
  // True when allocate() takes the device memory at once (GPU backends, host memfds whose
  // pages are reserved with fallocate), so that available_bytes() shows it from then on; false
  // when pages are taken as they are written (host memfds where fallocate is not supported).
  virtual bool allocation_is_resident() const noexcept { return false; }
  virtual Result<MemoryAvailability> available_bytes() const {
    return make_error(StatusCode::kUnavailable, name() + " does not report free memory");
  }
  // Page-locks [data, data + bytes), a mapping of this process that outlives the result, for
  // direct copies between it and this backend's slabs (cuMemHostRegister; read_only for a
  // mapping without write access). kUnavailable where that gains nothing (host memory) or the
  // driver refuses: copies then go through staging.
  virtual Result<std::unique_ptr<PinnedHostRange>> pin_host_range(void* data, uint64_t bytes,
                                                                  bool read_only) const {
    (void)data, (void)bytes, (void)read_only;
    return make_error(StatusCode::kUnavailable, name() + " memory needs no page-locked host copy");
  }
  // Restart without reload: true when a slab's exported handles keep its memory alive after this
  // process is gone (host memfds, cuda-vmm shareable fds), so that a keeper holding them can hand
  // the memory to the next server. Legacy cuda-ipc memory dies with the process that made it.
  virtual bool handles_outlive_process() const noexcept { return false; }
  // A sealed slab made from the handles of one that an earlier server exported (export_segments
  // of its segments, in order): no copy, the same memory. Host: each fd must be a memfd still
  // carrying every seal, of the given size. cuda-vmm: imported on this backend's GPU. The caller
  // checks the bytes (Slab::digest) before serving them. kUnavailable where
  // handles_outlive_process() is false.
  virtual Result<std::unique_ptr<Slab>> adopt(std::vector<SegmentExport> segments,
                                              const std::string& label) const {
    (void)segments;
    (void)label;
    return make_error(StatusCode::kUnavailable, name() + " memory does not outlive its process");
  }
};

// A segment mapped into a client process. Unmapped on destruction.
class MappedSegment {
 public:
  virtual ~MappedSegment() = default;
  // Host pointer (host backend) or device pointer (CUDA backends) of the segment's first byte.
  virtual const void* address() const noexcept = 0;
  virtual uint64_t size() const noexcept = 0;
  virtual bool on_device() const noexcept = 0;
  // True while the mapping is writable (imported with Access::kReadWrite, before
  // make_read_only()).
  virtual bool writable() const noexcept = 0;
  // Drops write access in place: the address stays valid and reads see the same bytes (host:
  // the pages are mapped again read-only over the same range; cuda-vmm: cuMemSetAccess to
  // read-only). cuda-ipc cannot: legacy IPC mappings stay writable (kOk, writable() stays true).
  virtual Result<void> make_read_only() = 0;
};

// How a client maps a segment: readers read-only; the writer of a publication read-write.
enum class Access : uint8_t { kReadOnly, kReadWrite };

// Where a client maps device memory: the local ordinal of the server's GPU (the client resolves
// it by UUID), or -1 for host memory.
struct ImportTarget {
  int device_ordinal = -1;
};

// Maps one received segment (read-only unless access says otherwise). Takes ownership of the fd.
Result<std::unique_ptr<MappedSegment>> import_segment(SegmentExport segment,
                                                      const ImportTarget& target,
                                                      Access access = Access::kReadOnly);

}  // namespace companion::memory
