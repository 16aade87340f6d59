// The store's records of its models (internal to the model store's files).
#pragma once

#include <atomic>
#include <condition_variable>
#include <deque>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "common/util.hpp"
#include "server/model_store.hpp"

namespace companion::server {

// One generation of a model: a load (or reload) of its files, or a commit of a publication.
struct Generation {
  uint64_t number = 0;  // 1, 2, ... per key, shown to users
  uint64_t token = 0;   // next_generation(): what leases name
  std::shared_ptr<memory::Slab> slab;
  // The tensor table, built once (sealed memfd) and shared by every lease of the generation.
  std::shared_ptr<const protocol::SharedTensorTable> table;
  uint32_t leases = 0;
  std::vector<std::string> digests;  // per segment (published)
  Fingerprint fingerprint;           // published
  std::string files;                 // loaded: the files' identity (dev, inode, size, mtime)
  int64_t created_at_ms = 0;
  // The keeper's token (GenerationKeeper::keep): dropped with the generation, which tells the
  // keeper to let go of it.
  std::shared_ptr<void> kept;
  // Offloaded (slab null): the bytes in the host tier, and the device slab's per-segment digests
  // taken when they were copied there, checked again on wake.
  std::shared_ptr<memory::Slab> host_copy;
  std::vector<uint64_t> offload_digests;
};

// A publication in progress: the writer (a connection) and, once declared, its slab.
struct Writer {
  uint64_t owner = 0;
  Fingerprint fingerprint;
  std::shared_ptr<memory::Slab> slab;
  std::shared_ptr<const protocol::SharedTensorTable> table;
  uint64_t token = 0;
  uint64_t admitted = 0;    // bytes of it still counted in admitted_bytes_
  bool committing = false;  // a worker is digesting and sealing it
};

struct ModelStore::Entry {
  ResolvedModel model;
  std::string id;
  ModelState state = ModelState::kReady;
  uint64_t bytes_done = 0;
  uint64_t bytes_total = 0;
  Error error;
  // Live generations, oldest first; back() is the current one. Older ones stay while leased.
  std::deque<Generation> generations;
  uint64_t next_number = 1;
  uint64_t generation = 0;  // new for every load and unload: stale workers must not publish
  std::shared_ptr<std::atomic<bool>> cancel;
  Clock::time_point last_progress{};
  Clock::time_point failed_at{};  // when state became kError: error entries expire
  // Published models.
  bool published = false;
  std::string publish_key;
  std::optional<Writer> writer;
  // Loaded models: a reload in progress (the current generation keeps serving), and how the
  // last one ended (error code kOk: fine, or unchanged files).
  bool reloading = false;
  std::optional<Error> reload_error;
  std::string reload_note;
  // The last acquire, release or load end: eviction takes the least recent first.
  Clock::time_point last_used{};
  int64_t last_used_ms = 0;  // the same as unix time, for `ls`

  void touch() {
    last_used = Clock::now();
    last_used_ms = unix_time_ms();
  }
  // The host tier: a copy to it under way (offload()), and when the model was offloaded (the
  // least recently offloaded host copy goes first).
  bool offloading = false;
  Clock::time_point offloaded_at{};
  // An eviction's copy to the host tier failed: the next eviction drops the model instead of
  // trying the copy again (each idle sweep would).
  bool host_copy_failed = false;

  // Device bytes its generations' slabs hold; with_writer adds the slab a writer is filling.
  uint64_t device_bytes(bool with_writer) const {
    uint64_t total = 0;
    for (const auto& g : generations)
      if (g.slab) total += g.slab->total_bytes();
    if (with_writer && writer && writer->slab) total += writer->slab->total_bytes();
    return total;
  }

  Generation* current() { return generations.empty() ? nullptr : &generations.back(); }
  const Generation* current() const { return generations.empty() ? nullptr : &generations.back(); }
  // The current generation while its bytes are in the host tier only (offloaded or waking).
  Generation* offloaded() {
    Generation* g = current();
    return g != nullptr && g->host_copy ? g : nullptr;
  }
  const Generation* offloaded() const {
    const Generation* g = current();
    return g != nullptr && g->host_copy ? g : nullptr;
  }
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

// A new lease token: one counter for the whole store, so that a lease of an unloaded entry is
// never released against a new entry of the same key.
uint64_t next_generation();
// Serialises a table into a sealed memfd, checked against the slab's segments.
Result<std::shared_ptr<const protocol::SharedTensorTable>> make_shared_table(
    const protocol::TensorTableBuilder& builder, const memory::Slab& slab);
// kFingerprintMismatch naming the differing fields, unless have == want.
Result<void> check_fingerprint(const std::string& key, uint64_t number, const Fingerprint& have,
                               const Fingerprint& want);

}  // namespace companion::server
