#include "loader/load_engine.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <exception>
#include <limits>
#include <memory>
#include <mutex>
#include <new>
#include <optional>
#include <string>
#include <system_error>
#include <thread>
#include <utility>

#include "checkpoint/dtype_convert.hpp"
#include "common/fault_point.hpp"
#include "common/log.hpp"
#include "common/unique_fd.hpp"
#include "common/util.hpp"
#include "loader/page_cache.hpp"

namespace companion::loader {

ssize_t ReadSource::preadv(int fd, const iovec* iov, int count, uint64_t offset) {
  ssize_t total = 0;
  for (int i = 0; i < count; ++i) {
    ssize_t n = pread(fd, iov[i].iov_base, iov[i].iov_len, offset + static_cast<uint64_t>(total));
    if (n < 0) return total > 0 ? total : n;
    total += n;
    if (static_cast<size_t>(n) < iov[i].iov_len) break;
  }
  return total;
}

const char* direct_io_name(DirectIo mode) noexcept {
  switch (mode) {
    case DirectIo::kAuto:
      return "auto";
    case DirectIo::kOn:
      return "on";
    case DirectIo::kOff:
      return "off";
  }
  return "?";
}

namespace {

uint64_t chunk_bytes(const LoadOptions& options) {
  return std::max<uint64_t>(64, options.chunk_bytes / 8 * 8);
}

// The staging a load with these options uses (the sink's own stop flag aside).
SinkOptions staging_options(const LoadOptions& options) {
  SinkOptions sink;
  sink.buffer_bytes = chunk_bytes(options);
  sink.max_buffers = static_cast<size_t>(
      std::max<uint64_t>(1, options.staging_bytes / staging_buffer_size(sink.buffer_bytes)));
  sink.streams = std::max<size_t>(1, options.copy_streams);
  sink.registered_pinned = options.pinned_memory == PinnedMemory::kRegistered;
  sink.keep_buffers = options.keep_staging;
  return sink;
}

}  // namespace

Result<size_t> pin_staging(int ordinal, const LoadOptions& options) {
  return pin_staging_ahead(ordinal, staging_options(options));
}

Result<void> copy_slab(memory::Slab& source, memory::Slab& target, const ProgressFn& progress,
                       const std::atomic<bool>& cancel, const LoadOptions& options) {
  struct Part {
    uint32_t segment;
    uint64_t offset;
    uint64_t bytes;
  };
  if (source.segment_count() != target.segment_count())
    return make_error(StatusCode::kInternal, "copy between slabs of different segment counts");
  SinkOptions sink_options = staging_options(options);
  std::atomic<bool> stop{false};
  sink_options.stop = &stop;
  std::vector<Part> parts;
  uint64_t total = 0;
  for (size_t i = 0; i < target.segment_count(); ++i) {
    const uint64_t size = target.segment_size(i);
    if (source.segment_size(i) != size)
      return make_error(StatusCode::kInternal, "copy between segments of different sizes");
    for (uint64_t offset = 0; offset < size; offset += sink_options.buffer_bytes)
      parts.push_back(Part{static_cast<uint32_t>(i), offset,
                           std::min(sink_options.buffer_bytes, size - offset)});
    total += size;
  }
  COMPANION_ASSIGN_OR_RETURN(std::unique_ptr<ChunkSink> sink,
                             make_chunk_sink(target, sink_options));
  std::mutex mutex;
  std::condition_variable changed;
  std::optional<Error> error;
  std::atomic<size_t> next{0};
  std::atomic<uint64_t> done{0};
  size_t running = 0;
  auto fail = [&](Error e) {
    {
      std::lock_guard lock(mutex);
      if (!error) error = std::move(e);
    }
    stop.store(true);
    sink->wake();
  };
  auto copy_parts = [&]() -> Result<void> {
    COMPANION_TRY(sink->prepare_thread());
    for (;;) {
      if (cancel.load()) return make_error(StatusCode::kCancelled, "copy cancelled");
      const size_t index = next.fetch_add(1);
      if (stop.load() || index >= parts.size()) return ok_result();
      const Part& part = parts[index];
      const auto* pinned = static_cast<const char*>(source.pinned_host_bytes(part.segment));
      if (pinned != nullptr && sink->copies_from_pinned_host()) {
        // A page-locked host copy: DMA straight from it, no staging.
        COMPANION_TRY(sink->submit_pinned(pinned + part.offset,
                                          CopyOp{0, part.bytes, part.segment, part.offset}));
      } else if (char* direct = sink->host_address(part.segment)) {
        COMPANION_TRY(source.read(part.segment, part.offset, direct + part.offset, part.bytes));
      } else {
        COMPANION_ASSIGN_OR_RETURN(StagingBuffer * buffer, sink->acquire(stop));
        if (buffer == nullptr) return ok_result();  // stopping
        if (auto read = source.read(part.segment, part.offset, buffer->data, part.bytes);
            !read.ok()) {
          sink->release(buffer);
          return read;
        }
        const CopyOp op{0, part.bytes, part.segment, part.offset};
        COMPANION_TRY(sink->submit(buffer, buffer->data, std::span<const CopyOp>(&op, 1)));
      }
      done.fetch_add(part.bytes);
    }
  };
  auto reader = [&] {
    Result<void> outcome = ok_result();
    try {
      outcome = copy_parts();
    } catch (const std::bad_alloc&) {
      outcome = make_error(StatusCode::kOutOfMemory, "out of memory while copying a slab");
    } catch (const std::exception& e) {
      outcome = make_error(StatusCode::kInternal, std::string("copying a slab: ") + e.what());
    }
    if (!outcome.ok()) fail(outcome.error());
    {
      std::lock_guard lock(mutex);
      --running;
    }
    changed.notify_all();
  };
  size_t threads = options.reader_threads;
  if (threads == 0) threads = std::clamp<size_t>(std::thread::hardware_concurrency(), 1, 16);
  threads = std::clamp<size_t>(threads, 1, std::max<size_t>(1, parts.size()));
  std::vector<std::thread> readers;
  for (size_t i = 0; i < threads; ++i) {
    try {
      {
        std::lock_guard lock(mutex);
        ++running;
      }
      readers.emplace_back(reader);
    } catch (const std::system_error& e) {
      {
        std::lock_guard lock(mutex);
        --running;
      }
      fail(make_error(StatusCode::kInternal, std::string("starting a copy thread: ") + e.what()));
      break;
    }
  }
  // Progress from this thread, as load_into_slab reports it.
  for (;;) {
    bool finished = false;
    {
      std::unique_lock lock(mutex);
      finished =
          changed.wait_for(lock, std::chrono::milliseconds(100), [&] { return running == 0; });
    }
    if (progress && !finished) progress(done.load(), total);
    if (finished) break;
  }
  for (auto& t : readers) t.join();
  // Copies already queued land (or fail) before the target may be freed.
  Result<void> finished = sink->finish();
  if (error) return *error;
  if (cancel.load()) return make_error(StatusCode::kCancelled, "copy cancelled");
  COMPANION_TRY(finished);
  if (progress) progress(total, total);
  return ok_result();
}

namespace engine {
namespace {

using Clock = std::chrono::steady_clock;

// Host slabs: an item with at most this many copies is read with one pread per copy straight into
// the slab; more (many small tensors) go through a bounce buffer.
constexpr size_t kMaxDirectReads = 8;
// Reads smaller than this skip O_DIRECT (not worth a bounce, nor the aligned superset).
constexpr uint64_t kDirectMinBytes = 64ull << 10;
// Progress is reported at most about this many times a load (plus the first and the last).
constexpr uint64_t kProgressSteps = 256;
// Readers when LoadOptions leaves it to the loader: a host slab's readers do all the work, one per
// core (at most 16). A staged load also needs cores for the copy streams' completion thread, the
// item maker and the kernel's page-cache work: on a 16-core H200 host 12 readers loaded the 16 GB
// model and each TP=2 rank 3-5% faster than 16 (docs/benchmarks.md), so a quarter of the cores is
// left to them.
size_t default_reader_threads(bool host_slab) {
  const size_t cores = std::max<size_t>(1, std::thread::hardware_concurrency());
  return std::clamp<size_t>(host_slab ? cores : cores - cores / 4, 1, 16);
}

// Small items (many small tensors) are handed to the readers this many at a time, or a chunk's
// worth of bytes, whichever comes first: one lock each.
constexpr size_t kItemBatch = 64;
// The calling thread looks at the cancel flag at least this often.
constexpr auto kPollInterval = std::chrono::milliseconds(5);

uint64_t align_down(uint64_t v) {
  return v / kDirectAlign * kDirectAlign;
}
uint64_t align_up(uint64_t v) {
  return (v + kDirectAlign - 1) / kDirectAlign * kDirectAlign;
}

void add_op(std::vector<CopyOp>& ops, const CopyOp& op) {
  if (!ops.empty()) {
    CopyOp& last = ops.back();
    if (last.segment == op.segment && last.stage_offset + last.bytes == op.stage_offset &&
        last.dst_offset + last.bytes == op.dst_offset) {
      last.bytes += op.bytes;
      return;
    }
  }
  ops.push_back(op);
}

uint64_t target_bytes(const Piece& p) {
  return p.source_bytes / dtype_size(p.from) * dtype_size(p.to);
}

bool has_cast(const WorkItem& item) {
  return std::any_of(item.pieces.begin(), item.pieces.end(),
                     [](const Piece& p) { return p.from != p.to; });
}

// Chooses between the image and the packed layout and computes the copies.
void finalize(WorkItem& item) {
  bool cast = has_cast(item);
  std::vector<CopyOp> packed;
  for (const Piece& p : item.pieces)
    add_op(packed, CopyOp{p.stage_offset, target_bytes(p), p.segment, p.dst_offset});
  if (!cast) {
    std::vector<CopyOp> image;
    for (const Piece& p : item.pieces)
      add_op(image, CopyOp{p.file_offset - item.lo, p.source_bytes, p.segment, p.dst_offset});
    if (image.size() <= packed.size()) {
      item.packed = false;
      item.ops = std::move(image);
      return;
    }
  }
  item.packed = true;
  item.ops = std::move(packed);
}

// A piece's bytes from the file image to their place, cast when the dtypes differ.
Result<void> convert(const Piece& p, const char* src, char* dst) {
  if (p.from == p.to) {
    std::memcpy(dst, src, p.source_bytes);
    return ok_result();
  }
  return checkpoint::convert_elements(p.from, p.to, src, dst, p.source_bytes / dtype_size(p.from));
}

// Reads through the test hook or pread(2) / preadv(2).
class PosixReadSource final : public ReadSource {
 public:
  ssize_t pread(int fd, void* dst, size_t bytes, uint64_t offset) override {
    return ::pread(fd, dst, bytes, static_cast<off_t>(offset));
  }
  ssize_t preadv(int fd, const iovec* iov, int count, uint64_t offset) override {
    return ::preadv(fd, iov, count, static_cast<off_t>(offset));
  }
};

struct FreeDeleter {
  void operator()(char* p) const noexcept { std::free(p); }
};

// What one reader thread allocates once and reuses: the bounce buffer (an item's file image for
// casts and O_DIRECT) and the scratch that bridged gaps of gathered reads are dropped into.
struct ReaderBuffers {
  std::unique_ptr<char, FreeDeleter> bounce;
  std::unique_ptr<char, FreeDeleter> scratch;
};

struct OpenFile {
  std::string path;
  checkpoint::SharedFd fd;  // buffered: the checkpoint's own descriptor
  UniqueFd direct_fd;       // O_DIRECT, when asked for and the file system takes it
  std::atomic<bool> direct_ok{false};
};

class Engine {
 public:
  Engine(const LoadPlan& plan, memory::Slab& slab, const std::atomic<bool>& cancel,
         const LoadOptions& options)
      : plan_(plan),
        slab_(slab),
        cancel_(cancel),
        options_(options),
        source_(options.read_source != nullptr ? options.read_source : &posix_source_),
        bridged_gap_(std::min(options.bridged_gap_bytes, kBridgedGapLimit)) {}

