// The part of the cuda-vmm and cuda-ipc slabs and backends that does not depend on how device
// memory is allocated and shared.
#include "memory/cuda_device_slab.hpp"

#include <utility>

#include "common/log.hpp"
#include "common/util.hpp"

namespace companion::memory {

Error DeviceSlab::allocation_error(Error error, size_t index,
                                   const std::vector<uint64_t>& sizes) const {
  return cuda::with_context(std::move(error),
                            cuda::describe_allocation(backend_, label_, ordinal_, index, sizes));
}

Error DeviceSlab::slab_error(Error error, std::string_view doing) const {
  return cuda::with_context(std::move(error), std::string(backend_) + ": " + std::string(doing) +
                                                  " slab '" + label_ + "'");
}

Result<void> DeviceSlab::write(size_t segment, uint64_t offset, const void* src, uint64_t bytes) {
  COMPANION_TRY(cuda::check_write(label_, sealed_, segment, segments_.size(), segment_size(segment),
                                  offset, bytes));
  auto r = cuda::copy_to_device(ordinal_, segments_[segment].ptr + offset, src, bytes);
  if (!r.ok()) return slab_error(std::move(r).error(), "writing");
  return ok_result();
}

Result<void> DeviceSlab::read(size_t segment, uint64_t offset, void* dst, uint64_t bytes) {
  if (segment >= segments_.size() || offset > segments_[segment].size ||
      bytes > segments_[segment].size - offset) {
    return make_error(StatusCode::kInternal, std::string(backend_) +
                                                 ": read past the end of slab '" + label_ +
                                                 "' segment " + std::to_string(segment));
  }
  auto r = cuda::copy_to_host(ordinal_, dst, segments_[segment].ptr + offset, bytes);
  if (!r.ok()) return slab_error(std::move(r).error(), "reading");
  return ok_result();
}

Result<void> DeviceSlab::seal() {
  if (sealed_) return ok_result();
  auto r = cuda::synchronize_device(ordinal_);
  if (!r.ok()) return slab_error(std::move(r).error(), "sealing");
  COMPANION_TRY(export_new_segments());
  sealed_ = true;
  return ok_result();
}

Result<std::vector<SegmentExport>> DeviceSlab::export_segments() {
  if (!sealed_) {
    return make_error(StatusCode::kNotReady,
                      std::string(backend_) + ": slab '" + label_ + "' is not sealed yet");
  }
  return client_exports();
}

Result<std::vector<SegmentExport>> DeviceSlab::export_writable() {
  if (sealed_) {
    return make_error(StatusCode::kInvalidArgument,
                      std::string(backend_) + ": slab '" + label_ +
                          "' is sealed: it cannot be exported writable");
  }
  COMPANION_TRY(export_new_segments());
  return client_exports();
}

Result<uint64_t> DeviceSlab::digest(size_t segment) {
  if (segment >= segments_.size()) {
    return make_error(StatusCode::kInvalidArgument, std::string(backend_) + ": segment " +
                                                        std::to_string(segment) + " out of range");
  }
  std::lock_guard lock(checksum_mutex_);
  COMPANION_ASSIGN_OR_RETURN(auto scope, cuda::ScopedContext::enter(ordinal_));
  if (!checksum_) {
    COMPANION_ASSIGN_OR_RETURN(checksum_, DeviceChecksum::create(ordinal_));
  }
  auto sum = checksum_->run(segments_[segment].ptr, segments_[segment].size);
  if (!sum.ok()) return slab_error(std::move(sum).error(), "digest of");
  return sum;
}

Result<std::unique_ptr<Slab>> DeviceBackend::allocate(const std::vector<uint64_t>& segment_sizes,
                                                      const std::string& label) {
  COMPANION_TRY(cuda::check_segment_sizes(segment_sizes, granularity_, max_segment_bytes_, name_));
  COMPANION_ASSIGN_OR_RETURN(auto scope, cuda::ScopedContext::enter(ordinal_));
  // On failure the slab's destructor frees the segments allocated so far.
  std::unique_ptr<DeviceSlab> slab = new_slab(label);
  for (size_t i = 0; i < segment_sizes.size(); ++i) {
    COMPANION_TRY(slab->allocate_segment(segment_sizes));
  }
  log::debug(std::string(name_) + ": allocated slab '" + label + "' (" +
             format_bytes(slab->total_bytes()) + " in " + std::to_string(segment_sizes.size()) +
             " segment(s)) on GPU " + std::to_string(ordinal_));
  return std::unique_ptr<Slab>(std::move(slab));
}

Result<MemoryAvailability> DeviceBackend::available_bytes() const {
  COMPANION_ASSIGN_OR_RETURN(auto info, cuda::device_memory_info(ordinal_));
  return MemoryAvailability{info.first, info.second};
}

namespace {
class RegisteredHostRange final : public PinnedHostRange {
 public:
  explicit RegisteredHostRange(cuda::HostRegistration registration)
      : registration_(std::move(registration)) {}

 private:
  cuda::HostRegistration registration_;
};
}  // namespace

Result<std::unique_ptr<PinnedHostRange>> DeviceBackend::pin_host_range(void* data, uint64_t bytes,
                                                                       bool read_only) const {
  COMPANION_ASSIGN_OR_RETURN(auto registration,
                             cuda::HostRegistration::make(ordinal_, data, bytes, read_only));
  return std::unique_ptr<PinnedHostRange>(
      std::make_unique<RegisteredHostRange>(std::move(registration)));
}

}  // namespace companion::memory
