#include "client/instances.hpp"

#include <chrono>
#include <thread>

#include "common/util.hpp"
#include "memory/cuda_backend.hpp"

namespace companion::client {

InstanceSource::InstanceSource(const ConnectOptions& options, registry::RegistryChoice choice,
                               registry::TrustPolicy trust)
    : options_(options),
      choice_(std::move(choice)),
      hostname_(hostname()),
      trust_(trust),
      local_(options.runtime_dir.empty() ? registry::default_runtime_dir() : options.runtime_dir,
             std::move(trust)) {}

Result<std::unique_ptr<InstanceSource>> InstanceSource::open(const ConnectOptions& options) {
  COMPANION_ASSIGN_OR_RETURN(registry::RegistryChoice choice,
                             registry::choose_registry(options.registry));
  COMPANION_ASSIGN_OR_RETURN(registry::TrustPolicy trust,
                             registry::TrustPolicy::from_environment(options.trusted_uids));
  std::unique_ptr<InstanceSource> source(
      new InstanceSource(options, std::move(choice), std::move(trust)));
  if (options.device == "host") {
    source->component_ = "model_server_host";
  } else {
    // The UUID names the same GPU in every process, whatever CUDA_VISIBLE_DEVICES says.
    COMPANION_ASSIGN_OR_RETURN(memory::GpuIdentity gpu, memory::resolve_gpu(options.device));
    source->gpu_uuid_ = gpu.uuid;
  }
  if (source->choice_.is_etcd())
    source->etcd_ = std::make_unique<registry::EtcdDirectory>(
        source->choice_.etcd_endpoints, options.ns, 1500, source->choice_.etcd_security);
  return source;
}

bool InstanceSource::accepts(const ServerIdentity& r) const {
  if (r.ns != options_.ns) return false;
  if (!component_.empty() && r.component != component_) return false;
  if (!gpu_uuid_.empty() && r.gpu_uuid != gpu_uuid_) return false;
  if (!options_.instance_id.empty() && r.instance_id != options_.instance_id) return false;
  // Sockets are local: an instance on another host is of no use here.
  return r.hostname == hostname_;
}

std::vector<ServerIdentity> InstanceSource::local_records() const {
  constexpr auto kReuse = std::chrono::milliseconds(200);
  std::lock_guard<std::mutex> lock(cache_mutex_);
  auto now = std::chrono::steady_clock::now();
  if (now - local_cache_at_ >= kReuse || local_cache_.empty()) {
    auto local = local_.list(options_.ns);
    local_cache_ = local.ok() ? std::move(*local) : std::vector<ServerIdentity>{};
    local_cache_at_ = now;
    // Said once, where no instance is found (describe()), rather than at every listing.
    local_refusal_ =
        !local.ok() && local.error().code == StatusCode::kNotPermitted ? local.error().message : "";
  }
  return local_cache_;
}

std::vector<ServerIdentity> InstanceSource::list() const {
  std::vector<ServerIdentity> records;
  if (etcd_) {
    auto snapshot = etcd_->snapshot();
    records = snapshot.synced ? std::move(snapshot.records) : local_records();
  } else {
    records = local_records();
  }
  std::vector<ServerIdentity> out;
  for (auto& r : records)
    if (accepts(r)) out.push_back(std::move(r));
  return out;
}

std::vector<ServerIdentity> InstanceSource::wait_for_any(double timeout_s) const {
  auto deadline = std::chrono::steady_clock::now() +
                  std::chrono::milliseconds(static_cast<int64_t>(timeout_s * 1000));
  for (;;) {
    auto records = list();
    if (!records.empty() || std::chrono::steady_clock::now() >= deadline) return records;
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
}

std::string InstanceSource::describe() const {
  std::string where = choice_.is_etcd() ? choice_.url : "local registry " + local_.runtime_dir();
  {
    std::lock_guard<std::mutex> lock(cache_mutex_);
    if (!local_refusal_.empty()) where += "; its records are ignored: " + local_refusal_;
  }
  if (etcd_) {
    auto snapshot = etcd_->snapshot();
    if (!snapshot.synced)
      where += " (not reached: " + snapshot.last_error + "; local registry " +
               local_.runtime_dir() + " used)";
  }
  return "device " + options_.device + " in namespace '" + options_.ns + "'" +
         (options_.instance_id.empty() ? "" : " instance " + options_.instance_id) + " (" + where +
         ")";
}

}  // namespace companion::client
