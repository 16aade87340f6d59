// The server's models: resolution of specs to keys, single-flight loads on worker threads, the
// state machine (ready → loading → loaded | error, unloaded), and lease counting.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "checkpoint/source.hpp"
#include "common/util.hpp"
#include "companion/types.hpp"
#include "keeper/keeper_protocol.hpp"
#include "loader/loader.hpp"
#include "memory/backend.hpp"
#include "protocol/messages.hpp"
#include "protocol/tensor_table.hpp"

namespace companion::server {

// How a load, a reload or a wake from the host tier ended: what `serve --metrics` counts.
struct LoadReport {
  enum class Kind { kLoad, kReload, kWake };
  Kind kind = Kind::kLoad;
  StatusCode code = StatusCode::kOk;  // kOk: loaded
  uint64_t bytes = 0;                 // read from the checkpoint, or copied from the host tier
  double seconds = 0;                 // from the start of the work to the model being served
};
const char* load_kind_name(LoadReport::Kind kind) noexcept;  // "load", "reload", "wake"

struct StoreConfig {
  std::vector<std::string> model_roots;  // canonical; the only places checkpoints are read from
  std::string hf_cache;                  // Hugging Face hub cache (also readable)
  size_t load_threads = 2;               // models loading at the same time
  loader::DirectIo direct_io = loader::DirectIo::kAuto;  // O_DIRECT reads (cold starts)
  checkpoint::CheckpointLimits checkpoint_limits;        // header bytes, tensors, files

  // Limits; a load past one is refused with kLimitExceeded and counted (refusal_counts()).
  // max_models + max_error_entries is at most protocol::kMaxListedModels, so that a list reply
  // always fits one frame (validate()).
  size_t max_models = 1024;             // models held, loaded or loading
  size_t max_variants_per_source = 64;  // distinct keys (dtype, shard, tag) of one source path
  size_t max_error_entries = 256;       // failed loads kept for `ls`; the oldest go first
  std::chrono::milliseconds error_ttl{std::chrono::minutes(5)};  // failed loads kept this long
  // Memory admission: a load needs its slab's bytes within what the device has available, less
  // this reserve (the larger of the two) and less what loads in flight were admitted.
  uint64_t memory_reserve_bytes = 1ull << 30;
  double memory_reserve_fraction = 0.0;  // of the device's total memory, 0..1
  // The memory budget: every slab the store holds (each generation's, writers'), plus what loads
  // and publications in flight were admitted, stays within it; a load or publication past it
  // first evicts idle models (least recently used first), else is refused. Both 0: the memory
  // available when the store starts, less the reserve (no bound when the backend cannot tell).
  uint64_t memory_budget_bytes = 0;
  double memory_budget_fraction = 0.0;  // of the device's total memory, 0..1
  // A model that no client has held for this long is evicted by evict_idle(); 0: never.
  std::chrono::milliseconds idle_evict{0};
  // How long destruction waits for loads to stop; a worker stuck longer (a read that never
  // returns) is abandoned, see ~ModelStore.
  std::chrono::milliseconds shutdown_timeout{std::chrono::seconds(5)};
  loader::ReadSource* read_source = nullptr;  // test hook: nullptr reads with pread(2)
  // Generations of one key alive at once (the current one, older ones still leased, one being
  // published or reloaded); a publish or reload past it is refused with kLimitExceeded.
  size_t max_generations = 2;
  // The host tier: host copies of offloaded models are held up to this many bytes in all (the
  // least recently offloaded is dropped to make room); 0 = no host tier (offload is refused).
  uint64_t host_budget_bytes = 0;
  // Told how every load, reload and wake ended (a cancelled one is not), on the thread that ran
  // it, outside the store's lock; must be thread-safe. Empty: nobody is told.
  std::function<void(const LoadReport&)> on_load_end;

