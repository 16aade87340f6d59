// Companion C++ client: find the server of a device, load models, and map their weights
// zero-copy. Thread safety: a Client serialises its requests internally and may be shared
// between threads; a StatusStream belongs to one thread at a time; a MappedModel is immutable
// and may be read from any thread.
#pragma once

#if __cplusplus < 202002L
#error "companion/client.hpp needs C++20 (-std=c++20; CMake: link Companion::companion)"
#endif

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "companion/result.hpp"
#include "companion/types.hpp"

namespace companion {

struct ConnectOptions {
  std::string ns = "companion";  // namespace the server registered in
  // Which server: "host", or a GPU as ordinal / UUID / PCI bus id (matched by UUID, whatever
  // CUDA_VISIBLE_DEVICES says in either process).
  std::string device = "host";
  std::string socket_path;  // connect here directly instead of discovering
  std::string runtime_dir;  // local registry directory ("" = default)
  // Where to look for servers: "" ($COMPANION_REGISTRY, else local), "local", or
  // "etcd://host:port[,host:port]". From etcd only instances on this host are considered; until
  // etcd is first reached the local registry stands in, and when it goes away the instances
  // last seen remain candidates.
  std::string registry;
  std::string instance_id;  // use only this instance ("" = choose among the live ones)
  std::string client_name = "companion-client";
  // How long to keep looking for a live server before giving up (kUnavailable).
  double discovery_timeout_s = 0.0;
  // How long a connect may wait for a server to accept it (kTimeout after): a server that is
  // stuck, or a socket that never accepts, costs at most this per instance.
  double connect_timeout_s = 5.0;
  // Owners, besides this process's uid and root, whose runtime directory, records and sockets
  // this client trusts (added to the uids in $COMPANION_TRUST_UID). A server owned by anyone
  // else is never used.
  std::vector<uint32_t> trusted_uids;
};

// One tensor of a mapped model. `data` is a host pointer (host backend) or a device pointer
// (CUDA backends) valid while the MappedModel lives. Read-only.
struct TensorView {
  std::string_view name;
  DType dtype = DType::kU8;
  std::span<const int64_t> shape;
  std::span<const int64_t> strides;  // in elements
  const void* data = nullptr;
  uint64_t nbytes = 0;
  bool on_device = false;
  int device_ordinal = -1;  // local CUDA ordinal when on_device
  uint32_t segment = 0;     // the mapping data lies in (MappedModel::segment_count())
  uint64_t offset = 0;      // data's byte offset from that mapping's start
};

// A model's weights mapped into this process. Destruction unmaps them and releases the lease.
class MappedModel {
 public:
  struct Impl;
  explicit MappedModel(std::unique_ptr<Impl> impl);
  ~MappedModel();
  MappedModel(const MappedModel&) = delete;
  MappedModel& operator=(const MappedModel&) = delete;

  const ModelStatus& status() const noexcept;
  uint64_t lease_id() const noexcept;
  std::span<const TensorView> tensors() const noexcept;
  const TensorView* find(std::string_view name) const noexcept;
  size_t segment_count() const noexcept;
  uint64_t mapped_bytes() const noexcept;
  // Host backend: the inode of each segment's memfd (equal across clients sharing one copy).
  std::vector<uint64_t> segment_inodes() const;
  // True when no segment of the mapping can be written through (host, cuda-vmm). False on
  // cuda-ipc: legacy CUDA IPC mappings are always read-write (docs/architecture.md, "Memory
  // backends and slab layout"), so a write there changes every client's weights.
  bool read_only() const noexcept;

 private:
  std::unique_ptr<Impl> impl_;
};

// One entry of a table to publish.
struct TensorDecl {
  std::string name;
  DType dtype = DType::kU8;
  std::vector<int64_t> shape;
  std::string alias_of;  // "" or an earlier entry whose bytes this one shares (tied weights)
};

// A declared tensor of a publication: writable until commit.
struct WritableTensor {
  std::string_view name;
  DType dtype = DType::kU8;
  std::span<const int64_t> shape;
  std::span<const int64_t> strides;  // in elements
  void* data = nullptr;              // host or device pointer, as the server's backend
  uint64_t nbytes = 0;
  bool on_device = false;
  int device_ordinal = -1;
  uint32_t segment = 0;
  uint64_t offset = 0;
};

// A writer's hold on a key, on a connection of its own (the key's writer lock). Destruction
// before commit() aborts: the server frees the slab.
class Publication {
 public:
  virtual ~Publication() = default;
  virtual const std::string& key() const noexcept = 0;
  // The generation this publication becomes when committed (known once declared).
  virtual uint64_t generation() const noexcept = 0;
  // Allocates the slab for the table on the server and maps it writable here. Once.
  virtual Result<void> declare(std::span<const TensorDecl> table) = 0;
  virtual std::span<const WritableTensor> tensors() const noexcept = 0;
  virtual const WritableTensor* find(std::string_view name) const noexcept = 0;
  // Finishes writing (synchronises device work of this process's context), drops write access,
  // and has the server digest and seal the slab and make it the key's newest generation. The
  // returned model is the same mapping, now read-only, holding a lease of that generation.
  virtual Result<std::shared_ptr<MappedModel>> commit() = 0;
  // Gives the key up without committing (also what destruction does).
  virtual void abort() = 0;
};

// How attach() finds a model.
struct AttachOptions {
  uint64_t generation = 0;                 // 0 = the newest committed
  std::optional<Fingerprint> fingerprint;  // checked against the generation's when set
  // The key may name a checkpoint too: one the server finds is used before a published key.
  bool or_source = false;
  bool wait = true;  // wait for a first generation being published (or a load)
  double timeout_s = -1;
};

// Claim modes (see companion_claim_mode in companion.h).
enum class ClaimMode : uint8_t { kNow = 0, kWait = 1, kIfUnpublished = 2 };

// Status updates of one model (or of all), on a connection of its own.
class StatusStream {
 public:
  virtual ~StatusStream() = default;
  // The next update; kTimeout after timeout_s (negative: wait forever).
  virtual Result<ModelStatus> next(double timeout_s) = 0;
};

// The live server instances options designate (namespace, device, this host), oldest first,
// waiting up to options.discovery_timeout_s for one. kUnavailable when there is none.
Result<std::vector<ServerIdentity>> discover_instances(const ConnectOptions& options);

// A client of every live instance serving one device. Requests about a model go to the first
// instance that holds it (loaded, else loading), otherwise to the next instance in round robin;
// other requests go to the instance used last. When an instance's connection dies the request
// fails over to the next live instance; models already mapped stay valid.
class Client {
 public:
  static Result<std::unique_ptr<Client>> connect(const ConnectOptions& options);
  virtual ~Client() = default;

