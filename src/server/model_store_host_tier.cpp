// The host tier: a model's bytes copied out of its device slab into host memory (a slab of the
// host backend: sealed memfds), the device slab freed and the tensor table kept ("offloaded"),
// and copied back into a new device slab by its next load or attach ("woken") instead of being
// read from the checkpoint again. Published models, whose bytes no file holds, survive losing
// their device memory this way. Every backend takes the same path: the device slab is read with
// Slab::read (a pread of the memfd for host slabs, cuMemcpyDtoH for CUDA ones) and filled back
// by loader::copy_slab, as a load fills one (preads of the host copy into a host slab, or into
// pinned staging copied asynchronously into GPU memory).
#include <sys/mman.h>
#include <sys/sysinfo.h>

#include <algorithm>
#include <cerrno>
#include <new>
#include <utility>

#include "common/log.hpp"
#include "common/util.hpp"
#include "protocol/limits.hpp"
#include "server/model_store.hpp"
#include "server/store_entry.hpp"

namespace companion::server {
namespace {

// A sealed slab of the host tier whose segments are also mapped read-only into the server and
// page-locked for the device's DMA (Slab::pinned_host_bytes), so that a wake copies them straight
// into GPU memory instead of through the loads' staging buffers. Everything else is the inner
// slab's. Members go in reverse: the registrations before the mappings, those before the slab.
class PinnedHostCopy final : public memory::Slab {
 public:
  // `sealed` wrapped, or handed back as it is when the device backend pins nothing (host) or
  // the driver refuses (the wake then stages, as a load does).
  static std::unique_ptr<memory::Slab> wrap(std::unique_ptr<memory::Slab> sealed,
                                            const memory::Backend& device) {
    auto exports = sealed->export_segments();
    if (!exports.ok()) return sealed;
    auto copy = std::unique_ptr<PinnedHostCopy>(new PinnedHostCopy());
    for (auto& segment : *exports) {
      if (segment.size == 0) {
        copy->mappings_.push_back(Mapping{});
        continue;
      }
      void* p = ::mmap(nullptr, segment.size, PROT_READ, MAP_SHARED, segment.fd.get(), 0);
      if (p == MAP_FAILED) {
        log::debug("host tier: mapping a copy's segment to page-lock it failed: " +
                   errno_error(StatusCode::kInternal, "mmap", errno).message);
        return sealed;
      }
      copy->mappings_.push_back(Mapping{p, segment.size});
      auto pinned = device.pin_host_range(p, segment.size, /*read_only=*/true);
      if (!pinned.ok()) {
        if (pinned.error().code != StatusCode::kUnavailable || device.name() != "host")
          log::info(
              "host tier: page-locking a copy for direct copies failed (its wake stages "
              "instead): " +
              pinned.error().message);
        return sealed;
      }
      copy->pins_.push_back(std::move(*pinned));
    }
    copy->inner_ = std::move(sealed);
    return copy;
  }

  memory::SegmentKind kind() const noexcept override { return inner_->kind(); }
  size_t segment_count() const noexcept override { return inner_->segment_count(); }
  uint64_t segment_size(size_t i) const noexcept override { return inner_->segment_size(i); }
  void* host_address(size_t i) noexcept override { return inner_->host_address(i); }
  const void* pinned_host_bytes(size_t i) const noexcept override {
    return i < mappings_.size() ? mappings_[i].data : nullptr;
  }
  Result<void> write(size_t i, uint64_t offset, const void* src, uint64_t bytes) override {
    return inner_->write(i, offset, src, bytes);
  }
  Result<void> read(size_t i, uint64_t offset, void* dst, uint64_t bytes) override {
    return inner_->read(i, offset, dst, bytes);
  }
  Result<void> seal() override { return inner_->seal(); }
  Result<std::vector<memory::SegmentExport>> export_segments() override {
    return inner_->export_segments();
  }
  Result<std::vector<memory::SegmentExport>> export_writable() override {
    return inner_->export_writable();
  }
  Result<uint64_t> digest(size_t i) override { return inner_->digest(i); }