  // kInvalidArgument when a limit is zero or out of range.
  Result<void> validate() const;
};

// A spec after the server has checked and resolved it.
struct ResolvedModel {
  ModelSpec spec;
  checkpoint::ResolvedSource source;
  std::string key;
};

// What a lease hands out: exports for one client plus the model's table. Holding `slab` keeps
// the memory alive even if the model is force-unloaded meanwhile.
struct LeaseGrant {
  std::string key;  // the store's key of the model (for release)
  ModelStatus status;
  std::shared_ptr<memory::Slab> slab;
  std::shared_ptr<const protocol::SharedTensorTable> table;
  std::vector<memory::SegmentExport> exports;
  uint64_t generation = 0;  // which generation this lease pins (a token, not its number)
};

// A writer's slab of a publication: writable exports for it alone, and the table laid out in it.
struct WriterGrant {
  ModelStatus status;
  std::shared_ptr<const protocol::SharedTensorTable> table;
  std::vector<memory::SegmentExport> exports;
  uint64_t generation = 0;  // the number it gets when committed
};

// What PublishClaim found.
struct ClaimOutcome {
  enum class Kind { kClaimed, kPublished, kBusy };
  Kind kind = Kind::kBusy;
  ModelStatus status;
};

// Published models live in the store under this key (loaded ones under "source=...").
std::string published_store_key(const std::string& key);

// Restart without reload (server/keeper_link.hpp): what the store tells a keeper about the
// generations it commits.
class GenerationKeeper {
 public:
  virtual ~GenerationKeeper() = default;
  // A generation was committed (a load, a reload, a publication). Called under the store's lock:
  // must not block. The token returned lives as long as the generation does in the store; its
  // destruction tells the keeper that the generation is freed (unloaded, evicted, replaced).
  virtual std::shared_ptr<void> keep(keeper::CatalogEntry catalog,
                                     std::shared_ptr<memory::Slab> slab,
                                     std::shared_ptr<const protocol::SharedTensorTable> table) = 0;
};

// A generation an earlier server committed, rebuilt from the keeper's handles and checked.
struct AdoptedGeneration {
  ResolvedModel model;  // key: the store key; spec and source: a loaded model's
  bool published = false;
  std::string publish_key;
  uint64_t number = 0;
  Fingerprint fingerprint;
  std::vector<std::string> digests;
  std::string files;
  int64_t created_at_ms = 0;
  std::shared_ptr<memory::Slab> slab;
  std::shared_ptr<const protocol::SharedTensorTable> table;
  std::shared_ptr<void> kept;  // the keeper's token, as GenerationKeeper::keep returns
};

struct Generation;

class ModelStore {
 public:
  // Called after every state change, from whichever thread made it (a worker or the caller).
  using Listener = std::function<void(const ModelStatus&)>;

  ModelStore(std::unique_ptr<memory::Backend> backend, StoreConfig config, Listener listener);
  // Cancels loads and waits for the workers, at most config.shutdown_timeout. A worker still
  // inside a load then (a read that never returns) is detached: after the cancel it touches
  // nothing of the store again (run_load checks the cancel flag after every step that can block,
  // and the worker loop checks the abandon flag it shares), so it is safe to let it finish or to
  // let the process exit under it.
  ~ModelStore();

  const memory::Backend& backend() const { return *backend_; }

  // Validates the spec and resolves its source (never reads outside the roots).
  Result<ResolvedModel> resolve(const ModelSpec& spec) const;
  // resolve() as a function that holds copies of what it needs (the roots, canonicalised once at
  // start, and the HF cache): it may run on a thread that outlives the store.
  using ResolveFn = std::function<Result<ResolvedModel>(const ModelSpec&)>;
  ResolveFn resolver() const;
  // Current status of a key; kReady for a model the store does not hold.
  ModelStatus status(const std::string& key) const;
  std::vector<ModelStatus> list() const;
  // Starts a load unless the model is loaded or loading (one load however many ask). An errored
  // or unloaded model is loaded again. Returns the status after the call; kLimitExceeded when a
  // new load would pass max_models or max_variants_per_source, kInvalidArgument for a key longer
  // than the wire allows.
  Result<ModelStatus> ensure_loading(const ResolvedModel& model);
  // GPU servers: a worker pins the loads' staging buffers now, so that the first load does not
  // pay for it.
  void pin_staging_ahead(int ordinal);
  // For a loaded model (or a published one by its store key): counts a lease of the current
  // generation and exports its segments.
  Result<LeaseGrant> acquire(const std::string& key);
  // A published model: generation 0 = the current one; a fingerprint, when given, must equal the
  // generation's (kFingerprintMismatch lists the fields that differ). kNotFound when nothing is
  // published under the key (or that generation is gone), kNotReady while only a first
  // generation is being written.
  Result<LeaseGrant> acquire_published(const std::string& key, uint64_t generation,
                                       const std::optional<Fingerprint>& fingerprint);
  // The same for any model by its store key (a loaded one: generations made by reload; its
  // fingerprint is empty).
  Result<LeaseGrant> acquire_generation(const std::string& store_key, uint64_t generation,
                                        const std::optional<Fingerprint>& fingerprint);
  void release(const std::string& key, uint64_t generation);
  // A client parked waiting for the model under `store_key` (loading or waking) to grant it a
  // lease: until the hold returned is dropped, that model is not evicted, so that the lease the
  // waiter is about to get is not lost to another admission in between. Dropped exactly once,
  // whatever ends the wait; must not outlive the store.
  std::shared_ptr<void> hold_for_waiter(const std::string& store_key);

