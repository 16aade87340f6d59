// Writes the binary seed inputs of the frame_reader, message_decoder and keeper_decoders targets
// (one encoded message of each type, frame streams built from them, keeper messages, a catalog
// entry and descriptor names) into corpus/:
//   build-fuzz/tests/fuzz/fuzz_make_seeds tests/fuzz/corpus
// The text targets' seeds are written by hand.
#include <cstdint>
#include <cstdio>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "keeper/fd_store_names.hpp"
#include "keeper/keeper_protocol.hpp"
#include "protocol/frame.hpp"
#include "protocol/limits.hpp"
#include "protocol/messages.hpp"

namespace {

using namespace companion;
using namespace companion::protocol;
using Bytes = std::vector<uint8_t>;

bool write_file(const std::string& path, const Bytes& bytes) {
  FILE* f = std::fopen(path.c_str(), "wb");
  if (f == nullptr) return false;
  bool ok = std::fwrite(bytes.data(), 1, bytes.size(), f) == bytes.size();
  return std::fclose(f) == 0 && ok;
}

ModelSpec spec() {
  ModelSpec s;
  s.source = "/models/llama";
  s.revision = "main";
  s.dtype = DType::kBF16;
  s.tp_size = 2;
  s.tp_rank = 1;
  s.tag = "a";
  s.shard_rules = "*.q_proj.weight=column;*.o_proj.weight=row";
  return s;
}

ModelStatus status(ModelState state) {
  ModelStatus s;
  s.key = "/models/llama dtype=BF16";
  s.id = "3f2a";
  s.source = "/models/llama";
  s.state = state;
  s.bytes_done = 48;
  s.bytes_total = 96;
  if (state == ModelState::kError) {
    s.error_code = StatusCode::kBadCheckpoint;
    s.message = "header is not valid JSON";
  }
  s.tensors = 3;
  s.leases = 1;
  s.backend = "host";
  s.slab_bytes = 4096;
  s.seq = 7;
  return s;
}

ServerIdentity identity() {
  ServerIdentity id;
  id.instance_id = "host-1";
  id.ns = "companion";
  id.component = "model_server_host";
  id.hostname = "node";
  id.pid = 1234;
  id.device = "host";
  id.backends = {"host"};
  id.default_backend = "host";
  id.started_at_ms = 1700000000000;
  id.version = "0.1.0";
  id.socket_path = "/run/companion/host.sock";
  return id;
}

std::vector<std::pair<std::string, Bytes>> messages() {
  std::vector<std::pair<std::string, Bytes>> out;
  auto add = [&](const std::string& name, Body body) {
    out.emplace_back(
        name, encode(Message{static_cast<uint64_t>(out.size() + 1), std::move(body)}).value());
  };
  add("hello", Hello{kProtocolMajor, kProtocolMinor, "engine", 42});
  add("hello_reply", HelloReply{kProtocolMajor, kProtocolMinor, identity()});
  add("get_parameters", GetParameters{spec(), true, false});
  add("release", Release{9});
  add("released", Released{9});
  add("status_subscribe_all", StatusSubscribe{{}, true});
  add("status_subscribe", StatusSubscribe{spec(), false});
  add("status_event", StatusEvent{status(ModelState::kLoading)});
  add("status_unsubscribe", StatusUnsubscribe{3});
  add("load", Load{spec(), true});
  add("load_reply", LoadReply{status(ModelState::kError)});
  add("unload_key", Unload{{}, "3f2a", true});
  add("unload_spec", Unload{spec(), "", false});
  add("unload_reply", UnloadReply{status(ModelState::kUnloaded)});
  add("list", List{});
  add("list_reply", ListReply{{status(ModelState::kLoaded), status(ModelState::kReady)}});
  add("health", Health{});
  HealthInfo health;
  health.state = "serving";
  health.server = identity();
  add("health_reply", HealthReply{health});
  add("error_reply", ErrorReply{Error{StatusCode::kNotFound, "no such model"}});
  add("done", Done{});
  // Publishing (protocol 1.1).
  add("publish_claim",
      PublishClaim{"engine/llama", {{"engine", "vllm"}, {"tp", "0/2"}}, ClaimMode::kIfUnpublished});
  ModelStatus published = status(ModelState::kLoaded);
  published.published = true;
  published.generation = 2;
  published.fingerprint = {{"engine", "vllm"}};
  published.generations = {
      GenerationInfo{1, 1, 4096, {"wsum64:00000000000000ff"}, {{"engine", "old"}}, 1, false},
      GenerationInfo{2, 0, 4096, {"wsum64:0000000000000001"}, {{"engine", "vllm"}}, 2, true}};
  add("publish_claimed", PublishClaimed{true, published});
  add("publish_declare", PublishDeclare{"engine/llama",
                                        {{"embed", DType::kBF16, {16, 8}, ""},
                                         {"lm_head", DType::kBF16, {16, 8}, "embed"},
                                         {"scale", DType::kF32, {}, ""}}});
  add("publish_commit", PublishCommit{"engine/llama"});
  add("publish_committed", PublishCommitted{7, published});
  add("publish_abort", PublishAbort{"engine/llama"});
  add("reload", Reload{"3f2a", true});
  GetParameters attach;
  attach.key = "engine/llama";
  attach.generation = 1;
  attach.fingerprint = Fingerprint{{"engine", "vllm"}};
  attach.or_source = true;
  add("get_parameters_published", attach);
  StatusSubscribe follow;
  follow.key = "engine/llama";
  add("status_subscribe_key", follow);

  std::vector<SegmentInfo> segments(2);
  segments[0] = SegmentInfo{memory::SegmentKind::kHostMemfd, 4096, 0, {}};
  segments[1] = SegmentInfo{memory::SegmentKind::kCudaIpcHandle, 1024, -1, {}};
  segments[1].ipc_handle.fill(0xab);
  std::vector<TensorInfo> tensors = {
      {"model.embed_tokens.weight", DType::kBF16, {4, 8}, {8, 1}, 0, 0, 64},
      {"model.norm.weight", DType::kF32, {8}, {1}, 0, 64, 32},
      {"lm_head.scale", DType::kF32, {}, {}, 1, 0, 4},
  };
  out.emplace_back(
      "parameters",
      encode_parameters(99, 5, status(ModelState::kLoaded), segments, tensors).value());
  return out;
}

// Inverse of FuzzedDataProvider as fuzz_frame_reader uses it: pieces come from the front, and
// each piece's size (3 bytes) and descriptor count (1 byte) from the back, last byte first.
Bytes frame_input(const std::vector<std::pair<Bytes, uint8_t>>& pieces) {
  Bytes front, back;
  for (const auto& [bytes, fds] : pieces) {
    size_t n = bytes.size();
    back.push_back(static_cast<uint8_t>(n >> 16));
    back.push_back(static_cast<uint8_t>(n >> 8));
    back.push_back(static_cast<uint8_t>(n));
    back.push_back(fds);
    front.insert(front.end(), bytes.begin(), bytes.end());
  }
  front.insert(front.end(), back.rbegin(), back.rend());
  return front;
}

Bytes frame(const Bytes& payload, uint16_t fds = 0) {
  Bytes out = encode_frame_header(static_cast<uint32_t>(payload.size()), fds);
  out.insert(out.end(), payload.begin(), payload.end());
  return out;
}

Bytes slice(const Bytes& b, size_t from, size_t to) {
  return Bytes(b.begin() + static_cast<std::ptrdiff_t>(from),
               b.begin() + static_cast<std::ptrdiff_t>(std::min(to, b.size())));
}

}  // namespace