 private:
  struct Mapping {
    void* data = nullptr;
    uint64_t size = 0;
    Mapping() = default;
    Mapping(void* d, uint64_t s) : data(d), size(s) {}
    Mapping(Mapping&& other) noexcept
        : data(std::exchange(other.data, nullptr)), size(other.size) {}
    Mapping& operator=(Mapping&&) = delete;
    ~Mapping() {
      if (data != nullptr) ::munmap(data, size);
    }
  };
  PinnedHostCopy() = default;

  std::unique_ptr<memory::Slab> inner_;
  std::vector<Mapping> mappings_;
  std::vector<std::unique_ptr<memory::PinnedHostRange>> pins_;
};

struct HostCopy {
  std::shared_ptr<memory::Slab> slab;
  std::vector<uint64_t> digests;  // the device slab's, per segment, before the copy
  // Where the time went, for the log: allocating the host slab, digesting and copying, sealing
  // and page-locking the sealed copy.
  double allocate_seconds = 0;
  double copy_seconds = 0;
  double seal_seconds = 0;
};

double seconds_since(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

// Copies every segment of `device` into a new sealed slab of the host tier, with the device
// slab's digests. Where the device backend can page-lock host memory, each segment is copied
// into its page-locked destination (a device-to-host copy into pageable memory runs at a
// fraction of the bus's speed the first time its pages are touched), and the sealed copy is
// page-locked again, read-only, for its wake.
Result<HostCopy> copy_to_host_tier(memory::Slab& device, const memory::Backend& device_backend,
                                   memory::Backend& host_tier, const std::string& label) {
  std::vector<uint64_t> sizes;
  for (size_t i = 0; i < device.segment_count(); ++i) sizes.push_back(device.segment_size(i));
  HostCopy out;
  auto phase = Clock::now();
  COMPANION_ASSIGN_OR_RETURN(std::unique_ptr<memory::Slab> host, host_tier.allocate(sizes, label));
  out.allocate_seconds = seconds_since(phase);
  phase = Clock::now();
  for (size_t i = 0; i < sizes.size(); ++i) {
    COMPANION_ASSIGN_OR_RETURN(uint64_t digest, device.digest(i));
    out.digests.push_back(digest);
    if (sizes[i] == 0) continue;
    void* dst = host->host_address(i);
    if (dst == nullptr)
      return make_error(StatusCode::kInternal, "the host tier's slab has no host address");
    // Unpinned (the result dropped) before the seal unmaps the writable mapping.
    auto pinned = device_backend.pin_host_range(dst, sizes[i], /*read_only=*/false);
    COMPANION_TRY(device.read(i, 0, dst, sizes[i]));
  }
  out.copy_seconds = seconds_since(phase);
  phase = Clock::now();
  COMPANION_TRY(host->seal());
  out.slab = std::shared_ptr<memory::Slab>(PinnedHostCopy::wrap(std::move(host), device_backend));
  out.seal_seconds = seconds_since(phase);
  return out;
}

// How logs and messages name a model: a published one by its key, a loaded one by its spec.
std::string describe(bool published, const std::string& publish_key, const ModelSpec& spec) {
  return published ? "'" + printable_text(publish_key) + "'" : spec.describe();
}

}  // namespace

Result<void> parse_host_budget(const std::string& text, StoreConfig& config) {
  StoreConfig parsed;
  if (!parse_memory_reserve(text, parsed).ok())
    return make_error(StatusCode::kInvalidArgument,
                      "--host-budget takes bytes (64GiB, 512MiB, 4096), a share of the host's "
                      "memory (25%), or 0 (no host tier), not '" +
                          text + "'");
  if (parsed.memory_reserve_fraction <= 0.0) {
    config.host_budget_bytes = parsed.memory_reserve_bytes;
    return ok_result();
  }
  struct sysinfo info {};
  if (::sysinfo(&info) != 0)
    return errno_error(StatusCode::kInternal, "sysinfo for --host-budget", errno);
  const double ram = static_cast<double>(info.totalram) * (info.mem_unit == 0 ? 1 : info.mem_unit);
  config.host_budget_bytes = static_cast<uint64_t>(parsed.memory_reserve_fraction * ram);
  return ok_result();
}

uint64_t ModelStore::host_tier_bytes() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return host_tier_bytes_;
}

Result<void> ModelStore::make_host_room_locked(uint64_t bytes, std::vector<ModelStatus>& gone) {
  const uint64_t budget = config_.host_budget_bytes;
  if (bytes > budget)
    return make_error(StatusCode::kOutOfMemory, "its " + format_bytes(bytes) +
                                                    " do not fit the host tier (--host-budget " +
                                                    format_bytes(budget) + ")");
  // Host copies that may go: offloaded models that are neither waking nor being published.
  std::vector<std::map<std::string, std::shared_ptr<Entry>>::iterator> candidates;
  uint64_t droppable = 0;
  for (auto it = entries_.begin(); it != entries_.end(); ++it) {
    const Entry& e = *it->second;
    if (e.state != ModelState::kUnloaded || e.offloaded() == nullptr || e.writer) continue;
    candidates.push_back(it);
    droppable += e.offloaded()->host_copy->total_bytes();
  }
  uint64_t used = host_tier_bytes_;
  if (used + bytes > budget && used - std::min(droppable, used) + bytes > budget)
    return make_error(StatusCode::kOutOfMemory,
                      "its " + format_bytes(bytes) + " do not fit the host tier (--host-budget " +
                          format_bytes(budget) + ", " + format_bytes(used) +
                          " held, of which models being copied or woken hold " +
                          format_bytes(used - std::min(droppable, used)) + ")");
  std::sort(candidates.begin(), candidates.end(), [](const auto& a, const auto& b) {
    return a->second->offloaded_at < b->second->offloaded_at;
  });
  std::vector<std::shared_ptr<memory::Slab>> dropped;
  for (auto it : candidates) {
    if (host_tier_bytes_ + bytes <= budget) break;
    Entry& e = *it->second;
    Generation* g = e.offloaded();
    const uint64_t held = g->host_copy->total_bytes();
    host_tier_bytes_ -= std::min(held, host_tier_bytes_);
    dropped.push_back(std::move(g->host_copy));
    log::info("host tier: dropped " + describe(e.published, e.publish_key, e.model.spec) + " (" +
              format_bytes(held) + ", the least recently offloaded) to make room");
    e.generation = next_generation();
    e.generations.clear();
    ModelStatus s = snapshot(e);
    s.generations.clear();
    gone.push_back(std::move(s));
    entries_.erase(it);
  }
  retire_locked(std::move(dropped));
  return ok_result();
}

Result<ModelStore::StartedOffload> ModelStore::start_offload_locked(
    Entry& e, bool force, std::string evicted_because, std::vector<ModelStatus>& gone) {
  Generation* g = e.current();
  const uint64_t bytes = g->slab->total_bytes();
  COMPANION_TRY(make_host_room_locked(bytes, gone));
  host_tier_bytes_ += bytes;  // reserved for the copy
  e.offloading = true;
  StartedOffload started;
  started.entry = entries_.at(e.model.key);
  started.device = g->slab;
  started.generation = e.generation;
  started.token = g->token;
  started.bytes = bytes;
  started.what = describe(e.published, e.publish_key, e.model.spec);
  started.force = force;
  started.evicted_because = std::move(evicted_because);
  return started;
}

Result<ModelStatus> ModelStore::offload(const std::string& key_or_id, bool force) {
  std::optional<StartedOffload> started;
  std::vector<ModelStatus> gone;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    Entry* found = find_locked(key_or_id);
    if (found == nullptr)
      return make_error(StatusCode::kNotFound,
                        "no model " + printable_text(key_or_id) + " on this server");
    const std::string what = describe(found->published, found->publish_key, found->model.spec);
    if (found->state == ModelState::kUnloaded && found->offloaded() != nullptr)
      return snapshot(*found);  // offloaded already
    if (!host_tier_)
      return make_error(StatusCode::kInvalidArgument,
                        "this server has no host tier (serve --host-budget SIZE): " + what +
                            " cannot be offloaded");
    Generation* g = found->current();
    if (found->state != ModelState::kLoaded || g == nullptr || !g->slab)
      return make_error(StatusCode::kNotReady, "only a loaded model can be offloaded; " + what +
                                                   " is " + model_state_name(found->state));
    if (found->offloading)
      return make_error(StatusCode::kNotReady, what + " is being offloaded already");
    if (found->reloading) return make_error(StatusCode::kNotReady, what + " is being reloaded");
    if (found->writer)
      return make_error(StatusCode::kModelInUse,
                        "a new generation of " + what + " is being published");
    uint32_t leases = 0;
    for (const auto& held : found->generations) leases += held.leases;
    if (leases > 0 && !force)
      return make_error(StatusCode::kModelInUse,
                        std::to_string(leases) +
                            " client lease(s) hold the model; offload with force to move it "
                            "anyway (clients keep their mappings)");
    COMPANION_ASSIGN_OR_RETURN(started, start_offload_locked(*found, force, "", gone));
  }
  for (const auto& s : gone) notify(s);
  return finish_offload(std::move(*started));
}