  // ---- publishing: `writer` identifies the connection that holds a key ----
  // kNow/kWait: claims the key for its next generation unless another writer holds it (kBusy);
  // kIfUnpublished: kPublished when a generation is committed (its fingerprint must match),
  // else as kWait. kLimitExceeded past max_generations or max_models.
  Result<ClaimOutcome> claim(const std::string& key, const Fingerprint& fingerprint,
                             protocol::ClaimMode mode, uint64_t writer);
  // Lays out and allocates the claimed key's slab (memory admitted first) and exports it
  // writable for the writer.
  Result<WriterGrant> declare(const std::string& key, uint64_t writer,
                              const std::vector<protocol::TensorDeclInfo>& tensors);
  // declare() on a worker thread (a large table's checks and layout, and a large slab's
  // allocation, take seconds); `done` runs on that thread with the outcome, unless the store is
  // stopping.
  void declare_async(const std::string& key, uint64_t writer,
                     std::vector<protocol::TensorDeclInfo> tensors,
                     std::function<void(Result<WriterGrant>)> done);
  // Digests and seals the slab on a worker thread, makes it the current generation and leases it
  // to the writer; `done` runs on that thread with the outcome. A seal refused because a
  // writable mapping is left fails the commit and keeps the publication open.
  void commit(const std::string& key, uint64_t writer,
              std::function<void(Result<LeaseGrant>)> done);
  // Gives the key up (the slab, if any, is freed). False when `writer` held nothing of it.
  bool abort(const std::string& key, uint64_t writer);
  // Loads a new generation of a loaded model if its files changed (or force); returns the status
  // at once (the load goes on in the background; its end is a status with a new generation, or
  // with error_code set and the old generation still current).
  Result<ModelStatus> reload(const std::string& key_or_id, bool force);
  // The store key of a model named by key, id or published key; "" when none.
  std::string find_key(const std::string& key_or_id) const;
  // key may be the full key or the short id. Loaded with leases and !force: kModelInUse.
  // Loading: the load is cancelled. Returns the final status (state kUnloaded).
  Result<ModelStatus> unload(const std::string& key_or_id, bool force);
  uint64_t slab_bytes() const;
  uint32_t total_leases() const;
  // Bytes admitted to loads in flight (their slabs, allocated or about to be).
  uint64_t admitted_bytes() const;
  // The memory budget in bytes (UINT64_MAX: none), and the bytes counted against it now.
  uint64_t memory_budget() const;
  uint64_t budget_used() const;
  // Models evicted since start (to make room, or idle).
  uint64_t evictions() const;
  // Evicts the models that no client has held for config.idle_evict by `now` (the server calls
  // it periodically); nothing when idle_evict is 0.
  void evict_idle(Clock::time_point now);
  std::chrono::milliseconds idle_evict() const { return config_.idle_evict; }
  // From now on every committed generation is handed to `keeper` (nullptr: none).
  void set_keeper(std::shared_ptr<GenerationKeeper> keeper);
  // Registers a kept generation as the loaded (or published) model it was, with its number and
  // fingerprint, serving at once. kInvalidArgument when the key is held already, kLimitExceeded
  // past max_models.
  Result<ModelStatus> adopt(AdoptedGeneration generation);

