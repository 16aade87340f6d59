// What the cuda-vmm and cuda-ipc backends share: a slab of device segments that the server fills
// with synchronous copies, digests on the GPU, seals (device synchronised) and exports, and a
// backend that allocates such slabs segment by segment. Each backend adds only how a segment is
// allocated, freed and exported (cuda_vmm_backend.cpp, cuda_ipc_backend.cpp).
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "companion/result.hpp"
#include "memory/backend.hpp"
#include "memory/cuda_checksum.hpp"
#include "memory/cuda_driver.hpp"
#include "memory/cuda_slab.hpp"

namespace companion::memory {

class DeviceSlab : public CudaSlab {
 public:
  // backend: the backend's name, for messages ("cuda-vmm"); a string literal.
  DeviceSlab(const cuda::DriverApi* api, int ordinal, std::string label, const char* backend)
      : api_(api), ordinal_(ordinal), label_(std::move(label)), backend_(backend) {}

  // Allocates segment number segment_count() (of sizes.size()) in the device's memory, the
  // context current, and records it with add_segment(). On failure the derived destructor frees
  // what was allocated so far.
  virtual Result<void> allocate_segment(const std::vector<uint64_t>& sizes) = 0;

  size_t segment_count() const noexcept final { return segments_.size(); }
  uint64_t segment_size(size_t segment) const noexcept final {
    return segment < segments_.size() ? segments_[segment].size : 0;
  }
  void* host_address(size_t) noexcept final { return nullptr; }
  int device_ordinal() const noexcept final { return ordinal_; }
  uint64_t device_pointer(size_t segment) const noexcept final {
    return segment < segments_.size() ? segments_[segment].ptr : 0;
  }

  // cuMemcpyHtoD into the server's own read-write mapping of the segment.
  Result<void> write(size_t segment, uint64_t offset, const void* src, uint64_t bytes) final;
  // cuMemcpyDtoH from the server's own mapping of the segment.
  Result<void> read(size_t segment, uint64_t offset, void* dst, uint64_t bytes) final;
  // Every copy into the slab has landed (the device is synchronised); the segments are exported.
  // The server's own mapping stays read-write: clients' mappings are what the backends restrict.
  Result<void> seal() final;
  Result<std::vector<SegmentExport>> export_segments() final;
  Result<std::vector<SegmentExport>> export_writable() final;
  // On the GPU, in the server's context, over the server's own mapping.
  Result<uint64_t> digest(size_t segment) final;

 protected:
  struct Segment {
    cu::CUdeviceptr ptr = 0;  // in the server's primary context
    uint64_t size = 0;
  };
  // Records a segment that allocate_segment() made, in order.
  void add_segment(cu::CUdeviceptr ptr, uint64_t size) { segments_.push_back(Segment{ptr, size}); }
  const std::vector<Segment>& segments() const noexcept { return segments_; }
  // The error of a failed allocation of segment index, with the slab and the device's free memory.
  Error allocation_error(Error error, size_t index, const std::vector<uint64_t>& sizes) const;
  // The error of a failed driver call, prefixed with what the slab was doing ("exporting").
  Error slab_error(Error error, std::string_view doing) const;

  // Makes the shareable handles of the segments that have none yet, once per segment (the
  // handles never change: made once, not on every attach). Called by seal() and
  // export_writable().
  virtual Result<void> export_new_segments() = 0;
  // One SegmentExport per segment, for one client, from the handles made above.
  virtual Result<std::vector<SegmentExport>> client_exports() = 0;

  const cuda::DriverApi* api_;
  const int ordinal_;
  const std::string label_;
  const char* const backend_;

 private:
  std::vector<Segment> segments_;
  bool sealed_ = false;
  std::mutex checksum_mutex_;                 // digest(): one kernel and result buffer
  std::unique_ptr<DeviceChecksum> checksum_;  // made by the first digest()
};

// Allocates DeviceSlabs on one GPU.
class DeviceBackend : public Backend {
 public:
  DeviceBackend(const cuda::DriverApi* api, int ordinal, const char* name, uint64_t granularity,
                uint64_t max_segment_bytes)
      : api_(api),
        ordinal_(ordinal),
        name_(name),
        granularity_(granularity),
        max_segment_bytes_(max_segment_bytes) {}

  std::string name() const final { return name_; }
  uint64_t granularity() const noexcept final { return granularity_; }
  uint64_t max_segment_bytes() const noexcept final { return max_segment_bytes_; }
  Result<std::unique_ptr<Slab>> allocate(const std::vector<uint64_t>& segment_sizes,
                                         const std::string& label) final;
  bool allocation_is_resident() const noexcept final { return true; }
  // cuMemGetInfo's free memory of the device.
  Result<MemoryAvailability> available_bytes() const final;
  Result<std::unique_ptr<PinnedHostRange>> pin_host_range(void* data, uint64_t bytes,
                                                          bool read_only) const final;

 protected:
  // An empty slab of this backend.
  virtual std::unique_ptr<DeviceSlab> new_slab(const std::string& label) const = 0;

  const cuda::DriverApi* api_;
  const int ordinal_;

 private:
  const char* const name_;
  const uint64_t granularity_;
  const uint64_t max_segment_bytes_;
};

}  // namespace companion::memory
