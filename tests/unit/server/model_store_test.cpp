// ModelStore with the host backend and real checkpoints: single-flight loads, the state machine
// as listeners see it, errors and retries, leases, unloads (forced, during loads, by id) and
// shutting down during a load.
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <functional>
#include <future>
#include <latch>
#include <map>
#include <mutex>
#include <new>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include <gtest/gtest.h>

#include "checkpoint/dtype_convert.hpp"
#include "common/log.hpp"
#include "common/util.hpp"
#include "loader/layout.hpp"
#include "loader/loader.hpp"
#include "protocol/limits.hpp"
#include "server/model_store.hpp"
#include "server/store_entry.hpp"
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

  ModelStore& make_store(size_t threads = 2,
                         const std::function<void(StoreConfig&)>& tweak = nullptr) {
    StoreConfig config;
    config.model_roots = {root.path()};
    config.hf_cache = root / "hf";
    config.load_threads = threads;
    if (tweak) tweak(config);
    EXPECT_TRUE(config.validate().ok());
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
    ASSERT_TRUE(grant.table);
    const protocol::TensorTableView& table = grant.table->view();
    ASSERT_EQ(table.size(), tensors.size());
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
      size_t index = table.find(t.name);
      ASSERT_NE(index, protocol::TensorTableView::npos);
      const protocol::TensorRef found = table[index];
      const protocol::TensorRef* info = &found;
      DType target = t.dtype;
      if (cast && dtype_is_float_convertible(t.dtype)) target = *cast;
      EXPECT_EQ(info->dtype, target);
      EXPECT_EQ(std::vector<int64_t>(info->shape.begin(), info->shape.end()), t.shape);
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
  ModelStatus started = *store->ensure_loading(model);
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
  ModelStatus again = *store->ensure_loading(model);
  EXPECT_EQ(again.state, ModelState::kLoaded);
  EXPECT_EQ(counters->allocations.load(), 1);

  auto grant = store->acquire(model.key);
  ASSERT_TRUE(grant.ok()) << grant.error().to_string();
  expect_grant_bytes(*grant, path);
  // Row-major strides.
  for (size_t i = 0; i < grant->table->size(); ++i) {
    const protocol::TensorRef info = grant->table->view()[i];
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
  ASSERT_TRUE(store->ensure_loading(bf16).ok());
  ASSERT_TRUE(store->ensure_loading(stored).ok());
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
      returned[static_cast<size_t>(i)] = *store->ensure_loading(model);
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
  for (const auto& m : resolved) ASSERT_TRUE(store->ensure_loading(m).ok());
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
  ModelStatus started = *store->ensure_loading(model);
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
  ASSERT_TRUE(store->ensure_loading(model).ok());
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
  ModelStatus retry = *store->ensure_loading(model);
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
  ASSERT_TRUE(store->ensure_loading(model).ok());
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
  ASSERT_TRUE(store->ensure_loading(model).ok());
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
  ASSERT_TRUE(store->ensure_loading(model).ok());
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
  ASSERT_TRUE(store->ensure_loading(model).ok());
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
  ASSERT_TRUE(store->ensure_loading(model).ok());
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
  // The store hands the memory of dropped models to a worker to free.
  EXPECT_TRUE(wait_until([&] { return counters->live_slabs.load() == 0; }));
}

TEST_F(ModelStoreTest, StaleReleaseDoesNotDropALeaseOfTheNextLoad) {
  make_store();
  std::string path = write_model("m", small_tensors(3));
  ResolvedModel model = resolve(path);
  ASSERT_TRUE(store->ensure_loading(model).ok());
  ASSERT_EQ(wait_final(model.key).state, ModelState::kLoaded);
  auto old_lease = store->acquire(model.key);
  ASSERT_TRUE(old_lease.ok());
  ASSERT_TRUE(store->unload(model.key, true).ok());

  ASSERT_TRUE(store->ensure_loading(model).ok());
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
  ASSERT_TRUE(store->ensure_loading(model).ok());
  ASSERT_TRUE(store->ensure_loading(other).ok());
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
  ASSERT_TRUE(store->ensure_loading(model).ok());
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
  ModelStatus again = *store->ensure_loading(model);
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
  ASSERT_TRUE(store->ensure_loading(busy_model).ok());
  ASSERT_TRUE(wait_until([&] { return counters->writes.load() >= 1; }));
  ASSERT_TRUE(store->ensure_loading(queued_model).ok());
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
  ASSERT_TRUE(store->ensure_loading(resolve(a)).ok());
  ASSERT_TRUE(store->ensure_loading(resolve(b)).ok());
  ASSERT_TRUE(store->ensure_loading(resolve(c)).ok());  // queued behind the two workers
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
  ASSERT_TRUE(store->ensure_loading(model).ok());
  ASSERT_EQ(wait_final(model.key).state, ModelState::kError);
  auto r = store->unload(model.key, false);
  ASSERT_TRUE(r.ok()) << r.error().to_string();
  EXPECT_EQ(r->state, ModelState::kUnloaded);
  EXPECT_TRUE(store->list().empty());
}

// ---- limits: models held, variants of one source, failed loads, key length ----------------

TEST_F(ModelStoreTest, LoadsPastMaxModelsAreRefusedAndCounted) {
  make_store(2, [](StoreConfig& c) { c.max_models = 3; });
  std::vector<ResolvedModel> held;
  for (int i = 0; i < 4; ++i)
    held.push_back(resolve(write_model("m" + std::to_string(i), small_tensors(40 + i))));
  for (int i = 0; i < 3; ++i) ASSERT_TRUE(store->ensure_loading(held[i]).ok());
  auto refused = store->ensure_loading(held[3]);
  ASSERT_FALSE(refused.ok());
  EXPECT_EQ(refused.error().code, StatusCode::kLimitExceeded);
  EXPECT_NE(refused.error().message.find("--max-models 3"), std::string::npos)
      << refused.error().message;
  EXPECT_EQ(store->refusal_counts()["models"], 1u);
  EXPECT_EQ(store->status(held[3].key).state, ModelState::kReady);  // nothing kept of it
  // Asking again for a held one is no new load.
  ASSERT_TRUE(store->ensure_loading(held[0]).ok());
  ASSERT_TRUE(store->unload(held[0].key, false).ok());
  ASSERT_TRUE(store->ensure_loading(held[3]).ok());
  EXPECT_EQ(wait_final(held[3].key).state, ModelState::kLoaded);
  EXPECT_EQ(store->list().size(), 3u);
}

TEST_F(ModelStoreTest, TagFloodOfOneSourceIsBoundedByMaxVariants) {
  make_store(2, [](StoreConfig& c) { c.max_variants_per_source = 8; });
  std::string path = write_model("m", small_tensors(7));
  int accepted = 0;
  int refused = 0;
  for (int i = 0; i < 300; ++i) {
    auto r = store->ensure_loading(resolve(path, std::nullopt, "tag" + std::to_string(i)));
    if (r.ok()) {
      ++accepted;
    } else {
      EXPECT_EQ(r.error().code, StatusCode::kLimitExceeded);
      EXPECT_NE(r.error().message.find("--max-variants-per-source 8"), std::string::npos);
      ++refused;
    }
  }
  EXPECT_EQ(accepted, 8);
  EXPECT_EQ(refused, 292);
  EXPECT_EQ(store->refusal_counts()["variants_per_source"], 292u);
  EXPECT_EQ(store->list().size(), 8u);
  EXPECT_LE(counters->allocations.load(), 8);
  // Other sources are not affected.
  auto other =
      store->ensure_loading(resolve(write_model("other", small_tensors(8)), std::nullopt, "tag0"));
  EXPECT_TRUE(other.ok());
}

TEST_F(ModelStoreTest, FailedLoadsAreBoundedOldestFirst) {
  make_store(2, [](StoreConfig& c) { c.max_error_entries = 3; });
  std::string dir = root / "bad";
  testing::write_file(dir + "/model.safetensors", "garbage");
  std::vector<std::string> keys;
  for (int i = 0; i < 6; ++i) {
    ResolvedModel model = resolve(dir, std::nullopt, "t" + std::to_string(i));
    ASSERT_TRUE(store->ensure_loading(model).ok());
    ASSERT_EQ(wait_final(model.key).state, ModelState::kError);
    keys.push_back(model.key);
  }
  auto listed = store->list();
  EXPECT_LE(listed.size(), 3u);
  EXPECT_EQ(store->refusal_counts()["error_entries"], 3u);
  // The newest are kept, the oldest dropped (and listeners told).
  EXPECT_EQ(store->status(keys.back()).state, ModelState::kError);
  EXPECT_EQ(store->status(keys.front()).state, ModelState::kReady);
  EXPECT_EQ(recorder.by_seq(keys.front()).back().state, ModelState::kUnloaded);
}

TEST_F(ModelStoreTest, FailedLoadsExpire) {
  make_store(2, [](StoreConfig& c) { c.error_ttl = 200ms; });
  std::string dir = root / "bad";
  testing::write_file(dir + "/model.safetensors", "garbage");
  std::vector<std::string> keys;
  for (int i = 0; i < 2; ++i) {
    ResolvedModel model = resolve(dir, std::nullopt, "t" + std::to_string(i));
    ASSERT_TRUE(store->ensure_loading(model).ok());
    ASSERT_EQ(wait_final(model.key).state, ModelState::kError);
    keys.push_back(model.key);
  }
  // After the TTL nothing is listed, and the next load drops them for good.
  ASSERT_TRUE(wait_until([&] { return store->list().empty(); }, 5s));
  ASSERT_TRUE(store->ensure_loading(resolve(write_model("good", small_tensors(3)))).ok());
  EXPECT_EQ(store->refusal_counts()["errors_expired"], 2u);
  EXPECT_EQ(store->status(keys.back()).state, ModelState::kReady);
}

TEST_F(ModelStoreTest, ErrorMessagesInStatusAreBounded) {
  make_store();
  // A tensor name near the 4 KiB name limit makes for a long error.
  std::string name(4000, 'n');
  std::string dir = root / "long";
  std::string file = safetensors_file({random_tensor(name, DType::kF32, {4}, 1)});
  testing::write_file(dir + "/model.safetensors", file.substr(0, file.size() - 4));  // truncated
  ResolvedModel model = resolve(dir);
  ASSERT_TRUE(store->ensure_loading(model).ok());
  ModelStatus s = wait_final(model.key);
  ASSERT_EQ(s.state, ModelState::kError);
  EXPECT_LE(s.message.size(), protocol::kMaxStatusMessageBytes);
}

TEST_F(ModelStoreTest, SpecsWhoseKeysWouldPassTheWireLimitAreRefused) {
  make_store();
  std::string path = write_model("m", small_tensors(1));
  ModelSpec spec;
  spec.source = path;
  spec.tag = std::string(9000, 't');
  auto r = store->resolve(spec);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code, StatusCode::kInvalidArgument);
  // Shard rules that escape to three times their size.
  spec.tag.clear();
  spec.tp_size = 2;
  spec.shard_rules = std::string(3000, '%') + "=column";
  r = store->resolve(spec);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code, StatusCode::kInvalidArgument);
  // At the bounds, every key fits the wire.
  spec.shard_rules = std::string(protocol::kMaxShardRulesBytes - 7, '%') + "=column";
  spec.tag = std::string(protocol::kMaxTagBytes, 't');
  spec.tp_size = 4000000000u;
  spec.tp_rank = 3999999999u;
  ASSERT_TRUE(spec.validate().ok()) << spec.validate().error().to_string();
  std::string long_source = "/" + std::string(protocol::kMaxSourceBytes - 1, 's');
  EXPECT_LE(canonical_key(spec, {long_source, "", ""}).size(), protocol::kMaxStringBytes);
  // A key longer than the wire allows is never held, however it was made.
  ResolvedModel forged = resolve(path);
  forged.key += ";tag=" + std::string(protocol::kMaxStringBytes, 'x');
  auto refused = store->ensure_loading(forged);
  ASSERT_FALSE(refused.ok());
  EXPECT_EQ(refused.error().code, StatusCode::kInvalidArgument);
  EXPECT_TRUE(store->list().empty());
}