  Result<void> run(const ProgressFn& progress, LoadStats& stats) {
    if (cancel_.load()) return make_error(StatusCode::kCancelled, "load cancelled");
    start_ = Clock::now();
    chunk_ = chunk_bytes(options_);
    std::vector<uint64_t> sizes(slab_.segment_count());
    for (size_t i = 0; i < sizes.size(); ++i) sizes[i] = slab_.segment_size(i);
    COMPANION_ASSIGN_OR_RETURN(WorkItemMaker maker, WorkItemMaker::create(plan_, sizes, chunk_));
    COMPANION_TRY(open_files(stats));

    SinkOptions sink_options = staging_options(options_);
    sink_options.stop = &stop_;
    COMPANION_ASSIGN_OR_RETURN(sink_, make_chunk_sink(slab_, sink_options));
    host_.resize(slab_.segment_count());
    for (size_t i = 0; i < host_.size(); ++i) host_[i] = sink_->host_address(i);
    direct_to_host_ = !host_.empty() && host_[0] != nullptr;

    size_t threads = options_.reader_threads;
    if (threads == 0) threads = default_reader_threads(direct_to_host_);
    threads = std::min(threads, maker.estimated_items());
    running_ = threads;
    std::vector<std::thread> readers;
    readers.reserve(threads);
    for (size_t i = 0; i < threads; ++i) {
      try {
        readers.emplace_back([this] { reader(); });
      } catch (const std::system_error& e) {
        {
          std::lock_guard lock(mutex_);
          running_ -= threads - i;
        }
        fail(make_error(StatusCode::kInternal,
                        std::string("starting a reader thread: ") + e.what()));
        break;
      }
    }
    stats.reader_threads = readers.size();
    stats.readers_started_seconds = std::chrono::duration<double>(Clock::now() - start_).count();

    // The readers are joined however making items or watching ends: an exception (a progress
    // callback's, bad_alloc) must not leave joinable threads behind (std::terminate) nor readers
    // writing into a freed slab.
    std::exception_ptr watch_exception;
    try {
      make_items(maker, stats);
      watch(progress);
    } catch (...) {
      watch_exception = std::current_exception();
    }
    stop_.store(true);
    sink_->wake();
    for (auto& t : readers) t.join();
    if (watch_exception) std::rethrow_exception(watch_exception);

    std::optional<Error> error;
    {
      std::lock_guard lock(mutex_);
      error = error_;
    }
    if (!error && reader_fault_.load() != StatusCode::kOk)
      error = make_error(reader_fault_.load(), reader_fault_.load() == StatusCode::kOutOfMemory
                                                   ? "a reader thread ran out of memory"
                                                   : "a reader thread failed unexpectedly");
    if (!error) {
      if (auto r = sink_->finish(); !r.ok()) error = std::move(r).error();
    }
    SinkStats sink = sink_->stats();
    stats.sink = sink.name;
    stats.staging_buffer_bytes = sink.buffer_bytes;
    stats.staging_buffers_max = sink.max_buffers;
    stats.staging_buffers = sink.buffers;
    stats.staging_buffers_reused = sink.reused;
    stats.staging_buffers_peak = sink.peak_in_use;
    stats.staging_alloc_seconds = sink.alloc_seconds;
    stats.direct_reads = direct_reads_.load();
    stats.buffered_reads = buffered_reads_.load();
    stats.gathered_reads = gathered_reads_.load();
    {
      std::lock_guard lock(mutex_);
      stats.work_items = items_.size();
      stats.reader_busy_seconds = busy_seconds_;
      stats.readers_first_done_seconds = readers.empty() ? 0 : first_finish_;
      stats.readers_last_done_seconds = last_finish_;
    }
    sink_.reset();  // waits for copies still in flight (error paths), frees the buffers
    if (error) return *error;
    if (progress) progress(done_, plan_.bytes_to_read);
    return ok_result();
  }

