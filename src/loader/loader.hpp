// Copies a checkpoint's tensors into a slab, converting dtypes on the way.
#pragma once

#include <sys/types.h>
#include <sys/uio.h>

#include <atomic>
#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "checkpoint/checkpoint.hpp"
#include "companion/result.hpp"
#include "loader/layout.hpp"
#include "memory/backend.hpp"

namespace companion::loader {

// One contiguous run of source bytes and where it lands, relative to the tensor's place in the
// slab. A whole tensor is one extent; a tensor-parallel shard of a row-split matrix is one extent
// per row.
struct ReadExtent {
  uint64_t file_offset = 0;  // absolute, in the tensor's file
  uint64_t bytes = 0;        // source bytes (whole elements)
  uint64_t dst_offset = 0;   // target bytes from the tensor's start in the slab (after casting)
};

struct TensorCopy {
  checkpoint::TensorEntry source;     // where the bytes are in the checkpoint
  DType target_dtype = DType::kU8;    // dtype in the slab (== source.dtype unless cast)
  std::vector<int64_t> target_shape;  // == source.shape unless sharded
  uint64_t target_bytes = 0;
  std::vector<ReadExtent> extents;  // what to read, in file order; covers target_bytes exactly
  Placement placement;
};

struct LoadPlan {
  std::vector<std::string> files;  // for messages
  // The files as the checkpoint opened them (Checkpoint::fds): the only way they are read.
  std::vector<checkpoint::SharedFd> file_fds;
  std::vector<TensorCopy> tensors;
  std::vector<uint64_t> segment_sizes;
  uint64_t bytes_to_read = 0;  // sum of extents' bytes; progress counts these
};

// Which tensor-parallel shard to load (see shard_plan.hpp for the rules).
struct ShardOptions {
  uint32_t tp_size = 1;  // 1: whole tensors, everything else below is ignored
  uint32_t tp_rank = 0;
  std::string rules;  // ModelSpec::shard_rules, "pattern=rule;..."; tried before the preset
  std::optional<std::string> config_json;  // the checkpoint directory's config.json, if any
};

// Builds the plan: casts floating tensors to `cast_to` when set (other dtypes stay as stored),
// takes rank `shard.tp_rank`'s slice of each tensor when `shard.tp_size` > 1 (reading only the
// slice's bytes), lays tensors out for `backend`. Shard errors (a dimension that does not divide,
// no rules for the architecture, bad rules) are kInvalidArgument; a config.json that is not JSON
// is kBadCheckpoint.
Result<LoadPlan> make_load_plan(const checkpoint::Checkpoint& checkpoint,
                                std::optional<DType> cast_to, const memory::Backend& backend,
                                const ShardOptions& shard = {});

// (bytes done, bytes total); called from the thread that called load_into_slab.
using ProgressFn = std::function<void(uint64_t, uint64_t)>;

// Where the loader's bytes come from: pread(2) by default. Tests replace it to inject failures
// (EIO at some byte) or slow reads. Called from several reader threads at once.
class ReadSource {
 public:
  virtual ~ReadSource() = default;
  // pread(2)'s contract: bytes read (fewer only at the end of the file, 0 there), or -1 with
  // errno set.
  virtual ssize_t pread(int fd, void* dst, size_t bytes, uint64_t offset) = 0;
  // preadv(2)'s contract: the file from `offset` into `count` buffers in order. By default the
  // buffers are read one by one through pread() (so that a source overriding pread alone sees
  // every byte); fewer bytes than asked when one of them comes back short, -1 only when the first
  // fails.
  virtual ssize_t preadv(int fd, const iovec* iov, int count, uint64_t offset);
};

// O_DIRECT reads (past the page cache): on, off, or per file the loader's choice (auto: O_DIRECT
// unless a sample of the file's pages says it is mostly in the page cache).
enum class DirectIo { kAuto, kOn, kOff };
const char* direct_io_name(DirectIo mode) noexcept;

enum class PinnedMemory { kHostAlloc, kRegistered };

// What a load did, for benchmarks and tests.
struct LoadStats {
  const char* sink = "";                  // "host-direct", "cuda-staged" or "write"
  size_t reader_threads = 0;              // threads started
  size_t work_items = 0;                  // pieces of work (each at most chunk_bytes)
  bool direct_io = false;                 // O_DIRECT asked for (or chosen) and opened on every file
  size_t files_cached = 0;                // auto: files read through the page cache (mostly cached)
  size_t files_cold = 0;                  // auto: files chosen for O_DIRECT (mostly not cached)
  uint64_t direct_reads = 0;              // preads through O_DIRECT
  uint64_t buffered_reads = 0;            // preads through the page cache
  uint64_t gathered_reads = 0;            // of those, preadv calls reading only an item's pieces
  uint64_t staging_buffer_bytes = 0;      // size of one staging buffer (0: none used)
  size_t staging_buffers_max = 0;         // the bound: staging_bytes / staging_buffer_bytes
  size_t staging_buffers = 0;             // allocated (lazily, up to the bound) or reused
  size_t staging_buffers_reused = 0;      // of those, kept from an earlier load (GPU slabs)
  size_t staging_buffers_peak = 0;        // most held at once by readers and copies in flight
  double staging_alloc_seconds = 0;       // time spent allocating them (pinned memory is slow)
  double readers_started_seconds = 0;     // since the start: files opened, staging, threads up
  double items_made_seconds = 0;          // since the start: the last work item made (readers
                                          // start on the first ones while the rest are made)
  double reader_busy_seconds = 0;         // summed over reader threads: time reading/staging items
  double readers_first_done_seconds = 0;  // since the start: the first reader out of work
  double readers_last_done_seconds = 0;   // and the last (the spread is the load's tail)
  double seconds = 0;                     // the whole load_into_slab call
};

// How to load. The defaults suit a GPU server; every field has a safe fallback.
struct LoadOptions {
  // Threads reading the checkpoint; 0: min(16, cores) for host slabs, min(16, cores - cores / 4)
  // when the bytes go through staging (GPU slabs).
  size_t reader_threads = 0;
  // Largest piece of work: bytes read at once, and bytes of one staging buffer (casts count the
  // larger of source and target bytes). Rounded down to a multiple of 8, at least 64.
  uint64_t chunk_bytes = 4ull << 20;
  // Staging memory (pinned for GPU slabs) allocated as needed up to this bound, at least one
  // buffer whatever the value. Readers wait for a free buffer when all are taken. Host slabs need
  // none. Besides it, each reader may hold one bounce buffer of chunk_bytes (casts, O_DIRECT).
  uint64_t staging_bytes = 128ull << 20;
  // Streams the asynchronous copies into a GPU slab are spread over.
  size_t copy_streams = 4;
  DirectIo direct_io = DirectIo::kAuto;
  // GPU slabs: how the pinned staging memory is made. kRegistered: an anonymous mapping on
  // transparent huge pages, pinned with cuMemHostRegister (about twice as fast to pin as
  // cuMemHostAlloc on an H200; falls back to it when refused). kHostAlloc: cuMemHostAlloc.
  PinnedMemory pinned_memory = PinnedMemory::kRegistered;
  // GPU slabs: pinned staging buffers are kept for later loads of this process (at most 256 MiB
  // per GPU) rather than freed, so that only the first load pays for pinning them.
  bool keep_staging = true;
  // Buffered reads of a row shard (pieces of each row with other ranks' bytes between): a gap of
  // at most this many bytes is read within the same preadv(2) and dropped, a longer one starts
  // another call (at most 1 MiB; see engine::kMaxBridgedGap for why 8 KiB).
  uint64_t bridged_gap_bytes = 8ull << 10;
  // Test hook: nullptr reads with pread(2).
  ReadSource* read_source = nullptr;
  // Filled in when not null (also when the load fails).
  LoadStats* stats = nullptr;
};

// Reads every tensor into the slab: reader threads pread pieces of at most chunk_bytes (casting
// them when the plan says so) straight into host slabs, or into a bounded pool of staging buffers
// whose bytes a sink copies into the slab (asynchronous copies on several streams for CUDA slabs;
// a buffer is reused once its copies are done). Progress counts source bytes (bytes_to_read): it
// is reported from the calling thread, monotonic, at most about 256 times a load, and always with
// the total at the end of a successful load.
// Stops with kCancelled soon after `cancel` becomes true (also when it is set from `progress`).
// The first error stops every thread; nothing is left running or allocated when it returns (but
// the pinned staging that keep_staging keeps for the next load).
// A file that changed under us (shorter than its header says) is kBadCheckpoint; a failed read is
// kIoError.
Result<void> load_into_slab(const LoadPlan& plan, memory::Slab& slab, const ProgressFn& progress,
                            const std::atomic<bool>& cancel, const LoadOptions& options);
// The same with the default options.
Result<void> load_into_slab(const LoadPlan& plan, memory::Slab& slab, const ProgressFn& progress,
                            const std::atomic<bool>& cancel);

// Copies every segment of `source`, which Slab::read reads (the host tier's copy), into `target`,
// which has the same segment sizes, the way a load fills a slab: reader threads read pieces of at
// most chunk_bytes straight into host-addressable segments, or into the load's staging (pinned
// buffers and asynchronous copies on several streams for CUDA slabs, reusing the buffers loads
// keep); a source whose bytes are page-locked (Slab::pinned_host_bytes) goes into a CUDA slab by
// DMA straight from them. Progress and cancel as load_into_slab; when it returns, no copy into
// target is in flight.
Result<void> copy_slab(memory::Slab& source, memory::Slab& target, const ProgressFn& progress,
                       const std::atomic<bool>& cancel, const LoadOptions& options = {});

// GPU `ordinal`: pins, ahead of time, the staging buffers a load with `options` uses and keeps them
// for the process's next load (what a finished load does with its own), so that the first load
// runs as fast as later ones. Meant for a background thread at server start. Returns how many
// buffers were pinned; 0 when `keep_staging` is off.
Result<size_t> pin_staging(int ordinal, const LoadOptions& options = {});

}  // namespace companion::loader
