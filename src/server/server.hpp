// The companion server: one per device. Accepts connections on its Unix socket, answers requests
// on a single event-loop thread, loads models on worker threads, registers itself for discovery.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "companion/result.hpp"
#include "companion/types.hpp"

namespace companion::server {

struct ServerOptions {
  std::string device = "host";   // "host", a GPU ordinal, UUID or PCI bus id
  std::string ns = "companion";  // namespace
  std::string backend;           // "" = the device's default (host | cuda-vmm), or cuda-ipc
  std::vector<std::string> model_roots;
  std::string runtime_dir;  // "" = registry default
  // Where else to announce this instance: "" ($COMPANION_REGISTRY, else local only), "local",
  // or "etcd://host:port[,host:port]". The local registry always holds the instance's record.
  std::string registry;
  int registry_ttl_s = 3;   // etcd lease TTL: a dead instance disappears from etcd within it
  std::string socket_path;  // "" = <runtime_dir>/<instance>.sock
  std::string hf_cache;     // "" = the usual HF environment rules
  size_t load_threads = 2;
  std::string direct_io = "auto";    // O_DIRECT checkpoint reads: auto (= off today), on, off
  std::vector<std::string> preload;  // model sources to load at start
  // Store limits (StoreConfig documents each): a load past one is refused and counted.
  size_t max_models = 1024;             // --max-models: loaded + loading
  size_t max_variants_per_source = 64;  // --max-variants-per-source
  size_t max_error_entries = 256;       // --max-error-entries: failed loads kept
  double error_ttl_s = 300;             // --error-ttl: how long a failed load is kept
  // --memory-reserve: device memory no load may take, in bytes ("1GiB", "512MiB", "4096") or as
  // a share of the device ("10%").
  std::string memory_reserve = "1GiB";
  // --shutdown-timeout: how long stopping waits for loads; one stuck longer is left behind.
  double shutdown_timeout_s = 5;
};

class Server {
 public:
  static Result<std::unique_ptr<Server>> create(const ServerOptions& options);
  virtual ~Server() = default;
  virtual const ServerIdentity& identity() const = 0;
  // Serves until stop() (from another thread or a signal thread). Unregisters on return.
  virtual Result<void> run() = 0;
  virtual void stop() = 0;
};

}  // namespace companion::server
