// Cross-checks the driver ABI declared in cuda_driver_api.hpp / cuda_driver.hpp against cuda.h,
// when CMake found one (COMPANION_CUDA_H is its path). Everything is checked at compile time:
// a mismatch fails the build of unit_memory.
#include <gtest/gtest.h>

#include <cstddef>
#include <tuple>
#include <type_traits>
#include <utility>

// Before cuda.h: it #defines several entry point names (cuMemAlloc -> cuMemAlloc_v2, ...).
#include "memory/cuda_driver.hpp"
#include "memory/cuda_driver_api.hpp"

#ifdef COMPANION_CUDA_H

namespace {
namespace ours = companion::memory::cu;
using companion::memory::cuda::DriverApi;

// The entry point types of DriverApi, in list order (spelled before cuda.h renames anything).
#define COMPANION_OURS_X(name, params) , decltype(DriverApi::name)
template <typename... T>
struct drop_first;
template <typename First, typename... T>
struct drop_first<First, T...> {
  using type = std::tuple<T...>;
};
using OurEntryPoints = drop_first<void COMPANION_CUDA_DRIVER_ENTRY_POINTS(COMPANION_OURS_X)>::type;
#undef COMPANION_OURS_X

}  // namespace

#include COMPANION_CUDA_H

namespace {

// cuda.h's prototypes of the same functions. Its macros pick the versioned symbol each name stands
// for (cuMemAlloc -> cuMemAlloc_v2, cuDeviceGetUuid -> cuDeviceGetUuid_v2, ...), which is what
// cuGetProcAddress returns for CUDA 12.0.
#define COMPANION_THEIRS_X(name, params) , decltype(&::name)
using TheirEntryPoints =
    drop_first<void COMPANION_CUDA_DRIVER_ENTRY_POINTS(COMPANION_THEIRS_X)>::type;
#undef COMPANION_THEIRS_X

// ---- constants -------------------------------------------------------------------------------
#define COMPANION_SAME_VALUE(ours_name, theirs)                                            \
  static_assert(static_cast<long long>(ours::ours_name) == static_cast<long long>(theirs), \
                #ours_name " differs from cuda.h's " #theirs)

COMPANION_SAME_VALUE(kIpcHandleSize, CU_IPC_HANDLE_SIZE);
COMPANION_SAME_VALUE(kSuccess, CUDA_SUCCESS);
COMPANION_SAME_VALUE(kErrorInvalidValue, CUDA_ERROR_INVALID_VALUE);
COMPANION_SAME_VALUE(kErrorOutOfMemory, CUDA_ERROR_OUT_OF_MEMORY);
COMPANION_SAME_VALUE(kErrorNotInitialized, CUDA_ERROR_NOT_INITIALIZED);
COMPANION_SAME_VALUE(kErrorDeinitialized, CUDA_ERROR_DEINITIALIZED);
COMPANION_SAME_VALUE(kErrorNoDevice, CUDA_ERROR_NO_DEVICE);
COMPANION_SAME_VALUE(kErrorInvalidDevice, CUDA_ERROR_INVALID_DEVICE);
COMPANION_SAME_VALUE(kErrorInvalidContext, CUDA_ERROR_INVALID_CONTEXT);
COMPANION_SAME_VALUE(kErrorNotFound, CUDA_ERROR_NOT_FOUND);
COMPANION_SAME_VALUE(kErrorIllegalAddress, CUDA_ERROR_ILLEGAL_ADDRESS);
COMPANION_SAME_VALUE(kErrorNotPermitted, CUDA_ERROR_NOT_PERMITTED);
COMPANION_SAME_VALUE(kErrorNotSupported, CUDA_ERROR_NOT_SUPPORTED);
COMPANION_SAME_VALUE(kGetProcAddressDefault, CU_GET_PROC_ADDRESS_DEFAULT);
COMPANION_SAME_VALUE(kGetProcAddressSuccess, CU_GET_PROC_ADDRESS_SUCCESS);
COMPANION_SAME_VALUE(kGetProcAddressSymbolNotFound, CU_GET_PROC_ADDRESS_SYMBOL_NOT_FOUND);
COMPANION_SAME_VALUE(kGetProcAddressVersionNotSufficient,
                     CU_GET_PROC_ADDRESS_VERSION_NOT_SUFFICIENT);
COMPANION_SAME_VALUE(kMemAllocationTypePinned, CU_MEM_ALLOCATION_TYPE_PINNED);
COMPANION_SAME_VALUE(kMemHandleTypePosixFileDescriptor, CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR);
COMPANION_SAME_VALUE(kMemLocationTypeDevice, CU_MEM_LOCATION_TYPE_DEVICE);
COMPANION_SAME_VALUE(kMemAccessFlagsProtNone, CU_MEM_ACCESS_FLAGS_PROT_NONE);
COMPANION_SAME_VALUE(kMemAccessFlagsProtRead, CU_MEM_ACCESS_FLAGS_PROT_READ);
COMPANION_SAME_VALUE(kMemAccessFlagsProtReadWrite, CU_MEM_ACCESS_FLAGS_PROT_READWRITE);
COMPANION_SAME_VALUE(kMemAllocGranularityMinimum, CU_MEM_ALLOC_GRANULARITY_MINIMUM);
COMPANION_SAME_VALUE(kMemAllocGranularityRecommended, CU_MEM_ALLOC_GRANULARITY_RECOMMENDED);
COMPANION_SAME_VALUE(kPointerAttributeAccessFlags, CU_POINTER_ATTRIBUTE_ACCESS_FLAGS);
COMPANION_SAME_VALUE(kPointerAccessFlagNone, CU_POINTER_ATTRIBUTE_ACCESS_FLAG_NONE);
COMPANION_SAME_VALUE(kPointerAccessFlagRead, CU_POINTER_ATTRIBUTE_ACCESS_FLAG_READ);
COMPANION_SAME_VALUE(kPointerAccessFlagReadWrite, CU_POINTER_ATTRIBUTE_ACCESS_FLAG_READWRITE);
COMPANION_SAME_VALUE(kIpcMemLazyEnablePeerAccess, CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS);
COMPANION_SAME_VALUE(kMemHostAllocPortable, CU_MEMHOSTALLOC_PORTABLE);
COMPANION_SAME_VALUE(kStreamNonBlocking, CU_STREAM_NON_BLOCKING);
COMPANION_SAME_VALUE(kDevAttrMultiprocessorCount, CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT);
COMPANION_SAME_VALUE(kDevAttrPciBusId, CU_DEVICE_ATTRIBUTE_PCI_BUS_ID);
COMPANION_SAME_VALUE(kDevAttrPciDeviceId, CU_DEVICE_ATTRIBUTE_PCI_DEVICE_ID);
COMPANION_SAME_VALUE(kDevAttrUnifiedAddressing, CU_DEVICE_ATTRIBUTE_UNIFIED_ADDRESSING);
COMPANION_SAME_VALUE(kDevAttrPciDomainId, CU_DEVICE_ATTRIBUTE_PCI_DOMAIN_ID);
COMPANION_SAME_VALUE(kDevAttrComputeCapabilityMajor, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR);
COMPANION_SAME_VALUE(kDevAttrComputeCapabilityMinor, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR);
COMPANION_SAME_VALUE(kDevAttrVirtualMemoryManagementSupported,
                     CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED);
COMPANION_SAME_VALUE(kDevAttrHandleTypePosixFileDescriptorSupported,
                     CU_DEVICE_ATTRIBUTE_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR_SUPPORTED);
COMPANION_SAME_VALUE(kJitInfoLogBuffer, CU_JIT_INFO_LOG_BUFFER);
COMPANION_SAME_VALUE(kJitErrorLogBuffer, CU_JIT_ERROR_LOG_BUFFER);
COMPANION_SAME_VALUE(kJitErrorLogBufferSizeBytes, CU_JIT_ERROR_LOG_BUFFER_SIZE_BYTES);
#undef COMPANION_SAME_VALUE

// ---- scalar and handle types -----------------------------------------------------------------
static_assert(std::is_same_v<ours::CUdevice, ::CUdevice>);
static_assert(std::is_same_v<ours::CUdeviceptr, ::CUdeviceptr>);
static_assert(std::is_same_v<ours::CUmemGenericAllocationHandle, ::CUmemGenericAllocationHandle>);
static_assert(std::is_same_v<ours::cuuint64_t, ::cuuint64_t>);
static_assert(sizeof(ours::CUresult) == sizeof(::CUresult));
static_assert(sizeof(ours::CUmemAllocationType) == sizeof(::CUmemAllocationType));
static_assert(sizeof(ours::CUmemAllocationHandleType) == sizeof(::CUmemAllocationHandleType));
static_assert(sizeof(ours::CUmemLocationType) == sizeof(::CUmemLocationType));
static_assert(sizeof(ours::CUmemAccessFlags) == sizeof(::CUmemAccess_flags));
static_assert(sizeof(ours::CUmemAllocationGranularityFlags) ==
              sizeof(::CUmemAllocationGranularity_flags));
static_assert(sizeof(ours::CUdeviceAttribute) == sizeof(::CUdevice_attribute));
static_assert(sizeof(ours::CUjitOption) == sizeof(::CUjit_option));
static_assert(sizeof(ours::CUdriverProcAddressQueryResult) ==
              sizeof(::CUdriverProcAddressQueryResult));
static_assert(sizeof(ours::CUpointerAttribute) == sizeof(::CUpointer_attribute));
static_assert(sizeof(ours::kPointerAccessFlagRead) ==
              sizeof(::CUDA_POINTER_ATTRIBUTE_ACCESS_FLAGS));
static_assert(sizeof(ours::CUcontext) == sizeof(::CUcontext));
static_assert(sizeof(ours::CUstream) == sizeof(::CUstream));

// ---- struct layouts --------------------------------------------------------------------------
#define COMPANION_SAME_LAYOUT(type)                                           \
  static_assert(sizeof(ours::type) == sizeof(::type), #type " size differs"); \
  static_assert(alignof(ours::type) == alignof(::type), #type " alignment differs")
#define COMPANION_SAME_OFFSET(type, member)                               \
  static_assert(offsetof(ours::type, member) == offsetof(::type, member), \
                #type "::" #member " offset differs");                    \
  static_assert(sizeof(ours::type::member) == sizeof(::type::member),     \
                #type "::" #member " size differs")

COMPANION_SAME_LAYOUT(CUuuid);
COMPANION_SAME_OFFSET(CUuuid, bytes);
COMPANION_SAME_LAYOUT(CUipcMemHandle);
COMPANION_SAME_OFFSET(CUipcMemHandle, reserved);
COMPANION_SAME_LAYOUT(CUmemLocation);
COMPANION_SAME_OFFSET(CUmemLocation, type);
COMPANION_SAME_OFFSET(CUmemLocation, id);
COMPANION_SAME_LAYOUT(CUmemAccessDesc);
COMPANION_SAME_OFFSET(CUmemAccessDesc, location);
COMPANION_SAME_OFFSET(CUmemAccessDesc, flags);
COMPANION_SAME_LAYOUT(CUmemAllocationProp);
COMPANION_SAME_OFFSET(CUmemAllocationProp, type);
COMPANION_SAME_OFFSET(CUmemAllocationProp, requestedHandleTypes);
COMPANION_SAME_OFFSET(CUmemAllocationProp, location);
COMPANION_SAME_OFFSET(CUmemAllocationProp, win32HandleMetaData);
COMPANION_SAME_OFFSET(CUmemAllocationProp, allocFlags);

using OurAllocFlags = decltype(ours::CUmemAllocationProp::allocFlags);
using TheirAllocFlags = decltype(::CUmemAllocationProp::allocFlags);
static_assert(sizeof(OurAllocFlags) == sizeof(TheirAllocFlags));
static_assert(offsetof(OurAllocFlags, compressionType) ==
              offsetof(TheirAllocFlags, compressionType));
static_assert(offsetof(OurAllocFlags, gpuDirectRDMACapable) ==
              offsetof(TheirAllocFlags, gpuDirectRDMACapable));
static_assert(offsetof(OurAllocFlags, usage) == offsetof(TheirAllocFlags, usage));
static_assert(offsetof(OurAllocFlags, reserved) == offsetof(TheirAllocFlags, reserved));
static_assert(sizeof(OurAllocFlags::reserved) == sizeof(TheirAllocFlags::reserved));
#undef COMPANION_SAME_LAYOUT
#undef COMPANION_SAME_OFFSET

// ---- entry point signatures ------------------------------------------------------------------
// Our types are distinct C++ types (namespaced), so signatures are compared by shape: same arity,
// and each parameter of the same kind (pointer / integer or enum / struct), size and, for
// pointers, the same pointee size and constness.
template <typename T>
constexpr int kind_of() {
  if constexpr (std::is_pointer_v<T>) {
    return 1;
  } else if constexpr (std::is_integral_v<T> || std::is_enum_v<T>) {
    return 2;
  } else if constexpr (std::is_class_v<T>) {
    return 3;
  } else {
    return 0;
  }
}

template <typename T>
constexpr size_t size_or_zero() {
  if constexpr (std::is_void_v<T> || std::is_function_v<T>) {
    return 0;
  } else if constexpr (requires { sizeof(T); }) {
    return sizeof(T);
  } else {
    return 0;  // opaque driver struct
  }
}

template <typename A, typename B>
constexpr bool same_shape() {
  if (kind_of<A>() != kind_of<B>() || sizeof(A) != sizeof(B)) return false;
  if constexpr (std::is_pointer_v<A> && std::is_pointer_v<B>) {
    using PA = std::remove_pointer_t<A>;
    using PB = std::remove_pointer_t<B>;
    return std::is_const_v<PA> == std::is_const_v<PB> &&
           kind_of<std::remove_cv_t<PA>>() == kind_of<std::remove_cv_t<PB>>() &&
           size_or_zero<std::remove_cv_t<PA>>() == size_or_zero<std::remove_cv_t<PB>>();
  }
  return true;
}

template <typename... T>
struct type_list {};

template <typename... A, typename... B>
constexpr bool same_parameters(type_list<A...>, type_list<B...>) {
  if constexpr (sizeof...(A) != sizeof...(B)) {
    return false;
  } else {
    return (same_shape<A, B>() && ...);
  }
}

template <typename F, typename G>
struct SameSignature : std::false_type {};
template <typename RA, typename... A, typename RB, typename... B>
struct SameSignature<RA (*)(A...), RB (*)(B...)>
    : std::bool_constant<sizeof(RA) == sizeof(RB) &&
                         same_parameters(type_list<A...>{}, type_list<B...>{})> {};

template <size_t... I>
constexpr size_t first_mismatch(std::index_sequence<I...>) {
  constexpr bool same[] = {SameSignature<std::tuple_element_t<I, OurEntryPoints>,
                                         std::tuple_element_t<I, TheirEntryPoints>>::value...};
  for (size_t i = 0; i < sizeof...(I); ++i) {
    if (!same[i]) return i;
  }
  return sizeof...(I);
}

constexpr size_t kEntryPoints = std::tuple_size_v<OurEntryPoints>;
static_assert(std::tuple_size_v<TheirEntryPoints> == kEntryPoints);
// On failure, kMismatch is the index (in COMPANION_CUDA_DRIVER_ENTRY_POINTS) of the first entry
// point whose declaration disagrees with cuda.h.
constexpr size_t kMismatch = first_mismatch(std::make_index_sequence<kEntryPoints>{});
static_assert(kMismatch == kEntryPoints, "a DriverApi entry point's signature differs from cuda.h");

}  // namespace

TEST(CudaDriverApi, MatchesCudaH) {
  // The checks above are static_asserts; reaching here means they all held.
  EXPECT_EQ(kMismatch, kEntryPoints);
  EXPECT_GT(kEntryPoints, 40u);
  RecordProperty("cuda_h", COMPANION_CUDA_H);
}

#else

TEST(CudaDriverApi, MatchesCudaH) {
  GTEST_SKIP() << "no cuda.h found at configure time";
}

#endif