TEST_F(ModelStoreTest, TagsAndSourcesMustBeUtf8) {
  make_store();
  std::string path = write_model("m", small_tensors(1));
  ModelSpec spec;
  spec.source = path;
  spec.tag = "bad\xff\xfe";
  auto r = store->resolve(spec);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code, StatusCode::kInvalidArgument);
  EXPECT_NE(r.error().message.find("UTF-8"), std::string::npos);
  spec.tag = "caf\xc3\xa9";  // valid
  EXPECT_TRUE(store->resolve(spec).ok());
  spec.source = path + "\xc0\xaf";  // overlong '/'
  r = store->resolve(spec);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code, StatusCode::kInvalidArgument);
}

// ---- memory admission ------------------------------------------------------------------------

// Blocks every read until released (or 10 s, so that a broken store cannot hang the test).
class BlockingReadSource final : public loader::ReadSource {
 public:
  ssize_t pread(int fd, void* dst, size_t bytes, uint64_t offset) override {
    {
      std::unique_lock<std::mutex> lock(mutex_);
      ++blocked_;
      cv_.notify_all();
      cv_.wait_for(lock, 10s, [this] { return released_; });
      --blocked_;
    }
    return ::pread(fd, dst, bytes, static_cast<off_t>(offset));
  }
  bool wait_blocked(std::chrono::milliseconds timeout = 10s) {
    std::unique_lock<std::mutex> lock(mutex_);
    return cv_.wait_for(lock, timeout, [this] { return blocked_ > 0; });
  }
  void release() {
    std::lock_guard<std::mutex> lock(mutex_);
    released_ = true;
    cv_.notify_all();
  }

 private:
  std::mutex mutex_;
  std::condition_variable cv_;
  int blocked_ = 0;
  bool released_ = false;
};

TEST_F(ModelStoreTest, LoadsPastAvailableMemoryAreRefusedWithTheNumbers) {
  uint64_t page = testing::page_size();
  counters->available_bytes = static_cast<int64_t>(64 * page);
  make_store(2, [](StoreConfig& c) { c.memory_reserve_bytes = 0; });
  // 100 pages of F32: more than the 64 available.
  std::string big = write_model(
      "big", {random_tensor("w", DType::kF32, {static_cast<int64_t>(page / 4), 100}, 1)});
  ResolvedModel model = resolve(big);
  ASSERT_TRUE(store->ensure_loading(model).ok());
  ModelStatus s = wait_final(model.key);
  ASSERT_EQ(s.state, ModelState::kError);
  EXPECT_EQ(s.error_code, StatusCode::kOutOfMemory);
  EXPECT_NE(s.message.find("needs"), std::string::npos) << s.message;
  EXPECT_NE(s.message.find("available"), std::string::npos) << s.message;
  EXPECT_EQ(counters->allocations.load(), 0);  // refused before allocating
  EXPECT_EQ(store->refusal_counts()["memory"], 1u);
  // A model that fits loads; the reserve counts against it.
  std::string small = write_model(
      "small", {random_tensor("w", DType::kF32, {static_cast<int64_t>(page / 4), 8}, 2)});
  ASSERT_TRUE(store->ensure_loading(resolve(small)).ok());
  EXPECT_EQ(wait_final(resolve(small).key).state, ModelState::kLoaded);
  EXPECT_TRUE(wait_until([&] { return store->admitted_bytes() == 0; }));
}

TEST_F(ModelStoreTest, ConcurrentLoadsAreNeverOverCommitted) {
  uint64_t page = testing::page_size();
  counters->available_bytes = static_cast<int64_t>(150 * page);
  BlockingReadSource reads;
  make_store(2, [&](StoreConfig& c) {
    c.memory_reserve_bytes = 0;
    c.read_source = &reads;
  });
  auto tensor = [&](uint32_t seed) {
    return std::vector<TensorData>{
        random_tensor("w", DType::kF32, {static_cast<int64_t>(page / 4), 100}, seed)};
  };
  ResolvedModel a = resolve(write_model("a", tensor(1)));
  ResolvedModel b = resolve(write_model("b", tensor(2)));
  ASSERT_TRUE(store->ensure_loading(a).ok());
  ASSERT_TRUE(reads.wait_blocked());  // a is admitted (100 pages) and reading
  EXPECT_GE(store->admitted_bytes(), 100 * page);
  ASSERT_TRUE(store->ensure_loading(b).ok());
  ModelStatus sb = wait_final(b.key);
  ASSERT_EQ(sb.state, ModelState::kError);
  EXPECT_EQ(sb.error_code, StatusCode::kOutOfMemory);
  EXPECT_NE(sb.message.find("admitted to loads in flight"), std::string::npos) << sb.message;
  reads.release();
  EXPECT_EQ(wait_final(a.key).state, ModelState::kLoaded);
  EXPECT_TRUE(wait_until([&] { return store->admitted_bytes() == 0; }));
}

