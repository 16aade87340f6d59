// Tensor-parallel shard plans: every rule at tp_size 2 and 4, every rank, with and without a
// dtype cast, on 1-D, 2-D and 3-D tensors, loaded into real slabs and compared bit for bit with
// slices computed here by row-major index arithmetic. Extents (one per dim-0 shard, one per row of
// a dim-1 shard), presets per architecture (config.json or tensor names), rule strings, and the
// errors: dimensions that do not divide, unknown architectures, bad rules.
#include <atomic>
#include <cstring>
#include <map>
#include <optional>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include <gtest/gtest.h>

#include "checkpoint/checkpoint.hpp"
#include "checkpoint/dtype_convert.hpp"
#include "loader/loader.hpp"
#include "loader/shard_plan.hpp"
#include "memory/host_backend.hpp"
#include "support/shard_rule_strings.hpp"
#include "test_support.hpp"

namespace companion::loader {
namespace {

using testing::random_tensor;
using testing::read_back;
using testing::safetensors_file;
using testing::TempDir;
using testing::TensorData;
using testing::WrappedBackend;

// ---- the reference: slices by index arithmetic, independent of the planner ------------------

std::vector<int64_t> row_major_strides(const std::vector<int64_t>& shape) {
  std::vector<int64_t> strides(shape.size(), 1);
  for (size_t d = shape.size(); d-- > 1;) strides[d - 1] = strides[d] * shape[d];
  return strides;
}

// Bytes of `t` converted to `target` (as stored when equal).
std::string converted(const TensorData& t, DType target) {
  if (target == t.dtype) return t.bytes;
  size_t count = t.bytes.size() / dtype_size(t.dtype);
  std::string out(count * dtype_size(target), '\0');
  auto r = checkpoint::convert_elements(t.dtype, target, t.bytes.data(), out.data(), count);
  EXPECT_TRUE(r.ok()) << r.error().to_string();
  return out;
}

struct Slice {
  std::vector<int64_t> shape;
  std::string bytes;
};

// Rank `rank` of `tp`'s shard along `dim` (nullopt: the whole tensor), the dimension holding
// `packed` equal parts that are each split: for every element of the shard, where it is in the
// whole tensor.
Slice reference_slice(const TensorData& t, DType target, std::optional<size_t> dim, int64_t packed,
                      int64_t tp, int64_t rank) {
  std::string whole = converted(t, target);
  if (!dim) return {t.shape, whole};
  size_t elem = dtype_size(target);
  std::vector<int64_t> shape = t.shape;
  int64_t part = t.shape[*dim] / packed;
  int64_t slice = part / tp;
  shape[*dim] = t.shape[*dim] / tp;
  std::vector<int64_t> src_strides = row_major_strides(t.shape);
  uint64_t count = testing::element_count(shape);
  std::string out(count * elem, '\0');
  std::vector<int64_t> index(shape.size(), 0);
  for (uint64_t i = 0; i < count; ++i) {
    // Unravel i over the shard's shape.
    uint64_t rest = i;
    for (size_t d = shape.size(); d-- > 0;) {
      index[d] = static_cast<int64_t>(rest % static_cast<uint64_t>(shape[d]));
      rest /= static_cast<uint64_t>(shape[d]);
    }
    int64_t src = 0;
    for (size_t d = 0; d < shape.size(); ++d) {
      int64_t k = index[d];
      if (d == *dim) k = (index[d] / slice) * part + rank * slice + index[d] % slice;
      src += k * src_strides[d];
    }
    std::memcpy(out.data() + i * elem, whole.data() + static_cast<uint64_t>(src) * elem, elem);
  }
  return {shape, out};
}

// ---- loading ---------------------------------------------------------------------------------

struct Loaded {
  LoadPlan plan;
  std::vector<std::string> segments;

