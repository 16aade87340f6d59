// ModelStore with the host backend and real checkpoints: single-flight loads, the state machine
// as listeners see it, errors and retries, leases, unloads (forced, during loads, by id) and
// shutting down during a load.
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <functional>
#include <latch>
#include <map>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include <gtest/gtest.h>

#include "checkpoint/dtype_convert.hpp"
#include "common/log.hpp"
#include "server/model_store.hpp"
#include "test_support.hpp"

namespace companion::server {
namespace {

using namespace std::chrono_literals;
using testing::BackendCounters;
using testing::CountingBackend;
using testing::random_tensor;
using testing::safetensors_file;
using testing::TempDir;
using testing::TensorData;

// Records every event a store's listener sees, with the thread it came from.
class Recorder {
 public:
  struct Event {
    ModelStatus status;
    std::thread::id thread;
  };

  ModelStore::Listener listener() {
    return [this](const ModelStatus& s) {
      {
        std::lock_guard<std::mutex> lock(mutex_);
        events_.push_back(Event{s, std::this_thread::get_id()});
      }
      cv_.notify_all();
    };
  }

  std::vector<Event> events(const std::string& key) const {
    std::lock_guard<std::mutex> lock(mutex_);
    std::vector<Event> out;
    for (const auto& e : events_)
      if (e.status.key == key) out.push_back(e);
    return out;
  }

  // The events of `key` in seq order.
  std::vector<ModelStatus> by_seq(const std::string& key) const {
    std::vector<ModelStatus> out;
    for (const auto& e : events(key)) out.push_back(e.status);
    std::sort(out.begin(), out.end(), [](const auto& a, const auto& b) { return a.seq < b.seq; });
    return out;
  }

  // Waits for an event of `key` satisfying `pred`.
  bool wait_for(const std::string& key, const std::function<bool(const ModelStatus&)>& pred,
                std::chrono::milliseconds timeout = 10s) {
    std::unique_lock<std::mutex> lock(mutex_);
    return cv_.wait_for(lock, timeout, [&] {
      for (const auto& e : events_)
        if (e.status.key == key && pred(e.status)) return true;
      return false;
    });
  }

 private:
  mutable std::mutex mutex_;
  std::condition_variable cv_;
  std::vector<Event> events_;
};

bool is_final(ModelState s) {
  return s == ModelState::kLoaded || s == ModelState::kError;
}

class ModelStoreTest : public ::testing::Test {
 protected:
  void SetUp() override { log::set_level(log::Level::kOff); }

  ModelStore& make_store(size_t threads = 2) {
    StoreConfig config;
    config.model_roots = {root.path()};
    config.hf_cache = root / "hf";
    config.load_threads = threads;
    store = std::make_unique<ModelStore>(std::make_unique<CountingBackend>(counters), config,
                                         recorder.listener());
    return *store;
  }

  // Writes root/<name>/model.safetensors; returns the directory.
  std::string write_model(const std::string& name, const std::vector<TensorData>& tensors) {
    std::string dir = root / name;
    testing::write_file(dir + "/model.safetensors", safetensors_file(tensors));
    models[dir] = tensors;
    return dir;
  }

  std::vector<TensorData> small_tensors(uint32_t seed) {
    return {random_tensor("embed.weight", DType::kF32, {64, 16}, seed),
            random_tensor("layer.0.bias", DType::kBF16, {16}, seed + 1),
            random_tensor("layer.0.weight", DType::kF16, {16, 16}, seed + 2),
            random_tensor("position_ids", DType::kI64, {1, 64}, seed + 3),
            random_tensor("empty", DType::kF32, {0}, seed + 4)};
  }

  // Many small tensors: one write() each on a slab without host address, for slow loads.
  std::vector<TensorData> many_tensors(int count, uint32_t seed) {
    std::vector<TensorData> out;
    for (int i = 0; i < count; ++i)
      out.push_back(random_tensor("t" + std::to_string(1000 + i), DType::kF32, {1024},
                                  seed + static_cast<uint32_t>(i)));
    return out;
  }