Result<ModelStatus> ModelStore::finish_offload(StartedOffload started) {
  const std::shared_ptr<Entry>& entry = started.entry;
  std::shared_ptr<memory::Slab> device = std::move(started.device);
  const uint64_t bytes = started.bytes;
  const std::string& what = started.what;
  const bool force = started.force;
  const bool eviction = !started.evicted_because.empty();
  auto start = Clock::now();
  Result<HostCopy> copied = make_error(StatusCode::kInternal, "offload did not run");
  try {
    copied = copy_to_host_tier(*device, *backend_, *host_tier_, "host:" + entry->id);
  } catch (const std::bad_alloc&) {
    copied = make_error(StatusCode::kOutOfMemory, "out of host memory while offloading");
  } catch (const std::exception& e) {
    copied = make_error(StatusCode::kInternal, std::string("offloading failed: ") + e.what());
  }
  Result<void> outcome = copied.ok() ? ok_result() : Result<void>(copied.error());
  const bool pinned = copied.ok() && copied->slab->pinned_host_bytes(0) != nullptr;
  std::string phases;
  if (copied.ok())
    phases = " (host memory " + std::to_string(copied->allocate_seconds) + " s, digests and copy " +
             std::to_string(copied->copy_seconds) + " s, seal" +
             (pinned ? " and page-lock " : " ") + std::to_string(copied->seal_seconds) + " s)";
  std::vector<std::shared_ptr<memory::Slab>> freed;
  ModelStatus s;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    Generation* g = entry->current();
    const bool same = entry->generation == started.generation && entry->offloading &&
                      g != nullptr && g->token == started.token &&
                      entries_.count(entry->model.key) != 0;
    if (same) entry->offloading = false;
    if (same && eviction && !copied.ok()) entry->host_copy_failed = true;
    if (!same) {
      outcome = make_error(StatusCode::kCancelled, what + " was unloaded while it was offloaded");
    } else if (outcome.ok()) {
      // Clients may have attached, or a writer claimed the key, during the copy.
      uint32_t leases = 0;
      for (const auto& held : entry->generations) leases += held.leases;
      if (leases > 0 && !force)
        outcome = make_error(StatusCode::kModelInUse,
                             "a client attached " + what + " while it was copied to the host");
      else if (entry->writer)
        outcome = make_error(StatusCode::kModelInUse,
                             "a new generation of " + what + " is being published");
      else if (entry->reloading)
        outcome = make_error(StatusCode::kNotReady, what + " is being reloaded");
      else if (eviction && !evictable_locked(*entry))
        outcome = make_error(StatusCode::kModelInUse,
                             "a client asked for " + what + " while it was copied to the host");
    }
    if (!outcome.ok()) {
      host_tier_bytes_ -= std::min(bytes, host_tier_bytes_);
      if (copied.ok()) freed.push_back(std::move(copied->slab));
    } else {
      // Only the current generation stays, its bytes in the host tier; leases that force let
      // through keep their slabs until they are released (their tokens match nothing here).
      for (auto& held : entry->generations) freed.push_back(std::move(held.slab));
      Generation kept = std::move(entry->generations.back());
      entry->generations.clear();
      kept.kept.reset();  // the keeper lets go of the device memory too
      kept.host_copy = std::move(copied->slab);
      kept.offload_digests = std::move(copied->digests);
      kept.leases = 0;
      kept.token = next_generation();
      entry->generations.push_back(std::move(kept));
      entry->state = ModelState::kUnloaded;
      entry->generation = next_generation();
      entry->offloaded_at = Clock::now();
      entry->reload_error.reset();
      entry->reload_note.clear();
      if (eviction) {
        ++evictions_;
        // Shown by `ls` until the model is woken.
        entry->reload_note = "evicted to the host tier: " + started.evicted_because;
        if (entry->reload_note.size() > protocol::kMaxStatusMessageBytes)
          entry->reload_note =
              std::string(utf8_prefix(entry->reload_note, protocol::kMaxStatusMessageBytes - 3)) +
              "...";
      }
      s = snapshot(*entry);
    }
  }
  // The device memory goes now (or with the last lease that force let through).
  device.reset();
  freed.clear();
  if (!outcome.ok()) {
    log::warn((eviction ? "eviction of " + what + " to the host tier" : "offload of " + what) +
              " failed: " + outcome.error().to_string());
    return outcome.error();
  }
  const double secs = std::chrono::duration<double>(Clock::now() - start).count();
  const std::string locked = pinned ? ", page-locked for its wake" : "";
  if (eviction)
    log::info("evicted " + what + " to the host tier (" + format_bytes(bytes) + " in " +
              std::to_string(secs) + " s" + phases + locked + "): " + started.evicted_because);
  else
    log::info("offloaded " + what + ": " + format_bytes(bytes) + " to the host tier in " +
              std::to_string(secs) + " s" + phases + locked);
  notify(s);
  return s;
}