TEST_F(ModelStoreTest, MemoryTakenAtAllocationIsNotCountedTwice) {
  // GPU backends take the memory at allocate(): from then on the device's free memory shows it,
  // and the load in flight must no longer be counted on top.
  uint64_t page = testing::page_size();
  counters->available_bytes = static_cast<int64_t>(150 * page);
  counters->allocation_is_resident = true;
  BlockingReadSource reads;
  make_store(2, [&](StoreConfig& c) {
    c.memory_reserve_bytes = 0;
    c.read_source = &reads;
  });
  ResolvedModel a = resolve(write_model(
      "a", {random_tensor("w", DType::kF32, {static_cast<int64_t>(page / 4), 100}, 1)}));
  ASSERT_TRUE(store->ensure_loading(a).ok());
  ASSERT_TRUE(reads.wait_blocked());  // allocated, reading
  EXPECT_EQ(store->admitted_bytes(), 0u);
  reads.release();
  EXPECT_EQ(wait_final(a.key).state, ModelState::kLoaded);
}

// ---- the memory budget and eviction --------------------------------------------------------

// `pages` pages of F32 in one tensor: a slab of exactly that many pages.
std::vector<TensorData> pages_of(uint64_t pages, uint32_t seed) {
  return {random_tensor(
      "w", DType::kF32,
      {static_cast<int64_t>(testing::page_size() / 4), static_cast<int64_t>(pages)}, seed)};
}

TEST_F(ModelStoreTest, LoadsPastTheBudgetAreRefusedNamingWhatIsResidentAndLeased) {
  uint64_t page = testing::page_size();
  make_store(2, [&](StoreConfig& c) { c.memory_budget_bytes = 150 * page; });
  EXPECT_EQ(store->memory_budget(), 150 * page);
  ResolvedModel a = resolve(write_model("a", pages_of(100, 1)));
  ResolvedModel b = resolve(write_model("b", pages_of(100, 2)));
  ASSERT_TRUE(store->ensure_loading(a).ok());
  ASSERT_EQ(wait_final(a.key).state, ModelState::kLoaded);
  EXPECT_EQ(store->budget_used(), 100 * page);
  auto lease = store->acquire(a.key);
  ASSERT_TRUE(lease.ok());
  // b does not fit beside a, and a is leased: refused, and a stays.
  ASSERT_TRUE(store->ensure_loading(b).ok());
  ModelStatus sb = wait_final(b.key);
  ASSERT_EQ(sb.state, ModelState::kError);
  EXPECT_EQ(sb.error_code, StatusCode::kOutOfMemory);
  EXPECT_NE(sb.message.find("--memory-budget"), std::string::npos) << sb.message;
  EXPECT_NE(sb.message.find(short_id(a.key) + " " + a.spec.source), std::string::npos)
      << sb.message;
  EXPECT_NE(sb.message.find("1 lease(s)"), std::string::npos) << sb.message;
  EXPECT_NE(sb.message.find("no model is idle to evict"), std::string::npos) << sb.message;
  EXPECT_EQ(counters->allocations.load(), 1);  // b was refused before allocating
  EXPECT_EQ(store->refusal_counts()["memory"], 1u);
  EXPECT_EQ(store->status(a.key).state, ModelState::kLoaded);
  EXPECT_EQ(store->status(a.key).eviction_rank, 0u);  // leased: never evicted
  EXPECT_EQ(store->evictions(), 0u);
  // Released, a is idle: b's load evicts it and fits.
  store->release(lease->key, lease->generation);
  EXPECT_EQ(store->status(a.key).eviction_rank, 1u);
  lease = make_error(StatusCode::kCancelled, "dropped");
  ASSERT_TRUE(store->ensure_loading(b).ok());
  ASSERT_EQ(wait_final(b.key).state, ModelState::kLoaded);
  EXPECT_EQ(store->evictions(), 1u);
  EXPECT_EQ(store->status(a.key).state, ModelState::kReady);  // no longer held
  EXPECT_TRUE(recorder.wait_for(a.key, [](const ModelStatus& s) {
    return s.state == ModelState::kUnloaded && s.message.starts_with("evicted: ") &&
           s.message.find("--memory-budget") != std::string::npos;
  }));
  EXPECT_EQ(store->budget_used(), 100 * page);
  // A model larger than the whole budget is refused without evicting anything.
  ResolvedModel huge = resolve(write_model("huge", pages_of(200, 3)));
  ASSERT_TRUE(store->ensure_loading(huge).ok());
  ModelStatus sh = wait_final(huge.key);
  EXPECT_EQ(sh.error_code, StatusCode::kOutOfMemory);
  EXPECT_NE(sh.message.find("would not make room"), std::string::npos) << sh.message;
  EXPECT_EQ(store->status(b.key).state, ModelState::kLoaded);
  EXPECT_EQ(store->evictions(), 1u);
}

TEST_F(ModelStoreTest, EvictionTakesTheLeastRecentlyUsedFirst) {
  uint64_t page = testing::page_size();
  make_store(2, [&](StoreConfig& c) { c.memory_budget_bytes = 130 * page; });
  ResolvedModel a = resolve(write_model("a", pages_of(50, 1)));
  ResolvedModel b = resolve(write_model("b", pages_of(50, 2)));
  ResolvedModel c = resolve(write_model("c", pages_of(50, 3)));
  for (const auto* m : {&a, &b}) {
    ASSERT_TRUE(store->ensure_loading(*m).ok());
    ASSERT_EQ(wait_final(m->key).state, ModelState::kLoaded);
  }
  // a is used after b was loaded: b is now the least recently used.
  auto lease = store->acquire(a.key);
  ASSERT_TRUE(lease.ok());
  store->release(lease->key, lease->generation);
  std::map<std::string, ModelStatus> listed;
  for (const auto& s : store->list()) listed[s.key] = s;
  EXPECT_EQ(listed[b.key].eviction_rank, 1u);
  EXPECT_EQ(listed[a.key].eviction_rank, 2u);
  EXPECT_GE(listed[a.key].last_used_ms, listed[b.key].last_used_ms);
  EXPECT_GT(listed[b.key].last_used_ms, 0);
  // c needs one of them to go: b, not a.
  ASSERT_TRUE(store->ensure_loading(c).ok());
  ASSERT_EQ(wait_final(c.key).state, ModelState::kLoaded);
  EXPECT_EQ(store->status(b.key).state, ModelState::kReady);
  EXPECT_EQ(store->status(a.key).state, ModelState::kLoaded);
  EXPECT_EQ(store->evictions(), 1u);
  // An evicted model loads again as usual (evicting a, now the least recently used).
  ASSERT_TRUE(store->ensure_loading(b).ok());
  ASSERT_EQ(wait_final(b.key).state, ModelState::kLoaded);
  EXPECT_EQ(store->status(a.key).state, ModelState::kReady);
  EXPECT_EQ(store->status(c.key).state, ModelState::kLoaded);
  EXPECT_EQ(store->evictions(), 2u);
  EXPECT_LE(store->budget_used(), 130 * page);
}

TEST_F(ModelStoreTest, ConcurrentLoadsAreNeverOverCommittedAgainstTheBudget) {
  uint64_t page = testing::page_size();
  BlockingReadSource reads;
  make_store(2, [&](StoreConfig& c) {
    c.memory_budget_bytes = 150 * page;
    c.read_source = &reads;
  });
  ResolvedModel a = resolve(write_model("a", pages_of(100, 1)));
  ResolvedModel b = resolve(write_model("b", pages_of(100, 2)));
  ASSERT_TRUE(store->ensure_loading(a).ok());
  ASSERT_TRUE(reads.wait_blocked());  // a is admitted (100 pages) and reading
  EXPECT_EQ(store->budget_used(), 100 * page);
  // b's load runs while a's is in flight: a loading model is never evicted, and its bytes count.
  ASSERT_TRUE(store->ensure_loading(b).ok());
  ModelStatus sb = wait_final(b.key);
  ASSERT_EQ(sb.state, ModelState::kError);
  EXPECT_EQ(sb.error_code, StatusCode::kOutOfMemory);
  EXPECT_NE(sb.message.find("admitted to loads in flight"), std::string::npos) << sb.message;
  EXPECT_NE(sb.message.find("loading"), std::string::npos) << sb.message;
  reads.release();
  EXPECT_EQ(wait_final(a.key).state, ModelState::kLoaded);
  // Exact: a's slab, counted once, and nothing left admitted.
  EXPECT_EQ(store->budget_used(), 100 * page);
  ASSERT_TRUE(store->unload(a.key, false).ok());
  EXPECT_EQ(store->budget_used(), 0u);
}

