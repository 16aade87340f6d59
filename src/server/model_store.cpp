#include "server/model_store.hpp"

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

ModelStore::ModelStore(std::unique_ptr<memory::Backend> backend, StoreConfig config,
                       Listener listener)
    : backend_(std::move(backend)), config_(std::move(config)), listener_(std::move(listener)) {
  size_t threads = config_.load_threads == 0 ? 1 : config_.load_threads;
  for (size_t i = 0; i < threads; ++i) workers_.emplace_back([this] { worker_loop(); });
}

ModelStore::~ModelStore() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stopping_ = true;
    for (auto& [key, e] : entries_)
      if (e->cancel) e->cancel->store(true);
    jobs_.clear();
  }
  jobs_cv_.notify_all();
  for (auto& t : workers_) t.join();
}

void ModelStore::worker_loop() {
  for (;;) {
    std::function<void()> job;
    {
      std::unique_lock<std::mutex> lock(mutex_);
      jobs_cv_.wait(lock, [this] { return stopping_ || !jobs_.empty(); });
      if (stopping_) return;
      job = std::move(jobs_.front());
      jobs_.pop_front();
    }
    job();
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
  std::vector<std::string> roots = config_.model_roots;
  roots.push_back(config_.hf_cache);
  roots = checkpoint::canonical_roots(roots);
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
  for (const auto& [key, e] : entries_) out.push_back(snapshot(*e));
  return out;
}

ModelStatus ModelStore::ensure_loading(const ResolvedModel& model) {
  ModelStatus result;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    auto& slot = entries_[model.key];
    if (!slot) {
      slot = std::make_shared<Entry>();
      slot->model = model;
      slot->id = short_id(model.key);
    }
    Entry& e = *slot;
    if (e.state == ModelState::kLoading || e.state == ModelState::kLoaded) return snapshot(e);
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
  log::info("loading " + model.spec.describe());
  notify(result);
  return result;
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
  auto start = Clock::now();
  // Publishes a result if this load is still the current one.
  auto publish = [&](std::function<void(Entry&)> apply) {
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
    log::warn("load of " + model.spec.describe() + " failed: " + error.to_string());
    publish([&](Entry& e) {
      e.state = ModelState::kError;
      e.error = error;
      e.slab.reset();
      e.tensors.reset();
    });
  };

  std::vector<std::string> roots = config_.model_roots;
  roots.push_back(config_.hf_cache);
  roots = checkpoint::canonical_roots(roots);
  // Every file is opened here, once, beneath the roots; the loader reads these descriptors.
  auto ckpt = checkpoint::open_checkpoint(model.source.path, roots, config_.checkpoint_limits);
  if (!ckpt.ok()) return fail(ckpt.error());
  if (ckpt->tensors.size() > protocol::kMaxTensors)
    return fail(make_error(StatusCode::kInvalidArgument,
                           "checkpoint has " + std::to_string(ckpt->tensors.size()) +
                               " tensors; one model may have at most " +
                               std::to_string(protocol::kMaxTensors)));
  loader::ShardOptions shard;
  shard.tp_size = model.spec.tp_size;
  shard.tp_rank = model.spec.tp_rank;
  if (shard.tp_size > 1) {
    shard.rules = model.spec.shard_rules;
    auto config = read_model_config(*ckpt, roots);
    if (!config.ok()) return fail(config.error());
    shard.config_json = std::move(config).value();
  }
  auto plan = loader::make_load_plan(*ckpt, model.spec.dtype, *backend_, shard);
  if (!plan.ok()) return fail(plan.error());
  if (plan->segment_sizes.size() > protocol::kMaxSegments)
    return fail(make_error(StatusCode::kInvalidArgument,
                           "model needs more segments than one reply carries"));
  auto slab = backend_->allocate(plan->segment_sizes, short_id(model.key));
  if (!slab.ok()) return fail(slab.error());
  publish([&](Entry& e) { e.bytes_total = plan->bytes_to_read; });

  auto progress = [&](uint64_t done, uint64_t total) {
    ModelStatus s;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (entry->generation != generation) return;
      entry->bytes_done = done;
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
  auto loaded = loader::load_into_slab(*plan, **slab, progress, *cancel, load_options);
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

uint32_t ModelStore::total_leases() const {
  std::lock_guard<std::mutex> lock(mutex_);
  uint32_t total = 0;
  for (const auto& [key, e] : entries_) total += e->leases;
  return total;
}

}  // namespace companion::server