 private:
  // Files are read through the descriptors the checkpoint opened, never reopened by path: what was
  // checked to lie under the model roots is what is read.
  Result<void> open_files(LoadStats& stats) {
    bool all_direct = options_.direct_io != DirectIo::kOff;
    files_ = std::make_unique<OpenFile[]>(plan_.files.size());
    for (size_t i = 0; i < plan_.files.size(); ++i) {
      OpenFile& f = files_[i];
      f.path = plan_.files[i];
      if (i < plan_.file_fds.size()) f.fd = plan_.file_fds[i];
      if (!f.fd || !f.fd->valid())
        return make_error(StatusCode::kInternal, "no open descriptor for " + f.path);
      bool want_direct = options_.direct_io == DirectIo::kOn;
      if (options_.direct_io == DirectIo::kAuto) {
        // A file mostly in the page cache reads at memory speed through it; O_DIRECT would read
        // it from the disk again. A cold one reads faster past the cache (no copy through it).
        want_direct = !mostly_cached(f);
        (want_direct ? stats.files_cold : stats.files_cached) += 1;
      }
      if (want_direct) {
        // O_DIRECT needs a description of its own (F_SETFL would change the buffered reads too):
        // the same open file, reopened through its descriptor, not through its path.
        std::string self = "/proc/self/fd/" + std::to_string(f.fd->get());
        f.direct_fd.reset(::open(self.c_str(), O_RDONLY | O_CLOEXEC | O_DIRECT));
        if (!f.direct_fd) {
          log::debug("O_DIRECT refused for " + f.path + " (" + std::strerror(errno) +
                     "): reading it through the page cache");
        }
        f.direct_ok.store(f.direct_fd.valid());
      }
      all_direct = all_direct && f.direct_fd.valid();
    }
    stats.direct_io = all_direct;
    return ok_result();
  }