TEST_F(ModelStoreTest, ManyConcurrentLoadsStayWithinTheBudget) {
  uint64_t page = testing::page_size();
  make_store(4, [&](StoreConfig& c) { c.memory_budget_bytes = 250 * page; });
  std::vector<ResolvedModel> loads;
  for (uint32_t i = 0; i < 8; ++i)
    loads.push_back(resolve(write_model("m" + std::to_string(i), pages_of(100, 10 * i))));
  std::atomic<bool> done{false};
  std::atomic<uint64_t> most{0};
  std::thread watcher([&] {
    while (!done) {
      uint64_t used = store->budget_used();
      if (used > most) most = used;
    }
  });
  for (const auto& m : loads) ASSERT_TRUE(store->ensure_loading(m).ok());
  // Each ends loaded, refused, or loaded and then evicted by a later one.
  EXPECT_TRUE(wait_until([&] {
    for (const auto& s : store->list())
      if (s.state == ModelState::kLoading) return false;
    return true;
  }));
  done = true;
  watcher.join();
  EXPECT_LE(most.load(), 250 * page);
  EXPECT_LE(store->slab_bytes(), 250 * page);
  EXPECT_EQ(store->budget_used(), store->slab_bytes());
  EXPECT_TRUE(wait_until([&] { return store->admitted_bytes() == 0; }));
}

TEST_F(ModelStoreTest, ModelsNoClientHeldForIdleEvictAreEvicted) {
  make_store(2, [&](StoreConfig& c) { c.idle_evict = std::chrono::hours(1); });
  ResolvedModel a = resolve(write_model("a", small_tensors(1)));
  ResolvedModel b = resolve(write_model("b", small_tensors(10)));
  for (const auto* m : {&a, &b}) {
    ASSERT_TRUE(store->ensure_loading(*m).ok());
    ASSERT_EQ(wait_final(m->key).state, ModelState::kLoaded);
  }
  auto lease = store->acquire(b.key);
  ASSERT_TRUE(lease.ok());
  auto now = std::chrono::steady_clock::now();
  store->evict_idle(now);  // nothing is idle for an hour yet
  EXPECT_EQ(store->status(a.key).state, ModelState::kLoaded);
  store->evict_idle(now + std::chrono::hours(2));
  EXPECT_EQ(store->status(a.key).state, ModelState::kReady);
  EXPECT_EQ(store->status(b.key).state, ModelState::kLoaded);  // leased
  EXPECT_EQ(store->evictions(), 1u);
  EXPECT_TRUE(recorder.wait_for(a.key, [](const ModelStatus& s) {
    return s.state == ModelState::kUnloaded && s.message.find("--idle-evict") != std::string::npos;
  }));
  // Idle from its release on.
  store->release(lease->key, lease->generation);
  auto released = std::chrono::steady_clock::now();
  store->evict_idle(released + std::chrono::minutes(59));
  EXPECT_EQ(store->status(b.key).state, ModelState::kLoaded);
  store->evict_idle(released + std::chrono::hours(2));
  EXPECT_EQ(store->status(b.key).state, ModelState::kReady);
  EXPECT_EQ(store->evictions(), 2u);
  EXPECT_TRUE(wait_until([&] { return counters->live_slabs.load() == 1; }));  // b's lease's
  lease = make_error(StatusCode::kCancelled, "dropped");
  EXPECT_TRUE(wait_until([&] { return counters->live_slabs.load() == 0; }));
  // Loaded again as usual.
  ASSERT_TRUE(store->ensure_loading(a).ok());
  EXPECT_EQ(wait_final(a.key).state, ModelState::kLoaded);
}

TEST_F(ModelStoreTest, AModelWithAParkedWaiterIsNotEvictedUntilTheHoldGoes) {
  uint64_t page = testing::page_size();
  make_store(2, [&](StoreConfig& c) {
    c.memory_budget_bytes = 80 * page;
    c.idle_evict = std::chrono::hours(1);
  });
  ResolvedModel a = resolve(write_model("a", pages_of(50, 1)));
  ResolvedModel b = resolve(write_model("b", pages_of(50, 2)));
  auto hold = store->hold_for_waiter(a.key);  // parked before its load
  ASSERT_TRUE(store->ensure_loading(a).ok());
  ASSERT_EQ(wait_final(a.key).state, ModelState::kLoaded);
  auto copy = hold;  // a waiter's copies share one hold
  EXPECT_EQ(store->status(a.key).eviction_rank, 0u);
  store->evict_idle(std::chrono::steady_clock::now() + std::chrono::hours(2));
  EXPECT_EQ(store->status(a.key).state, ModelState::kLoaded);
  // b cannot have a's room, and is told why.
  ASSERT_TRUE(store->ensure_loading(b).ok());
  ModelStatus refused = wait_final(b.key);
  ASSERT_EQ(refused.state, ModelState::kError);
  EXPECT_EQ(refused.error_code, StatusCode::kOutOfMemory);
  EXPECT_NE(refused.message.find("a client is waiting for it"), std::string::npos)
      << refused.message;
  hold.reset();
  EXPECT_EQ(store->status(a.key).eviction_rank, 0u);  // one copy left
  copy.reset();
  EXPECT_EQ(store->status(a.key).eviction_rank, 1u);  // released once, by the last copy
  ASSERT_TRUE(store->ensure_loading(b).ok());
  ASSERT_EQ(wait_final(b.key).state, ModelState::kLoaded);
  EXPECT_EQ(store->status(a.key).state, ModelState::kReady);
}

TEST_F(ModelStoreTest, PublishedModelsAreNeverEvicted) {
  uint64_t page = testing::page_size();
  make_store(2, [&](StoreConfig& c) {
    c.memory_budget_bytes = 150 * page;
    c.idle_evict = std::chrono::seconds(1);
  });
  std::vector<protocol::TensorDeclInfo> table = {
      {"w", DType::kF32, {static_cast<int64_t>(page / 4), 100}, ""}};
  ASSERT_TRUE(store->claim("pub", {}, protocol::ClaimMode::kNow, 1).ok());
  ASSERT_TRUE(store->declare("pub", 1, table).ok());
  std::promise<Result<LeaseGrant>> committed;
  store->commit("pub", 1, [&](Result<LeaseGrant> r) { committed.set_value(std::move(r)); });
  {
    auto lease = committed.get_future().get();
    ASSERT_TRUE(lease.ok()) << lease.error().to_string();
    store->release(lease->key, lease->generation);
  }
  std::string key = published_store_key("pub");
  EXPECT_EQ(store->status(key).eviction_rank, 0u);
  store->evict_idle(std::chrono::steady_clock::now() + std::chrono::hours(2));
  EXPECT_EQ(store->status(key).state, ModelState::kLoaded);
  ResolvedModel a = resolve(write_model("a", pages_of(100, 1)));
  ASSERT_TRUE(store->ensure_loading(a).ok());
  ModelStatus sa = wait_final(a.key);
  EXPECT_EQ(sa.error_code, StatusCode::kOutOfMemory);
  EXPECT_NE(sa.message.find("published, not evicted"), std::string::npos) << sa.message;
  EXPECT_EQ(store->status(key).state, ModelState::kLoaded);
  // A second publication past the budget is refused at its declare.
  ASSERT_TRUE(store->claim("pub2", {}, protocol::ClaimMode::kNow, 2).ok());
  auto declared = store->declare("pub2", 2, table);
  ASSERT_FALSE(declared.ok());
  EXPECT_EQ(declared.error().code, StatusCode::kOutOfMemory);
  EXPECT_EQ(store->budget_used(), store->slab_bytes());
  EXPECT_EQ(store->evictions(), 0u);
}

TEST_F(ModelStoreTest, AdoptedModelsAddTheirMemoryToTheDefaultBudget) {
  // The default budget is what was available at start; a model adopted from a keeper was in
  // memory before that, so it must not count twice.
  uint64_t page = testing::page_size();
  counters->available_bytes = static_cast<int64_t>(200 * page);
  make_store(2, [](StoreConfig& c) { c.memory_reserve_bytes = 0; });
  EXPECT_EQ(store->memory_budget(), 200 * page);
  ResolvedModel a = resolve(write_model("a", pages_of(100, 1)));
  auto host = memory::make_host_backend();
  auto slab = host->allocate({100 * page}, "adopted");
  ASSERT_TRUE(slab.ok()) << slab.error().to_string();
  protocol::TensorTableBuilder builder(1, 1);
  std::vector<int64_t> shape = {static_cast<int64_t>(page / 4), 100};
  ASSERT_TRUE(builder.add("w", DType::kF32, shape, {}, 0, 0, 100 * page).ok());
  auto table = make_shared_table(builder, **slab);
  ASSERT_TRUE(table.ok()) << table.error().to_string();
  AdoptedGeneration adopted;
  adopted.model = a;
  adopted.number = 1;
  adopted.slab = std::shared_ptr<memory::Slab>(std::move(*slab));
  adopted.table = *table;
  ASSERT_TRUE(store->adopt(std::move(adopted)).ok());
  EXPECT_EQ(store->memory_budget(), 300 * page);
  EXPECT_EQ(store->budget_used(), 100 * page);
  ModelStatus s = store->status(a.key);
  EXPECT_EQ(s.eviction_rank, 1u);  // idle, and its last use is its adoption
  EXPECT_GT(s.last_used_ms, 0);
}

