// What `serve --metrics` reports, in the Prometheus text format: counters kept as things happen
// (loads, reloads and wakes; attaches) and the state read at each scrape (models by state,
// memory per tier, budgets, leases, clients, evictions, refusals, registry, build).
#pragma once

#include <cstdint>
#include <map>
#include <mutex>
#include <string>
#include <vector>

#include "companion/types.hpp"
#include "metrics/exposition.hpp"
#include "server/model_store.hpp"

namespace companion::server {

// The server's state when scraped.
struct MetricsState {
  ServerIdentity identity;
  std::vector<ModelStatus> models;
  uint64_t device_bytes = 0;            // slabs the store holds in the server's own memory
  uint64_t host_tier_bytes = 0;         // offloaded copies in the host tier
  uint64_t memory_budget = UINT64_MAX;  // UINT64_MAX: none
  uint64_t memory_budget_used = 0;      // held plus admitted to work in flight
  uint64_t host_budget = 0;             // 0: no host tier
  uint32_t leases = 0;
  uint32_t clients = 0;
  uint64_t evictions = 0;
  std::map<std::string, uint64_t> refused;  // by reason, as in health
  std::string registry = "local";
  bool registered = true;
};

// Thread-safe: loads are reported from worker threads, attaches from the event loop, scrapes
// come from the metrics endpoint's thread.
class ServerMetrics {
 public:
  ServerMetrics();
  void record_load(const LoadReport& report);
  // A GetParameters request answered: from its arrival to its reply queued, waiting for a load
  // included; kOk when a lease was granted.
  void record_attach(double seconds, StatusCode code);
  std::string render(const MetricsState& state) const;

 private:
  struct LoadCounters {
    uint64_t count = 0;
    uint64_t bytes = 0;
    metrics::Histogram seconds;
  };
  mutable std::mutex mutex_;
  std::map<LoadReport::Kind, LoadCounters> loads_;
  std::map<std::pair<LoadReport::Kind, StatusCode>, uint64_t> load_errors_;
  uint64_t attaches_ = 0;
  std::map<StatusCode, uint64_t> attach_errors_;
  metrics::Histogram attach_seconds_;
};

}  // namespace companion::server