  static bool mostly_cached(const OpenFile& f) {
    struct stat st {};
    if (::fstat(f.fd->get(), &st) != 0) return true;  // unknown: the cache is never wrong
    auto sample = sample_page_cache(f.fd->get(), static_cast<uint64_t>(st.st_size));
    if (!sample.ok()) {
      log::debug("page cache residency of " + f.path + " unknown (" + sample.error().message +
                 "): reading it through the cache");
      return true;
    }
    return sample->fraction() >= kCachedFraction;
  }

  void fail(Error error) {
    {
      // The first failure is the load's: a reader's fault (recorded before stop_ is set, so seen
      // here by anyone who stopped because of it) comes before the "load stopped" it causes.
      std::lock_guard lock(mutex_);
      if (!error_ && reader_fault_.load() == StatusCode::kOk) error_ = std::move(error);
    }
    stop_.store(true);
    cv_.notify_all();
    items_cv_.notify_all();
    sink_->wake();
  }

  bool stopping() const {
    return stop_.load(std::memory_order_relaxed) || cancel_.load(std::memory_order_relaxed);
  }

  // Reader threads never let an exception escape (that would end the process): one that throws
  // (std::bad_alloc above all) stops the load with a typed error instead. What they do under
  // mutex_ allocates nothing, so that the lock is never left by an exception half-way.
  void reader() {
    try {
      read_items();
    } catch (const std::bad_alloc&) {
      fault(StatusCode::kOutOfMemory);
    } catch (...) {
      fault(StatusCode::kInternal);
    }
    {
      std::lock_guard lock(mutex_);
      --running_;
    }
    cv_.notify_all();
  }

  // Stops the load without allocating (the error is built after the readers are joined).
  void fault(StatusCode code) noexcept {
    StatusCode none = StatusCode::kOk;
    reader_fault_.compare_exchange_strong(none, code);
    stop_.store(true);
    cv_.notify_all();
    items_cv_.notify_all();
    sink_->wake();
  }

  void read_items() {
    auto prepared = sink_->prepare_thread();
    if (!prepared.ok()) fail(std::move(prepared).error());
    ReaderBuffers buffers;
    Clock::duration busy{};
    // Time in process() and when this thread ran out of work: where a load's wall time goes
    // besides reading (threads waiting for staging, or idle at the end).
    struct Account {
      Engine& engine;
      Clock::duration& busy;
      ~Account() {
        double finish = std::chrono::duration<double>(Clock::now() - engine.start_).count();
        std::lock_guard lock(engine.mutex_);
        engine.busy_seconds_ += std::chrono::duration<double>(busy).count();
        engine.first_finish_ = std::min(engine.first_finish_, finish);
        engine.last_finish_ = std::max(engine.last_finish_, finish);
      }
    } account{*this, busy};
    const WorkItem* finished = nullptr;
    for (;;) {
      const WorkItem* item = nullptr;
      {
        // One lock per item: counting the last one's bytes and taking the next one.
        std::unique_lock lock(mutex_);
        if (finished != nullptr) {
          done_ += finished->source_bytes;
          progress_pending_ = true;
        }
        while (!stopping() && next_ >= items_.size() && !items_made_)
          items_cv_.wait_for(lock, kPollInterval);
        if (!stopping() && next_ < items_.size()) item = &items_[next_++];
      }
      if (finished != nullptr) cv_.notify_all();
      if (item == nullptr) break;
      auto began = Clock::now();
      auto r = process(*item, buffers);
      busy += Clock::now() - began;
      if (r.ok()) r = fault::point(fault::Stage::kCopy, files_[item->file].path);
      if (!r.ok()) {
        fail(std::move(r).error());
        break;
      }
      if (stop_.load(std::memory_order_relaxed)) break;  // acquire() gave up: nothing submitted
      finished = item;
    }
    if (cancel_.load() && !stop_.load()) fail(make_error(StatusCode::kCancelled, "load cancelled"));
  }

