// Round trips of every protocol message through encode/encode_parameters and decode.
#include <gtest/gtest.h>

#include <cstdint>
#include <limits>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "protocol/limits.hpp"
#include "protocol/messages.hpp"

namespace companion::protocol {
namespace {

using memory::SegmentKind;

// ---- sample values with every field away from its default -----------------------------------

ModelSpec spec_with_dtype() {
  ModelSpec s;
  s.source = "/models/llama-3-8b";
  s.revision = "0123456789abcdef0123456789abcdef01234567";
  s.dtype = DType::kBF16;
  s.tp_size = 8;
  s.tp_rank = 7;
  s.tag = "engine-config-7f3a";
  return s;
}

ModelSpec spec_without_dtype() {
  ModelSpec s;
  s.source = "meta-llama/Llama-3.1-8B";
  s.revision = "";
  s.dtype = std::nullopt;
  s.tp_size = 2;
  s.tp_rank = 1;
  s.tag = "";
  return s;
}

// dtype present but equal to the wire enum's default value (Bool = 0): must not turn into nullopt.
ModelSpec spec_with_default_dtype() {
  ModelSpec s = spec_with_dtype();
  s.dtype = DType::kBool;
  return s;
}

ServerIdentity identity() {
  ServerIdentity id;
  id.instance_id = "a1b2c3d4e5f6";
  id.ns = "prod";
  id.component = "model_server_gpu_3";
  id.hostname = "node-17.cluster";
  id.pid = 987654;
  id.device = "GPU-8f1e2d3c-aaaa-bbbb-cccc-0123456789ab";
  id.gpu_uuid = "GPU-8f1e2d3c-aaaa-bbbb-cccc-0123456789ab";
  id.pci_bus_id = "0000:3b:00.0";
  id.device_ordinal = 3;
  id.backends = {"cuda-vmm", "cuda-ipc", "host"};
  id.default_backend = "cuda-ipc";
  id.started_at_ms = 1'700'000'000'123;
  id.version = "0.1.0";
  id.socket_path = "/run/companion/a1b2c3d4e5f6.sock";
  return id;
}

ModelStatus status(uint64_t seq) {
  ModelStatus s;
  s.key = "/models/llama|rev=main|dtype=bf16|tp=1/2|tag=x";
  s.id = "5f3a9c";
  s.source = "/models/llama";
  s.state = ModelState::kError;
  s.bytes_done = 123'456'789'012ull;
  s.bytes_total = 234'567'890'123ull;
  s.error_code = StatusCode::kBadCheckpoint;
  s.message = "shard 3: header length exceeds file";
  s.tensors = 291;
  s.leases = 4;
  s.backend = "host";
  s.slab_bytes = 16'060'522'496ull;
  s.seq = seq;
  s.last_used_ms = 1'796'178'810'091;
  s.eviction_rank = 3;
  return s;
}

// ---- field-by-field comparisons --------------------------------------------------------------

void expect_spec_eq(const ModelSpec& a, const ModelSpec& b) {
  EXPECT_EQ(a.source, b.source);
  EXPECT_EQ(a.revision, b.revision);
  EXPECT_EQ(a.dtype.has_value(), b.dtype.has_value());
  if (a.dtype && b.dtype) {
    EXPECT_EQ(static_cast<int>(*a.dtype), static_cast<int>(*b.dtype));
  }
  EXPECT_EQ(a.tp_size, b.tp_size);
  EXPECT_EQ(a.tp_rank, b.tp_rank);
  EXPECT_EQ(a.tag, b.tag);
}

void expect_identity_eq(const ServerIdentity& a, const ServerIdentity& b) {
  EXPECT_EQ(a.instance_id, b.instance_id);
  EXPECT_EQ(a.ns, b.ns);
  EXPECT_EQ(a.component, b.component);
  EXPECT_EQ(a.hostname, b.hostname);
  EXPECT_EQ(a.pid, b.pid);
  EXPECT_EQ(a.device, b.device);
  EXPECT_EQ(a.gpu_uuid, b.gpu_uuid);
  EXPECT_EQ(a.pci_bus_id, b.pci_bus_id);
  EXPECT_EQ(a.device_ordinal, b.device_ordinal);
  EXPECT_EQ(a.backends, b.backends);
  EXPECT_EQ(a.default_backend, b.default_backend);
  EXPECT_EQ(a.started_at_ms, b.started_at_ms);
  EXPECT_EQ(a.version, b.version);
  EXPECT_EQ(a.socket_path, b.socket_path);
}

void expect_status_eq(const ModelStatus& a, const ModelStatus& b) {
  EXPECT_EQ(a.key, b.key);
  EXPECT_EQ(a.id, b.id);
  EXPECT_EQ(a.source, b.source);
  EXPECT_EQ(a.state, b.state);
  EXPECT_EQ(a.bytes_done, b.bytes_done);
  EXPECT_EQ(a.bytes_total, b.bytes_total);
  EXPECT_EQ(a.error_code, b.error_code);
  EXPECT_EQ(a.message, b.message);
  EXPECT_EQ(a.tensors, b.tensors);
  EXPECT_EQ(a.leases, b.leases);
  EXPECT_EQ(a.backend, b.backend);
  EXPECT_EQ(a.slab_bytes, b.slab_bytes);
  EXPECT_EQ(a.seq, b.seq);
  EXPECT_EQ(a.last_used_ms, b.last_used_ms);
  EXPECT_EQ(a.eviction_rank, b.eviction_rank);
}

void expect_health_eq(const HealthInfo& a, const HealthInfo& b) {
  EXPECT_EQ(a.state, b.state);
  EXPECT_EQ(a.uptime_ms, b.uptime_ms);
  EXPECT_EQ(a.models_loaded, b.models_loaded);
  EXPECT_EQ(a.models_total, b.models_total);
  EXPECT_EQ(a.clients, b.clients);
  EXPECT_EQ(a.leases, b.leases);
  EXPECT_EQ(a.slab_bytes, b.slab_bytes);
  EXPECT_EQ(a.memory_budget, b.memory_budget);
  EXPECT_EQ(a.evictions, b.evictions);
  expect_identity_eq(a.server, b.server);
}

// Encodes, decodes, checks the request id and the body type; returns the decoded body.
template <typename T>
T round_trip(uint64_t request_id, const T& body) {
  std::vector<uint8_t> bytes = encode(Message{request_id, body}).value();
  EXPECT_FALSE(bytes.empty());
  auto decoded = decode(bytes);
  EXPECT_TRUE(decoded.ok()) << (decoded.ok() ? "" : decoded.error().to_string());
  if (!decoded.ok()) return T{};
  EXPECT_EQ(decoded->request_id, request_id);
  const T* out = std::get_if<T>(&decoded->body);
  EXPECT_NE(out, nullptr) << "decoded as " << body_name(decoded->body);
  if (out == nullptr) return T{};
  EXPECT_STREQ(body_name(decoded->body), body_name(Body{body}));
  return *out;
}

// ---- one test per message type ---------------------------------------------------------------

TEST(CodecRoundTrip, Hello) {
  Hello h;
  h.major = 7;
  h.minor = 65535;
  h.client_name = "vllm-worker-3 \xc3\xa9t\xc3\xa9";  // UTF-8
  h.pid = std::numeric_limits<int64_t>::max();
  Hello out = round_trip(1, h);
  EXPECT_EQ(out.major, 7);
  EXPECT_EQ(out.minor, 65535);
  EXPECT_EQ(out.client_name, h.client_name);
  EXPECT_EQ(out.pid, h.pid);

  Hello defaults;  // the version fields default to this build's protocol
  Hello d = round_trip(0, defaults);
  EXPECT_EQ(d.major, kProtocolMajor);
  EXPECT_EQ(d.minor, kProtocolMinor);
  EXPECT_EQ(d.client_name, "");
  EXPECT_EQ(d.pid, 0);
}

TEST(CodecRoundTrip, StringsKeepEmbeddedNulBytes) {
  Hello h;
  h.client_name = std::string("a\0b\0", 4);
  Hello out = round_trip(2, h);
  EXPECT_EQ(out.client_name.size(), 4u);
  EXPECT_EQ(out.client_name, h.client_name);
}

TEST(CodecRoundTrip, HelloReplyWithBackends) {
  HelloReply r{3, 9, identity()};
  HelloReply out = round_trip(std::numeric_limits<uint64_t>::max(), r);
  EXPECT_EQ(out.major, 3);
  EXPECT_EQ(out.minor, 9);
  expect_identity_eq(out.server, r.server);
  ASSERT_EQ(out.server.backends.size(), 3u);

  // Host identity: no backends list entries beyond one, ordinal -1, negative pid allowed.
  ServerIdentity host;
  host.device = "host";
  host.backends = {"host"};
  host.device_ordinal = -1;
  host.pid = -5;
  host.started_at_ms = -1;
  HelloReply h2{kProtocolMajor, kProtocolMinor, host};
  expect_identity_eq(round_trip(5, h2).server, host);

  ServerIdentity empty;  // no backends at all
  expect_identity_eq(round_trip(6, HelloReply{1, 0, empty}).server, empty);
}

TEST(CodecRoundTrip, GetParametersWithAndWithoutDtype) {
  for (const ModelSpec& spec :
       {spec_with_dtype(), spec_without_dtype(), spec_with_default_dtype()}) {
    for (bool wait : {true, false}) {
      for (bool only_if_held : {false, true}) {
        GetParameters g{spec, wait, only_if_held};
        GetParameters out = round_trip(11, g);
        expect_spec_eq(out.spec, spec);
        EXPECT_EQ(out.wait, wait);
        EXPECT_EQ(out.only_if_held, only_if_held);
      }
    }
  }
  // Every dtype survives as a ModelSpec conversion target.
  for (int d = 0; d < kDTypeCount; ++d) {
    ModelSpec s = spec_without_dtype();
    s.dtype = static_cast<DType>(d);
    GetParameters out = round_trip(12, GetParameters{s, true});
    ASSERT_TRUE(out.spec.dtype.has_value()) << d;
    EXPECT_EQ(static_cast<int>(*out.spec.dtype), d);
  }
}

TEST(CodecRoundTrip, ReleaseAndReleased) {
  EXPECT_EQ(round_trip(4, Release{0xfedcba9876543210ull}).lease_id, 0xfedcba9876543210ull);
  EXPECT_EQ(round_trip(5, Released{42}).lease_id, 42u);
  EXPECT_EQ(round_trip(6, Release{0}).lease_id, 0u);
}

TEST(CodecRoundTrip, StatusSubscribe) {
  StatusSubscribe all;
  all.all = true;
  StatusSubscribe out = round_trip(7, all);
  EXPECT_TRUE(out.all);

  StatusSubscribe one{spec_with_dtype(), false};
  StatusSubscribe out2 = round_trip(8, one);
  EXPECT_FALSE(out2.all);
  expect_spec_eq(out2.spec, one.spec);
}

TEST(CodecRoundTrip, StatusEventWithSeqAndErrorCode) {
  StatusEvent e{status(0xffff'ffff'ffffull)};
  StatusEvent out = round_trip(9, e);
  expect_status_eq(out.model, e.model);

  // Every state and a few codes.
  for (ModelState st : {ModelState::kReady, ModelState::kLoading, ModelState::kLoaded,
                        ModelState::kError, ModelState::kUnloaded}) {
    for (StatusCode code : {StatusCode::kOk, StatusCode::kOutOfMemory, StatusCode::kCudaError,
                            StatusCode::kInternal}) {
      StatusEvent x{status(17)};
      x.model.state = st;
      x.model.error_code = code;
      expect_status_eq(round_trip(10, x).model, x.model);
    }
  }
  expect_status_eq(round_trip(10, StatusEvent{ModelStatus{}}).model, ModelStatus{});
}

TEST(CodecRoundTrip, StatusUnsubscribe) {
  EXPECT_EQ(round_trip(13, StatusUnsubscribe{99}).subscription_id, 99u);
}

TEST(CodecRoundTrip, LoadAndLoadReply) {
  Load l{spec_without_dtype(), true};
  Load out = round_trip(14, l);
  expect_spec_eq(out.spec, l.spec);
  EXPECT_TRUE(out.wait);
  Load l2{spec_with_dtype(), false};
  EXPECT_FALSE(round_trip(14, l2).wait);

  LoadReply r{status(3)};
  expect_status_eq(round_trip(15, r).model, r.model);
}

TEST(CodecRoundTrip, UnloadAndUnloadReply) {
  Unload by_spec{spec_with_dtype(), "", true};
  Unload out = round_trip(16, by_spec);
  expect_spec_eq(out.spec, by_spec.spec);
  EXPECT_EQ(out.key, "");
  EXPECT_TRUE(out.force);

  Unload by_key{spec_without_dtype(), "5f3a9c", false};
  Unload out2 = round_trip(17, by_key);
  EXPECT_EQ(out2.key, "5f3a9c");
  expect_spec_eq(out2.spec, by_key.spec);
  EXPECT_FALSE(out2.force);

  UnloadReply r{status(12)};
  r.model.state = ModelState::kUnloaded;
  expect_status_eq(round_trip(18, r).model, r.model);
}

// 1.3, the host tier: an offload is an Unload with to_host, a load may name a held model by key,
// and a status carries the bytes held in host memory.
TEST(CodecRoundTrip, HostTierFields) {
  Unload offload{spec_without_dtype(), "5f3a9c", true, true};
  Unload out = round_trip(21, offload);
  EXPECT_TRUE(out.to_host);
  EXPECT_TRUE(out.force);
  EXPECT_EQ(out.key, "5f3a9c");
  EXPECT_FALSE(round_trip(21, Unload{spec_with_dtype(), "", false}).to_host);

  Load by_key{ModelSpec{}, true, "engine/x"};
  Load loaded = round_trip(22, by_key);
  EXPECT_EQ(loaded.key, "engine/x");
  EXPECT_TRUE(loaded.wait);
  EXPECT_EQ(round_trip(22, Load{spec_with_dtype(), false}).key, "");

  UnloadReply r{status(23)};
  r.model.state = ModelState::kUnloaded;
  r.model.host_bytes = 0x1234'5678'9abcull;
  EXPECT_EQ(round_trip(23, r).model.host_bytes, 0x1234'5678'9abcull);
  EXPECT_EQ(round_trip(23, UnloadReply{status(24)}).model.host_bytes, 0u);
}

TEST(CodecRoundTrip, ListAndListReply) {
  round_trip(19, List{});
  ListReply empty = round_trip(20, ListReply{});
  EXPECT_TRUE(empty.models.empty());

  ListReply r;
  for (uint64_t i = 0; i < 5; ++i) {
    ModelStatus s = status(100 + i);
    s.key += std::to_string(i);
    s.state = static_cast<ModelState>(i);
    r.models.push_back(s);
  }
  ListReply out = round_trip(21, r);
  ASSERT_EQ(out.models.size(), r.models.size());
  for (size_t i = 0; i < r.models.size(); ++i) expect_status_eq(out.models[i], r.models[i]);
}

TEST(CodecRoundTrip, HealthAndHealthReply) {
  round_trip(22, Health{});
  HealthReply r;
  r.info.state = "draining";
  r.info.uptime_ms = 86'400'000'123ull;
  r.info.models_loaded = 3;
  r.info.models_total = 5;
  r.info.clients = 12;
  r.info.leases = 9;
  r.info.slab_bytes = 1ull << 40;
  r.info.memory_budget = 80ull << 30;
  r.info.evictions = 17;
  r.info.server = identity();
  expect_health_eq(round_trip(23, r).info, r.info);
  EXPECT_EQ(round_trip(23, r).info.registry, "local");
  EXPECT_TRUE(round_trip(23, r).info.registered);
  r.info.registry = "etcd://10.0.0.1:2379,10.0.0.2:2379";
  r.info.registered = false;
  r.info.registry_error = "etcd at http://10.0.0.1:2379: Couldn't connect to server";
  HealthInfo out = round_trip(23, r).info;
  EXPECT_EQ(out.registry, r.info.registry);
  EXPECT_FALSE(out.registered);
  EXPECT_EQ(out.registry_error, r.info.registry_error);
  EXPECT_TRUE(out.refused.empty());
  r.info.refused = {{"connections", 0}, {"descriptors", 7}, {"peer_not_permitted", 1ull << 40}};
  EXPECT_EQ(round_trip(23, r).info.refused, r.info.refused);
}

TEST(CodecRoundTrip, ErrorReply) {
  for (int v = 0; v <= static_cast<int>(StatusCode::kInternal); ++v) {
    ErrorReply e{Error{static_cast<StatusCode>(v), "failure number " + std::to_string(v)}};
    ErrorReply out = round_trip(24, e);
    EXPECT_EQ(out.error.code, e.error.code);
    EXPECT_EQ(out.error.message, e.error.message);
  }
}

TEST(CodecRoundTrip, Done) {
  round_trip(25, Done{});
}

// ---- Parameters --------------------------------------------------------------------------------

std::vector<SegmentInfo> sample_segments() {
  std::vector<SegmentInfo> segs(3);
  segs[0].kind = SegmentKind::kHostMemfd;
  segs[0].size = 1 << 20;
  segs[0].fd_index = 0;
  segs[1].kind = SegmentKind::kCudaVmmFd;
  segs[1].size = 2ull << 30;
  segs[1].fd_index = 1;
  segs[2].kind = SegmentKind::kCudaIpcHandle;
  segs[2].size = 4096;
  segs[2].fd_index = -1;
  for (size_t i = 0; i < segs[2].ipc_handle.size(); ++i)
    segs[2].ipc_handle[i] = static_cast<uint8_t>(0xa0 ^ (i * 7));
  return segs;
}

std::vector<TensorInfo> sample_tensors() {
  std::vector<TensorInfo> ts;
  TensorInfo w;  // rank 2
  w.name = "model.layers.0.self_attn.q_proj.weight";
  w.dtype = DType::kBF16;
  w.shape = {128, 64};
  w.strides = {64, 1};
  w.segment = 0;
  w.offset = 0;
  w.nbytes = 128 * 64 * 2;
  ts.push_back(w);
  TensorInfo scalar;  // rank 0: one element
  scalar.name = "model.scale";
  scalar.dtype = DType::kF32;
  scalar.segment = 0;
  scalar.offset = 16384;
  scalar.nbytes = 4;
  ts.push_back(scalar);
  TensorInfo empty;  // zero-size
  empty.name = "model.empty_bias";
  empty.dtype = DType::kF16;
  empty.shape = {0, 4096};
  empty.strides = {4096, 1};
  empty.segment = 1;
  empty.offset = 2ull << 30;  // at the very end of its segment: fine, it has no bytes
  empty.nbytes = 0;
  ts.push_back(empty);
  TensorInfo big;  // 1-D in the VMM segment, 64-bit offsets
  big.name = "lm_head.weight";
  big.dtype = DType::kF8E5M2;
  big.shape = {1ll << 30};
  big.strides = {1};
  big.segment = 1;
  big.offset = 1ull << 30;
  big.nbytes = 1ull << 30;
  ts.push_back(big);
  TensorInfo strided;  // non-contiguous strides, rank 3, in the IPC segment
  strided.name = "model.embed_tokens.weight";
  strided.dtype = DType::kI64;
  strided.shape = {2, 3, 4};
  strided.strides = {1, 2, 6};
  strided.segment = 2;
  strided.offset = 8;
  strided.nbytes = 2 * 3 * 4 * 8;
  ts.push_back(strided);
  TensorInfo max_rank;
  max_rank.name = std::string(kMaxNameBytes, 'n');  // longest allowed name
  max_rank.dtype = DType::kBool;
  max_rank.shape.assign(kMaxRank, 1);
  max_rank.shape[0] = 3;
  max_rank.strides.assign(kMaxRank, 1);
  max_rank.segment = 2;
  max_rank.offset = 4093;
  max_rank.nbytes = 3;  // exactly fills the segment
  ts.push_back(max_rank);
  return ts;
}

void expect_tensor_eq(const TensorRef& r, const TensorInfo& t) {
  EXPECT_EQ(r.name, t.name);
  EXPECT_EQ(r.dtype, t.dtype) << t.name;
  EXPECT_EQ(std::vector<int64_t>(r.shape.begin(), r.shape.end()), t.shape) << t.name;
  EXPECT_EQ(std::vector<int64_t>(r.strides.begin(), r.strides.end()), t.strides) << t.name;
  EXPECT_EQ(r.segment, t.segment) << t.name;
  EXPECT_EQ(r.offset, t.offset) << t.name;
  EXPECT_EQ(r.nbytes, t.nbytes) << t.name;
}

void expect_segment_eq(const SegmentInfo& a, const SegmentInfo& b) {
  EXPECT_EQ(a.kind, b.kind);
  EXPECT_EQ(a.size, b.size);
  EXPECT_EQ(a.fd_index, b.fd_index);
  if (a.kind == SegmentKind::kCudaIpcHandle) {
    EXPECT_EQ(a.ipc_handle, b.ipc_handle);
  }
}

bool inside(const void* p, const std::vector<uint8_t>& buf) {
  auto* b = reinterpret_cast<const uint8_t*>(p);
  return b >= buf.data() && b < buf.data() + buf.size();
}

TEST(CodecRoundTrip, ParametersAllFields) {
  auto segs = sample_segments();
  auto ts = sample_tensors();
  ModelStatus st = status(77);
  st.state = ModelState::kLoaded;
  st.error_code = StatusCode::kOk;
  std::vector<uint8_t> bytes = encode_parameters(31, 0x1122334455667788ull, st, segs, ts).value();
  auto decoded = decode(bytes);
  ASSERT_TRUE(decoded.ok()) << decoded.error().to_string();
  EXPECT_EQ(decoded->request_id, 31u);
  EXPECT_STREQ(body_name(decoded->body), "Parameters");
  const auto* p = std::get_if<Parameters>(&decoded->body);
  ASSERT_NE(p, nullptr);
  EXPECT_EQ(p->lease_id, 0x1122334455667788ull);
  expect_status_eq(p->model, st);
  ASSERT_EQ(p->segments.size(), segs.size());
  for (size_t i = 0; i < segs.size(); ++i) expect_segment_eq(p->segments[i], segs[i]);
  ASSERT_EQ(p->tensors.size(), ts.size());
  for (size_t i = 0; i < ts.size(); ++i) expect_tensor_eq(p->tensors[i], ts[i]);
  EXPECT_TRUE(p->tensors[1].shape.empty());
  EXPECT_TRUE(p->tensors[1].strides.empty());
  ASSERT_NE(p->payload, nullptr);
  EXPECT_EQ(*p->payload, bytes);
}

TEST(CodecRoundTrip, ParametersWithoutTensors) {
  auto segs = sample_segments();
  std::vector<uint8_t> bytes = encode_parameters(1, 2, status(1), segs, {}).value();
  auto decoded = decode(bytes);
  ASSERT_TRUE(decoded.ok()) << decoded.error().to_string();
  const auto& p = std::get<Parameters>(decoded->body);
  EXPECT_TRUE(p.tensors.empty());
  EXPECT_EQ(p.segments.size(), 3u);
}

TEST(CodecRoundTrip, TensorViewsPointIntoThePayloadAndSurviveMoves) {
  auto segs = sample_segments();
  auto ts = sample_tensors();
  std::vector<uint8_t> bytes = encode_parameters(5, 6, status(1), segs, ts).value();

  std::vector<Message> holder;
  {
    auto decoded = decode(bytes);
    ASSERT_TRUE(decoded.ok()) << decoded.error().to_string();
    const auto& p = std::get<Parameters>(decoded->body);
    ASSERT_NE(p.payload, nullptr);
    // The views point into the payload the Parameters keeps alive: no copies.
    for (const TensorRef& r : p.tensors) {
      EXPECT_TRUE(inside(r.name.data(), *p.payload)) << r.name;
      if (!r.shape.empty()) {
        EXPECT_TRUE(inside(r.shape.data(), *p.payload)) << r.name;
        EXPECT_TRUE(inside(r.strides.data(), *p.payload)) << r.name;
        EXPECT_EQ(reinterpret_cast<uintptr_t>(r.shape.data()) % alignof(int64_t), 0u) << r.name;
        EXPECT_EQ(reinterpret_cast<uintptr_t>(r.strides.data()) % alignof(int64_t), 0u) << r.name;
      }
    }
    Message moved = std::move(decoded).value();
    holder.push_back(std::move(moved));
    for (int i = 0; i < 64; ++i) holder.emplace_back();  // reallocates: Messages move again
  }
  // Overwrite the original encoding: the decoded payload must not alias it.
  std::fill(bytes.begin(), bytes.end(), 0xcc);
  const auto& p = std::get<Parameters>(holder.front().body);
  ASSERT_EQ(p.tensors.size(), ts.size());
  for (size_t i = 0; i < ts.size(); ++i) expect_tensor_eq(p.tensors[i], ts[i]);

  // A copy of the Parameters keeps the payload alive after every Message is gone.
  Parameters copy = p;
  holder.clear();
  ASSERT_EQ(copy.tensors.size(), ts.size());
  for (size_t i = 0; i < ts.size(); ++i) expect_tensor_eq(copy.tensors[i], ts[i]);
  EXPECT_EQ(copy.payload.use_count(), 1);
}

TEST(CodecRoundTrip, ParametersEveryDtype) {
  std::vector<SegmentInfo> segs(1);
  segs[0].size = 1 << 20;
  segs[0].fd_index = 0;
  std::vector<TensorInfo> ts;
  uint64_t offset = 0;
  for (int d = 0; d < kDTypeCount; ++d) {
    TensorInfo t;
    t.name = std::string("t.") + dtype_name(static_cast<DType>(d));
    t.dtype = static_cast<DType>(d);
    t.shape = {3, 5};
    t.strides = {5, 1};
    t.offset = offset;
    t.nbytes = 15 * dtype_size(t.dtype);
    offset += 256;
    ts.push_back(t);
  }
  auto decoded = decode(encode_parameters(1, 1, status(1), segs, ts).value());
  ASSERT_TRUE(decoded.ok()) << decoded.error().to_string();
  const auto& p = std::get<Parameters>(decoded->body);
  ASSERT_EQ(p.tensors.size(), ts.size());
  for (size_t i = 0; i < ts.size(); ++i) expect_tensor_eq(p.tensors[i], ts[i]);
}

// Every alternative of Body has a sample above that survives the trip with its own type.
TEST(CodecRoundTrip, EveryBodyTypeIsCovered) {
  std::vector<Body> samples = {Hello{},
                               HelloReply{1, 0, identity()},
                               GetParameters{spec_with_dtype(), true},
                               Parameters{},  // encoded separately below
                               Release{1},
                               Released{1},
                               StatusSubscribe{spec_with_dtype(), false},
                               StatusEvent{status(1)},
                               StatusUnsubscribe{1},
                               Load{spec_with_dtype(), false},
                               LoadReply{status(1)},
                               Unload{spec_with_dtype(), "", false},
                               UnloadReply{status(1)},
                               List{},
                               ListReply{{status(1)}},
                               Health{},
                               HealthReply{},
                               ErrorReply{Error{StatusCode::kNotFound, "x"}},
                               Done{},
                               PublishClaim{"k", {{"engine", "vllm"}}, ClaimMode::kWait},
                               PublishClaimed{true, status(1)},
                               PublishDeclare{"k", {{"w", DType::kF32, {2, 3}, ""}}},
                               PublishCommit{"k"},
                               PublishCommitted{5, status(1)},
                               PublishAbort{"k"},
                               Reload{"k", true}};
  ASSERT_EQ(samples.size(), std::variant_size_v<Body>);
  std::set<size_t> seen;
  std::set<std::string> names;
  for (size_t i = 0; i < samples.size(); ++i) {
    ASSERT_EQ(samples[i].index(), i);
    names.insert(body_name(samples[i]));
    std::vector<uint8_t> bytes =
        std::holds_alternative<Parameters>(samples[i])
            ? encode_parameters(i, 1, status(1), sample_segments(), sample_tensors()).value()
            : encode(Message{i, samples[i]}).value();
    auto decoded = decode(bytes);
    ASSERT_TRUE(decoded.ok()) << body_name(samples[i]) << ": " << decoded.error().to_string();
    EXPECT_EQ(decoded->request_id, i);
    EXPECT_EQ(decoded->body.index(), i) << body_name(samples[i]);
    seen.insert(decoded->body.index());
  }
  EXPECT_EQ(seen.size(), std::variant_size_v<Body>);
  EXPECT_EQ(names.size(), std::variant_size_v<Body>);  // body_name is distinct per type
}

// Publishing (protocol 1.1): claims, tables with aliases, generations and fingerprints in a status,
// and the attach fields of GetParameters all survive the trip.
TEST(CodecRoundTrip, PublishingFields) {
  PublishDeclare declare{"engine/llama",
                         {{"embed", DType::kBF16, {1000, 64}, ""},
                          {"lm_head", DType::kBF16, {1000, 64}, "embed"},
                          {"scalar", DType::kF32, {}, ""}}};
  auto d = decode(encode(Message{3, declare}).value());
  ASSERT_TRUE(d.ok()) << d.error().to_string();
  const auto& got = std::get<PublishDeclare>(d->body);
  EXPECT_EQ(got.key, "engine/llama");
  ASSERT_EQ(got.tensors.size(), 3u);
  EXPECT_EQ(got.tensors[1].alias_of, "embed");
  EXPECT_EQ(got.tensors[1].shape, (std::vector<int64_t>{1000, 64}));
  EXPECT_TRUE(got.tensors[2].shape.empty());
  EXPECT_FALSE(got.more);
  declare.more = true;  // 1.3: a part of a table
  auto part = decode(encode(Message{3, declare}).value());
  ASSERT_TRUE(part.ok()) << part.error().to_string();
  EXPECT_TRUE(std::get<PublishDeclare>(part->body).more);

  ModelStatus s = status(7);
  s.published = true;
  s.generation = 2;
  s.fingerprint = {{"dtype", "bf16"}, {"tp", "0/2"}};
  GenerationInfo g1{1, 3, 4096, {"wsum64:0000000000000001"}, {{"dtype", "fp16"}}, 100, false};
  GenerationInfo g2{
      2, 0, 4096, {"wsum64:00000000000000ff", "wsum64:0000000000000002"}, s.fingerprint, 200, true};
  s.generations = {g1, g2};
  auto e = decode(encode(Message{4, StatusEvent{s}}).value());
  ASSERT_TRUE(e.ok()) << e.error().to_string();
  const ModelStatus& r = std::get<StatusEvent>(e->body).model;
  EXPECT_TRUE(r.published);
  EXPECT_EQ(r.generation, 2u);
  EXPECT_EQ(r.fingerprint, s.fingerprint);
  ASSERT_EQ(r.generations.size(), 2u);
  EXPECT_EQ(r.generations[0].leases, 3u);
  EXPECT_EQ(r.generations[0].fingerprint.at("dtype"), "fp16");
  EXPECT_EQ(r.generations[1].digests, g2.digests);
  EXPECT_TRUE(r.generations[1].current);
  EXPECT_EQ(r.generations[1].created_at_ms, 200);

  GetParameters get;
  get.key = "engine/llama";
  get.generation = 1;
  get.fingerprint = Fingerprint{};  // present and empty: checked against an empty fingerprint
  get.or_source = true;
  auto q = decode(encode(Message{5, get}).value());
  ASSERT_TRUE(q.ok()) << q.error().to_string();
  const auto& gq = std::get<GetParameters>(q->body);
  EXPECT_EQ(gq.key, "engine/llama");
  EXPECT_EQ(gq.generation, 1u);
  ASSERT_TRUE(gq.fingerprint.has_value());
  EXPECT_TRUE(gq.fingerprint->empty());
  EXPECT_TRUE(gq.or_source);
  GetParameters plain;
  plain.key = "k";
  auto p = decode(encode(Message{6, plain}).value());
  ASSERT_TRUE(p.ok());
  EXPECT_FALSE(std::get<GetParameters>(p->body).fingerprint.has_value());
}

TEST(CodecRoundTrip, PublishKeysAndFingerprintsAreBounded) {
  EXPECT_TRUE(validate_publish_key("a").ok());
  EXPECT_EQ(validate_publish_key("").error().code, StatusCode::kInvalidArgument);
  EXPECT_EQ(validate_publish_key(std::string(kMaxPublishKeyBytes + 1, 'k')).error().code,
            StatusCode::kInvalidArgument);
  EXPECT_EQ(validate_publish_key("bad\xff").error().code, StatusCode::kInvalidArgument);
  EXPECT_EQ(validate_publish_key(std::string("nul\0inside", 10)).error().code,
            StatusCode::kInvalidArgument);
  EXPECT_EQ(validate_fingerprint({{std::string("a\0b", 3), "v"}}).error().code,
            StatusCode::kInvalidArgument);
  Fingerprint f;
  for (size_t i = 0; i <= kMaxFingerprintFields; ++i) f["f" + std::to_string(i)] = "v";
  EXPECT_EQ(validate_fingerprint(f).error().code, StatusCode::kInvalidArgument);
  EXPECT_EQ(validate_fingerprint({{"big", std::string(kMaxFingerprintBytes, 'x')}}).error().code,
            StatusCode::kInvalidArgument);
  EXPECT_EQ(validate_fingerprint({{"", "v"}}).error().code, StatusCode::kInvalidArgument);
  EXPECT_TRUE(validate_fingerprint({{"engine", "vllm 0.32"}}).ok());
}

}  // namespace
}  // namespace companion::protocol

