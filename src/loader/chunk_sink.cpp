#include "loader/chunk_sink.hpp"

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <deque>
#include <functional>
#include <mutex>
#include <optional>
#include <thread>
#include <utility>
#include <vector>

#include "common/log.hpp"
#include "common/util.hpp"
#include "memory/cuda_driver.hpp"
#include "memory/cuda_slab.hpp"

namespace companion::loader {
namespace {

using Clock = std::chrono::steady_clock;

// Pinned staging kept between loads, per GPU (see PinnedCache).
constexpr uint64_t kKeptStagingBytes = 256ull << 20;

// A bounded set of staging buffers, allocated on demand, one at a time. acquire() blocks while
// every buffer is taken; put() recycles one. The first failure (an asynchronous copy, say) is kept
// and returned by every later acquire().
class StagingPool {
 public:
  using Allocate = std::function<Result<std::unique_ptr<StagingBuffer>>()>;
  // Where the buffers go when the pool is destroyed (by default: freed).
  using Recycle = std::function<void(std::unique_ptr<StagingBuffer>)>;

  StagingPool(size_t max_buffers, Allocate allocate, Recycle recycle = nullptr)
      : max_(std::max<size_t>(1, max_buffers)),
        allocate_(std::move(allocate)),
        recycle_(std::move(recycle)) {}
  ~StagingPool() {
    if (!recycle_) return;
    for (auto& buffer : all_) recycle_(std::move(buffer));
  }
  StagingPool(const StagingPool&) = delete;
  StagingPool& operator=(const StagingPool&) = delete;

  Result<StagingBuffer*> acquire(const std::atomic<bool>& stop) {
    std::unique_lock lock(mutex_);
    for (;;) {
      if (error_) return *error_;
      if (stop.load(std::memory_order_relaxed)) return static_cast<StagingBuffer*>(nullptr);
      if (!free_.empty()) {
        StagingBuffer* buffer = free_.back();
        free_.pop_back();
        return take(buffer);
      }
      // One allocation at a time: pinning memory does not get faster with more threads, and the
      // first readers get their buffers sooner this way.
      if (allocating_ == 0 && all_.size() < max_) {
        ++allocating_;
        lock.unlock();
        auto start = Clock::now();
        auto made = allocate_();
        double seconds = std::chrono::duration<double>(Clock::now() - start).count();
        lock.lock();
        --allocating_;
        alloc_seconds_ += seconds;
        if (made.ok()) {
          if ((*made)->reused) ++reused_;
          all_.push_back(std::move(made).value());
          return take(all_.back().get());
        }
        if (all_.empty() && allocating_ == 0) return std::move(made).error();
        // Make do with the buffers there are (pinned memory may be scarce).
        if (max_ > all_.size() + allocating_) {
          log::warn("staging buffer allocation failed, continuing with " +
                    std::to_string(all_.size() + allocating_) +
                    " buffer(s): " + made.error().message);
          max_ = std::max<size_t>(1, all_.size() + allocating_);
        }
        cv_.notify_all();
        continue;
      }
      cv_.wait(lock);
    }
  }

  void put(StagingBuffer* buffer) {
    {
      std::lock_guard lock(mutex_);
      free_.push_back(buffer);
      --in_use_;
    }
    cv_.notify_one();
  }

  void wake() {
    std::lock_guard lock(mutex_);
    cv_.notify_all();
  }

  void fail(Error error) {
    std::lock_guard lock(mutex_);
    if (!error_) error_ = std::move(error);
    cv_.notify_all();
  }

  std::optional<Error> error() const {
    std::lock_guard lock(mutex_);
    return error_;
  }

  void fill(SinkStats& stats) const {
    std::lock_guard lock(mutex_);
    stats.max_buffers = max_;
    stats.buffers = all_.size();
    stats.reused = reused_;
    stats.peak_in_use = peak_;
    stats.alloc_seconds = alloc_seconds_;
  }

 private:
  StagingBuffer* take(StagingBuffer* buffer) {
    ++in_use_;
    peak_ = std::max(peak_, in_use_);
    return buffer;
  }

