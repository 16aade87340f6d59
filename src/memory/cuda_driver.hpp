// The CUDA driver, reached without linking libcuda: dlopen("libcuda.so.1") once, then every entry
// point through cuGetProcAddress (asked for the CUDA 12.0 ABI of each function). Also: mapping of
// driver errors to Error, primary-context handling, and the small helpers the loader needs
// (pinned host buffers, streams, async copies).
//
// Do not include cuda.h in a translation unit that includes this header: cuda.h #defines several
// of the entry point names used as members below (cuMemAlloc -> cuMemAlloc_v2, ...).
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "common/log.hpp"
#include "companion/result.hpp"
#include "memory/cuda_driver_api.hpp"

// Events, for the loader's copy engine (cuda_driver_api.hpp holds the rest of the ABI).
namespace companion::memory::cu {
struct CUevent_st;
using CUevent = CUevent_st*;
inline constexpr unsigned int kEventBlockingSync = 1;        // CU_EVENT_BLOCKING_SYNC
inline constexpr unsigned int kEventDisableTiming = 2;       // CU_EVENT_DISABLE_TIMING
inline constexpr CUresult kErrorNotReady = 600;              // CUDA_ERROR_NOT_READY (cuEventQuery)
inline constexpr unsigned int kMemHostRegisterPortable = 1;  // CU_MEMHOSTREGISTER_PORTABLE
inline constexpr unsigned int kMemHostRegisterReadOnly = 8;  // CU_MEMHOSTREGISTER_READ_ONLY
}  // namespace companion::memory::cu

