// The tensor table of protocol 1.2: one FlatBuffer (root TensorTable in companion.fbs) per model
// generation, built once by the server into a sealed memfd that every lease shares, mapped
// read-only by clients. Readers validate every record once (TensorTableView::open) and then use
// the table in place: names, shapes and strides are views into the mapping.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "common/unique_fd.hpp"
#include "companion/result.hpp"
#include "companion/types.hpp"
#include "protocol/messages.hpp"

namespace companion::protocol {

// The name index's hash: 64-bit FNV-1a of the name's bytes. Chosen for being trivial to
// implement the same way in any client (C, Python) and needing no library; the server hashes
// each name once per load, a client only the names it looks up.
uint64_t table_name_hash(std::string_view name) noexcept;

// The layout of wire::TensorRecord (tensor_table.cpp checks that they agree), so that records
// can be read inline without FlatBuffers' headers.
struct TableRecord {
  uint64_t offset;
  uint64_t nbytes;
  uint32_t name_offset;
  uint32_t dims_offset;
  uint32_t segment;
  uint16_t name_length;
  uint8_t dtype;
  uint8_t ndim;
};
static_assert(sizeof(TableRecord) == 32);

// A validated table in memory that someone else keeps alive (a mapping, a buffer).
class TensorTableView {
 public:
  static constexpr size_t npos = static_cast<size_t>(-1);

  TensorTableView() = default;
  // Verifies `bytes` (FlatBuffers verifier) and validates every record: name and dims within
  // their arrays, a NUL after each name, dtype, rank, sizes matching nbytes, segment index and
  // extent within segment_sizes. The name index must have a power-of-two number of slots, at
  // least one per record; its entries are checked by find() as it reads them. Any fault is
  // kProtocolError saying what.
  static Result<TensorTableView> open(std::span<const uint8_t> bytes,
                                      std::span<const uint64_t> segment_sizes);

  size_t size() const noexcept { return records_.size(); }
  TensorRef operator[](size_t i) const noexcept {
    const TableRecord& r = records_[i];
    TensorRef t;
    t.name = std::string_view(names_.data() + r.name_offset, r.name_length);
    t.dtype = static_cast<DType>(r.dtype);
    t.shape = dims_.subspan(r.dims_offset, r.ndim);
    t.strides = dims_.subspan(r.dims_offset + r.ndim, r.ndim);
    t.segment = r.segment;
    t.offset = r.offset;
    t.nbytes = r.nbytes;
    return t;
  }
  const TableRecord& record(size_t i) const noexcept { return records_[i]; }
  // The record named `name`, or npos. A corrupt index gives npos, never a wrong record or a read
  // outside the table.
  size_t find(std::string_view name) const noexcept;

  std::span<const char> names() const noexcept { return names_; }  // NUL after each name
  std::span<const int64_t> dims() const noexcept { return dims_; }

 private:
  std::span<const TableRecord> records_;
  std::span<const char> names_;
  std::span<const int64_t> dims_;
  std::span<const uint32_t> index_;
};

// Collects a table's tensors and serialises it (names, dims and the name index included).
class TensorTableBuilder {
 public:
  explicit TensorTableBuilder(size_t expected_tensors = 0, size_t expected_name_bytes = 0);
  // Empty strides mean row-major contiguous. A limit passed (name
  // length, rank, tensor count, table bytes): kLimitExceeded.
  Result<void> add(std::string_view name, DType dtype, std::span<const int64_t> shape,
                   std::span<const int64_t> strides, uint32_t segment, uint64_t offset,
                   uint64_t nbytes);
  size_t size() const noexcept { return records_.size(); }
  // The TensorTable FlatBuffer.
  Result<std::vector<uint8_t>> serialize() const;

 private:
  std::vector<TableRecord> records_;
  std::vector<char> names_;
  std::vector<int64_t> dims_;
};

// One table in a memfd sealed against writing, shrinking, growing and further seals, mapped
// read-only. The server keeps one per generation (with its descriptor, to send); a client keeps
// its mapping as long as the views into it live.
class SharedTensorTable {
 public:
  // Writes `bytes` (a serialized table) into a new sealed memfd and maps it.
  static Result<std::shared_ptr<const SharedTensorTable>> create(
      std::span<const uint8_t> bytes, std::span<const uint64_t> segment_sizes);
  // Maps a received table: the descriptor must carry F_SEAL_WRITE and F_SEAL_SHRINK (so its
  // content cannot change or vanish under the mapping) and hold at least `bytes` bytes, at most
  // kMaxTableBytes. The descriptor is closed once mapped.
  static Result<std::shared_ptr<const SharedTensorTable>> map(
      UniqueFd fd, uint64_t bytes, std::span<const uint64_t> segment_sizes);

  // Restart without reload: a table an earlier server made (create()), its descriptor held by
  // the keeper meanwhile. Checked as map() checks, and the descriptor kept to share().
  static Result<std::shared_ptr<const SharedTensorTable>> adopt(
      UniqueFd fd, uint64_t bytes, std::span<const uint64_t> segment_sizes);

  ~SharedTensorTable();
  SharedTensorTable(const SharedTensorTable&) = delete;
  SharedTensorTable& operator=(const SharedTensorTable&) = delete;

  const TensorTableView& view() const noexcept { return view_; }
  size_t size() const noexcept { return view_.size(); }
  uint64_t bytes() const noexcept { return bytes_; }
  // A new descriptor of the memfd, to send (only tables made by create() keep theirs).
  Result<UniqueFd> share() const;

 private:
  SharedTensorTable() = default;
  static Result<std::shared_ptr<const SharedTensorTable>> map_sealed(
      UniqueFd fd, uint64_t bytes, std::span<const uint64_t> segment_sizes, bool keep_fd);

  UniqueFd fd_;
  void* base_ = nullptr;
  uint64_t bytes_ = 0;
  TensorTableView view_;
};

}  // namespace companion::protocol
