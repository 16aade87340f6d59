// The copy engine behind load_into_slab: the plan's extents cut into work items, reader threads
// that pread them (O_DIRECT when asked) and cast them, and a ChunkSink that puts the bytes into the
// slab. Exposed for tests; everyone else calls load_into_slab.
#pragma once

#include <atomic>
#include <cstdint>
#include <vector>

#include "companion/result.hpp"
#include "companion/types.hpp"
#include "loader/chunk_sink.hpp"
#include "loader/loader.hpp"

namespace companion::loader::engine {

// Gaps between pieces of one file up to this many bytes are read along rather than starting a
// new item (tensor-parallel row shards: one extent per row, the other ranks' columns between).
inline constexpr uint64_t kMaxGapBytes = 128ull << 10;

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
// copies (rows of a shard, with the other ranks' bytes between them).
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
};

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

// load_into_slab with its options resolved.
Result<void> run(const LoadPlan& plan, memory::Slab& slab, const ProgressFn& progress,
                 const std::atomic<bool>& cancel, const LoadOptions& options);

}  // namespace companion::loader::engine