namespace companion::memory::cuda {

// The ABI version every entry point is asked for (cuGetProcAddress's cudaVersion): 12.0. The
// signatures below are those of that version (cuMemAlloc = cuMemAlloc_v2, cuDeviceGetUuid =
// cuDeviceGetUuid_v2, cuIpcOpenMemHandle = cuIpcOpenMemHandle_v2, ...). Older drivers are refused.
inline constexpr int kRequestedCudaVersion = 12000;

// X(name, (parameters)): every driver function Companion calls. All return CUresult.
// clang-format off
#define COMPANION_CUDA_DRIVER_ENTRY_POINTS(X)                                                     \
  X(cuGetErrorName, (cu::CUresult error, const char** str))                                      \
  X(cuGetErrorString, (cu::CUresult error, const char** str))                                    \
  X(cuInit, (unsigned int flags))                                                                 \
  X(cuDriverGetVersion, (int* version))                                                           \
  X(cuDeviceGetCount, (int* count))                                                               \
  X(cuDeviceGet, (cu::CUdevice* device, int ordinal))                                            \
  X(cuDeviceGetName, (char* name, int len, cu::CUdevice device))                                 \
  X(cuDeviceTotalMem, (std::size_t* bytes, cu::CUdevice device))                                 \
  X(cuDeviceGetUuid, (cu::CUuuid* uuid, cu::CUdevice device))                                    \
  X(cuDeviceGetPCIBusId, (char* bus_id, int len, cu::CUdevice device))                           \
  X(cuDeviceGetAttribute, (int* value, cu::CUdeviceAttribute attribute, cu::CUdevice device))   \
  X(cuDevicePrimaryCtxRetain, (cu::CUcontext* context, cu::CUdevice device))                     \
  X(cuCtxGetCurrent, (cu::CUcontext* context))                                                    \
  X(cuCtxSetCurrent, (cu::CUcontext context))                                                     \
  X(cuCtxSynchronize, ())                                                                         \
  X(cuMemGetInfo, (std::size_t* free_bytes, std::size_t* total_bytes))                           \
  X(cuMemAlloc, (cu::CUdeviceptr* ptr, std::size_t bytes))                                       \
  X(cuMemFree, (cu::CUdeviceptr ptr))                                                             \
  X(cuMemGetAddressRange, (cu::CUdeviceptr* base, std::size_t* size, cu::CUdeviceptr ptr))       \
  X(cuPointerGetAttribute, (void* data, cu::CUpointerAttribute attribute, cu::CUdeviceptr ptr))  \
  X(cuMemcpyHtoD, (cu::CUdeviceptr dst, const void* src, std::size_t bytes))                     \
  X(cuMemcpyDtoH, (void* dst, cu::CUdeviceptr src, std::size_t bytes))                           \
  X(cuMemcpyHtoDAsync, (cu::CUdeviceptr dst, const void* src, std::size_t bytes,                \
                        cu::CUstream stream))                                                     \
  X(cuMemsetD32, (cu::CUdeviceptr dst, unsigned int value, std::size_t count))                  \
  X(cuMemHostAlloc, (void** ptr, std::size_t bytes, unsigned int flags))                        \
  X(cuMemFreeHost, (void* ptr))                                                                   \
  X(cuMemHostRegister, (void* ptr, std::size_t bytes, unsigned int flags))                       \
  X(cuMemHostUnregister, (void* ptr))                                                             \
  X(cuStreamCreate, (cu::CUstream* stream, unsigned int flags))                                  \
  X(cuStreamDestroy, (cu::CUstream stream))                                                       \
  X(cuStreamSynchronize, (cu::CUstream stream))                                                   \
  X(cuEventCreate, (cu::CUevent* event, unsigned int flags))                                     \
  X(cuEventRecord, (cu::CUevent event, cu::CUstream stream))                                     \
  X(cuEventQuery, (cu::CUevent event))                                                            \
  X(cuEventSynchronize, (cu::CUevent event))                                                      \
  X(cuEventDestroy, (cu::CUevent event))                                                          \
  X(cuMemCreate, (cu::CUmemGenericAllocationHandle* handle, std::size_t size,                   \
                  const cu::CUmemAllocationProp* prop, unsigned long long flags))                 \
  X(cuMemRelease, (cu::CUmemGenericAllocationHandle handle))                                     \
  X(cuMemGetAllocationGranularity, (std::size_t* granularity, const cu::CUmemAllocationProp* prop, \
                                    cu::CUmemAllocationGranularityFlags option))                  \
  X(cuMemAddressReserve, (cu::CUdeviceptr* ptr, std::size_t size, std::size_t alignment,       \
                          cu::CUdeviceptr addr, unsigned long long flags))                        \
  X(cuMemAddressFree, (cu::CUdeviceptr ptr, std::size_t size))                                   \
  X(cuMemMap, (cu::CUdeviceptr ptr, std::size_t size, std::size_t offset,                       \
               cu::CUmemGenericAllocationHandle handle, unsigned long long flags))                \
  X(cuMemUnmap, (cu::CUdeviceptr ptr, std::size_t size))                                         \
  X(cuMemSetAccess, (cu::CUdeviceptr ptr, std::size_t size, const cu::CUmemAccessDesc* desc,    \
                     std::size_t count))                                                          \
  X(cuMemExportToShareableHandle, (void* shareable_handle, cu::CUmemGenericAllocationHandle handle, \
                                   cu::CUmemAllocationHandleType type, unsigned long long flags))  \
  X(cuMemImportFromShareableHandle, (cu::CUmemGenericAllocationHandle* handle, void* os_handle, \
                                     cu::CUmemAllocationHandleType type))                         \
  X(cuIpcGetMemHandle, (cu::CUipcMemHandle* handle, cu::CUdeviceptr ptr))                       \
  X(cuIpcOpenMemHandle, (cu::CUdeviceptr* ptr, cu::CUipcMemHandle handle, unsigned int flags))  \
  X(cuIpcCloseMemHandle, (cu::CUdeviceptr ptr))                                                   \
  X(cuModuleLoadData, (cu::CUmodule* module, const void* image))                                 \
  X(cuModuleLoadDataEx, (cu::CUmodule* module, const void* image, unsigned int num_options,     \
                         cu::CUjitOption* options, void** option_values))                         \
  X(cuModuleUnload, (cu::CUmodule module))                                                        \
  X(cuModuleGetFunction, (cu::CUfunction* function, cu::CUmodule module, const char* name))     \
  X(cuLaunchKernel, (cu::CUfunction f, unsigned int grid_x, unsigned int grid_y,                \
                     unsigned int grid_z, unsigned int block_x, unsigned int block_y,             \
                     unsigned int block_z, unsigned int shared_bytes, cu::CUstream stream,       \
                     void** params, void** extra))
// clang-format on

// The loaded table. Immutable once driver() has returned it; shared by all threads.
struct DriverApi {
  int driver_version = 0;  // cuDriverGetVersion: 13000 for CUDA 13.0
  int device_count = 0;    // visible devices (after CUDA_VISIBLE_DEVICES)
#define COMPANION_CUDA_X(name, params) cu::CUresult(*name) params = nullptr;
  COMPANION_CUDA_DRIVER_ENTRY_POINTS(COMPANION_CUDA_X)
#undef COMPANION_CUDA_X
};

// Loads libcuda.so.1, resolves every entry point and runs cuInit(0), once per process
// (thread-safe). kUnavailable with the reason (dlerror's text, a missing symbol, cuInit's error)
// when that failed; the failure is cached, so later calls return at once.
Result<const DriverApi*> driver();

// ---- errors ----------------------------------------------------------------------------------

// Builds the Error of a failed driver call from the driver's own name and description of the
// code: "cuMemCreate: CUDA_ERROR_OUT_OF_MEMORY (out of memory)". CUDA_ERROR_OUT_OF_MEMORY gives
// kOutOfMemory, everything else kCudaError. name/text may be null (unknown code). Pure.
Error make_cuda_error(cu::CUresult result, std::string_view call, const char* name,
                      const char* text);
// The same, asking the loaded driver (cuGetErrorName/cuGetErrorString) for name and text.
Error cuda_error(cu::CUresult result, std::string_view call);
inline Result<void> check(cu::CUresult result, std::string_view call) {
  if (result == cu::kSuccess) return ok_result();
  return cuda_error(result, call);
}
// Prefixes an error's message with what was being done: "importing segment: cuMemMap: ...".
Error with_context(Error error, std::string_view context);

// Calls one entry point of a DriverApi and checks it:
//   COMPANION_TRY(COMPANION_CU(api, cuMemMap, va, size, 0, handle, 0));
#define COMPANION_CU(api, fn, ...) ::companion::memory::cuda::check((api).fn(__VA_ARGS__), #fn)

// ---- devices and contexts --------------------------------------------------------------------

// Ok for 0 <= ordinal < device_count; kDeviceMismatch for a negative ordinal (no GPU given),
// kInvalidArgument past the last visible device.
Result<void> check_ordinal(const DriverApi& api, int ordinal);

// The device's primary context, retained once per device per process (never released: it lives
// as long as the process, like the runtime's).
Result<cu::CUcontext> primary_context(int ordinal);
// Makes the device's primary context current on the calling thread (and leaves it current).
Result<void> make_current(int ordinal);

// Makes a device's primary context current for a scope, then restores whatever the thread had
// before (only if it had to change it).
class ScopedContext {
 public:
  static Result<ScopedContext> enter(int ordinal);
  ScopedContext(ScopedContext&& other) noexcept;
  ScopedContext& operator=(ScopedContext&&) = delete;
  ScopedContext(const ScopedContext&) = delete;
  ScopedContext& operator=(const ScopedContext&) = delete;
  ~ScopedContext();