  const TensorCopy* find(const std::string& name) const {
    for (const auto& t : plan.tensors)
      if (t.source.name == name) return &t;
    return nullptr;
  }
  std::string bytes(const TensorCopy& t) const {
    return segments[t.placement.segment].substr(t.placement.offset, t.target_bytes);
  }
};

std::optional<Loaded> load(const checkpoint::Checkpoint& ckpt, std::optional<DType> cast,
                           const ShardOptions& shard, memory::Backend& backend) {
  auto plan = make_load_plan(ckpt, cast, backend, shard);
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
  out.segments = read_back(**slab);
  out.plan = std::move(plan).value();
  return out;
}

Result<checkpoint::Checkpoint> write_model(const TempDir& dir, const std::vector<TensorData>& ts,
                                           const std::string& config = "") {
  testing::write_file(dir / "m/model.safetensors", safetensors_file(ts));
  if (!config.empty()) testing::write_file(dir / "m/config.json", config);
  return checkpoint::open_checkpoint(dir / "m", {dir.path()});
}

ShardOptions shard_options(uint32_t tp, uint32_t rank, std::string rules = "",
                           std::optional<std::string> config = std::nullopt) {
  ShardOptions o;
  o.tp_size = tp;
  o.tp_rank = rank;
  o.rules = std::move(rules);
  o.config_json = std::move(config);
  return o;
}

// Extents cover the shard exactly: file order, inside the tensor, no overlaps, destinations back
// to back, source bytes adding up to what is read.
void expect_extents_sane(const TensorCopy& t) {
  size_t in = dtype_size(t.source.dtype), out = dtype_size(t.target_dtype);
  uint64_t dst = 0, prev_end = t.source.file_offset;
  for (const ReadExtent& e : t.extents) {
    EXPECT_GT(e.bytes, 0u);
    EXPECT_EQ(e.bytes % in, 0u);
    EXPECT_GE(e.file_offset, prev_end);
    EXPECT_LE(e.file_offset + e.bytes, t.source.file_offset + t.source.nbytes);
    EXPECT_EQ(e.dst_offset, dst);
    dst += e.bytes / in * out;
    prev_end = e.file_offset + e.bytes;
  }
  EXPECT_EQ(dst, t.target_bytes);
  uint64_t elements = testing::element_count(t.target_shape);
  EXPECT_EQ(t.target_bytes, elements * out);
}

// ---- every rule, bit-exact -------------------------------------------------------------------

struct RuleCase {
  std::string rule;
  std::vector<int64_t> shape;
  std::optional<size_t> dim;  // what the rule means for this shape (nullopt: whole)
  int64_t packed;
};

// Each case's tensor is named after its index; shapes divide by packed × 4.
const std::vector<RuleCase> kRuleCases = {
    // 1-D
    {"column", {24}, 0, 1},
    {"row", {24}, std::nullopt, 1},  // a row-parallel bias stays whole
    {"replicated", {24}, std::nullopt, 1},
    {"dim0", {24}, 0, 1},
    {"column-packed(3)", {24}, 0, 3},
    {"dim0-packed(2)", {16}, 0, 2},
    // 2-D
    {"column", {12, 20}, 0, 1},
    {"row", {12, 20}, 1, 1},
    {"replicated", {12, 20}, std::nullopt, 1},
    {"dim0", {8, 12}, 0, 1},
    {"dim1", {6, 8}, 1, 1},
    {"column-packed(3)", {12, 5}, 0, 3},
    {"dim1-packed(3)", {5, 24}, 1, 3},
    {"row-packed(2)", {3, 16}, 1, 2},
    // 3-D
    {"column", {4, 3, 5}, 0, 1},
    {"row", {3, 8, 5}, 1, 1},
    {"dim2", {3, 5, 8}, 2, 1},
    {"dim1-packed(2)", {3, 8, 4}, 1, 2},
    {"dim2-packed(3)", {2, 3, 12}, 2, 3},
    {"replicated", {2, 3, 4}, std::nullopt, 1},
    // degenerate: nothing to read, still the right shape
    {"dim1", {0, 8}, 1, 1},
    {"column", {8, 0}, 0, 1},
};

std::string case_name(size_t i) {
  return "layer." + std::to_string(i) + ".w";
}

std::vector<TensorData> rule_case_tensors(DType dtype, uint32_t seed) {
  std::vector<TensorData> out;
  for (size_t i = 0; i < kRuleCases.size(); ++i)
    out.push_back(
        random_tensor(case_name(i), dtype, kRuleCases[i].shape, seed + static_cast<uint32_t>(i)));
  return out;
}

std::string rule_case_rules() {
  std::string rules;
  for (size_t i = 0; i < kRuleCases.size(); ++i)
    rules += case_name(i) + "=" + kRuleCases[i].rule + ";";
  return rules;
}

struct CastCase {
  DType stored;
  std::optional<DType> cast;
};

class ShardRulesBitExact : public ::testing::TestWithParam<CastCase> {};

TEST_P(ShardRulesBitExact, EveryRuleEveryRankMatchesTheReference) {
  const CastCase c = GetParam();
  TempDir dir;
  std::vector<TensorData> tensors = rule_case_tensors(c.stored, 100);
  auto ckpt = write_model(dir, tensors);  // no config.json: the rules alone
  ASSERT_TRUE(ckpt.ok()) << ckpt.error().to_string();
  DType target = c.cast && dtype_is_float_convertible(c.stored) ? *c.cast : c.stored;
  auto backend = memory::make_host_backend();
  for (uint32_t tp : {2u, 4u}) {
    for (uint32_t rank = 0; rank < tp; ++rank) {
      SCOPED_TRACE("tp " + std::to_string(tp) + " rank " + std::to_string(rank));
      auto loaded = load(*ckpt, c.cast, shard_options(tp, rank, rule_case_rules()), *backend);
      ASSERT_TRUE(loaded);
      uint64_t expect_read = 0;
      for (size_t i = 0; i < kRuleCases.size(); ++i) {
        const RuleCase& rc = kRuleCases[i];
        SCOPED_TRACE(rc.rule + " " + case_name(i));
        const TensorCopy* t = loaded->find(case_name(i));
        ASSERT_NE(t, nullptr);
        Slice want = reference_slice(tensors[i], target, rc.dim, rc.packed, tp, rank);
        EXPECT_EQ(t->target_shape, want.shape);
        EXPECT_EQ(t->target_dtype, target);
        ASSERT_EQ(t->target_bytes, want.bytes.size());
        EXPECT_TRUE(loaded->bytes(*t) == want.bytes) << "shard bytes differ";
        expect_extents_sane(*t);
        expect_read += want.bytes.size() / dtype_size(target) * dtype_size(c.stored);
      }
      EXPECT_EQ(loaded->plan.bytes_to_read, expect_read);
    }
  }
}

INSTANTIATE_TEST_SUITE_P(
    Casts, ShardRulesBitExact,
    ::testing::Values(CastCase{DType::kF32, std::nullopt}, CastCase{DType::kF32, DType::kBF16},
                      CastCase{DType::kF16, DType::kF32}, CastCase{DType::kBF16, DType::kF16},
                      CastCase{DType::kI32, DType::kBF16},  // not cast
                      CastCase{DType::kU8, std::nullopt}),
    [](const ::testing::TestParamInfo<CastCase>& param_info) {
      const CastCase& c = param_info.param;
      return std::string(dtype_name(c.stored)) + "_to_" + (c.cast ? dtype_name(*c.cast) : "stored");
    });

// Small segments (tensors spread over several) and slabs without a host address (Slab::write)
// get the same bytes.
TEST(ShardPlan, OtherBackendsGetTheSameBytes) {
  TempDir dir;
  std::vector<TensorData> tensors = rule_case_tensors(DType::kF16, 7);
  // 6 KiB shards as F32: two do not fit one 8 KiB segment.
  tensors.push_back(random_tensor("big", DType::kF16, {64, 96}, 3));
  tensors.push_back(random_tensor("big2", DType::kF16, {96, 64}, 4));
  auto ckpt = write_model(dir, tensors);
  ASSERT_TRUE(ckpt.ok()) << ckpt.error().to_string();
  std::string rules = rule_case_rules() + "big=row;big2=column";
  for (bool hide : {false, true}) {
    WrappedBackend backend(2 * testing::page_size(), hide);
    for (uint32_t rank = 0; rank < 4; ++rank) {
      auto loaded = load(*ckpt, DType::kF32, shard_options(4, rank, rules), backend);
      ASSERT_TRUE(loaded);
      EXPECT_GT(loaded->plan.segment_sizes.size(), 1u);
      const TensorCopy* big = loaded->find("big");
      ASSERT_NE(big, nullptr);
      Slice want = reference_slice(tensors[tensors.size() - 2], DType::kF32, 1, 1, 4, rank);
      EXPECT_TRUE(loaded->bytes(*big) == want.bytes) << "hide " << hide << " rank " << rank;
      Slice want2 = reference_slice(tensors.back(), DType::kF32, 0, 1, 4, rank);
      EXPECT_TRUE(loaded->bytes(*loaded->find("big2")) == want2.bytes) << "rank " << rank;
      for (size_t i = 0; i < kRuleCases.size(); ++i) {
        Slice w = reference_slice(tensors[i], DType::kF32, kRuleCases[i].dim, kRuleCases[i].packed,
                                  4, rank);
        EXPECT_TRUE(loaded->bytes(*loaded->find(case_name(i))) == w.bytes) << case_name(i);
      }
    }
  }
}

// ---- extents -----------------------------------------------------------------------------------

checkpoint::TensorEntry entry(std::vector<int64_t> shape, DType dtype = DType::kF16,
                              uint64_t offset = 1000) {
  checkpoint::TensorEntry t;
  t.name = "t";
  t.dtype = dtype;
  t.shape = std::move(shape);
  t.file_offset = offset;
  t.nbytes = testing::element_count(t.shape) * dtype_size(dtype);
  return t;
}

SplitRule rule(std::string_view text) {
  auto r = parse_shard_rules(std::string("x=") + std::string(text));
  EXPECT_TRUE(r.ok() && r->size() == 1) << text;
  return r.ok() && !r->empty() ? (*r)[0].split : SplitRule{};
}

TEST(ShardExtents, Dim0SplitIsOneContiguousExtent) {
  auto t = entry({64, 32});
  for (uint32_t r = 0; r < 4; ++r) {
    auto s = shard_tensor(t, rule("column"), 4, r, DType::kF16);
    ASSERT_TRUE(s.ok()) << s.error().to_string();
    ASSERT_EQ(s->extents.size(), 1u);
    EXPECT_EQ(s->extents[0].file_offset, 1000 + r * 16 * 32 * 2);
    EXPECT_EQ(s->extents[0].bytes, 16u * 32 * 2);
    EXPECT_EQ(s->extents[0].dst_offset, 0u);
    EXPECT_EQ(s->shape, (std::vector<int64_t>{16, 32}));
    EXPECT_EQ(s->source_bytes, 16u * 32 * 2);
  }
  // A cast changes destination sizes, not what is read.
  auto s = shard_tensor(t, rule("column"), 2, 1, DType::kF32);
  ASSERT_TRUE(s.ok());
  EXPECT_EQ(s->source_bytes, 32u * 32 * 2);
  EXPECT_EQ(s->target_bytes, 32u * 32 * 4);
}

TEST(ShardExtents, Dim1SplitIsOneExtentPerRow) {
  auto t = entry({8, 64});
  auto s = shard_tensor(t, rule("row"), 2, 1, DType::kF32);
  ASSERT_TRUE(s.ok()) << s.error().to_string();
  ASSERT_EQ(s->extents.size(), 8u);
  for (uint64_t row = 0; row < 8; ++row) {
    EXPECT_EQ(s->extents[row].file_offset, 1000 + (row * 64 + 32) * 2);
    EXPECT_EQ(s->extents[row].bytes, 32u * 2);
    EXPECT_EQ(s->extents[row].dst_offset, row * 32 * 4);  // target bytes
  }
  EXPECT_EQ(s->shape, (std::vector<int64_t>{8, 32}));
  EXPECT_EQ(s->source_bytes, 8u * 32 * 2);
  // One outer row: one extent. A 3-D dim-1 split moves whole inner blocks per outer index.
  auto one = shard_tensor(entry({1, 64}), rule("dim1"), 4, 2, DType::kF16);
  ASSERT_TRUE(one.ok());
  EXPECT_EQ(one->extents.size(), 1u);
  auto three = shard_tensor(entry({3, 8, 5}), rule("row"), 2, 0, DType::kF16);
  ASSERT_TRUE(three.ok());
  ASSERT_EQ(three->extents.size(), 3u);
  EXPECT_EQ(three->extents[1].bytes, 4u * 5 * 2);
  EXPECT_EQ(three->extents[1].file_offset, 1000 + 40u * 2);
}

TEST(ShardExtents, PackedSplitsReadOnePiecePerPart) {
  // GPT-2 c_attn: Conv1D [in, 3 * hidden], q|k|v along dim 1.
  auto w = shard_tensor(entry({4, 24}), rule("dim1-packed(3)"), 2, 1, DType::kF16);
  ASSERT_TRUE(w.ok()) << w.error().to_string();
  EXPECT_EQ(w->shape, (std::vector<int64_t>{4, 12}));
  ASSERT_EQ(w->extents.size(), 4u * 3);
  EXPECT_EQ(w->extents[0].file_offset, 1000 + 4u * 2);   // q[4:8]
  EXPECT_EQ(w->extents[1].file_offset, 1000 + 12u * 2);  // k[4:8]
  EXPECT_EQ(w->extents[2].file_offset, 1000 + 20u * 2);  // v[4:8]
  EXPECT_EQ(w->extents[3].file_offset, 1000 + 28u * 2);  // next row's q
  // Its bias: three pieces.
  auto b = shard_tensor(entry({24}), rule("column-packed(3)"), 2, 0, DType::kF16);
  ASSERT_TRUE(b.ok());
  ASSERT_EQ(b->extents.size(), 3u);
  EXPECT_EQ(b->extents[2].file_offset, 1000 + 16u * 2);
  EXPECT_EQ(b->extents[2].dst_offset, 8u * 2);
}

TEST(ShardExtents, WholeTensorsAndSizeOneSplitsCoalesce) {
  auto t = entry({6, 10});
  for (const char* r : {"replicated", "column", "row", "dim1-packed(2)"}) {
    auto s = shard_tensor(t, rule(r), 1, 0, DType::kF16);
    ASSERT_TRUE(s.ok()) << r;
    ASSERT_EQ(s->extents.size(), 1u) << r;
    EXPECT_EQ(s->extents[0].bytes, t.nbytes) << r;
    EXPECT_EQ(s->shape, t.shape) << r;
  }
  auto bias = shard_tensor(entry({10}), rule("row"), 2, 1, DType::kF16);
  ASSERT_TRUE(bias.ok());
  EXPECT_EQ(bias->shape, (std::vector<int64_t>{10}));
  EXPECT_EQ(bias->source_bytes, 20u);
}

// ---- presets
// -------------------------------------------------------------------------------------

constexpr int64_t kHidden = 64, kKv = 32, kFfn = 128, kVocab = 256;

std::vector<TensorData> llama_tensors(int layers, bool qkv_bias) {
  std::vector<TensorData> ts;
  uint32_t seed = 500;
  auto add = [&](std::string name, std::vector<int64_t> shape) {
    ts.push_back(random_tensor(std::move(name), DType::kBF16, std::move(shape), seed++));
  };
  add("model.embed_tokens.weight", {kVocab, kHidden});
  for (int i = 0; i < layers; ++i) {
    std::string p = "model.layers." + std::to_string(i) + ".";
    add(p + "input_layernorm.weight", {kHidden});
    add(p + "self_attn.q_proj.weight", {kHidden, kHidden});
    add(p + "self_attn.k_proj.weight", {kKv, kHidden});
    add(p + "self_attn.v_proj.weight", {kKv, kHidden});
    if (qkv_bias) {
      add(p + "self_attn.q_proj.bias", {kHidden});
      add(p + "self_attn.k_proj.bias", {kKv});
      add(p + "self_attn.v_proj.bias", {kKv});
    }
    add(p + "self_attn.o_proj.weight", {kHidden, kHidden});
    add(p + "post_attention_layernorm.weight", {kHidden});
    add(p + "mlp.gate_proj.weight", {kFfn, kHidden});
    add(p + "mlp.up_proj.weight", {kFfn, kHidden});
    add(p + "mlp.down_proj.weight", {kHidden, kFfn});
  }
  add("model.norm.weight", {kHidden});
  add("lm_head.weight", {kVocab, kHidden});
  return ts;
}

std::map<std::string, std::vector<int64_t>> shapes(const LoadPlan& plan) {
  std::map<std::string, std::vector<int64_t>> out;
  for (const auto& t : plan.tensors) out[t.source.name] = t.target_shape;
  return out;
}

// Every tensor of a TP=`tp` load under the preset equals the reference for the preset's split.
void expect_preset_load(
    const checkpoint::Checkpoint& ckpt, const std::vector<TensorData>& tensors,
    const ShardOptions& options,
    const std::map<std::string, std::pair<std::optional<size_t>, int64_t>>& splits) {
  auto backend = memory::make_host_backend();
  auto loaded = load(ckpt, std::nullopt, options, *backend);
  ASSERT_TRUE(loaded);
  for (const auto& t : tensors) {
    SCOPED_TRACE(t.name);
    auto it = splits.find(t.name);
    std::optional<size_t> dim;
    int64_t packed = 1;
    if (it != splits.end()) std::tie(dim, packed) = it->second;
    Slice want = reference_slice(t, t.dtype, dim, packed, options.tp_size, options.tp_rank);
    const TensorCopy* got = loaded->find(t.name);
    ASSERT_NE(got, nullptr);
    EXPECT_EQ(got->target_shape, want.shape);
    EXPECT_TRUE(loaded->bytes(*got) == want.bytes);
  }
}

std::map<std::string, std::pair<std::optional<size_t>, int64_t>> llama_splits(int layers,
                                                                              bool qkv_bias) {
  std::map<std::string, std::pair<std::optional<size_t>, int64_t>> s;
  s["model.embed_tokens.weight"] = {0, 1};
  s["lm_head.weight"] = {0, 1};
  for (int i = 0; i < layers; ++i) {
    std::string p = "model.layers." + std::to_string(i) + ".";
    for (const char* n : {"self_attn.q_proj.weight", "self_attn.k_proj.weight",
                          "self_attn.v_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight"})
      s[p + n] = {0, 1};
    if (qkv_bias)
      for (const char* n :
           {"self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"})
        s[p + n] = {0, 1};
    s[p + "self_attn.o_proj.weight"] = {1, 1};
    s[p + "mlp.down_proj.weight"] = {1, 1};
  }
  return s;
}

TEST(ShardPresets, LlamaFromConfigSplitsByThePresetAndReadsAboutHalf) {
  TempDir dir;
  auto tensors = llama_tensors(2, false);
  std::string config = R"({"architectures": ["LlamaForCausalLM"], "model_type": "llama"})";
  auto ckpt = write_model(dir, tensors, config);
  ASSERT_TRUE(ckpt.ok()) << ckpt.error().to_string();
  for (uint32_t rank = 0; rank < 2; ++rank)
    expect_preset_load(*ckpt, tensors, shard_options(2, rank, "", config), llama_splits(2, false));

  auto backend = memory::make_host_backend();
  auto whole = make_load_plan(*ckpt, std::nullopt, *backend);
  ASSERT_TRUE(whole.ok());
  EXPECT_EQ(whole->bytes_to_read, ckpt->total_bytes);
  for (uint32_t tp : {2u, 4u}) {
    uint64_t sum = 0;
    for (uint32_t rank = 0; rank < tp; ++rank) {
      auto plan =
          make_load_plan(*ckpt, std::nullopt, *backend, shard_options(tp, rank, "", config));
      ASSERT_TRUE(plan.ok()) << plan.error().to_string();
      double fraction =
          static_cast<double>(plan->bytes_to_read) / static_cast<double>(whole->bytes_to_read);
      EXPECT_GT(fraction, 1.0 / tp);
      EXPECT_LT(fraction, 1.0 / tp + 0.02) << "tp " << tp;  // norms are replicated, and tiny
      sum += plan->bytes_to_read;
    }
    // The ranks together read the model once, plus tp - 1 extra copies of the norms.
    uint64_t norms = (2 * 2 + 1) * kHidden * 2;
    EXPECT_EQ(sum, whole->bytes_to_read + (tp - 1) * norms);
  }
  auto s = shapes(
      make_load_plan(*ckpt, std::nullopt, *backend, shard_options(2, 1, "", config)).value());
  EXPECT_EQ(s["model.layers.1.self_attn.q_proj.weight"], (std::vector<int64_t>{32, 64}));
  EXPECT_EQ(s["model.layers.1.self_attn.k_proj.weight"], (std::vector<int64_t>{16, 64}));
  EXPECT_EQ(s["model.layers.1.self_attn.o_proj.weight"], (std::vector<int64_t>{64, 32}));
  EXPECT_EQ(s["model.layers.1.mlp.down_proj.weight"], (std::vector<int64_t>{64, 64}));
  EXPECT_EQ(s["model.layers.1.mlp.up_proj.weight"], (std::vector<int64_t>{64, 64}));
  EXPECT_EQ(s["model.norm.weight"], (std::vector<int64_t>{64}));
  EXPECT_EQ(s["model.embed_tokens.weight"], (std::vector<int64_t>{128, 64}));
  EXPECT_EQ(s["lm_head.weight"], (std::vector<int64_t>{128, 64}));
}

TEST(ShardPresets, Qwen2BiasesAndMistralByModelTypeAndLlamaByNames) {
  TempDir dir;
  auto tensors = llama_tensors(1, true);
  std::string qwen = R"({"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2"})";
  auto ckpt = write_model(dir, tensors, qwen);
  ASSERT_TRUE(ckpt.ok()) << ckpt.error().to_string();
  for (uint32_t rank = 0; rank < 4; ++rank)
    expect_preset_load(*ckpt, tensors, shard_options(4, rank, "", qwen), llama_splits(1, true));
  // model_type alone, and no config.json at all (the names look like Llama).
  for (std::optional<std::string> config :
       {std::optional<std::string>(R"({"model_type": "mistral"})"), std::optional<std::string>()}) {
    auto planner = ShardPlanner::create(shard_options(2, 0, "", config), ckpt->tensors);
    ASSERT_TRUE(planner.ok()) << planner.error().to_string();
    EXPECT_EQ(planner->preset(), "llama");
    expect_preset_load(*ckpt, tensors, shard_options(2, 1, "", config), llama_splits(1, true));
  }
  auto arch = detect_architecture(R"({"architectures": ["MistralForCausalLM"]})", ckpt->tensors);
  ASSERT_TRUE(arch.ok());
  EXPECT_EQ(arch->preset, "llama");
}

std::vector<TensorData> opt_tensors() {
  std::vector<TensorData> ts;
  uint32_t seed = 900;
  auto add = [&](std::string name, std::vector<int64_t> shape) {
    ts.push_back(random_tensor(std::move(name), DType::kF16, std::move(shape), seed++));
  };
  add("model.decoder.embed_tokens.weight", {kVocab, kHidden});
  add("model.decoder.embed_positions.weight", {66, kHidden});
  add("model.decoder.final_layer_norm.weight", {kHidden});
  add("model.decoder.final_layer_norm.bias", {kHidden});
  std::string p = "model.decoder.layers.0.";
  for (const char* proj : {"k_proj", "v_proj", "q_proj", "out_proj"}) {
    add(p + "self_attn." + proj + ".weight", {kHidden, kHidden});
    add(p + "self_attn." + proj + ".bias", {kHidden});
  }
  add(p + "self_attn_layer_norm.weight", {kHidden});
  add(p + "fc1.weight", {kFfn, kHidden});
  add(p + "fc1.bias", {kFfn});
  add(p + "fc2.weight", {kHidden, kFfn});
  add(p + "fc2.bias", {kHidden});
  add("lm_head.weight", {kVocab, kHidden});
  return ts;
}

TEST(ShardPresets, Opt) {
  TempDir dir;
  auto tensors = opt_tensors();
  std::map<std::string, std::pair<std::optional<size_t>, int64_t>> splits;
  std::string p = "model.decoder.layers.0.";
  for (const char* n :
       {"self_attn.q_proj.weight", "self_attn.q_proj.bias", "self_attn.k_proj.weight",
        "self_attn.k_proj.bias", "self_attn.v_proj.weight", "self_attn.v_proj.bias", "fc1.weight",
        "fc1.bias"})
    splits[p + n] = {0, 1};
  splits[p + "self_attn.out_proj.weight"] = {1, 1};  // its bias: whole
  splits[p + "fc2.weight"] = {1, 1};
  splits["model.decoder.embed_tokens.weight"] = {0, 1};
  splits["lm_head.weight"] = {0, 1};
  std::string config = R"({"architectures": ["OPTForCausalLM"], "model_type": "opt"})";
  auto ckpt = write_model(dir, tensors, config);
  ASSERT_TRUE(ckpt.ok()) << ckpt.error().to_string();
  for (uint32_t tp : {2u, 4u})
    for (uint32_t rank = 0; rank < tp; ++rank) {
      expect_preset_load(*ckpt, tensors, shard_options(tp, rank, "", config), splits);
      expect_preset_load(*ckpt, tensors, shard_options(tp, rank), splits);  // guessed by names
    }
  auto arch = detect_architecture(std::nullopt, ckpt->tensors);
  ASSERT_TRUE(arch.ok());
  EXPECT_EQ(arch->preset, "opt");
}

std::vector<TensorData> gpt2_tensors(int64_t vocab = kVocab) {
  std::vector<TensorData> ts;
  uint32_t seed = 1300;
  auto add = [&](std::string name, std::vector<int64_t> shape) {
    ts.push_back(random_tensor(std::move(name), DType::kF32, std::move(shape), seed++));
  };
  add("wte.weight", {vocab, kHidden});
  add("wpe.weight", {40, kHidden});
  add("h.0.ln_1.weight", {kHidden});
  add("h.0.attn.bias", {1, 1, 40, 40});  // the causal mask buffer of old checkpoints
  add("h.0.attn.c_attn.weight", {kHidden, 3 * kHidden});
  add("h.0.attn.c_attn.bias", {3 * kHidden});
  add("h.0.attn.c_proj.weight", {kHidden, kHidden});
  add("h.0.attn.c_proj.bias", {kHidden});
  add("h.0.mlp.c_fc.weight", {kHidden, kFfn});
  add("h.0.mlp.c_fc.bias", {kFfn});
  add("h.0.mlp.c_proj.weight", {kFfn, kHidden});
  add("h.0.mlp.c_proj.bias", {kHidden});
  add("ln_f.weight", {kHidden});
  return ts;
}

TEST(ShardPresets, Gpt2SplitsTheFusedQkvPartByPart) {
  TempDir dir;
  auto tensors = gpt2_tensors();
  std::string config = R"({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"})";
  auto ckpt = write_model(dir, tensors, config);
  ASSERT_TRUE(ckpt.ok()) << ckpt.error().to_string();
  std::map<std::string, std::pair<std::optional<size_t>, int64_t>> splits = {
      {"wte.weight", {0, 1}},           {"h.0.attn.c_attn.weight", {1, 3}},
      {"h.0.attn.c_attn.bias", {0, 3}}, {"h.0.attn.c_proj.weight", {0, 1}},
      {"h.0.mlp.c_fc.weight", {1, 1}},  {"h.0.mlp.c_fc.bias", {0, 1}},
      {"h.0.mlp.c_proj.weight", {0, 1}}};
  for (uint32_t tp : {2u, 4u})
    for (uint32_t rank = 0; rank < tp; ++rank) {
      expect_preset_load(*ckpt, tensors, shard_options(tp, rank, "", config), splits);
      expect_preset_load(*ckpt, tensors, shard_options(tp, rank), splits);  // guessed by names
    }

