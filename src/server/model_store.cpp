#include "server/model_store.hpp"
#include "server/store_entry.hpp"

#include <algorithm>
#include <cctype>
#include <charconv>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <new>
#include <optional>
#include <set>

#include <sys/stat.h>

#include "checkpoint/checkpoint.hpp"
#include "common/fault_point.hpp"
#include "common/log.hpp"
#include "common/util.hpp"
#include "loader/loader.hpp"
#include "loader/shard_plan.hpp"
#include "memory/host_backend.hpp"
#include "protocol/limits.hpp"

namespace companion::server {

namespace {
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
    auto rules = parse_shard_rules(spec.shard_rules);
    std::string text = rules.ok() ? format_shard_rules(*rules) : spec.shard_rules;
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

// Generations come from one counter, not per entry: an unload erases the entry, and a new entry
// for the same key must not reuse the numbers of the old one, or a lease of the old load would be
// released against the new one.
Result<std::shared_ptr<const protocol::SharedTensorTable>> make_shared_table(
    const protocol::TensorTableBuilder& builder, const memory::Slab& slab) {
  COMPANION_ASSIGN_OR_RETURN(std::vector<uint8_t> bytes, builder.serialize());
  std::vector<uint64_t> sizes(slab.segment_count());
  for (size_t i = 0; i < sizes.size(); ++i) sizes[i] = slab.segment_size(i);
  return protocol::SharedTensorTable::create(bytes, sizes);
}

uint64_t next_generation() {
  static std::atomic<uint64_t> counter{0};
  return counter.fetch_add(1, std::memory_order_relaxed) + 1;
}

std::string published_store_key(const std::string& key) {
  return "published=" + key;
}

// What identifies the files a load read: device, inode, size and modification time of each.
static std::string file_identity(const checkpoint::Checkpoint& ckpt) {
  std::string out;
  for (const auto& fd : ckpt.fds) {
    struct stat st {};
    if (!fd || ::fstat(fd->get(), &st) != 0) {
      out += "?;";
      continue;
    }
    out += std::to_string(st.st_dev) + ":" + std::to_string(st.st_ino) + ":" +
           std::to_string(st.st_size) + ":" + std::to_string(st.st_mtim.tv_sec) + "." +
           std::to_string(st.st_mtim.tv_nsec) + ";";
  }
  return out;
}

std::string short_id(const std::string& key) {
  return hex64(fnv1a64(key)).substr(0, 12);
}

namespace {
// "1GiB", "512MiB", "64KiB", "4096" (bytes) into `bytes`, or "10%" into `fraction` (the other one
// set to 0); a share of 100% only when `whole` allows it.
Result<void> parse_bytes_or_share(const std::string& text, const char* flag, bool whole,
                                  uint64_t& out_bytes, double& out_fraction) {
  auto bad = [&] {
    return make_error(StatusCode::kInvalidArgument,
                      std::string(flag) +
                          " takes bytes (1GiB, 512MiB, 4096) or a share (10%), not '" + text + "'");
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
    if (number > 100 || (number == 100 && !whole)) return bad();
    out_fraction = number / 100.0;
    out_bytes = 0;
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
    out_bytes = static_cast<uint64_t>(bytes);
    out_fraction = 0.0;
    return ok_result();
  }
  return bad();
}
}  // namespace

Result<void> parse_memory_reserve(const std::string& text, StoreConfig& config) {
  return parse_bytes_or_share(text, "--memory-reserve", false, config.memory_reserve_bytes,
                              config.memory_reserve_fraction);
}

Result<void> parse_memory_budget(const std::string& text, StoreConfig& config) {
  COMPANION_TRY(parse_bytes_or_share(text, "--memory-budget", true, config.memory_budget_bytes,
                                     config.memory_budget_fraction));
  if (config.memory_budget_bytes == 0 && config.memory_budget_fraction == 0.0)
    return make_error(StatusCode::kInvalidArgument, "--memory-budget must be more than 0");
  return ok_result();
}

Result<void> StoreConfig::validate() const {
  auto bad = [](const std::string& what) { return make_error(StatusCode::kInvalidArgument, what); };
  if (max_models == 0) return bad("--max-models must be at least 1");
  if (max_variants_per_source == 0) return bad("--max-variants-per-source must be at least 1");
  // A new generation is always built beside the current one: 2 at least.
  if (max_generations < 2 || max_generations > protocol::kMaxGenerationsPerKey)
    return bad("--max-generations must be 2.." + std::to_string(protocol::kMaxGenerationsPerKey));
  if (max_error_entries == 0) return bad("--max-error-entries must be at least 1");
  if (max_models + max_error_entries > protocol::kMaxListedModels)
    return bad("--max-models plus --max-error-entries must be at most " +
               std::to_string(protocol::kMaxListedModels) + " (a list of them must fit one reply)");
  if (error_ttl.count() <= 0) return bad("--error-ttl must be positive");
  if (!(memory_reserve_fraction >= 0.0 && memory_reserve_fraction < 1.0))
    return bad("--memory-reserve as a fraction must be in [0%, 100%)");
  if (!(memory_budget_fraction >= 0.0 && memory_budget_fraction <= 1.0))
    return bad("--memory-budget as a fraction must be in (0%, 100%]");
  if (idle_evict.count() < 0) return bad("--idle-evict must not be negative");
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
  // The budget, fixed at start. By default what is available now less the reserve: the engines
  // that run beside the server keep the reserve, and memory that others hold at start is theirs.
  auto device = backend_->available_bytes();
  if (config_.memory_budget_bytes > 0) {
    budget_ = config_.memory_budget_bytes;
  } else if (!device.ok()) {
    if (config_.memory_budget_fraction > 0)
      log::warn("--memory-budget as a share needs the device's size, which " + backend_->name() +
                " cannot tell: no budget");
  } else if (config_.memory_budget_fraction > 0) {
    budget_ =
        static_cast<uint64_t>(config_.memory_budget_fraction * static_cast<double>(device->total));
  } else {
    uint64_t reserve = std::max(config_.memory_reserve_bytes,
                                static_cast<uint64_t>(config_.memory_reserve_fraction *
                                                      static_cast<double>(device->total)));
    budget_ = device->available > reserve ? device->available - reserve : 0;
    budget_from_available_ = true;
  }
  if (budget_ != UINT64_MAX)
    log::info("memory budget " + format_bytes(budget_) +
              (config_.idle_evict.count() > 0
                   ? ", idle models evicted after " +
                         std::to_string(config_.idle_evict.count() / 1000) + " s"
                   : std::string()));
  if (config_.host_budget_bytes > 0) host_tier_ = memory::make_host_backend();
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
    // The last guard: a job that throws ends that job, never the process. Loads and commits
    // catch their own exceptions first and report them on the model's status; this catches what
    // is left (freeing slabs, pinning staging).
    try {
      job();
    } catch (const std::exception& e) {
      log::error(std::string("a worker job failed: ") + e.what());
    } catch (...) {
      log::error("a worker job failed with an unknown exception");
    }
    try {
      job = nullptr;
    } catch (...) {
      log::error("destroying a worker job failed");
    }
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

void ModelStore::report_load(const LoadReport& report) const {
  if (config_.on_load_end) config_.on_load_end(report);
}

const char* load_kind_name(LoadReport::Kind kind) noexcept {
  switch (kind) {
    case LoadReport::Kind::kLoad:
      return "load";
    case LoadReport::Kind::kReload:
      return "reload";
    case LoadReport::Kind::kWake:
      return "wake";
  }
  return "load";
}

ModelStatus ModelStore::snapshot(const Entry& e) const {
  ModelStatus s;
  s.key = e.published ? e.publish_key : e.model.key;
  s.id = e.id;
  s.source = e.published ? std::string() : e.model.spec.source;
  s.published = e.published;
  s.state = e.state;
  s.bytes_done = e.bytes_done;
  s.bytes_total = e.bytes_total;
  if (e.state == ModelState::kError) {
    s.error_code = e.error.code;
    s.message = e.error.message;
  } else if (e.reload_error) {
    // Still serving the generation it had; the reload that would replace it failed.
    s.error_code = e.reload_error->code;
    s.message = "reload failed: " + e.reload_error->message;
  } else if (e.reloading) {
    s.message = "reloading";
  } else if (!e.reload_note.empty()) {
    s.message = e.reload_note;
  } else if (e.writer) {
    s.message = e.writer->committing ? "committing" : "being published";
  }
  if (const Generation* g = e.current()) {
    s.tensors = g->table ? static_cast<uint32_t>(g->table->size()) : 0;
    s.generation = g->number;
    s.fingerprint = g->fingerprint;
  } else if (e.writer && e.writer->table) {
    s.tensors = static_cast<uint32_t>(e.writer->table->size());
  }
  s.backend = backend_->name();
  for (const Generation& g : e.generations) {
    s.leases += g.leases;
    uint64_t bytes = g.slab ? g.slab->total_bytes() : 0;
    s.slab_bytes += bytes;
    GenerationInfo info;
    info.number = g.number;
    info.leases = g.leases;
    info.slab_bytes = bytes;
    info.digests = g.digests;
    info.fingerprint = g.fingerprint;
    info.created_at_ms = g.created_at_ms;
    info.current = &g == e.current();
    s.generations.push_back(std::move(info));
  }
  if (e.writer && e.writer->slab) s.slab_bytes += e.writer->slab->total_bytes();
  s.last_used_ms = e.last_used_ms;
  s.eviction_rank = eviction_rank_locked(e);
  if (const Generation* g = e.offloaded()) s.host_bytes = g->host_copy->total_bytes();
  s.seq = ++seq_;  // always under mutex_
  return s;
}

namespace {
Result<ResolvedModel> resolve_under(const ModelSpec& spec, const std::string& hf_cache,
                                    const std::vector<std::string>& roots) {
  COMPANION_TRY(spec.validate());
  COMPANION_ASSIGN_OR_RETURN(checkpoint::ResolvedSource source,
                             checkpoint::resolve_source(spec, hf_cache, roots));
  if (!checkpoint::is_under_roots(source.path, roots))
    return make_error(StatusCode::kNotPermitted,
                      source.path + " is outside the server's model roots");
  ResolvedModel model{spec, source, {}};
  model.key = canonical_key(spec, source);
  return model;
}
}  // namespace

Result<ResolvedModel> ModelStore::resolve(const ModelSpec& spec) const {
  return resolve_under(spec, config_.hf_cache, roots_);
}

ModelStore::ResolveFn ModelStore::resolver() const {
  return [hf_cache = config_.hf_cache, roots = roots_](const ModelSpec& spec) {
    return resolve_under(spec, hf_cache, roots);
  };
}

ModelStatus ModelStore::status(const std::string& key) const {
  std::lock_guard<std::mutex> lock(mutex_);
  auto it = entries_.find(key);
  if (it != entries_.end()) return snapshot(*it->second);
  ModelStatus s;
  s.key = key;
  s.id = short_id(key);
  if (key.rfind(published_store_key(""), 0) == 0) {  // a published key nobody holds
    s.key = key.substr(published_store_key("").size());
    s.published = true;
  }
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
        // Offloaded models count too (they are held, in host memory); this one does not.
        if (e->state != ModelState::kLoading && e->state != ModelState::kLoaded &&
            (e->offloaded() == nullptr || key == model.key))
          continue;
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
    if (e.offloaded() != nullptr) {
      // Offloaded: its bytes come back from the host tier, not from the files.
      start_wake_locked(slot);
      result = snapshot(e);
      lock.unlock();
      notify_gone();
      log::info("waking " + model.spec.describe() + " from the host tier");
      notify(result);
      return result;
    }
    e.state = ModelState::kLoading;
    e.bytes_done = 0;
    e.bytes_total = 0;
    e.error = Error{};
    e.generation = next_generation();
    e.cancel = std::make_shared<std::atomic<bool>>(false);
    std::shared_ptr<Entry> entry = slot;
    uint64_t generation = e.generation;
    jobs_.push_back([this, entry, generation] { load_job(entry, generation, false, false); });
    jobs_cv_.notify_one();
    result = snapshot(e);
  }
  notify_gone();
  log::info("loading " + model.spec.describe());
  notify(result);
  return result;
}

uint64_t ModelStore::held_bytes_locked() const {
  uint64_t total = 0;
  for (const auto& [key, e] : entries_) total += e->device_bytes(/*with_writer=*/true);
  return total;
}

bool ModelStore::evictable_locked(const Entry& e) const {
  // Published models are never evicted: their bytes exist nowhere else to be read again.
  if (e.published || e.state != ModelState::kLoaded || e.reloading || e.writer || e.offloading ||
      e.generations.empty() || waiter_holds_.count(e.model.key) != 0)
    return false;
  return std::none_of(e.generations.begin(), e.generations.end(),
                      [](const Generation& g) { return g.leases > 0; });
}

std::vector<ModelStore::Entry*> ModelStore::eviction_order_locked() const {
  std::vector<Entry*> order;
  for (const auto& [key, e] : entries_)
    if (evictable_locked(*e)) order.push_back(e.get());
  std::stable_sort(order.begin(), order.end(),
                   [](const Entry* a, const Entry* b) { return a->last_used < b->last_used; });
  return order;
}

uint32_t ModelStore::eviction_rank_locked(const Entry& e) const {
  if (!evictable_locked(e)) return 0;
  // Its place in eviction_order_locked() without sorting: the evictable models used before it,
  // and those used at the same time whose keys come first (the sort is stable, in key order).
  uint32_t rank = 1;
  bool before = true;
  for (const auto& [key, other] : entries_) {
    if (other.get() == &e) {
      before = false;
      continue;
    }
    if ((other->last_used < e.last_used || (before && other->last_used == e.last_used)) &&
        evictable_locked(*other))
      ++rank;
  }
  return rank;
}

ModelStatus ModelStore::evict_locked(Entry& e, const std::string& why,
                                     std::vector<std::shared_ptr<memory::Slab>>& freed) {
  const uint64_t bytes = e.device_bytes(/*with_writer=*/false);
  for (auto& g : e.generations) freed.push_back(std::move(g.slab));
  e.generations.clear();
  e.generation = next_generation();
  e.state = ModelState::kUnloaded;
  ModelStatus s = snapshot(e);
  s.message = "evicted: " + why;
  if (s.message.size() > protocol::kMaxStatusMessageBytes)
    s.message = std::string(utf8_prefix(s.message, protocol::kMaxStatusMessageBytes - 3)) + "...";
  ++evictions_;
  log::info("evicted " + printable_text(e.model.spec.describe()) + " (" + format_bytes(bytes) +
            "): " + why);
  entries_.erase(e.model.key);  // e dies here
  return s;
}

std::optional<ModelStore::StartedOffload> ModelStore::start_eviction_locked(
    Entry& e, const std::string& why, std::vector<ModelStatus>& gone,
    std::vector<std::shared_ptr<memory::Slab>>& freed, std::vector<ModelStatus>& evicted,
    bool keep_in_host_tier) {
  std::string dropped_because = why;
  if (host_tier_ && (!keep_in_host_tier || e.host_copy_failed)) {
    dropped_because += "; not kept in the host tier: its copy there failed before";
  } else if (host_tier_) {
    auto started = start_offload_locked(e, false, why, gone);
    if (started.ok()) return std::move(*started);
    dropped_because += "; not kept in the host tier: " + started.error().message;
  }
  evicted.push_back(evict_locked(e, dropped_because, freed));
  return std::nullopt;
}

void ModelStore::evict_idle(Clock::time_point now) {
  if (config_.idle_evict.count() <= 0) return;
  std::vector<ModelStatus> gone;
  std::vector<ModelStatus> evicted;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    std::vector<std::shared_ptr<memory::Slab>> freed;
    for (Entry* e : eviction_order_locked()) {
      if (now - e->last_used < config_.idle_evict) break;  // the rest were used later
      auto idle = std::chrono::duration_cast<std::chrono::seconds>(now - e->last_used);
      const std::string why = "no client held it for " + std::to_string(idle.count()) +
                              " s (--idle-evict " +
                              std::to_string(config_.idle_evict.count() / 1000) + ")";
      auto to_host = start_eviction_locked(*e, why, gone, freed, evicted, true);
      if (!to_host) continue;
      // The copy (gigabytes) runs on a worker: this is the server's event loop. The model is
      // marked offloading meanwhile, so later sweeps leave it alone.
      jobs_.push_back([this, pool = pool_, started = std::move(*to_host)]() mutable {
        if (pool->stopping) return;
        (void)finish_offload(std::move(started));
      });
      jobs_cv_.notify_one();
    }
    retire_locked(std::move(freed));
  }
  for (const auto& s : gone) notify(s);
  for (const auto& s : evicted) notify(s);
}

uint64_t ModelStore::memory_budget() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return budget_;
}

