#include "client/discovery.hpp"

#include <chrono>
#include <thread>

#include "memory/cuda_backend.hpp"
#include "registry/registry.hpp"

namespace companion::client {

Result<std::string> discover_socket(const ConnectOptions& options) {
  if (!options.socket_path.empty()) return options.socket_path;
  std::string component;
  std::string gpu_uuid;
  if (options.device == "host") {
    component = "model_server_host";
  } else {
    // The UUID names the same GPU in every process, whatever CUDA_VISIBLE_DEVICES says.
    COMPANION_ASSIGN_OR_RETURN(memory::GpuIdentity gpu, memory::resolve_gpu(options.device));
    gpu_uuid = gpu.uuid;
  }
  registry::LocalRegistry registry(options.runtime_dir.empty() ? registry::default_runtime_dir()
                                                               : options.runtime_dir);
  auto deadline =
      std::chrono::steady_clock::now() +
      std::chrono::milliseconds(static_cast<int64_t>(options.discovery_timeout_s * 1000));
  for (;;) {
    auto records = registry.list(options.ns, component);
    if (records.ok()) {
      for (const auto& r : *records) {
        if (!gpu_uuid.empty() && r.gpu_uuid != gpu_uuid) continue;
        return r.socket_path;
      }
    }
    if (std::chrono::steady_clock::now() >= deadline) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  return make_error(StatusCode::kUnavailable, "no live companion server for device " +
                                                  options.device + " in namespace '" + options.ns +
                                                  "' (registry " + registry.runtime_dir() + ")");
}

Result<int> local_ordinal_for(const ServerIdentity& server) {
  if (server.gpu_uuid.empty()) return -1;
  auto gpu = memory::resolve_gpu(server.gpu_uuid);
  if (!gpu.ok())
    return make_error(StatusCode::kDeviceMismatch,
                      "the server's GPU " + server.gpu_uuid +
                          " is not visible to this process: " + gpu.error().message);
  return gpu->ordinal;
}

}  // namespace companion::client