  // The packed split written out by hand: per row, q[r], k[r], v[r] slices one after another
  // (a plain dim-1 split would hand rank 0 all of q and half of k).
  auto backend = memory::make_host_backend();
  auto loaded = load(*ckpt, std::nullopt, shard_options(2, 1, "", config), *backend);
  ASSERT_TRUE(loaded);
  const TensorData& w = tensors[4];
  ASSERT_EQ(w.name, "h.0.attn.c_attn.weight");
  std::string want;
  const size_t f = sizeof(float), row = 3 * kHidden;
  for (int64_t i = 0; i < kHidden; ++i)
    for (int64_t part = 0; part < 3; ++part)
      want += w.bytes.substr((i * row + part * kHidden + kHidden / 2) * f, kHidden / 2 * f);
  const TensorCopy* got = loaded->find(w.name);
  ASSERT_NE(got, nullptr);
  EXPECT_EQ(got->target_shape, (std::vector<int64_t>{kHidden, 3 * kHidden / 2}));
  EXPECT_TRUE(loaded->bytes(*got) == want);
}

TEST(ShardPresets, SpecRulesComeBeforeThePresetAndFirstMatchWins) {
  TempDir dir;
  auto tensors = llama_tensors(1, false);
  std::string config = R"({"architectures": ["LlamaForCausalLM"]})";
  auto ckpt = write_model(dir, tensors, config);
  ASSERT_TRUE(ckpt.ok());
  auto splits = llama_splits(1, false);
  splits.erase("model.layers.0.mlp.down_proj.weight");  // replicated by the spec
  splits["model.embed_tokens.weight"] = {1, 1};         // hidden-split by the spec
  std::string rules =
      " *.mlp.down_proj.weight = replicated ; model.embed_* = DIM1 ; model.embed_tokens.* = dim0 ;";
  for (uint32_t rank = 0; rank < 2; ++rank)
    expect_preset_load(*ckpt, tensors, shard_options(2, rank, rules, config), splits);
}

