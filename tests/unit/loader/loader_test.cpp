// make_load_plan + load_into_slab into real host slabs: bytes as stored, casts bit-exact with
// convert_elements, several segments, chunked big tensors, progress, cancellation, files that
// change under the loader, and slabs without a host address (the write() path).
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cstring>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "checkpoint/checkpoint.hpp"
#include "checkpoint/dtype_convert.hpp"
#include "loader/loader.hpp"
#include "memory/host_backend.hpp"
#include "test_support.hpp"

namespace companion::loader {
namespace {

using testing::random_tensor;
using testing::read_back;
using testing::safetensors_file;
using testing::TempDir;
using testing::TensorData;
using testing::WrappedBackend;
using testing::WrappedSlab;

constexpr uint64_t kMiB = 1ull << 20;

const std::vector<DType> kAllDtypes = {DType::kBool, DType::kU8,     DType::kI8,    DType::kU16,
                                       DType::kI16,  DType::kF16,    DType::kBF16,  DType::kU32,
                                       DType::kI32,  DType::kF32,    DType::kU64,   DType::kI64,
                                       DType::kF64,  DType::kF8E4M3, DType::kF8E5M2};

Result<checkpoint::Checkpoint> open(const TempDir& dir, const std::string& rel) {
  return checkpoint::open_checkpoint(dir / rel, {dir.path()});
}

// The bytes a tensor should have in the slab: as stored, or converted when cast.
std::string expected_bytes(const TensorData& t, DType target) {
  if (target == t.dtype) return t.bytes;
  size_t count = t.bytes.size() / dtype_size(t.dtype);
  std::string out(count * dtype_size(target), '\0');
  auto r = checkpoint::convert_elements(t.dtype, target, t.bytes.data(), out.data(), count);
  EXPECT_TRUE(r.ok()) << r.error().to_string();
  return out;
}

// Which backends a load runs against.
enum class Kind { kHost, kSmallSegments, kNoHostAddress, kSmallNoHostAddress };

std::unique_ptr<memory::Backend> make_backend(Kind kind) {
  uint64_t small = 2 * testing::page_size();
  switch (kind) {
    case Kind::kHost:
      return memory::make_host_backend();
    case Kind::kSmallSegments:
      return std::make_unique<WrappedBackend>(small, false);
    case Kind::kNoHostAddress:
      return std::make_unique<WrappedBackend>(64ull << 30, true);
    case Kind::kSmallNoHostAddress:
      return std::make_unique<WrappedBackend>(small, true);
  }
  return nullptr;
}

const char* kind_name(Kind kind) {
  switch (kind) {
    case Kind::kHost:
      return "Host";
    case Kind::kSmallSegments:
      return "SmallSegments";
    case Kind::kNoHostAddress:
      return "NoHostAddress";
    case Kind::kSmallNoHostAddress:
      return "SmallNoHostAddress";
  }
  return "?";
}

struct Loaded {
  LoadPlan plan;
  std::vector<std::string> segments;
  int writes = 0;
};

// Plans, allocates, loads and reads the slab back; fails the test on any error.
std::optional<Loaded> load(const checkpoint::Checkpoint& ckpt, std::optional<DType> cast,
                           memory::Backend& backend) {
  auto plan = make_load_plan(ckpt, cast, backend);
  EXPECT_TRUE(plan.ok()) << plan.error().to_string();
  if (!plan.ok()) return std::nullopt;
  auto slab = backend.allocate(plan->segment_sizes, "test");
  EXPECT_TRUE(slab.ok()) << slab.error().to_string();
  if (!slab.ok()) return std::nullopt;
  std::atomic<bool> cancel{false};
  auto r = load_into_slab(*plan, **slab, nullptr, cancel);
  EXPECT_TRUE(r.ok()) << r.error().to_string();
  if (!r.ok()) return std::nullopt;
  Loaded out;
  if (auto* wrapped = dynamic_cast<WrappedSlab*>(slab->get())) out.writes = wrapped->writes;
  out.segments = read_back(**slab);
  out.plan = std::move(plan).value();
  return out;
}

// Every tensor of `tensors` is in the slab where the plan says, with the expected bytes.
void expect_contents(const Loaded& loaded, const std::vector<TensorData>& tensors,
                     std::optional<DType> cast) {
  std::map<std::string, const TensorData*> by_name;
  for (const auto& t : tensors) by_name[t.name] = &t;
  ASSERT_EQ(loaded.plan.tensors.size(), tensors.size());
  ASSERT_EQ(loaded.segments.size(), loaded.plan.segment_sizes.size());
  for (const TensorCopy& copy : loaded.plan.tensors) {
    SCOPED_TRACE(copy.source.name);
    ASSERT_TRUE(by_name.count(copy.source.name));
    const TensorData& t = *by_name[copy.source.name];
    DType target = t.dtype;
    if (cast && dtype_is_float_convertible(t.dtype)) target = *cast;
    EXPECT_EQ(copy.source.dtype, t.dtype);
    EXPECT_EQ(copy.target_dtype, target);
    std::string want = expected_bytes(t, target);
    ASSERT_EQ(copy.target_bytes, want.size());
    ASSERT_LT(copy.placement.segment, loaded.segments.size());
    const std::string& segment = loaded.segments[copy.placement.segment];
    EXPECT_EQ(copy.placement.offset % kTensorAlignment, 0u);
    ASSERT_LE(copy.placement.offset + want.size(), segment.size());
    // Compare without printing megabytes on failure.
    bool same = std::memcmp(segment.data() + copy.placement.offset, want.data(), want.size()) == 0;
    EXPECT_TRUE(same) << dtype_name(t.dtype) << " -> " << dtype_name(target) << ", " << want.size()
                      << " bytes at segment " << copy.placement.segment << " offset "
                      << copy.placement.offset;
  }
}

std::vector<TensorData> all_dtype_tensors() {
  std::vector<TensorData> tensors;
  uint32_t seed = 1;
  for (DType d : kAllDtypes) {
    std::string n = dtype_name(d);
    tensors.push_back(random_tensor("m." + n, d, {3, 5}, seed++));
    tensors.push_back(random_tensor("v." + n, d, {7}, seed++));
    tensors.push_back(random_tensor("s." + n, d, {}, seed++));
    tensors.push_back(random_tensor("z." + n, d, {0, 4}, seed++));
    tensors.push_back(random_tensor("b." + n, d, {33, 31}, seed++));
  }
  return tensors;
}

class LoaderBackends : public ::testing::TestWithParam<Kind> {};

TEST_P(LoaderBackends, BytesEqualTheFileForEveryDtype) {
  TempDir dir;
  auto tensors = all_dtype_tensors();
  testing::write_file(dir / "model.safetensors", safetensors_file(tensors));
  auto ckpt = open(dir, "model.safetensors");
  ASSERT_TRUE(ckpt.ok()) << ckpt.error().to_string();
  auto backend = make_backend(GetParam());
  auto loaded = load(*ckpt, std::nullopt, *backend);
  ASSERT_TRUE(loaded);
  uint64_t total = 0;
  for (const auto& t : tensors) total += t.bytes.size();
  EXPECT_EQ(loaded->plan.bytes_to_read, total);
  EXPECT_EQ(loaded->plan.files, std::vector<std::string>{dir / "model.safetensors"});
  expect_contents(*loaded, tensors, std::nullopt);
  Kind kind = GetParam();
  bool small = kind == Kind::kSmallSegments || kind == Kind::kSmallNoHostAddress;
  bool hidden = kind == Kind::kNoHostAddress || kind == Kind::kSmallNoHostAddress;
  if (small) {
    EXPECT_GT(loaded->plan.segment_sizes.size(), 3u);
  }
  // Host addresses are written directly; hidden ones go through write().
  if (hidden) {
    EXPECT_GT(loaded->writes, 0);
  } else {
    EXPECT_EQ(loaded->writes, 0);
  }
}

TEST_P(LoaderBackends, CastsAreBitExactAndLeaveOtherDtypesAlone) {
  TempDir dir;
  auto tensors = all_dtype_tensors();
  testing::write_file(dir / "model.safetensors", safetensors_file(tensors));
  auto ckpt = open(dir, "model.safetensors");
  ASSERT_TRUE(ckpt.ok()) << ckpt.error().to_string();
  for (DType target : {DType::kBF16, DType::kF16, DType::kF32}) {
    SCOPED_TRACE(dtype_name(target));
    auto backend = make_backend(GetParam());
    auto loaded = load(*ckpt, target, *backend);
    ASSERT_TRUE(loaded);
    // Progress counts bytes read from the file, whatever the cast makes of them.
    EXPECT_EQ(loaded->plan.bytes_to_read, ckpt->total_bytes);
    expect_contents(*loaded, tensors, target);
  }
}

TEST_P(LoaderBackends, ShardedCheckpointLoadsFromEveryFile) {
  TempDir dir;
  std::vector<TensorData> a = {random_tensor("a.w", DType::kF32, {100, 3}, 7),
                               random_tensor("a.b", DType::kI64, {9}, 8)};
  std::vector<TensorData> b = {random_tensor("b.w", DType::kBF16, {1000}, 9),
                               random_tensor("b.b", DType::kU8, {5000}, 10)};
  testing::write_file(dir / "m/model-00001-of-00002.safetensors", safetensors_file(a));
  testing::write_file(dir / "m/model-00002-of-00002.safetensors", safetensors_file(b));
  auto ckpt = open(dir, "m");
  ASSERT_TRUE(ckpt.ok()) << ckpt.error().to_string();
  ASSERT_EQ(ckpt->files.size(), 2u);
  std::vector<TensorData> all = a;
  all.insert(all.end(), b.begin(), b.end());
  auto backend = make_backend(GetParam());
  for (std::optional<DType> cast : {std::optional<DType>{}, std::optional<DType>{DType::kF16}}) {
    auto loaded = load(*ckpt, cast, *backend);
    ASSERT_TRUE(loaded);
    expect_contents(*loaded, all, cast);
  }
}

INSTANTIATE_TEST_SUITE_P(, LoaderBackends,
                         ::testing::Values(Kind::kHost, Kind::kSmallSegments, Kind::kNoHostAddress,
                                           Kind::kSmallNoHostAddress),
                         [](const auto& tp) { return kind_name(tp.param); });

// The host tier's wake: a sealed host slab copied into another slab, straight into host memory
// or through write(), in pieces of chunk_bytes over several threads.
TEST(Loader, CopySlabCopiesEverySegmentByteForByte) {
  auto backend = memory::make_host_backend();
  const uint64_t page = testing::page_size();
  const std::vector<uint64_t> sizes = {page * 37, page * 5};
  auto source = backend->allocate(sizes, "copy-source");
  ASSERT_TRUE(source.ok()) << source.error().to_string();
  std::vector<std::string> bytes;
  for (size_t i = 0; i < sizes.size(); ++i) {
    bytes.push_back(testing::random_bytes(sizes[i], 70 + static_cast<uint32_t>(i)));
    ASSERT_TRUE((*source)->write(i, 0, bytes[i].data(), sizes[i]).ok());
  }
  ASSERT_TRUE((*source)->seal().ok());
  for (bool hide : {false, true}) {
    SCOPED_TRACE(hide ? "write()" : "direct");
    auto inner = backend->allocate(sizes, "copy-target");
    ASSERT_TRUE(inner.ok()) << inner.error().to_string();
    WrappedSlab target(std::move(*inner), hide);
    LoadOptions options;
    options.chunk_bytes = page * 4;
    options.reader_threads = 3;
    uint64_t last = 0;
    bool monotonic = true;
    std::atomic<bool> cancel{false};
    auto copied = copy_slab(
        **source, target,
        [&](uint64_t done, uint64_t total) {
          monotonic = monotonic && done >= last && total == page * 42;
          last = done;
        },
        cancel, options);
    ASSERT_TRUE(copied.ok()) << copied.error().to_string();
    EXPECT_TRUE(monotonic);
    EXPECT_EQ(last, page * 42);
    EXPECT_EQ(target.writes > 0, hide);
    EXPECT_EQ(read_back(target), bytes);
  }
  // A cancelled copy says so; slabs of other shapes are refused.
  auto inner = backend->allocate(sizes, "copy-cancelled");
  ASSERT_TRUE(inner.ok());
  WrappedSlab target(std::move(*inner), true);
  std::atomic<bool> cancel{true};
  EXPECT_EQ(copy_slab(**source, target, {}, cancel).error().code, StatusCode::kCancelled);
  auto other = backend->allocate({page}, "copy-other");
  ASSERT_TRUE(other.ok());
  std::atomic<bool> go{false};
  EXPECT_EQ(copy_slab(**source, **other, {}, go).error().code, StatusCode::kInternal);
}

TEST(Loader, PlanUsesSeveralSegmentsOnSmallBackends) {
  TempDir dir;
  std::vector<TensorData> tensors;
  for (int i = 0; i < 10; ++i)
    tensors.push_back(random_tensor("t" + std::to_string(i), DType::kF32, {700}, 100 + i));
  testing::write_file(dir / "model.safetensors", safetensors_file(tensors));
  auto ckpt = open(dir, "model.safetensors");
  ASSERT_TRUE(ckpt.ok()) << ckpt.error().to_string();
  WrappedBackend backend(2 * testing::page_size(), false);
  auto plan = make_load_plan(*ckpt, std::nullopt, backend);
  ASSERT_TRUE(plan.ok()) << plan.error().to_string();
  // 2800 bytes a tensor, two a segment of 8 KiB (4 KiB pages) - at least several segments.
  EXPECT_GE(plan->segment_sizes.size(), 3u);
  for (uint64_t s : plan->segment_sizes) {
    EXPECT_LE(s, backend.max_segment_bytes());
    EXPECT_EQ(s % backend.granularity(), 0u);
  }
  // A cast to BF16 halves the tensors: fewer segments.
  auto cast_plan = make_load_plan(*ckpt, DType::kBF16, backend);
  ASSERT_TRUE(cast_plan.ok());
  EXPECT_LT(cast_plan->segment_sizes.size(), plan->segment_sizes.size());
  EXPECT_EQ(cast_plan->bytes_to_read, plan->bytes_to_read);
}

TEST(Loader, TensorLargerThanTheBiggestSegmentIsInvalidArgument) {
  TempDir dir;
  std::vector<TensorData> tensors = {random_tensor("big", DType::kU8, {3 * 4096}, 1)};
  testing::write_file(dir / "model.safetensors", safetensors_file(tensors));
  auto ckpt = open(dir, "model.safetensors");
  ASSERT_TRUE(ckpt.ok()) << ckpt.error().to_string();
  WrappedBackend backend(2 * testing::page_size(), false);
  auto plan = make_load_plan(*ckpt, std::nullopt, backend);
  ASSERT_FALSE(plan.ok());
  EXPECT_EQ(plan.error().code, StatusCode::kInvalidArgument);
}

TEST(Loader, EmptyModelLoads) {
  TempDir dir;
  std::vector<TensorData> tensors = {random_tensor("z", DType::kF32, {0}, 1)};
  testing::write_file(dir / "model.safetensors", safetensors_file(tensors));
  auto ckpt = open(dir, "model.safetensors");
  ASSERT_TRUE(ckpt.ok()) << ckpt.error().to_string();
  auto backend = memory::make_host_backend();
  std::vector<std::pair<uint64_t, uint64_t>> calls;
  auto plan = make_load_plan(*ckpt, DType::kBF16, *backend);
  ASSERT_TRUE(plan.ok());
  EXPECT_EQ(plan->bytes_to_read, 0u);
  ASSERT_EQ(plan->segment_sizes.size(), 1u);
  auto slab = backend->allocate(plan->segment_sizes, "empty");
  ASSERT_TRUE(slab.ok());
  std::atomic<bool> cancel{false};
  auto r = load_into_slab(
      *plan, **slab, [&](uint64_t d, uint64_t t) { calls.emplace_back(d, t); }, cancel);
  ASSERT_TRUE(r.ok()) << r.error().to_string();
  ASSERT_FALSE(calls.empty());
  EXPECT_EQ(calls.back(), std::make_pair(uint64_t{0}, uint64_t{0}));
}

// A 40 MiB tensor crosses several 16 MiB read chunks.
struct BigCase {
  const char* name;
  DType stored;
  std::optional<DType> cast;
  bool hide_address;
};

class LoaderBigTensor : public ::testing::TestWithParam<BigCase> {};

TEST_P(LoaderBigTensor, LoadsAcrossChunksWithMonotonicProgress) {
  const BigCase& c = GetParam();
  TempDir dir;
  uint64_t elements = 40 * kMiB / dtype_size(c.stored);
  std::vector<TensorData> tensors = {
      random_tensor("head", DType::kI32, {3}, 11),
      random_tensor("big", c.stored, {static_cast<int64_t>(elements)}, 12),
      random_tensor("tail", c.stored, {1001}, 13)};
  testing::write_file(dir / "model.safetensors", safetensors_file(tensors));
  auto ckpt = open(dir, "model.safetensors");
  ASSERT_TRUE(ckpt.ok()) << ckpt.error().to_string();
  WrappedBackend backend(64ull << 30, c.hide_address);
  auto plan = make_load_plan(*ckpt, c.cast, backend);
  ASSERT_TRUE(plan.ok()) << plan.error().to_string();
  auto slab = backend.allocate(plan->segment_sizes, "big");
  ASSERT_TRUE(slab.ok()) << slab.error().to_string();

  std::vector<uint64_t> done;
  std::atomic<bool> cancel{false};
  auto r = load_into_slab(
      *plan, **slab,
      [&](uint64_t d, uint64_t total) {
        EXPECT_EQ(total, plan->bytes_to_read);
        done.push_back(d);
      },
      cancel);
  ASSERT_TRUE(r.ok()) << r.error().to_string();
  ASSERT_GE(done.size(), 4u);  // three chunks of the big tensor, the others, the final call
  for (size_t i = 1; i < done.size(); ++i) EXPECT_GE(done[i], done[i - 1]) << "call " << i;
  EXPECT_LE(done.front(), 16 * kMiB + 12);
  EXPECT_EQ(done.back(), plan->bytes_to_read);
  EXPECT_EQ(plan->bytes_to_read, ckpt->total_bytes);

  Loaded loaded;
  loaded.plan = std::move(plan).value();
  loaded.segments = read_back(**slab);
  expect_contents(loaded, tensors, c.cast);
}

INSTANTIATE_TEST_SUITE_P(
    , LoaderBigTensor,
    ::testing::Values(BigCase{"Direct", DType::kU8, std::nullopt, false},
                      BigCase{"Bounce", DType::kF32, std::nullopt, true},
                      BigCase{"DirectCastF32ToBF16", DType::kF32, DType::kBF16, false},
                      BigCase{"BounceCastBF16ToF32", DType::kBF16, DType::kF32, true}),
    [](const auto& tp) { return std::string(tp.param.name); });

TEST(Loader, CancelFromProgressCallback) {
  TempDir dir;
  // Bigger than one read chunk, so the load has more to do after the first progress call.
  std::vector<TensorData> tensors = {random_tensor("big", DType::kU8, {40 << 20}, 5),
                                     random_tensor("more", DType::kF32, {1000}, 6)};
  testing::write_file(dir / "model.safetensors", safetensors_file(tensors));
  auto ckpt = open(dir, "model.safetensors");
  ASSERT_TRUE(ckpt.ok()) << ckpt.error().to_string();
  for (bool hide : {false, true}) {
    SCOPED_TRACE(hide ? "write path" : "direct");
    WrappedBackend backend(64ull << 30, hide);
    auto plan = make_load_plan(*ckpt, std::nullopt, backend);
    ASSERT_TRUE(plan.ok());
    auto slab = backend.allocate(plan->segment_sizes, "cancel");
    ASSERT_TRUE(slab.ok());
    std::atomic<bool> cancel{false};
    std::vector<uint64_t> done;
    auto r = load_into_slab(
        *plan, **slab,
        [&](uint64_t d, uint64_t) {
          done.push_back(d);
          cancel.store(true);
        },
        cancel);
    ASSERT_FALSE(r.ok());
    EXPECT_EQ(r.error().code, StatusCode::kCancelled) << r.error().to_string();
    // Stops at the next chunk: no progress after the call that set the flag.
    ASSERT_EQ(done.size(), 1u);
    EXPECT_GT(done[0], 0u);
    EXPECT_LT(done[0], 40u << 20);
  }
}

TEST(Loader, CancelledBeforeStartReadsNothing) {
  TempDir dir;
  std::vector<TensorData> tensors = {random_tensor("t", DType::kF32, {100}, 5)};
  testing::write_file(dir / "model.safetensors", safetensors_file(tensors));
  auto ckpt = open(dir, "model.safetensors");
  ASSERT_TRUE(ckpt.ok());
  auto backend = memory::make_host_backend();
  auto plan = make_load_plan(*ckpt, std::nullopt, *backend);
  ASSERT_TRUE(plan.ok());
  auto slab = backend->allocate(plan->segment_sizes, "cancel");
  ASSERT_TRUE(slab.ok());
  std::atomic<bool> cancel{true};
  int calls = 0;
  auto r = load_into_slab(
      *plan, **slab, [&](uint64_t, uint64_t) { ++calls; }, cancel);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code, StatusCode::kCancelled);
  EXPECT_EQ(calls, 0);
}

struct TruncCase {
  const char* name;
  std::optional<DType> cast;
  bool hide_address;
};

class LoaderTruncated : public ::testing::TestWithParam<TruncCase> {};

TEST_P(LoaderTruncated, FileTruncatedAfterPlanIsBadCheckpoint) {
  const TruncCase& c = GetParam();
  TempDir dir;
  std::vector<TensorData> tensors = {random_tensor("a", DType::kF32, {1000}, 1),
                                     random_tensor("b", DType::kF32, {5 << 20}, 2),
                                     random_tensor("c", DType::kF32, {1000}, 3)};
  std::string path = dir / "model.safetensors";
  testing::write_file(path, safetensors_file(tensors));
  auto ckpt = open(dir, "model.safetensors");
  ASSERT_TRUE(ckpt.ok()) << ckpt.error().to_string();
  WrappedBackend backend(64ull << 30, c.hide_address);
  auto plan = make_load_plan(*ckpt, c.cast, backend);
  ASSERT_TRUE(plan.ok());
  auto slab = backend.allocate(plan->segment_sizes, "trunc");
  ASSERT_TRUE(slab.ok());
  // Cut the file in the middle of tensor "b".
  uint64_t cut = ckpt->tensors[1].file_offset + ckpt->tensors[1].nbytes / 2 + 3;
  ASSERT_EQ(::truncate(path.c_str(), static_cast<off_t>(cut)), 0);
  std::atomic<bool> cancel{false};
  auto r = load_into_slab(*plan, **slab, nullptr, cancel);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code, StatusCode::kBadCheckpoint) << r.error().to_string();
  EXPECT_NE(r.error().message.find(path), std::string::npos) << r.error().message;
}

