// GPU identity: list the visible GPUs and resolve a user's device string (ordinal, UUID, PCI bus
// id) to one of them.
#include <fstream>
#include <string>
#include <vector>

#include "memory/cuda_backend.hpp"
#include "memory/cuda_driver.hpp"

namespace companion::memory {
namespace {

Result<GpuIdentity> identify(const cuda::DriverApi& api, int ordinal) {
  GpuIdentity id;
  id.ordinal = ordinal;
  cu::CUdevice dev = 0;
  COMPANION_TRY(COMPANION_CU(api, cuDeviceGet, &dev, ordinal));

  char name[256] = {};
  COMPANION_TRY(COMPANION_CU(api, cuDeviceGetName, name, static_cast<int>(sizeof(name)), dev));
  id.name = name;

  size_t total = 0;
  COMPANION_TRY(COMPANION_CU(api, cuDeviceTotalMem, &total, dev));
  id.total_memory = total;

  cu::CUuuid uuid{};
  COMPANION_TRY(COMPANION_CU(api, cuDeviceGetUuid, &uuid, dev));
  unsigned char bytes[16];
  for (size_t i = 0; i < 16; ++i) bytes[i] = static_cast<unsigned char>(uuid.bytes[i]);
  id.uuid = cuda::format_gpu_uuid(bytes);

  char bus_id[64] = {};
  COMPANION_TRY(
      COMPANION_CU(api, cuDeviceGetPCIBusId, bus_id, static_cast<int>(sizeof(bus_id)), dev));
  auto normalized = cuda::normalize_pci_bus_id(bus_id);
  id.pci_bus_id = normalized ? *normalized : std::string(bus_id);
  return id;
}

std::string describe(const std::vector<GpuIdentity>& gpus) {
  std::string out;
  for (const auto& gpu : gpus) {
    if (!out.empty()) out += ", ";
    out += std::to_string(gpu.ordinal) + " " + gpu.uuid + " " + gpu.pci_bus_id;
  }
  return out.empty() ? "none" : out;
}

}  // namespace

Result<std::vector<GpuIdentity>> list_gpus() {
  COMPANION_ASSIGN_OR_RETURN(const cuda::DriverApi* api, cuda::driver());
  std::vector<GpuIdentity> gpus;
  gpus.reserve(static_cast<size_t>(api->device_count));
  for (int ordinal = 0; ordinal < api->device_count; ++ordinal) {
    COMPANION_ASSIGN_OR_RETURN(auto id, identify(*api, ordinal));
    gpus.push_back(std::move(id));
  }
  return gpus;
}

Result<GpuIdentity> resolve_gpu(const std::string& device) {
  // A malformed name is the caller's mistake whether or not this machine has a driver.
  COMPANION_ASSIGN_OR_RETURN(auto spec, cuda::parse_device_spec(device));
  COMPANION_ASSIGN_OR_RETURN(const cuda::DriverApi* api, cuda::driver());
  if (spec.kind == cuda::DeviceSpec::Kind::kOrdinal) {
    if (spec.ordinal >= api->device_count) {
      return make_error(StatusCode::kNotFound, "no GPU with ordinal " + device + ": " +
                                                   std::to_string(api->device_count) +
                                                   " GPU(s) visible");
    }
    return identify(*api, spec.ordinal);
  }
  COMPANION_ASSIGN_OR_RETURN(auto gpus, list_gpus());
  for (auto& gpu : gpus) {
    const std::string& key = spec.kind == cuda::DeviceSpec::Kind::kUuid ? gpu.uuid : gpu.pci_bus_id;
    if (key == spec.value) return std::move(gpu);
  }
  return make_error(StatusCode::kNotFound,
                    "no visible GPU matches '" + device + "' (visible: " + describe(gpus) + ")");
}

Result<int> cuda_driver_version() {
  COMPANION_ASSIGN_OR_RETURN(const cuda::DriverApi* api, cuda::driver());
  return api->driver_version;
}

std::optional<std::string> nvidia_driver_release() {
  std::ifstream in("/proc/driver/nvidia/version");
  std::string first;
  if (!in || !std::getline(in, first)) return std::nullopt;
  return cuda::parse_nvidia_module_version(first);
}

Result<GpuSupport> gpu_support(int ordinal) {
  COMPANION_ASSIGN_OR_RETURN(const cuda::DriverApi* api, cuda::driver());
  COMPANION_TRY(cuda::check_ordinal(*api, ordinal));
  cu::CUdevice dev = 0;
  COMPANION_TRY(COMPANION_CU(*api, cuDeviceGet, &dev, ordinal));
  int vmm = 0;
  int posix_fd = 0;
  COMPANION_TRY(COMPANION_CU(*api, cuDeviceGetAttribute, &vmm,
                             cu::kDevAttrVirtualMemoryManagementSupported, dev));
  COMPANION_TRY(COMPANION_CU(*api, cuDeviceGetAttribute, &posix_fd,
                             cu::kDevAttrHandleTypePosixFileDescriptorSupported, dev));
  return GpuSupport{vmm != 0, posix_fd != 0};
}

}  // namespace companion::memory