  mutable std::mutex mutex_;
  std::condition_variable cv_;
  size_t max_;
  Allocate allocate_;
  Recycle recycle_;
  std::vector<std::unique_ptr<StagingBuffer>> all_;
  size_t reused_ = 0;
  std::vector<StagingBuffer*> free_;
  size_t allocating_ = 0;
  size_t in_use_ = 0;
  size_t peak_ = 0;
  double alloc_seconds_ = 0;
  std::optional<Error> error_;
};

// Host slabs: readers write straight into the slab's mapping; no staging.
class HostDirectSink final : public ChunkSink {
 public:
  explicit HostDirectSink(memory::Slab& slab) : slab_(slab) {}
  const char* name() const noexcept override { return "host-direct"; }
  char* host_address(size_t segment) noexcept override {
    return static_cast<char*>(slab_.host_address(segment));
  }
  Result<StagingBuffer*> acquire(const std::atomic<bool>&) override {
    return make_error(StatusCode::kInternal, "host-direct sink has no staging buffers");
  }
  Result<void> submit(StagingBuffer*, const char*, std::span<const CopyOp>) override {
    return make_error(StatusCode::kInternal, "host-direct sink has no staging buffers");
  }
  void release(StagingBuffer*) override {}
  void wake() override {}
  Result<void> finish() override { return ok_result(); }
  SinkStats stats() const override {
    SinkStats s;
    s.name = name();
    return s;
  }

 private:
  memory::Slab& slab_;
};

struct HeapBuffer final : StagingBuffer {
  ~HeapBuffer() override { std::free(data); }
};

// Any other slab: bounded heap buffers and a synchronous Slab::write(). Writes are serialised
// (Slab::write() need not be thread-safe); reads still run in parallel.
class WriteSink final : public ChunkSink {
 public:
  WriteSink(memory::Slab& slab, const SinkOptions& options)
      : slab_(slab),
        stop_(options.stop),
        buffer_bytes_(staging_buffer_size(options.buffer_bytes)),
        pool_(options.max_buffers,
              [bytes = buffer_bytes_]() -> Result<std::unique_ptr<StagingBuffer>> {
                auto buffer = std::make_unique<HeapBuffer>();
                buffer->data = static_cast<char*>(std::aligned_alloc(kDirectAlign, bytes));
                if (buffer->data == nullptr)
                  return make_error(StatusCode::kOutOfMemory,
                                    "cannot allocate a staging buffer of " + format_bytes(bytes));
                buffer->capacity = bytes;
                return std::unique_ptr<StagingBuffer>(std::move(buffer));
              }) {}
  const char* name() const noexcept override { return "write"; }
  char* host_address(size_t) noexcept override { return nullptr; }
  Result<StagingBuffer*> acquire(const std::atomic<bool>& stop) override {
    return pool_.acquire(stop);
  }
  Result<void> submit(StagingBuffer* buffer, const char* base,
                      std::span<const CopyOp> ops) override {
    Result<void> result;
    {
      std::lock_guard lock(write_mutex_);
      for (const CopyOp& op : ops) {
        if (stop_ != nullptr && stop_->load(std::memory_order_relaxed)) {
          result = make_error(StatusCode::kCancelled, "load stopped");
          break;
        }
        result = slab_.write(op.segment, op.dst_offset, base + op.stage_offset, op.bytes);
        if (!result.ok()) break;
      }
    }
    pool_.put(buffer);
    return result;
  }
  void release(StagingBuffer* buffer) override { pool_.put(buffer); }
  void wake() override { pool_.wake(); }
  Result<void> finish() override { return ok_result(); }
  SinkStats stats() const override {
    SinkStats s;
    s.name = name();
    s.buffer_bytes = buffer_bytes_;
    pool_.fill(s);
    return s;
  }

