#include "client/json.hpp"

namespace companion::client {

nlohmann::json to_json(const ModelStatus& s) {
  nlohmann::json j = {{"id", s.id},
                      {"key", s.key},
                      {"source", s.source},
                      {"state", model_state_name(s.state)},
                      {"bytes_done", s.bytes_done},
                      {"bytes_total", s.bytes_total},
                      {"progress", s.progress()},
                      {"tensors", s.tensors},
                      {"leases", s.leases},
                      {"backend", s.backend},
                      {"slab_bytes", s.slab_bytes}};
  if (s.state == ModelState::kError) {
    j["error"] = {{"code", status_code_name(s.error_code)}, {"message", s.message}};
  } else if (s.error_code != StatusCode::kOk) {
    // Still serving its current generation; the reload that would have replaced it failed.
    j["reload_error"] = {{"code", status_code_name(s.error_code)}, {"message", s.message}};
  } else if (!s.message.empty()) {
    j["message"] = s.message;
  }
  j["published"] = s.published;
  j["generation"] = s.generation;
  j["fingerprint"] = s.fingerprint;
  nlohmann::json generations = nlohmann::json::array();
  for (const auto& g : s.generations)
    generations.push_back({{"generation", g.number},
                           {"leases", g.leases},
                           {"slab_bytes", g.slab_bytes},
                           {"digests", g.digests},
                           {"fingerprint", g.fingerprint},
                           {"created_at_ms", g.created_at_ms},
                           {"current", g.current}});
  j["generations"] = std::move(generations);
  j["host_bytes"] = s.host_bytes;
  j["offloaded"] = s.state == ModelState::kUnloaded && s.host_bytes > 0;
  j["last_used_ms"] = s.last_used_ms;
  j["eviction_rank"] = s.eviction_rank;
  return j;
}

nlohmann::json to_json(const ServerIdentity& s) {
  return {{"instance_id", s.instance_id},
          {"namespace", s.ns},
          {"component", s.component},
          {"hostname", s.hostname},
          {"pid", s.pid},
          {"device", s.device},
          {"gpu_uuid", s.gpu_uuid},
          {"pci_bus_id", s.pci_bus_id},
          {"device_ordinal", s.device_ordinal},
          {"backends", s.backends},
          {"default_backend", s.default_backend},
          {"started_at_ms", s.started_at_ms},
          {"version", s.version},
          {"socket_path", s.socket_path}};
}

nlohmann::json to_json(const HealthInfo& h) {
  return {{"state", h.state},
          {"uptime_ms", h.uptime_ms},
          {"models_loaded", h.models_loaded},
          {"models_total", h.models_total},
          {"clients", h.clients},
          {"leases", h.leases},
          {"slab_bytes", h.slab_bytes},
          {"server", to_json(h.server)},
          {"registry", h.registry},
          {"registered", h.registered},
          {"registry_error", h.registry_error},
          {"refused", h.refused},
          {"memory_budget", h.memory_budget},
          {"evictions", h.evictions}};
}

nlohmann::json to_json(const Error& e) {
  return {{"error", {{"code", status_code_name(e.code)}, {"message", e.message}}}};
}

nlohmann::json to_json(const MappedModel& m) {
  nlohmann::json j = {{"model", to_json(m.status())},
                      {"lease_id", m.lease_id()},
                      {"segments", m.segment_count()},
                      {"segment_inodes", m.segment_inodes()},
                      {"mapped_bytes", m.mapped_bytes()}};
  j["read_only"] = m.read_only();  // false on cuda-ipc: legacy IPC mappings are read-write
  return j;
}

}  // namespace companion::client