 private:
  ScopedContext(const DriverApi* api, cu::CUcontext previous, bool restore) noexcept
      : api_(api), previous_(previous), restore_(restore) {}
  const DriverApi* api_ = nullptr;
  cu::CUcontext previous_ = nullptr;
  bool restore_ = false;
};

// cuMemGetAllocationGranularity (RECOMMENDED) for pinned device memory exportable as a POSIX fd on
// this device; queried once per device and cached.
Result<uint64_t> vmm_granularity(int ordinal);

// ---- driver objects owned by a device's primary context ---------------------------------------

// Owns one driver object made in a device's primary context and destroys it there, once: on
// destruction, or when assigned over (a move hands it on). Traits describes the object:
//   Value                    what is held; a value-initialised Value means "nothing"
//   kReleasing               what releasing it is called, for the log ("destroying a CUDA stream")
//   release(api, value)      frees it; runs with the context current. Its error is logged:
//                            nothing else can be done with it in a destructor.
//   release_host(value)      (optional) frees what the driver does not own; runs even when the
//                            driver cannot be reached.
template <typename Traits>
class DriverOwned {
 public:
  using Value = typename Traits::Value;
  DriverOwned() = default;
  DriverOwned(int ordinal, Value value) noexcept : ordinal_(ordinal), value_(value) {}
  DriverOwned(DriverOwned&& other) noexcept
      : ordinal_(other.ordinal_), value_(std::exchange(other.value_, Value{})) {}
  DriverOwned& operator=(DriverOwned&& other) noexcept {
    if (this != &other) {
      reset();
      ordinal_ = other.ordinal_;
      value_ = std::exchange(other.value_, Value{});
    }
    return *this;
  }
  DriverOwned(const DriverOwned&) = delete;
  DriverOwned& operator=(const DriverOwned&) = delete;
  ~DriverOwned() { reset(); }