 private:
  memory::Slab& slab_;
  const std::atomic<bool>* stop_;
  uint64_t buffer_bytes_;
  StagingPool pool_;
  std::mutex write_mutex_;
};

struct PinnedBuffer final : StagingBuffer {
  memory::cuda::PinnedHostBuffer pinned;          // either this
  memory::cuda::RegisteredHostBuffer registered;  // or this holds the memory
  memory::cuda::Event done;                       // recorded after the buffer's copies
};

// Pinned staging buffers outlive their load, up to kKeptStagingBytes per GPU, so that the next
// load skips pinning memory (2 to 4 GB/s on an H200: tens of milliseconds a load). Never destroyed:
// the driver may be gone when static destructors run.
class PinnedCache {
 public:
  static PinnedCache& instance() {
    static PinnedCache* cache = new PinnedCache;
    return *cache;
  }

  std::unique_ptr<PinnedBuffer> take(int ordinal, uint64_t capacity) {
    std::lock_guard lock(mutex_);
    for (auto it = kept_.begin(); it != kept_.end(); ++it) {
      if (it->ordinal != ordinal || it->buffer->capacity != capacity) continue;
      auto buffer = std::move(it->buffer);
      kept_.erase(it);
      return buffer;
    }
    return nullptr;
  }

  // Keeps the buffer, dropping the oldest ones of that GPU beyond the cap.
  void give(int ordinal, std::unique_ptr<PinnedBuffer> buffer) {
    std::vector<std::unique_ptr<PinnedBuffer>> dropped;  // freed outside the lock
    {
      std::lock_guard lock(mutex_);
      kept_.push_back(Kept{ordinal, std::move(buffer)});
      uint64_t kept = 0;
      for (const auto& k : kept_)
        if (k.ordinal == ordinal) kept += k.buffer->capacity;
      for (auto it = kept_.begin(); kept > kKeptStagingBytes && it != kept_.end();) {
        if (it->ordinal != ordinal) {
          ++it;
          continue;
        }
        kept -= it->buffer->capacity;
        dropped.push_back(std::move(it->buffer));
        it = kept_.erase(it);
      }
    }
  }

 private:
  struct Kept {
    int ordinal;
    std::unique_ptr<PinnedBuffer> buffer;
  };
  std::mutex mutex_;
  std::vector<Kept> kept_;
};

// A pinned staging buffer of `bytes` for GPU `ordinal`, from a huge-page mapping pinned with
// cuMemHostRegister (`registered`, falling back to cuMemHostAlloc) or cuMemHostAlloc.
Result<std::unique_ptr<PinnedBuffer>> allocate_pinned(int ordinal, uint64_t bytes,
                                                      bool registered) {
  auto buffer = std::make_unique<PinnedBuffer>();
  if (registered) {
    auto made = memory::cuda::RegisteredHostBuffer::allocate(ordinal, bytes);
    if (made.ok()) {
      buffer->registered = std::move(made).value();
      buffer->data = static_cast<char*>(buffer->registered.data());
    } else {
      log::debug("pinning a staging buffer with cuMemHostRegister failed (" + made.error().message +
                 "): using cuMemHostAlloc");
    }
  }
  if (buffer->data == nullptr) {
    COMPANION_ASSIGN_OR_RETURN(buffer->pinned,
                               memory::cuda::PinnedHostBuffer::allocate(ordinal, bytes));
    buffer->data = static_cast<char*>(buffer->pinned.data());
  }
  COMPANION_ASSIGN_OR_RETURN(buffer->done, memory::cuda::Event::create(ordinal));
  buffer->capacity = bytes;
  return buffer;
}

// CUDA slabs: pinned staging buffers, copies queued on several streams, an event recorded after
// each buffer's copies. A completion thread waits for the events in submission order and
// recycles the buffers.
class CudaStagedSink final : public ChunkSink {
 public:
  static Result<std::unique_ptr<ChunkSink>> create(memory::Slab& slab, int ordinal,
                                                   const SinkOptions& options) {
    std::vector<uint64_t> device(slab.segment_count());
    for (size_t i = 0; i < device.size(); ++i) {
      COMPANION_ASSIGN_OR_RETURN(device[i], memory::cuda_segment_device_pointer(slab, i));
    }
    std::vector<memory::cuda::Stream> streams;
    for (size_t i = 0; i < std::max<size_t>(1, options.streams); ++i) {
      COMPANION_ASSIGN_OR_RETURN(auto stream, memory::cuda::Stream::create(ordinal));
      streams.push_back(std::move(stream));
    }
    auto sink = std::unique_ptr<CudaStagedSink>(
        new CudaStagedSink(ordinal, std::move(device), std::move(streams), options));
    try {
      sink->completion_ = std::thread([s = sink.get()] { s->complete(); });
    } catch (const std::system_error& e) {
      return make_error(StatusCode::kInternal, std::string("starting a thread: ") + e.what());
    }
    return std::unique_ptr<ChunkSink>(std::move(sink));
  }

