#include "server/model_store.hpp"

#include <algorithm>
#include <cctype>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <optional>

#include "checkpoint/checkpoint.hpp"
#include "common/log.hpp"
#include "common/util.hpp"
#include "loader/loader.hpp"
#include "loader/shard_plan.hpp"
#include "protocol/limits.hpp"

namespace companion::server {

struct ModelStore::Entry {
  ResolvedModel model;
  std::string id;
  ModelState state = ModelState::kReady;
  uint64_t bytes_done = 0;
  uint64_t bytes_total = 0;
  Error error;
  std::shared_ptr<memory::Slab> slab;
  std::shared_ptr<const std::vector<protocol::TensorInfo>> tensors;
  uint32_t leases = 0;
  uint64_t generation = 0;  // new for every load and unload: stale workers must not publish
  std::shared_ptr<std::atomic<bool>> cancel;
  Clock::time_point last_progress{};
  Clock::time_point failed_at{};  // when state became kError: error entries expire
};

// What the store's workers share with its destructor, kept alive by the workers themselves so
// that a worker abandoned at shutdown never reads freed memory.
struct ModelStore::WorkerPool {
  std::mutex mutex;
  std::condition_variable idle_cv;
  std::vector<bool> busy;  // per worker: inside a job
  bool abandoned = false;  // the store is gone: a worker returning from a job touches nothing
  std::atomic<bool> stopping{false};
};

namespace {
// Generations come from one counter, not per entry: an unload erases the entry, and a new entry
// for the same key must not reuse the numbers of the old one, or a lease of the old load would be
// released against the new one.
uint64_t next_generation() {
  static std::atomic<uint64_t> counter{0};
  return counter.fetch_add(1, std::memory_order_relaxed) + 1;
}
// The config.json of a checkpoint directory (for a .safetensors file, the one beside it), which
// names the architecture for shard presets. nullopt when there is none; like the checkpoint's
// files it is opened beneath the roots and must be a regular file.
Result<std::optional<std::string>> read_model_config(const checkpoint::Checkpoint& ckpt,
                                                     const std::vector<std::string>& roots) {
  constexpr uint64_t kMaxConfigBytes = 16ull << 20;
  return checkpoint::read_checkpoint_side_file(ckpt, "config.json", roots, kMaxConfigBytes);
}

}  // namespace

std::string canonical_key(const ModelSpec& spec, const checkpoint::ResolvedSource& source) {
  // The path is canonical and, for the HF cache, names the snapshot (its commit): the same files
  // asked for by id or by path share one key.
  std::string key = "source=" + source.path;
  key += ";dtype=";
  key += spec.dtype ? dtype_name(*spec.dtype) : "stored";
  key += ";tp=" + std::to_string(spec.tp_rank) + "/" + std::to_string(spec.tp_size);
  // Rules change what a shard holds (they are ignored when tp_size is 1). In canonical spelling,
  // with '%' and ';' escaped so that no tag can pass for a rule.
  if (spec.tp_size > 1 && !spec.shard_rules.empty()) {
    auto rules = loader::parse_shard_rules(spec.shard_rules);
    std::string text = rules.ok() ? loader::format_shard_rules(*rules) : spec.shard_rules;
    if (!text.empty()) {
      key += ";rules=";
      for (char c : text) {
        if (c == '%')
          key += "%25";
        else if (c == ';')
          key += "%3B";
        else
          key += c;
      }
    }
  }
  if (!spec.tag.empty()) key += ";tag=" + spec.tag;
  return key;
}

std::string short_id(const std::string& key) {
  return hex64(fnv1a64(key)).substr(0, 12);
}

Result<void> parse_memory_reserve(const std::string& text, StoreConfig& config) {
  auto bad = [&] {
    return make_error(
        StatusCode::kInvalidArgument,
        "--memory-reserve takes bytes (1GiB, 512MiB, 4096) or a share (10%), not '" + text + "'");
  };
  size_t digits = 0;
  while (digits < text.size() &&
         (std::isdigit(static_cast<unsigned char>(text[digits])) || text[digits] == '.'))
    ++digits;
  if (digits == 0 || digits > 20) return bad();
  double number = 0;
  try {
    size_t used = 0;
    number = std::stod(text.substr(0, digits), &used);
    if (used != digits) return bad();  // "1.5.3"
  } catch (...) {
    return bad();
  }
  std::string unit = text.substr(digits);
  if (unit == "%") {
    if (number >= 100) return bad();
    config.memory_reserve_fraction = number / 100.0;
    config.memory_reserve_bytes = 0;
    return ok_result();
  }
  static const struct {
    const char* name;
    double scale;
  } kUnits[] = {{"", 1.0},
                {"B", 1.0},
                {"KiB", 1024.0},
                {"MiB", 1048576.0},
                {"GiB", 1073741824.0},
                {"TiB", 1099511627776.0}};
  for (const auto& u : kUnits) {
    if (unit != u.name) continue;
    double bytes = number * u.scale;
    if (bytes >= 9.0e18) return bad();
    config.memory_reserve_bytes = static_cast<uint64_t>(bytes);
    config.memory_reserve_fraction = 0.0;
    return ok_result();
  }
  return bad();
}

Result<void> StoreConfig::validate() const {
  auto bad = [](const std::string& what) { return make_error(StatusCode::kInvalidArgument, what); };
  if (max_models == 0) return bad("--max-models must be at least 1");
  if (max_variants_per_source == 0) return bad("--max-variants-per-source must be at least 1");
  if (max_error_entries == 0) return bad("--max-error-entries must be at least 1");
  if (max_models + max_error_entries > protocol::kMaxListedModels)
    return bad("--max-models plus --max-error-entries must be at most " +
               std::to_string(protocol::kMaxListedModels) + " (a list of them must fit one reply)");
  if (error_ttl.count() <= 0) return bad("--error-ttl must be positive");
  if (!(memory_reserve_fraction >= 0.0 && memory_reserve_fraction < 1.0))
    return bad("--memory-reserve as a fraction must be in [0%, 100%)");
  if (shutdown_timeout.count() < 0) return bad("the shutdown timeout must not be negative");
  return ok_result();
}

ModelStore::ModelStore(std::unique_ptr<memory::Backend> backend, StoreConfig config,
                       Listener listener)
    : backend_(std::move(backend)),
      config_(std::move(config)),
      listener_(std::move(listener)),
      pool_(std::make_shared<WorkerPool>()) {
  // Resolved once: a root whose path is changed later (a parent renamed, a symlink put in its
  // place) keeps meaning the directory it was at start, and a root missing at start (an HF cache
  // made later by whoever can write its parent) is never a root.
  std::vector<std::string> roots = config_.model_roots;
  roots.push_back(config_.hf_cache);
  roots_ = checkpoint::canonical_roots(roots);
  size_t threads = config_.load_threads == 0 ? 1 : config_.load_threads;
  pool_->busy.assign(threads, false);
  for (size_t i = 0; i < threads; ++i)
    workers_.emplace_back([this, pool = pool_, i] { worker_loop(pool, i); });
}

ModelStore::~ModelStore() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stopping_ = true;
    pool_->stopping = true;
    for (auto& [key, e] : entries_)
      if (e->cancel) e->cancel->store(true);
    jobs_.clear();
  }
  jobs_cv_.notify_all();
  std::vector<bool> stuck;
  {
    std::unique_lock<std::mutex> lock(pool_->mutex);
    auto all_idle = [this] {
      return std::none_of(pool_->busy.begin(), pool_->busy.end(), [](bool b) { return b; });
    };
    if (!pool_->idle_cv.wait_for(lock, config_.shutdown_timeout, all_idle)) {
      pool_->abandoned = true;
      stuck = pool_->busy;
    }
  }
  for (size_t i = 0; i < workers_.size(); ++i) {
    if (i < stuck.size() && stuck[i]) {
      // Joining could wait for ever (a read on a hung file system); the process must still stop.
      log::warn("a load is stuck after " + std::to_string(config_.shutdown_timeout.count()) +
                " ms of shutdown; leaving its thread behind");
      workers_[i].detach();
    } else {
      workers_[i].join();
    }
  }
}