  // ---- the host tier (model_store_host_tier.cpp) ----
  // Offloads a loaded or published model: the current generation's bytes are copied into host
  // memory (a slab of the host backend, sealed memfds), its device slab is freed and its tensor
  // table kept. The model then shows state kUnloaded with host_bytes > 0 until ensure_loading or
  // wake() copies the bytes back into a new device slab. The copy fits config.host_budget_bytes:
  // the least recently offloaded host copies are dropped (their models unloaded) to make room.
  // Runs on the calling thread (the store's lock is not held during the copy) and returns once
  // the device slab is released (leases held under force keep theirs until they go).
  // kModelInUse while leased (unless force) or being published; kNotReady unless loaded;
  // kInvalidArgument without a host tier; kOutOfMemory when the copy cannot fit it.
  // The seam for eviction: call it instead of unload() when config.host_budget_bytes > 0.
  Result<ModelStatus> offload(const std::string& key_or_id, bool force);
  // offload() on a worker thread; `done` gets its outcome there.
  void offload_async(const std::string& key_or_id, bool force,
                     std::function<void(Result<ModelStatus>)> done);
  // Starts waking an offloaded model (a worker copies its host copy into a new device slab,
  // checks each segment's digest against the one taken at offload, or the published digests,
  // then makes it loaded). Returns the status: kLoading, or the model's own when it is not
  // offloaded. kNotFound for a model the store does not hold.
  Result<ModelStatus> wake(const std::string& key_or_id);
  // Bytes of host copies held (and being made).
  uint64_t host_tier_bytes() const;
  uint64_t host_budget() const { return config_.host_budget_bytes; }

  // How often each limit refused or dropped something, by the name of its `serve` flag:
  // max-models, max-variants-per-source, memory (admission), key-length, max-error-entries
  // (failed loads dropped), error-ttl (failed loads expired).
  std::map<std::string, uint64_t> refusal_counts() const;

 private:
  struct Entry;
  struct WorkerPool;
  ModelStatus snapshot(const Entry& e) const;
  // A worker's load job: run_load, with an exception failing that load (kOutOfMemory for
  // std::bad_alloc, kInternal otherwise) instead of the process.
  void load_job(std::shared_ptr<Entry> entry, uint64_t generation, bool reload, bool force);
  void run_load(std::shared_ptr<Entry> entry, uint64_t generation, bool reload, bool force);
  // Publishes a load's (or reload's) failure, unless it was cancelled or the store is stopping.
  void fail_load(const std::shared_ptr<Entry>& entry, uint64_t generation, bool reload,
                 const Error& error, const WorkerPool& pool);
  void run_commit(std::shared_ptr<Entry> entry, uint64_t writer, uint64_t token,
                  std::function<void(Result<LeaseGrant>)> done);
  Result<LeaseGrant> lease_locked(Entry& e, size_t index);
  void drop_unleased_locked(Entry& e);
  // Hands a generation just committed to the keeper, if any.
  void keep_locked(const Entry& e, Generation& g);
  // Frees the slabs on a worker thread.
  void retire_locked(std::vector<std::shared_ptr<memory::Slab>> slabs);
  void worker_loop(std::shared_ptr<WorkerPool> pool, size_t index);
  // Drops failed loads past error_ttl, then the oldest past max_error_entries; their kUnloaded
  // statuses go to `gone` for the listener.
  void trim_errors_locked(std::vector<ModelStatus>& gone);
  // Reserves `bytes` for a load against the memory budget and the backend's available memory,
  // evicting idle models (least recently used first) when that makes room; kOutOfMemory, naming
  // what is resident and what is leased, when it cannot. The bytes count against the budget
  // (budget_pending_) until the caller hands the slab to an entry or gives it up. `store_key`
  // is the entry asking, left out of the refusal's list of what is resident.
  Result<void> admit(uint64_t bytes, const std::string& what, const std::string& store_key);
  // Slab bytes of every generation and writer the store holds.
  uint64_t held_bytes_locked() const;
  // Whether a model may be evicted now: loaded, not published, no lease, no reload or writer,
  // no client parked waiting for it (hold_for_waiter).
  bool evictable_locked(const Entry& e) const;
  // The evictable models, the least recently used first (ties in key order).
  std::vector<Entry*> eviction_order_locked() const;
  // e's place in that order, from 1; 0 when it is not evictable.
  uint32_t eviction_rank_locked(const Entry& e) const;
  // Drops an idle model: its slabs go to `freed`, its entry is erased; returns its final status
  // (kUnloaded, with `why` in its message).
  ModelStatus evict_locked(Entry& e, const std::string& why,
                           std::vector<std::shared_ptr<memory::Slab>>& freed);
  void notify(const ModelStatus& status);
  void report_load(const LoadReport& report) const;
  // The host tier: a wake's worker job (as load_job), its copy, and its failure (the model
  // stays offloaded); dropping host copies, least recently offloaded first, until `bytes` more
  // fit the host budget (their unloaded statuses go to `gone`).
  void wake_job(std::shared_ptr<Entry> entry, uint64_t generation);
  void run_wake(std::shared_ptr<Entry> entry, uint64_t generation);
  void fail_wake(const std::shared_ptr<Entry>& entry, uint64_t generation, const Error& error);
  void start_wake_locked(const std::shared_ptr<Entry>& entry);
  Result<void> make_host_room_locked(uint64_t bytes, std::vector<ModelStatus>& gone);
  // An offload between its two critical sections: the host room is reserved and the entry
  // marked offloading; the copy has not run yet.
  struct StartedOffload {
    std::shared_ptr<Entry> entry;
    std::shared_ptr<memory::Slab> device;
    uint64_t generation = 0;
    uint64_t token = 0;
    uint64_t bytes = 0;
    std::string what;
    bool force = false;
    std::string evicted_because;  // an eviction's reason; "" for `companion offload`
  };
  // Reserves host room for e's current generation (dropping older host copies, their statuses
  // to `gone`) and marks it offloading; kOutOfMemory when it cannot fit the host tier.
  Result<StartedOffload> start_offload_locked(Entry& e, bool force, std::string evicted_because,
                                              std::vector<ModelStatus>& gone);
  // Copies the bytes into the host tier with the store's lock released, then frees the device
  // slab; an eviction gives up (the model stays loaded) when it is no longer evictable then.
  Result<ModelStatus> finish_offload(StartedOffload started);
  // Evicts e: with a host tier (and keep_in_host_tier), starts its offload and returns it for
  // the caller to finish; else, or when it cannot fit the host tier, drops it (evict_locked, its
  // status to `evicted`, its slabs to `freed`).
  std::optional<StartedOffload> start_eviction_locked(
      Entry& e, const std::string& why, std::vector<ModelStatus>& gone,
      std::vector<std::shared_ptr<memory::Slab>>& freed, std::vector<ModelStatus>& evicted,
      bool keep_in_host_tier);
  Entry* find_locked(const std::string& key_or_id) const;
  size_t held_locked() const;