  ~CudaStagedSink() override {
    {
      std::lock_guard lock(queue_mutex_);
      closing_ = true;
    }
    queue_cv_.notify_all();
    // The completion thread drains every copy in flight before it returns, so no buffer is freed
    // while the GPU may still read it.
    if (completion_.joinable()) completion_.join();
    for (auto& stream : streams_) (void)stream.synchronize();
  }

  const char* name() const noexcept override { return "cuda-staged"; }
  char* host_address(size_t) noexcept override { return nullptr; }
  Result<void> prepare_thread() override { return memory::cuda::make_current(ordinal_); }
  Result<StagingBuffer*> acquire(const std::atomic<bool>& stop) override {
    return pool_.acquire(stop);
  }

  Result<void> submit(StagingBuffer* buffer, const char* base,
                      std::span<const CopyOp> ops) override {
    auto* pinned = static_cast<PinnedBuffer*>(buffer);
    memory::cuda::Stream& stream =
        streams_[next_stream_.fetch_add(1, std::memory_order_relaxed) % streams_.size()];
    Result<void> result;
    for (const CopyOp& op : ops) {
      result = stream.copy_to_device_async(device_[op.segment] + op.dst_offset,
                                           base + op.stage_offset, op.bytes);
      if (!result.ok()) break;
    }
    if (auto recorded = pinned->done.record(stream); recorded.ok()) {
      {
        std::lock_guard lock(queue_mutex_);
        in_flight_.push_back(pinned);
      }
      queue_cv_.notify_all();
    } else {
      // Nothing to wait on: wait for the whole stream before reusing the buffer.
      (void)stream.synchronize();
      pool_.put(buffer);
      if (result.ok()) result = std::move(recorded).error();
    }
    if (!result.ok()) pool_.fail(result.error());
    return result;
  }

  bool copies_from_pinned_host() const noexcept override { return true; }
  Result<void> submit_pinned(const char* src, const CopyOp& op) override {
    memory::cuda::Stream& stream =
        streams_[next_stream_.fetch_add(1, std::memory_order_relaxed) % streams_.size()];
    // finish() synchronizes every stream: nothing else waits for these copies.
    auto result = stream.copy_to_device_async(device_[op.segment] + op.dst_offset, src, op.bytes);
    if (!result.ok()) pool_.fail(result.error());
    return result;
  }

  void release(StagingBuffer* buffer) override { pool_.put(buffer); }
  void wake() override { pool_.wake(); }

  Result<void> finish() override {
    {
      std::unique_lock lock(queue_mutex_);
      queue_cv_.wait(lock, [&] { return in_flight_.empty() && waiting_ == nullptr; });
    }
    for (auto& stream : streams_) {
      if (auto r = stream.synchronize(); !r.ok()) pool_.fail(r.error());
    }
    if (auto error = pool_.error()) return *error;
    return ok_result();
  }

  SinkStats stats() const override {
    SinkStats s;
    s.name = name();
    s.buffer_bytes = buffer_bytes_;
    pool_.fill(s);
    return s;
  }