  // The calling thread, while the readers start on what it made: the plan's items, handed over
  // a tensor at a time (see kItemBatch for small ones).
  void make_items(WorkItemMaker& maker, LoadStats& stats) {
    struct Made {  // however making ends, waiting readers learn that no more items come
      Engine& engine;
      ~Made() {
        {
          std::lock_guard lock(engine.mutex_);
          engine.items_made_ = true;
        }
        engine.items_cv_.notify_all();
      }
    } made{*this};
    std::vector<WorkItem> batch;
    uint64_t batch_bytes = 0;
    bool more = true;
    while (more && !stopping()) {
      const size_t before = batch.size();
      auto next = maker.next(batch);
      if (!next.ok()) return fail(std::move(next).error());
      more = *next;
      for (size_t i = before; i < batch.size(); ++i) batch_bytes += batch[i].source_bytes;
      if (batch.empty() || (more && batch.size() < kItemBatch && batch_bytes < chunk_)) continue;
      {
        std::lock_guard lock(mutex_);
        for (WorkItem& item : batch) items_.push_back(std::move(item));
      }
      items_cv_.notify_all();
      batch.clear();
      batch_bytes = 0;
    }
    stats.items_made_seconds = std::chrono::duration<double>(Clock::now() - start_).count();
  }

  // The calling thread: reports progress, watches the cancel flag, returns when the readers are
  // done or the load is stopping.
  void watch(const ProgressFn& progress) {
    const uint64_t total = plan_.bytes_to_read;
    const uint64_t step = std::max<uint64_t>(1, total / kProgressSteps);
    bool reported = false;
    uint64_t last = 0;
    for (;;) {
      bool finished = false;
      std::optional<uint64_t> done;
      {
        std::unique_lock lock(mutex_);
        cv_.wait_for(lock, kPollInterval,
                     [&] { return progress_pending_ || running_ == 0 || error_.has_value(); });
        if (error_) return;
        if (progress_pending_) done = done_;
        progress_pending_ = false;
        finished = running_ == 0;
      }
      if (cancel_.load()) return fail(make_error(StatusCode::kCancelled, "load cancelled"));
      if (done && (!reported || *done >= last + step)) {
        reported = true;
        last = *done;
        if (progress) {
          progress(*done, total);
          if (cancel_.load()) return fail(make_error(StatusCode::kCancelled, "load cancelled"));
        }
      }
      if (finished) return;
    }
  }

  Result<void> process(const WorkItem& item, ReaderBuffers& buffers) {
    OpenFile& f = files_[item.file];
    COMPANION_TRY(fault::point(fault::Stage::kRead, f.path));
    if (direct_to_host_) {
      if (gathers(f, item)) {
        return gather(f, item, buffers,
                      [&](const Piece& p) { return host_[p.segment] + p.dst_offset; });
      }
      if (!item.packed && !use_direct(f, item) && item.ops.size() <= kMaxDirectReads) {
        for (const CopyOp& op : item.ops) {
          COMPANION_TRY(read_buffered(f, host_[op.segment] + op.dst_offset, op.bytes,
                                      item.lo + op.stage_offset));
        }
        return ok_result();
      }
      COMPANION_ASSIGN_OR_RETURN(char* b, bounce_buffer(buffers.bounce));
      COMPANION_ASSIGN_OR_RETURN(const char* image, read_image(f, item, b));
      if (item.packed) {
        for (const Piece& p : item.pieces) {
          COMPANION_TRY(
              convert(p, image + (p.file_offset - item.lo), host_[p.segment] + p.dst_offset));
        }
      } else {
        for (const CopyOp& op : item.ops)
          std::memcpy(host_[op.segment] + op.dst_offset, image + op.stage_offset, op.bytes);
      }
      return ok_result();
    }

    COMPANION_ASSIGN_OR_RETURN(StagingBuffer * buffer, sink_->acquire(stop_));
    if (buffer == nullptr) return ok_result();  // stopping
    auto filled = fill(f, item, *buffer, buffers);
    if (!filled.ok()) {
      sink_->release(buffer);
      return std::move(filled).error();
    }
    return sink_->submit(buffer, *filled, item.ops);
  }

  // Puts the item's bytes into a staging buffer; returns the base its ops are relative to.
  Result<const char*> fill(OpenFile& f, const WorkItem& item, StagingBuffer& buffer,
                           ReaderBuffers& buffers) {
    if (gathers(f, item)) {
      // Each piece where the item's layout has it: its image position or its packed one.
      COMPANION_TRY(gather(f, item, buffers, [&](const Piece& p) {
        return buffer.data + (item.packed ? p.stage_offset : p.file_offset - item.lo);
      }));
      return static_cast<const char*>(buffer.data);
    }
    if (!item.packed) return read_image(f, item, buffer.data);
    COMPANION_ASSIGN_OR_RETURN(char* b, bounce_buffer(buffers.bounce));
    COMPANION_ASSIGN_OR_RETURN(const char* image, read_image(f, item, b));
    for (const Piece& p : item.pieces)
      COMPANION_TRY(convert(p, image + (p.file_offset - item.lo), buffer.data + p.stage_offset));
    return static_cast<const char*>(buffer.data);
  }

  Result<char*> bounce_buffer(std::unique_ptr<char, FreeDeleter>& bounce) {
    if (!bounce) {
      uint64_t bytes = staging_buffer_size(chunk_);
      bounce.reset(static_cast<char*>(std::aligned_alloc(kDirectAlign, bytes)));
      if (!bounce)
        return make_error(StatusCode::kOutOfMemory,
                          "cannot allocate a read buffer of " + format_bytes(bytes));
    }
    return bounce.get();
  }

