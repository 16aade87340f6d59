// Value types shared by the server, the clients and the wire protocol.
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "companion/result.hpp"

namespace companion {

// Element types of safetensors checkpoints. The numbering is part of the wire protocol.
enum class DType : uint8_t {
  kBool = 0,
  kU8 = 1,
  kI8 = 2,
  kU16 = 3,
  kI16 = 4,
  kF16 = 5,
  kBF16 = 6,
  kU32 = 7,
  kI32 = 8,
  kF32 = 9,
  kU64 = 10,
  kI64 = 11,
  kF64 = 12,
  kF8E4M3 = 13,
  kF8E5M2 = 14,
};
inline constexpr int kDTypeCount = 15;

// Bytes per element.
size_t dtype_size(DType dtype) noexcept;
// The safetensors spelling: "BF16", "F8_E4M3", ...
const char* dtype_name(DType dtype) noexcept;
// Accepts safetensors spellings and the usual aliases ("bf16", "bfloat16", "float16", "half",
// "fp32", "float"...). Unknown names give kUnknownDtype.
Result<DType> parse_dtype(std::string_view name);
// Only these are valid conversion targets for ModelSpec::dtype.
bool dtype_is_float_convertible(DType dtype) noexcept;

// What a client asks for. Its canonical form (after the server resolves the source) is the
// model key: two clients asking the same thing share one copy.
struct ModelSpec {
  std::string source;          // directory, .safetensors file, or Hugging Face id "org/name"
  std::string revision;        // Hugging Face revision (branch, tag or commit); "" = main
  std::optional<DType> dtype;  // cast floating tensors to this; nullopt = as stored
  uint32_t tp_size = 1;        // tensor-parallel world size
  uint32_t tp_rank = 0;        // this shard's rank
  // How tensors split across ranks, tried before the architecture's preset: "pattern=rule;..."
  // with fnmatch-style patterns over tensor names and rules replicated, column, row, dim<K>
  // (the splits optionally "-packed(N)"). "" = the preset alone.
  std::string shard_rules;
  std::string tag;  // opaque, e.g. an engine's config hash

  // Checks values that do not need the filesystem.
  Result<void> validate() const;
  // "org/name@rev dtype=bf16 tp=1/2 rules=... tag=x", for humans.
  std::string describe() const;
};

enum class ModelState : uint8_t {
  kReady = 0,  // known to the server (or asked about) but not loaded
  kLoading = 1,
  kLoaded = 2,
  kError = 3,
  kUnloaded = 4,
};
const char* model_state_name(ModelState state) noexcept;

// What a published model must match to be attached: engine and version, GPU architecture, dtype,
// quantization, parallel ranks... (field -> value).
using Fingerprint = std::map<std::string, std::string>;

// One generation of a model: each publish (or reload) of a key makes a new one; readers keep the
// one they attached until they release it.
struct GenerationInfo {
  uint64_t number = 0;  // 1, 2, ... per key
  uint32_t leases = 0;
  uint64_t slab_bytes = 0;
  std::vector<std::string> digests;  // per segment, "wsum64:<16 hex>" (published models)
  Fingerprint fingerprint;           // published models
  int64_t created_at_ms = 0;         // unix epoch milliseconds
  bool current = false;              // what new attaches get
};

struct ModelStatus {
  std::string key;     // canonical form of the resolved spec
  std::string id;      // short stable hash of key, for humans and the CLI
  std::string source;  // as the client spelled it first
  ModelState state = ModelState::kReady;
  uint64_t bytes_done = 0;
  uint64_t bytes_total = 0;
  StatusCode error_code = StatusCode::kOk;  // set when state == kError
  std::string message;                      // error text or note
  uint32_t tensors = 0;
  uint32_t leases = 0;      // clients currently holding the model
  std::string backend;      // memory backend holding it
  uint64_t slab_bytes = 0;  // device/host bytes held
  uint64_t seq = 0;         // order of changes on the server: larger is newer
  bool published = false;   // written by a client (key is the publisher's), not loaded
  uint64_t generation = 0;  // the current generation's number (0: none committed yet)
  Fingerprint fingerprint;  // the current generation's (published models)
  std::vector<GenerationInfo> generations;  // live ones, oldest first
  // Bytes of the model held in the server's host tier. With state kUnloaded: offloaded (the
  // tensor table is kept; the next load or attach copies the bytes back to the device).
  uint64_t host_bytes = 0;
  // 1.3: when a client last acquired or released the model, or its load ended (unix epoch
  // milliseconds), and its place in the eviction order (1: the first to go when room is needed; 0:
  // not evictable now: leased, loading, being written, or published).
  int64_t last_used_ms = 0;
  uint32_t eviction_rank = 0;

  double progress() const noexcept {
    return bytes_total == 0 ? (state == ModelState::kLoaded ? 1.0 : 0.0)
                            : static_cast<double>(bytes_done) / static_cast<double>(bytes_total);
  }
};

// Who a server is. Sent in hello and stored in registry records.
struct ServerIdentity {
  std::string instance_id;
  std::string ns;         // namespace
  std::string component;  // model_server_gpu_<N> | model_server_host
  std::string hostname;
  int64_t pid = 0;
  std::string device;           // "host" or the GPU UUID ("GPU-...")
  std::string gpu_uuid;         // empty for host
  std::string pci_bus_id;       // empty for host
  int32_t device_ordinal = -1;  // the server's own ordinal; -1 for host
  std::vector<std::string> backends;
  std::string default_backend;
  int64_t started_at_ms = 0;  // unix epoch milliseconds
  std::string version;        // software version
  std::string socket_path;
};

struct HealthInfo {
  std::string state;  // "serving"
  uint64_t uptime_ms = 0;
  uint32_t models_loaded = 0;
  uint32_t models_total = 0;
  uint32_t clients = 0;
  uint32_t leases = 0;
  uint64_t slab_bytes = 0;
  ServerIdentity server;
  std::string registry = "local";  // "local" or the etcd URL the server announces itself in
  bool registered = true;          // etcd: the record is in etcd under a live lease
  std::string registry_error;      // etcd: why it is not, while it is not
  // Requests and connections refused by a limit or the peer policy since start, by reason
  // ("descriptors", "connections", "peer_not_permitted", ...).
  std::map<std::string, uint64_t> refused;
  // 1.3: the memory budget (0: none) and how many models were evicted since start.
  uint64_t memory_budget = 0;
  uint64_t evictions = 0;
};

// Protocol version spoken by this build. Majors must match; minors may differ.
inline constexpr uint16_t kProtocolMajor = 1;
// 1: publishing, generations, reload; 2: table memfd; 3: a declared table in parts, memory
// budget, eviction, host tier (offload, load by key)
inline constexpr uint16_t kProtocolMinor = 3;
const char* software_version() noexcept;

}  // namespace companion