INSTANTIATE_TEST_SUITE_P(, LoaderTruncated,
                         ::testing::Values(TruncCase{"Direct", std::nullopt, false},
                                           TruncCase{"Bounce", std::nullopt, true},
                                           TruncCase{"DirectCast", DType::kBF16, false},
                                           TruncCase{"BounceCast", DType::kF16, true}),
                         [](const auto& tp) { return std::string(tp.param.name); });

// The loader reads the descriptors the checkpoint opened (beneath the model roots), never the
// paths again: a path swapped or removed after the checkpoint was opened changes nothing, so what
// was checked is what is served. Through the page cache and through O_DIRECT (reopened from the
// descriptor; file systems that refuse it fall back to buffered reads).
TEST(Loader, ReadsTheFilesTheCheckpointOpenedNotWhatTheirPathsNameLater) {
  for (DirectIo direct_io : {DirectIo::kOff, DirectIo::kOn}) {
    for (bool remove : {false, true}) {
      SCOPED_TRACE(std::string(direct_io_name(direct_io)) + (remove ? " removed" : " replaced"));
      TempDir dir;
      std::vector<TensorData> opened = {random_tensor("t", DType::kF32, {100000}, 5)};
      std::vector<TensorData> swapped = {random_tensor("t", DType::kF32, {100000}, 6)};
      std::string path = dir / "model.safetensors";
      testing::write_file(path, safetensors_file(opened));
      auto ckpt = open(dir, "model.safetensors");
      ASSERT_TRUE(ckpt.ok()) << ckpt.error().to_string();
      if (remove) {
        ASSERT_EQ(::unlink(path.c_str()), 0);
      } else {
        testing::write_file(dir / "other", safetensors_file(swapped));
        ASSERT_EQ(::rename((dir / "other").c_str(), path.c_str()), 0);
      }
      auto backend = memory::make_host_backend();
      auto plan = make_load_plan(*ckpt, std::nullopt, *backend);
      ASSERT_TRUE(plan.ok());
      auto slab = backend->allocate(plan->segment_sizes, "swapped");
      ASSERT_TRUE(slab.ok());
      std::atomic<bool> cancel{false};
      LoadOptions options;
      options.direct_io = direct_io;
      auto r = load_into_slab(*plan, **slab, nullptr, cancel, options);
      ASSERT_TRUE(r.ok()) << r.error().to_string();
      std::vector<std::string> segments = read_back(**slab);
      const Placement& at = plan->tensors.at(0).placement;
      bool as_opened =
          segments.at(at.segment).compare(at.offset, opened[0].bytes.size(), opened[0].bytes) == 0;
      EXPECT_TRUE(as_opened) << "the slab does not hold the bytes of the file that was opened";
    }
  }
}

TEST(Loader, APlanWithoutDescriptorsIsRefused) {
  TempDir dir;
  std::vector<TensorData> tensors = {random_tensor("t", DType::kF32, {100}, 5)};
  testing::write_file(dir / "model.safetensors", safetensors_file(tensors));
  auto ckpt = open(dir, "model.safetensors");
  ASSERT_TRUE(ckpt.ok());
  auto backend = memory::make_host_backend();
  auto plan = make_load_plan(*ckpt, std::nullopt, *backend);
  ASSERT_TRUE(plan.ok());
  plan->file_fds.clear();  // a path alone is never opened
  auto slab = backend->allocate(plan->segment_sizes, "no-fds");
  ASSERT_TRUE(slab.ok());
  std::atomic<bool> cancel{false};
  auto r = load_into_slab(*plan, **slab, nullptr, cancel);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code, StatusCode::kInternal) << r.error().to_string();
}

}  // namespace
}  // namespace companion::loader
