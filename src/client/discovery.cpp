#include "client/discovery.hpp"

#include "memory/cuda_backend.hpp"

namespace companion::client {

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