void ModelStore::worker_loop(std::shared_ptr<WorkerPool> pool, size_t index) {
  for (;;) {
    std::function<void()> job;
    {
      std::unique_lock<std::mutex> lock(mutex_);
      jobs_cv_.wait(lock, [this] { return stopping_ || !jobs_.empty(); });
      if (stopping_) return;
      job = std::move(jobs_.front());
      jobs_.pop_front();
      // Marked busy under mutex_: once the destructor has set stopping_, it sees every job taken.
      std::lock_guard<std::mutex> pool_lock(pool->mutex);
      pool->busy[index] = true;
    }
    job();
    job = nullptr;
    {
      std::lock_guard<std::mutex> pool_lock(pool->mutex);
      if (pool->abandoned) return;  // the store is gone: touch none of it
      pool->busy[index] = false;
    }
    pool->idle_cv.notify_all();
  }
}

void ModelStore::notify(const ModelStatus& status) {
  if (listener_) listener_(status);
}

ModelStatus ModelStore::snapshot(const Entry& e) const {
  ModelStatus s;
  s.key = e.model.key;
  s.id = e.id;
  s.source = e.model.spec.source;
  s.state = e.state;
  s.bytes_done = e.bytes_done;
  s.bytes_total = e.bytes_total;
  if (e.state == ModelState::kError) {
    s.error_code = e.error.code;
    s.message = e.error.message;
  }
  s.tensors = e.tensors ? static_cast<uint32_t>(e.tensors->size()) : 0;
  s.leases = e.leases;
  s.backend = backend_->name();
  s.slab_bytes = e.slab ? e.slab->total_bytes() : 0;
  s.seq = ++seq_;  // always under mutex_
  return s;
}