uint64_t ModelStore::budget_used() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return held_bytes_locked() + budget_pending_;
}

uint64_t ModelStore::evictions() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return evictions_;
}

namespace {
// "3f2a1b0c9d8e /models/a (64 MiB, 2 leases)": one model of a refusal's list, bounded.
std::string describe_resident(const std::string& id, const std::string& name, uint64_t bytes,
                              const std::string& note) {
  std::string shown = printable_text(name);
  if (shown.size() > 48) shown = std::string(utf8_prefix(shown, 45)) + "...";
  return id + " " + shown + " (" + format_bytes(bytes) + ", " + note + ")";
}
}  // namespace

Result<void> ModelStore::admit(uint64_t bytes, const std::string& what,
                               const std::string& store_key) {
  // Each round either admits, refuses, or evicts one idle model and looks again: the memory an
  // eviction frees shows on the device only once its slab is gone, so the slab is freed here,
  // on the caller's thread (a load's worker, or a declare), before the next look. Memory that
  // another holder of the slab (a keeper) lets go of later is counted as free once evicted, so
  // that waiting for it never evicts more models.
  uint64_t evicted_bytes = 0;
  std::optional<uint64_t> available_before;  // at the first eviction
  // Models whose copy to the host tier failed during this admission: a failure never fails the
  // admission by itself, and the next look drops such a model instead of copying it again.
  std::set<std::string> offload_failed;
  for (;;) {
    auto device = backend_->available_bytes();
    std::vector<std::shared_ptr<memory::Slab>> freed;
    std::vector<ModelStatus> gone;     // host copies dropped to make room in the host tier
    std::vector<ModelStatus> evicted;  // dropped
    std::optional<StartedOffload> to_host;
    std::string to_host_key;
    uint64_t to_host_bytes = 0;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      uint64_t held = held_bytes_locked();
      uint64_t used = held + budget_pending_;
      bool budget_fits = used <= budget_ && bytes <= budget_ - used;
      uint64_t reserve = 0;
      uint64_t room = UINT64_MAX;
      if (device.ok()) {
        reserve = std::max(config_.memory_reserve_bytes,
                           static_cast<uint64_t>(config_.memory_reserve_fraction *
                                                 static_cast<double>(device->total)));
        uint64_t taken = reserve + admitted_bytes_;
        room = device->available > taken ? device->available - taken : 0;
        if (available_before) {
          uint64_t shown =
              device->available > *available_before ? device->available - *available_before : 0;
          room += evicted_bytes > shown ? evicted_bytes - shown : 0;
        }
      }
      bool device_fits = bytes <= room;
      if (budget_fits && device_fits) {
        admitted_bytes_ += bytes;  // counted even when the backend cannot tell what is available
        budget_pending_ += bytes;
        return ok_result();
      }
      std::vector<Entry*> order = eviction_order_locked();
      uint64_t evictable = 0;
      for (const Entry* e : order) evictable += e->device_bytes(/*with_writer=*/false);
      // Evicting is worth it only when evicting every idle model would make room.
      bool could_fit = bytes <= budget_ && used - std::min(used, evictable) <= budget_ - bytes &&
                       (room == UINT64_MAX || bytes <= room + evictable);
      if (!order.empty() && could_fit) {
        Entry& victim = *order.front();
        if (device.ok() && !available_before) available_before = device->available;
        const uint64_t victim_bytes = victim.device_bytes(/*with_writer=*/false);
        std::string why =
            "to make room for " + printable_text(what) + " (" + format_bytes(bytes) + ": " +
            (budget_fits ? std::string("the device is short")
                         : std::string("the memory budget (--memory-budget) is full")) +
            "); it was the least recently used model that no client held";
        to_host_key = victim.model.key;
        to_host = start_eviction_locked(victim, why, gone, freed, evicted,
                                        offload_failed.count(victim.model.key) == 0);
        if (to_host)
          to_host_bytes = victim_bytes;  // freed only once the copy is done
        else
          evicted_bytes += victim_bytes;
      } else {
        refusals_["memory"]++;
        std::string message = what + " needs " + format_bytes(bytes);
        if (!budget_fits)
          message += "; the memory budget (--memory-budget) is " + format_bytes(budget_) + ": " +
                     format_bytes(held) + " held by models and " + format_bytes(budget_pending_) +
                     " admitted to loads in flight, " +
                     format_bytes(used < budget_ ? budget_ - used : 0) + " left";
        if (!device_fits)
          message += "; " + backend_->name() + " has " + format_bytes(device->available) +
                     " available of " + format_bytes(device->total) + ", less " +
                     format_bytes(reserve) + " reserve (--memory-reserve) and " +
                     format_bytes(admitted_bytes_) +
                     " admitted to loads in flight: " + format_bytes(room) + " left";
        message += order.empty() ? "; no model is idle to evict"
                                 : "; evicting every idle model (" + format_bytes(evictable) +
                                       ") would not make room";
        // What is resident and what holds it, the largest first, bounded.
        struct Row {
          uint64_t bytes;
          std::string text;
        };
        std::vector<Row> rows;
        for (const auto& [key, e] : entries_) {
          if (e->state != ModelState::kLoaded && e->state != ModelState::kLoading) continue;
          if (key == store_key) continue;  // the one asking
          const uint64_t b = e->device_bytes(/*with_writer=*/true);
          uint32_t leases = 0;
          for (const auto& g : e->generations) leases += g.leases;
          std::string note = leases > 0 ? std::to_string(leases) + " lease(s)"
                             : e->state == ModelState::kLoading ? "loading"
                             : waiter_holds_.count(key) != 0    ? "a client is waiting for it"
                             : e->writer                        ? "being written"
                             : e->reloading                     ? "reloading"
                             : e->published                     ? "published, not evicted"
                                                                : "idle";
          rows.push_back(
              {b, describe_resident(e->id, e->published ? e->publish_key : e->model.spec.source, b,
                                    note)});
        }
        std::stable_sort(rows.begin(), rows.end(),
                         [](const Row& a, const Row& b) { return a.bytes > b.bytes; });
        constexpr size_t kListed = 6;
        message += rows.empty() ? "; nothing is resident" : "; resident: ";
        for (size_t i = 0; i < rows.size() && i < kListed; ++i)
          message += (i ? ", " : "") + rows[i].text;
        if (rows.size() > kListed)
          message += ", and " + std::to_string(rows.size() - kListed) + " more";
        return make_error(StatusCode::kOutOfMemory, message);
      }
    }
    for (const auto& s : gone) notify(s);
    for (const auto& s : evicted) notify(s);
    freed.clear();  // the victim's memory goes before the next look
    if (to_host) {
      // The victim's bytes go to the host tier on this thread, with the lock released (the
      // copy takes it to finish); its device slab is freed once they are there. Until then its
      // bytes stay counted as held, so the next look sees them gone only when they are.
      if (finish_offload(std::move(*to_host)).ok())
        evicted_bytes += to_host_bytes;
      else
        offload_failed.insert(to_host_key);  // dropped instead if it is chosen again
    }
  }
}

