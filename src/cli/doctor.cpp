// `companion doctor`: checks a host as an operator would (driver, GPUs, runtime directory,
// servers, registry), one line per check, exit 1 when any failed. Every check reuses the code
// the server and client run, so that doctor judges a host by the same rules they do.
#include <dirent.h>
#include <sys/stat.h>

#include <cstdio>
#include <fstream>
#include <iostream>
#include <map>
#include <sstream>

#include "cli/commands.hpp"
#include "cli/output.hpp"
#include "common/util.hpp"
#include "memory/cuda_backend.hpp"
#include "registry/etcd_client.hpp"
#include "registry/etcd_registry.hpp"
#include "registry/registry.hpp"

namespace companion::cli {
namespace {

enum class Outcome { kOk, kFailed, kSkipped };

struct Check {
  std::string group;
  std::string name;
  Outcome outcome = Outcome::kOk;
  std::string detail;
  std::string hint;  // what to do, for a failure
};

const char* outcome_name(Outcome o) {
  return o == Outcome::kOk ? "ok" : o == Outcome::kFailed ? "failed" : "skipped";
}

class Checks {
 public:
  void ok(const std::string& group, const std::string& name, const std::string& detail) {
    list_.push_back({group, name, Outcome::kOk, detail, ""});
  }
  void failed(const std::string& group, const std::string& name, const std::string& detail,
              const std::string& hint) {
    list_.push_back({group, name, Outcome::kFailed, detail, hint});
  }
  void skipped(const std::string& group, const std::string& name, const std::string& why) {
    list_.push_back({group, name, Outcome::kSkipped, why, ""});
  }
  bool any_failed() const {
    for (const auto& c : list_)
      if (c.outcome == Outcome::kFailed) return true;
    return false;
  }

  void print_text() const {
    std::string group;
    size_t counts[3] = {0, 0, 0};
    for (const auto& c : list_) {
      if (c.group != group) {
        group = c.group;
        std::cout << group << "\n";
      }
      ++counts[static_cast<int>(c.outcome)];
      switch (c.outcome) {
        case Outcome::kOk:
          std::cout << "  \u2714 " << c.name << ": " << c.detail << "\n";
          break;
        case Outcome::kFailed:
          std::cout << "  \u2718 " << c.name << ": " << c.detail
                    << (c.hint.empty() ? "" : " (" + c.hint + ")") << "\n";
          break;
        case Outcome::kSkipped:
          std::cout << "  - " << c.name << ": skipped (" << c.detail << ")\n";
          break;
      }
    }
    std::cout << counts[0] << " passed, " << counts[1] << " failed, " << counts[2] << " skipped"
              << std::endl;
  }

  void print_json() const {
    nlohmann::json checks = nlohmann::json::array();
    for (const auto& c : list_)
      checks.push_back({{"group", c.group},
                        {"name", c.name},
                        {"status", outcome_name(c.outcome)},
                        {"detail", c.detail},
                        {"hint", c.hint}});
    std::cout << json_text({{"ok", !any_failed()}, {"checks", checks}}, 2) << std::endl;
  }