  ResolvedModel resolve(const std::string& path, std::optional<DType> dtype = std::nullopt,
                        std::string tag = "") {
    ModelSpec spec;
    spec.source = path;
    spec.dtype = dtype;
    spec.tag = std::move(tag);
    auto r = store->resolve(spec);
    EXPECT_TRUE(r.ok()) << r.error().to_string();
    return r.ok() ? std::move(r).value() : ResolvedModel{};
  }

  // Polls until the model is loaded or errored.
  ModelStatus wait_final(const std::string& key, std::chrono::milliseconds timeout = 10s) {
    auto deadline = std::chrono::steady_clock::now() + timeout;
    ModelStatus s = store->status(key);
    while (!is_final(s.state) && std::chrono::steady_clock::now() < deadline) {
      std::this_thread::sleep_for(2ms);
      s = store->status(key);
    }
    return s;
  }

  static bool wait_until(const std::function<bool()>& pred,
                         std::chrono::milliseconds timeout = 10s) {
    auto deadline = std::chrono::steady_clock::now() + timeout;
    while (!pred()) {
      if (std::chrono::steady_clock::now() > deadline) return false;
      std::this_thread::sleep_for(1ms);
    }
    return true;
  }

  // The grant's exports hold every tensor of `path` with the expected bytes.
  void expect_grant_bytes(const LeaseGrant& grant, const std::string& path,
                          std::optional<DType> cast = std::nullopt) {
    const auto& tensors = models.at(path);
    ASSERT_TRUE(grant.tensors);
    ASSERT_EQ(grant.tensors->size(), tensors.size());
    ASSERT_TRUE(grant.slab);
    std::vector<std::unique_ptr<memory::MappedSegment>> mapped;
    auto exports = grant.slab->export_segments();
    ASSERT_TRUE(exports.ok()) << exports.error().to_string();
    ASSERT_EQ(exports->size(), grant.exports.size());
    for (auto& e : *exports) {
      auto m = memory::import_segment(std::move(e), memory::ImportTarget{});
      ASSERT_TRUE(m.ok()) << m.error().to_string();
      mapped.push_back(std::move(m).value());
    }
    for (const auto& t : tensors) {
      SCOPED_TRACE(t.name);
      auto info = std::find_if(grant.tensors->begin(), grant.tensors->end(),
                               [&](const auto& i) { return i.name == t.name; });
      ASSERT_NE(info, grant.tensors->end());
      DType target = t.dtype;
      if (cast && dtype_is_float_convertible(t.dtype)) target = *cast;
      EXPECT_EQ(info->dtype, target);
      EXPECT_EQ(info->shape, t.shape);
      std::string want = t.bytes;
      if (target != t.dtype) {
        size_t n = t.bytes.size() / dtype_size(t.dtype);
        want.assign(n * dtype_size(target), '\0');
        ASSERT_TRUE(
            checkpoint::convert_elements(t.dtype, target, t.bytes.data(), want.data(), n).ok());
      }
      ASSERT_EQ(info->nbytes, want.size());
      ASSERT_LT(info->segment, mapped.size());
      ASSERT_LE(info->offset + want.size(), mapped[info->segment]->size());
      const char* p = static_cast<const char*>(mapped[info->segment]->address()) + info->offset;
      EXPECT_EQ(std::memcmp(p, want.data(), want.size()), 0);
    }
  }