TEST(ShardPresets, TpSizeOneLoadsWholeTensorsWhateverTheRules) {
  TempDir dir;
  auto tensors = rule_case_tensors(DType::kF32, 5);
  auto ckpt = write_model(dir, tensors, R"({"architectures": ["SomethingElse"]})");
  ASSERT_TRUE(ckpt.ok());
  auto backend = memory::make_host_backend();
  auto plain = make_load_plan(*ckpt, std::nullopt, *backend);
  auto ruled = make_load_plan(*ckpt, std::nullopt, *backend,
                              shard_options(1, 0, rule_case_rules(), "not json"));
  ASSERT_TRUE(plain.ok() && ruled.ok());
  ASSERT_EQ(plain->tensors.size(), ruled->tensors.size());
  for (size_t i = 0; i < plain->tensors.size(); ++i) {
    EXPECT_EQ(plain->tensors[i].target_shape, ruled->tensors[i].target_shape);
    EXPECT_EQ(plain->tensors[i].extents.size(), ruled->tensors[i].extents.size());
  }
  EXPECT_EQ(plain->bytes_to_read, ruled->bytes_to_read);
}

// ---- errors
// --------------------------------------------------------------------------------------

void expect_error(const Result<LoadPlan>& r, StatusCode code,
                  const std::vector<std::string>& mentions) {
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code, code) << r.error().to_string();
  for (const auto& m : mentions)
    EXPECT_NE(r.error().message.find(m), std::string::npos)
        << "'" << m << "' missing in: " << r.error().message;
}