// keeper_decoders: the first byte picks the decoder (0 messages, 1 catalogs, 2 names).
std::vector<std::pair<std::string, Bytes>> keeper_seeds() {
  namespace k = companion::keeper;
  using k::CatalogEntry, k::StoredName;
  std::vector<std::pair<std::string, Bytes>> out;
  auto add = [&](const std::string& name, uint8_t which, Bytes bytes) {
    bytes.insert(bytes.begin(), which);
    out.emplace_back(name, std::move(bytes));
  };
  CatalogEntry catalog;
  catalog.store_key = "source=/models/llama;dtype=BF16;tp=1/2";
  catalog.spec = spec();
  catalog.source_path = "/models/llama";
  catalog.number = 3;
  catalog.fingerprint = {{"engine", "vllm"}, {"dtype", "bf16"}};
  catalog.digests = {0x1234, 0xabcdef};
  catalog.files = "1:2:3:4.5;";
  catalog.created_at_ms = 1700000000000;
  catalog.segment_kind = companion::memory::SegmentKind::kCudaVmmFd;
  catalog.segment_sizes = {2 << 20, 4 << 20};
  catalog.table_bytes = 4096;
  Bytes entry = k::encode_catalog(catalog);
  add("message_hello", 0, k::encode(k::Hello{1234, 600000, false}).value());
  add("message_hello_reply", 0, k::encode(k::HelloReply{99, 2, 6, "held by server 7"}).value());
  add("message_keep", 0, k::encode(k::Keep{5, entry}).value());
  add("message_forget", 0, k::encode(k::Forget{5}).value());
  add("message_list", 0, k::encode(k::List{}).value());
  add("message_kept", 0, k::encode(k::Kept{5, entry}).value());
  add("message_list_end", 0, k::encode(k::ListEnd{2}).value());
  add("catalog", 1, entry);
  for (const auto& [name, part, index] :
       {std::tuple{"name_segment", StoredName::Part::kSegment, 3u},
        std::tuple{"name_table", StoredName::Part::kTable, 0u},
        std::tuple{"name_catalog", StoredName::Part::kCatalog, 0u}}) {
    std::string text = k::stored_name({12, part, index});
    add(name, 2, Bytes(text.begin(), text.end()));
  }
  return out;
}

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s CORPUS_DIR (tests/fuzz/corpus)\n", argv[0]);
    return 2;
  }
  std::string root = argv[1];
  auto all = messages();
  bool ok = true;
  for (const auto& [name, payload] : all)
    ok = write_file(root + "/message_decoder/" + name, payload) && ok;

  const Bytes& hello = all[0].second;
  const Bytes& list = all[14].second;
  const Bytes& params = all.back().second;
  std::string dir = root + "/frame_reader/";
  ok = write_file(dir + "one_frame", frame_input({{frame(hello), 0}})) && ok;
  Bytes two = frame(hello);
  Bytes second = frame(list);
  two.insert(two.end(), second.begin(), second.end());
  ok = write_file(dir + "two_frames_split", frame_input({{slice(two, 0, 5), 0},
                                                         {slice(two, 5, 13), 0},
                                                         {slice(two, 13, 40), 0},
                                                         {slice(two, 40, two.size()), 0}})) &&
       ok;
  Bytes with_fds = frame(params, 2);
  ok = write_file(dir + "descriptors", frame_input({{slice(with_fds, 0, 1), 2},
                                                    {slice(with_fds, 1, 200), 0},
                                                    {slice(with_fds, 200, with_fds.size()), 0}})) &&
       ok;
  ok = write_file(dir + "descriptors_mid_frame",
                  frame_input({{slice(with_fds, 0, 30), 1}, {slice(with_fds, 30, 60), 1}})) &&
       ok;
  ok = write_file(dir + "descriptors_unannounced", frame_input({{frame(hello), 3}})) && ok;
  ok = write_file(dir + "empty_payload", frame_input({{frame({}), 0}, {frame({}), 0}})) && ok;
  Bytes bad_magic = frame(hello);
  bad_magic[0] ^= 0xff;
  ok = write_file(dir + "bad_magic", frame_input({{bad_magic, 0}})) && ok;
  ok = write_file(dir + "oversized",
                  frame_input({{encode_frame_header(kMaxPayloadBytes + 1, 0), 0}})) &&
       ok;
  ok = write_file(dir + "too_many_fds",
                  frame_input({{encode_frame_header(0, kMaxFdsPerFrame + 1), 1}})) &&
       ok;
  for (const auto& [name, bytes] : keeper_seeds())
    ok = write_file(root + "/keeper_decoders/" + name, bytes) && ok;
  if (!ok) std::fprintf(stderr, "could not write every seed under %s\n", root.c_str());
  return ok ? 0 : 1;
}
