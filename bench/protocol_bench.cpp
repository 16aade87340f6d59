// Cost of a Parameters reply: encode_parameters on the server, decode (verify + limits + views)
// on the client, for a 291-tensor table (Llama-3-8B) and a 10,000-tensor one.
// Design target: decoding a 10,000-tensor table takes well under 1 ms.
#include <benchmark/benchmark.h>

#include <cstdint>
#include <string>
#include <vector>

#include "protocol/messages.hpp"

namespace companion::protocol {
namespace {

constexpr uint64_t kSegmentBytes = 16ull << 30;

struct Table {
  ModelStatus model;
  std::vector<SegmentInfo> segments;
  std::vector<TensorInfo> tensors;
};

// Llama-style names and rank-2 shapes (hidden 4096, 8 KV heads of 128, MLP 14336), bf16,
// packed into 16 GiB memfd segments in order.
Table make_table(size_t count) {
  struct Kind {
    const char* suffix;
    int64_t rows;
    int64_t cols;
  };
  static const Kind kLayer[] = {
      {"self_attn.q_proj.weight", 4096, 4096},     {"self_attn.k_proj.weight", 1024, 4096},
      {"self_attn.v_proj.weight", 1024, 4096},     {"self_attn.o_proj.weight", 4096, 4096},
      {"mlp.gate_proj.weight", 14336, 4096},       {"mlp.up_proj.weight", 14336, 4096},
      {"mlp.down_proj.weight", 4096, 14336},       {"input_layernorm.weight", 1, 4096},
      {"post_attention_layernorm.weight", 1, 4096}};
  Table t;
  t.model.key = "/models/bench|dtype=bf16|tp=1/1";
  t.model.id = "0123456789ab";
  t.model.source = "/models/bench";
  t.model.state = ModelState::kLoaded;
  t.model.backend = "host";
  t.model.tensors = static_cast<uint32_t>(count);
  uint64_t offset = 0;
  auto add = [&](std::string name, int64_t rows, int64_t cols) {
    TensorInfo info;
    info.name = std::move(name);
    info.dtype = DType::kBF16;
    info.shape = {rows, cols};
    info.strides = {cols, 1};
    info.nbytes = static_cast<uint64_t>(rows * cols) * 2;
    if (t.segments.empty() || offset + info.nbytes > kSegmentBytes) {
      SegmentInfo seg;
      seg.kind = memory::SegmentKind::kHostMemfd;
      seg.size = kSegmentBytes;
      seg.fd_index = static_cast<int32_t>(t.segments.size());
      t.segments.push_back(seg);
      offset = 0;
    }
    info.segment = static_cast<uint32_t>(t.segments.size() - 1);
    info.offset = offset;
    offset += (info.nbytes + 255) / 256 * 256;
    t.tensors.push_back(std::move(info));
  };
  add("model.embed_tokens.weight", 128256, 4096);
  for (size_t layer = 0; t.tensors.size() + 2 < count; ++layer) {
    for (const Kind& k : kLayer) {
      if (t.tensors.size() + 2 >= count) break;
      add("model.layers." + std::to_string(layer) + "." + k.suffix, k.rows, k.cols);
    }
  }
  add("model.norm.weight", 1, 4096);
  add("lm_head.weight", 128256, 4096);
  t.model.bytes_total = t.model.bytes_done = t.model.slab_bytes = kSegmentBytes * t.segments.size();
  return t;
}

void report(benchmark::State& state, const Table& t, size_t payload_bytes) {
  state.counters["tensors"] = static_cast<double>(t.tensors.size());
  state.counters["payload_bytes"] = static_cast<double>(payload_bytes);
  state.SetItemsProcessed(state.iterations() * static_cast<int64_t>(t.tensors.size()));
  state.SetBytesProcessed(state.iterations() * static_cast<int64_t>(payload_bytes));
}

void BM_EncodeParameters(benchmark::State& state) {
  const Table t = make_table(static_cast<size_t>(state.range(0)));
  size_t size = 0;
  for (auto _ : state) {
    auto bytes = encode_parameters(1, 1, t.model, t.segments, t.tensors).value();
    size = bytes.size();
    benchmark::DoNotOptimize(bytes.data());
  }
  report(state, t, size);
}

// decode() owns its input: each iteration gets a fresh copy, made outside the timed region.
void BM_DecodeParameters(benchmark::State& state) {
  const Table t = make_table(static_cast<size_t>(state.range(0)));
  const auto encoded = encode_parameters(1, 1, t.model, t.segments, t.tensors).value();
  for (auto _ : state) {
    state.PauseTiming();
    std::vector<uint8_t> copy = encoded;
    state.ResumeTiming();
    auto m = decode(std::move(copy));
    if (!m.ok()) {
      state.SkipWithError(m.error().to_string().c_str());
      break;
    }
    benchmark::DoNotOptimize(std::get<Parameters>(m->body).tensors.data());
  }
  report(state, t, encoded.size());
}

// What a client pays per reply including taking a copy of the payload (an upper bound).
void BM_CopyAndDecodeParameters(benchmark::State& state) {
  const Table t = make_table(static_cast<size_t>(state.range(0)));
  const auto encoded = encode_parameters(1, 1, t.model, t.segments, t.tensors).value();
  for (auto _ : state) {
    auto m = decode(encoded);
    benchmark::DoNotOptimize(std::get<Parameters>(m->body).tensors.data());
  }
  report(state, t, encoded.size());
}

BENCHMARK(BM_EncodeParameters)->Arg(291)->Arg(10000)->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_DecodeParameters)->Arg(291)->Arg(10000)->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_CopyAndDecodeParameters)->Arg(291)->Arg(10000)->Unit(benchmark::kMicrosecond);

}  // namespace
}  // namespace companion::protocol

BENCHMARK_MAIN();