  std::unique_ptr<memory::Backend> backend_;
  StoreConfig config_;
  std::vector<std::string> roots_;  // canonical model roots and HF cache, as they were at start
  Listener listener_;

  mutable std::mutex mutex_;
  mutable uint64_t seq_ = 0;  // orders every snapshot handed out
  std::map<std::string, std::shared_ptr<Entry>> entries_;
  std::deque<std::function<void()>> jobs_;
  std::condition_variable jobs_cv_;
  bool stopping_ = false;
  uint64_t admitted_bytes_ = 0;
  uint64_t budget_ = UINT64_MAX;  // resolved from the config at start
  // The default budget (what was available at start, less the reserve): models adopted after
  // start were in memory before it, so their bytes are added to it.
  bool budget_from_available_ = false;
  // Bytes admitted against the budget whose slab no entry holds yet (loads and declares in
  // flight); exact: each admission's bytes leave it in the same critical section that hands the
  // slab to its entry, or when the slab is given up.
  uint64_t budget_pending_ = 0;
  uint64_t evictions_ = 0;
  std::map<std::string, uint64_t> refusals_;
  // Clients parked waiting for a model, by store key (hold_for_waiter); such a model is not
  // evictable.
  std::map<std::string, uint32_t> waiter_holds_;
  std::shared_ptr<WorkerPool> pool_;
  std::vector<std::thread> workers_;
  std::shared_ptr<GenerationKeeper> keeper_;
  // The host tier: where offloaded models' bytes go, and the bytes held there.
  std::unique_ptr<memory::Backend> host_tier_;
  uint64_t host_tier_bytes_ = 0;
};

// "source=/abs/path;rev=<commit>;dtype=BF16;tp=0/1;tag=x": two specs with the same key share
// one copy.
std::string canonical_key(const ModelSpec& spec, const checkpoint::ResolvedSource& source);
std::string short_id(const std::string& key);
// --memory-reserve: "1GiB", "512MiB", "64KiB", "4096" (bytes) or "10%" (of the device) into
// config's memory_reserve_bytes / memory_reserve_fraction (the other one set to 0).
Result<void> parse_memory_reserve(const std::string& text, StoreConfig& config);
// --memory-budget: the same spellings ("8GiB", "512MiB", bytes, "80%" of the device, up to 100%)
// into config's memory_budget_bytes / memory_budget_fraction.
Result<void> parse_memory_budget(const std::string& text, StoreConfig& config);
// --host-budget: bytes as --memory-reserve takes them, or "25%" of the host's memory (MemTotal),
// into config.host_budget_bytes.
Result<void> parse_host_budget(const std::string& text, StoreConfig& config);

}  // namespace companion::server