void ModelStore::offload_async(const std::string& key_or_id, bool force,
                               std::function<void(Result<ModelStatus>)> done) {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    jobs_.push_back([this, pool = pool_, key_or_id, force, done = std::move(done)] {
      Result<ModelStatus> outcome = offload(key_or_id, force);
      if (pool->stopping) return;  // the store is going away: nobody waits for the answer
      done(std::move(outcome));
    });
  }
  jobs_cv_.notify_one();
}

void ModelStore::start_wake_locked(const std::shared_ptr<Entry>& entry) {
  Entry& e = *entry;
  e.state = ModelState::kLoading;
  e.bytes_done = 0;
  e.bytes_total = e.offloaded()->host_copy->total_bytes();
  e.error = Error{};
  e.reload_note.clear();
  e.generation = next_generation();
  e.cancel = std::make_shared<std::atomic<bool>>(false);
  uint64_t generation = e.generation;
  jobs_.push_back([this, entry, generation] { wake_job(entry, generation); });
  jobs_cv_.notify_one();
}

Result<ModelStatus> ModelStore::wake(const std::string& key_or_id) {
  ModelStatus s;
  bool started = false;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    Entry* found = find_locked(key_or_id);
    if (found == nullptr)
      return make_error(StatusCode::kNotFound,
                        "no model " + printable_text(key_or_id) + " on this server");
    if (found->state == ModelState::kUnloaded && found->offloaded() != nullptr) {
      start_wake_locked(entries_.at(found->model.key));
      started = true;
    }
    s = snapshot(*found);
  }
  if (started) {
    log::info("waking " + printable_text(s.key) + " from the host tier");
    notify(s);
  }
  return s;
}