TEST(ShardErrors, DimensionsThatDoNotDivideAreRefusedNamingTheTensor) {
  TempDir dir;
  auto ckpt = write_model(dir, {random_tensor("proj.weight", DType::kF16, {30, 16}, 1),
                                random_tensor("qkv.weight", DType::kF16, {16, 18}, 2),
                                random_tensor("scalar", DType::kF16, {}, 3),
                                random_tensor("flat", DType::kF16, {16}, 4)});
  ASSERT_TRUE(ckpt.ok());
  auto backend = memory::make_host_backend();
  auto plan = [&](uint32_t tp, const std::string& rules) {
    return make_load_plan(*ckpt, std::nullopt, *backend, shard_options(tp, 0, rules));
  };
  expect_error(plan(4, "proj.weight=column"), StatusCode::kInvalidArgument,
               {"proj.weight", "[30, 16]", "dim 0 (30)", "4"});
  EXPECT_TRUE(plan(2, "proj.weight=column").ok());
  // 18 = 3 parts of 6: divides by 3 × 2 but not 3 × 4; a plain split by 2 would pass.
  EXPECT_TRUE(plan(2, "qkv.weight=dim1-packed(3)").ok());
  expect_error(plan(4, "qkv.weight=dim1-packed(3)"), StatusCode::kInvalidArgument,
               {"qkv.weight", "[16, 18]", "dim 1 (18)", "3 packed parts"});
  expect_error(plan(2, "scalar=column"), StatusCode::kInvalidArgument, {"scalar", "no dim 0"});
  expect_error(plan(2, "flat=dim1"), StatusCode::kInvalidArgument, {"flat", "no dim 1"});
  EXPECT_TRUE(plan(2, "flat=row;scalar=row").ok());  // rank < 2: replicated
  expect_error(make_load_plan(*ckpt, std::nullopt, *backend, shard_options(2, 2, "x=row")),
               StatusCode::kInvalidArgument, {"tp_rank"});

  // The real GPT-2 vocabulary (50257) has no even split; there is no padding.
  TempDir gpt;
  auto g = write_model(gpt, gpt2_tensors(257));
  ASSERT_TRUE(g.ok());
  expect_error(make_load_plan(*g, std::nullopt, *backend, shard_options(2, 0)),
               StatusCode::kInvalidArgument, {"wte.weight", "257"});
}