void ModelStore::run_load(std::shared_ptr<Entry> entry, uint64_t generation, bool reload,
                          bool force) {
  std::shared_ptr<std::atomic<bool>> cancel;
  ResolvedModel model;
  std::string old_files;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (entry->generation != generation) return;
    cancel = entry->cancel;
    model = entry->model;
    if (reload && entry->current()) old_files = entry->current()->files;
  }
  // Taken while the store is certainly alive (the job started before any shutdown).
  std::shared_ptr<WorkerPool> pool = pool_;
  auto start = Clock::now();
  // The load's report, once it has ended: made before the status goes out, so that whoever the
  // status answers finds the load counted.
  const LoadReport* ended = nullptr;
  // Publishes a result if this load is still the current one. A cancelled load (unloaded, or
  // the store shutting down) touches the store no more.
  auto publish = [&](std::function<void(Entry&)> apply) {
    if (cancel->load()) return;
    ModelStatus s;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (entry->generation != generation) return;
      apply(*entry);
      // A reload stays quiet until it ends: its model is loaded (and served) all along, and
      // whoever waits for the reload waits for the next status.
      if (reload && entry->reloading) return;
      s = snapshot(*entry);
    }
    if (ended != nullptr) report_load(*ended);
    notify(s);
  };
  auto fail = [&](const Error& error) {
    if (cancel->load()) return;
    fail_load(entry, generation, reload, error, *pool);
  };

  const std::vector<std::string>& roots = roots_;
  // Every file is opened here, once, beneath the roots; the loader reads these descriptors.
  if (auto f = fault::point(fault::Stage::kOpen, model.source.path); !f.ok())
    return fail(f.error());
  auto ckpt = checkpoint::open_checkpoint(model.source.path, roots, config_.checkpoint_limits);
  if (!ckpt.ok()) return fail(ckpt.error());
  if (ckpt->tensors.size() > protocol::kMaxTableTensors)
    return fail(make_error(StatusCode::kInvalidArgument,
                           "checkpoint has " + std::to_string(ckpt->tensors.size()) +
                               " tensors; one model may have at most " +
                               std::to_string(protocol::kMaxTableTensors)));
  if (cancel->load()) return;  // opening can block; the store may be gone since
  std::string files = file_identity(*ckpt);
  if (reload && !force && files == old_files) {
    publish([&](Entry& e) {
      e.reloading = false;
      e.reload_note = "unchanged: the files are those of generation " +
                      std::to_string(e.current() ? e.current()->number : 0);
    });
    return;
  }
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
  if (auto admitted = admit(slab_bytes, model.spec.describe(), model.key); !admitted.ok())
    return fail(admitted.error());
  // The bytes of this load that the device does not show as taken yet. They shrink as the
  // memory becomes resident (at allocation on GPUs and reserving hosts, else as it is written), so
  // that a load is never counted twice; what is left goes when the load ends, however it ends, but
  // not once the store is gone.
  struct Admission {
    ModelStore* store;
    WorkerPool* pool;
    uint64_t outstanding;
    uint64_t budget;  // in budget_pending_ until the slab becomes the entry's
    void settle_locked(uint64_t now_outstanding) {
      if (now_outstanding >= outstanding) return;
      store->admitted_bytes_ -= std::min(outstanding - now_outstanding, store->admitted_bytes_);
      outstanding = now_outstanding;
    }
    ~Admission() {
      if (pool->stopping) return;
      std::lock_guard<std::mutex> lock(store->mutex_);
      settle_locked(0);
      store->budget_pending_ -= std::min(budget, store->budget_pending_);
    }
  } admission{this, pool.get(), slab_bytes, slab_bytes};
  if (auto f = fault::point(fault::Stage::kAllocate, model.source.path); !f.ok())
    return fail(f.error());
  auto slab = backend_->allocate(plan->segment_sizes, short_id(model.key));
  if (!slab.ok()) return fail(slab.error());
  if (backend_->allocation_is_resident()) {
    std::lock_guard<std::mutex> lock(mutex_);
    admission.settle_locked(0);
  }
  publish([&](Entry& e) {
    e.bytes_total = plan->bytes_to_read;
    e.bytes_done = 0;
  });

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
      if (reload) return;
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
  // Not cancelled, so any error is this load's to show, even one that reads "stopped": a model
  // must never stay loading once its worker is done with it.
  if (!loaded.ok()) return fail(loaded.error());
  if (auto f = fault::point(fault::Stage::kSeal, model.source.path); !f.ok())
    return fail(f.error());
  auto sealed = (*slab)->seal();
  if (!sealed.ok()) return fail(sealed.error());

  // The table is built once here, off the event loop; every lease shares it.
  size_t name_bytes = 0;
  for (const auto& t : plan->tensors) name_bytes += t.source.name.size();
  protocol::TensorTableBuilder builder(plan->tensors.size(), name_bytes);
  for (const auto& t : plan->tensors) {
    auto added = builder.add(t.source.name, t.target_dtype, t.target_shape, {}, t.placement.segment,
                             t.placement.offset, t.target_bytes);
    if (!added.ok()) return fail(added.error());
  }
  auto table = make_shared_table(builder, **slab);
  if (!table.ok()) return fail(table.error());
  std::shared_ptr<memory::Slab> shared_slab(std::move(*slab));
  double secs = std::chrono::duration<double>(Clock::now() - start).count();
  log::info("loaded " + model.spec.describe() + ": " + std::to_string((*table)->size()) +
            " tensors, " + format_bytes(plan->bytes_to_read) + " in " + std::to_string(secs) +
            " s");
  const LoadReport report{reload ? LoadReport::Kind::kReload : LoadReport::Kind::kLoad,
                          StatusCode::kOk, plan->bytes_to_read,
                          std::chrono::duration<double>(Clock::now() - start).count()};
  ended = &report;
  publish([&](Entry& e) {
    e.state = ModelState::kLoaded;
    e.bytes_done = e.bytes_total;
    e.reloading = false;
    e.reload_error.reset();
    e.reload_note.clear();
    Generation g;
    g.number = e.next_number++;
    g.token = next_generation();
    g.slab = shared_slab;
    g.table = *table;
    g.files = files;
    g.created_at_ms = unix_time_ms();
    e.generations.push_back(std::move(g));
    // The slab is the entry's now: counted as held, no longer as admitted.
    budget_pending_ -= std::min(admission.budget, budget_pending_);
    admission.budget = 0;
    e.touch();
    keep_locked(e, e.generations.back());
    drop_unleased_locked(e);
  });
}

