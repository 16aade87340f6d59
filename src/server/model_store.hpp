// The server's models: resolution of specs to keys, single-flight loads on worker threads, the
// state machine (ready → loading → loaded | error, unloaded), and lease counting.
#pragma once

#include <atomic>
#include <condition_variable>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "checkpoint/source.hpp"
#include "companion/types.hpp"
#include "loader/loader.hpp"
#include "memory/backend.hpp"
#include "protocol/messages.hpp"

namespace companion::server {

struct StoreConfig {
  std::vector<std::string> model_roots;  // canonical; the only places checkpoints are read from
  std::string hf_cache;                  // Hugging Face hub cache (also readable)
  size_t load_threads = 2;               // models loading at the same time
  loader::DirectIo direct_io = loader::DirectIo::kAuto;  // O_DIRECT reads (cold starts)
  checkpoint::CheckpointLimits checkpoint_limits;        // header bytes, tensors, files
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
  ModelStatus status;
  std::shared_ptr<memory::Slab> slab;
  std::shared_ptr<const std::vector<protocol::TensorInfo>> tensors;
  std::vector<memory::SegmentExport> exports;
  uint64_t generation = 0;  // which load of the key this lease pins
};

class ModelStore {
 public:
  // Called after every state change, from whichever thread made it (a worker or the caller).
  using Listener = std::function<void(const ModelStatus&)>;

  ModelStore(std::unique_ptr<memory::Backend> backend, StoreConfig config, Listener listener);
  ~ModelStore();  // cancels loads and joins the workers

  const memory::Backend& backend() const { return *backend_; }

  // Validates the spec and resolves its source (never reads outside the roots).
  Result<ResolvedModel> resolve(const ModelSpec& spec) const;
  // Current status of a key; kReady for a model the store does not hold.
  ModelStatus status(const std::string& key) const;
  std::vector<ModelStatus> list() const;
  // Starts a load unless the model is loaded or loading (one load however many ask). An errored
  // or unloaded model is loaded again. Returns the status after the call.
  ModelStatus ensure_loading(const ResolvedModel& model);
  // For a loaded model: counts a lease and exports its segments.
  Result<LeaseGrant> acquire(const std::string& key);
  void release(const std::string& key, uint64_t generation);
  // key may be the full key or the short id. Loaded with leases and !force: kModelInUse.
  // Loading: the load is cancelled. Returns the final status (state kUnloaded).
  Result<ModelStatus> unload(const std::string& key_or_id, bool force);
  uint64_t slab_bytes() const;
  uint32_t total_leases() const;

 private:
  struct Entry;
  ModelStatus snapshot(const Entry& e) const;
  void run_load(std::shared_ptr<Entry> entry, uint64_t generation);
  void worker_loop();
  void notify(const ModelStatus& status);
  Entry* find_locked(const std::string& key_or_id);

  std::unique_ptr<memory::Backend> backend_;
  StoreConfig config_;
  Listener listener_;

  mutable std::mutex mutex_;
  mutable uint64_t seq_ = 0;  // orders every snapshot handed out
  std::map<std::string, std::shared_ptr<Entry>> entries_;
  std::deque<std::function<void()>> jobs_;
  std::condition_variable jobs_cv_;
  bool stopping_ = false;
  std::vector<std::thread> workers_;
};

// "source=/abs/path;rev=<commit>;dtype=BF16;tp=0/1;tag=x": two specs with the same key share
// one copy.
std::string canonical_key(const ModelSpec& spec, const checkpoint::ResolvedSource& source);
std::string short_id(const std::string& key);

}  // namespace companion::server