TEST(ShardErrors, UnknownArchitectureWithoutRules) {
  TempDir dir;
  auto ckpt = write_model(dir, {random_tensor("encoder.w", DType::kF16, {8, 8}, 1)});
  ASSERT_TRUE(ckpt.ok());
  auto backend = memory::make_host_backend();
  expect_error(make_load_plan(*ckpt, std::nullopt, *backend, shard_options(2, 0)),
               StatusCode::kInvalidArgument, {"no shard rules", "--shard-rules"});
  // With rules it loads; what no rule names is replicated.
  auto ok = make_load_plan(*ckpt, std::nullopt, *backend, shard_options(2, 1, "nothing=column"));
  ASSERT_TRUE(ok.ok()) << ok.error().to_string();
  EXPECT_EQ(ok->tensors[0].target_shape, (std::vector<int64_t>{8, 8}));

  // A config.json naming an architecture without a preset is not second-guessed from names.
  TempDir moe;
  auto m = write_model(moe, llama_tensors(1, true));
  ASSERT_TRUE(m.ok());
  std::string config = R"({"architectures": ["Qwen2MoeForCausalLM"], "model_type": "qwen2_moe"})";
  expect_error(make_load_plan(*m, std::nullopt, *backend, shard_options(2, 0, "", config)),
               StatusCode::kInvalidArgument, {"no shard rules", "Qwen2MoeForCausalLM"});
  // config.json that is not a JSON object.
  for (const char* bad : {"{\"architectures\": [", "[1, 2]", "{\"a\": 1, \"a\": 2}"})
    expect_error(make_load_plan(*m, std::nullopt, *backend, shard_options(2, 0, "", bad)),
                 StatusCode::kBadCheckpoint, {"config.json"});
  // One naming nothing: the tensor names decide.
  EXPECT_TRUE(
      make_load_plan(*m, std::nullopt, *backend, shard_options(2, 0, "", R"({"x": 1})")).ok());
}