// ---- exceptions on worker and reader threads fail one load, never the server ---------------

TEST_F(ModelStoreTest, BadAllocOnTheWorkerFailsThatLoadAndTheWorkerServesOn) {
  make_store(1);  // one worker: the next load proves it survived
  ResolvedModel a = resolve(write_model("a", many_tensors(4, 1)));
  counters->throw_on_allocate = 1;
  ASSERT_TRUE(store->ensure_loading(a).ok());
  ModelStatus sa = wait_final(a.key);
  ASSERT_EQ(sa.state, ModelState::kError);
  EXPECT_EQ(sa.error_code, StatusCode::kOutOfMemory);
  EXPECT_NE(sa.message.find("out of host memory"), std::string::npos) << sa.message;
  EXPECT_EQ(store->admitted_bytes(), 0u);
  EXPECT_EQ(counters->live_slabs.load(), 0);
  ResolvedModel b = resolve(write_model("b", many_tensors(4, 2)));
  ASSERT_TRUE(store->ensure_loading(b).ok());
  EXPECT_EQ(wait_final(b.key).state, ModelState::kLoaded);
  // The failed one loads on a retry.
  ASSERT_TRUE(store->ensure_loading(a).ok());
  EXPECT_EQ(wait_final(a.key).state, ModelState::kLoaded);
}

TEST_F(ModelStoreTest, OtherExceptionsOnTheWorkerAreInternalErrors) {
  make_store(1);
  ResolvedModel a = resolve(write_model("a", many_tensors(4, 1)));
  counters->throw_on_allocate = 2;
  ASSERT_TRUE(store->ensure_loading(a).ok());
  ModelStatus sa = wait_final(a.key);
  ASSERT_EQ(sa.state, ModelState::kError);
  EXPECT_EQ(sa.error_code, StatusCode::kInternal);
  EXPECT_NE(sa.message.find("allocate() threw"), std::string::npos) << sa.message;
  ResolvedModel b = resolve(write_model("b", many_tensors(4, 2)));
  ASSERT_TRUE(store->ensure_loading(b).ok());
  EXPECT_EQ(wait_final(b.key).state, ModelState::kLoaded);
}

// Throws std::bad_alloc from the n-th read (on a loader's reader thread), reads normally else.
class ThrowingReadSource final : public loader::ReadSource {
 public:
  explicit ThrowingReadSource(int nth) : nth_(nth) {}
  ssize_t pread(int fd, void* dst, size_t bytes, uint64_t offset) override {
    if (++reads_ == nth_) throw std::bad_alloc();
    return ::pread(fd, dst, bytes, static_cast<off_t>(offset));
  }

 private:
  std::atomic<int> reads_{0};
  int nth_;
};

TEST_F(ModelStoreTest, BadAllocOnAReaderThreadFailsThatLoadOnly) {
  ThrowingReadSource reads(2);
  make_store(1, [&](StoreConfig& c) { c.read_source = &reads; });
  ResolvedModel a = resolve(write_model("a", many_tensors(8, 1)));
  ASSERT_TRUE(store->ensure_loading(a).ok());
  ModelStatus sa = wait_final(a.key);
  ASSERT_EQ(sa.state, ModelState::kError);
  EXPECT_EQ(sa.error_code, StatusCode::kOutOfMemory);
  EXPECT_TRUE(wait_until([&] { return counters->live_slabs.load() == 0; }));
  EXPECT_TRUE(wait_until([&] { return store->admitted_bytes() == 0; }));
  ResolvedModel b = resolve(write_model("b", many_tensors(8, 2)));
  ASSERT_TRUE(store->ensure_loading(b).ok());
  EXPECT_EQ(wait_final(b.key).state, ModelState::kLoaded);
}

TEST_F(ModelStoreTest, ACommitThatThrowsFailsThatCommitAndThePublicationStaysOpen) {
  make_store(1);
  std::vector<protocol::TensorDeclInfo> table = {{"a", DType::kF32, {4, 4}, ""}};
  ASSERT_TRUE(store->claim("pub", {}, protocol::ClaimMode::kNow, 1).ok());
  ASSERT_TRUE(store->declare("pub", 1, table).ok());
  counters->throw_on_seal = true;
  std::promise<Result<LeaseGrant>> failed;
  store->commit("pub", 1, [&](Result<LeaseGrant> r) { failed.set_value(std::move(r)); });
  auto first = failed.get_future().get();
  ASSERT_FALSE(first.ok());
  EXPECT_EQ(first.error().code, StatusCode::kOutOfMemory);
  // The same worker commits it on a second try.
  std::promise<Result<LeaseGrant>> committed;
  store->commit("pub", 1, [&](Result<LeaseGrant> r) { committed.set_value(std::move(r)); });
  auto second = committed.get_future().get();
  ASSERT_TRUE(second.ok()) << second.error().to_string();
  EXPECT_EQ(store->status(published_store_key("pub")).state, ModelState::kLoaded);
}

// ---- a load stuck in a read: unload and shutdown do not wait for it --------------------------

TEST_F(ModelStoreTest, ForcedUnloadOfAStuckLoadAnswersAtOnceAndFreesLater) {
  auto reads = std::make_shared<BlockingReadSource>();
  make_store(1, [&](StoreConfig& c) { c.read_source = reads.get(); });
  ResolvedModel model = resolve(write_model("m", many_tensors(8, 1)));
  ASSERT_TRUE(store->ensure_loading(model).ok());
  ASSERT_TRUE(reads->wait_blocked());
  auto start = std::chrono::steady_clock::now();
  auto unloaded = store->unload(model.key, true);
  ASSERT_TRUE(unloaded.ok()) << unloaded.error().to_string();
  EXPECT_LT(std::chrono::steady_clock::now() - start, 500ms);
  EXPECT_TRUE(store->list().empty());
  EXPECT_EQ(counters->live_slabs.load(), 1);  // the worker still holds it
  reads->release();
  ASSERT_TRUE(wait_until([&] { return counters->live_slabs.load() == 0; }, 5s));
  EXPECT_TRUE(wait_until([&] { return store->admitted_bytes() == 0; }, 5s));
}

TEST_F(ModelStoreTest, ShutdownAbandonsAStuckLoadWithinItsTimeout) {
  // Outlives the store: the abandoned worker still reads through it.
  auto reads = std::make_shared<BlockingReadSource>();
  make_store(2, [&](StoreConfig& c) {
    c.read_source = reads.get();
    c.shutdown_timeout = 300ms;
  });
  ResolvedModel model = resolve(write_model("m", many_tensors(8, 1)));
  ASSERT_TRUE(store->ensure_loading(model).ok());
  ASSERT_TRUE(reads->wait_blocked());
  auto start = std::chrono::steady_clock::now();
  store.reset();
  auto took = std::chrono::steady_clock::now() - start;
  EXPECT_LT(took, 3s) << std::chrono::duration<double>(took).count() << " s";
  EXPECT_GE(took, 250ms);
  // The abandoned worker finishes once its read returns, touching nothing of the store (ASan
  // builds would see it), and drops its slab.
  reads->release();
  EXPECT_TRUE(wait_until([&] { return counters->live_slabs.load() == 0; }, 5s));
}

// ---- reload: generations of a loaded model ------------------------------------------------