  bool use_direct(const OpenFile& f, const WorkItem& item) const {
    return f.direct_ok.load(std::memory_order_relaxed) && item.hi - item.lo >= kDirectMinBytes;
  }

  // Items with gaps (a row shard: the rank's part of each row, the other ranks' parts between)
  // read through the page cache copy only the pieces: the gaps would cost as much memory
  // bandwidth as the pieces, and packing the pieces out of an image a second copy. O_DIRECT reads
  // keep one aligned read of the whole range: a disk reads a few KiB of gap in the time a request
  // takes, and O_DIRECT cannot start or end a read inside a block anyway.
  bool gathers(const OpenFile& f, const WorkItem& item) const {
    return item.has_gaps() && !use_direct(f, item);
  }

  // Reads the item's pieces, and only those (and gaps of at most bridged_gap_), each straight to
  // dst(piece); cast pieces go to their image place in the bounce buffer first and are converted
  // from there.
  template <typename Dst>
  Result<void> gather(OpenFile& f, const WorkItem& item, ReaderBuffers& buffers, Dst dst) {
    const bool cast = has_cast(item);
    char* image = nullptr;
    if (cast) {
      COMPANION_ASSIGN_OR_RETURN(image, bounce_buffer(buffers.bounce));
    }
    if (!buffers.scratch) {
      buffers.scratch.reset(static_cast<char*>(std::malloc(std::max<uint64_t>(1, bridged_gap_))));
      if (!buffers.scratch)
        return make_error(StatusCode::kOutOfMemory, "cannot allocate a gather scratch buffer");
    }
    std::vector<char*> targets;
    targets.reserve(item.pieces.size());
    for (const Piece& p : item.pieces)
      targets.push_back(cast ? image + (p.file_offset - item.lo) : dst(p));
    GatherReads reads = gather_reads(item, targets, buffers.scratch.get(), bridged_gap_);
    for (const GatherReads::Call& call : reads.calls)
      COMPANION_TRY(read_vector(f, &reads.iovecs[call.first], call.count, call.bytes, call.offset));
    if (cast) {
      for (const Piece& p : item.pieces)
        COMPANION_TRY(convert(p, image + (p.file_offset - item.lo), dst(p)));
    }
    return ok_result();
  }

  // Exactly `bytes` at `offset` through the page cache into `count` iovecs (changed on the way
  // when a read comes back short).
  Result<void> read_vector(OpenFile& f, iovec* iov, size_t count, uint64_t bytes, uint64_t offset) {
    while (bytes > 0) {
      if (stop_.load(std::memory_order_relaxed)) return stopped();
      buffered_reads_.fetch_add(1, std::memory_order_relaxed);
      gathered_reads_.fetch_add(1, std::memory_order_relaxed);
      ssize_t n = source_->preadv(f.fd->get(), iov, static_cast<int>(count), offset);
      if (n < 0) {
        if (errno == EINTR) continue;
        return errno_error(StatusCode::kIoError, "read " + f.path, errno);
      }
      if (n == 0) return truncated(f);
      auto got = static_cast<uint64_t>(n);
      bytes -= std::min(got, bytes);
      offset += got;
      while (got > 0 && count > 0) {
        uint64_t take = std::min<uint64_t>(got, iov->iov_len);
        iov->iov_base = static_cast<char*>(iov->iov_base) + take;
        iov->iov_len -= take;
        got -= take;
        if (iov->iov_len == 0) {
          ++iov;
          --count;
        }
      }
    }
    return ok_result();
  }

  // Reads [lo, hi) of the item's file into `buffer` (aligned, with kDirectAlign slack on both
  // sides); returns where byte `lo` landed.
  Result<const char*> read_image(OpenFile& f, const WorkItem& item, char* buffer) {
    if (use_direct(f, item)) {
      uint64_t a_lo = align_down(item.lo);
      uint64_t a_hi = align_up(item.hi);
      COMPANION_ASSIGN_OR_RETURN(bool read,
                                 read_direct(f, buffer, a_lo, a_hi - a_lo, item.hi - a_lo));
      if (read) return static_cast<const char*>(buffer + (item.lo - a_lo));
    }
    COMPANION_TRY(read_buffered(f, buffer, item.hi - item.lo, item.lo));
    return static_cast<const char*>(buffer);
  }

  // Exactly `bytes` at `offset` through the page cache.
  Result<void> read_buffered(OpenFile& f, char* out, uint64_t bytes, uint64_t offset) {
    while (bytes > 0) {
      if (stop_.load(std::memory_order_relaxed)) return stopped();
      buffered_reads_.fetch_add(1, std::memory_order_relaxed);
      ssize_t n = source_->pread(f.fd->get(), out, bytes, offset);
      if (n < 0) {
        if (errno == EINTR) continue;
        return errno_error(StatusCode::kIoError, "read " + f.path, errno);
      }
      if (n == 0) return truncated(f);
      out += n;
      bytes -= static_cast<uint64_t>(n);
      offset += static_cast<uint64_t>(n);
    }
    return ok_result();
  }

