// The parallel copy engine behind load_into_slab: work items, byte-exact loads with many threads
// and small random chunks (casts, shards of rows, O_DIRECT, short reads), bounded staging, failing
// reads and writes, cancellation and progress.
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <functional>
#include <map>
#include <mutex>
#include <optional>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include <gtest/gtest.h>

#include "checkpoint/checkpoint.hpp"
#include "checkpoint/dtype_convert.hpp"
#include "loader/chunk_sink.hpp"
#include "loader/layout.hpp"
#include "loader/load_engine.hpp"
#include "loader/loader.hpp"
#include "loader/page_cache.hpp"
#include "memory/host_backend.hpp"
#include "test_support.hpp"

namespace companion::loader {
namespace {

using testing::random_bytes;
using testing::random_tensor;
using testing::read_back;
using testing::safetensors_file;
using testing::TempDir;
using testing::TensorData;

using Clock = std::chrono::steady_clock;
constexpr uint64_t kKiB = 1ull << 10;
constexpr uint64_t kMiB = 1ull << 20;

// ---- read sources ------------------------------------------------------------------------------

bool is_direct(int fd) {
  int flags = ::fcntl(fd, F_GETFL);
  return flags >= 0 && (flags & O_DIRECT) != 0;
}

// pread, counting calls and the most running at once.
class CountingSource : public ReadSource {
 public:
  ssize_t pread(int fd, void* dst, size_t bytes, uint64_t offset) override {
    int now = ++running_;
    int seen = peak_.load();
    while (now > seen && !peak_.compare_exchange_weak(seen, now)) {
    }
    ++calls_;
    if (is_direct(fd)) ++direct_calls_;
    ssize_t n = read(fd, dst, bytes, offset);
    if (n > 0) bytes_ += static_cast<uint64_t>(n);
    --running_;
    return n;
  }
  int calls() const { return calls_.load(); }
  uint64_t bytes() const { return bytes_.load(); }
  int direct_calls() const { return direct_calls_.load(); }
  int running() const { return running_.load(); }

 protected:
  virtual ssize_t read(int fd, void* dst, size_t bytes, uint64_t offset) {
    return ::pread(fd, dst, bytes, static_cast<off_t>(offset));
  }

 private:
  std::atomic<int> running_{0};
  std::atomic<int> peak_{0};
  std::atomic<int> calls_{0};
  std::atomic<int> direct_calls_{0};
  std::atomic<uint64_t> bytes_{0};
};

// Fails (EIO) every read that covers byte `fail_at` of any file.
class FailingSource final : public CountingSource {
 public:
  explicit FailingSource(uint64_t fail_at) : fail_at_(fail_at) {}

 protected:
  ssize_t read(int fd, void* dst, size_t bytes, uint64_t offset) override {
    if (offset <= fail_at_ && fail_at_ < offset + bytes) {
      errno = EIO;
      return -1;
    }
    return CountingSource::read(fd, dst, bytes, offset);
  }

 private:
  uint64_t fail_at_;
};

// Ends the file early: reads at or past `eof` return 0, reads across it stop there.
class ShortFileSource final : public CountingSource {
 public:
  explicit ShortFileSource(uint64_t eof) : eof_(eof) {}

 protected:
  ssize_t read(int fd, void* dst, size_t bytes, uint64_t offset) override {
    if (offset >= eof_) return 0;
    return CountingSource::read(fd, dst, std::min<uint64_t>(bytes, eof_ - offset), offset);
  }

 private:
  uint64_t eof_;
};

// Returns random short counts (unaligned ones from O_DIRECT files too).
class ChoppySource final : public CountingSource {
 public:
  explicit ChoppySource(uint32_t seed) : rng_(seed) {}

 protected:
  ssize_t read(int fd, void* dst, size_t bytes, uint64_t offset) override {
    size_t n = bytes;
    {
      std::lock_guard lock(mutex_);
      if (bytes > 1 && rng_() % 2 == 0) n = 1 + rng_() % (bytes - 1);
    }
    if (is_direct(fd)) {
      // O_DIRECT reads must stay aligned: read everything, report a prefix.
      ssize_t got = CountingSource::read(fd, dst, bytes, offset);
      return got < 0 ? got : std::min<ssize_t>(got, static_cast<ssize_t>(n));
    }
    return CountingSource::read(fd, dst, n, offset);
  }

 private:
  std::mutex mutex_;
  std::mt19937 rng_;
};

// O_DIRECT files refuse reads (EINVAL), like some file systems do.
class NoDirectSource final : public CountingSource {
 protected:
  ssize_t read(int fd, void* dst, size_t bytes, uint64_t offset) override {
    if (is_direct(fd)) {
      errno = EINVAL;
      return -1;
    }
    return CountingSource::read(fd, dst, bytes, offset);
  }
};

// Sleeps before every read.
class SlowSource final : public CountingSource {
 public:
  explicit SlowSource(std::chrono::microseconds delay) : delay_(delay) {}

 protected:
  ssize_t read(int fd, void* dst, size_t bytes, uint64_t offset) override {
    std::this_thread::sleep_for(delay_);
    return CountingSource::read(fd, dst, bytes, offset);
  }

 private:
  std::chrono::microseconds delay_;
};

// ---- slabs -------------------------------------------------------------------------------------

// A host slab without a host address (the staging path through Slab::write()); can fail or slow
// down writes, counts them and the most running at once.
class HookedSlab final : public memory::Slab {
 public:
  explicit HookedSlab(std::unique_ptr<memory::Slab> inner) : inner_(std::move(inner)) {}
  memory::SegmentKind kind() const noexcept override { return inner_->kind(); }
  size_t segment_count() const noexcept override { return inner_->segment_count(); }
  uint64_t segment_size(size_t i) const noexcept override { return inner_->segment_size(i); }
  void* host_address(size_t) noexcept override { return nullptr; }
  Result<void> write(size_t i, uint64_t offset, const void* src, uint64_t bytes) override {
    int now = ++running;
    peak = std::max(peak.load(), now);
    int call = ++writes;
    if (delay.count() > 0) std::this_thread::sleep_for(delay);
    Result<void> r = call == fail_on_write
                         ? Result<void>(make_error(StatusCode::kIoError, "injected write failure"))
                         : inner_->write(i, offset, src, bytes);
    --running;
    return r;
  }
  Result<void> seal() override { return inner_->seal(); }
  Result<std::vector<memory::SegmentExport>> export_segments() override {
    return inner_->export_segments();
  }
  Result<std::vector<memory::SegmentExport>> export_writable() override {
    return inner_->export_writable();
  }
  Result<uint64_t> digest(size_t segment) override { return inner_->digest(segment); }

  std::atomic<int> writes{0};
  std::atomic<int> running{0};
  std::atomic<int> peak{0};
  int fail_on_write = -1;  // 1-based
  std::chrono::microseconds delay{0};