TEST_F(ModelStoreTest, ReloadMakesANewGenerationOnlyWhenTheFilesChanged) {
  make_store();
  std::string path = write_model("reloaded", small_tensors(1));
  ResolvedModel model = resolve(path);
  ASSERT_TRUE(store->ensure_loading(model).ok());
  ASSERT_EQ(wait_final(model.key).state, ModelState::kLoaded);
  auto old_lease = store->acquire(model.key);
  ASSERT_TRUE(old_lease.ok());
  EXPECT_EQ(old_lease->status.generation, 1u);

  // Unchanged files: no new generation, a note says so.
  uint64_t before = store->status(model.key).seq;
  ASSERT_TRUE(store->reload(model.key, false).ok());
  ASSERT_TRUE(wait_until([&] {
    auto s = store->status(model.key);
    return s.seq > before && s.message.find("unchanged") != std::string::npos;
  }));
  EXPECT_EQ(store->status(model.key).generation, 1u);
  EXPECT_EQ(counters->allocations.load(), 1);

  // New bytes in place: generation 2; the lease of 1 still reads the old bytes.
  std::this_thread::sleep_for(10ms);  // a visibly newer mtime even on coarse clocks
  write_model("reloaded", small_tensors(7));
  ASSERT_TRUE(store->reload(model.key, false).ok());
  ASSERT_TRUE(wait_until([&] { return store->status(model.key).generation == 2; }));
  ModelStatus s = store->status(model.key);
  EXPECT_EQ(s.state, ModelState::kLoaded);
  ASSERT_EQ(s.generations.size(), 2u);
  EXPECT_EQ(s.generations[0].leases, 1u);
  EXPECT_TRUE(s.generations[1].current);
  auto fresh = store->acquire(model.key);
  ASSERT_TRUE(fresh.ok());
  EXPECT_EQ(fresh->status.generation, 2u);
  expect_grant_bytes(*fresh, path);  // models[path] now holds seed 7's tensors
  EXPECT_NE(old_lease->slab, fresh->slab);

  // Two live generations (the default limit): a third reload waits for readers of the first.
  EXPECT_EQ(store->reload(model.key, true).error().code, StatusCode::kLimitExceeded);
  store->release(model.key, old_lease->generation);
  EXPECT_EQ(store->status(model.key).generations.size(), 1u);
  store->release(model.key, fresh->generation);
  ASSERT_TRUE(store->reload(model.key, true).ok());  // force: same files, new generation
  ASSERT_TRUE(wait_until([&] { return store->status(model.key).generation == 3; }));
  EXPECT_EQ(store->status(model.key).generations.size(), 1u);  // 2 had no lease: freed
}

TEST_F(ModelStoreTest, AFailedReloadKeepsServingTheCurrentGeneration) {
  make_store();
  std::string path = write_model("broken-later", small_tensors(2));
  ResolvedModel model = resolve(path);
  ASSERT_TRUE(store->ensure_loading(model).ok());
  ASSERT_EQ(wait_final(model.key).state, ModelState::kLoaded);
  testing::write_file(path + "/model.safetensors", "not a safetensors file");
  ASSERT_TRUE(store->reload(model.key, false).ok());
  ASSERT_TRUE(wait_until([&] { return store->status(model.key).error_code != StatusCode::kOk; }));
  ModelStatus s = store->status(model.key);
  EXPECT_EQ(s.state, ModelState::kLoaded);
  EXPECT_EQ(s.generation, 1u);
  EXPECT_NE(s.message.find("reload failed"), std::string::npos) << s.message;
  EXPECT_GT(s.bytes_total, 0u);  // the sizes of the generation still served
  EXPECT_TRUE(store->acquire(model.key).ok());
  EXPECT_EQ(store->reload("nothing-like-it", false).error().code, StatusCode::kNotFound);
}

// ---- publications ---------------------------------------------------------------------------

TEST_F(ModelStoreTest, APublicationIsClaimedDeclaredCommittedAndLeased) {
  make_store();
  using protocol::ClaimMode;
  std::vector<protocol::TensorDeclInfo> table = {
      {"a", DType::kF32, {4, 4}, ""}, {"b", DType::kI8, {3}, ""}, {"a2", DType::kF32, {4, 4}, "a"}};
  auto claimed = store->claim("pub", {{"engine", "x"}}, ClaimMode::kNow, 1);
  ASSERT_TRUE(claimed.ok()) << claimed.error().to_string();
  EXPECT_EQ(claimed->kind, ClaimOutcome::Kind::kClaimed);
  EXPECT_EQ(store->claim("pub", {}, ClaimMode::kNow, 2)->kind, ClaimOutcome::Kind::kBusy);
  EXPECT_EQ(store->declare("pub", 2, table).error().code, StatusCode::kInvalidArgument);
  auto grant = store->declare("pub", 1, table);
  ASSERT_TRUE(grant.ok()) << grant.error().to_string();
  ASSERT_EQ(grant->table->size(), 3u);
  EXPECT_EQ(grant->table->view()[2].offset, grant->table->view()[0].offset);
  EXPECT_EQ(grant->table->view()[1].offset % loader::kTensorAlignment, 0u);
  EXPECT_EQ(grant->generation, 1u);
  EXPECT_EQ(store->status(published_store_key("pub")).state, ModelState::kLoading);

  std::promise<Result<LeaseGrant>> committed;
  store->commit("pub", 1, [&](Result<LeaseGrant> r) { committed.set_value(std::move(r)); });
  auto lease = committed.get_future().get();
  ASSERT_TRUE(lease.ok()) << lease.error().to_string();
  ModelStatus s = store->status(published_store_key("pub"));
  EXPECT_EQ(s.state, ModelState::kLoaded);
  EXPECT_TRUE(s.published);
  EXPECT_EQ(s.key, "pub");
  EXPECT_EQ(s.generation, 1u);
  EXPECT_EQ(s.leases, 1u);
  ASSERT_EQ(s.generations.size(), 1u);
  ASSERT_FALSE(s.generations[0].digests.empty());
  EXPECT_EQ(s.generations[0].digests[0], "wsum64:" + hex64(lease->slab->digest(0).value()));
  EXPECT_EQ(store->acquire_published("pub", 0, Fingerprint{{"engine", "y"}}).error().code,
            StatusCode::kFingerprintMismatch);
  auto reader = store->acquire_published("pub", 0, Fingerprint{{"engine", "x"}});
  ASSERT_TRUE(reader.ok());
  EXPECT_EQ(reader->slab, lease->slab);
  // attach-or-publish finds it committed and claims nothing.
  EXPECT_EQ(store->claim("pub", {{"engine", "x"}}, ClaimMode::kIfUnpublished, 3)->kind,
            ClaimOutcome::Kind::kPublished);
  // A publication aborted before its declare, and one aborted after: nothing changes.
  uint64_t held = store->slab_bytes();
  ASSERT_EQ(store->claim("pub", {}, ClaimMode::kNow, 4)->kind, ClaimOutcome::Kind::kClaimed);
  ASSERT_TRUE(store->declare("pub", 4, table).ok());
  EXPECT_GT(store->slab_bytes(), held);
  EXPECT_TRUE(store->abort("pub", 4));
  EXPECT_FALSE(store->abort("pub", 4));
  EXPECT_EQ(store->slab_bytes(), held);
  EXPECT_EQ(store->status(published_store_key("pub")).generation, 1u);
  EXPECT_EQ(store->admitted_bytes(), 0u);
}

TEST_F(ModelStoreTest, AnAbortedFirstPublicationLeavesNothingBehind) {
  make_store();
  ASSERT_TRUE(store->claim("gone", {}, protocol::ClaimMode::kNow, 1).ok());
  ASSERT_TRUE(store->declare("gone", 1, {{"t", DType::kF32, {1024}, ""}}).ok());
  EXPECT_GT(store->slab_bytes(), 0u);
  EXPECT_TRUE(store->abort("gone", 1));
  EXPECT_EQ(store->slab_bytes(), 0u);
  EXPECT_TRUE(store->list().empty());
  EXPECT_EQ(store->status(published_store_key("gone")).state, ModelState::kReady);
  EXPECT_EQ(store->acquire_published("gone", 0, std::nullopt).error().code, StatusCode::kNotFound);
}

// ---- the host tier: offload and wake ----

class HostTierTest : public ModelStoreTest {
 protected:
  // A store whose host tier holds `budget` bytes.
  ModelStore& make_tier_store(uint64_t budget) {
    return make_store(2, [budget](StoreConfig& c) { c.host_budget_bytes = budget; });
  }

  // Loads `path` and waits for it.
  ResolvedModel load(const std::string& path) {
    ResolvedModel model = resolve(path);
    EXPECT_TRUE(store->ensure_loading(model).ok());
    EXPECT_EQ(wait_final(model.key).state, ModelState::kLoaded);
    return model;
  }

  // The slab bytes of one model of small_tensors(), as a store lays it out.
  uint64_t small_model_bytes() {
    make_store();
    ResolvedModel model = load(write_model("sizing", small_tensors(99)));
    uint64_t bytes = store->status(model.key).slab_bytes;
    store.reset();
    return bytes;
  }

  static bool offloaded(const ModelStatus& s) {
    return s.state == ModelState::kUnloaded && s.host_bytes > 0;
  }
};