void ModelStore::load_job(std::shared_ptr<Entry> entry, uint64_t generation, bool reload,
                          bool force) {
  // Taken while the store is certainly alive (the job started before any shutdown).
  std::shared_ptr<WorkerPool> pool = pool_;
  // An exception (std::bad_alloc above all) fails this load alone: its slab and admitted bytes
  // were returned as the stack unwound, the model shows a typed error, and the worker goes on
  // serving other loads.
  Error error;
  try {
    return run_load(entry, generation, reload, force);
  } catch (const std::bad_alloc&) {
    error = Error{StatusCode::kOutOfMemory, "out of host memory while loading"};
  } catch (const std::exception& e) {
    error = Error{StatusCode::kInternal, std::string("internal error while loading: ") + e.what()};
  } catch (...) {
    error = Error{StatusCode::kInternal, "internal error while loading (unknown exception)"};
  }
  fail_load(entry, generation, reload, error, *pool);
}

void ModelStore::fail_load(const std::shared_ptr<Entry>& entry, uint64_t generation, bool reload,
                           const Error& error, const WorkerPool& pool) {
  if (pool.stopping) return;  // the store is going away: touch nothing
  std::string what;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    // A cancelled load (unloaded, or superseded) publishes nothing.
    if (entry->generation != generation || (entry->cancel && entry->cancel->load())) return;
    what = entry->model.spec.describe();
  }
  log::warn((reload ? "reload of " : "load of ") + what + " failed: " + error.to_string());
  Error shown = error;
  if (shown.message.size() > protocol::kMaxStatusMessageBytes - 16)
    shown.message =
        std::string(utf8_prefix(shown.message, protocol::kMaxStatusMessageBytes - 19)) + "...";
  ModelStatus s;
  std::vector<ModelStatus> gone;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (entry->generation != generation) return;
    Entry& e = *entry;
    if (reload) {  // the current generation goes on serving
      e.reloading = false;
      e.reload_error = shown;
      // The sizes of the generation still served, not of the load that failed.
      uint64_t bytes = 0;
      if (const Generation* g = e.current(); g && g->table)
        for (size_t i = 0; i < g->table->size(); ++i) bytes += g->table->view().record(i).nbytes;
      e.bytes_done = e.bytes_total = bytes;
    } else {
      e.state = ModelState::kError;
      e.error = shown;
      e.failed_at = Clock::now();
      e.generations.clear();
      trim_errors_locked(gone);
    }
    s = snapshot(e);
  }
  // Counted before anyone is told: whoever the status answers finds the failure counted.
  report_load({reload ? LoadReport::Kind::kReload : LoadReport::Kind::kLoad, error.code, 0, 0});
  notify(s);
  for (const auto& g : gone) notify(g);
}

