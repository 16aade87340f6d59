// The few CUDA driver API types, struct layouts and constants Companion uses, declared here so
// that the build needs no CUDA toolkit. Values are the documented driver ABI (cuda.h, CUDA 12/13);
// tests/unit/memory/cuda_driver_api_test.cpp static_asserts them against cuda.h when one is found
// at configure time.
//
// Everything lives in companion::memory::cu, and constants are spelled kCamelCase rather than
// CU_..., so that this header and cuda.h can share a translation unit (the cross-check does):
// several cuda.h names are macros. Driver enums are plain 32-bit integers here: same size and
// calling convention as the C enums.
#pragma once

#include <cstddef>
#include <cstdint>

namespace companion::memory::cu {

// ---- scalar and handle types ----------------------------------------------------------------
using CUresult = int;                    // enum cudaError_enum
using CUdevice = int;                    // CUdevice_v1
using CUdeviceptr = unsigned long long;  // CUdeviceptr_v2 (64-bit builds)
using CUmemGenericAllocationHandle = unsigned long long;
using cuuint64_t = std::uint64_t;
using CUmemAllocationType = int;              // enum CUmemAllocationType_enum
using CUmemAllocationHandleType = int;        // enum CUmemAllocationHandleType_enum
using CUmemLocationType = int;                // enum CUmemLocationType_enum
using CUmemAccessFlags = int;                 // enum CUmemAccess_flags_enum
using CUmemAllocationGranularityFlags = int;  // enum CUmemAllocationGranularity_flags_enum
using CUdeviceAttribute = int;                // enum CUdevice_attribute_enum
using CUjitOption = int;                      // enum CUjit_option_enum
using CUdriverProcAddressQueryResult = int;   // enum CUdriverProcAddressQueryResult_enum
using CUpointerAttribute = int;               // enum CUpointer_attribute_enum

struct CUctx_st;  // opaque driver objects
struct CUstream_st;
struct CUmod_st;
struct CUfunc_st;
using CUcontext = CUctx_st*;
using CUstream = CUstream_st*;
using CUmodule = CUmod_st*;
using CUfunction = CUfunc_st*;

// ---- structs ---------------------------------------------------------------------------------
inline constexpr std::size_t kIpcHandleSize = 64;  // CU_IPC_HANDLE_SIZE

struct CUuuid {  // CUuuid_st
  char bytes[16];
};

struct CUipcMemHandle {  // CUipcMemHandle_st (passed by value to cuIpcOpenMemHandle)
  char reserved[kIpcHandleSize];
};

struct CUmemLocation {  // CUmemLocation_st
  CUmemLocationType type;
  int id;
};

struct CUmemAllocationProp {  // CUmemAllocationProp_st (v1)
  CUmemAllocationType type;
  CUmemAllocationHandleType requestedHandleTypes;
  CUmemLocation location;
  void* win32HandleMetaData;
  struct {
    unsigned char compressionType;
    unsigned char gpuDirectRDMACapable;
    unsigned short usage;
    unsigned char reserved[4];
  } allocFlags;
};

struct CUmemAccessDesc {  // CUmemAccessDesc_st
  CUmemLocation location;
  CUmemAccessFlags flags;
};

// ---- CUresult values -------------------------------------------------------------------------
inline constexpr CUresult kSuccess = 0;                // CUDA_SUCCESS
inline constexpr CUresult kErrorInvalidValue = 1;      // CUDA_ERROR_INVALID_VALUE
inline constexpr CUresult kErrorOutOfMemory = 2;       // CUDA_ERROR_OUT_OF_MEMORY
inline constexpr CUresult kErrorNotInitialized = 3;    // CUDA_ERROR_NOT_INITIALIZED
inline constexpr CUresult kErrorDeinitialized = 4;     // CUDA_ERROR_DEINITIALIZED
inline constexpr CUresult kErrorNoDevice = 100;        // CUDA_ERROR_NO_DEVICE
inline constexpr CUresult kErrorInvalidDevice = 101;   // CUDA_ERROR_INVALID_DEVICE
inline constexpr CUresult kErrorInvalidContext = 201;  // CUDA_ERROR_INVALID_CONTEXT
inline constexpr CUresult kErrorNotFound = 500;        // CUDA_ERROR_NOT_FOUND
inline constexpr CUresult kErrorIllegalAddress = 700;  // CUDA_ERROR_ILLEGAL_ADDRESS
inline constexpr CUresult kErrorNotPermitted = 800;    // CUDA_ERROR_NOT_PERMITTED
inline constexpr CUresult kErrorNotSupported = 801;    // CUDA_ERROR_NOT_SUPPORTED

// ---- cuGetProcAddress ------------------------------------------------------------------------
inline constexpr cuuint64_t kGetProcAddressDefault = 0;  // CU_GET_PROC_ADDRESS_DEFAULT
inline constexpr CUdriverProcAddressQueryResult kGetProcAddressSuccess =
    0;  // CU_GET_PROC_ADDRESS_SUCCESS
inline constexpr CUdriverProcAddressQueryResult kGetProcAddressSymbolNotFound = 1;
inline constexpr CUdriverProcAddressQueryResult kGetProcAddressVersionNotSufficient = 2;

// ---- virtual memory management ---------------------------------------------------------------
inline constexpr CUmemAllocationType kMemAllocationTypePinned = 1;  // CU_MEM_ALLOCATION_TYPE_PINNED
inline constexpr CUmemAllocationHandleType kMemHandleTypePosixFileDescriptor = 1;
inline constexpr CUmemLocationType kMemLocationTypeDevice = 1;  // CU_MEM_LOCATION_TYPE_DEVICE
inline constexpr CUmemAccessFlags kMemAccessFlagsProtNone = 0;  // CU_MEM_ACCESS_FLAGS_PROT_NONE
inline constexpr CUmemAccessFlags kMemAccessFlagsProtRead = 1;  // CU_MEM_ACCESS_FLAGS_PROT_READ
inline constexpr CUmemAccessFlags kMemAccessFlagsProtReadWrite = 3;
inline constexpr CUmemAllocationGranularityFlags kMemAllocGranularityMinimum = 0;
inline constexpr CUmemAllocationGranularityFlags kMemAllocGranularityRecommended = 1;

// ---- pointer attributes (cuPointerGetAttribute) ----------------------------------------------
// The access the current context's device has through a pointer: how the GPU suite checks which
// mappings are read-only (cuda-vmm imports) and which are not (legacy IPC).
inline constexpr CUpointerAttribute kPointerAttributeAccessFlags = 16;
inline constexpr int kPointerAccessFlagNone = 0;       // CU_POINTER_ATTRIBUTE_ACCESS_FLAG_NONE
inline constexpr int kPointerAccessFlagRead = 1;       // CU_POINTER_ATTRIBUTE_ACCESS_FLAG_READ
inline constexpr int kPointerAccessFlagReadWrite = 3;  // ..._ACCESS_FLAG_READWRITE

// ---- legacy IPC, host memory, streams --------------------------------------------------------
inline constexpr unsigned int kIpcMemLazyEnablePeerAccess =
    1;                                                    // CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS
inline constexpr unsigned int kMemHostAllocPortable = 1;  // CU_MEMHOSTALLOC_PORTABLE
inline constexpr unsigned int kStreamNonBlocking = 1;     // CU_STREAM_NON_BLOCKING

// ---- device attributes -----------------------------------------------------------------------
inline constexpr CUdeviceAttribute kDevAttrMultiprocessorCount = 16;  // ..._MULTIPROCESSOR_COUNT
inline constexpr CUdeviceAttribute kDevAttrPciBusId = 33;     // CU_DEVICE_ATTRIBUTE_PCI_BUS_ID
inline constexpr CUdeviceAttribute kDevAttrPciDeviceId = 34;  // ..._PCI_DEVICE_ID
inline constexpr CUdeviceAttribute kDevAttrUnifiedAddressing = 41;  // ..._UNIFIED_ADDRESSING
inline constexpr CUdeviceAttribute kDevAttrPciDomainId = 50;        // ..._PCI_DOMAIN_ID
inline constexpr CUdeviceAttribute kDevAttrComputeCapabilityMajor = 75;
inline constexpr CUdeviceAttribute kDevAttrComputeCapabilityMinor = 76;
inline constexpr CUdeviceAttribute kDevAttrVirtualMemoryManagementSupported = 102;
inline constexpr CUdeviceAttribute kDevAttrHandleTypePosixFileDescriptorSupported = 103;

// ---- JIT options (cuModuleLoadDataEx) --------------------------------------------------------
inline constexpr CUjitOption kJitInfoLogBuffer = 3;            // CU_JIT_INFO_LOG_BUFFER
inline constexpr CUjitOption kJitErrorLogBuffer = 5;           // CU_JIT_ERROR_LOG_BUFFER
inline constexpr CUjitOption kJitErrorLogBufferSizeBytes = 6;  // CU_JIT_ERROR_LOG_BUFFER_SIZE_BYTES

}  // namespace companion::memory::cu