Result<ResolvedModel> ModelStore::resolve(const ModelSpec& spec) const {
  COMPANION_TRY(spec.validate());
  const std::vector<std::string>& roots = roots_;
  COMPANION_ASSIGN_OR_RETURN(checkpoint::ResolvedSource source,
                             checkpoint::resolve_source(spec, config_.hf_cache, roots));
  if (!checkpoint::is_under_roots(source.path, roots))
    return make_error(StatusCode::kNotPermitted,
                      source.path + " is outside the server's model roots");
  ResolvedModel model{spec, source, {}};
  model.key = canonical_key(spec, source);
  return model;
}

ModelStatus ModelStore::status(const std::string& key) const {
  std::lock_guard<std::mutex> lock(mutex_);
  auto it = entries_.find(key);
  if (it != entries_.end()) return snapshot(*it->second);
  ModelStatus s;
  s.key = key;
  s.id = short_id(key);
  s.state = ModelState::kReady;
  s.backend = backend_->name();
  s.seq = ++seq_;
  return s;
}

std::vector<ModelStatus> ModelStore::list() const {
  std::lock_guard<std::mutex> lock(mutex_);
  std::vector<ModelStatus> out;
  auto now = Clock::now();
  for (const auto& [key, e] : entries_) {
    // Expired failures are dropped at the next load; they are not shown meanwhile.
    if (e->state == ModelState::kError && now - e->failed_at >= config_.error_ttl) continue;
    out.push_back(snapshot(*e));
  }
  return out;
}

void ModelStore::trim_errors_locked(std::vector<ModelStatus>& gone) {
  auto drop = [&](std::map<std::string, std::shared_ptr<Entry>>::iterator it, const char* why) {
    refusals_[why]++;
    Entry& e = *it->second;
    e.generation = next_generation();
    e.state = ModelState::kUnloaded;
    gone.push_back(snapshot(e));
    entries_.erase(it);
  };
  auto now = Clock::now();
  size_t errors = 0;
  for (auto it = entries_.begin(); it != entries_.end();) {
    auto next = std::next(it);
    if (it->second->state == ModelState::kError) {
      if (now - it->second->failed_at >= config_.error_ttl)
        drop(it, "errors_expired");
      else
        ++errors;
    }
    it = next;
  }
  while (errors > config_.max_error_entries) {
    auto oldest = entries_.end();
    for (auto it = entries_.begin(); it != entries_.end(); ++it)
      if (it->second->state == ModelState::kError &&
          (oldest == entries_.end() || it->second->failed_at < oldest->second->failed_at))
        oldest = it;
    drop(oldest, "error_entries");
    --errors;
  }
}