  // Reads at least `need` bytes of [offset, offset + length) (all aligned) with O_DIRECT. False
  // when the file system refuses O_DIRECT reads (EINVAL on the first): the caller reads through
  // the page cache, and so does every later read of the file.
  Result<bool> read_direct(OpenFile& f, char* out, uint64_t offset, uint64_t length,
                           uint64_t need) {
    uint64_t got = 0;
    while (got < need) {
      if (stop_.load(std::memory_order_relaxed)) return stopped();
      direct_reads_.fetch_add(1, std::memory_order_relaxed);
      ssize_t n = source_->pread(f.direct_fd.get(), out + got, length - got, offset + got);
      if (n < 0) {
        if (errno == EINTR) continue;
        if (errno == EINVAL && got == 0) {
          if (f.direct_ok.exchange(false))
            log::debug("O_DIRECT reads refused for " + f.path + ": using the page cache");
          return false;
        }
        return errno_error(StatusCode::kIoError, "read " + f.path, errno);
      }
      if (n == 0) return truncated(f);
      got += static_cast<uint64_t>(n);
      if (got < need && got % kDirectAlign != 0) {
        // A short unaligned read: the rest cannot be asked for with O_DIRECT.
        COMPANION_TRY(read_buffered(f, out + got, need - got, offset + got));
        return true;
      }
    }
    return true;
  }

  // Returned by reads that notice the load stopping (another error came first: this one is
  // dropped).
  static Error stopped() { return make_error(StatusCode::kCancelled, "load stopped"); }

  Error truncated(const OpenFile& f) const {
    return make_error(StatusCode::kBadCheckpoint,
                      f.path + " ended early (changed or truncated while loading)");
  }

  const LoadPlan& plan_;
  memory::Slab& slab_;
  const std::atomic<bool>& cancel_;
  const LoadOptions& options_;
  PosixReadSource posix_source_;
  ReadSource* source_;
  const uint64_t bridged_gap_;
  uint64_t chunk_ = 0;
  std::unique_ptr<OpenFile[]> files_;
  std::unique_ptr<ChunkSink> sink_;
  std::vector<char*> host_;
  bool direct_to_host_ = false;

  Clock::time_point start_{};
  double busy_seconds_ = 0;  // guarded by mutex_, as are the two below
  double first_finish_ = std::numeric_limits<double>::infinity();
  double last_finish_ = 0;
  std::atomic<bool> stop_{false};
  std::atomic<uint64_t> direct_reads_{0};
  std::atomic<uint64_t> buffered_reads_{0};
  std::atomic<uint64_t> gathered_reads_{0};