 private:
  CudaStagedSink(int ordinal, std::vector<uint64_t> device,
                 std::vector<memory::cuda::Stream> streams, const SinkOptions& options)
      : ordinal_(ordinal),
        device_(std::move(device)),
        streams_(std::move(streams)),
        buffer_bytes_(staging_buffer_size(options.buffer_bytes)),
        pool_(
            options.max_buffers,
            [ordinal, bytes = buffer_bytes_, registered = options.registered_pinned,
             keep = options.keep_buffers]() -> Result<std::unique_ptr<StagingBuffer>> {
              if (keep) {
                if (auto kept = PinnedCache::instance().take(ordinal, bytes)) {
                  kept->reused = true;
                  return std::unique_ptr<StagingBuffer>(std::move(kept));
                }
              }
              COMPANION_ASSIGN_OR_RETURN(auto buffer, allocate_pinned(ordinal, bytes, registered));
              return std::unique_ptr<StagingBuffer>(std::move(buffer));
            },
            [ordinal, keep = options.keep_buffers](std::unique_ptr<StagingBuffer> buffer) {
              if (!keep) return;
              PinnedCache::instance().give(
                  ordinal,
                  std::unique_ptr<PinnedBuffer>(static_cast<PinnedBuffer*>(buffer.release())));
            }) {}

  // The completion thread: recycles buffers as their copies finish, in submission order.
  void complete() {
    if (auto r = memory::cuda::make_current(ordinal_); !r.ok()) pool_.fail(r.error());
    for (;;) {
      PinnedBuffer* buffer = nullptr;
      {
        std::unique_lock lock(queue_mutex_);
        queue_cv_.wait(lock, [&] { return !in_flight_.empty() || closing_; });
        if (in_flight_.empty()) return;
        buffer = in_flight_.front();
        in_flight_.pop_front();
        waiting_ = buffer;
      }
      auto done = buffer->done.synchronize();
      if (!done.ok()) {
        // The event cannot tell: wait for every stream before reusing the buffer.
        for (auto& stream : streams_) (void)stream.synchronize();
        pool_.fail(std::move(done).error());
      }
      pool_.put(buffer);
      {
        std::lock_guard lock(queue_mutex_);
        waiting_ = nullptr;
      }
      queue_cv_.notify_all();
    }
  }

  int ordinal_;
  std::vector<uint64_t> device_;  // each segment's device pointer
  std::vector<memory::cuda::Stream> streams_;
  std::atomic<size_t> next_stream_{0};
  uint64_t buffer_bytes_;
  StagingPool pool_;

  std::mutex queue_mutex_;
  std::condition_variable queue_cv_;
  std::deque<PinnedBuffer*> in_flight_;  // submitted, event not yet waited for
  PinnedBuffer* waiting_ = nullptr;      // the one the completion thread waits for
  bool closing_ = false;
  std::thread completion_;
};

}  // namespace

Result<size_t> pin_staging_ahead(int ordinal, const SinkOptions& options) {
  if (!options.keep_buffers) return size_t{0};
  COMPANION_TRY(memory::cuda::make_current(ordinal));
  const uint64_t bytes = staging_buffer_size(options.buffer_bytes);
  const size_t count = std::min<size_t>(std::max<size_t>(1, options.max_buffers),
                                        static_cast<size_t>(kKeptStagingBytes / bytes));
  size_t pinned = 0;
  for (; pinned < count; ++pinned) {
    COMPANION_ASSIGN_OR_RETURN(auto buffer,
                               allocate_pinned(ordinal, bytes, options.registered_pinned));
    PinnedCache::instance().give(ordinal, std::move(buffer));
  }
  return pinned;
}

Result<std::unique_ptr<ChunkSink>> make_chunk_sink(memory::Slab& slab, const SinkOptions& options) {
  bool host = slab.segment_count() > 0;
  for (size_t i = 0; i < slab.segment_count(); ++i) host = host && slab.host_address(i) != nullptr;
  if (host) return std::unique_ptr<ChunkSink>(std::make_unique<HostDirectSink>(slab));
  if (auto ordinal = memory::cuda_slab_device_ordinal(slab); ordinal.ok())
    return CudaStagedSink::create(slab, *ordinal, options);
  return std::unique_ptr<ChunkSink>(std::make_unique<WriteSink>(slab, options));
}

}  // namespace companion::loader