void ModelStore::drop_unleased_locked(Entry& e) {
  // Every generation but the current one lives only while leased.
  std::vector<std::shared_ptr<memory::Slab>> dropped;
  for (size_t i = 0; i + 1 < e.generations.size();) {
    if (e.generations[i].leases == 0) {
      dropped.push_back(std::move(e.generations[i].slab));
      if (auto& host = e.generations[i].host_copy) {  // an offloaded one a publish replaced
        host_tier_bytes_ -= std::min(host->total_bytes(), host_tier_bytes_);
        dropped.push_back(std::move(host));
      }
      e.generations.erase(e.generations.begin() + static_cast<std::ptrdiff_t>(i));
    } else {
      ++i;
    }
  }
  retire_locked(std::move(dropped));
}

void ModelStore::pin_staging_ahead(int ordinal) {
  std::lock_guard<std::mutex> lock(mutex_);
  jobs_.push_back([ordinal] {
    auto start = Clock::now();
    auto pinned = loader::pin_staging(ordinal);
    if (!pinned.ok()) {
      log::warn("pinning staging buffers ahead of the first load failed (" +
                pinned.error().message + "): the first load pins its own");
      return;
    }
    log::info(
        "pinned " + std::to_string(*pinned) + " staging buffers for GPU " +
        std::to_string(ordinal) + " in " +
        std::to_string(
            std::chrono::duration_cast<std::chrono::milliseconds>(Clock::now() - start).count()) +
        " ms");
  });
  jobs_cv_.notify_one();
}