namespace companion::protocol {
namespace {

// encode() has no encoding for Parameters (they come from owning tensors): an error the caller
// handles, never an empty payload that would go out as an empty frame.
TEST(CodecEncode, ParametersThroughEncodeIsAnError) {
  auto r = encode(Message{1, Parameters{}});
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code, StatusCode::kInvalidArgument) << r.error().to_string();
}

// A message no frame can carry is refused where it is built.
TEST(CodecEncode, PayloadOverTheFrameLimitIsAnError) {
  ErrorReply huge{make_error(StatusCode::kInternal, std::string(kMaxPayloadBytes + 1, 'x'))};
  auto r = encode(Message{1, huge});
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code, StatusCode::kInvalidArgument) << r.error().to_string();
  ErrorReply fits{make_error(StatusCode::kInternal, std::string(kMaxPayloadBytes / 2, 'x'))};
  EXPECT_TRUE(encode(Message{1, fits}).ok());
}

TEST(CodecEncode, TooManyInlineTensorsIsAnError) {
  std::vector<TensorInfo> ts(kMaxTensors + 1);
  auto r = encode_parameters(1, 1, ModelStatus{}, {}, ts);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code, StatusCode::kInvalidArgument) << r.error().to_string();
}

}  // namespace
}  // namespace companion::protocol