Result<ModelStatus> ModelStore::ensure_loading(const ResolvedModel& model) {
  ModelStatus result;
  std::vector<ModelStatus> gone;
  auto notify_gone = [&] {
    for (const auto& s : gone) notify(s);
  };
  auto refuse = [&](const char* limit, StatusCode code, const std::string& why) {
    refusals_[limit]++;
    return make_error(code, why);
  };
  {
    std::unique_lock<std::mutex> lock(mutex_);
    trim_errors_locked(gone);
    auto it = entries_.find(model.key);
    bool active = it != entries_.end() && (it->second->state == ModelState::kLoading ||
                                           it->second->state == ModelState::kLoaded);
    if (active) {
      result = snapshot(*it->second);
      lock.unlock();
      notify_gone();
      return result;
    }
    // A new load, or a retry of a failed one: within the limits?
    Result<void> allowed = ok_result();
    if (model.key.size() > protocol::kMaxStringBytes) {
      allowed =
          refuse("key_length", StatusCode::kInvalidArgument,
                 "the model's key is " + std::to_string(model.key.size()) + " bytes; at most " +
                     std::to_string(protocol::kMaxStringBytes) + " are allowed");
    } else {
      size_t held = 0;
      size_t variants = 0;
      for (const auto& [key, e] : entries_) {
        if (e->state != ModelState::kLoading && e->state != ModelState::kLoaded) continue;
        ++held;
        if (e->model.source.path == model.source.path) ++variants;
      }
      if (held >= config_.max_models)
        allowed = refuse("models", StatusCode::kLimitExceeded,
                         "the server holds " + std::to_string(held) +
                             " models (loaded or loading), its limit (--max-models " +
                             std::to_string(config_.max_models) + "); unload one first");
      else if (variants >= config_.max_variants_per_source)
        allowed =
            refuse("variants_per_source", StatusCode::kLimitExceeded,
                   model.source.path + " is held in " + std::to_string(variants) +
                       " variants (dtype, shard, tag), its limit "
                       "(--max-variants-per-source " +
                       std::to_string(config_.max_variants_per_source) + "); unload one first");
    }
    if (!allowed.ok()) {
      lock.unlock();
      notify_gone();
      log::warn("refused to load " + model.spec.describe() + ": " + allowed.error().message);
      return allowed.error();
    }
    auto& slot = entries_[model.key];
    if (!slot) {
      slot = std::make_shared<Entry>();
      slot->model = model;
      slot->id = short_id(model.key);
    }
    Entry& e = *slot;
    e.state = ModelState::kLoading;
    e.bytes_done = 0;
    e.bytes_total = 0;
    e.error = Error{};
    e.generation = next_generation();
    e.cancel = std::make_shared<std::atomic<bool>>(false);
    std::shared_ptr<Entry> entry = slot;
    uint64_t generation = e.generation;
    jobs_.push_back([this, entry, generation] { run_load(entry, generation); });
    jobs_cv_.notify_one();
    result = snapshot(e);
  }
  notify_gone();
  log::info("loading " + model.spec.describe());
  notify(result);
  return result;
}

Result<void> ModelStore::admit(uint64_t bytes, const ResolvedModel& model) {
  auto device = backend_->available_bytes();
  std::lock_guard<std::mutex> lock(mutex_);
  if (!device.ok()) {  // the backend cannot tell: count the bytes, admit unchecked
    admitted_bytes_ += bytes;
    return ok_result();
  }
  uint64_t reserve = std::max(
      config_.memory_reserve_bytes,
      static_cast<uint64_t>(config_.memory_reserve_fraction * static_cast<double>(device->total)));
  uint64_t taken = reserve + admitted_bytes_;
  uint64_t room = device->available > taken ? device->available - taken : 0;
  if (bytes > room) {
    refusals_["memory"]++;
    uint64_t resident = 0;
    for (const auto& [key, e] : entries_)
      if (e->slab) resident += e->slab->total_bytes();
    return make_error(StatusCode::kOutOfMemory,
                      model.spec.describe() + " needs " + format_bytes(bytes) + "; " +
                          backend_->name() + " has " + format_bytes(device->available) +
                          " available of " + format_bytes(device->total) + ", less " +
                          format_bytes(reserve) + " reserve (--memory-reserve) and " +
                          format_bytes(admitted_bytes_) +
                          " admitted to loads in flight: " + format_bytes(room) +
                          " left (models resident: " + format_bytes(resident) + ")");
  }
  admitted_bytes_ += bytes;
  return ok_result();
}

