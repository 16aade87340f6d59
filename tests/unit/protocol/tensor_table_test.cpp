// Protocol 1.2's tensor table: the builder, the sealed memfd, and the validator on bad tables
// (crafted with FlatBuffers directly so that every check is reached on its own).
#include "protocol/tensor_table.hpp"

#include <fcntl.h>
#include <flatbuffers/flatbuffers.h>
#include <gtest/gtest.h>
#include <sys/mman.h>

#include <string>
#include <vector>

#include "protocol/companion_generated.h"
#include "protocol/limits.hpp"
#include "protocol/messages.hpp"

namespace companion::protocol {
namespace {

namespace fb = flatbuffers;

const std::vector<uint64_t> kSegments{4096, 1 << 20};

std::vector<uint8_t> sample_table() {
  TensorTableBuilder b;
  std::vector<int64_t> shape{2, 3};
  EXPECT_TRUE(b.add("model.embed.weight", DType::kF32, shape, {}, 0, 0, 24).ok());
  std::vector<int64_t> strides{1, 2};  // transposed: strides are kept as given
  EXPECT_TRUE(b.add("model.lm_head.weight", DType::kBF16, shape, strides, 1, 512, 12).ok());
  EXPECT_TRUE(b.add("scale", DType::kF64, {}, {}, 1, 1024, 8).ok());
  auto bytes = b.serialize();
  EXPECT_TRUE(bytes.ok());
  return bytes.ok() ? *bytes : std::vector<uint8_t>{};
}

TEST(TensorTable, RoundTripsAndFindsEveryName) {
  auto bytes = sample_table();
  auto view = TensorTableView::open(bytes, kSegments);
  ASSERT_TRUE(view.ok()) << view.error().message;
  ASSERT_EQ(view->size(), 3u);
  TensorRef t = (*view)[1];
  EXPECT_EQ(t.name, "model.lm_head.weight");
  EXPECT_EQ(t.dtype, DType::kBF16);
  EXPECT_EQ(std::vector<int64_t>(t.shape.begin(), t.shape.end()), (std::vector<int64_t>{2, 3}));
  EXPECT_EQ(std::vector<int64_t>(t.strides.begin(), t.strides.end()), (std::vector<int64_t>{1, 2}));
  EXPECT_EQ(t.segment, 1u);
  EXPECT_EQ(t.offset, 512u);
  EXPECT_EQ(t.nbytes, 12u);
  TensorRef first = (*view)[0];
  EXPECT_EQ(std::vector<int64_t>(first.strides.begin(), first.strides.end()),
            (std::vector<int64_t>{3, 1}));  // contiguous when none given
  EXPECT_TRUE((*view)[2].shape.empty());
  for (size_t i = 0; i < view->size(); ++i) {
    EXPECT_EQ(view->find((*view)[i].name), i);
    // Every name is followed by a NUL in the names blob (the C ABI hands it out as is).
    EXPECT_EQ(*((*view)[i].name.data() + (*view)[i].name.size()), '\0');
  }
  EXPECT_EQ(view->find("model.embed"), TensorTableView::npos);
  EXPECT_EQ(view->find(""), TensorTableView::npos);
  EXPECT_EQ(view->find("model.embed.weightX"), TensorTableView::npos);
}

TEST(TensorTable, HundredThousandTensors) {
  constexpr size_t kCount = 100'000;
  TensorTableBuilder b(kCount);
  std::vector<int64_t> shape{64, 32};
  for (size_t i = 0; i < kCount; ++i)
    ASSERT_TRUE(b.add("model.layers." + std::to_string(i / 1000) + ".mlp.experts." +
                          std::to_string(i % 1000) + ".w1.weight",
                      DType::kBF16, shape, {}, 0, i * 4096, 4096)
                    .ok());
  auto bytes = b.serialize();
  ASSERT_TRUE(bytes.ok());
  std::vector<uint64_t> segments{kCount * 4096};
  auto table = SharedTensorTable::create(*bytes, segments);
  ASSERT_TRUE(table.ok()) << table.error().message;
  const TensorTableView& view = (*table)->view();
  ASSERT_EQ(view.size(), kCount);
  for (size_t i = 0; i < kCount; i += 997) EXPECT_EQ(view.find(view[i].name), i);
  EXPECT_EQ(view.find("model.layers.100.mlp.experts.0.w1.weight"), TensorTableView::npos);
}

TEST(TensorTable, BuilderRefusesWhatNoReaderAccepts) {
  TensorTableBuilder b;
  std::vector<int64_t> deep(kMaxRank + 1, 1);
  EXPECT_EQ(b.add("deep", DType::kU8, deep, {}, 0, 0, 1).error().code, StatusCode::kLimitExceeded);
  EXPECT_EQ(b.add(std::string(kMaxNameBytes + 1, 'n'), DType::kU8, {}, {}, 0, 0, 1).error().code,
            StatusCode::kLimitExceeded);
  EXPECT_EQ(b.add("", DType::kU8, {}, {}, 0, 0, 1).error().code, StatusCode::kLimitExceeded);
  std::vector<int64_t> shape{2}, strides{1, 1};
  EXPECT_FALSE(b.add("bad_strides", DType::kU8, shape, strides, 0, 0, 2).ok());
  EXPECT_EQ(b.size(), 0u);
}

// ---- the memfd ---------------------------------------------------------------------------------

UniqueFd memfd_with(const std::vector<uint8_t>& bytes, unsigned seals) {
  UniqueFd fd(::memfd_create("test-table", MFD_CLOEXEC | MFD_ALLOW_SEALING));
  EXPECT_TRUE(fd.valid());
  EXPECT_EQ(::write(fd.get(), bytes.data(), bytes.size()), static_cast<ssize_t>(bytes.size()));
  if (seals != 0) {
    EXPECT_EQ(::fcntl(fd.get(), F_ADD_SEALS, seals), 0);
  }
  return fd;
}

TEST(SharedTensorTable, SharedDescriptorMapsToTheSameTable) {
  auto bytes = sample_table();
  auto table = SharedTensorTable::create(bytes, kSegments);
  ASSERT_TRUE(table.ok()) << table.error().message;
  auto fd = (*table)->share();
  ASSERT_TRUE(fd.ok());
  int seals = ::fcntl(fd->get(), F_GET_SEALS);
  EXPECT_EQ(seals & (F_SEAL_WRITE | F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL),
            F_SEAL_WRITE | F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL);
  EXPECT_LT(::write(fd->get(), "x", 1), 0);  // the content cannot change
  auto mapped = SharedTensorTable::map(std::move(*fd), (*table)->bytes(), kSegments);
  ASSERT_TRUE(mapped.ok()) << mapped.error().message;
  EXPECT_EQ((*mapped)->size(), 3u);
  EXPECT_EQ((*mapped)->view()[2].name, "scale");
  EXPECT_FALSE((*mapped)->share().ok());  // a client's mapping keeps no descriptor
}

TEST(SharedTensorTable, RefusesUnsealedOrShortMemfds) {
  auto bytes = sample_table();
  auto expect_refused = [&](UniqueFd fd, uint64_t size) {
    auto mapped = SharedTensorTable::map(std::move(fd), size, kSegments);
    ASSERT_FALSE(mapped.ok());
    EXPECT_EQ(mapped.error().code, StatusCode::kProtocolError) << mapped.error().message;
  };
  expect_refused(memfd_with(bytes, 0), bytes.size());
  expect_refused(memfd_with(bytes, F_SEAL_SHRINK), bytes.size());  // still writable
  expect_refused(memfd_with(bytes, F_SEAL_WRITE), bytes.size());   // may still shrink
  // Sealed, but the reply claims more bytes than it holds.
  expect_refused(memfd_with(bytes, F_SEAL_WRITE | F_SEAL_SHRINK), bytes.size() + 4096);
  expect_refused(memfd_with(bytes, F_SEAL_WRITE | F_SEAL_SHRINK), 0);
  expect_refused(memfd_with(bytes, F_SEAL_WRITE | F_SEAL_SHRINK), kMaxTableBytes + 1);
  expect_refused(UniqueFd(), bytes.size());
  // A regular file has no seals.
  char path[] = "/tmp/companion-table-XXXXXX";
  UniqueFd file(::mkstemp(path));
  ASSERT_TRUE(file.valid());
  ::unlink(path);
  ASSERT_EQ(::write(file.get(), bytes.data(), bytes.size()), static_cast<ssize_t>(bytes.size()));
  expect_refused(std::move(file), bytes.size());
  // Sealed and well-formed: accepted.
  EXPECT_TRUE(SharedTensorTable::map(memfd_with(bytes, F_SEAL_WRITE | F_SEAL_SHRINK), bytes.size(),
                                     kSegments)
                  .ok());
}

// ---- crafted tables ----------------------------------------------------------------------------

struct Crafted {
  std::vector<TableRecord> records;
  std::string names;
  std::vector<int64_t> dims;
  std::vector<uint32_t> index;
  uint8_t hash = 1;
};

// One valid tensor: "w", F32 [2, 3], 24 bytes at offset 0 of segment 0.
Crafted one_tensor() {
  Crafted c;
  c.records.push_back(TableRecord{0, 24, 0, 0, 0, 1, static_cast<uint8_t>(DType::kF32), 2});
  c.names = std::string("w\0", 2);
  c.dims = {2, 3, 3, 1};
  c.index.assign(2, 0);
  c.index[table_name_hash("w") & 1] = 1;
  return c;
}

std::vector<uint8_t> serialize(const Crafted& c) {
  fb::FlatBufferBuilder b;
  auto index = b.CreateVector(c.index);
  auto dims = b.CreateVector(c.dims);
  auto names = b.CreateVector(reinterpret_cast<const uint8_t*>(c.names.data()), c.names.size());
  auto records = b.CreateVectorOfStructs(
      reinterpret_cast<const wire::TensorRecord*>(c.records.data()), c.records.size());
  b.Finish(wire::CreateTensorTable(b, records, names, dims, index, c.hash));
  return std::vector<uint8_t>(b.GetBufferPointer(), b.GetBufferPointer() + b.GetSize());
}

Result<TensorTableView> open_crafted(const Crafted& c, std::vector<uint8_t>& storage) {
  storage = serialize(c);
  return TensorTableView::open(storage, kSegments);
}

TEST(TensorTable, CraftedValidTableOpens) {
  std::vector<uint8_t> storage;
  auto view = open_crafted(one_tensor(), storage);
  ASSERT_TRUE(view.ok()) << view.error().message;
  EXPECT_EQ(view->find("w"), 0u);
}

TEST(TensorTable, BadRecordsAreProtocolErrors) {
  std::vector<std::pair<const char*, std::function<void(Crafted&)>>> cases = {
      {"name past the blob", [](Crafted& c) { c.records[0].name_offset = 5; }},
      {"name without NUL", [](Crafted& c) { c.names = "wx"; }},
      {"empty name", [](Crafted& c) { c.records[0].name_length = 0; }},
      {"name longer than the limit",
       [](Crafted& c) {
         c.records[0].name_length = kMaxNameBytes + 1;
         c.names.assign(kMaxNameBytes + 2, '\0');
       }},
      {"unknown dtype", [](Crafted& c) { c.records[0].dtype = kDTypeCount; }},
      {"rank too high", [](Crafted& c) { c.records[0].ndim = kMaxRank + 1; }},
      {"dims past the array", [](Crafted& c) { c.records[0].dims_offset = 1; }},
      {"huge dims offset", [](Crafted& c) { c.records[0].dims_offset = 0xffffffffu; }},
      {"negative dim", [](Crafted& c) { c.dims[0] = -2; }},
      {"overflowing shape",
       [](Crafted& c) {
         c.dims[0] = int64_t{1} << 62;
         c.dims[1] = int64_t{1} << 62;
       }},
      {"nbytes not matching the shape", [](Crafted& c) { c.records[0].nbytes = 25; }},
      {"missing segment", [](Crafted& c) { c.records[0].segment = 2; }},
      {"outside its segment", [](Crafted& c) { c.records[0].offset = 4096 - 8; }},
      {"offset past the segment", [](Crafted& c) { c.records[0].offset = ~uint64_t{0}; }},
      {"no index", [](Crafted& c) { c.index.clear(); }},
      {"index not a power of two", [](Crafted& c) { c.index.assign(3, 1); }},
      {"unknown hash: no usable index", [](Crafted& c) { c.hash = 7; }},
  };
  for (const auto& [what, mutate] : cases) {
    Crafted c = one_tensor();
    mutate(c);
    std::vector<uint8_t> storage;
    auto view = open_crafted(c, storage);
    ASSERT_FALSE(view.ok()) << what;
    EXPECT_EQ(view.error().code, StatusCode::kProtocolError) << what;
  }
}

TEST(TensorTable, CorruptIndexEntriesFindNothingWrong) {
  Crafted c = one_tensor();
  c.records.push_back(TableRecord{24, 24, 2, 4, 0, 1, static_cast<uint8_t>(DType::kF32), 2});
  c.names += std::string("v\0", 2);
  c.dims.insert(c.dims.end(), {2, 3, 3, 1});
  std::vector<uint8_t> storage;
  // Every slot taken, none right: lookups end after one round and find nothing.
  c.index.assign(4, 0);
  c.index = {99, 0xffffffffu, 99, 5};
  auto view = open_crafted(c, storage);
  ASSERT_TRUE(view.ok()) << view.error().message;
  EXPECT_EQ(view->find("w"), TensorTableView::npos);
  EXPECT_EQ(view->find("v"), TensorTableView::npos);
  // Entries naming the wrong record: the name check refuses them.
  c.index = {2, 2, 2, 2};  // all "v"
  view = open_crafted(c, storage);
  ASSERT_TRUE(view.ok());
  EXPECT_EQ(view->find("w"), TensorTableView::npos);
  EXPECT_EQ(view->find("v"), 1u);
}

TEST(TensorTable, TruncatedOrGarbageBytesAreRefused) {
  auto bytes = sample_table();
  for (size_t n = 0; n < bytes.size(); n += 7) {
    std::vector<uint8_t> cut(bytes.begin(), bytes.begin() + static_cast<std::ptrdiff_t>(n));
    EXPECT_FALSE(TensorTableView::open(cut, kSegments).ok()) << n;
  }
  std::vector<uint8_t> garbage(256, 0xa5);
  EXPECT_FALSE(TensorTableView::open(garbage, kSegments).ok());
  // Fewer segments than the records name.
  EXPECT_FALSE(TensorTableView::open(bytes, std::vector<uint64_t>{4096}).ok());
}

// ---- Parameters carrying a table ---------------------------------------------------------------

TEST(TensorTable, ParametersCarryTheTableDescriptor) {
  ModelStatus model;
  model.key = "k";
  std::vector<SegmentInfo> segments{SegmentInfo{}};
  segments[0].size = 4096;
  segments[0].fd_index = 0;
  auto payload = encode_parameters_with_table(5, 9, model, segments, 1, 12345, false).value();
  auto decoded = decode(payload);
  ASSERT_TRUE(decoded.ok()) << decoded.error().message;
  const auto& p = std::get<Parameters>(decoded->body);
  EXPECT_EQ(p.table_fd_index, 1);
  EXPECT_EQ(p.table_bytes, 12345u);
  EXPECT_TRUE(p.tensors.empty());
  EXPECT_EQ(p.lease_id, 9u);

  for (auto [index, bytes] : {std::pair<int32_t, uint64_t>{int32_t(kMaxFdsPerFrame), 100},
                              {-2, 100},
                              {1, 0},
                              {1, kMaxTableBytes + 1}}) {
    auto bad =
        decode(encode_parameters_with_table(5, 9, model, segments, index, bytes, false).value());
    ASSERT_FALSE(bad.ok()) << index << " " << bytes;
    EXPECT_EQ(bad.error().code, StatusCode::kProtocolError);
  }
}

TEST(TensorTable, InlineEncodingFromATableMatchesTheTable) {
  auto bytes = sample_table();
  auto view = TensorTableView::open(bytes, kSegments);
  ASSERT_TRUE(view.ok());
  std::vector<SegmentInfo> segments(2);
  segments[0].size = kSegments[0];
  segments[0].fd_index = 0;
  segments[1].size = kSegments[1];
  segments[1].fd_index = 1;
  auto decoded =
      decode(encode_parameters_inline(1, 2, ModelStatus{}, segments, *view, false).value());
  ASSERT_TRUE(decoded.ok()) << decoded.error().message;
  const auto& p = std::get<Parameters>(decoded->body);
  ASSERT_EQ(p.tensors.size(), 3u);
  EXPECT_EQ(p.table_fd_index, -1);
  for (size_t i = 0; i < 3; ++i) {
    EXPECT_EQ(p.tensors[i].name, (*view)[i].name);
    EXPECT_EQ(p.tensors[i].offset, (*view)[i].offset);
    EXPECT_TRUE(std::equal(p.tensors[i].strides.begin(), p.tensors[i].strides.end(),
                           (*view)[i].strides.begin(), (*view)[i].strides.end()));
  }
}

}  // namespace
}  // namespace companion::protocol