  const Value& get() const noexcept { return value_; }
  int ordinal() const noexcept { return ordinal_; }
  // Releases what it holds now (nothing when empty).
  void reset() noexcept;

 private:
  int ordinal_ = -1;
  Value value_{};
};

// A host address range (pinned staging buffers).
struct HostRange {
  void* data = nullptr;
  std::size_t size = 0;
  bool operator==(const HostRange&) const = default;
};

struct PinnedHostMemory {  // cuMemHostAlloc
  using Value = HostRange;
  static constexpr const char* kReleasing = "freeing a pinned host buffer";
  static Result<void> release(const DriverApi& api, const Value& value);
};
struct RegisteredHostMemory {  // an anonymous mapping, cuMemHostRegister'ed
  using Value = HostRange;
  static constexpr const char* kReleasing = "unregistering a pinned host buffer";
  static Result<void> release(const DriverApi& api, const Value& value);
  static void release_host(const Value& value) noexcept;  // munmap
};
struct RegisteredRange {  // a range of a mapping someone else owns, cuMemHostRegister'ed
  using Value = HostRange;
  static constexpr const char* kReleasing = "unregistering a page-locked host range";
  static Result<void> release(const DriverApi& api, const Value& value);
};
struct StreamObject {
  using Value = cu::CUstream;
  static constexpr const char* kReleasing = "destroying a CUDA stream";
  static Result<void> release(const DriverApi& api, const Value& value);
};
struct EventObject {
  using Value = cu::CUevent;
  static constexpr const char* kReleasing = "destroying a CUDA event";
  static Result<void> release(const DriverApi& api, const Value& value);
};

template <typename Traits>
void DriverOwned<Traits>::reset() noexcept {
  if (value_ == Value{}) return;
  if (auto api = driver(); api.ok()) {
    auto scope = ScopedContext::enter(ordinal_);
    if (auto r = Traits::release(**api, value_); !r.ok()) {
      log::warn(std::string(Traits::kReleasing) + ": " + r.error().message);
    }
  }
  if constexpr (requires { Traits::release_host(value_); }) Traits::release_host(value_);
  value_ = Value{};
}

// ---- loader helpers --------------------------------------------------------------------------

// Page-locked host memory (cuMemHostAlloc, PORTABLE) for staging async copies. Freed on
// destruction.
class PinnedHostBuffer {
 public:
  static Result<PinnedHostBuffer> allocate(int ordinal, std::size_t bytes);
  PinnedHostBuffer() = default;

  void* data() const noexcept { return memory_.get().data; }
  std::size_t size() const noexcept { return memory_.get().size; }

 private:
  DriverOwned<PinnedHostMemory> memory_;
};

// Page-locked host memory made differently: an anonymous mapping backed by transparent huge
// pages where the kernel allows (MADV_HUGEPAGE), populated, then cuMemHostRegister'ed (PORTABLE).
// Pinning huge pages can be much faster than cuMemHostAlloc's small ones. Unregistered and unmapped
// on destruction.
class RegisteredHostBuffer {
 public:
  static Result<RegisteredHostBuffer> allocate(int ordinal, std::size_t bytes);
  RegisteredHostBuffer() = default;

  void* data() const noexcept { return memory_.get().data; }
  std::size_t size() const noexcept { return memory_.get().size; }

 private:
  DriverOwned<RegisteredHostMemory> memory_;
};

// An existing mapping of this process page-locked for DMA (cuMemHostRegister, PORTABLE; READ_ONLY
// for a mapping without write access), so that copies between it and device memory skip staging.
// Unregistered on destruction; the mapping itself stays the caller's and must outlive this.
class HostRegistration {
 public:
  static Result<HostRegistration> make(int ordinal, void* data, std::size_t bytes, bool read_only);
  HostRegistration() = default;

 private:
  DriverOwned<RegisteredRange> range_;
};

// A non-blocking stream in a device's primary context. Destroyed on destruction (after the
// caller synchronized it).
class Stream {
 public:
  static Result<Stream> create(int ordinal);
  Stream() = default;

  cu::CUstream get() const noexcept { return stream_.get(); }
  int ordinal() const noexcept { return stream_.ordinal(); }
  // cuMemcpyHtoDAsync: src should be pinned (PinnedHostBuffer) and stay untouched until
  // synchronize() returns.
  Result<void> copy_to_device_async(uint64_t device_dst, const void* src, std::size_t bytes);
  Result<void> synchronize();