TEST_F(HostTierTest, OffloadFreesTheDeviceSlabAndAWakeBringsTheSameBytesBack) {
  make_tier_store(64ull << 20);
  std::string path = write_model("m", small_tensors(11));
  ResolvedModel model = load(path);
  const uint64_t bytes = store->status(model.key).slab_bytes;
  ASSERT_GT(bytes, 0u);
  EXPECT_EQ(counters->live_slabs.load(), 1);

  auto off = store->offload(model.key, false);
  ASSERT_TRUE(off.ok()) << off.error().to_string();
  EXPECT_TRUE(offloaded(*off));
  EXPECT_EQ(off->host_bytes, bytes);
  EXPECT_EQ(off->slab_bytes, 0u);
  EXPECT_EQ(off->tensors, models[path].size());  // the table is kept
  // The device slab is gone when offload returns; the host copy is counted.
  EXPECT_EQ(counters->live_slabs.load(), 0);
  EXPECT_EQ(store->slab_bytes(), 0u);
  EXPECT_EQ(store->host_tier_bytes(), bytes);
  EXPECT_TRUE(offloaded(store->status(model.key)));
  ASSERT_EQ(store->list().size(), 1u);
  EXPECT_TRUE(offloaded(store->list()[0]));
  // Offloaded again: nothing to do. Leased: not until it is woken.
  EXPECT_TRUE(store->offload(short_id(model.key), false).ok());
  EXPECT_EQ(store->acquire(model.key).error().code, StatusCode::kNotReady);
  EXPECT_EQ(store->acquire_generation(model.key, 0, std::nullopt).error().code,
            StatusCode::kNotReady);

  // The next load wakes it: from the host copy, not the files (which are gone now).
  std::filesystem::remove_all(path);
  auto woken = store->ensure_loading(model);
  ASSERT_TRUE(woken.ok()) << woken.error().to_string();
  EXPECT_EQ(woken->state, ModelState::kLoading);
  ModelStatus s = wait_final(model.key);
  ASSERT_EQ(s.state, ModelState::kLoaded) << s.message;
  EXPECT_EQ(s.host_bytes, 0u);
  EXPECT_EQ(s.slab_bytes, bytes);
  EXPECT_EQ(s.generation, 1u);  // the same generation, back on the device
  EXPECT_EQ(store->host_tier_bytes(), 0u);
  EXPECT_EQ(counters->allocations.load(), 2);
  auto grant = store->acquire(model.key);
  ASSERT_TRUE(grant.ok()) << grant.error().to_string();
  expect_grant_bytes(*grant, path);
  store->release(model.key, grant->generation);
}

TEST_F(HostTierTest, WithoutAHostTierOffloadIsRefused) {
  make_store();
  ResolvedModel model = load(write_model("m", small_tensors(12)));
  auto off = store->offload(model.key, false);
  ASSERT_FALSE(off.ok());
  EXPECT_EQ(off.error().code, StatusCode::kInvalidArgument);
  EXPECT_NE(off.error().message.find("--host-budget"), std::string::npos);
  EXPECT_EQ(store->status(model.key).state, ModelState::kLoaded);
  EXPECT_EQ(store->offload("nothing-here", false).error().code, StatusCode::kNotFound);
}

TEST_F(HostTierTest, OffloadOfALeasedModelNeedsForceAndTheLeaseKeepsItsMemory) {
  make_tier_store(64ull << 20);
  std::string path = write_model("m", small_tensors(13));
  ResolvedModel model = load(path);
  auto lease = store->acquire(model.key);
  ASSERT_TRUE(lease.ok());
  auto refused = store->offload(model.key, false);
  ASSERT_FALSE(refused.ok());
  EXPECT_EQ(refused.error().code, StatusCode::kModelInUse);
  EXPECT_EQ(store->status(model.key).state, ModelState::kLoaded);
  EXPECT_EQ(store->host_tier_bytes(), 0u);

  auto forced = store->offload(model.key, true);
  ASSERT_TRUE(forced.ok()) << forced.error().to_string();
  EXPECT_TRUE(offloaded(*forced));
  EXPECT_EQ(forced->leases, 0u);
  // The lease still maps the old slab, with the model's bytes.
  EXPECT_EQ(counters->live_slabs.load(), 1);
  expect_grant_bytes(*lease, path);
  // Its release matches nothing now, and the model wakes as usual.
  store->release(model.key, lease->generation);
  ASSERT_TRUE(store->ensure_loading(model).ok());
  ASSERT_EQ(wait_final(model.key).state, ModelState::kLoaded);
  auto again = store->acquire(model.key);
  ASSERT_TRUE(again.ok());
  EXPECT_NE(again->generation, lease->generation);
  store->release(model.key, lease->generation);  // stale: does not drop the new lease
  EXPECT_EQ(store->status(model.key).leases, 1u);
  store->release(model.key, again->generation);
}

TEST_F(HostTierTest, TheHostBudgetDropsTheLeastRecentlyOffloadedCopy) {
  const uint64_t bytes = small_model_bytes();
  make_tier_store(bytes * 2 + bytes / 2);  // two copies fit, three do not
  ResolvedModel a = load(write_model("a", small_tensors(21)));
  ResolvedModel b = load(write_model("b", small_tensors(22)));
  ResolvedModel c = load(write_model("c", small_tensors(23)));
  ASSERT_TRUE(store->offload(a.key, false).ok());
  ASSERT_TRUE(store->offload(b.key, false).ok());
  EXPECT_EQ(store->host_tier_bytes(), 2 * bytes);
  auto third = store->offload(c.key, false);
  ASSERT_TRUE(third.ok()) << third.error().to_string();
  // a went (unloaded: the store no longer holds it); b and c stay offloaded.
  EXPECT_EQ(store->status(a.key).state, ModelState::kReady);
  EXPECT_TRUE(recorder.wait_for(a.key, [](const ModelStatus& s) {
    return s.state == ModelState::kUnloaded && s.host_bytes == 0;
  }));
  EXPECT_TRUE(offloaded(store->status(b.key)));
  EXPECT_TRUE(offloaded(store->status(c.key)));
  EXPECT_EQ(store->host_tier_bytes(), 2 * bytes);
  // A woken copy leaves the tier; a model larger than the whole budget is refused.
  ASSERT_TRUE(store->ensure_loading(b).ok());
  ASSERT_EQ(wait_final(b.key).state, ModelState::kLoaded);
  EXPECT_EQ(store->host_tier_bytes(), bytes);
  store.reset();
  make_tier_store(bytes / 2);
  ResolvedModel d = load(write_model("d", small_tensors(24)));
  auto too_big = store->offload(d.key, false);
  ASSERT_FALSE(too_big.ok());
  EXPECT_EQ(too_big.error().code, StatusCode::kOutOfMemory);
  EXPECT_EQ(store->status(d.key).state, ModelState::kLoaded);
  EXPECT_EQ(store->host_tier_bytes(), 0u);
}

TEST_F(HostTierTest, UnloadingAnOffloadedModelReturnsItsHostMemory) {
  make_tier_store(64ull << 20);
  ResolvedModel model = load(write_model("m", small_tensors(31)));
  ASSERT_TRUE(store->offload(model.key, false).ok());
  EXPECT_GT(store->host_tier_bytes(), 0u);
  auto unloaded = store->unload(short_id(model.key), false);
  ASSERT_TRUE(unloaded.ok()) << unloaded.error().to_string();
  EXPECT_EQ(unloaded->host_bytes, 0u);
  EXPECT_EQ(store->host_tier_bytes(), 0u);
  EXPECT_TRUE(store->list().empty());
}

