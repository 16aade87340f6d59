// The server instances a client may use: live, in its namespace, serving its device, on this
// host, as the configured registry lists them.
#pragma once

#include <chrono>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "companion/client.hpp"
#include "companion/result.hpp"
#include "registry/etcd_registry.hpp"
#include "registry/registry.hpp"

namespace companion::client {

class InstanceSource {
 public:
  // Resolves the device (GPU UUID) and, for etcd, reads the namespace once and starts watching.
  static Result<std::unique_ptr<InstanceSource>> open(const ConnectOptions& options);

  // The candidates now, oldest first. With etcd: the watched records (the last seen ones while
  // etcd is away), or the local registry's until etcd was reached once.
  std::vector<ServerIdentity> list() const;
  // As list(), waiting up to timeout_s for a candidate to appear.
  std::vector<ServerIdentity> wait_for_any(double timeout_s) const;
  // "registry etcd://... namespace 'x' device host", for messages.
  std::string describe() const;
  // The owners whose records and sockets this client trusts.
  const registry::TrustPolicy& trust() const noexcept { return trust_; }

 private:
  InstanceSource(const ConnectOptions& options, registry::RegistryChoice choice,
                 registry::TrustPolicy trust);
  bool accepts(const ServerIdentity& record) const;

  ConnectOptions options_;
  registry::RegistryChoice choice_;
  std::string component_;  // model_server_host for the host; any GPU component otherwise
  std::string gpu_uuid_;
  std::string hostname_;
  std::vector<ServerIdentity> local_records() const;

  registry::TrustPolicy trust_;
  registry::LocalRegistry local_;
  std::unique_ptr<registry::EtcdDirectory> etcd_;
  // The local registry's listing (a directory scan and a lock probe per record) is reused for a
  // moment: requests come faster than instances change, and a dead one is noticed on connect.
  mutable std::mutex cache_mutex_;
  mutable std::vector<ServerIdentity> local_cache_;
  mutable std::string local_refusal_;  // why the local registry was refused ("" if it was not)
  mutable std::chrono::steady_clock::time_point local_cache_at_{};
};

}  // namespace companion::client