 private:
  DriverOwned<StreamObject> stream_;
};

// An event in a device's primary context (timing disabled), to learn when the work a stream had
// queued up to record() is done. Destroyed on destruction.
class Event {
 public:
  // blocking_sync: synchronize() sleeps instead of spinning (CU_EVENT_BLOCKING_SYNC).
  static Result<Event> create(int ordinal, bool blocking_sync = true);
  Event() = default;

  cu::CUevent get() const noexcept { return event_.get(); }
  // cuEventRecord: captures the stream's work queued so far.
  Result<void> record(const Stream& stream);
  // cuEventSynchronize: waits for that work.
  Result<void> synchronize();
  // cuEventQuery: true when that work is done, false while it runs.
  Result<bool> query();

 private:
  DriverOwned<EventObject> event_;
};

// ---- shared by the cuda-vmm and cuda-ipc slabs -----------------------------------------------

// At least one segment; each > 0, a multiple of granularity and at most max_bytes.
// kInvalidArgument otherwise. Pure.
Result<void> check_segment_sizes(const std::vector<uint64_t>& sizes, uint64_t granularity,
                                 uint64_t max_bytes, std::string_view backend);
// A write of bytes at offset into segment (of segment_count, segment_size bytes) of a slab that is
// not sealed. kInternal otherwise (a caller's bug), like the host backend. Pure.
Result<void> check_write(std::string_view label, bool sealed, size_t segment, size_t segment_count,
                         uint64_t segment_size, uint64_t offset, uint64_t bytes);
// Context for a failed allocation: "cuda-vmm: allocating segment 2/2 (8 MiB) of slab 'x' (72 MiB
// in all) on GPU 0 (free 1.2 GiB of 79.1 GiB)". Asks cuMemGetInfo for the free memory; needs the
// device's context current.
std::string describe_allocation(std::string_view backend, std::string_view label, int ordinal,
                                size_t segment, const std::vector<uint64_t>& sizes);
// cuMemGetInfo in the device's primary context: (free, total) bytes.
Result<std::pair<uint64_t, uint64_t>> device_memory_info(int ordinal);
// Synchronous host-to-device copy in the device's primary context (cuMemcpyHtoD): when it returns,
// src may be reused.
Result<void> copy_to_device(int ordinal, uint64_t device_dst, const void* src, uint64_t bytes);
// Synchronous device-to-host copy in the device's primary context (cuMemcpyDtoH).
Result<void> copy_to_host(int ordinal, void* dst, uint64_t device_src, uint64_t bytes);
// cuCtxSynchronize in the device's primary context.
Result<void> synchronize_device(int ordinal);

// ---- GPU identity parsing (pure; no driver needed) -------------------------------------------

// The kernel module's version ("580.159.04") from the text of /proc/driver/nvidia/version
// ("NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  580.159.04  Release Build ..."):
// the first word of its first line made of digits and dots, with at least one dot.
std::optional<std::string> parse_nvidia_module_version(std::string_view proc_text);

// "GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx", lowercase hex, like nvidia-smi -L.
std::string format_gpu_uuid(const unsigned char (&bytes)[16]);
// Accepts a UUID with or without the "GPU-" prefix, any case, with the dashes at their usual
// places or without dashes at all. Returns the canonical form above, nullopt otherwise.
std::optional<std::string> normalize_gpu_uuid(std::string_view text);
// Accepts "domain:bus:device.function" (any domain width, e.g. nvidia-smi's "00000000:3B:00.0")
// or the short "bus:device.function" (domain 0), any case. Returns "0000:3b:00.0" (4-digit
// domain, wider only if needed), nullopt otherwise.
std::optional<std::string> normalize_pci_bus_id(std::string_view text);
// A decimal ordinal ("0", "12"); nullopt for anything else (signs, spaces, huge numbers).
std::optional<int> parse_gpu_ordinal(std::string_view text);

// How the user named a GPU.
struct DeviceSpec {
  enum class Kind { kOrdinal, kUuid, kPciBusId };
  Kind kind = Kind::kOrdinal;
  int ordinal = -1;   // kOrdinal
  std::string value;  // kUuid: canonical UUID; kPciBusId: canonical bus id
};
// kInvalidArgument when text is none of an ordinal, a UUID or a PCI bus id.
Result<DeviceSpec> parse_device_spec(std::string_view text);

}  // namespace companion::memory::cuda
