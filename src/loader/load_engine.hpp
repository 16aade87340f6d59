// The copy engine behind load_into_slab: the plan's extents cut into work items, reader threads
// that pread them (O_DIRECT when asked) and cast them, and a ChunkSink that puts the bytes into the
// slab. Exposed for tests; everyone else calls load_into_slab.
#pragma once

#include <sys/uio.h>

#include <atomic>
#include <climits>
#include <cstdint>
#include <span>
#include <utility>
#include <vector>

#include "companion/result.hpp"
#include "companion/types.hpp"
#include "loader/chunk_sink.hpp"
#include "loader/loader.hpp"

namespace companion::loader::engine {

// Pieces of one tensor with gaps up to this many bytes between them stay in one item
// (tensor-parallel row shards: one extent per row, the other ranks' columns between). O_DIRECT
// reads the item's whole range, gaps included; buffered reads gather only the pieces (see
// gather_reads).
inline constexpr uint64_t kMaxGapBytes = 128ull << 10;

// Buffered reads of an item with gaps: a gap of at most this many bytes is read within the same
// preadv(2) into a scratch buffer and dropped; a longer one starts another call. Copying a few KiB
// out of the page cache into a cache-hot scratch costs about what a system call does (measured:
// 4 KiB gaps read faster bridged, 14 KiB ones split).
inline constexpr uint64_t kMaxBridgedGap = 8ull << 10;
static_assert(kMaxBridgedGap == LoadOptions{}.bridged_gap_bytes);
// The largest bridged gap LoadOptions may ask for (a reader's scratch buffer).
inline constexpr uint64_t kBridgedGapLimit = 1ull << 20;

// The most iovecs one preadv(2) takes.
inline constexpr size_t kMaxIovecs = IOV_MAX;

// One run of whole source elements and where its (cast) bytes go.
struct Piece {
  uint64_t file_offset = 0;  // absolute, in the item's file
  uint64_t source_bytes = 0;
  DType from = DType::kU8;
  DType to = DType::kU8;
  uint32_t segment = 0;
  uint64_t dst_offset = 0;    // in the segment
  uint64_t stage_offset = 0;  // packed items: where its target bytes sit in the staging buffer
};

// A contiguous file range read at once, and what to do with its bytes. Either the staging buffer
// holds the file's bytes as they are (the image: ops' stage offsets are from `lo`), or, when
// `packed`, pieces are cast / copied out of the image into the staging buffer back to back (ops'
// stage offsets are from the buffer's start). Packing is used for casts and wherever it saves
// copies (rows of a shard, with the other ranks' bytes between them). Where the pieces leave gaps
// and the file is read through the page cache, only the pieces are read, each straight to where
// the layout puts it (gather_reads): no image, no pack copy.
struct WorkItem {
  uint32_t file = 0;
  uint64_t lo = 0;  // file range to read, gaps included
  uint64_t hi = 0;
  uint64_t source_bytes = 0;  // progress: the pieces' source bytes
  bool packed = false;
  std::vector<Piece> pieces;  // in file order
  std::vector<CopyOp> ops;    // into the slab, adjacent copies merged
  // Bytes of staging the item needs: hi - lo (image) or the pieces' target bytes (packed).
  uint64_t stage_bytes() const;
  // Bytes of [lo, hi) that no piece needs (other ranks' columns).
  bool has_gaps() const { return source_bytes < hi - lo; }
};

// Reads of an item's pieces only: preadv(2) calls, each `bytes` of the file from `offset` into
// iovecs[first, first + count) in order.
struct GatherReads {
  struct Call {
    uint64_t offset = 0;
    uint64_t bytes = 0;
    size_t first = 0;
    size_t count = 0;
  };
  std::vector<iovec> iovecs;
  std::vector<Call> calls;
};

// The calls that read piece i of `item` (source bytes) to piece_dst[i] and nothing else but gaps of
// at most max_bridged_gap, which go to `scratch` (at least that big; every gap overwrites it). A
// longer gap ends a call, and so do max_iov iovecs (≥ 2).
GatherReads gather_reads(const WorkItem& item, std::span<char* const> piece_dst, char* scratch,
                         uint64_t max_bridged_gap = kMaxBridgedGap, size_t max_iov = kMaxIovecs);

// Cuts every extent of the plan into items of at most chunk_bytes, both the file range read and
// the staging bytes (chunk_bytes ≥ 16, whole elements). Items follow file order (file, offset).
// An item holds pieces of one tensor only (several extents of it when they lie within max_gap of
// each other): progress, cancellation and Slab::write() calls keep at least a tensor's
// granularity. Splits of big extents fall on multiples of kDirectAlign in the file where the
// element size allows. kInternal for a plan that does not fit the slab (segment_sizes) or has a
// partial element.
Result<std::vector<WorkItem>> make_work_items(const LoadPlan& plan,
                                              const std::vector<uint64_t>& segment_sizes,
                                              uint64_t chunk_bytes,
                                              uint64_t max_gap = kMaxGapBytes);

// make_work_items one tensor at a time, so that reading starts when the first tensor's items
// exist: a row-split shard has one extent per row (260,000 in an 8B model's rank), and making
// all of its items first cost tens of milliseconds before the first read.
class WorkItemMaker {
 public:
  // Checks each tensor's file, dtypes and segment and orders the tensors by their first extent
  // (O(tensors)); the extents themselves are checked as next() reaches them.
  static Result<WorkItemMaker> create(const LoadPlan& plan, std::vector<uint64_t> segment_sizes,
                                      uint64_t chunk_bytes, uint64_t max_gap = kMaxGapBytes);
  // Appends the items of the next tensor in file order to `out`; false once every tensor is done.
  Result<bool> next(std::vector<WorkItem>& out);
  // Tensors with bytes to read, plus the plan's bytes in chunks: about how many items there are
  // (how many reader threads can be busy).
  size_t estimated_items() const;

 private:
  struct Order {
    uint32_t file;
    uint64_t offset;
    size_t tensor;
  };
  WorkItemMaker(const LoadPlan& plan, std::vector<uint64_t> segment_sizes, uint64_t chunk_bytes,
                uint64_t max_gap)
      : plan_(&plan),
        segment_sizes_(std::move(segment_sizes)),
        chunk_(chunk_bytes),
        max_gap_(max_gap) {}
  Result<void> check_extents(const TensorCopy& tensor) const;

  const LoadPlan* plan_;
  std::vector<uint64_t> segment_sizes_;
  uint64_t chunk_;
  uint64_t max_gap_;
  std::vector<Order> order_;
  size_t next_ = 0;
};

// load_into_slab with its options resolved.
Result<void> run(const LoadPlan& plan, memory::Slab& slab, const ProgressFn& progress,
                 const std::atomic<bool>& cancel, const LoadOptions& options);

}  // namespace companion::loader::engine
