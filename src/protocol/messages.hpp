// The protocol's messages as plain C++ values, and their binary encoding (FlatBuffers, schema in
// companion.fbs). Nothing outside src/protocol sees FlatBuffers types.
#pragma once

#include <array>
#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <variant>
#include <vector>

#include "common/segment_kind.hpp"
#include "companion/result.hpp"
#include "companion/types.hpp"

namespace companion::protocol {

struct Hello {
  uint16_t major = kProtocolMajor;
  uint16_t minor = kProtocolMinor;
  std::string client_name;
  int64_t pid = 0;
};
struct HelloReply {
  uint16_t major = kProtocolMajor;
  uint16_t minor = kProtocolMinor;
  ServerIdentity server;
};
struct GetParameters {
  ModelSpec spec;
  bool wait = true;
  bool only_if_held = false;  // NOT_READY rather than a new load when not held here
  std::string key;            // a published model's key (spec ignored unless or_source)
  uint64_t generation = 0;    // 0 = the newest committed
  std::optional<Fingerprint> fingerprint;  // checked when set
  bool or_source = false;  // nothing published under key: spec (source = key) instead
};

struct SegmentInfo {
  memory::SegmentKind kind = memory::SegmentKind::kHostMemfd;
  uint64_t size = 0;
  int32_t fd_index = -1;
  std::array<uint8_t, memory::kIpcHandleBytes> ipc_handle{};
};

// Owning tensor description (what the server keeps per model).
struct TensorInfo {
  std::string name;
  DType dtype = DType::kU8;
  std::vector<int64_t> shape;
  std::vector<int64_t> strides;
  uint32_t segment = 0;
  uint64_t offset = 0;
  uint64_t nbytes = 0;
};

// Non-owning tensor description pointing into a received payload (no allocation per tensor).
struct TensorRef {
  std::string_view name;
  DType dtype = DType::kU8;
  std::span<const int64_t> shape;
  std::span<const int64_t> strides;
  uint32_t segment = 0;
  uint64_t offset = 0;
  uint64_t nbytes = 0;
};

// A received Parameters reply. `tensors` point into `payload`, which it keeps alive. From a
// server of protocol 1.2 to a client of 1.2, tensors is empty and the table comes as a memfd
// (the frame's descriptor table_fd_index, table_bytes long; see protocol/tensor_table.hpp).
struct Parameters {
  uint64_t lease_id = 0;
  ModelStatus model;
  std::vector<SegmentInfo> segments;
  std::vector<TensorRef> tensors;
  std::shared_ptr<const std::vector<uint8_t>> payload;
  bool writable = false;        // the writer's mapping of a publication
  int32_t table_fd_index = -1;  // 1.2
  uint64_t table_bytes = 0;     // 1.2
};

struct Release {
  uint64_t lease_id = 0;
};
struct Released {
  uint64_t lease_id = 0;
};
struct StatusSubscribe {
  ModelSpec spec;
  bool all = false;
  std::string key;  // a published model's key instead of spec
};
struct StatusEvent {
  ModelStatus model;
};
struct StatusUnsubscribe {
  uint64_t subscription_id = 0;
};
struct Load {
  ModelSpec spec;
  bool wait = false;
  std::string key;  // 1.3: instead of spec, a key or id the server holds (wakes it)
};
struct LoadReply {
  ModelStatus model;
};
struct Unload {
  ModelSpec spec;
  std::string key;  // alternative to spec: a key or id from `list`
  bool force = false;
  bool to_host = false;  // 1.3: offload to the host tier instead of unloading
};
struct UnloadReply {
  ModelStatus model;
};
struct List {};
struct ListReply {
  std::vector<ModelStatus> models;
};
struct Health {};
struct HealthReply {
  HealthInfo info;
};
struct ErrorReply {
  Error error;
};
struct Done {};

// ---- publishing (1.1) ----
struct TensorDeclInfo {
  std::string name;
  DType dtype = DType::kU8;
  std::vector<int64_t> shape;
  std::string alias_of;
};
enum class ClaimMode : uint8_t { kNow = 0, kWait = 1, kIfUnpublished = 2 };
struct PublishClaim {
  std::string key;
  Fingerprint fingerprint;
  ClaimMode mode = ClaimMode::kNow;
};
struct PublishClaimed {
  bool claimed = false;
  ModelStatus model;
};
struct PublishDeclare {
  std::string key;
  std::vector<TensorDeclInfo> tensors;
  bool more = false;  // 1.3: a part of the table; the rest follows in later PublishDeclares
};
struct PublishCommit {
  std::string key;
};
struct PublishCommitted {
  uint64_t lease_id = 0;
  ModelStatus model;
};
struct PublishAbort {
  std::string key;
};
struct Reload {
  std::string key;
  bool force = false;
};

using Body =
    std::variant<Hello, HelloReply, GetParameters, Parameters, Release, Released, StatusSubscribe,
                 StatusEvent, StatusUnsubscribe, Load, LoadReply, Unload, UnloadReply, List,
                 ListReply, Health, HealthReply, ErrorReply, Done, PublishClaim, PublishClaimed,
                 PublishDeclare, PublishCommit, PublishCommitted, PublishAbort, Reload>;

struct Message {
  uint64_t request_id = 0;
  Body body;
};

class TensorTableView;

// Encodes any message except Parameters (use encode_parameters: it takes owning tensors).
// kInvalidArgument for a Parameters body or a payload over kMaxPayloadBytes: the caller answers
// with an error instead of sending nothing.
Result<std::vector<uint8_t>> encode(const Message& message);
// Parameters with the tensors inline (protocol 1.0 and 1.1).
Result<std::vector<uint8_t>> encode_parameters(uint64_t request_id, uint64_t lease_id,
                                               const ModelStatus& model,
                                               std::span<const SegmentInfo> segments,
                                               std::span<const TensorInfo> tensors,
                                               bool writable = false);
Result<std::vector<uint8_t>> encode_parameters_inline(uint64_t request_id, uint64_t lease_id,
                                                      const ModelStatus& model,
                                                      std::span<const SegmentInfo> segments,
                                                      const TensorTableView& tensors,
                                                      bool writable = false);
// Parameters whose table travels as a memfd, the frame's descriptor table_fd_index (1.2).
Result<std::vector<uint8_t>> encode_parameters_with_table(uint64_t request_id, uint64_t lease_id,
                                                          const ModelStatus& model,
                                                          std::span<const SegmentInfo> segments,
                                                          int32_t table_fd_index,
                                                          uint64_t table_bytes,
                                                          bool writable = false);

// Checks a published key and a fingerprint against the limits (kInvalidArgument says which).
Result<void> validate_publish_key(std::string_view key);
Result<void> validate_fingerprint(const Fingerprint& fingerprint);

// Verifies (FlatBuffers verifier, then limits and semantic checks) and decodes one payload.
// Anything malformed is kProtocolError with a reason.
Result<Message> decode(std::vector<uint8_t> payload);

// Name of the body's type, for logs and errors ("GetParameters").
const char* body_name(const Body& body) noexcept;

}  // namespace companion::protocol