void ModelStore::retire_locked(std::vector<std::shared_ptr<memory::Slab>> slabs) {
  if (slabs.empty()) return;
  // Freeing a large slab takes milliseconds (unmapping and releasing device memory): a worker
  // does it, not the event loop or a commit that a client is waiting for.
  jobs_.push_back([slabs = std::move(slabs)]() mutable { slabs.clear(); });
  jobs_cv_.notify_one();
}

Result<LeaseGrant> ModelStore::lease_locked(Entry& e, size_t index) {
  Generation& g = e.generations[index];
  if (!g.slab)
    return make_error(StatusCode::kNotReady,
                      "the model is offloaded to the host tier (a load or attach wakes it)");
  LeaseGrant grant;
  // Exporting is a dup(2) of each segment's descriptor, or a copy of its IPC handle (both made
  // once, at the seal): microseconds, so it is done under the store lock, and a lease is counted
  // exactly when its exports exist. A test's pause-at=export therefore holds the lock: it stands
  // for a server stopped mid-lease.
  COMPANION_TRY(fault::point(fault::Stage::kExport, e.model.source.path));
  COMPANION_ASSIGN_OR_RETURN(grant.exports, g.slab->export_segments());
  g.leases++;
  e.touch();
  grant.key = e.published ? published_store_key(e.publish_key) : e.model.key;
  grant.status = snapshot(e);
  grant.status.generation = g.number;  // the one leased, which may be an older one
  grant.status.fingerprint = g.fingerprint;
  grant.slab = g.slab;
  grant.table = g.table;
  grant.generation = g.token;
  return grant;
}

