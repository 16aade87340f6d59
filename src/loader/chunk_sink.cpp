#include "loader/chunk_sink.hpp"

#include <vector>

#include "memory/cuda_driver.hpp"
#include "memory/cuda_slab.hpp"

namespace companion::loader {
namespace {

// Host slabs: the chunk is read straight into the slab's mapping.
class HostDirectSink final : public ChunkSink {
 public:
  explicit HostDirectSink(memory::Slab& slab) : slab_(slab) {}
  Result<void*> acquire(size_t segment, uint64_t offset, uint64_t bytes) override {
    if (offset + bytes > slab_.segment_size(segment))
      return make_error(StatusCode::kInternal, "chunk past the end of its segment");
    return static_cast<void*>(static_cast<char*>(slab_.host_address(segment)) + offset);
  }
  Result<void> commit() override { return ok_result(); }
  Result<void> finish() override { return ok_result(); }

 private:
  memory::Slab& slab_;
};

// Any other slab: a bounce buffer and Slab::write().
class WriteSink final : public ChunkSink {
 public:
  explicit WriteSink(memory::Slab& slab) : slab_(slab), buffer_(kSinkChunkBytes) {}
  Result<void*> acquire(size_t segment, uint64_t offset, uint64_t bytes) override {
    segment_ = segment;
    offset_ = offset;
    bytes_ = bytes;
    return static_cast<void*>(buffer_.data());
  }
  Result<void> commit() override { return slab_.write(segment_, offset_, buffer_.data(), bytes_); }
  Result<void> finish() override { return ok_result(); }

 private:
  memory::Slab& slab_;
  std::vector<char> buffer_;
  size_t segment_ = 0;
  uint64_t offset_ = 0;
  uint64_t bytes_ = 0;
};

// CUDA slabs: a small ring of pinned buffers, each with its own stream. While one buffer's copy
// runs, the next is being filled from the file; a buffer is reused once its stream has drained.
class CudaStagedSink final : public ChunkSink {
 public:
  static constexpr size_t kSlots = 4;  // 4 × 32 MiB of pinned staging per load

  static Result<std::unique_ptr<ChunkSink>> create(memory::Slab& slab, int ordinal) {
    auto sink = std::unique_ptr<CudaStagedSink>(new CudaStagedSink(slab));
    for (size_t i = 0; i < kSlots; ++i) {
      Slot slot;
      COMPANION_ASSIGN_OR_RETURN(
          slot.buffer, memory::cuda::PinnedHostBuffer::allocate(ordinal, kSinkChunkBytes));
      COMPANION_ASSIGN_OR_RETURN(slot.stream, memory::cuda::Stream::create(ordinal));
      sink->slots_.push_back(std::move(slot));
    }
    return std::unique_ptr<ChunkSink>(std::move(sink));
  }

  ~CudaStagedSink() override { (void)finish(); }

  Result<void*> acquire(size_t segment, uint64_t offset, uint64_t bytes) override {
    if (bytes > kSinkChunkBytes || offset + bytes > slab_.segment_size(segment))
      return make_error(StatusCode::kInternal, "chunk past the end of its segment");
    Slot& slot = slots_[next_];
    if (slot.busy) {
      COMPANION_TRY(slot.stream.synchronize());
      slot.busy = false;
    }
    COMPANION_ASSIGN_OR_RETURN(uint64_t base, memory::cuda_segment_device_pointer(slab_, segment));
    slot.device_dst = base + offset;
    slot.bytes = bytes;
    return slot.buffer.data();
  }

  Result<void> commit() override {
    Slot& slot = slots_[next_];
    COMPANION_TRY(
        slot.stream.copy_to_device_async(slot.device_dst, slot.buffer.data(), slot.bytes));
    slot.busy = true;
    next_ = (next_ + 1) % slots_.size();
    return ok_result();
  }

  Result<void> finish() override {
    Result<void> result;
    for (auto& slot : slots_) {
      if (!slot.busy) continue;
      auto r = slot.stream.synchronize();
      slot.busy = false;
      if (!r.ok() && result.ok()) result = std::move(r);
    }
    return result;
  }

 private:
  struct Slot {
    memory::cuda::PinnedHostBuffer buffer;
    memory::cuda::Stream stream;
    uint64_t device_dst = 0;
    uint64_t bytes = 0;
    bool busy = false;
  };
  explicit CudaStagedSink(memory::Slab& slab) : slab_(slab) {}

  memory::Slab& slab_;
  std::vector<Slot> slots_;
  size_t next_ = 0;
};

}  // namespace

Result<std::unique_ptr<ChunkSink>> make_chunk_sink(memory::Slab& slab) {
  bool host = slab.segment_count() > 0;
  for (size_t i = 0; i < slab.segment_count(); ++i) host = host && slab.host_address(i) != nullptr;
  if (host) return std::unique_ptr<ChunkSink>(std::make_unique<HostDirectSink>(slab));
  if (auto ordinal = memory::cuda_slab_device_ordinal(slab); ordinal.ok())
    return CudaStagedSink::create(slab, *ordinal);
  return std::unique_ptr<ChunkSink>(std::make_unique<WriteSink>(slab));
}

}  // namespace companion::loader