void ModelStore::run_load(std::shared_ptr<Entry> entry, uint64_t generation) {
  std::shared_ptr<std::atomic<bool>> cancel;
  ResolvedModel model;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (entry->generation != generation) return;
    cancel = entry->cancel;
    model = entry->model;
  }
  // Taken while the store is certainly alive (the job started before any shutdown).
  std::shared_ptr<WorkerPool> pool = pool_;
  auto start = Clock::now();
  // Publishes a result if this load is still the current one. A cancelled load (unloaded, or
  // the store shutting down) touches the store no more.
  auto publish = [&](std::function<void(Entry&)> apply) {
    if (cancel->load()) return;
    ModelStatus s;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (entry->generation != generation) return;
      apply(*entry);
      s = snapshot(*entry);
    }
    notify(s);
  };
  auto fail = [&](const Error& error) {
    if (cancel->load()) return;
    log::warn("load of " + model.spec.describe() + " failed: " + error.to_string());
    Error shown = error;
    if (shown.message.size() > protocol::kMaxStatusMessageBytes)
      shown.message =
          std::string(utf8_prefix(shown.message, protocol::kMaxStatusMessageBytes - 3)) + "...";
    std::vector<ModelStatus> gone;
    publish([&](Entry& e) {
      e.state = ModelState::kError;
      e.error = shown;
      e.failed_at = Clock::now();
      e.slab.reset();
      e.tensors.reset();
      trim_errors_locked(gone);
    });
    for (const auto& s : gone) notify(s);
  };

  const std::vector<std::string>& roots = roots_;
  // Every file is opened here, once, beneath the roots; the loader reads these descriptors.
  auto ckpt = checkpoint::open_checkpoint(model.source.path, roots, config_.checkpoint_limits);
  if (!ckpt.ok()) return fail(ckpt.error());
  if (ckpt->tensors.size() > protocol::kMaxTensors)
    return fail(make_error(StatusCode::kInvalidArgument,
                           "checkpoint has " + std::to_string(ckpt->tensors.size()) +
                               " tensors; one model may have at most " +
                               std::to_string(protocol::kMaxTensors)));
  if (cancel->load()) return;  // opening can block; the store may be gone since
  loader::ShardOptions shard;
  shard.tp_size = model.spec.tp_size;
  shard.tp_rank = model.spec.tp_rank;
  if (shard.tp_size > 1) {
    shard.rules = model.spec.shard_rules;
    auto config = read_model_config(*ckpt, roots);
    if (!config.ok()) return fail(config.error());
    shard.config_json = std::move(config).value();
  }
  if (cancel->load()) return;
  auto plan = loader::make_load_plan(*ckpt, model.spec.dtype, *backend_, shard);
  if (!plan.ok()) return fail(plan.error());
  if (plan->segment_sizes.size() > protocol::kMaxSegments)
    return fail(make_error(StatusCode::kInvalidArgument,
                           "model needs more segments than one reply carries"));
  uint64_t slab_bytes = 0;
  for (uint64_t size : plan->segment_sizes) slab_bytes += size;
  if (auto admitted = admit(slab_bytes, model); !admitted.ok()) return fail(admitted.error());
  // The bytes of this load that the device does not show as taken yet. They shrink as the
  // memory becomes resident (at allocation on GPUs, as it is written on the host), so that a
  // load is never counted twice; what is left goes when the load ends, however it ends, but not
  // once the store is gone.
  struct Admission {
    ModelStore* store;
    WorkerPool* pool;
    uint64_t outstanding;
    void settle_locked(uint64_t now_outstanding) {
      if (now_outstanding >= outstanding) return;
      store->admitted_bytes_ -= std::min(outstanding - now_outstanding, store->admitted_bytes_);
      outstanding = now_outstanding;
    }
    ~Admission() {
      if (pool->stopping) return;
      std::lock_guard<std::mutex> lock(store->mutex_);
      settle_locked(0);
    }
  } admission{this, pool.get(), slab_bytes};
  auto slab = backend_->allocate(plan->segment_sizes, short_id(model.key));
  if (!slab.ok()) return fail(slab.error());
  if (backend_->allocation_is_resident()) {
    std::lock_guard<std::mutex> lock(mutex_);
    admission.settle_locked(0);
  }
  publish([&](Entry& e) { e.bytes_total = plan->bytes_to_read; });

  auto progress = [&](uint64_t done, uint64_t total) {
    if (cancel->load()) return;
    ModelStatus s;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (entry->generation != generation) return;
      entry->bytes_done = done;
      if (total > 0 && done <= total)
        admission.settle_locked(static_cast<uint64_t>(static_cast<double>(slab_bytes) *
                                                      static_cast<double>(total - done) /
                                                      static_cast<double>(total)));
      auto now = Clock::now();
      // Status streams get at most ~10 progress events a second per model.
      if (done != total && now - entry->last_progress < std::chrono::milliseconds(100)) return;
      entry->last_progress = now;
      s = snapshot(*entry);
    }
    notify(s);
  };
  loader::LoadOptions load_options;
  load_options.direct_io = config_.direct_io;
  load_options.read_source = config_.read_source;
  auto loaded = loader::load_into_slab(*plan, **slab, progress, *cancel, load_options);
  if (cancel->load()) return;  // reads can block; the store may be gone since
  if (!loaded.ok()) {
    if (loaded.error().code == StatusCode::kCancelled) return;  // unload already published
    return fail(loaded.error());
  }
  auto sealed = (*slab)->seal();
  if (!sealed.ok()) return fail(sealed.error());

  auto table = std::make_shared<std::vector<protocol::TensorInfo>>();
  table->reserve(plan->tensors.size());
  for (const auto& t : plan->tensors) {
    protocol::TensorInfo info;
    info.name = t.source.name;
    info.dtype = t.target_dtype;
    info.shape = t.target_shape;
    info.strides.resize(info.shape.size());
    int64_t stride = 1;
    for (size_t d = info.shape.size(); d-- > 0;) {
      info.strides[d] = stride;
      stride *= info.shape[d];
    }
    info.segment = t.placement.segment;
    info.offset = t.placement.offset;
    info.nbytes = t.target_bytes;
    table->push_back(std::move(info));
  }
  std::shared_ptr<memory::Slab> shared_slab(std::move(*slab));
  double secs = std::chrono::duration<double>(Clock::now() - start).count();
  log::info("loaded " + model.spec.describe() + ": " + std::to_string(table->size()) +
            " tensors, " + format_bytes(plan->bytes_to_read) + " in " + std::to_string(secs) +
            " s");
  publish([&](Entry& e) {
    e.state = ModelState::kLoaded;
    e.bytes_done = e.bytes_total;
    e.slab = shared_slab;
    e.tensors = table;
  });
}