  // The instance used last.
  virtual const ServerIdentity& server() const noexcept = 0;
  // The live instances this client chooses among now (the one socket for options.socket_path).
  virtual Result<std::vector<ServerIdentity>> instances() = 0;

  virtual Result<ModelStatus> status(const ModelSpec& spec) = 0;
  virtual Result<std::vector<ModelStatus>> list() = 0;
  virtual Result<HealthInfo> health() = 0;
  // Starts loading (returns at once), or with wait=true returns when loaded, calling
  // on_progress with each status update on the way.
  virtual Result<ModelStatus> load(const ModelSpec& spec, bool wait,
                                   const std::function<void(const ModelStatus&)>& on_progress = {},
                                   double timeout_s = -1) = 0;
  virtual Result<ModelStatus> unload(const ModelSpec& spec, bool force) = 0;
  // key: a key or short id from list().
  virtual Result<ModelStatus> unload_key(const std::string& key, bool force) = 0;
  // The host tier (servers of protocol 1.3 started with --host-budget): the model's bytes move
  // to host memory and its device memory is freed; its next load or attach copies them back.
  // Returns the offloaded status (state kUnloaded, host_bytes > 0). kModelInUse while clients
  // hold it unless force (they keep their mappings). Waits up to timeout_s (negative: no limit).
  virtual Result<ModelStatus> offload(const ModelSpec& spec, bool force, double timeout_s = -1) = 0;
  virtual Result<ModelStatus> offload_key(const std::string& key, bool force,
                                          double timeout_s = -1) = 0;
  // Loads a model the server holds, named by key or short id (a published one too): an offloaded
  // one is woken. With wait, returns once it is loaded (or its wake failed).
  virtual Result<ModelStatus> load_key(const std::string& key, bool wait,
                                       double timeout_s = -1) = 0;

  // As the seed: triggers the load if needed and waits until the model is loaded. initial_timeout
  // bounds the wait for the load to start (server answering, model found); loading_timeout bounds
  // the load itself. Returns the loaded status, or the load's error, or kTimeout.
  virtual Result<ModelStatus> wait_for_model_ready(const ModelSpec& spec, double initial_timeout_s,
                                                   double loading_timeout_s) = 0;
  // Loads if needed (waiting up to timeout_s; negative = no limit) and maps every tensor.
  virtual Result<std::shared_ptr<MappedModel>> get_model_parameters(const ModelSpec& spec,
                                                                    double timeout_s = -1) = 0;

  virtual Result<std::unique_ptr<StatusStream>> subscribe(const ModelSpec& spec) = 0;
  virtual Result<std::unique_ptr<StatusStream>> subscribe_all() = 0;
  // One published key's status (generations included).
  virtual Result<std::unique_ptr<StatusStream>> subscribe_key(const std::string& key) = 0;

  // ---- publishing (see Publication) ----
  // Claims `key` for writing its next generation. With kIfUnpublished, returns nullptr when a
  // generation is committed whose fingerprint matches (kFingerprintMismatch when it does not),
  // and waits while another writer publishes the first one.
  virtual Result<std::unique_ptr<Publication>> claim(const std::string& key,
                                                     const Fingerprint& fingerprint, ClaimMode mode,
                                                     double timeout_s = -1) = 0;
  // claim(kNow) + declare: the usual way to publish.
  virtual Result<std::unique_ptr<Publication>> publish(const std::string& key,
                                                       std::span<const TensorDecl> table,
                                                       const Fingerprint& fingerprint) = 0;
  // Maps a published model read-only (a generation, fingerprint checked), as get_model_parameters.
  virtual Result<std::shared_ptr<MappedModel>> attach(const std::string& key,
                                                      const AttachOptions& options) = 0;
  // Exactly one of many concurrent callers builds: the first claims the key, declares
  // declare()'s table, runs fill() on the writable tensors and commits; the others wait for the
  // commit and attach (or take over when the builder dies). Fingerprint checked either way.
  virtual Result<std::shared_ptr<MappedModel>> attach_or_publish(
      const std::string& key, const Fingerprint& fingerprint,
      const std::function<Result<std::vector<TensorDecl>>()>& declare,
      const std::function<Result<void>(Publication&)>& fill, double timeout_s = -1) = 0;
  // A loaded model whose files changed (size, mtime, inode) is loaded again as a new generation;
  // force reloads even unchanged files. Waits for the load; returns the final status.
  virtual Result<ModelStatus> reload(const std::string& key_or_id, bool force,
                                     double timeout_s = -1) = 0;
};

}  // namespace companion