Result<LeaseGrant> ModelStore::acquire(const std::string& key) {
  std::lock_guard<std::mutex> lock(mutex_);
  auto it = entries_.find(key);
  if (it == entries_.end() || it->second->state != ModelState::kLoaded ||
      it->second->generations.empty())
    return make_error(StatusCode::kNotReady, "model is not loaded");
  Entry& e = *it->second;
  return lease_locked(e, e.generations.size() - 1);
}

namespace {
// "dtype: published 'bf16', asked 'fp16'; tp_rank: published '0', asked nothing"
std::string fingerprint_difference(const Fingerprint& have, const Fingerprint& want) {
  std::string out;
  size_t shown = 0;
  auto add = [&](const std::string& name, const std::string& text) {
    if (++shown > 16) return;
    if (!out.empty()) out += "; ";
    out += printable_text(name) + ": " + text;
  };
  for (const auto& [name, value] : want) {
    auto it = have.find(name);
    if (it == have.end())
      add(name, "published nothing, asked '" + printable_text(value) + "'");
    else if (it->second != value)
      add(name,
          "published '" + printable_text(it->second) + "', asked '" + printable_text(value) + "'");
  }
  for (const auto& [name, value] : have)
    if (!want.count(name)) add(name, "published '" + printable_text(value) + "', asked nothing");
  if (shown > 16) out += "; and " + std::to_string(shown - 16) + " more";
  return out;
}
}  // namespace

Result<void> check_fingerprint(const std::string& key, uint64_t number, const Fingerprint& have,
                               const Fingerprint& want) {
  if (have == want) return ok_result();
  return make_error(StatusCode::kFingerprintMismatch,
                    "'" + printable_text(key) + "' generation " + std::to_string(number) +
                        " has another fingerprint: " + fingerprint_difference(have, want));
}

Result<LeaseGrant> ModelStore::acquire_published(const std::string& key, uint64_t generation,
                                                 const std::optional<Fingerprint>& fingerprint) {
  return acquire_generation(published_store_key(key), generation, fingerprint);
}

Result<LeaseGrant> ModelStore::acquire_generation(const std::string& store_key, uint64_t generation,
                                                  const std::optional<Fingerprint>& fingerprint) {
  std::lock_guard<std::mutex> lock(mutex_);
  auto it = entries_.find(store_key);
  bool published = store_key.rfind(published_store_key(""), 0) == 0;
  std::string key = published ? store_key.substr(published_store_key("").size()) : store_key;
  if (it == entries_.end())
    return make_error(
        StatusCode::kNotFound,
        (published ? "nothing is published under '" : "no model '") + printable_text(key) + "'");
  Entry& e = *it->second;
  if (!published && e.state != ModelState::kLoaded)
    return make_error(StatusCode::kNotReady, "model is not loaded");
  if (e.generations.empty())
    return make_error(StatusCode::kNotReady,
                      "'" + printable_text(key) + "' is being published; no generation yet");
  size_t index = e.generations.size() - 1;
  if (generation != 0) {
    auto g = std::find_if(e.generations.begin(), e.generations.end(),
                          [&](const Generation& x) { return x.number == generation; });
    if (g == e.generations.end())
      return make_error(StatusCode::kNotFound,
                        "'" + printable_text(key) + "' has no generation " +
                            std::to_string(generation) +
                            " (live: " + std::to_string(e.generations.front().number) + ".." +
                            std::to_string(e.generations.back().number) + ")");
    index = static_cast<size_t>(g - e.generations.begin());
  }
  if (fingerprint)
    COMPANION_TRY(check_fingerprint(key, e.generations[index].number,
                                    e.generations[index].fingerprint, *fingerprint));
  return lease_locked(e, index);
}

void ModelStore::release(const std::string& key, uint64_t generation) {
  std::lock_guard<std::mutex> lock(mutex_);
  auto it = entries_.find(key);
  if (it == entries_.end()) return;
  Entry& e = *it->second;
  for (auto& g : e.generations) {
    if (g.token != generation) continue;
    if (g.leases > 0) g.leases--;
    e.touch();  // idle from now, as far as eviction goes
    break;
  }
  drop_unleased_locked(e);
}

std::shared_ptr<void> ModelStore::hold_for_waiter(const std::string& store_key) {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    ++waiter_holds_[store_key];
  }
  // The deleter runs once, when the last copy of the waiter holding it goes.
  return std::shared_ptr<void>(nullptr, [this, store_key](void*) {
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = waiter_holds_.find(store_key);
    if (it != waiter_holds_.end() && --it->second == 0) waiter_holds_.erase(it);
  });
}

ModelStore::Entry* ModelStore::find_locked(const std::string& key_or_id) const {
  // A store key, then a short id, then a published key: a key published under another model's
  // id does not take that id over.
  auto it = entries_.find(key_or_id);
  if (it != entries_.end()) return it->second.get();
  for (const auto& [key, e] : entries_)
    if (e->id == key_or_id) return e.get();
  it = entries_.find(published_store_key(key_or_id));
  if (it != entries_.end()) return it->second.get();
  return nullptr;
}

std::string ModelStore::find_key(const std::string& key_or_id) const {
  std::lock_guard<std::mutex> lock(mutex_);
  Entry* e = find_locked(key_or_id);
  if (e == nullptr) return {};
  return e->published ? published_store_key(e->publish_key) : e->model.key;
}

size_t ModelStore::held_locked() const {
  size_t held = 0;
  for (const auto& [key, e] : entries_)
    if (e->state == ModelState::kLoading || e->state == ModelState::kLoaded || e->offloaded())
      ++held;
  return held;
}