  TempDir root;
  std::map<std::string, std::vector<TensorData>> models;
  std::shared_ptr<BackendCounters> counters = std::make_shared<BackendCounters>();
  Recorder recorder;
  std::unique_ptr<ModelStore> store;  // last: destroyed first
};

TEST_F(ModelStoreTest, LoadsAModel) {
  make_store();
  std::string path = write_model("m", small_tensors(1));
  ResolvedModel model = resolve(path);
  EXPECT_EQ(store->status(model.key).state, ModelState::kReady);
  ModelStatus started = store->ensure_loading(model);
  EXPECT_EQ(started.state, ModelState::kLoading);
  EXPECT_EQ(started.key, model.key);
  EXPECT_EQ(started.id, short_id(model.key));
  EXPECT_EQ(started.source, path);

  ModelStatus s = wait_final(model.key);
  ASSERT_EQ(s.state, ModelState::kLoaded) << s.message;
  uint64_t total = 0;
  for (const auto& t : models[path]) total += t.bytes.size();
  EXPECT_EQ(s.bytes_total, total);
  EXPECT_EQ(s.bytes_done, total);
  EXPECT_DOUBLE_EQ(s.progress(), 1.0);
  EXPECT_EQ(s.tensors, 5u);
  EXPECT_EQ(s.backend, "host");
  EXPECT_GT(s.slab_bytes, 0u);
  EXPECT_EQ(s.slab_bytes % testing::page_size(), 0u);
  EXPECT_EQ(s.error_code, StatusCode::kOk);
  EXPECT_EQ(store->slab_bytes(), s.slab_bytes);
  EXPECT_GT(s.seq, started.seq);
  auto listed = store->list();
  ASSERT_EQ(listed.size(), 1u);
  EXPECT_EQ(listed[0].key, model.key);
  EXPECT_EQ(listed[0].state, ModelState::kLoaded);

  // Asking again changes nothing.
  ModelStatus again = store->ensure_loading(model);
  EXPECT_EQ(again.state, ModelState::kLoaded);
  EXPECT_EQ(counters->allocations.load(), 1);

  auto grant = store->acquire(model.key);
  ASSERT_TRUE(grant.ok()) << grant.error().to_string();
  expect_grant_bytes(*grant, path);
  // Row-major strides.
  for (const auto& info : *grant->tensors) {
    ASSERT_EQ(info.strides.size(), info.shape.size());
    int64_t stride = 1;
    for (size_t d = info.shape.size(); d-- > 0;) {
      EXPECT_EQ(info.strides[d], stride) << info.name;
      stride *= info.shape[d];
    }
  }
  // The client-side exports too.
  for (auto& e : grant->exports) {
    EXPECT_EQ(e.kind, memory::SegmentKind::kHostMemfd);
    auto m = memory::import_segment(std::move(e), memory::ImportTarget{});
    ASSERT_TRUE(m.ok()) << m.error().to_string();
  }
}

TEST_F(ModelStoreTest, CastModelHoldsConvertedTensors) {
  make_store();
  std::string path = write_model("m", small_tensors(7));
  ResolvedModel bf16 = resolve(path, DType::kBF16);
  ResolvedModel stored = resolve(path);
  ASSERT_NE(bf16.key, stored.key);
  store->ensure_loading(bf16);
  store->ensure_loading(stored);
  ASSERT_EQ(wait_final(bf16.key).state, ModelState::kLoaded);
  ASSERT_EQ(wait_final(stored.key).state, ModelState::kLoaded);
  EXPECT_EQ(counters->allocations.load(), 2);
  auto g1 = store->acquire(bf16.key);
  auto g2 = store->acquire(stored.key);
  ASSERT_TRUE(g1.ok() && g2.ok());
  expect_grant_bytes(*g1, path, DType::kBF16);
  expect_grant_bytes(*g2, path);
}

TEST_F(ModelStoreTest, SixteenThreadsLoadOnce) {
  counters->hide_address = true;
  counters->write_delay_ms = 1;
  make_store(4);
  std::string path = write_model("m", many_tensors(20, 1));
  ResolvedModel model = resolve(path);
  std::latch start(16);
  std::vector<std::thread> threads;
  std::vector<ModelStatus> returned(16);
  for (int i = 0; i < 16; ++i) {
    threads.emplace_back([&, i] {
      start.arrive_and_wait();
      returned[static_cast<size_t>(i)] = store->ensure_loading(model);
    });
  }
  for (auto& t : threads) t.join();
  for (const auto& s : returned) {
    EXPECT_TRUE(s.state == ModelState::kLoading || s.state == ModelState::kLoaded)
        << model_state_name(s.state);
    EXPECT_EQ(s.key, model.key);
  }
  ASSERT_EQ(wait_final(model.key).state, ModelState::kLoaded);
  EXPECT_EQ(counters->allocations.load(), 1);
  EXPECT_EQ(counters->live_slabs.load(), 1);
  // One load started: one transition into loading (the only event before bytes_total is known).
  int starts = 0;
  for (const auto& e : recorder.events(model.key))
    if (e.status.state == ModelState::kLoading && e.status.bytes_total == 0) ++starts;
  EXPECT_EQ(starts, 1);
  // Every caller that came later sees the same load.
  for (const auto& s : returned) EXPECT_EQ(s.id, short_id(model.key));
}

TEST_F(ModelStoreTest, SeveralModelsLoadTogether) {
  make_store(2);
  std::vector<ResolvedModel> resolved;
  std::vector<std::string> paths;
  for (int i = 0; i < 5; ++i) {
    paths.push_back(write_model("m" + std::to_string(i), small_tensors(10 + 10 * i)));
    resolved.push_back(resolve(paths.back()));
  }
  resolved.push_back(resolve(paths[0], DType::kF16));
  resolved.push_back(resolve(paths[0], std::nullopt, "tagged"));
  for (const auto& m : resolved) store->ensure_loading(m);
  for (const auto& m : resolved) ASSERT_EQ(wait_final(m.key).state, ModelState::kLoaded) << m.key;
  EXPECT_EQ(counters->allocations.load(), 7);
  EXPECT_EQ(store->list().size(), 7u);
  uint64_t total = 0;
  for (const auto& s : store->list()) total += s.slab_bytes;
  EXPECT_EQ(store->slab_bytes(), total);
  for (size_t i = 0; i < 5; ++i) {
    auto g = store->acquire(resolved[i].key);
    ASSERT_TRUE(g.ok());
    expect_grant_bytes(*g, paths[i]);
  }
  auto g = store->acquire(resolved[5].key);
  ASSERT_TRUE(g.ok());
  expect_grant_bytes(*g, paths[0], DType::kF16);
}

TEST_F(ModelStoreTest, ListenerSeesLoadingThenLoaded) {
  counters->hide_address = true;
  counters->write_delay_ms = 5;  // a load long enough for progress events
  make_store();
  std::string path = write_model("m", many_tensors(60, 3));
  ResolvedModel model = resolve(path);
  ModelStatus started = store->ensure_loading(model);
  ASSERT_EQ(wait_final(model.key).state, ModelState::kLoaded);
  ASSERT_TRUE(recorder.wait_for(
      model.key, [](const ModelStatus& s) { return s.state == ModelState::kLoaded; }));

  auto events = recorder.events(model.key);
  ASSERT_GE(events.size(), 4u);  // loading, bytes_total known, progress..., loaded
  // Each thread hands its events over in the order it made them.
  std::map<std::thread::id, uint64_t> last_by_thread;
  for (const auto& e : events) {
    uint64_t& last = last_by_thread[e.thread];
    EXPECT_GT(e.status.seq, last);
    last = e.status.seq;
  }
  // In seq order: loading with growing progress, then loaded with everything read.
  auto ordered = recorder.by_seq(model.key);
  EXPECT_EQ(ordered.front().seq, started.seq);
  EXPECT_EQ(ordered.front().state, ModelState::kLoading);
  EXPECT_EQ(ordered.front().bytes_done, 0u);
  for (size_t i = 1; i < ordered.size(); ++i) {
    EXPECT_GT(ordered[i].seq, ordered[i - 1].seq) << "seq repeats";
    EXPECT_GE(ordered[i].bytes_done, ordered[i - 1].bytes_done);
  }
  for (size_t i = 0; i + 1 < ordered.size(); ++i)
    EXPECT_EQ(ordered[i].state, ModelState::kLoading) << i;
  const ModelStatus& last = ordered.back();
  EXPECT_EQ(last.state, ModelState::kLoaded);
  EXPECT_EQ(last.bytes_total, 60u * 4096u);
  EXPECT_EQ(last.bytes_done, last.bytes_total);
  EXPECT_EQ(last.tensors, 60u);
  // Some progress in between (the load takes ~300 ms, events are ~10 a second).
  int partial = 0;
  for (const auto& s : ordered)
    if (s.bytes_done > 0 && s.bytes_done < s.bytes_total) ++partial;
  EXPECT_GE(partial, 1);
  // What a subscriber keeps when it drops anything not newer than what it has: ends loaded.
  uint64_t seen = 0;
  ModelState state = ModelState::kReady;
  for (const auto& e : events) {
    if (e.status.seq <= seen) continue;
    seen = e.status.seq;
    state = e.status.state;
  }
  EXPECT_EQ(state, ModelState::kLoaded);
}

TEST_F(ModelStoreTest, BadCheckpointIsAnErrorAndARetryAfterTheFixLoads) {
  make_store();
  std::string dir = root / "bad";
  std::string file = dir + "/model.safetensors";
  // A header whose tensor runs past the data.
  std::string header = R"({"w":{"dtype":"F32","shape":[100],"data_offsets":[0,400]}})";
  testing::write_file(file, testing::le64(header.size()) + header + std::string(40, '\0'));
  ResolvedModel model = resolve(dir);
  store->ensure_loading(model);
  ModelStatus s = wait_final(model.key);
  ASSERT_EQ(s.state, ModelState::kError);
  EXPECT_EQ(s.error_code, StatusCode::kBadCheckpoint);
  EXPECT_NE(s.message.find(file), std::string::npos) << s.message;
  EXPECT_EQ(s.slab_bytes, 0u);
  EXPECT_EQ(counters->allocations.load(), 0);
  ASSERT_TRUE(recorder.wait_for(model.key, [](const ModelStatus& e) {
    return e.state == ModelState::kError && e.error_code == StatusCode::kBadCheckpoint &&
           !e.message.empty();
  }));
  auto grant = store->acquire(model.key);
  ASSERT_FALSE(grant.ok());
  EXPECT_EQ(grant.error().code, StatusCode::kNotReady);

  // Fixed on disk: asking again loads it.
  write_model("bad", small_tensors(5));
  ModelStatus retry = store->ensure_loading(model);
  EXPECT_EQ(retry.state, ModelState::kLoading);
  EXPECT_EQ(retry.error_code, StatusCode::kOk);
  EXPECT_TRUE(retry.message.empty());
  s = wait_final(model.key);
  ASSERT_EQ(s.state, ModelState::kLoaded) << s.message;
  EXPECT_TRUE(s.message.empty());
  auto g = store->acquire(model.key);
  ASSERT_TRUE(g.ok());
  expect_grant_bytes(*g, dir);
}

TEST_F(ModelStoreTest, UnknownDtypeCheckpointIsUnknownDtype) {
  make_store();
  std::string dir = root / "f4";
  std::string header = R"({"w":{"dtype":"F4","shape":[8],"data_offsets":[0,4]}})";
  testing::write_file(dir + "/model.safetensors",
                      testing::le64(header.size()) + header + std::string(4, '\0'));
  ResolvedModel model = resolve(dir);
  store->ensure_loading(model);
  ModelStatus s = wait_final(model.key);
  ASSERT_EQ(s.state, ModelState::kError);
  EXPECT_EQ(s.error_code, StatusCode::kUnknownDtype) << s.message;
  EXPECT_NE(s.message.find("F4"), std::string::npos) << s.message;
}

TEST_F(ModelStoreTest, ShardOutsideTheRootsFailsTheLoad) {
  make_store();
  TempDir outside;
  testing::write_file(outside / "x.safetensors",
                      safetensors_file({random_tensor("w", DType::kF32, {4}, 1)}));
  std::string dir = root / "sneaky";
  std::filesystem::create_directories(dir);
  std::filesystem::create_symlink(outside / "x.safetensors", dir + "/model.safetensors");
  ResolvedModel model = resolve(dir);  // the directory itself is inside
  store->ensure_loading(model);
  ModelStatus s = wait_final(model.key);
  ASSERT_EQ(s.state, ModelState::kError);
  EXPECT_EQ(s.error_code, StatusCode::kNotPermitted) << s.message;
  EXPECT_EQ(counters->allocations.load(), 0);
}

TEST_F(ModelStoreTest, AcquireNeedsALoadedModel) {
  counters->hide_address = true;
  counters->write_delay_ms = 20;
  make_store();
  auto unknown = store->acquire("source=/nowhere;dtype=stored;tp=0/1");
  ASSERT_FALSE(unknown.ok());
  EXPECT_EQ(unknown.error().code, StatusCode::kNotReady);

  std::string path = write_model("m", many_tensors(20, 1));
  ResolvedModel model = resolve(path);
  store->ensure_loading(model);
  auto loading = store->acquire(model.key);
  ASSERT_FALSE(loading.ok());
  EXPECT_EQ(loading.error().code, StatusCode::kNotReady);
  EXPECT_EQ(store->status(model.key).leases, 0u);
  counters->write_delay_ms = 0;
  ASSERT_EQ(wait_final(model.key).state, ModelState::kLoaded);
  EXPECT_TRUE(store->acquire(model.key).ok());
}

TEST_F(ModelStoreTest, LeasesAreCounted) {
  make_store();
  std::string path = write_model("m", small_tensors(1));
  ResolvedModel model = resolve(path);
  store->ensure_loading(model);
  ASSERT_EQ(wait_final(model.key).state, ModelState::kLoaded);

  auto a = store->acquire(model.key);
  auto b = store->acquire(model.key);
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_EQ(a->status.leases, 1u);
  EXPECT_EQ(b->status.leases, 2u);
  EXPECT_EQ(a->generation, b->generation);
  EXPECT_EQ(a->slab, b->slab);
  EXPECT_EQ(store->status(model.key).leases, 2u);
  EXPECT_EQ(store->total_leases(), 2u);

  store->release(model.key, a->generation + 1);  // another load's lease: ignored
  store->release("source=/nowhere", a->generation);
  EXPECT_EQ(store->total_leases(), 2u);
  store->release(model.key, a->generation);
  EXPECT_EQ(store->status(model.key).leases, 1u);
  store->release(model.key, b->generation);
  EXPECT_EQ(store->total_leases(), 0u);
  store->release(model.key, b->generation);  // one too many: stays at zero
  EXPECT_EQ(store->status(model.key).leases, 0u);

  // No leases: a plain unload works.
  auto unloaded = store->unload(model.key, false);
  ASSERT_TRUE(unloaded.ok()) << unloaded.error().to_string();
  EXPECT_EQ(unloaded->state, ModelState::kUnloaded);
}

TEST_F(ModelStoreTest, UnloadWithLeasesNeedsForceAndLeasesKeepTheMemory) {
  make_store();
  std::string path = write_model("m", small_tensors(2));
  ResolvedModel model = resolve(path);
  store->ensure_loading(model);
  ASSERT_EQ(wait_final(model.key).state, ModelState::kLoaded);
  auto grant = store->acquire(model.key);
  ASSERT_TRUE(grant.ok());

  auto refused = store->unload(model.key, false);
  ASSERT_FALSE(refused.ok());
  EXPECT_EQ(refused.error().code, StatusCode::kModelInUse);
  EXPECT_EQ(store->status(model.key).state, ModelState::kLoaded);

  auto forced = store->unload(model.key, true);
  ASSERT_TRUE(forced.ok()) << forced.error().to_string();
  EXPECT_EQ(forced->state, ModelState::kUnloaded);
  EXPECT_EQ(forced->slab_bytes, 0u);
  EXPECT_EQ(store->status(model.key).state, ModelState::kReady);  // not held any more
  EXPECT_TRUE(store->list().empty());
  EXPECT_EQ(store->slab_bytes(), 0u);
  EXPECT_EQ(store->total_leases(), 0u);
  auto after = store->acquire(model.key);
  ASSERT_FALSE(after.ok());
  EXPECT_EQ(after.error().code, StatusCode::kNotReady);
  ASSERT_TRUE(recorder.wait_for(
      model.key, [](const ModelStatus& s) { return s.state == ModelState::kUnloaded; }));

  // The lease's slab lives on: its exports still import, with the bytes.
  EXPECT_EQ(counters->live_slabs.load(), 1);
  expect_grant_bytes(*grant, path);
  for (auto& e : grant->exports) {
    uint64_t size = e.size;
    auto m = memory::import_segment(std::move(e), memory::ImportTarget{});
    ASSERT_TRUE(m.ok()) << m.error().to_string();
    EXPECT_EQ((*m)->size(), size);
  }
  store->release(model.key, grant->generation);  // late release of a dropped model: harmless
  grant->slab.reset();
  EXPECT_EQ(counters->live_slabs.load(), 0);
}

TEST_F(ModelStoreTest, StaleReleaseDoesNotDropALeaseOfTheNextLoad) {
  make_store();
  std::string path = write_model("m", small_tensors(3));
  ResolvedModel model = resolve(path);
  store->ensure_loading(model);
  ASSERT_EQ(wait_final(model.key).state, ModelState::kLoaded);
  auto old_lease = store->acquire(model.key);
  ASSERT_TRUE(old_lease.ok());
  ASSERT_TRUE(store->unload(model.key, true).ok());

  store->ensure_loading(model);
  ASSERT_EQ(wait_final(model.key).state, ModelState::kLoaded);
  auto new_lease = store->acquire(model.key);
  ASSERT_TRUE(new_lease.ok());
  EXPECT_NE(new_lease->generation, old_lease->generation);
  // The client of the first load lets go: the second load's lease must still count.
  store->release(model.key, old_lease->generation);
  EXPECT_EQ(store->status(model.key).leases, 1u);
  auto refused = store->unload(model.key, false);
  ASSERT_FALSE(refused.ok());
  EXPECT_EQ(refused.error().code, StatusCode::kModelInUse);
}

TEST_F(ModelStoreTest, UnloadUnknownIsNotFoundAndShortIdsWork) {
  make_store();
  auto missing = store->unload("source=/nowhere;dtype=stored;tp=0/1", false);
  ASSERT_FALSE(missing.ok());
  EXPECT_EQ(missing.error().code, StatusCode::kNotFound);
  auto missing_id = store->unload("0123456789ab", true);
  ASSERT_FALSE(missing_id.ok());
  EXPECT_EQ(missing_id.error().code, StatusCode::kNotFound);

  std::string path = write_model("m", small_tensors(4));
  ResolvedModel model = resolve(path);
  ResolvedModel other = resolve(path, DType::kBF16);
  store->ensure_loading(model);
  store->ensure_loading(other);
  ASSERT_EQ(wait_final(model.key).state, ModelState::kLoaded);
  ASSERT_EQ(wait_final(other.key).state, ModelState::kLoaded);
  auto by_id = store->unload(short_id(model.key), false);
  ASSERT_TRUE(by_id.ok()) << by_id.error().to_string();
  EXPECT_EQ(by_id->key, model.key);
  EXPECT_EQ(by_id->state, ModelState::kUnloaded);
  EXPECT_EQ(store->status(model.key).state, ModelState::kReady);
  EXPECT_EQ(store->status(other.key).state, ModelState::kLoaded);  // only that one
  auto twice = store->unload(short_id(model.key), false);
  ASSERT_FALSE(twice.ok());
  EXPECT_EQ(twice.error().code, StatusCode::kNotFound);
}

TEST_F(ModelStoreTest, UnloadDuringALoadCancelsIt) {
  counters->hide_address = true;
  counters->write_delay_ms = 20;  // 100 tensors: ~2 s if nothing stops it
  make_store();
  std::string path = write_model("m", many_tensors(100, 9));
  ResolvedModel model = resolve(path);
  store->ensure_loading(model);
  ASSERT_TRUE(wait_until([&] { return counters->writes.load() >= 3; }));
  EXPECT_EQ(store->status(model.key).state, ModelState::kLoading);

  auto start = std::chrono::steady_clock::now();
  auto unloaded = store->unload(model.key, false);  // no leases while loading
  ASSERT_TRUE(unloaded.ok()) << unloaded.error().to_string();
  EXPECT_EQ(unloaded->state, ModelState::kUnloaded);
  // The worker stops at its next chunk and drops its slab.
  ASSERT_TRUE(wait_until([&] { return counters->live_slabs.load() == 0; }, 2s));
  EXPECT_LT(std::chrono::steady_clock::now() - start, 1s);
  EXPECT_LT(counters->writes.load(), 50);
  std::this_thread::sleep_for(50ms);  // anything late would show up now

  EXPECT_NE(store->status(model.key).state, ModelState::kLoaded);
  EXPECT_TRUE(store->list().empty());
  for (const auto& e : recorder.events(model.key))
    EXPECT_NE(e.status.state, ModelState::kLoaded) << "seq " << e.status.seq;
  auto ordered = recorder.by_seq(model.key);
  ASSERT_FALSE(ordered.empty());
  EXPECT_EQ(ordered.back().state, ModelState::kUnloaded);

  // Asking again afterwards loads it, fully.
  counters->write_delay_ms = 0;
  ModelStatus again = store->ensure_loading(model);
  EXPECT_EQ(again.state, ModelState::kLoading);
  EXPECT_GT(again.seq, ordered.back().seq);
  ModelStatus s = wait_final(model.key);
  ASSERT_EQ(s.state, ModelState::kLoaded) << s.message;
  EXPECT_EQ(s.bytes_done, s.bytes_total);
  EXPECT_EQ(counters->allocations.load(), 2);
  auto g = store->acquire(model.key);
  ASSERT_TRUE(g.ok());
  expect_grant_bytes(*g, path);
}

TEST_F(ModelStoreTest, UnloadOfAQueuedLoadNeverStartsIt) {
  counters->hide_address = true;
  counters->write_delay_ms = 20;
  make_store(1);  // one worker: the second load waits in the queue
  std::string busy = write_model("busy", many_tensors(100, 1));
  std::string queued = write_model("queued", small_tensors(2));
  ResolvedModel busy_model = resolve(busy);
  ResolvedModel queued_model = resolve(queued);
  store->ensure_loading(busy_model);
  ASSERT_TRUE(wait_until([&] { return counters->writes.load() >= 1; }));
  store->ensure_loading(queued_model);
  ASSERT_TRUE(store->unload(queued_model.key, false).ok());
  ASSERT_TRUE(store->unload(busy_model.key, false).ok());
  ASSERT_TRUE(wait_until([&] { return counters->live_slabs.load() == 0; }, 2s));
  std::this_thread::sleep_for(50ms);
  EXPECT_EQ(counters->allocations.load(), 1);  // the queued one never allocated
  EXPECT_TRUE(store->list().empty());
}

TEST_F(ModelStoreTest, DestroyingTheStoreDuringALoadIsPrompt) {
  counters->hide_address = true;
  counters->write_delay_ms = 20;  // 200 tensors: ~4 s if nothing stops it
  make_store();
  std::string a = write_model("a", many_tensors(200, 1));
  std::string b = write_model("b", many_tensors(200, 2));
  std::string c = write_model("c", many_tensors(200, 3));
  store->ensure_loading(resolve(a));
  store->ensure_loading(resolve(b));
  store->ensure_loading(resolve(c));  // queued behind the two workers
  ASSERT_TRUE(wait_until([&] { return counters->writes.load() >= 4; }));
  auto start = std::chrono::steady_clock::now();
  store.reset();
  auto took = std::chrono::steady_clock::now() - start;
  EXPECT_LT(took, 1s) << std::chrono::duration<double>(took).count() << " s";
  EXPECT_EQ(counters->live_slabs.load(), 0);
  EXPECT_EQ(counters->allocations.load(), 2);  // the queued load never started
  for (const auto& path : {a, b, c}) {
    ModelSpec spec;
    spec.source = path;
    for (const auto& e : recorder.events(canonical_key(spec, {path, "", ""})))
      EXPECT_NE(e.status.state, ModelState::kLoaded) << path;
  }
}

TEST_F(ModelStoreTest, ErroredModelCanBeUnloaded) {
  make_store();
  std::string dir = root / "bad";
  testing::write_file(dir + "/model.safetensors", "garbage");
  ResolvedModel model = resolve(dir);
  store->ensure_loading(model);
  ASSERT_EQ(wait_final(model.key).state, ModelState::kError);
  auto r = store->unload(model.key, false);
  ASSERT_TRUE(r.ok()) << r.error().to_string();
  EXPECT_EQ(r->state, ModelState::kUnloaded);
  EXPECT_TRUE(store->list().empty());
}

}  // namespace
}  // namespace companion::server