 private:
  std::vector<Check> list_;
};

std::string cuda_version_text(int version) {
  return std::to_string(version / 1000) + "." + std::to_string(version % 1000 / 10);
}

// Driver and GPUs. A GPU is expected when doctor is asked about a GPU device (--device other
// than host); otherwise a host without a driver is a host-backend host, not a broken one.
void check_gpus(const ConnectOptions& connect, Checks& checks) {
  const bool gpu_expected = connect.device != "host";
  auto available = memory::cuda_available();
  if (!available.ok()) {
    if (gpu_expected)
      checks.failed("driver", "NVIDIA driver", available.error().message,
                    "install the NVIDIA driver, or serve --device host");
    else
      checks.skipped("driver", "NVIDIA driver",
                     "no NVIDIA driver: only the host backend; " + available.error().message);
    checks.skipped("GPUs", "GPUs", "no NVIDIA driver");
    return;
  }
  auto version = memory::cuda_driver_version();
  if (version.ok()) {
    auto release = memory::nvidia_driver_release();
    checks.ok("driver", "NVIDIA driver",
              (release ? *release + ", " : std::string()) + "supports CUDA " +
                  cuda_version_text(*version));
  } else
    checks.failed("driver", "NVIDIA driver", version.error().message, "check the driver install");

  auto gpus = memory::list_gpus();
  if (!gpus.ok()) {
    checks.failed("GPUs", "GPUs", gpus.error().message, "nvidia-smi shows what the driver sees");
    return;
  }
  if (gpus->empty()) {
    if (gpu_expected)
      checks.failed("GPUs", "GPUs", "none visible", "check CUDA_VISIBLE_DEVICES and nvidia-smi");
    else
      checks.skipped("GPUs", "GPUs", "none visible");
    return;
  }
  for (const auto& gpu : *gpus) {
    const std::string name = "GPU " + std::to_string(gpu.ordinal);
    const std::string identity =
        gpu.name + ", " + format_bytes(gpu.total_memory) + ", " + gpu.uuid + ", " + gpu.pci_bus_id;
    auto support = memory::gpu_support(gpu.ordinal);
    if (!support.ok()) {
      checks.failed("GPUs", name, identity + ": " + support.error().message,
                    "check the driver install");
    } else if (!support->virtual_memory || !support->posix_fd_export) {
      // serve's default backend (cuda-vmm) fails on it; cuda-ipc still serves it.
      checks.failed("GPUs", name,
                    identity + ": " +
                        (!support->virtual_memory ? "no virtual memory management"
                                                  : "cannot export memory as POSIX fds"),
                    "serve --backend cuda-ipc");
    } else {
      checks.ok("GPUs", name, identity + ", cuda-vmm and cuda-ipc supported");
    }
  }
}

std::string mode_text(mode_t mode) {
  char text[8];
  std::snprintf(text, sizeof(text), "%04o", static_cast<unsigned>(mode & 07777));
  return text;
}

// The records in the directory before the registry lists it (listing removes a dead server's
// record): instance id -> record, or nullopt for one that does not parse.
std::map<std::string, std::optional<ServerIdentity>> records_on_disk(const std::string& dir) {
  std::map<std::string, std::optional<ServerIdentity>> records;
  DIR* d = opendir(dir.c_str());
  if (d == nullptr) return records;
  while (dirent* e = readdir(d)) {
    std::string file = e->d_name;
    if (file.size() <= 5 || file.compare(file.size() - 5, 5, ".json") != 0) continue;
    std::ifstream in(dir + "/" + file);
    std::stringstream text;
    text << in.rdbuf();
    auto record = registry::record_from_json(text.str());
    records[file.substr(0, file.size() - 5)] =
        record.ok() ? std::optional<ServerIdentity>(*record) : std::nullopt;
  }
  closedir(d);
  return records;
}

std::string server_name(const ServerIdentity& r) {
  return "server " + r.ns + "/" + (r.device.empty() ? r.component : r.device) + " " + r.instance_id;
}

void check_server(const ConnectOptions& connect, const ServerIdentity& record, Checks& checks) {
  const std::string name = server_name(record);
  ConnectOptions direct = connect;
  direct.socket_path = record.socket_path;
  direct.ns = record.ns;
  direct.instance_id.clear();
  auto client = Client::connect(direct);
  auto h = client.ok() ? (*client)->health() : Result<HealthInfo>(client.error());
  if (!h.ok()) {
    checks.failed("servers", name,
                  "pid " + std::to_string(record.pid) + ", unreachable: " + h.error().message,
                  "see the server's log (journalctl -u companion@... under systemd)");
    return;
  }
  const std::string summary = "pid " + std::to_string(record.pid) + ", " + h->state + ", " +
                              std::to_string(h->models_loaded) + "/" +
                              std::to_string(h->models_total) + " models loaded, " +
                              std::to_string(h->clients) + " client(s), up " +
                              std::to_string(h->uptime_ms / 1000) + " s";
  if (h->state != "serving")
    checks.failed("servers", name, summary, "the server is not serving: see its log");
  else if (h->registry != "local" && !h->registered)
    checks.failed("servers", name,
                  summary + ", NOT registered in " + h->registry + ": " + h->registry_error,
                  "clients looking in etcd do not find it; check etcd");
  else
    checks.ok("servers", name,
              summary + (h->registry == "local" ? "" : ", registered in " + h->registry));

  const std::string memory_name = "memory " + record.instance_id;
  if (h->memory_budget == 0) {
    checks.ok("servers", memory_name,
              format_bytes(h->slab_bytes) + " used, no budget (serve --memory-budget)");
  } else if (h->slab_bytes > h->memory_budget) {
    checks.failed(
        "servers", memory_name,
        format_bytes(h->slab_bytes) + " used of a " + format_bytes(h->memory_budget) + " budget",
        "over budget: unload models or raise the budget");
  } else {
    checks.ok("servers", memory_name,
              format_bytes(h->slab_bytes) + " used of a " + format_bytes(h->memory_budget) +
                  " budget, " + std::to_string(h->evictions) + " evictions");
  }
}

// The runtime directory by the registry's own rules (owner, mode), then every server recorded in
// it: live ones asked for their health, dead ones reported.
void check_runtime_dir_and_servers(const ConnectOptions& connect, Checks& checks) {
  const std::string dir =
      connect.runtime_dir.empty() ? registry::default_runtime_dir() : connect.runtime_dir;
  auto trust = registry::TrustPolicy::from_environment(connect.trusted_uids);
  if (!trust.ok()) {
    checks.failed("runtime directory", "runtime directory", dir + ": " + trust.error().message,
                  "fix $COMPANION_TRUST_UID");
    checks.skipped("servers", "servers", "the runtime directory was not checked");
    return;
  }
  struct stat st {};
  if (lstat(dir.c_str(), &st) != 0) {
    checks.skipped("runtime directory", "runtime directory",
                   dir + " is missing: no server has run here yet");
    checks.skipped("servers", "servers", "none: no runtime directory");
    return;
  }
  auto on_disk = records_on_disk(dir);
  registry::LocalRegistry local(dir, *trust);
  auto live = local.list();
  if (!live.ok()) {
    checks.failed("runtime directory", "runtime directory", dir + ": " + live.error().message,
                  "servers refuse it, and clients ignore it");
    checks.skipped("servers", "servers", "the runtime directory is refused");
    return;
  }
  checks.ok("runtime directory", "runtime directory",
            dir + ": owner uid " + std::to_string(st.st_uid) + ", mode " + mode_text(st.st_mode) +
                ", trusted owners " + trust->describe());

  std::map<std::string, bool> listed;
  for (const auto& record : *live) listed[record.instance_id] = true;
  for (const auto& [id, record] : on_disk) {
    if (listed.count(id) != 0) continue;
    struct stat record_st {};
    const bool removed = lstat(local.record_path_for(id).c_str(), &record_st) != 0;
    const std::string name = record ? server_name(*record) : "server " + id;
    if (removed)
      checks.failed("servers", name,
                    "dead" + (record ? " (pid " + std::to_string(record->pid) + ")" : "") +
                        ": it exited without removing its record (now removed)",
                    "it crashed or was killed: see its log");
    else
      checks.failed("servers", name, "record skipped: unreadable, or not of a trusted owner",
                    "remove " + local.record_path_for(id) + " if no server owns it");
  }
  if (live->empty() && on_disk.empty())
    checks.skipped("servers", "servers", "none running (records in " + dir + ")");
  for (const auto& record : *live) check_server(connect, record, checks);
}

// etcd, when the registry is one: reachable, and what the namespace holds.
void check_registry(const ConnectOptions& connect, Checks& checks) {
  auto choice = registry::choose_registry(connect.registry);
  if (!choice.ok()) {
    checks.failed("registry", "registry", choice.error().message,
                  "--registry or $COMPANION_REGISTRY: local or etcd://host:port");
    return;
  }
  if (!choice->is_etcd()) {
    checks.skipped("registry", "etcd",
                   "local registry only: --registry or $COMPANION_REGISTRY names an etcd");
    return;
  }
  // A short timeout per endpoint: doctor answers in seconds even when etcd is away.
  registry::EtcdClient etcd(choice->etcd_endpoints, 2000, choice->etcd_security);
  auto range = etcd.range_prefix(registry::etcd_namespace_prefix(connect.ns));
  if (!range.ok()) {
    checks.failed("registry", "etcd " + choice->url, "unreachable: " + range.error().message,
                  "is etcd running, and are its address and credentials right?");
    return;
  }
  checks.ok("registry", "etcd " + choice->url,
            "reachable at " + etcd.endpoint() + ", " + std::to_string(range->kvs.size()) +
                " record(s) in namespace '" + connect.ns + "'");
}

}  // namespace

int run_doctor(const CommonArgs& args) {
  Checks checks;
  check_gpus(args.connect, checks);
  check_runtime_dir_and_servers(args.connect, checks);
  check_registry(args.connect, checks);
  if (args.json)
    checks.print_json();
  else
    checks.print_text();
  return checks.any_failed() ? 1 : 0;
}

}  // namespace companion::cli
