// The dlopen'd CUDA driver table, error mapping, primary contexts and loader helpers.
#include "memory/cuda_driver.hpp"

#include <dlfcn.h>
#include <sys/mman.h>

#include <algorithm>
#include <atomic>
#include <cctype>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <memory>
#include <mutex>
#include <sstream>
#include <utility>

#include "common/log.hpp"
#include "common/util.hpp"
#include "memory/cuda_backend.hpp"

namespace companion::memory::cuda {
namespace {

constexpr const char* kLibraryName = "libcuda.so.1";

// Per-device state, created lazily, never destroyed (process lifetime like the driver's).
struct DeviceSlot {
  std::atomic<cu::CUcontext> context{nullptr};
  std::atomic<uint64_t> granularity{0};
};

struct DriverState {
  DriverApi api;
  bool ok = false;
  Error error;
  std::unique_ptr<DeviceSlot[]> devices;  // device_count slots
  std::mutex mutex;                       // serialises the slow paths filling slots
};

// Set as soon as cuGetErrorName/cuGetErrorString are resolved, so that errors met while loading
// the rest already carry the driver's names.
std::atomic<const DriverApi*> g_error_api{nullptr};

using GetProcAddressV2 = cu::CUresult (*)(const char* symbol, void** pfn, int cuda_version,
                                          cu::cuuint64_t flags,
                                          cu::CUdriverProcAddressQueryResult* status);
using GetProcAddressV1 = cu::CUresult (*)(const char* symbol, void** pfn, int cuda_version,
                                          cu::cuuint64_t flags);

Error unavailable(std::string message) {
  return make_error(StatusCode::kUnavailable, std::move(message));
}

Result<void> load(DriverState& state) {
  DriverApi& api = state.api;
  ::dlerror();
  void* lib = ::dlopen(kLibraryName, RTLD_NOW | RTLD_LOCAL);
  if (lib == nullptr) {
    const char* why = ::dlerror();
    return unavailable(std::string("cannot load the CUDA driver: ") +
                       (why != nullptr ? why : "dlopen(libcuda.so.1) failed"));
  }
  // Never dlclose'd: the driver stays loaded for the life of the process.
  auto* gpa2 = reinterpret_cast<GetProcAddressV2>(::dlsym(lib, "cuGetProcAddress_v2"));
  auto* gpa1 = gpa2 != nullptr
                   ? nullptr
                   : reinterpret_cast<GetProcAddressV1>(::dlsym(lib, "cuGetProcAddress"));
  if (gpa2 == nullptr && gpa1 == nullptr) {
    return unavailable(std::string(kLibraryName) +
                       " exports no cuGetProcAddress: the driver is too old (CUDA 12.0 or later "
                       "needed)");
  }
  auto resolve = [&](const char* name, void** out) -> Result<void> {
    *out = nullptr;
    cu::CUdriverProcAddressQueryResult status = cu::kGetProcAddressSuccess;
    const cu::CUresult r =
        gpa2 != nullptr
            ? gpa2(name, out, kRequestedCudaVersion, cu::kGetProcAddressDefault, &status)
            : gpa1(name, out, kRequestedCudaVersion, cu::kGetProcAddressDefault);
    if (r == cu::kSuccess && *out != nullptr) return ok_result();
    std::string why;
    if (status == cu::kGetProcAddressVersionNotSufficient) {
      why = "the driver's version of it is not compatible with CUDA 12.0";
    } else if (status == cu::kGetProcAddressSymbolNotFound || r == cu::kSuccess) {
      why = "symbol not found";
    } else {
      why = cuda_error(r, "cuGetProcAddress").message;
    }
    return unavailable(std::string("the CUDA driver lacks ") + name + ": " + why +
                       " (driver too old?)");
  };

#define COMPANION_CUDA_RESOLVE(fn)                               \
  do {                                                           \
    void* companion_pfn_ = nullptr;                              \
    COMPANION_TRY(resolve(#fn, &companion_pfn_));                \
    api.fn = reinterpret_cast<decltype(api.fn)>(companion_pfn_); \
  } while (0)

  COMPANION_CUDA_RESOLVE(cuGetErrorName);
  COMPANION_CUDA_RESOLVE(cuGetErrorString);
  g_error_api.store(&api, std::memory_order_release);
  COMPANION_CUDA_RESOLVE(cuDriverGetVersion);
  if (auto r = COMPANION_CU(api, cuDriverGetVersion, &api.driver_version); !r.ok()) {
    return unavailable(r.error().message);
  }
  if (api.driver_version < kRequestedCudaVersion) {
    return unavailable(
        "the CUDA driver supports CUDA " + std::to_string(api.driver_version / 1000) + "." +
        std::to_string(api.driver_version % 1000 / 10) + "; Companion needs 12.0 or later");
  }
#define COMPANION_CUDA_RESOLVE_ALL(name, params) COMPANION_CUDA_RESOLVE(name);
  COMPANION_CUDA_DRIVER_ENTRY_POINTS(COMPANION_CUDA_RESOLVE_ALL)
#undef COMPANION_CUDA_RESOLVE_ALL
#undef COMPANION_CUDA_RESOLVE

  if (auto r = COMPANION_CU(api, cuInit, 0); !r.ok()) return unavailable(r.error().message);
  if (auto r = COMPANION_CU(api, cuDeviceGetCount, &api.device_count); !r.ok()) {
    return unavailable(r.error().message);
  }
  if (api.device_count <= 0) return unavailable("the CUDA driver sees no GPU");
  state.devices = std::make_unique<DeviceSlot[]>(static_cast<size_t>(api.device_count));
  log::debug("CUDA driver " + std::to_string(api.driver_version) + " loaded, " +
             std::to_string(api.device_count) + " GPU(s) visible");
  return ok_result();
}

DriverState& state() {
  // Never destroyed: segments held by other static objects may be released during exit.
  static DriverState* const s = new DriverState;
  static std::once_flag once;
  std::call_once(once, [] {
    auto r = load(*s);
    if (r.ok()) {
      s->ok = true;
    } else {
      s->error = std::move(r).error();
    }
  });
  return *s;
}

Result<DeviceSlot*> slot(int ordinal) {
  DriverState& s = state();
  if (!s.ok) return s.error;
  COMPANION_TRY(check_ordinal(s.api, ordinal));
  return &s.devices[static_cast<size_t>(ordinal)];
}

int hex_value(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

// Parses 1..max_digits hex digits (the whole of text); nullopt otherwise.
std::optional<uint64_t> parse_hex(std::string_view text, size_t max_digits) {
  if (text.empty() || text.size() > max_digits) return std::nullopt;
  uint64_t value = 0;
  for (char c : text) {
    const int v = hex_value(c);
    if (v < 0) return std::nullopt;
    value = value * 16 + static_cast<uint64_t>(v);
  }
  return value;
}

bool starts_with_ignoring_case(std::string_view text, std::string_view prefix) {
  if (text.size() < prefix.size()) return false;
  for (size_t i = 0; i < prefix.size(); ++i) {
    if (std::tolower(static_cast<unsigned char>(text[i])) !=
        std::tolower(static_cast<unsigned char>(prefix[i]))) {
      return false;
    }
  }
  return true;
}

}  // namespace

Result<const DriverApi*> driver() {
  DriverState& s = state();
  if (!s.ok) return s.error;
  return &s.api;
}

// ---- errors ----------------------------------------------------------------------------------

Error make_cuda_error(cu::CUresult result, std::string_view call, const char* name,
                      const char* text) {
  std::string message(call);
  message += ": ";
  if (name != nullptr) {
    message += name;
  } else {
    message += "CUDA error " + std::to_string(result);
  }
  if (text != nullptr && *text != '\0') {
    message += " (";
    message += text;
    message += ")";
  }
  const StatusCode code =
      result == cu::kErrorOutOfMemory ? StatusCode::kOutOfMemory : StatusCode::kCudaError;
  return make_error(code, std::move(message));
}

Error cuda_error(cu::CUresult result, std::string_view call) {
  const char* name = nullptr;
  const char* text = nullptr;
  if (const DriverApi* api = g_error_api.load(std::memory_order_acquire); api != nullptr) {
    if (api->cuGetErrorName(result, &name) != cu::kSuccess) name = nullptr;
    if (api->cuGetErrorString(result, &text) != cu::kSuccess) text = nullptr;
  }
  return make_cuda_error(result, call, name, text);
}

Error with_context(Error error, std::string_view context) {
  error.message = std::string(context) + ": " + error.message;
  return error;
}

// ---- devices and contexts --------------------------------------------------------------------

Result<void> check_ordinal(const DriverApi& api, int ordinal) {
  if (ordinal < 0) {
    return make_error(
        StatusCode::kDeviceMismatch,
        "GPU memory needs a GPU: no device ordinal given (" + std::to_string(ordinal) + ")");
  }
  if (ordinal >= api.device_count) {
    return make_error(StatusCode::kInvalidArgument,
                      "GPU ordinal " + std::to_string(ordinal) +
                          " out of range: " + std::to_string(api.device_count) + " GPU(s) visible");
  }
  return ok_result();
}

Result<cu::CUcontext> primary_context(int ordinal) {
  COMPANION_ASSIGN_OR_RETURN(DeviceSlot * device, slot(ordinal));
  if (cu::CUcontext c = device->context.load(std::memory_order_acquire); c != nullptr) return c;
  DriverState& s = state();
  std::lock_guard lock(s.mutex);
  if (cu::CUcontext c = device->context.load(std::memory_order_acquire); c != nullptr) return c;
  cu::CUdevice dev = 0;
  COMPANION_TRY(COMPANION_CU(s.api, cuDeviceGet, &dev, ordinal));
  cu::CUcontext context = nullptr;
  COMPANION_TRY(COMPANION_CU(s.api, cuDevicePrimaryCtxRetain, &context, dev));
  device->context.store(context, std::memory_order_release);
  return context;
}

Result<void> make_current(int ordinal) {
  COMPANION_ASSIGN_OR_RETURN(cu::CUcontext context, primary_context(ordinal));
  COMPANION_ASSIGN_OR_RETURN(const DriverApi* api, driver());
  return COMPANION_CU(*api, cuCtxSetCurrent, context);
}

Result<ScopedContext> ScopedContext::enter(int ordinal) {
  COMPANION_ASSIGN_OR_RETURN(cu::CUcontext context, primary_context(ordinal));
  COMPANION_ASSIGN_OR_RETURN(const DriverApi* api, driver());
  cu::CUcontext previous = nullptr;
  COMPANION_TRY(COMPANION_CU(*api, cuCtxGetCurrent, &previous));
  if (previous == context) return ScopedContext(api, previous, false);
  COMPANION_TRY(COMPANION_CU(*api, cuCtxSetCurrent, context));
  return ScopedContext(api, previous, true);
}

ScopedContext::ScopedContext(ScopedContext&& other) noexcept
    : api_(other.api_),
      previous_(other.previous_),
      restore_(std::exchange(other.restore_, false)) {}

ScopedContext::~ScopedContext() {
  if (restore_) (void)api_->cuCtxSetCurrent(previous_);
}

Result<uint64_t> vmm_granularity(int ordinal) {
  COMPANION_ASSIGN_OR_RETURN(DeviceSlot * device, slot(ordinal));
  if (uint64_t g = device->granularity.load(std::memory_order_acquire); g != 0) return g;
  const DriverApi& api = state().api;
  cu::CUmemAllocationProp prop{};
  prop.type = cu::kMemAllocationTypePinned;
  prop.requestedHandleTypes = cu::kMemHandleTypePosixFileDescriptor;
  prop.location.type = cu::kMemLocationTypeDevice;
  prop.location.id = ordinal;
  size_t granularity = 0;
  COMPANION_TRY(COMPANION_CU(api, cuMemGetAllocationGranularity, &granularity, &prop,
                             cu::kMemAllocGranularityRecommended));
  if (granularity == 0) {
    return make_error(StatusCode::kCudaError, "cuMemGetAllocationGranularity returned 0 for GPU " +
                                                  std::to_string(ordinal));
  }
  device->granularity.store(granularity, std::memory_order_release);  // racing stores agree
  return static_cast<uint64_t>(granularity);
}

// ---- driver objects owned by a device's primary context ---------------------------------------

Result<void> PinnedHostMemory::release(const DriverApi& api, const Value& value) {
  return COMPANION_CU(api, cuMemFreeHost, value.data);
}
Result<void> RegisteredHostMemory::release(const DriverApi& api, const Value& value) {
  return COMPANION_CU(api, cuMemHostUnregister, value.data);
}
void RegisteredHostMemory::release_host(const Value& value) noexcept {
  ::munmap(value.data, value.size);
}
Result<void> RegisteredRange::release(const DriverApi& api, const Value& value) {
  return COMPANION_CU(api, cuMemHostUnregister, value.data);
}
Result<void> StreamObject::release(const DriverApi& api, const Value& value) {
  return COMPANION_CU(api, cuStreamDestroy, value);
}
Result<void> EventObject::release(const DriverApi& api, const Value& value) {
  return COMPANION_CU(api, cuEventDestroy, value);
}

// ---- loader helpers --------------------------------------------------------------------------

Result<PinnedHostBuffer> PinnedHostBuffer::allocate(int ordinal, std::size_t bytes) {
  if (bytes == 0) return make_error(StatusCode::kInvalidArgument, "pinned buffer of 0 bytes");
  COMPANION_ASSIGN_OR_RETURN(const DriverApi* api, driver());
  COMPANION_ASSIGN_OR_RETURN(auto scope, ScopedContext::enter(ordinal));
  void* data = nullptr;
  COMPANION_TRY(COMPANION_CU(*api, cuMemHostAlloc, &data, bytes, cu::kMemHostAllocPortable));
  PinnedHostBuffer buffer;
  buffer.memory_ = DriverOwned<PinnedHostMemory>(ordinal, HostRange{data, bytes});
  return buffer;
}

Result<RegisteredHostBuffer> RegisteredHostBuffer::allocate(int ordinal, std::size_t bytes) {
  if (bytes == 0) return make_error(StatusCode::kInvalidArgument, "pinned buffer of 0 bytes");
  COMPANION_ASSIGN_OR_RETURN(const DriverApi* api, driver());
  COMPANION_ASSIGN_OR_RETURN(auto scope, ScopedContext::enter(ordinal));
  void* data = ::mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (data == MAP_FAILED) {
    return errno_error(StatusCode::kOutOfMemory, "mmap of a " + format_bytes(bytes) + " buffer",
                       errno);
  }
  (void)::madvise(data, bytes, MADV_HUGEPAGE);  // a hint: fine if refused
  std::memset(data, 0, bytes);                  // populate before pinning
  if (auto r = COMPANION_CU(*api, cuMemHostRegister, data, bytes, cu::kMemHostRegisterPortable);
      !r.ok()) {
    ::munmap(data, bytes);
    return std::move(r).error();
  }
  RegisteredHostBuffer buffer;
  buffer.memory_ = DriverOwned<RegisteredHostMemory>(ordinal, HostRange{data, bytes});
  return buffer;
}

Result<HostRegistration> HostRegistration::make(int ordinal, void* data, std::size_t bytes,
                                                bool read_only) {
  if (data == nullptr || bytes == 0)
    return make_error(StatusCode::kInvalidArgument, "registering an empty host range");
  COMPANION_ASSIGN_OR_RETURN(const DriverApi* api, driver());
  COMPANION_ASSIGN_OR_RETURN(auto scope, ScopedContext::enter(ordinal));
  const unsigned int flags =
      cu::kMemHostRegisterPortable | (read_only ? cu::kMemHostRegisterReadOnly : 0u);
  COMPANION_TRY(COMPANION_CU(*api, cuMemHostRegister, data, bytes, flags));
  HostRegistration registration;
  registration.range_ = DriverOwned<RegisteredRange>(ordinal, HostRange{data, bytes});
  return registration;
}

Result<Stream> Stream::create(int ordinal) {
  COMPANION_ASSIGN_OR_RETURN(const DriverApi* api, driver());
  COMPANION_ASSIGN_OR_RETURN(auto scope, ScopedContext::enter(ordinal));
  cu::CUstream stream = nullptr;
  COMPANION_TRY(COMPANION_CU(*api, cuStreamCreate, &stream, cu::kStreamNonBlocking));
  Stream s;
  s.stream_ = DriverOwned<StreamObject>(ordinal, stream);
  return s;
}

Result<void> Stream::copy_to_device_async(uint64_t device_dst, const void* src, std::size_t bytes) {
  if (get() == nullptr) return make_error(StatusCode::kInternal, "copy on an empty Stream");
  if (bytes == 0) return ok_result();
  COMPANION_ASSIGN_OR_RETURN(const DriverApi* api, driver());
  COMPANION_ASSIGN_OR_RETURN(auto scope, ScopedContext::enter(ordinal()));
  return COMPANION_CU(*api, cuMemcpyHtoDAsync, device_dst, src, bytes, get());
}

Result<void> Stream::synchronize() {
  if (get() == nullptr) return make_error(StatusCode::kInternal, "synchronize on an empty Stream");
  COMPANION_ASSIGN_OR_RETURN(const DriverApi* api, driver());
  COMPANION_ASSIGN_OR_RETURN(auto scope, ScopedContext::enter(ordinal()));
  return COMPANION_CU(*api, cuStreamSynchronize, get());
}

Result<Event> Event::create(int ordinal, bool blocking_sync) {
  COMPANION_ASSIGN_OR_RETURN(const DriverApi* api, driver());
  COMPANION_ASSIGN_OR_RETURN(auto scope, ScopedContext::enter(ordinal));
  cu::CUevent event = nullptr;
  unsigned int flags = cu::kEventDisableTiming | (blocking_sync ? cu::kEventBlockingSync : 0u);
  COMPANION_TRY(COMPANION_CU(*api, cuEventCreate, &event, flags));
  Event e;
  e.event_ = DriverOwned<EventObject>(ordinal, event);
  return e;
}

Result<void> Event::record(const Stream& stream) {
  if (get() == nullptr || stream.get() == nullptr)
    return make_error(StatusCode::kInternal, "record with an empty Event or Stream");
  COMPANION_ASSIGN_OR_RETURN(const DriverApi* api, driver());
  COMPANION_ASSIGN_OR_RETURN(auto scope, ScopedContext::enter(event_.ordinal()));
  return COMPANION_CU(*api, cuEventRecord, get(), stream.get());
}

Result<void> Event::synchronize() {
  if (get() == nullptr) return make_error(StatusCode::kInternal, "synchronize on an empty Event");
  COMPANION_ASSIGN_OR_RETURN(const DriverApi* api, driver());
  COMPANION_ASSIGN_OR_RETURN(auto scope, ScopedContext::enter(event_.ordinal()));
  return COMPANION_CU(*api, cuEventSynchronize, get());
}

Result<bool> Event::query() {
  if (get() == nullptr) return make_error(StatusCode::kInternal, "query on an empty Event");
  COMPANION_ASSIGN_OR_RETURN(const DriverApi* api, driver());
  COMPANION_ASSIGN_OR_RETURN(auto scope, ScopedContext::enter(event_.ordinal()));
  cu::CUresult r = api->cuEventQuery(get());
  if (r == cu::kErrorNotReady) return false;
  COMPANION_TRY(check(r, "cuEventQuery"));
  return true;
}

// ---- shared by the cuda-vmm and cuda-ipc slabs -----------------------------------------------

Result<void> check_segment_sizes(const std::vector<uint64_t>& sizes, uint64_t granularity,
                                 uint64_t max_bytes, std::string_view backend) {
  if (sizes.empty()) {
    return make_error(StatusCode::kInvalidArgument,
                      std::string(backend) + ": a slab needs a segment");
  }
  for (size_t i = 0; i < sizes.size(); ++i) {
    const uint64_t size = sizes[i];
    if (size == 0 || size > max_bytes || (granularity != 0 && size % granularity != 0)) {
      return make_error(StatusCode::kInvalidArgument,
                        std::string(backend) + ": segment " + std::to_string(i) + " has " +
                            std::to_string(size) + " bytes; segments need 1 to " +
                            std::to_string(max_bytes) + " bytes in multiples of " +
                            std::to_string(granularity));
    }
  }
  return ok_result();
}

Result<void> check_write(std::string_view label, bool sealed, size_t segment, size_t segment_count,
                         uint64_t segment_size, uint64_t offset, uint64_t bytes) {
  if (sealed) {
    return make_error(StatusCode::kInternal,
                      "write to slab '" + std::string(label) + "' after it was sealed");
  }
  if (segment >= segment_count) {
    return make_error(StatusCode::kInternal, "write to segment " + std::to_string(segment) +
                                                 " of slab '" + std::string(label) +
                                                 "', which has " + std::to_string(segment_count));
  }
  if (offset > segment_size || bytes > segment_size - offset) {
    return make_error(StatusCode::kInternal,
                      "write of " + std::to_string(bytes) + " bytes at offset " +
                          std::to_string(offset) + " past the end of segment " +
                          std::to_string(segment) + " (" + std::to_string(segment_size) +
                          " bytes) of slab '" + std::string(label) + "'");
  }
  return ok_result();
}

std::string describe_allocation(std::string_view backend, std::string_view label, int ordinal,
                                size_t segment, const std::vector<uint64_t>& sizes) {
  uint64_t total = 0;
  for (uint64_t size : sizes) total += size;
  std::string out = std::string(backend) + ": allocating segment " + std::to_string(segment + 1) +
                    "/" + std::to_string(sizes.size()) + " (" +
                    format_bytes(segment < sizes.size() ? sizes[segment] : 0) + ") of slab '" +
                    std::string(label) + "' (" + format_bytes(total) + " in all) on GPU " +
                    std::to_string(ordinal);
  if (auto api = driver(); api.ok()) {
    size_t free_bytes = 0;
    size_t total_bytes = 0;
    if ((*api)->cuMemGetInfo(&free_bytes, &total_bytes) == cu::kSuccess) {
      out += " (free " + format_bytes(free_bytes) + " of " + format_bytes(total_bytes) + ")";
    }
  }
  return out;
}

Result<std::pair<uint64_t, uint64_t>> device_memory_info(int ordinal) {
  COMPANION_ASSIGN_OR_RETURN(const DriverApi* api, driver());
  COMPANION_ASSIGN_OR_RETURN(auto scope, ScopedContext::enter(ordinal));
  size_t free_bytes = 0;
  size_t total_bytes = 0;
  COMPANION_TRY(COMPANION_CU(*api, cuMemGetInfo, &free_bytes, &total_bytes));
  return std::pair<uint64_t, uint64_t>(free_bytes, total_bytes);
}

Result<void> copy_to_device(int ordinal, uint64_t device_dst, const void* src, uint64_t bytes) {
  if (bytes == 0) return ok_result();
  COMPANION_ASSIGN_OR_RETURN(const DriverApi* api, driver());
  COMPANION_ASSIGN_OR_RETURN(auto scope, ScopedContext::enter(ordinal));
  return COMPANION_CU(*api, cuMemcpyHtoD, device_dst, src, bytes);
}

Result<void> copy_to_host(int ordinal, void* dst, uint64_t device_src, uint64_t bytes) {
  if (bytes == 0) return ok_result();
  COMPANION_ASSIGN_OR_RETURN(const DriverApi* api, driver());
  COMPANION_ASSIGN_OR_RETURN(auto scope, ScopedContext::enter(ordinal));
  return COMPANION_CU(*api, cuMemcpyDtoH, dst, device_src, bytes);
}

Result<void> synchronize_device(int ordinal) {
  COMPANION_ASSIGN_OR_RETURN(const DriverApi* api, driver());
  COMPANION_ASSIGN_OR_RETURN(auto scope, ScopedContext::enter(ordinal));
  return COMPANION_CU(*api, cuCtxSynchronize);
}

// ---- GPU identity parsing --------------------------------------------------------------------

std::optional<std::string> parse_nvidia_module_version(std::string_view text) {
  std::istringstream words{std::string(text.substr(0, text.find('\n')))};
  for (std::string word; words >> word;) {
    const bool digits_and_dots = std::all_of(
        word.begin(), word.end(), [](char c) { return c == '.' || (c >= '0' && c <= '9'); });
    if (digits_and_dots && word.find('.') != std::string::npos && word.front() != '.' &&
        word.back() != '.')
      return word;
  }
  return std::nullopt;
}

std::string format_gpu_uuid(const unsigned char (&bytes)[16]) {
  static constexpr char kDigits[] = "0123456789abcdef";
  std::string out = "GPU-";
  out.reserve(40);
  for (size_t i = 0; i < 16; ++i) {
    if (i == 4 || i == 6 || i == 8 || i == 10) out += '-';
    out += kDigits[bytes[i] >> 4];
    out += kDigits[bytes[i] & 0x0f];
  }
  return out;
}

std::optional<std::string> normalize_gpu_uuid(std::string_view text) {
  if (starts_with_ignoring_case(text, "GPU-")) text.remove_prefix(4);
  std::string hex;
  if (text.size() == 36) {  // 8-4-4-4-12
    for (size_t i = 0; i < text.size(); ++i) {
      const bool dash_here = i == 8 || i == 13 || i == 18 || i == 23;
      if (dash_here != (text[i] == '-')) return std::nullopt;
      if (!dash_here) hex += text[i];
    }
  } else if (text.size() == 32) {
    hex = std::string(text);
  } else {
    return std::nullopt;
  }
  unsigned char bytes[16];
  for (size_t i = 0; i < 16; ++i) {
    const int hi = hex_value(hex[2 * i]);
    const int lo = hex_value(hex[2 * i + 1]);
    if (hi < 0 || lo < 0) return std::nullopt;
    bytes[i] = static_cast<unsigned char>(hi * 16 + lo);
  }
  return format_gpu_uuid(bytes);
}

std::optional<std::string> normalize_pci_bus_id(std::string_view text) {
  // [domain:]bus:device.function
  const size_t dot = text.rfind('.');
  if (dot == std::string_view::npos) return std::nullopt;
  const auto function = parse_hex(text.substr(dot + 1), 1);
  if (!function || *function > 7) return std::nullopt;
  std::string_view head = text.substr(0, dot);
  const size_t colon2 = head.rfind(':');
  if (colon2 == std::string_view::npos) return std::nullopt;
  const auto device = parse_hex(head.substr(colon2 + 1), 2);
  if (!device || *device > 0x1f) return std::nullopt;
  head = head.substr(0, colon2);
  const size_t colon1 = head.rfind(':');
  std::optional<uint64_t> domain = 0;
  std::optional<uint64_t> bus;
  if (colon1 == std::string_view::npos) {
    bus = parse_hex(head, 2);
  } else {
    bus = parse_hex(head.substr(colon1 + 1), 2);
    domain = parse_hex(head.substr(0, colon1), 8);
  }
  if (!bus || !domain) return std::nullopt;
  char out[32];
  std::snprintf(out, sizeof(out), "%04llx:%02llx:%02llx.%llx",
                static_cast<unsigned long long>(*domain), static_cast<unsigned long long>(*bus),
                static_cast<unsigned long long>(*device),
                static_cast<unsigned long long>(*function));
  return std::string(out);
}

std::optional<int> parse_gpu_ordinal(std::string_view text) {
  if (text.empty() || text.size() > 6) return std::nullopt;
  int value = 0;
  for (char c : text) {
    if (c < '0' || c > '9') return std::nullopt;
    value = value * 10 + (c - '0');
  }
  return value;
}

Result<DeviceSpec> parse_device_spec(std::string_view text) {
  DeviceSpec spec;
  if (auto ordinal = parse_gpu_ordinal(text)) {
    spec.kind = DeviceSpec::Kind::kOrdinal;
    spec.ordinal = *ordinal;
    return spec;
  }
  if (auto uuid = normalize_gpu_uuid(text)) {
    spec.kind = DeviceSpec::Kind::kUuid;
    spec.value = std::move(*uuid);
    return spec;
  }
  if (auto bus_id = normalize_pci_bus_id(text)) {
    spec.kind = DeviceSpec::Kind::kPciBusId;
    spec.value = std::move(*bus_id);
    return spec;
  }
  return make_error(StatusCode::kInvalidArgument,
                    "'" + std::string(text) +
                        "' is not a GPU ordinal, UUID (GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx) "
                        "or PCI bus id (0000:3b:00.0)");
}

}  // namespace companion::memory::cuda

namespace companion::memory {

Result<void> cuda_available() {
  COMPANION_TRY(cuda::driver());
  return ok_result();
}

}  // namespace companion::memory
