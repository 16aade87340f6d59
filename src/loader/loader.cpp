#include "loader/loader.hpp"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <memory>

#include "checkpoint/dtype_convert.hpp"
#include "common/unique_fd.hpp"
#include "loader/chunk_sink.hpp"

namespace companion::loader {
namespace {

bool is_cast(const TensorCopy& t) {
  return t.source.dtype != t.target_dtype;
}

// Reads exactly `bytes` at `offset`, or fails.
Result<void> pread_exact(int fd, const std::string& path, void* dst, uint64_t bytes,
                         uint64_t offset) {
  auto* out = static_cast<char*>(dst);
  while (bytes > 0) {
    ssize_t n = ::pread(fd, out, bytes, static_cast<off_t>(offset));
    if (n < 0) {
      if (errno == EINTR) continue;
      return errno_error(StatusCode::kIoError, "read " + path, errno);
    }
    if (n == 0)
      return make_error(StatusCode::kBadCheckpoint,
                        path + " ended early (changed or truncated while loading)");
    out += n;
    bytes -= static_cast<uint64_t>(n);
    offset += static_cast<uint64_t>(n);
  }
  return ok_result();
}

}  // namespace

Result<LoadPlan> make_load_plan(const checkpoint::Checkpoint& ckpt, std::optional<DType> cast_to,
                                const memory::Backend& backend) {
  LoadPlan plan;
  plan.files = ckpt.files;
  std::vector<uint64_t> sizes;
  sizes.reserve(ckpt.tensors.size());
  for (const auto& t : ckpt.tensors) {
    TensorCopy copy;
    copy.source = t;
    copy.target_dtype = t.dtype;
    if (cast_to && dtype_is_float_convertible(t.dtype)) copy.target_dtype = *cast_to;
    copy.target_shape = t.shape;
    copy.target_bytes = t.nbytes / dtype_size(t.dtype) * dtype_size(copy.target_dtype);
    if (t.nbytes > 0) copy.extents.push_back(ReadExtent{t.file_offset, t.nbytes, 0});
    sizes.push_back(copy.target_bytes);
    plan.bytes_to_read += t.nbytes;
    plan.tensors.push_back(std::move(copy));
  }
  COMPANION_ASSIGN_OR_RETURN(
      SlabLayout layout,
      plan_layout(sizes, kTensorAlignment, backend.granularity(), backend.max_segment_bytes()));
  for (size_t i = 0; i < plan.tensors.size(); ++i) plan.tensors[i].placement = layout.placements[i];
  plan.segment_sizes = std::move(layout.segment_sizes);
  return plan;
}

Result<void> load_into_slab(const LoadPlan& plan, memory::Slab& slab, const ProgressFn& progress,
                            const std::atomic<bool>& cancel) {
  std::vector<UniqueFd> files;
  for (const auto& path : plan.files) {
    UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
    if (!fd) return errno_error(StatusCode::kIoError, "open " + path, errno);
    files.push_back(std::move(fd));
  }
  COMPANION_ASSIGN_OR_RETURN(std::unique_ptr<ChunkSink> sink, make_chunk_sink(slab));
  std::unique_ptr<char[]> bounce;  // source bytes of a tensor being cast
  uint64_t done = 0;
  for (const auto& t : plan.tensors) {
    const std::string& path = plan.files[t.source.file_index];
    int fd = files[t.source.file_index].get();
    size_t in_size = dtype_size(t.source.dtype);
    size_t out_size = dtype_size(t.target_dtype);
    // Chunks hold whole elements on both sides and fit a sink chunk after casting.
    uint64_t chunk = kSinkChunkBytes / std::max(in_size, out_size) * in_size;
    for (const ReadExtent& e : t.extents) {
      for (uint64_t pos = 0; pos < e.bytes; pos += chunk) {
        if (cancel.load(std::memory_order_relaxed))
          return make_error(StatusCode::kCancelled, "load cancelled");
        uint64_t n = std::min(chunk, e.bytes - pos);
        uint64_t count = n / in_size;
        uint64_t dst_offset = t.placement.offset + e.dst_offset + pos / in_size * out_size;
        COMPANION_ASSIGN_OR_RETURN(
            void* dst, sink->acquire(t.placement.segment, dst_offset, count * out_size));
        if (!is_cast(t)) {
          COMPANION_TRY(pread_exact(fd, path, dst, n, e.file_offset + pos));
        } else {
          if (!bounce) bounce = std::make_unique<char[]>(kSinkChunkBytes);
          COMPANION_TRY(pread_exact(fd, path, bounce.get(), n, e.file_offset + pos));
          COMPANION_TRY(checkpoint::convert_elements(t.source.dtype, t.target_dtype, bounce.get(),
                                                     dst, count));
        }
        COMPANION_TRY(sink->commit());
        done += n;
        if (progress) progress(done, plan.bytes_to_read);
      }
    }
  }
  COMPANION_TRY(sink->finish());
  if (progress) progress(done, plan.bytes_to_read);
  return ok_result();
}

}  // namespace companion::loader