void ModelStore::wake_job(std::shared_ptr<Entry> entry, uint64_t generation) {
  std::shared_ptr<WorkerPool> pool = pool_;
  Error error;
  try {
    return run_wake(entry, generation);
  } catch (const std::bad_alloc&) {
    error = Error{StatusCode::kOutOfMemory, "out of host memory while waking"};
  } catch (const std::exception& e) {
    error = Error{StatusCode::kInternal, std::string("internal error while waking: ") + e.what()};
  } catch (...) {
    error = Error{StatusCode::kInternal, "internal error while waking (unknown exception)"};
  }
  if (pool->stopping) return;
  fail_wake(entry, generation, error);
}

void ModelStore::fail_wake(const std::shared_ptr<Entry>& entry, uint64_t generation,
                           const Error& error) {
  Error shown = error;
  if (shown.message.size() > protocol::kMaxStatusMessageBytes - 32)
    shown.message =
        std::string(utf8_prefix(shown.message, protocol::kMaxStatusMessageBytes - 35)) + "...";
  ModelStatus failed;
  ModelStatus offloaded;
  std::string what;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (entry->generation != generation || (entry->cancel && entry->cancel->load())) return;
    Entry& e = *entry;
    what = describe(e.published, e.publish_key, e.model.spec);
    // Who waited for the wake gets the error; the model stays offloaded for another try.
    e.state = ModelState::kError;
    e.error = shown;
    failed = snapshot(e);
    e.state = ModelState::kUnloaded;
    e.error = Error{};
    e.bytes_done = 0;
    e.generation = next_generation();
    e.reload_note = "wake failed: " + shown.message;
    offloaded = snapshot(e);
  }
  log::warn("wake of " + what + " failed: " + error.to_string());
  report_load({LoadReport::Kind::kWake, error.code, 0, 0});  // before whoever waits is told
  notify(failed);
  notify(offloaded);
}

