// Building, sealing, mapping and validating protocol 1.2's tensor tables.
#include "protocol/tensor_table.hpp"

#include <fcntl.h>
#include <flatbuffers/flatbuffers.h>
#include <sys/mman.h>
#include <sys/stat.h>

#include <bit>
#include <cerrno>
#include <cstddef>
#include <cstring>
#include <limits>

#include "protocol/companion_generated.h"
#include "protocol/limits.hpp"

namespace companion::protocol {
namespace {

namespace fb = flatbuffers;

static_assert(std::endian::native == std::endian::little);
static_assert(sizeof(wire::TensorRecord) == sizeof(TableRecord));
static_assert(alignof(wire::TensorRecord) == alignof(TableRecord));
static_assert(offsetof(TableRecord, offset) == 0 && offsetof(TableRecord, nbytes) == 8 &&
              offsetof(TableRecord, name_offset) == 16 &&
              offsetof(TableRecord, dims_offset) == 20 && offsetof(TableRecord, segment) == 24 &&
              offsetof(TableRecord, name_length) == 28 && offsetof(TableRecord, dtype) == 30 &&
              offsetof(TableRecord, ndim) == 31);

constexpr uint8_t kHashFnv1a64 = 1;

Error bad_table(const std::string& why) {
  return make_error(StatusCode::kProtocolError, "malformed tensor table: " + why);
}

Error too_large(const std::string& why) {
  return make_error(StatusCode::kLimitExceeded, why);
}

std::string errno_text(const char* what) {
  return std::string(what) + ": " + std::strerror(errno);
}

template <typename T>
bool aligned(const void* p) {
  return reinterpret_cast<uintptr_t>(p) % alignof(T) == 0;
}

// Slots for n names: a power of two, at most half full.
size_t index_slots(size_t n) {
  return n == 0 ? 0 : std::bit_ceil(2 * n);
}

}  // namespace

uint64_t table_name_hash(std::string_view name) noexcept {
  uint64_t h = 14695981039346656037ull;
  for (unsigned char c : name) {
    h ^= c;
    h *= 1099511628211ull;
  }
  return h;
}

// ---- view ------------------------------------------------------------------------------------

Result<TensorTableView> TensorTableView::open(std::span<const uint8_t> bytes,
                                              std::span<const uint64_t> segment_sizes) {
  if (bytes.size() > kMaxTableBytes)
    return bad_table(std::to_string(bytes.size()) + " bytes (at most " +
                     std::to_string(kMaxTableBytes) + ")");
  if (!aligned<uint64_t>(bytes.data())) return bad_table("misaligned buffer");
  // Struct and scalar vectors: the verifier checks each in O(1).
  fb::Verifier verifier(bytes.data(), bytes.size(), 4, 16);
  if (!verifier.VerifyBuffer<wire::TensorTable>(nullptr)) return bad_table("failed verification");
  const auto* table = fb::GetRoot<wire::TensorTable>(bytes.data());
  TensorTableView view;
  if (const auto* records = table->records()) {
    if (records->size() > kMaxTableTensors)
      return bad_table(std::to_string(records->size()) + " tensors (at most " +
                       std::to_string(kMaxTableTensors) + ")");
    // The verifier checks alignment relative to the buffer, which is 8-aligned (above).
    view.records_ = std::span<const TableRecord>(
        reinterpret_cast<const TableRecord*>(records->Data()), records->size());
  }
  if (const auto* names = table->names())
    view.names_ =
        std::span<const char>(reinterpret_cast<const char*>(names->Data()), names->size());
  if (const auto* dims = table->dims())
    view.dims_ =
        std::span<const int64_t>(reinterpret_cast<const int64_t*>(dims->Data()), dims->size());
  const size_t count = view.records_.size();
  if (const auto* index = table->index(); index != nullptr && table->hash() == kHashFnv1a64)
    view.index_ =
        std::span<const uint32_t>(reinterpret_cast<const uint32_t*>(index->Data()), index->size());
  if (count > 0 && (view.index_.size() < count || !std::has_single_bit(view.index_.size())))
    return bad_table("its name index is missing or not a power of two of at least " +
                     std::to_string(count) + " slots");
  if (!aligned<TableRecord>(view.records_.data()) || !aligned<int64_t>(view.dims_.data()) ||
      !aligned<uint32_t>(view.index_.data()))
    return bad_table("misaligned arrays");

  const uint64_t name_bytes = view.names_.size();
  const uint64_t dim_count = view.dims_.size();
  for (size_t i = 0; i < count; ++i) {
    const TableRecord& r = view.records_[i];
    auto which = [&] { return "record " + std::to_string(i); };
    if (r.name_length == 0 || r.name_length > kMaxNameBytes ||
        uint64_t{r.name_offset} + r.name_length >= name_bytes ||
        view.names_[r.name_offset + r.name_length] != '\0')
      return bad_table(which() + " has no valid name");
    if (r.dtype >= kDTypeCount) return bad_table(which() + " has an unknown dtype");
    if (r.ndim > kMaxRank) return bad_table(which() + " has too many dims");
    if (uint64_t{r.dims_offset} + 2 * uint64_t{r.ndim} > dim_count)
      return bad_table(which() + " has dims outside the table");
    uint64_t elements = 1;
    for (size_t d = 0; d < r.ndim; ++d) {
      int64_t n = view.dims_[r.dims_offset + d];
      if (n < 0) return bad_table(which() + " has a negative dim");
      if (n != 0 && elements > std::numeric_limits<uint64_t>::max() / static_cast<uint64_t>(n))
        return bad_table(which() + " is too large");
      elements *= static_cast<uint64_t>(n);
    }
    uint64_t element_bytes = dtype_size(static_cast<DType>(r.dtype));
    if (elements > std::numeric_limits<uint64_t>::max() / element_bytes ||
        elements * element_bytes != r.nbytes)
      return bad_table(which() + "'s size does not match its shape");
    if (r.segment >= segment_sizes.size()) return bad_table(which() + " names a missing segment");
    uint64_t segment_bytes = segment_sizes[r.segment];
    if (r.offset > segment_bytes || r.nbytes > segment_bytes - r.offset)
      return bad_table(which() + " lies outside its segment");
  }
  return view;
}

size_t TensorTableView::find(std::string_view name) const noexcept {
  const size_t slots = index_.size();
  if (slots == 0 || name.empty()) return npos;
  const size_t mask = slots - 1;  // a power of two (open() checked)
  size_t slot = static_cast<size_t>(table_name_hash(name)) & mask;
  for (size_t probe = 0; probe < slots; ++probe, slot = (slot + 1) & mask) {
    uint32_t entry = index_[slot];
    if (entry == 0) return npos;
    size_t i = entry - 1;
    if (i >= records_.size()) continue;  // corrupt: skip, it can match nothing
    const TableRecord& r = records_[i];
    if (r.name_length == name.size() &&
        std::memcmp(names_.data() + r.name_offset, name.data(), name.size()) == 0)
      return i;
  }
  return npos;
}

// ---- builder ---------------------------------------------------------------------------------

TensorTableBuilder::TensorTableBuilder(size_t expected_tensors, size_t expected_name_bytes) {
  records_.reserve(expected_tensors);
  names_.reserve(expected_name_bytes + expected_tensors);
  dims_.reserve(expected_tensors * 4);
}

Result<void> TensorTableBuilder::add(std::string_view name, DType dtype,
                                     std::span<const int64_t> shape,
                                     std::span<const int64_t> strides, uint32_t segment,
                                     uint64_t offset, uint64_t nbytes) {
  if (records_.size() >= kMaxTableTensors)
    return too_large("a model has at most " + std::to_string(kMaxTableTensors) + " tensors");
  if (name.empty() || name.size() > kMaxNameBytes)
    return too_large("tensor names are 1 to " + std::to_string(kMaxNameBytes) + " bytes");
  if (shape.size() > kMaxRank)
    return too_large("tensor '" + std::string(name) + "' has more than " +
                     std::to_string(kMaxRank) + " dims");
  if (!strides.empty() && strides.size() != shape.size())
    return too_large("tensor '" + std::string(name) + "' has strides that do not match its shape");
  if (names_.size() + name.size() + 1 > kMaxTableBytes ||
      dims_.size() + 2 * shape.size() > kMaxTableBytes / sizeof(int64_t))
    return too_large("a tensor table takes at most " + std::to_string(kMaxTableBytes) + " bytes");
  TableRecord r{};
  r.offset = offset;
  r.nbytes = nbytes;
  r.name_offset = static_cast<uint32_t>(names_.size());
  r.dims_offset = static_cast<uint32_t>(dims_.size());
  r.segment = segment;
  r.name_length = static_cast<uint16_t>(name.size());
  r.dtype = static_cast<uint8_t>(dtype);
  r.ndim = static_cast<uint8_t>(shape.size());
  records_.push_back(r);
  names_.insert(names_.end(), name.begin(), name.end());
  names_.push_back('\0');
  dims_.insert(dims_.end(), shape.begin(), shape.end());
  if (!strides.empty()) {
    dims_.insert(dims_.end(), strides.begin(), strides.end());
  } else {
    size_t first = dims_.size();
    dims_.resize(first + shape.size());
    int64_t step = 1;
    for (size_t d = shape.size(); d-- > 0;) {
      dims_[first + d] = step;
      step *= shape[d];
    }
  }
  return ok_result();
}

Result<std::vector<uint8_t>> TensorTableBuilder::serialize() const {
  const size_t count = records_.size();
  std::vector<uint32_t> index(index_slots(count), 0);
  const size_t mask = index.empty() ? 0 : index.size() - 1;
  for (size_t i = 0; i < count; ++i) {
    const TableRecord& r = records_[i];
    size_t slot = static_cast<size_t>(table_name_hash(
                      std::string_view(names_.data() + r.name_offset, r.name_length))) &
                  mask;
    while (index[slot] != 0) slot = (slot + 1) & mask;
    index[slot] = static_cast<uint32_t>(i + 1);
  }
  uint64_t estimate = 256 + count * sizeof(TableRecord) + names_.size() +
                      dims_.size() * sizeof(int64_t) + index.size() * sizeof(uint32_t);
  if (estimate > kMaxTableBytes)
    return too_large("this model's tensor table would take " + std::to_string(estimate) +
                     " bytes; at most " + std::to_string(kMaxTableBytes));
  fb::FlatBufferBuilder b(static_cast<size_t>(estimate));
  auto index_vec = b.CreateVector(index);
  auto dims_vec = b.CreateVector(dims_);
  auto names_vec = b.CreateVector(reinterpret_cast<const uint8_t*>(names_.data()), names_.size());
  auto records_vec =
      b.CreateVectorOfStructs(reinterpret_cast<const wire::TensorRecord*>(records_.data()), count);
  b.Finish(wire::CreateTensorTable(b, records_vec, names_vec, dims_vec, index_vec, kHashFnv1a64));
  return std::vector<uint8_t>(b.GetBufferPointer(), b.GetBufferPointer() + b.GetSize());
}

// ---- shared table ----------------------------------------------------------------------------

SharedTensorTable::~SharedTensorTable() {
  if (base_ != nullptr) ::munmap(base_, bytes_);
}

Result<std::shared_ptr<const SharedTensorTable>> SharedTensorTable::create(
    std::span<const uint8_t> bytes, std::span<const uint64_t> segment_sizes) {
  if (bytes.empty() || bytes.size() > kMaxTableBytes)
    return too_large("a tensor table takes 1 to " + std::to_string(kMaxTableBytes) + " bytes");
  UniqueFd fd(::memfd_create("companion-table", MFD_CLOEXEC | MFD_ALLOW_SEALING));
  if (!fd) return make_error(StatusCode::kInternal, errno_text("memfd_create"));
  size_t written = 0;
  while (written < bytes.size()) {
    ssize_t n = ::write(fd.get(), bytes.data() + written, bytes.size() - written);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return make_error(StatusCode::kOutOfMemory, errno_text("writing the table"));
    written += static_cast<size_t>(n);
  }
  if (::fcntl(fd.get(), F_ADD_SEALS, F_SEAL_WRITE | F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL) != 0)
    return make_error(StatusCode::kInternal, errno_text("sealing the table"));
  return map_sealed(std::move(fd), bytes.size(), segment_sizes, true);
}

Result<std::shared_ptr<const SharedTensorTable>> SharedTensorTable::map(
    UniqueFd fd, uint64_t bytes, std::span<const uint64_t> segment_sizes) {
  return map_sealed(std::move(fd), bytes, segment_sizes, false);
}

Result<std::shared_ptr<const SharedTensorTable>> SharedTensorTable::adopt(
    UniqueFd fd, uint64_t bytes, std::span<const uint64_t> segment_sizes) {
  return map_sealed(std::move(fd), bytes, segment_sizes, true);
}

Result<std::shared_ptr<const SharedTensorTable>> SharedTensorTable::map_sealed(
    UniqueFd fd, uint64_t bytes, std::span<const uint64_t> segment_sizes, bool keep_fd) {
  if (!fd) return bad_table("no descriptor");
  if (bytes == 0 || bytes > kMaxTableBytes)
    return bad_table(std::to_string(bytes) + " bytes (1 to " + std::to_string(kMaxTableBytes) +
                     ")");
  int seals = ::fcntl(fd.get(), F_GET_SEALS);
  constexpr int kNeeded = F_SEAL_WRITE | F_SEAL_SHRINK;
  if (seals < 0 || (seals & kNeeded) != kNeeded)
    return bad_table("its descriptor is not a memfd sealed against writing and shrinking");
  struct stat st {};
  if (::fstat(fd.get(), &st) != 0 || st.st_size < 0 || static_cast<uint64_t>(st.st_size) < bytes)
    return bad_table("its memfd holds fewer than " + std::to_string(bytes) + " bytes");
  // MAP_POPULATE: every page is read by the validation pass anyway; one call maps them all.
  void* base = ::mmap(nullptr, bytes, PROT_READ, MAP_SHARED | MAP_POPULATE, fd.get(), 0);
  if (base == MAP_FAILED) return make_error(StatusCode::kOutOfMemory, errno_text("mmap"));
  std::shared_ptr<SharedTensorTable> table(new SharedTensorTable());
  table->base_ = base;
  table->bytes_ = bytes;
  if (keep_fd) table->fd_ = std::move(fd);
  COMPANION_ASSIGN_OR_RETURN(
      table->view_,
      TensorTableView::open(std::span<const uint8_t>(static_cast<const uint8_t*>(base), bytes),
                            segment_sizes));
  return std::shared_ptr<const SharedTensorTable>(std::move(table));
}

Result<UniqueFd> SharedTensorTable::share() const {
  if (!fd_) return make_error(StatusCode::kInternal, "this tensor table has no descriptor");
  UniqueFd copy(::fcntl(fd_.get(), F_DUPFD_CLOEXEC, 0));
  if (!copy) return make_error(StatusCode::kOutOfMemory, errno_text("dup"));
  return copy;
}

}  // namespace companion::protocol