Result<LeaseGrant> ModelStore::acquire(const std::string& key) {
  LeaseGrant grant;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = entries_.find(key);
    if (it == entries_.end() || it->second->state != ModelState::kLoaded)
      return make_error(StatusCode::kNotReady, "model is not loaded");
    Entry& e = *it->second;
    COMPANION_ASSIGN_OR_RETURN(grant.exports, e.slab->export_segments());
    e.leases++;
    grant.status = snapshot(e);
    grant.slab = e.slab;
    grant.tensors = e.tensors;
    grant.generation = e.generation;
  }
  return grant;
}

void ModelStore::release(const std::string& key, uint64_t generation) {
  std::lock_guard<std::mutex> lock(mutex_);
  auto it = entries_.find(key);
  if (it == entries_.end() || it->second->generation != generation) return;
  if (it->second->leases > 0) it->second->leases--;
}

ModelStore::Entry* ModelStore::find_locked(const std::string& key_or_id) {
  auto it = entries_.find(key_or_id);
  if (it != entries_.end()) return it->second.get();
  for (auto& [key, e] : entries_)
    if (e->id == key_or_id) return e.get();
  return nullptr;
}

Result<ModelStatus> ModelStore::unload(const std::string& key_or_id, bool force) {
  ModelStatus s;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    Entry* e = find_locked(key_or_id);
    if (e == nullptr)
      return make_error(StatusCode::kNotFound, "no model " + key_or_id + " on this server");
    if (e->state == ModelState::kLoaded && e->leases > 0 && !force)
      return make_error(StatusCode::kModelInUse,
                        std::to_string(e->leases) +
                            " client lease(s) hold the model; unload with force to drop it anyway "
                            "(clients keep their mappings)");
    if (e->cancel) e->cancel->store(true);
    e->generation = next_generation();
    e->state = ModelState::kUnloaded;
    e->slab.reset();  // leases still holding it keep the memory alive
    e->tensors.reset();
    s = snapshot(*e);
    std::string key = e->model.key;  // e dies with the erase
    entries_.erase(key);
  }
  log::info("unloaded " + s.key);
  notify(s);
  return s;
}

uint64_t ModelStore::slab_bytes() const {
  std::lock_guard<std::mutex> lock(mutex_);
  uint64_t total = 0;
  for (const auto& [key, e] : entries_)
    if (e->slab) total += e->slab->total_bytes();
  return total;
}

uint64_t ModelStore::admitted_bytes() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return admitted_bytes_;
}

std::map<std::string, uint64_t> ModelStore::refusal_counts() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return refusals_;
}

uint32_t ModelStore::total_leases() const {
  std::lock_guard<std::mutex> lock(mutex_);
  uint32_t total = 0;
  for (const auto& [key, e] : entries_) total += e->leases;
  return total;
}

}  // namespace companion::server