// ---- rule strings
// ----------------------------------------------------------------------------------

// The loader plans with the spec's rules, so it must take exactly the rule strings that
// ModelSpec::validate takes (the client checks the spec, the server plans), refusing the others
// with the same message.
TEST(ShardRules, PlannerAndSpecValidationGiveTheSameVerdict) {
  const std::string llama = R"({"architectures": ["LlamaForCausalLM"]})";
  auto verdicts = [&](const std::string& text) {
    ModelSpec spec;
    spec.source = "/m";
    spec.tp_size = 2;
    spec.shard_rules = text;
    return std::pair(spec.validate(), ShardPlanner::create(shard_options(2, 0, text, llama), {}));
  };
  for (const auto& text : companion::testing::kGoodShardRules) {
    SCOPED_TRACE(text);
    auto [valid, planner] = verdicts(text);
    EXPECT_TRUE(valid.ok()) << valid.error().to_string();
    EXPECT_TRUE(planner.ok()) << planner.error().to_string();
  }
  for (const auto& bad : companion::testing::kBadShardRules) {
    SCOPED_TRACE(bad.text);
    auto [valid, planner] = verdicts(bad.text);
    ASSERT_FALSE(valid.ok());
    ASSERT_FALSE(planner.ok());
    EXPECT_EQ(planner.error().code, StatusCode::kInvalidArgument);
    EXPECT_EQ(planner.error().message, valid.error().message);
    EXPECT_EQ(planner.error().message, bad.message);
  }
}