  std::mutex mutex_;  // guards what follows
  std::condition_variable cv_;
  std::condition_variable items_cv_;  // items_ grew, or no more will come
  std::deque<WorkItem> items_;        // made so far (a deque: taken items never move)
  size_t next_ = 0;                   // the next item a reader takes
  bool items_made_ = false;
  std::optional<Error> error_;
  uint64_t done_ = 0;
  bool progress_pending_ = false;  // done_ moved since the last progress report
  size_t running_ = 0;
  std::atomic<StatusCode> reader_fault_{StatusCode::kOk};  // a reader thread threw
};

}  // namespace

uint64_t WorkItem::stage_bytes() const {
  if (!packed) return hi - lo;
  uint64_t bytes = 0;
  for (const Piece& p : pieces) bytes += target_bytes(p);
  return bytes;
}

GatherReads gather_reads(const WorkItem& item, std::span<char* const> piece_dst, char* scratch,
                         uint64_t max_bridged_gap, size_t max_iov) {
  max_iov = std::max<size_t>(2, max_iov);
  GatherReads out;
  out.iovecs.reserve(item.pieces.size() * 2);
  bool open = false;
  uint64_t end = 0;  // file offset after the open call's bytes
  for (size_t i = 0; i < item.pieces.size() && i < piece_dst.size(); ++i) {
    const Piece& p = item.pieces[i];
    if (p.source_bytes == 0) continue;
    if (open) {
      GatherReads::Call& call = out.calls.back();
      uint64_t gap = p.file_offset >= end ? p.file_offset - end : UINT64_MAX;
      bool bridge = gap > 0 && gap <= max_bridged_gap;
      if (gap > max_bridged_gap || call.count + (bridge ? 2 : 1) > max_iov) {
        open = false;
      } else if (bridge) {
        out.iovecs.push_back(iovec{scratch, gap});
        call.bytes += gap;
        ++call.count;
      }
    }
    if (!open) {
      out.calls.push_back(GatherReads::Call{p.file_offset, 0, out.iovecs.size(), 0});
      open = true;
    }
    GatherReads::Call& call = out.calls.back();
    out.iovecs.push_back(iovec{piece_dst[i], p.source_bytes});
    call.bytes += p.source_bytes;
    ++call.count;
    end = p.file_offset + p.source_bytes;
  }
  return out;
}

Result<WorkItemMaker> WorkItemMaker::create(const LoadPlan& plan,
                                            std::vector<uint64_t> segment_sizes,
                                            uint64_t chunk_bytes, uint64_t max_gap) {
  if (chunk_bytes < 16) return make_error(StatusCode::kInternal, "load chunk below 16 bytes");
  WorkItemMaker maker(plan, std::move(segment_sizes), chunk_bytes, max_gap);
  // A tensor's extents are in file order (LoadPlan says so; next() checks), so ordering the
  // tensors by their first extent puts every run in file order without sorting the runs.
  maker.order_.reserve(plan.tensors.size());
  for (size_t ti = 0; ti < plan.tensors.size(); ++ti) {
    const TensorCopy& t = plan.tensors[ti];
    const std::string& name = t.source.name;
    if (t.source.file_index >= plan.files.size())
      return make_error(StatusCode::kInternal, "tensor " + name + " names a file not in the plan");
    uint64_t in = dtype_size(t.source.dtype);
    uint64_t out = dtype_size(t.target_dtype);
    if (in == 0 || out == 0 || in > 8 || out > 8)
      return make_error(StatusCode::kInternal, "tensor " + name + " has an unsized dtype");
    if (t.placement.segment >= maker.segment_sizes_.size())
      return make_error(StatusCode::kInternal, "tensor " + name + " placed past the last segment");
    auto first = std::find_if(t.extents.begin(), t.extents.end(),
                              [](const ReadExtent& e) { return e.bytes > 0; });
    if (first != t.extents.end())
      maker.order_.push_back(Order{t.source.file_index, first->file_offset, ti});
  }
  std::stable_sort(maker.order_.begin(), maker.order_.end(), [](const Order& a, const Order& b) {
    return a.file != b.file ? a.file < b.file : a.offset < b.offset;
  });
  return maker;
}

size_t WorkItemMaker::estimated_items() const {
  return order_.size() + static_cast<size_t>(plan_->bytes_to_read / chunk_);
}

Result<void> WorkItemMaker::check_extents(const TensorCopy& t) const {
  const std::string& name = t.source.name;
  const uint64_t in = dtype_size(t.source.dtype);
  const uint64_t out = dtype_size(t.target_dtype);
  const uint64_t size = segment_sizes_[t.placement.segment];
  uint64_t previous_end = 0;
  for (const ReadExtent& e : t.extents) {
    if (e.bytes == 0) continue;
    if (e.bytes % in != 0)
      return make_error(StatusCode::kInternal,
                        "tensor " + name + " has an extent of partial elements");
    if (e.file_offset < previous_end)
      return make_error(StatusCode::kInternal, "tensor " + name + " has extents out of file order");
    previous_end = e.file_offset + e.bytes;
    uint64_t dst = t.placement.offset + e.dst_offset;
    uint64_t dst_bytes = e.bytes / in * out;
    if (dst > size || dst_bytes > size - dst)
      return make_error(StatusCode::kInternal,
                        "tensor " + name + " runs past the end of its segment");
  }
  return ok_result();
}

Result<bool> WorkItemMaker::next(std::vector<WorkItem>& items) {
  if (next_ >= order_.size()) return false;
  const TensorCopy& t = plan_->tensors[order_[next_++].tensor];
  COMPANION_TRY(check_extents(t));
  const uint64_t in = dtype_size(t.source.dtype);
  const uint64_t out = dtype_size(t.target_dtype);
  const uint64_t chunk = chunk_;
  WorkItem cur;
  bool open = false;
  uint64_t staged = 0;  // target bytes of the current item's pieces
  auto close = [&] {
    if (!open) return;
    finalize(cur);
    items.push_back(std::move(cur));
    cur = WorkItem{};
    open = false;
  };
  for (const ReadExtent& e : t.extents) {
    if (e.bytes == 0) continue;
    uint64_t offset = e.file_offset;
    uint64_t bytes = e.bytes;
    uint64_t dst = t.placement.offset + e.dst_offset;
    while (bytes > 0) {
      if (open && (offset < cur.lo || offset > cur.hi + max_gap_)) close();
      if (!open) {
        open = true;
        cur.file = t.source.file_index;
        cur.lo = cur.hi = offset;
        staged = 0;
      }
      uint64_t from_lo = offset - cur.lo;
      uint64_t take = std::min(bytes, from_lo < chunk ? chunk - from_lo : 0);
      take = std::min(take, (chunk - staged) / out * in);
      take = take / in * in;
      if (take > 0 && take < bytes) {
        // Split where an O_DIRECT read of the next item starts aligned, when elements allow.
        uint64_t end = align_down(offset + take);
        if (end > offset && (end - offset) % in == 0) take = end - offset;
      }
      if (take == 0) {
        if (cur.pieces.empty())
          return make_error(StatusCode::kInternal, "load chunk smaller than an element");
        close();
        continue;
      }
      cur.pieces.push_back(
          Piece{offset, take, t.source.dtype, t.target_dtype, t.placement.segment, dst, staged});
      cur.hi = std::max(cur.hi, offset + take);
      cur.source_bytes += take;
      staged += take / in * out;
      offset += take;
      dst += take / in * out;
      bytes -= take;
      if (bytes > 0) close();  // full
    }
  }
  close();
  return true;
}

Result<std::vector<WorkItem>> make_work_items(const LoadPlan& plan,
                                              const std::vector<uint64_t>& segment_sizes,
                                              uint64_t chunk_bytes, uint64_t max_gap) {
  COMPANION_ASSIGN_OR_RETURN(WorkItemMaker maker,
                             WorkItemMaker::create(plan, segment_sizes, chunk_bytes, max_gap));
  std::vector<WorkItem> items;
  for (;;) {
    COMPANION_ASSIGN_OR_RETURN(bool more, maker.next(items));
    if (!more) return items;
  }
}

Result<void> run(const LoadPlan& plan, memory::Slab& slab, const ProgressFn& progress,
                 const std::atomic<bool>& cancel, const LoadOptions& options) {
  auto start = Clock::now();
  LoadStats local;
  LoadStats& stats = options.stats != nullptr ? *options.stats : local;
  stats = LoadStats{};
  Engine engine(plan, slab, cancel, options);
  auto result = engine.run(progress, stats);
  stats.seconds = std::chrono::duration<double>(Clock::now() - start).count();
  return result;
}

}  // namespace engine
}  // namespace companion::loader
