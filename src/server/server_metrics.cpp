#include "server/server_metrics.hpp"

namespace companion::server {

namespace {

// Seconds: a load of a small model to a cold read of a large one.
std::vector<double> load_buckets() {
  return {0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300};
}
// Seconds: an attach of a loaded model (well under a millisecond) to one that waited for a load.
std::vector<double> attach_buckets() {
  return {0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
          0.1,    0.25,    0.5,    1,     2.5,    5,     10,   30};
}

constexpr LoadReport::Kind kLoadKinds[] = {LoadReport::Kind::kLoad, LoadReport::Kind::kReload,
                                           LoadReport::Kind::kWake};

constexpr ModelState kStates[] = {ModelState::kReady, ModelState::kLoading, ModelState::kLoaded,
                                  ModelState::kError, ModelState::kUnloaded};

}  // namespace

ServerMetrics::ServerMetrics() : attach_seconds_(attach_buckets()) {
  for (auto kind : kLoadKinds)
    loads_.emplace(kind, LoadCounters{0, 0, metrics::Histogram(load_buckets())});
}

void ServerMetrics::record_load(const LoadReport& report) {
  std::lock_guard<std::mutex> lock(mutex_);
  if (report.code != StatusCode::kOk) {
    ++load_errors_[{report.kind, report.code}];
    return;
  }
  LoadCounters& c = loads_.at(report.kind);
  ++c.count;
  c.bytes += report.bytes;
  c.seconds.observe(report.seconds);
}

void ServerMetrics::record_attach(double seconds, StatusCode code) {
  std::lock_guard<std::mutex> lock(mutex_);
  if (code != StatusCode::kOk) {
    ++attach_errors_[code];
    return;
  }
  ++attaches_;
  attach_seconds_.observe(seconds);
}

std::string ServerMetrics::render(const MetricsState& state) const {
  using metrics::Type;
  metrics::TextWriter w;
  const auto& id = state.identity;

  w.family("companion_build_info",
           "The server's software and protocol versions, device and memory backend (always 1)",
           Type::kGauge);
  w.sample("companion_build_info",
           {{"version", id.version},
            {"protocol", std::to_string(kProtocolMajor) + "." + std::to_string(kProtocolMinor)},
            {"device", id.device},
            {"backend", id.default_backend},
            {"instance_id", id.instance_id}},
           1);
  w.family("companion_start_time_seconds", "When the server started, in seconds since the epoch",
           Type::kGauge);
  w.sample("companion_start_time_seconds", {}, static_cast<double>(id.started_at_ms) / 1000.0);

  // Offloaded models are unloaded ones whose bytes the host tier keeps: counted apart.
  std::map<std::string, uint64_t> by_state;
  for (ModelState s : kStates) by_state[model_state_name(s)] = 0;
  by_state["offloaded"] = 0;
  for (const auto& m : state.models) {
    bool offloaded = m.state == ModelState::kUnloaded && m.host_bytes > 0;
    ++by_state[offloaded ? "offloaded" : model_state_name(m.state)];
  }
  w.family("companion_models",
           "Models the server knows, by state (offloaded: unloaded, with a copy in the host tier)",
           Type::kGauge);
  for (const auto& [name, count] : by_state)
    w.sample("companion_models", {{"state", name}}, static_cast<double>(count));

  w.family("companion_resident_bytes",
           "Bytes of model memory held, by tier (device: the server's own memory, a GPU's or "
           "host memory for a host server; host: copies of offloaded models)",
           Type::kGauge);
  w.sample("companion_resident_bytes", {{"tier", "device"}},
           static_cast<double>(state.device_bytes));
  w.sample("companion_resident_bytes", {{"tier", "host"}},
           static_cast<double>(state.host_tier_bytes));
  if (state.memory_budget != UINT64_MAX) {
    w.family("companion_memory_budget_bytes", "The memory budget (--memory-budget)", Type::kGauge);
    w.sample("companion_memory_budget_bytes", {}, static_cast<double>(state.memory_budget));
  }
  w.family("companion_memory_budget_used_bytes",
           "Bytes counted against the memory budget: held, and admitted to loads in flight",
           Type::kGauge);
  w.sample("companion_memory_budget_used_bytes", {}, static_cast<double>(state.memory_budget_used));
  w.family("companion_host_tier_budget_bytes", "The host tier's budget (--host-budget; 0: none)",
           Type::kGauge);
  w.sample("companion_host_tier_budget_bytes", {}, static_cast<double>(state.host_budget));

  w.family("companion_leases", "Leases clients hold now", Type::kGauge);
  w.sample("companion_leases", {}, state.leases);
  w.family("companion_clients", "Client connections open now", Type::kGauge);
  w.sample("companion_clients", {}, state.clients);
  w.family("companion_evictions_total",
           "Models evicted from the device since start (to make room, or idle)", Type::kCounter);
  w.sample("companion_evictions_total", {}, static_cast<double>(state.evictions));
  w.family("companion_refusals_total",
           "Requests and connections refused by a limit or the peer policy, by reason",
           Type::kCounter);
  for (const auto& [reason, count] : state.refused)
    w.sample("companion_refusals_total", {{"reason", reason}}, static_cast<double>(count));
  w.family("companion_registry_registered",
           "1 while the instance's record is in its registry (etcd: under a live lease)",
           Type::kGauge);
  w.sample("companion_registry_registered", {{"registry", state.registry}},
           state.registered ? 1 : 0);

  std::lock_guard<std::mutex> lock(mutex_);
  w.family("companion_loads_total",
           "Loads that ended with the model served, by kind (load and reload: from the "
           "checkpoint; wake: from the host tier)",
           Type::kCounter);
  for (auto kind : kLoadKinds)
    w.sample("companion_loads_total", {{"kind", load_kind_name(kind)}},
             static_cast<double>(loads_.at(kind).count));
  w.family("companion_load_bytes_total", "Bytes those loads read or copied, by kind",
           Type::kCounter);
  for (auto kind : kLoadKinds)
    w.sample("companion_load_bytes_total", {{"kind", load_kind_name(kind)}},
             static_cast<double>(loads_.at(kind).bytes));
  w.family("companion_load_duration_seconds",
           "How long those loads took, from start to the model served, by kind", Type::kHistogram);
  for (auto kind : kLoadKinds)
    w.histogram("companion_load_duration_seconds", {{"kind", load_kind_name(kind)}},
                loads_.at(kind).seconds);
  w.family("companion_load_errors_total", "Loads that failed, by kind and error code",
           Type::kCounter);
  for (const auto& [what, count] : load_errors_)
    w.sample("companion_load_errors_total",
             {{"kind", load_kind_name(what.first)}, {"code", status_code_name(what.second)}},
             static_cast<double>(count));

  w.family("companion_attaches_total", "Leases granted to clients (attaches)", Type::kCounter);
  w.sample("companion_attaches_total", {}, static_cast<double>(attaches_));
  w.family("companion_attach_duration_seconds",
           "From an attach request's arrival to its reply queued, waiting for a load included",
           Type::kHistogram);
  w.histogram("companion_attach_duration_seconds", {}, attach_seconds_);
  w.family("companion_attach_errors_total", "Attach requests answered with an error, by code",
           Type::kCounter);
  for (const auto& [code, count] : attach_errors_)
    w.sample("companion_attach_errors_total", {{"code", status_code_name(code)}},
             static_cast<double>(count));
  return w.take();
}

}  // namespace companion::server