TEST(ShardRules, PresetsParseAndNameTheirRules) {
  for (const char* name : {"llama", "opt", "gpt2"}) {
    const auto* preset = shard_preset(name);
    ASSERT_NE(preset, nullptr) << name;
    EXPECT_FALSE(preset->empty()) << name;
    EXPECT_EQ(format_shard_rules(*preset), shard_preset_text(name));
  }
  EXPECT_EQ(shard_preset("bert"), nullptr);
}

TEST(ShardRules, GlobMatching) {
  EXPECT_TRUE(glob_match("*", ""));
  EXPECT_TRUE(glob_match("*", "a.b.c"));
  EXPECT_TRUE(glob_match("*.q_proj.weight", "model.layers.0.self_attn.q_proj.weight"));
  EXPECT_FALSE(glob_match("*.q_proj.weight", "model.layers.0.self_attn.q_proj.bias"));
  EXPECT_FALSE(glob_match("*.q_proj.weight", "q_proj.weight"));
  EXPECT_TRUE(glob_match("h.?.attn.*", "h.7.attn.c_attn.weight"));
  EXPECT_FALSE(glob_match("h.?.attn.*", "h.17.attn.c_attn.weight"));
  EXPECT_TRUE(glob_match("a*b*c", "aXbYbZc"));
  EXPECT_FALSE(glob_match("a*b*c", "aXbYbZ"));
  EXPECT_TRUE(glob_match("exact", "exact"));
  EXPECT_FALSE(glob_match("exact", "exactly"));
  EXPECT_TRUE(glob_match("**x", "yyx"));
}

}  // namespace
}  // namespace companion::loader