 private:
  std::unique_ptr<memory::Slab> inner_;
};

// ---- checkpoints and expectations -------------------------------------------------------------

enum class Sink { kHost, kWrite };

std::string expected_bytes(const std::string& bytes, DType from, DType to) {
  if (from == to) return bytes;
  size_t count = bytes.size() / dtype_size(from);
  std::string out(count * dtype_size(to), '\0');
  auto r = checkpoint::convert_elements(from, to, bytes.data(), out.data(), count);
  EXPECT_TRUE(r.ok()) << r.error().to_string();
  return out;
}

// A checkpoint of `count` tensors of random dtypes and sizes (some empty, some big), over
// `files` files.
struct Model {
  TempDir dir;
  std::vector<TensorData> tensors;
  checkpoint::Checkpoint ckpt;
};

std::unique_ptr<Model> make_model(uint32_t seed, int count, int files, uint64_t max_elements) {
  auto m = std::make_unique<Model>();
  std::mt19937 rng(seed);
  const DType dtypes[] = {DType::kF32, DType::kBF16, DType::kF16, DType::kU8,
                          DType::kI64, DType::kI32,  DType::kF64};
  std::vector<std::vector<TensorData>> per_file(static_cast<size_t>(files));
  for (int i = 0; i < count; ++i) {
    DType d = dtypes[rng() % std::size(dtypes)];
    uint64_t n = rng() % 8 == 0 ? 0 : 1 + rng() % max_elements;
    if (rng() % 6 == 0) n = max_elements * 4 + rng() % 1000;  // several chunks
    auto t = random_tensor("t" + std::to_string(i), d, {static_cast<int64_t>(n)}, seed * 1000 + i);
    per_file[static_cast<size_t>(i % files)].push_back(t);
    m->tensors.push_back(std::move(t));
  }
  std::string path = m->dir / "model.safetensors";
  if (files == 1) {
    testing::write_file(path, safetensors_file(per_file[0]));
  } else {
    path = m->dir / "m";
    for (int f = 0; f < files; ++f) {
      char name[64];
      std::snprintf(name, sizeof(name), "m/model-%05d-of-%05d.safetensors", f + 1, files);
      testing::write_file(m->dir / name, safetensors_file(per_file[static_cast<size_t>(f)]));
    }
  }
  auto ckpt = checkpoint::open_checkpoint(path, {m->dir.path()});
  EXPECT_TRUE(ckpt.ok()) << ckpt.error().to_string();
  if (ckpt.ok()) m->ckpt = std::move(ckpt).value();
  return m;
}

std::unique_ptr<memory::Slab> allocate(const LoadPlan& plan, Sink sink, HookedSlab** hooked) {
  auto backend = memory::make_host_backend();
  auto slab = backend->allocate(plan.segment_sizes, "engine");
  EXPECT_TRUE(slab.ok()) << slab.error().to_string();
  if (!slab.ok()) return nullptr;
  if (sink == Sink::kHost) return std::move(slab).value();
  auto h = std::make_unique<HookedSlab>(std::move(slab).value());
  if (hooked != nullptr) *hooked = h.get();
  return h;
}

// Every tensor of the plan holds its expected bytes in `segments`. `source` gives a tensor's
// source bytes for an extent (file offset, bytes).
void expect_plan_contents(const LoadPlan& plan, const std::vector<std::string>& segments,
                          const std::map<std::string, std::string>& file_bytes) {
  ASSERT_EQ(segments.size(), plan.segment_sizes.size());
  for (const TensorCopy& t : plan.tensors) {
    SCOPED_TRACE(t.source.name);
    const std::string& file = file_bytes.at(plan.files[t.source.file_index]);
    const std::string& segment = segments[t.placement.segment];
    size_t in = dtype_size(t.source.dtype);
    size_t out = dtype_size(t.target_dtype);
    uint64_t covered = 0;
    for (const ReadExtent& e : t.extents) {
      ASSERT_LE(e.file_offset + e.bytes, file.size());
      std::string want =
          expected_bytes(file.substr(e.file_offset, e.bytes), t.source.dtype, t.target_dtype);
      uint64_t at = t.placement.offset + e.dst_offset;
      ASSERT_LE(at + want.size(), segment.size());
      bool same = std::memcmp(segment.data() + at, want.data(), want.size()) == 0;
      EXPECT_TRUE(same) << "extent at file offset " << e.file_offset << " (" << e.bytes
                        << " bytes) -> segment " << t.placement.segment << " offset " << at;
      covered += e.bytes / in * out;
    }
    EXPECT_EQ(covered, t.target_bytes);
  }
}

std::map<std::string, std::string> read_files(const LoadPlan& plan) {
  std::map<std::string, std::string> out;
  for (const auto& path : plan.files) {
    std::ifstream in(path, std::ios::binary);
    out[path] = std::string(std::istreambuf_iterator<char>(in), {});
  }
  return out;
}

// A plan that takes rank `rank` of `tp` of every 2-D tensor's columns: one extent per row.
LoadPlan row_shard_plan(const checkpoint::Checkpoint& ckpt, uint32_t tp, uint32_t rank,
                        std::optional<DType> cast, const memory::Backend& backend) {
  LoadPlan plan;
  plan.files = ckpt.files;
  plan.file_fds = ckpt.fds;
  std::vector<uint64_t> sizes;
  for (const auto& t : ckpt.tensors) {
    TensorCopy copy;
    copy.source = t;
    copy.target_dtype = t.dtype;
    if (cast && dtype_is_float_convertible(t.dtype)) copy.target_dtype = *cast;
    uint64_t in = dtype_size(t.dtype);
    uint64_t out = dtype_size(copy.target_dtype);
    if (t.shape.size() == 2 && t.shape[1] % tp == 0) {
      uint64_t rows = static_cast<uint64_t>(t.shape[0]);
      uint64_t cols = static_cast<uint64_t>(t.shape[1]) / tp;
      copy.target_shape = {t.shape[0], static_cast<int64_t>(cols)};
      for (uint64_t r = 0; r < rows; ++r) {
        copy.extents.push_back(
            ReadExtent{t.file_offset + (r * tp + rank) * cols * in, cols * in, r * cols * out});
        plan.bytes_to_read += cols * in;
      }
      copy.target_bytes = rows * cols * out;
    } else {
      copy.target_shape = t.shape;
      copy.target_bytes = t.nbytes / in * out;
      if (t.nbytes > 0) copy.extents.push_back(ReadExtent{t.file_offset, t.nbytes, 0});
      plan.bytes_to_read += t.nbytes;
    }
    sizes.push_back(copy.target_bytes);
    plan.tensors.push_back(std::move(copy));
  }
  auto layout =
      plan_layout(sizes, kTensorAlignment, backend.granularity(), backend.max_segment_bytes());
  EXPECT_TRUE(layout.ok());
  for (size_t i = 0; i < plan.tensors.size(); ++i)
    plan.tensors[i].placement = layout->placements[i];
  plan.segment_sizes = layout->segment_sizes;
  return plan;
}

struct Outcome {
  Result<void> result;
  std::vector<uint64_t> progress;
  LoadStats stats;
  double seconds = 0;
};

Outcome load(const LoadPlan& plan, memory::Slab& slab, LoadOptions options,
             const std::atomic<bool>& cancel,
             const std::function<void(uint64_t)>& on_progress = {}) {
  Outcome run;
  options.stats = &run.stats;
  auto start = Clock::now();
  run.result = load_into_slab(
      plan, slab,
      [&](uint64_t done, uint64_t total) {
        EXPECT_EQ(total, plan.bytes_to_read);
        run.progress.push_back(done);
        if (on_progress) on_progress(done);
      },
      cancel, options);
  run.seconds = std::chrono::duration<double>(Clock::now() - start).count();
  return run;
}

void expect_progress_sane(const Outcome& run, uint64_t total) {
  ASSERT_FALSE(run.progress.empty());
  for (size_t i = 1; i < run.progress.size(); ++i)
    EXPECT_GE(run.progress[i], run.progress[i - 1]) << "call " << i;
  EXPECT_EQ(run.progress.back(), total);
  EXPECT_LE(run.progress.size(), 260u);  // about 256 steps, the first and the last
}

// ---- work items --------------------------------------------------------------------------------

TEST(WorkItems, TileEveryExtentWithinTheChunk) {
  std::mt19937 rng(7);
  for (int trial = 0; trial < 60; ++trial) {
    SCOPED_TRACE(trial);
    LoadPlan plan;
    plan.files = {"a", "b"};
    plan.segment_sizes = {1ull << 40, 1ull << 40};
    uint64_t offset[2] = {8, 1000};
    uint64_t dst = 0;
    const DType dtypes[] = {DType::kF32, DType::kBF16, DType::kU8, DType::kF64, DType::kF16};
    int tensors = 1 + static_cast<int>(rng() % 20);
    for (int i = 0; i < tensors; ++i) {
      TensorCopy t;
      uint32_t file = static_cast<uint32_t>(rng() % 2);
      t.source.file_index = file;
      t.source.name = "t" + std::to_string(i);
      t.source.dtype = dtypes[rng() % std::size(dtypes)];
      t.target_dtype = dtype_is_float_convertible(t.source.dtype) && rng() % 2 ? dtypes[rng() % 2]
                                                                               : t.source.dtype;
      uint64_t in = dtype_size(t.source.dtype);
      uint64_t out = dtype_size(t.target_dtype);
      int extents = 1 + static_cast<int>(rng() % 5);
      uint64_t target = 0;
      for (int e = 0; e < extents; ++e) {
        uint64_t bytes = (rng() % 600) * in;
        offset[file] += (rng() % 3) * in * (rng() % 500);  // gaps, sometimes
        t.extents.push_back(ReadExtent{offset[file], bytes, target});
        offset[file] += bytes;
        target += bytes / in * out;
        plan.bytes_to_read += bytes;
      }
      t.target_bytes = target;
      t.placement = Placement{static_cast<uint32_t>(rng() % 2), dst};
      dst += (target + 255) / 256 * 256;
      plan.tensors.push_back(std::move(t));
    }
    // The plan's tensor order need not be the file's: items come out in file order anyway.
    if (rng() % 2) std::shuffle(plan.tensors.begin(), plan.tensors.end(), rng);
    uint64_t chunk = 16 + rng() % 1500;
    auto items = engine::make_work_items(plan, plan.segment_sizes, chunk, rng() % 2 ? 0 : 600);
    ASSERT_TRUE(items.ok()) << items.error().to_string();
    for (size_t i = 1; i < items->size(); ++i) {
      const auto& a = (*items)[i - 1];
      const auto& b = (*items)[i];
      EXPECT_TRUE(a.file < b.file || (a.file == b.file && a.lo <= b.lo)) << "item " << i;
    }

    // Each extent's target bytes are written exactly once, from the right source bytes.
    std::map<std::pair<uint32_t, uint64_t>, uint64_t> want;  // (segment, dst) -> file offset
    for (const auto& t : plan.tensors) {
      uint64_t in = dtype_size(t.source.dtype);
      uint64_t out = dtype_size(t.target_dtype);
      for (const auto& e : t.extents)
        for (uint64_t k = 0; k < e.bytes / in; ++k)
          want[{t.placement.segment, t.placement.offset + e.dst_offset + k * out}] =
              e.file_offset + k * in;
    }
    uint64_t progress = 0;
    for (const auto& item : *items) {
      EXPECT_LE(item.hi - item.lo, chunk);
      EXPECT_LE(item.stage_bytes(), chunk);
      EXPECT_FALSE(item.pieces.empty());
      uint64_t source = 0;
      uint64_t ops_bytes = 0;
      for (const auto& op : item.ops) ops_bytes += op.bytes;
      uint64_t pieces_target = 0;
      for (const auto& p : item.pieces) {
        EXPECT_GE(p.file_offset, item.lo);
        EXPECT_LE(p.file_offset + p.source_bytes, item.hi);
        uint64_t in = dtype_size(p.from);
        uint64_t out = dtype_size(p.to);
        ASSERT_EQ(p.source_bytes % in, 0u);
        for (uint64_t k = 0; k < p.source_bytes / in; ++k) {
          auto it = want.find({p.segment, p.dst_offset + k * out});
          ASSERT_NE(it, want.end()) << "element written twice or nowhere";
          EXPECT_EQ(it->second, p.file_offset + k * in);
          want.erase(it);
        }
        source += p.source_bytes;
        pieces_target += p.source_bytes / in * out;
        if (p.from != p.to) {
          EXPECT_TRUE(item.packed);
        }
      }
      EXPECT_EQ(ops_bytes, pieces_target);
      EXPECT_EQ(source, item.source_bytes);
      progress += item.source_bytes;
    }
    EXPECT_TRUE(want.empty()) << want.size() << " elements never written";
    EXPECT_EQ(progress, plan.bytes_to_read);
  }
}

TEST(WorkItems, RowsOfAShardAreReadTogetherAndPacked) {
  // 512 rows of 1 KiB, of which rank 1 of 4 takes 256 bytes each.
  LoadPlan plan;
  plan.files = {"f"};
  plan.segment_sizes = {1 * kMiB};
  TensorCopy t;
  t.source.dtype = DType::kF32;
  t.target_dtype = DType::kF32;
  for (uint64_t r = 0; r < 512; ++r)
    t.extents.push_back(ReadExtent{4096 + r * 1024 + 256, 256, r * 256});
  t.target_bytes = 512 * 256;
  plan.tensors.push_back(t);
  plan.bytes_to_read = t.target_bytes;
  auto items = engine::make_work_items(plan, plan.segment_sizes, 64 * kKiB);
  ASSERT_TRUE(items.ok());
  ASSERT_EQ(items->size(), 8u);  // 512 KiB of file range in 64 KiB reads
  for (const auto& item : *items) {
    EXPECT_TRUE(item.packed);
    ASSERT_EQ(item.ops.size(), 1u);  // contiguous in the slab: one copy
    EXPECT_EQ(item.ops[0].bytes, item.source_bytes);
  }
  // Far apart, rows are read one by one.
  for (auto& e : plan.tensors[0].extents) e.file_offset *= 1024;
  items = engine::make_work_items(plan, plan.segment_sizes, 64 * kKiB);
  ASSERT_TRUE(items.ok());
  EXPECT_EQ(items->size(), 512u);
}

TEST(WorkItems, BigExtentsSplitOnAlignedFileOffsets) {
  LoadPlan plan;
  plan.files = {"f"};
  plan.segment_sizes = {64 * kMiB};
  TensorCopy t;
  t.source.dtype = DType::kBF16;
  t.target_dtype = DType::kBF16;
  t.extents.push_back(ReadExtent{1000, 10 * kMiB, 0});
  t.target_bytes = 10 * kMiB;
  plan.tensors.push_back(t);
  plan.bytes_to_read = t.target_bytes;
  auto items = engine::make_work_items(plan, plan.segment_sizes, 1 * kMiB);
  ASSERT_TRUE(items.ok());
  ASSERT_GE(items->size(), 10u);
  for (size_t i = 0; i + 1 < items->size(); ++i)
    EXPECT_EQ((*items)[i].hi % kDirectAlign, 0u) << "item " << i;
}

// Runs gather_reads' calls against `file` as preadv(2) would (each call a contiguous range, its
// iovecs filled in order); false when a call does not add up.
bool run_gather(const engine::GatherReads& reads, const std::string& file) {
  for (const auto& call : reads.calls) {
    uint64_t at = call.offset;
    for (size_t i = call.first; i < call.first + call.count; ++i) {
      const iovec& v = reads.iovecs[i];
      if (at + v.iov_len > file.size()) return false;
      std::memcpy(v.iov_base, file.data() + at, v.iov_len);
      at += v.iov_len;
    }
    if (at - call.offset != call.bytes) return false;
  }
  return true;
}

TEST(WorkItems, GatherReadsBringThePiecesAndOnlySmallGaps) {
  std::mt19937 rng(21);
  std::string file = random_bytes(4 * kMiB, 5);
  for (int trial = 0; trial < 200; ++trial) {
    SCOPED_TRACE(trial);
    // Rows of a shard with odd offsets and sizes; gaps of every size, none at all sometimes.
    const DType dtypes[] = {DType::kU8, DType::kBF16, DType::kF32, DType::kF64};
    DType from = dtypes[rng() % std::size(dtypes)];
    uint64_t in = dtype_size(from);
    LoadPlan plan;
    plan.files = {"f"};
    plan.segment_sizes = {4 * kMiB};
    TensorCopy t;
    t.source.dtype = from;
    t.target_dtype = from;
    uint64_t piece = in * (1 + rng() % 3000);
    uint64_t gap = rng() % 3 == 0 ? 0 : in * (rng() % 5000);
    uint64_t rows = 1 + rng() % 300;
    uint64_t offset = 1 + rng() % 999;
    for (uint64_t r = 0; r < rows && offset + piece <= file.size(); ++r) {
      t.extents.push_back(ReadExtent{offset, piece, r * piece});
      t.target_bytes += piece;
      offset += piece + gap + (rng() % 8 == 0 ? in * (rng() % 3000) : 0);
    }
    plan.bytes_to_read = t.target_bytes;
    plan.tensors.push_back(t);
    uint64_t chunk = 64 + rng() % (512 * kKiB);
    auto items = engine::make_work_items(plan, plan.segment_sizes, chunk);
    ASSERT_TRUE(items.ok()) << items.error().to_string();
    uint64_t bridge = rng() % 2 ? engine::kMaxBridgedGap : rng() % (16 * kKiB);
    size_t max_iov = rng() % 2 ? engine::kMaxIovecs : 2 + rng() % 7;
    std::string slab(t.target_bytes, '\0');
    std::string scratch(bridge + 1, '\0');
    for (const auto& item : *items) {
      std::vector<char*> dst;
      for (const auto& p : item.pieces) dst.push_back(slab.data() + p.dst_offset);
      auto reads = engine::gather_reads(item, dst, scratch.data(), bridge, max_iov);
      uint64_t read = 0;
      size_t iovecs = 0;
      for (const auto& call : reads.calls) {
        EXPECT_GE(call.count, 1u);
        EXPECT_LE(call.count, max_iov);
        EXPECT_EQ(call.first, iovecs);  // calls take the iovecs in order, each once
        iovecs += call.count;
        read += call.bytes;
        // Every iovec is a piece's destination or the scratch (a gap no longer than `bridge`).
        for (size_t i = call.first; i < call.first + call.count; ++i) {
          const iovec& v = reads.iovecs[i];
          if (v.iov_base == scratch.data()) {
            EXPECT_LE(v.iov_len, bridge);
            EXPECT_GT(v.iov_len, 0u);
          }
        }
      }
      EXPECT_EQ(iovecs, reads.iovecs.size());
      EXPECT_GE(read, item.source_bytes);
      if (bridge == 0) {
        EXPECT_EQ(read, item.source_bytes);
      }
      if (item.pieces.size() == 1) {
        EXPECT_EQ(reads.calls.size(), 1u);
      }
      ASSERT_TRUE(run_gather(reads, file));
    }
    for (const auto& e : t.extents)
      ASSERT_EQ(slab.substr(e.dst_offset, e.bytes), file.substr(e.file_offset, e.bytes))
          << "row at file offset " << e.file_offset;
  }
}

TEST(WorkItems, GatherReadsSplitAtLongGapsAndAtTheIovecLimit) {
  // 100 rows of 1000 bytes, 500 bytes apart but a 20 KiB hole after row 49.
  engine::WorkItem item;
  uint64_t offset = 7;
  for (uint64_t r = 0; r < 100; ++r) {
    item.pieces.push_back(
        engine::Piece{offset, 1000, DType::kU8, DType::kU8, 0, r * 1000, r * 1000});
    item.source_bytes += 1000;
    offset += 1000 + (r == 49 ? 20 * kKiB : 500);
  }
  item.lo = 7;
  item.hi = offset - 500;
  std::vector<char*> dst(100, nullptr);
  char scratch[1];
  auto reads = engine::gather_reads(item, dst, scratch);
  ASSERT_EQ(reads.calls.size(), 2u);
  EXPECT_EQ(reads.calls[0].offset, 7u);
  EXPECT_EQ(reads.calls[0].count, 99u);  // 50 rows, 49 gaps between
  EXPECT_EQ(reads.calls[0].bytes, 50 * 1000u + 49 * 500u);
  EXPECT_EQ(reads.calls[1].offset, 7 + 50 * 1500u - 500 + 20 * kKiB);
  // No bridging: one call per row.
  EXPECT_EQ(engine::gather_reads(item, dst, scratch, 0).calls.size(), 100u);
  // At most 9 iovecs a call: 5 rows and the 4 gaps between them.
  reads = engine::gather_reads(item, dst, scratch, engine::kMaxBridgedGap, 9);
  EXPECT_EQ(reads.calls.size(), 20u);
  for (const auto& call : reads.calls) EXPECT_EQ(call.count, 9u);
}

TEST(WorkItems, PlansThatDoNotFitTheSlabAreInternalErrors) {
  LoadPlan plan;
  plan.files = {"f"};
  TensorCopy t;
  t.source.dtype = DType::kF32;
  t.target_dtype = DType::kF32;
  t.extents.push_back(ReadExtent{0, 4096, 0});
  t.placement = Placement{0, 8192};
  plan.tensors.push_back(t);
  auto items = engine::make_work_items(plan, {8192}, 1 * kMiB);
  ASSERT_FALSE(items.ok());
  EXPECT_EQ(items.error().code, StatusCode::kInternal);
  plan.tensors[0].placement = Placement{1, 0};
  EXPECT_FALSE(engine::make_work_items(plan, {1 * kMiB}, 1 * kMiB).ok());
  plan.tensors[0].placement = Placement{0, 0};
  plan.tensors[0].extents[0].bytes = 4095;  // partial element
  EXPECT_FALSE(engine::make_work_items(plan, {1 * kMiB}, 1 * kMiB).ok());
  plan.tensors[0].extents[0].bytes = 4096;
  plan.tensors[0].source.file_index = 3;
  EXPECT_FALSE(engine::make_work_items(plan, {1 * kMiB}, 1 * kMiB).ok());
  // A tensor's extents must come in file order (LoadPlan's contract).
  plan.tensors[0].source.file_index = 0;
  plan.tensors[0].extents = {ReadExtent{8192, 4096, 0}, ReadExtent{0, 4096, 4096}};
  items = engine::make_work_items(plan, {1 * kMiB}, 1 * kMiB);
  ASSERT_FALSE(items.ok());
  EXPECT_NE(items.error().message.find("out of file order"), std::string::npos);
}

// ---- byte-exact loads --------------------------------------------------------------------------

struct Case {
  Sink sink;
  std::optional<DType> cast;
  DirectIo direct;
  bool choppy;
};

std::string case_name(const Case& c) {
  std::string name = c.sink == Sink::kHost ? "Host" : "Write";
  name += c.cast ? std::string("Cast") + dtype_name(*c.cast) : "NoCast";
  name += c.direct == DirectIo::kOn ? "Direct" : "Buffered";
  if (c.choppy) name += "ShortReads";
  return name;
}

class EngineBytes : public ::testing::TestWithParam<Case> {};

TEST_P(EngineBytes, ManyThreadsAndRandomChunksAreByteExact) {
  const Case& c = GetParam();
  std::mt19937 rng(static_cast<uint32_t>(std::hash<std::string>()(case_name(c))));
  for (int trial = 0; trial < 4; ++trial) {
    SCOPED_TRACE(trial);
    auto model = make_model(rng(), 24, 1 + trial % 3, 20000);
    auto backend = memory::make_host_backend();
    auto plan = make_load_plan(model->ckpt, c.cast, *backend);
    ASSERT_TRUE(plan.ok()) << plan.error().to_string();
    auto slab = allocate(*plan, c.sink, nullptr);
    ASSERT_TRUE(slab);
    ChoppySource choppy(rng());
    LoadOptions options;
    options.reader_threads = 1 + rng() % 8;
    options.chunk_bytes = 64 + rng() % (96 * kKiB);
    options.staging_bytes = (1 + rng() % 4) * options.chunk_bytes;
    options.direct_io = c.direct;
    if (c.choppy) options.read_source = &choppy;
    std::atomic<bool> cancel{false};
    Outcome run = load(*plan, *slab, options, cancel);
    ASSERT_TRUE(run.result.ok()) << run.result.error().to_string();
    expect_progress_sane(run, plan->bytes_to_read);
    EXPECT_EQ(std::string(run.stats.sink), c.sink == Sink::kHost ? "host-direct" : "write");
    if (c.sink == Sink::kWrite) {
      EXPECT_GE(run.stats.staging_buffers_max, 1u);
      EXPECT_LE(run.stats.staging_buffers_peak, run.stats.staging_buffers_max);
      EXPECT_LE(run.stats.staging_buffers, run.stats.staging_buffers_max);
    }
    if (c.direct == DirectIo::kOn && run.stats.direct_io && options.chunk_bytes >= 128 * kKiB) {
      EXPECT_GT(run.stats.direct_reads, 0u);
    }
    expect_plan_contents(*plan, read_back(*slab), read_files(*plan));
  }
}

INSTANTIATE_TEST_SUITE_P(, EngineBytes,
                         ::testing::Values(Case{Sink::kHost, std::nullopt, DirectIo::kOff, false},
                                           Case{Sink::kWrite, std::nullopt, DirectIo::kOff, false},
                                           Case{Sink::kHost, DType::kBF16, DirectIo::kOff, false},
                                           Case{Sink::kWrite, DType::kF32, DirectIo::kOff, false},
                                           Case{Sink::kHost, std::nullopt, DirectIo::kOn, false},
                                           Case{Sink::kWrite, DType::kF16, DirectIo::kOn, false},
                                           Case{Sink::kHost, DType::kF32, DirectIo::kOn, true},
                                           Case{Sink::kWrite, std::nullopt, DirectIo::kOn, true},
                                           Case{Sink::kHost, std::nullopt, DirectIo::kOff, true}),
                         [](const auto& tp) { return case_name(tp.param); });

// Items are made while the readers read: hundreds of small tensors (many hand-overs, several
// batches each) load byte-exact with one reader and with many, into both sinks.
TEST(Engine, ItemsHandedOverWhileMadeAreByteExact) {
  auto model = make_model(17, 400, 3, 300);
  auto backend = memory::make_host_backend();
  auto plan = make_load_plan(model->ckpt, std::nullopt, *backend);
  ASSERT_TRUE(plan.ok()) << plan.error().to_string();
  for (Sink sink : {Sink::kHost, Sink::kWrite}) {
    for (size_t threads : {1u, 3u, 16u}) {
      SCOPED_TRACE(threads);
      auto slab = allocate(*plan, sink, nullptr);
      ASSERT_TRUE(slab);
      LoadOptions options;
      options.reader_threads = threads;
      options.chunk_bytes = 4 * kKiB;
      std::atomic<bool> cancel{false};
      Outcome run = load(*plan, *slab, options, cancel);
      ASSERT_TRUE(run.result.ok()) << run.result.error().to_string();
      expect_progress_sane(run, plan->bytes_to_read);
      auto items = engine::make_work_items(*plan, plan->segment_sizes, options.chunk_bytes);
      ASSERT_TRUE(items.ok());
      EXPECT_EQ(run.stats.work_items, items->size());
      EXPECT_GT(run.stats.items_made_seconds, 0.0);
      expect_plan_contents(*plan, read_back(*slab), read_files(*plan));
    }
  }
}

// A fault in the plan found when the readers have long started (the last tensor in file order
// has its extents out of order) fails the load as an internal error; nothing hangs.
TEST(Engine, APlanFaultFoundWhileReadingStopsTheLoad) {
  auto model = make_model(23, 300, 1, 2000);
  auto backend = memory::make_host_backend();
  auto plan = make_load_plan(model->ckpt, std::nullopt, *backend);
  ASSERT_TRUE(plan.ok()) << plan.error().to_string();
  std::optional<size_t> last;
  for (size_t i = 0; i < plan->tensors.size(); ++i) {
    const auto& extents = plan->tensors[i].extents;
    if (extents.empty() || extents.front().bytes == 0) continue;
    if (!last || extents.front().file_offset > plan->tensors[*last].extents.front().file_offset)
      last = i;
  }
  ASSERT_TRUE(last.has_value());
  TensorCopy& t = plan->tensors[*last];
  ASSERT_EQ(t.extents.size(), 1u);
  const uint64_t element = dtype_size(t.source.dtype);
  const ReadExtent whole = t.extents.front();
  ASSERT_GE(whole.bytes, 2 * element);
  const uint64_t half = whole.bytes / element / 2 * element;
  t.extents = {ReadExtent{whole.file_offset + half, whole.bytes - half, half},
               ReadExtent{whole.file_offset, half, 0}};
  for (size_t threads : {1u, 4u}) {
    auto slab = allocate(*plan, Sink::kWrite, nullptr);
    ASSERT_TRUE(slab);
    LoadOptions options;
    options.reader_threads = threads;
    options.chunk_bytes = 1 * kKiB;
    std::atomic<bool> cancel{false};
    Outcome run = load(*plan, *slab, options, cancel);
    ASSERT_FALSE(run.result.ok());
    EXPECT_EQ(run.result.error().code, StatusCode::kInternal);
    EXPECT_NE(run.result.error().message.find("out of file order"), std::string::npos);
    EXPECT_LT(run.seconds, 10.0);
  }
}

TEST(Engine, BigChunksWithODirectAreByteExact) {
  // Chunks well above the O_DIRECT threshold, over several files, both sinks.
  auto model = make_model(99, 12, 2, 100000);
  auto backend = memory::make_host_backend();
  for (Sink sink : {Sink::kHost, Sink::kWrite}) {
    for (std::optional<DType> cast : {std::optional<DType>{}, std::optional<DType>{DType::kBF16}}) {
      auto plan = make_load_plan(model->ckpt, cast, *backend);
      ASSERT_TRUE(plan.ok());
      auto slab = allocate(*plan, sink, nullptr);
      LoadOptions options;
      options.reader_threads = 4;
      options.chunk_bytes = 512 * kKiB;
      options.direct_io = DirectIo::kOn;
      std::atomic<bool> cancel{false};
      Outcome run = load(*plan, *slab, options, cancel);
      ASSERT_TRUE(run.result.ok()) << run.result.error().to_string();
      if (run.stats.direct_io) {
        EXPECT_GT(run.stats.direct_reads, 0u);
      }
      expect_plan_contents(*plan, read_back(*slab), read_files(*plan));
    }
  }
}

// Drops a file's clean pages from the page cache; false where the filesystem keeps them anyway
// (tmpfs), so that a "cold" file cannot be made.
bool evict_from_page_cache(const std::string& path) {
  UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (!fd || ::fdatasync(fd.get()) != 0) return false;
  if (::posix_fadvise(fd.get(), 0, 0, POSIX_FADV_DONTNEED) != 0) return false;
  struct stat st {};
  if (::fstat(fd.get(), &st) != 0) return false;
  auto sample = sample_page_cache(fd.get(), static_cast<uint64_t>(st.st_size));
  return sample.ok() && sample->fraction() < kCachedFraction;
}

TEST(Engine, AutoDirectIoReadsColdFilesPastTheCacheAndWarmFilesThroughIt) {
  auto model = make_model(77, 12, 2, 100000);
  auto backend = memory::make_host_backend();
  auto plan = make_load_plan(model->ckpt, std::nullopt, *backend);
  ASSERT_TRUE(plan.ok());
  auto expected = read_files(*plan);  // leaves both files in the page cache
  LoadOptions options;
  options.reader_threads = 4;
  options.chunk_bytes = 512 * kKiB;
  ASSERT_EQ(options.direct_io, DirectIo::kAuto);  // the default
  {
    auto slab = allocate(*plan, Sink::kHost, nullptr);
    std::atomic<bool> cancel{false};
    Outcome run = load(*plan, *slab, options, cancel);
    ASSERT_TRUE(run.result.ok()) << run.result.error().to_string();
    EXPECT_EQ(run.stats.files_cached, 2u);
    EXPECT_EQ(run.stats.files_cold, 0u);
    EXPECT_EQ(run.stats.direct_reads, 0u);
    expect_plan_contents(*plan, read_back(*slab), expected);
  }
  for (const auto& path : plan->files) {
    if (!evict_from_page_cache(path)) GTEST_SKIP() << "cannot evict " << path << " (tmpfs?)";
  }
  auto slab = allocate(*plan, Sink::kHost, nullptr);
  std::atomic<bool> cancel{false};
  Outcome run = load(*plan, *slab, options, cancel);
  ASSERT_TRUE(run.result.ok()) << run.result.error().to_string();
  EXPECT_EQ(run.stats.files_cold, 2u);
  EXPECT_EQ(run.stats.files_cached, 0u);
  if (run.stats.direct_io) {
    EXPECT_GT(run.stats.direct_reads, 0u);  // O_DIRECT where the filesystem takes it
  }
  expect_plan_contents(*plan, read_back(*slab), expected);
}

TEST(Engine, RowShardsAreByteExact) {
  TempDir dir;
  std::vector<TensorData> tensors = {
      random_tensor("w1", DType::kF32, {300, 64}, 1), random_tensor("b1", DType::kF32, {64}, 2),
      random_tensor("w2", DType::kBF16, {1000, 256}, 3),
      random_tensor("w3", DType::kI32, {77, 8}, 4), random_tensor("w4", DType::kF16, {3, 4096}, 5)};
  testing::write_file(dir / "model.safetensors", safetensors_file(tensors));
  auto ckpt = checkpoint::open_checkpoint(dir / "model.safetensors", {dir.path()});
  ASSERT_TRUE(ckpt.ok()) << ckpt.error().to_string();
  auto backend = memory::make_host_backend();
  std::mt19937 rng(3);
  for (uint32_t tp : {2u, 4u}) {
    for (uint32_t rank = 0; rank < tp; ++rank) {
      for (Sink sink : {Sink::kHost, Sink::kWrite}) {
        for (std::optional<DType> cast :
             {std::optional<DType>{}, std::optional<DType>{DType::kF32}}) {
          SCOPED_TRACE("tp " + std::to_string(tp) + " rank " + std::to_string(rank));
          LoadPlan plan = row_shard_plan(*ckpt, tp, rank, cast, *backend);
          auto slab = allocate(plan, sink, nullptr);
          LoadOptions options;
          options.reader_threads = 1 + rng() % 6;
          options.chunk_bytes = 1024 + rng() % (64 * kKiB);
          options.direct_io = rng() % 2 ? DirectIo::kOn : DirectIo::kOff;
          std::atomic<bool> cancel{false};
          Outcome run = load(plan, *slab, options, cancel);
          ASSERT_TRUE(run.result.ok()) << run.result.error().to_string();
          expect_progress_sane(run, plan.bytes_to_read);
          expect_plan_contents(plan, read_back(*slab), read_files(plan));
        }
      }
    }
  }
}

// Row shards whose rows lie further apart than kMaxBridgedGap, after a tensor of odd size (so
// that rows start at odd file offsets).
struct GatherModel {
  TempDir dir;
  checkpoint::Checkpoint ckpt;
};

std::unique_ptr<GatherModel> make_gather_model() {
  auto m = std::make_unique<GatherModel>();
  std::vector<TensorData> tensors = {
      random_tensor("odd", DType::kU8, {13}, 1),
      random_tensor("w_f32", DType::kF32, {96, 8192}, 2),    // rows of 32 KiB, 16 KiB a rank
      random_tensor("w_bf16", DType::kBF16, {64, 3000}, 3),  // 6000-byte rows: gaps bridged
      random_tensor("b", DType::kF32, {301}, 4),
      random_tensor("w_f16", DType::kF16, {40, 20480}, 5)};  // rows of 40 KiB
  testing::write_file(m->dir / "model.safetensors", safetensors_file(tensors));
  auto ckpt = checkpoint::open_checkpoint(m->dir / "model.safetensors", {m->dir.path()});
  EXPECT_TRUE(ckpt.ok()) << ckpt.error().to_string();
  if (ckpt.ok()) m->ckpt = std::move(ckpt).value();
  return m;
}

const TensorCopy& tensor_of(const LoadPlan& plan, const std::string& name) {
  auto it = std::find_if(plan.tensors.begin(), plan.tensors.end(),
                         [&](const TensorCopy& t) { return t.source.name == name; });
  EXPECT_NE(it, plan.tensors.end()) << name;
  return it == plan.tensors.end() ? plan.tensors.front() : *it;
}

TEST(Engine, BufferedRowShardsReadOnlyTheRanksBytes) {
  auto model = make_gather_model();
  auto backend = memory::make_host_backend();
  for (uint32_t rank = 0; rank < 2; ++rank) {
    for (Sink sink : {Sink::kHost, Sink::kWrite}) {
      for (std::optional<DType> cast : {std::optional<DType>{}, std::optional<DType>{DType::kF32},
                                        std::optional<DType>{DType::kBF16}}) {
        SCOPED_TRACE("rank " + std::to_string(rank) + (sink == Sink::kHost ? " host" : " write") +
                     (cast ? std::string(" cast ") + dtype_name(*cast) : std::string()));
        LoadPlan plan = row_shard_plan(model->ckpt, 2, rank, cast, *backend);
        auto expected = read_files(plan);
        auto slab = allocate(plan, sink, nullptr);
        CountingSource source;
        LoadOptions options;
        options.reader_threads = 3;
        options.chunk_bytes = 1 * kMiB;  // w_bf16's rank part in one item
        options.direct_io = DirectIo::kOff;
        options.read_source = &source;
        std::atomic<bool> cancel{false};
        Outcome run = load(plan, *slab, options, cancel);
        ASSERT_TRUE(run.result.ok()) << run.result.error().to_string();
        EXPECT_GT(run.stats.gathered_reads, 0u);
        expect_progress_sane(run, plan.bytes_to_read);
        expect_plan_contents(plan, read_back(*slab), expected);
        // The rank's bytes and the gaps between w_bf16's 64 rows (3000 bytes each), no more.
        EXPECT_EQ(source.bytes(), plan.bytes_to_read + 63 * 3000u);

        // The same through preadv(2) itself.
        auto again = allocate(plan, sink, nullptr);
        options.read_source = nullptr;
        run = load(plan, *again, options, cancel);
        ASSERT_TRUE(run.result.ok()) << run.result.error().to_string();
        EXPECT_GT(run.stats.gathered_reads, 0u);
        expect_plan_contents(plan, read_back(*again), expected);
      }
    }
  }
}

TEST(Engine, GatheredReadsSurviveShortReadsAndFailLikeOthers) {
  auto model = make_gather_model();
  auto backend = memory::make_host_backend();
  LoadPlan plan = row_shard_plan(model->ckpt, 4, 3, DType::kF32, *backend);
  auto expected = read_files(plan);
  for (Sink sink : {Sink::kHost, Sink::kWrite}) {
    for (uint32_t seed = 1; seed <= 3; ++seed) {
      auto slab = allocate(plan, sink, nullptr);
      ChoppySource source(seed);
      LoadOptions options;
      options.reader_threads = 1 + seed;
      options.chunk_bytes = 64 * kKiB + seed * 1000;
      options.direct_io = DirectIo::kOff;
      options.read_source = &source;
      std::atomic<bool> cancel{false};
      Outcome run = load(plan, *slab, options, cancel);
      ASSERT_TRUE(run.result.ok()) << run.result.error().to_string();
      EXPECT_GT(run.stats.gathered_reads, 0u);
      expect_plan_contents(plan, read_back(*slab), expected);
    }
    // A byte of rank 3's part of w_f32's row 50: an I/O error; the file ending in w_f16: a
    // changed checkpoint.
    uint64_t in_row = tensor_of(plan, "w_f32").extents[50].file_offset + 100;
    {
      auto slab = allocate(plan, sink, nullptr);
      FailingSource source(in_row);
      LoadOptions options;
      options.direct_io = DirectIo::kOff;
      options.read_source = &source;
      std::atomic<bool> cancel{false};
      Outcome run = load(plan, *slab, options, cancel);
      ASSERT_FALSE(run.result.ok());
      EXPECT_EQ(run.result.error().code, StatusCode::kIoError);
    }
    {
      auto slab = allocate(plan, sink, nullptr);
      ShortFileSource source(tensor_of(plan, "w_f16").extents[20].file_offset + 10);
      LoadOptions options;
      options.direct_io = DirectIo::kOff;
      options.read_source = &source;
      std::atomic<bool> cancel{false};
      Outcome run = load(plan, *slab, options, cancel);
      ASSERT_FALSE(run.result.ok());
      EXPECT_EQ(run.result.error().code, StatusCode::kBadCheckpoint);
    }
  }
}

TEST(Engine, ODirectRowShardsReadWholeRanges) {
  // Cold reads keep one aligned read per item, gaps included: nothing is gathered.
  auto model = make_gather_model();
  auto backend = memory::make_host_backend();
  LoadPlan plan = row_shard_plan(model->ckpt, 2, 1, std::nullopt, *backend);
  auto expected = read_files(plan);
  for (Sink sink : {Sink::kHost, Sink::kWrite}) {
    auto slab = allocate(plan, sink, nullptr);
    LoadOptions options;
    options.reader_threads = 2;
    options.chunk_bytes = 4 * kMiB;  // each tensor's rows in one item, all above kDirectMinBytes
    options.direct_io = DirectIo::kOn;
    std::atomic<bool> cancel{false};
    Outcome run = load(plan, *slab, options, cancel);
    ASSERT_TRUE(run.result.ok()) << run.result.error().to_string();
    if (!run.stats.direct_io) GTEST_SKIP() << "no O_DIRECT on this file system";
    EXPECT_GT(run.stats.direct_reads, 0u);
    EXPECT_EQ(run.stats.gathered_reads, 0u);
    expect_plan_contents(plan, read_back(*slab), expected);
  }
}

TEST(Engine, ODirectRefusedFallsBackToThePageCache) {
  auto model = make_model(5, 8, 1, 100000);
  auto backend = memory::make_host_backend();
  auto plan = make_load_plan(model->ckpt, std::nullopt, *backend);
  ASSERT_TRUE(plan.ok());
  for (Sink sink : {Sink::kHost, Sink::kWrite}) {
    auto slab = allocate(*plan, sink, nullptr);
    NoDirectSource source;
    LoadOptions options;
    options.reader_threads = 3;
    options.chunk_bytes = 256 * kKiB;
    options.direct_io = DirectIo::kOn;
    options.read_source = &source;
    std::atomic<bool> cancel{false};
    Outcome run = load(*plan, *slab, options, cancel);
    ASSERT_TRUE(run.result.ok()) << run.result.error().to_string();
    EXPECT_GT(run.stats.buffered_reads, 0u);
    // At most one refused O_DIRECT read per reader before every thread knows.
    EXPECT_LE(run.stats.direct_reads, options.reader_threads);
    expect_plan_contents(*plan, read_back(*slab), read_files(*plan));
  }
}

// ---- bounded staging ---------------------------------------------------------------------------

TEST(Engine, StagingBuffersNeverExceedTheBound) {
  auto model = make_model(11, 16, 1, 50000);
  auto backend = memory::make_host_backend();
  auto plan = make_load_plan(model->ckpt, DType::kF16, *backend);
  ASSERT_TRUE(plan.ok());
  for (size_t bound : {1u, 3u}) {
    SCOPED_TRACE(bound);
    HookedSlab* hooked = nullptr;
    auto slab = allocate(*plan, Sink::kWrite, &hooked);
    hooked->delay = std::chrono::microseconds(300);  // readers pile up waiting for buffers
    LoadOptions options;
    options.reader_threads = 8;
    options.chunk_bytes = 16 * kKiB;
    // The bound counts whole buffers (chunk plus O_DIRECT slack).
    options.staging_bytes = bound * (16 * kKiB + 2 * kDirectAlign);
    std::atomic<bool> cancel{false};
    Outcome run = load(*plan, *slab, options, cancel);
    ASSERT_TRUE(run.result.ok()) << run.result.error().to_string();
    EXPECT_EQ(run.stats.staging_buffers_max, bound);
    EXPECT_LE(run.stats.staging_buffers, bound);
    EXPECT_LE(run.stats.staging_buffers_peak, bound);
    EXPECT_GE(run.stats.staging_buffers_peak, 1u);
    EXPECT_EQ(hooked->peak.load(), 1);  // Slab::write() is never called concurrently
    EXPECT_GT(run.stats.work_items, bound * 4);
    expect_plan_contents(*plan, read_back(*slab), read_files(*plan));
  }
}

TEST(ChunkSink, AcquireWaitsForARecycledBufferAndWakesOnStop) {
  auto backend = memory::make_host_backend();
  auto inner = backend->allocate({4096}, "sink");
  ASSERT_TRUE(inner.ok());
  HookedSlab slab(std::move(inner).value());
  SinkOptions options;
  options.buffer_bytes = 4096;
  options.max_buffers = 2;
  auto sink = make_chunk_sink(slab, options);
  ASSERT_TRUE(sink.ok());
  EXPECT_STREQ((*sink)->name(), "write");
  std::atomic<bool> stop{false};
  auto a = (*sink)->acquire(stop);
  auto b = (*sink)->acquire(stop);
  ASSERT_TRUE(a.ok() && b.ok());
  ASSERT_NE(*a, nullptr);
  ASSERT_NE(*b, nullptr);
  EXPECT_EQ(reinterpret_cast<uintptr_t>((*a)->data) % kDirectAlign, 0u);
  EXPECT_GE((*a)->capacity, 4096 + 2 * kDirectAlign);

  std::atomic<bool> got{false};
  StagingBuffer* third = nullptr;
  std::thread waiter([&] {
    auto c = (*sink)->acquire(stop);
    EXPECT_TRUE(c.ok());
    third = c.ok() ? *c : nullptr;
    got = true;
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  EXPECT_FALSE(got.load());  // both buffers taken
  std::memset((*a)->data, 7, 16);
  CopyOp op{0, 16, 0, 100};
  ASSERT_TRUE((*sink)->submit(*a, (*a)->data, {&op, 1}).ok());  // recycles a
  waiter.join();
  EXPECT_EQ(third, *a);

  std::thread stopped([&] {
    auto c = (*sink)->acquire(stop);
    EXPECT_TRUE(c.ok());
    EXPECT_EQ(c.ok() ? *c : reinterpret_cast<StagingBuffer*>(1), nullptr);
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(20));
  stop = true;
  (*sink)->wake();
  stopped.join();
  (*sink)->release(third);
  (*sink)->release(*b);
  ASSERT_TRUE((*sink)->finish().ok());
  SinkStats stats = (*sink)->stats();
  EXPECT_EQ(stats.buffers, 2u);
  EXPECT_EQ(stats.peak_in_use, 2u);
  EXPECT_EQ(slab.writes.load(), 1);
}

// ---- failures ----------------------------------------------------------------------------------

class EngineFailures : public ::testing::TestWithParam<Sink> {};

TEST_P(EngineFailures, ReadErrorInTheMiddleStopsEverything) {
  TempDir dir;
  std::vector<TensorData> tensors = {random_tensor("a", DType::kF32, {300000}, 1),
                                     random_tensor("b", DType::kBF16, {700000}, 2),
                                     random_tensor("c", DType::kU8, {500000}, 3)};
  std::string path = dir / "model.safetensors";
  testing::write_file(path, safetensors_file(tensors));
  auto ckpt = checkpoint::open_checkpoint(path, {dir.path()});
  ASSERT_TRUE(ckpt.ok());
  auto backend = memory::make_host_backend();
  for (DirectIo direct : {DirectIo::kOff, DirectIo::kOn}) {
    for (std::optional<DType> cast : {std::optional<DType>{}, std::optional<DType>{DType::kF32}}) {
      auto plan = make_load_plan(*ckpt, cast, *backend);
      ASSERT_TRUE(plan.ok());
      auto slab = allocate(*plan, GetParam(), nullptr);
      FailingSource source(ckpt->tensors[1].file_offset + ckpt->tensors[1].nbytes / 2);
      LoadOptions options;
      options.reader_threads = 6;
      options.chunk_bytes = 96 * kKiB;
      options.direct_io = direct;
      options.read_source = &source;
      std::atomic<bool> cancel{false};
      Outcome run = load(*plan, *slab, options, cancel);
      ASSERT_FALSE(run.result.ok());
      EXPECT_EQ(run.result.error().code, StatusCode::kIoError) << run.result.error().to_string();
      EXPECT_NE(run.result.error().message.find(path), std::string::npos);
      EXPECT_NE(run.result.error().message.find("Input/output error"), std::string::npos)
          << run.result.error().message;
      // Stopped: no final progress report, nothing still reading once it returned.
      for (uint64_t d : run.progress) EXPECT_LT(d, plan->bytes_to_read);
      EXPECT_EQ(source.running(), 0);
      int calls = source.calls();
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
      EXPECT_EQ(source.calls(), calls);
    }
  }
}

TEST_P(EngineFailures, FileEndingEarlyIsBadCheckpoint) {
  auto model = make_model(21, 10, 1, 100000);
  auto backend = memory::make_host_backend();
  auto plan = make_load_plan(model->ckpt, std::nullopt, *backend);
  ASSERT_TRUE(plan.ok());
  auto slab = allocate(*plan, GetParam(), nullptr);
  ShortFileSource source(model->ckpt.total_bytes / 2 + 4097);
  LoadOptions options;
  options.reader_threads = 4;
  options.chunk_bytes = 32 * kKiB;
  options.read_source = &source;
  std::atomic<bool> cancel{false};
  Outcome run = load(*plan, *slab, options, cancel);
  ASSERT_FALSE(run.result.ok());
  EXPECT_EQ(run.result.error().code, StatusCode::kBadCheckpoint) << run.result.error().to_string();
}

// The first read waits until the second has thrown std::bad_alloc on another reader thread, then
// comes back short, so that its thread notices the load stopping in the middle of an item.
class BadAllocThenShortSource final : public ReadSource {
 public:
  ssize_t pread(int fd, void* dst, size_t bytes, uint64_t offset) override {
    const int call = ++calls_;
    if (call == 2) {
      thrown_.store(true);
      throw std::bad_alloc();
    }
    if (call == 1) {
      for (auto until = Clock::now() + std::chrono::seconds(5);
           !thrown_.load() && Clock::now() < until;)
        std::this_thread::sleep_for(std::chrono::milliseconds(1));
      std::this_thread::sleep_for(std::chrono::milliseconds(50));  // the fault is recorded
      bytes = std::min<size_t>(bytes, 1);
    }
    return ::pread(fd, dst, bytes, static_cast<off_t>(offset));
  }
  bool thrown() const { return thrown_.load(); }

 private:
  std::atomic<int> calls_{0};
  std::atomic<bool> thrown_{false};
};

// A reader that runs out of memory fails the load as out of memory, even when another reader
// stopped because of it before the load ended ("load stopped" is not the load's error).
TEST_P(EngineFailures, AReaderOutOfMemoryIsTheLoadsErrorNotTheStopItCauses) {
  auto model = make_model(41, 8, 1, 20000);
  auto backend = memory::make_host_backend();
  auto plan = make_load_plan(model->ckpt, std::nullopt, *backend);
  ASSERT_TRUE(plan.ok());
  auto slab = allocate(*plan, GetParam(), nullptr);
  BadAllocThenShortSource source;
  LoadOptions options;
  options.reader_threads = 2;
  options.chunk_bytes = 16 * kKiB;
  options.direct_io = DirectIo::kOff;
  options.read_source = &source;
  std::atomic<bool> cancel{false};
  Outcome run = load(*plan, *slab, options, cancel);
  ASSERT_TRUE(source.thrown());
  ASSERT_FALSE(run.result.ok());
  EXPECT_EQ(run.result.error().code, StatusCode::kOutOfMemory) << run.result.error().to_string();
}

TEST(EngineWriteFailure, StopsEverything) {
  auto model = make_model(31, 16, 2, 60000);
  auto backend = memory::make_host_backend();
  auto plan = make_load_plan(model->ckpt, DType::kBF16, *backend);
  ASSERT_TRUE(plan.ok());
  HookedSlab* hooked = nullptr;
  auto slab = allocate(*plan, Sink::kWrite, &hooked);
  hooked->fail_on_write = 5;
  CountingSource source;
  LoadOptions options;
  options.reader_threads = 5;
  options.chunk_bytes = 8 * kKiB;
  options.read_source = &source;
  std::atomic<bool> cancel{false};
  Outcome run = load(*plan, *slab, options, cancel);
  ASSERT_FALSE(run.result.ok());
  EXPECT_EQ(run.result.error().code, StatusCode::kIoError);
  EXPECT_NE(run.result.error().message.find("injected"), std::string::npos);
  EXPECT_LT(hooked->writes.load(), static_cast<int>(run.stats.work_items));
  EXPECT_EQ(source.running(), 0);
  EXPECT_EQ(hooked->running.load(), 0);
}

INSTANTIATE_TEST_SUITE_P(, EngineFailures, ::testing::Values(Sink::kHost, Sink::kWrite),
                         [](const auto& tp) {
                           return std::string(tp.param == Sink::kHost ? "Host" : "Write");
                         });

// ---- cancellation and progress -----------------------------------------------------------------

class EngineCancel : public ::testing::TestWithParam<Sink> {};

TEST_P(EngineCancel, FromTheProgressCallbackStopsQuickly) {
  auto model = make_model(41, 20, 1, 200000);
  auto backend = memory::make_host_backend();
  auto plan = make_load_plan(model->ckpt, std::nullopt, *backend);
  ASSERT_TRUE(plan.ok());
  auto slab = allocate(*plan, GetParam(), nullptr);
  SlowSource source(std::chrono::milliseconds(2));
  LoadOptions options;
  options.reader_threads = 6;
  options.chunk_bytes = 16 * kKiB;  // hundreds of items of 2+ ms each: seconds in all
  options.read_source = &source;
  std::atomic<bool> cancel{false};
  Outcome run = load(*plan, *slab, options, cancel, [&](uint64_t) { cancel = true; });
  ASSERT_FALSE(run.result.ok());
  EXPECT_EQ(run.result.error().code, StatusCode::kCancelled) << run.result.error().to_string();
  EXPECT_EQ(run.progress.size(), 1u);  // nothing reported after the flag was set
  EXPECT_GT(run.stats.work_items, 200u);
  EXPECT_LT(run.seconds, 1.0);
  EXPECT_EQ(source.running(), 0);
  EXPECT_LT(source.calls(), static_cast<int>(run.stats.work_items) / 2);
}

TEST_P(EngineCancel, FromAnotherThreadStopsQuickly) {
  auto model = make_model(43, 20, 1, 200000);
  auto backend = memory::make_host_backend();
  auto plan = make_load_plan(model->ckpt, DType::kF32, *backend);
  ASSERT_TRUE(plan.ok());
  HookedSlab* hooked = nullptr;
  auto slab = allocate(*plan, GetParam(), &hooked);
  SlowSource source(std::chrono::milliseconds(2));
  LoadOptions options;
  options.reader_threads = 4;
  options.chunk_bytes = 16 * kKiB;
  options.staging_bytes = 2 * 16 * kKiB;  // readers also wait for buffers
  options.read_source = &source;
  std::atomic<bool> cancel{false};
  std::thread canceller([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(30));
    cancel = true;
  });
  auto start = Clock::now();
  Outcome run = load(*plan, *slab, options, cancel);
  double after_cancel = std::chrono::duration<double>(Clock::now() - start).count() - 0.03;
  canceller.join();
  ASSERT_FALSE(run.result.ok());
  EXPECT_EQ(run.result.error().code, StatusCode::kCancelled);
  EXPECT_LT(after_cancel, 0.5);
  EXPECT_EQ(source.running(), 0);
  if (hooked != nullptr) {
    EXPECT_EQ(hooked->running.load(), 0);
  }
}

INSTANTIATE_TEST_SUITE_P(, EngineCancel, ::testing::Values(Sink::kHost, Sink::kWrite),
                         [](const auto& tp) {
                           return std::string(tp.param == Sink::kHost ? "Host" : "Write");
                         });

TEST(Engine, ProgressIsMonotonicBoundedAndExactAtTheEnd) {
  auto model = make_model(51, 40, 3, 100000);
  auto backend = memory::make_host_backend();
  auto plan = make_load_plan(model->ckpt, std::nullopt, *backend);
  ASSERT_TRUE(plan.ok());
  for (Sink sink : {Sink::kHost, Sink::kWrite}) {
    auto slab = allocate(*plan, sink, nullptr);
    LoadOptions options;
    options.reader_threads = 8;
    options.chunk_bytes = 1 * kKiB;  // thousands of items: reports are coalesced
    std::atomic<bool> cancel{false};
    Outcome run = load(*plan, *slab, options, cancel);
    ASSERT_TRUE(run.result.ok()) << run.result.error().to_string();
    EXPECT_GT(run.stats.work_items, 1000u);
    expect_progress_sane(run, plan->bytes_to_read);
    EXPECT_GE(run.progress.size(), 2u);
    EXPECT_EQ(run.stats.reader_threads, 8u);
  }
}

TEST(Engine, DefaultsUseAFewThreadsAndNoStagingForHostSlabs) {
  auto model = make_model(61, 6, 1, 1000);
  auto backend = memory::make_host_backend();
  auto plan = make_load_plan(model->ckpt, std::nullopt, *backend);
  ASSERT_TRUE(plan.ok());
  auto slab = allocate(*plan, Sink::kHost, nullptr);
  LoadStats stats;
  LoadOptions options;
  options.stats = &stats;
  std::atomic<bool> cancel{false};
  auto r = load_into_slab(*plan, *slab, nullptr, cancel, options);
  ASSERT_TRUE(r.ok()) << r.error().to_string();
  EXPECT_GE(stats.reader_threads, 1u);
  EXPECT_LE(stats.reader_threads, 16u);
  EXPECT_EQ(stats.staging_buffers, 0u);
  EXPECT_FALSE(stats.direct_io);  // auto: off for now
  EXPECT_EQ(stats.direct_reads, 0u);
  EXPECT_GT(stats.seconds, 0.0);
  EXPECT_STREQ(direct_io_name(DirectIo::kAuto), "auto");
}

}  // namespace
}  // namespace companion::loader