void ModelStore::run_wake(std::shared_ptr<Entry> entry, uint64_t generation) {
  std::shared_ptr<WorkerPool> pool = pool_;
  std::shared_ptr<std::atomic<bool>> cancel;
  std::shared_ptr<memory::Slab> host;
  std::vector<uint64_t> expected;
  std::vector<std::string> published_digests;
  uint64_t token = 0;
  std::string what;
  std::string label;
  std::string store_key;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    const Generation* g = entry->offloaded();
    if (entry->generation != generation || g == nullptr) return;
    cancel = entry->cancel;
    host = g->host_copy;
    expected = g->offload_digests;
    published_digests = g->digests;
    token = g->token;
    what = describe(entry->published, entry->publish_key, entry->model.spec);
    label = short_id(entry->model.key);
    store_key = entry->model.key;
  }
  auto fail = [&](const Error& error) {
    if (cancel->load() || pool->stopping) return;
    fail_wake(entry, generation, error);
  };
  auto start = Clock::now();
  const uint64_t bytes = host->total_bytes();
  if (auto admitted = admit(bytes, what + " (from the host tier)", store_key); !admitted.ok())
    return fail(admitted.error());
  // The admitted bytes go when the device shows them taken (at allocation on GPUs), or at the
  // end however it ends; not once the store is gone.
  struct Admission {
    ModelStore* store;
    WorkerPool* pool;
    uint64_t outstanding;
    uint64_t budget;  // in budget_pending_ until the device slab is the generation's
    void settle() {
      if (pool->stopping) return;
      std::lock_guard<std::mutex> lock(store->mutex_);
      store->admitted_bytes_ -= std::min(outstanding, store->admitted_bytes_);
      outstanding = 0;
    }
    ~Admission() {
      settle();
      if (pool->stopping || budget == 0) return;
      std::lock_guard<std::mutex> lock(store->mutex_);
      store->budget_pending_ -= std::min(budget, store->budget_pending_);
    }
  } admission{this, pool.get(), bytes, bytes};

  std::vector<uint64_t> sizes;
  for (size_t i = 0; i < host->segment_count(); ++i) sizes.push_back(host->segment_size(i));
  auto allocated = backend_->allocate(sizes, label);
  if (!allocated.ok()) return fail(allocated.error());
  std::shared_ptr<memory::Slab> device(std::move(*allocated));
  if (backend_->allocation_is_resident()) admission.settle();
  // As a load fills a slab: straight into host memory, through the loads' pinned staging and
  // asynchronous copies into GPU memory.
  auto progress = [&](uint64_t done, uint64_t) {
    ModelStatus s;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (entry->generation != generation) return;
      entry->bytes_done = done;
      s = snapshot(*entry);
    }
    notify(s);
  };
  auto copied = loader::copy_slab(*host, *device, progress, *cancel);
  if (cancel->load()) return;  // unloaded meanwhile
  if (!copied.ok()) return fail(copied.error());
  if (auto sealed = device->seal(); !sealed.ok()) return fail(sealed.error());
  auto copied_at = Clock::now();
  // The bytes must be those offloaded (and, published, those committed).
  for (size_t i = 0; i < sizes.size(); ++i) {
    auto digest = device->digest(i);
    if (!digest.ok()) return fail(digest.error());
    const std::string text = "wsum64:" + hex64(*digest);
    const bool as_offloaded = i >= expected.size() || expected[i] == *digest;
    const bool as_published = i >= published_digests.size() || published_digests[i] == text;
    if (!as_offloaded || !as_published)
      return fail(make_error(
          StatusCode::kInternal,
          "the host tier's copy of " + what + " does not hold the bytes offloaded: segment " +
              std::to_string(i) + " digests " + text +
              ", expected wsum64:" + hex64(i < expected.size() ? expected[i] : 0) +
              (i < published_digests.size() ? " (committed " + published_digests[i] + ")" : "")));
  }
  admission.settle();
  if (cancel->load() || pool->stopping) return;
  ModelStatus s;
  std::shared_ptr<memory::Slab> released;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (entry->generation != generation) return;
    auto g = std::find_if(entry->generations.begin(), entry->generations.end(),
                          [&](const Generation& x) { return x.token == token; });
    if (g == entry->generations.end() || !g->host_copy) return;  // a publish replaced it
    g->slab = device;
    budget_pending_ -= std::min(admission.budget, budget_pending_);
    admission.budget = 0;
    entry->touch();
    released = std::move(g->host_copy);
    host_tier_bytes_ -= std::min(released->total_bytes(), host_tier_bytes_);
    g->offload_digests.clear();
    g->token = next_generation();  // no lease of before the offload matches it
    keep_locked(*entry, *g);       // the keeper holds the new device memory from now on
    entry->state = ModelState::kLoaded;
    entry->bytes_done = entry->bytes_total;
    s = snapshot(*entry);
  }
  const double checked = seconds_since(copied_at);
  report_load({LoadReport::Kind::kWake, StatusCode::kOk, bytes, seconds_since(start)});
  // Whoever waits is told first: giving many GB of page-locked memfd pages back to the kernel
  // takes longer than the copy did (H200 host, 16 GB: ~2 s). The host budget no longer counts
  // them from the step above.
  notify(s);
  const bool direct = host->pinned_host_bytes(0) != nullptr;
  auto freeing = Clock::now();
  host.reset();
  released.reset();  // the host copy's memory goes back
  const double secs = std::chrono::duration<double>(copied_at - start).count();
  const double rate = secs > 0 ? static_cast<double>(bytes) / secs / 1e9 : 0.0;
  log::info("woke " + what + ": " + format_bytes(bytes) + " from the host tier in " +
            std::to_string(secs) + " s (" + std::to_string(rate) + " GB/s, " +
            (direct ? "DMA from page-locked host memory" : "through staging") +
            "), digests checked in " + std::to_string(checked) + " s, host copy freed in " +
            std::to_string(seconds_since(freeing)) + " s");
}

}  // namespace companion::server
