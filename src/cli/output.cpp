#include "cli/output.hpp"

#include <algorithm>
#include <cstdio>
#include <string_view>

#include "common/util.hpp"

namespace companion::cli {

std::string json_text(const nlohmann::json& j, int indent) {
  return j.dump(indent, ' ', false, nlohmann::json::error_handler_t::replace);
}

std::string render_table(const std::vector<std::string>& header,
                         const std::vector<std::vector<std::string>>& raw_rows) {
  // Cells come from the server and from files: no terminal escapes, no broken UTF-8.
  std::vector<std::vector<std::string>> rows;
  rows.reserve(raw_rows.size());
  for (const auto& raw : raw_rows) {
    std::vector<std::string> row;
    row.reserve(raw.size());
    for (const auto& cell : raw) row.push_back(printable_text(cell));
    rows.push_back(std::move(row));
  }
  std::vector<size_t> width(header.size());
  for (size_t i = 0; i < header.size(); ++i) width[i] = header[i].size();
  for (const auto& row : rows)
    for (size_t i = 0; i < row.size() && i < width.size(); ++i)
      width[i] = std::max(width[i], row[i].size());
  auto line = [&](const std::vector<std::string>& cells) {
    std::string out;
    for (size_t i = 0; i < cells.size(); ++i) {
      out += cells[i];
      if (i + 1 < cells.size()) out += std::string(width[i] - cells[i].size() + 2, ' ');
    }
    return out + "\n";
  };
  std::string out = line(header);
  for (const auto& row : rows) out += line(row);
  return out;
}

std::string variant_text(const ModelStatus& s) {
  // The key is "source=<path>;dtype=<D>;tp=<rank>/<size>[;rules=<R>][;tag=<T>]" (the tag last,
  // taken whole: it may hold ';'). A published key is the publisher's own string.
  if (s.published || s.key.rfind("source=", 0) != 0) return "-";
  size_t at = s.key.find(";dtype=");
  if (at == std::string::npos) return "-";
  std::string rest = s.key.substr(at + 1);
  std::string tag;
  if (size_t t = rest.find(";tag="); t != std::string::npos) {
    tag = rest.substr(t + 5);
    rest.resize(t);
  }
  std::string out;
  size_t begin = 0;
  while (begin <= rest.size()) {
    size_t end = rest.find(';', begin);
    if (end == std::string::npos) end = rest.size();
    std::string_view field(rest.data() + begin, end - begin);
    begin = end + 1;
    if (field.starts_with("dtype=")) {
      out += field.substr(6);
    } else if (field.starts_with("tp=")) {
      if (field != "tp=0/1") out.append(" ").append(field);  // one shard: the whole model
    } else if (!field.empty()) {
      out.append(" ").append(field);
    }
  }
  if (!tag.empty()) out += " tag=" + tag;
  return out;
}

namespace {
// "12 s ago", "5 min ago", "3 h ago"; "-" when the server did not say.
std::string time_ago(int64_t then_ms, int64_t now_ms) {
  if (then_ms <= 0) return "-";
  int64_t s = std::max<int64_t>(0, (now_ms - then_ms) / 1000);
  if (s < 120) return std::to_string(s) + " s ago";
  if (s < 7200) return std::to_string(s / 60) + " min ago";
  return std::to_string(s / 3600) + " h ago";
}
}  // namespace

std::string render_models(const std::vector<ModelStatus>& models) {
  if (models.empty()) return "no models\n";
  std::vector<std::vector<std::string>> rows;
  int64_t now_ms = unix_time_ms();
  for (const auto& s : models) {
    char pct[16];
    std::snprintf(pct, sizeof(pct), "%.0f%%", s.progress() * 100.0);
    std::string state = model_state_name(s.state);
    if (s.state == ModelState::kLoading) state.append(" ").append(pct);
    if (s.state == ModelState::kUnloaded && s.host_bytes > 0) state = "offloaded";
    // The current generation, and how many older ones readers still hold.
    std::string generation = s.generation == 0 ? "-" : std::to_string(s.generation);
    if (s.generations.size() > 1)
      generation += " (+" + std::to_string(s.generations.size() - 1) + " held)";
    std::string size = format_bytes(s.published ? s.slab_bytes : s.bytes_total);
    std::string source = s.published ? "published: " + printable_text(s.key) : s.source;
    // EVICT: 1 goes first when room is needed; "-" cannot be evicted now.
    std::string evict = s.eviction_rank == 0 ? "-" : std::to_string(s.eviction_rank);
    rows.push_back({s.id, state, generation, std::to_string(s.tensors), size,
                    std::to_string(s.leases), time_ago(s.last_used_ms, now_ms), evict, s.backend,
                    source, variant_text(s), printable_text(s.message)});
  }
  return render_table({"ID", "STATE", "GEN", "TENSORS", "SIZE", "LEASES", "LAST USE", "EVICT",
                       "BACKEND", "SOURCE", "VARIANT", "NOTE"},
                      rows);
}

// One line per live generation of each model that has more than one, or that is published:
// its leases and digests.
std::string render_generations(const std::vector<ModelStatus>& models) {
  std::vector<std::vector<std::string>> rows;
  for (const auto& s : models) {
    if (!s.published && s.generations.size() < 2) continue;
    for (const auto& g : s.generations) {
      std::string digests;
      for (const auto& d : g.digests) digests += (digests.empty() ? "" : " ") + d;
      rows.push_back({s.id, std::to_string(g.number) + (g.current ? " *" : ""),
                      std::to_string(g.leases), format_bytes(g.slab_bytes),
                      digests.empty() ? "-" : digests});
    }
  }
  if (rows.empty()) return "";
  return "\n" + render_table({"ID", "GENERATION", "LEASES", "BYTES", "DIGESTS"}, rows);
}

std::string render_health(const HealthInfo& h) {
  const ServerIdentity& s = h.server;
  std::vector<std::vector<std::string>> rows = {
      {"state", h.state},
      {"server", s.ns + "/" + s.component + " (instance " + s.instance_id + ")"},
      {"device", s.device + (s.pci_bus_id.empty() ? "" : " (" + s.pci_bus_id + ")")},
      {"backend", s.default_backend},
      {"pid", std::to_string(s.pid) + " on " + s.hostname},
      {"uptime", std::to_string(h.uptime_ms / 1000) + " s"},
      {"models", std::to_string(h.models_loaded) + " loaded of " + std::to_string(h.models_total)},
      {"memory",
       format_bytes(h.slab_bytes) +
           (h.memory_budget == 0 ? "" : " of " + format_bytes(h.memory_budget) + " budget") + ", " +
           std::to_string(h.evictions) + " evictions"},
      {"clients",
       std::to_string(h.clients) + " connected, " + std::to_string(h.leases) + " leases"},
      {"socket", s.socket_path},
      {"registry", h.registry + (h.registry == "local" ? ""
                                 : h.registered        ? " (registered)"
                                                : " (not registered: " + h.registry_error + ")")},
      {"version", s.version}};
  std::string refused;
  for (const auto& [reason, count] : h.refused)
    if (count > 0) refused += (refused.empty() ? "" : ", ") + reason + " " + std::to_string(count);
  if (!refused.empty()) rows.push_back({"refused", refused});
  return render_table({"FIELD", "VALUE"}, rows);
}

std::string render_progress(const ModelStatus& s, int width) {
  double p = std::clamp(s.progress(), 0.0, 1.0);
  int filled = static_cast<int>(p * width + 0.5);
  char pct[16];
  std::snprintf(pct, sizeof(pct), "%5.1f%%", p * 100.0);
  std::string out = "[";
  out.append(static_cast<size_t>(filled), '#');
  out.append(static_cast<size_t>(width - filled), '.');
  out.append("] ").append(pct).append("  ").append(format_bytes(s.bytes_done));
  out.append(" / ").append(format_bytes(s.bytes_total));
  return out;
}

}  // namespace companion::cli