Result<ModelStatus> ModelStore::unload(const std::string& key_or_id, bool force) {
  ModelStatus s;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    Entry* e = find_locked(key_or_id);
    if (e == nullptr)
      return make_error(StatusCode::kNotFound, "no model " + key_or_id + " on this server");
    uint32_t leases = 0;
    for (const auto& g : e->generations) leases += g.leases;
    if (leases > 0 && !force)
      return make_error(StatusCode::kModelInUse,
                        std::to_string(leases) +
                            " client lease(s) hold the model; unload with force to drop it anyway "
                            "(clients keep their mappings)");
    if (e->cancel) e->cancel->store(true);
    e->generation = next_generation();
    e->state = ModelState::kUnloaded;
    std::shared_ptr<memory::Slab> writer_slab;
    if (e->writer) {
      admitted_bytes_ -= std::min(e->writer->admitted, admitted_bytes_);
      writer_slab = std::move(e->writer->slab);
      e->writer.reset();  // its connection's commit finds nothing to commit
    }
    s = snapshot(*e);
    if (writer_slab) s.slab_bytes += writer_slab->total_bytes();
    std::vector<std::shared_ptr<memory::Slab>> dropped;
    for (auto& g : e->generations) dropped.push_back(std::move(g.slab));
    for (auto& g : e->generations) {
      if (!g.host_copy) continue;
      host_tier_bytes_ -= std::min(g.host_copy->total_bytes(), host_tier_bytes_);
      dropped.push_back(std::move(g.host_copy));
    }
    if (writer_slab) dropped.push_back(std::move(writer_slab));
    retire_locked(std::move(dropped));
    e->generations.clear();  // leases still holding a slab keep that memory alive
    s.generations.clear();
    s.slab_bytes = 0;
    s.host_bytes = 0;
    std::string key = e->published ? published_store_key(e->publish_key) : e->model.key;
    entries_.erase(key);  // e dies here
  }
  log::info("unloaded " + printable_text(s.key));
  notify(s);
  return s;
}

uint64_t ModelStore::slab_bytes() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return held_bytes_locked();
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
  for (const auto& [key, e] : entries_)
    for (const auto& g : e->generations) total += g.leases;
  return total;
}

void ModelStore::set_keeper(std::shared_ptr<GenerationKeeper> keeper) {
  std::lock_guard<std::mutex> lock(mutex_);
  keeper_ = std::move(keeper);
}

void ModelStore::keep_locked(const Entry& e, Generation& g) {
  if (!keeper_ || !g.slab || !g.table) return;
  keeper::CatalogEntry c;
  c.store_key = e.published ? published_store_key(e.publish_key) : e.model.key;
  c.published = e.published;
  c.publish_key = e.publish_key;
  c.spec = e.model.spec;
  c.source_path = e.model.source.path;
  c.hf_repo = e.model.source.hf_repo;
  c.hf_commit = e.model.source.hf_commit;
  c.number = g.number;
  c.fingerprint = g.fingerprint;
  // A publication's digests were taken at its commit ("wsum64:<hex>"); a load's are taken by
  // the keeper's thread (empty here).
  for (const std::string& text : g.digests) {
    constexpr std::string_view kPrefix = "wsum64:";
    if (text.rfind(kPrefix, 0) != 0) {
      c.digests.clear();
      break;
    }
    uint64_t digest = 0;
    const char* hex = text.data() + kPrefix.size();
    auto [end, err] = std::from_chars(hex, text.data() + text.size(), digest, 16);
    if (err != std::errc() || end != text.data() + text.size()) {
      c.digests.clear();
      break;
    }
    c.digests.push_back(digest);
  }
  c.files = g.files;
  c.created_at_ms = g.created_at_ms;
  c.segment_kind = g.slab->kind();
  for (size_t i = 0; i < g.slab->segment_count(); ++i)
    c.segment_sizes.push_back(g.slab->segment_size(i));
  c.table_bytes = g.table->bytes();
  g.kept = keeper_->keep(std::move(c), g.slab, g.table);
}

Result<ModelStatus> ModelStore::adopt(AdoptedGeneration a) {
  ModelStatus s;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    const std::string& key = a.model.key;
    if (entries_.count(key) != 0)
      return make_error(StatusCode::kInvalidArgument, printable_text(key) + " is held already");
    // This server's roots, not the earlier one's: a model it could not load it does not serve.
    if (!a.published && !checkpoint::is_under_roots(a.model.source.path, roots_))
      return make_error(StatusCode::kNotPermitted,
                        a.model.source.path + " is outside the server's model roots");
    if (held_locked() >= config_.max_models)
      return make_error(StatusCode::kLimitExceeded, "the server holds " +
                                                        std::to_string(held_locked()) +
                                                        " models, its limit (--max-models " +
                                                        std::to_string(config_.max_models) + ")");
    auto entry = std::make_shared<Entry>();
    Entry& e = *entry;
    e.model = a.model;
    e.id = short_id(key);
    e.published = a.published;
    e.publish_key = a.publish_key;
    e.state = ModelState::kLoaded;
    e.generation = next_generation();
    e.reload_note = "adopted after a restart (not read again)";
    uint64_t bytes = 0;
    for (size_t i = 0; i < a.table->size(); ++i) bytes += a.table->view().record(i).nbytes;
    e.bytes_done = e.bytes_total = bytes;
    Generation g;
    g.number = a.number;
    g.token = next_generation();
    g.slab = std::move(a.slab);
    g.table = std::move(a.table);
    g.digests = std::move(a.digests);
    g.fingerprint = std::move(a.fingerprint);
    g.files = std::move(a.files);
    g.created_at_ms = a.created_at_ms;
    g.kept = std::move(a.kept);
    e.next_number = a.number + 1;
    // The memory was taken before this server started: the default budget, made of what was
    // available then, did not count it as available, and must not count it twice.
    if (budget_from_available_ && g.slab) budget_ += g.slab->total_bytes();
    e.generations.push_back(std::move(g));
    e.touch();
    entries_[key] = entry;
    s = snapshot(e);
  }
  notify(s);
  return s;
}

}  // namespace companion::server