TEST_F(HostTierTest, APublishedModelIsOffloadedAndWokenWithItsDigestsChecked) {
  make_tier_store(64ull << 20);
  std::vector<protocol::TensorDeclInfo> table = {{"a", DType::kF32, {1024}, ""},
                                                 {"b", DType::kI8, {333}, ""}};
  ASSERT_TRUE(store->claim("pub", {{"engine", "x"}}, protocol::ClaimMode::kNow, 1).ok());
  auto writer = store->declare("pub", 1, table);
  ASSERT_TRUE(writer.ok()) << writer.error().to_string();
  std::vector<std::string> written;
  {
    std::vector<std::unique_ptr<memory::MappedSegment>> mapped;
    for (auto& e : writer->exports) {
      auto m =
          memory::import_segment(std::move(e), memory::ImportTarget{}, memory::Access::kReadWrite);
      ASSERT_TRUE(m.ok()) << m.error().to_string();
      mapped.push_back(std::move(m).value());
    }
    for (size_t i = 0; i < writer->table->size(); ++i) {
      const protocol::TensorRef t = writer->table->view()[i];
      std::string bytes = testing::random_bytes(t.nbytes, 40 + static_cast<uint32_t>(i));
      std::memcpy(static_cast<char*>(const_cast<void*>(mapped[t.segment]->address())) + t.offset,
                  bytes.data(), bytes.size());
      written.push_back(std::move(bytes));
    }
  }
  std::promise<Result<LeaseGrant>> committed;
  store->commit("pub", 1, [&](Result<LeaseGrant> r) { committed.set_value(std::move(r)); });
  auto lease = committed.get_future().get();
  ASSERT_TRUE(lease.ok()) << lease.error().to_string();
  const std::string key = published_store_key("pub");
  const std::vector<std::string> digests = store->status(key).generations.at(0).digests;
  EXPECT_EQ(store->offload("pub", false).error().code, StatusCode::kModelInUse);
  store->release(lease->key, lease->generation);
  lease = make_error(StatusCode::kCancelled, "released");

  auto off = store->offload("pub", false);
  ASSERT_TRUE(off.ok()) << off.error().to_string();
  EXPECT_TRUE(off->published);
  EXPECT_TRUE(offloaded(*off));
  EXPECT_EQ(counters->live_slabs.load(), 0);
  EXPECT_EQ(store->acquire_published("pub", 0, std::nullopt).error().code, StatusCode::kNotReady);
  // attach-or-publish still finds it published.
  EXPECT_EQ(store->claim("pub", {{"engine", "x"}}, protocol::ClaimMode::kIfUnpublished, 2)->kind,
            ClaimOutcome::Kind::kPublished);

  auto woken = store->wake("pub");
  ASSERT_TRUE(woken.ok()) << woken.error().to_string();
  EXPECT_EQ(woken->state, ModelState::kLoading);
  ModelStatus s = wait_final(key);
  ASSERT_EQ(s.state, ModelState::kLoaded) << s.message;
  EXPECT_EQ(s.generation, 1u);
  ASSERT_EQ(s.generations.size(), 1u);
  EXPECT_EQ(s.generations[0].digests, digests);
  auto reader = store->acquire_published("pub", 0, Fingerprint{{"engine", "x"}});
  ASSERT_TRUE(reader.ok()) << reader.error().to_string();
  for (size_t i = 0; i < reader->slab->segment_count(); ++i)
    EXPECT_EQ("wsum64:" + hex64(reader->slab->digest(i).value()), digests.at(i));
  auto exports = reader->slab->export_segments();
  ASSERT_TRUE(exports.ok());
  std::vector<std::unique_ptr<memory::MappedSegment>> mapped;
  for (auto& e : *exports) {
    auto m = memory::import_segment(std::move(e), memory::ImportTarget{});
    ASSERT_TRUE(m.ok()) << m.error().to_string();
    mapped.push_back(std::move(m).value());
  }
  for (size_t i = 0; i < reader->table->size(); ++i) {
    const protocol::TensorRef t = reader->table->view()[i];
    EXPECT_EQ(std::memcmp(static_cast<const char*>(mapped[t.segment]->address()) + t.offset,
                          written[i].data(), written[i].size()),
              0);
  }
  store->release(reader->key, reader->generation);
}

TEST_F(HostTierTest, AWakeWhoseBytesDifferFailsAndTheModelStaysOffloaded) {
  make_tier_store(64ull << 20);
  std::string path = write_model("m", small_tensors(51));
  ResolvedModel model = load(path);
  ASSERT_TRUE(store->offload(model.key, false).ok());
  // The copy back (with write(), as into device memory) lands with a byte changed: the digest
  // check catches it.
  counters->hide_address = true;
  counters->corrupt_writes = true;
  ASSERT_TRUE(store->ensure_loading(model).ok());
  ASSERT_TRUE(recorder.wait_for(
      model.key, [](const ModelStatus& s) { return s.state == ModelState::kError; }));
  ModelStatus failed;
  for (const ModelStatus& s : recorder.by_seq(model.key))
    if (s.state == ModelState::kError) failed = s;
  EXPECT_EQ(failed.error_code, StatusCode::kInternal);
  EXPECT_NE(failed.message.find("does not hold the bytes offloaded"), std::string::npos)
      << failed.message;
  // Still offloaded, the reason in its note; the bad slab is gone.
  ASSERT_TRUE(wait_until([&] { return offloaded(store->status(model.key)); }));
  ModelStatus s = store->status(model.key);
  EXPECT_NE(s.message.find("wake failed"), std::string::npos) << s.message;
  EXPECT_GT(store->host_tier_bytes(), 0u);
  EXPECT_TRUE(wait_until([&] { return counters->live_slabs.load() == 0; }));
  EXPECT_EQ(store->admitted_bytes(), 0u);
  // The next wake, with faithful copies, brings the model back.
  counters->corrupt_writes = false;
  ASSERT_TRUE(store->ensure_loading(model).ok());
  ASSERT_EQ(wait_final(model.key).state, ModelState::kLoaded);
  auto grant = store->acquire(model.key);
  ASSERT_TRUE(grant.ok()) << grant.error().to_string();
  expect_grant_bytes(*grant, path);
  store->release(model.key, grant->generation);
}

TEST(HostBudget, TakesBytesOrAShareOfTheHostsMemory) {
  StoreConfig config;
  ASSERT_TRUE(parse_host_budget("64GiB", config).ok());
  EXPECT_EQ(config.host_budget_bytes, 64ull << 30);
  ASSERT_TRUE(parse_host_budget("0", config).ok());
  EXPECT_EQ(config.host_budget_bytes, 0u);
  ASSERT_TRUE(parse_host_budget("50%", config).ok());
  EXPECT_GT(config.host_budget_bytes, 0u);
  auto bad = parse_host_budget("lots", config);
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.error().message.find("--host-budget"), std::string::npos);
}

TEST_F(HostTierTest, IdleEvictionOffloadsOnAWorkerAndTheNextLoadWakes) {
  uint64_t page = testing::page_size();
  make_store(2, [&](StoreConfig& c) {
    c.host_budget_bytes = 64ull << 20;
    c.idle_evict = std::chrono::hours(1);
  });
  ResolvedModel a = load(write_model("a", pages_of(20, 1)));
  store->evict_idle(std::chrono::steady_clock::now() + std::chrono::hours(2));
  EXPECT_TRUE(recorder.wait_for(a.key, [&](const ModelStatus& s) {
    return s.state == ModelState::kUnloaded && s.host_bytes == 20 * page &&
           s.message.rfind("evicted to the host tier: no client held it", 0) == 0;
  }));
  EXPECT_EQ(store->evictions(), 1u);
  EXPECT_EQ(store->budget_used(), 0u);
  ASSERT_TRUE(store->ensure_loading(a).ok());  // woken from the host copy
  ModelStatus woken = wait_final(a.key);
  ASSERT_EQ(woken.state, ModelState::kLoaded) << woken.message;
  EXPECT_EQ(woken.host_bytes, 0u);
  EXPECT_EQ(store->host_tier_bytes(), 0u);
}

TEST_F(HostTierTest, AWakeIsAdmittedAgainstTheBudgetAndEvictsToFit) {
  uint64_t page = testing::page_size();
  make_store(2, [&](StoreConfig& c) {
    c.host_budget_bytes = 64ull << 20;
    c.memory_budget_bytes = 150 * page;
  });
  ResolvedModel a = load(write_model("a", pages_of(100, 1)));
  ASSERT_TRUE(store->offload(a.key, false).ok());
  EXPECT_EQ(store->budget_used(), 0u);  // the host copy is the host tier's, not the device's
  ResolvedModel b = load(write_model("b", pages_of(100, 2)));
  EXPECT_EQ(store->budget_used(), 100 * page);
  // Waking a needs b's room: b, idle, is evicted into the host tier (where a's copy was); the
  // count is exact afterwards.
  ASSERT_TRUE(store->ensure_loading(a).ok());
  ModelStatus s = wait_final(a.key);
  ASSERT_EQ(s.state, ModelState::kLoaded) << s.message;
  ModelStatus evicted = store->status(b.key);
  EXPECT_EQ(evicted.state, ModelState::kUnloaded);
  EXPECT_EQ(evicted.host_bytes, 100 * page);
  EXPECT_EQ(evicted.message.rfind("evicted to the host tier: ", 0), 0u) << evicted.message;
  EXPECT_EQ(store->host_tier_bytes(), 100 * page);
  EXPECT_EQ(store->evictions(), 1u);
  EXPECT_EQ(store->budget_used(), 100 * page);
  EXPECT_EQ(s.eviction_rank, 1u);
}

}  // namespace
}  // namespace companion::server
