// The pure parts of the CUDA code: GPU identity parsing, driver error mapping, slab argument
// checks. No driver needed.
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "memory/cuda_driver.hpp"

namespace companion::memory::cuda {
namespace {

TEST(CudaIdentity, FormatsUuidLikeNvidiaSmi) {
  const unsigned char bytes[16] = {0x5b, 0x8a, 0x1c, 0x2d, 0x00, 0xff, 0x12, 0x34,
                                   0xab, 0xcd, 0xef, 0x01, 0x23, 0x45, 0x67, 0x89};
  EXPECT_EQ(format_gpu_uuid(bytes), "GPU-5b8a1c2d-00ff-1234-abcd-ef0123456789");
  const unsigned char zeros[16] = {};
  EXPECT_EQ(format_gpu_uuid(zeros), "GPU-00000000-0000-0000-0000-000000000000");
}

TEST(CudaIdentity, ReadsTheKernelModuleVersion) {
  EXPECT_EQ(parse_nvidia_module_version(
                "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  580.159.04  Release "
                "Build  (nixbld@)  \nGCC version:  gcc version 15.3.0 (GCC) \n"),
            "580.159.04");
  EXPECT_EQ(parse_nvidia_module_version("NVRM version: NVIDIA UNIX x86_64 Kernel Module  "
                                        "535.104.05  Sat Aug 19 01:15:15 UTC 2023\n"),
            "535.104.05");
  EXPECT_EQ(parse_nvidia_module_version("NVRM version: NVIDIA UNIX aarch64 Kernel Module  570.86"),
            "570.86");
  // Only the first line counts; words with no dot, a leading or trailing dot are not versions.
  EXPECT_EQ(parse_nvidia_module_version("NVRM version: 2023 x86_64 .5 5.\n1.2.3"), std::nullopt);
  EXPECT_EQ(parse_nvidia_module_version(""), std::nullopt);
}

TEST(CudaIdentity, NormalizesUuids) {
  const std::string canonical = "GPU-5b8a1c2d-00ff-1234-abcd-ef0123456789";
  EXPECT_EQ(normalize_gpu_uuid(canonical), canonical);
  EXPECT_EQ(normalize_gpu_uuid("GPU-5B8A1C2D-00FF-1234-ABCD-EF0123456789"), canonical);
  EXPECT_EQ(normalize_gpu_uuid("gpu-5b8a1c2d-00ff-1234-abcd-ef0123456789"), canonical);
  EXPECT_EQ(normalize_gpu_uuid("5b8a1c2d-00ff-1234-abcd-ef0123456789"), canonical);
  EXPECT_EQ(normalize_gpu_uuid("5B8A1C2D-00FF-1234-ABCD-EF0123456789"), canonical);
  EXPECT_EQ(normalize_gpu_uuid("5b8a1c2d00ff1234abcdef0123456789"), canonical);
  EXPECT_EQ(normalize_gpu_uuid("GPU-5b8a1c2d00ff1234abcdef0123456789"), canonical);

  EXPECT_FALSE(normalize_gpu_uuid(""));
  EXPECT_FALSE(normalize_gpu_uuid("GPU-"));
  EXPECT_FALSE(normalize_gpu_uuid("GPU-5b8a1c2d-00ff-1234-abcd-ef012345678"));    // short
  EXPECT_FALSE(normalize_gpu_uuid("GPU-5b8a1c2d-00ff-1234-abcd-ef01234567890"));  // long
  EXPECT_FALSE(normalize_gpu_uuid("GPU-5b8a1c2d0-0ff-1234-abcd-ef0123456789"));   // dash moved
  EXPECT_FALSE(normalize_gpu_uuid("GPU-5b8a1c2g-00ff-1234-abcd-ef0123456789"));   // not hex
  EXPECT_FALSE(normalize_gpu_uuid("MIG-5b8a1c2d-00ff-1234-abcd-ef0123456789"));
  EXPECT_FALSE(normalize_gpu_uuid(" GPU-5b8a1c2d-00ff-1234-abcd-ef0123456789"));
}

TEST(CudaIdentity, NormalizesPciBusIds) {
  EXPECT_EQ(normalize_pci_bus_id("0000:3b:00.0"), "0000:3b:00.0");
  EXPECT_EQ(normalize_pci_bus_id("0000:3B:00.0"), "0000:3b:00.0");      // cuDeviceGetPCIBusId
  EXPECT_EQ(normalize_pci_bus_id("00000000:3B:00.0"), "0000:3b:00.0");  // nvidia-smi
  EXPECT_EQ(normalize_pci_bus_id("3b:00.0"), "0000:3b:00.0");
  EXPECT_EQ(normalize_pci_bus_id("3B:1F.7"), "0000:3b:1f.7");
  EXPECT_EQ(normalize_pci_bus_id("0001:c1:00.1"), "0001:c1:00.1");
  EXPECT_EQ(normalize_pci_bus_id("1:2:3.4"), "0001:02:03.4");
  EXPECT_EQ(normalize_pci_bus_id("10000:01:00.0"), "10000:01:00.0");  // wide domains stay wide

  EXPECT_FALSE(normalize_pci_bus_id(""));
  EXPECT_FALSE(normalize_pci_bus_id("3b:00"));              // no function
  EXPECT_FALSE(normalize_pci_bus_id("3b.00.0"));            // no colon
  EXPECT_FALSE(normalize_pci_bus_id("3b:20.0"));            // device > 0x1f
  EXPECT_FALSE(normalize_pci_bus_id("3b:00.8"));            // function > 7
  EXPECT_FALSE(normalize_pci_bus_id("13b:00.0"));           // bus > 2 digits
  EXPECT_FALSE(normalize_pci_bus_id(":00.0"));              // empty bus
  EXPECT_FALSE(normalize_pci_bus_id("0000::00.0"));         // empty bus
  EXPECT_FALSE(normalize_pci_bus_id(":3b:00.0"));           // empty domain
  EXPECT_FALSE(normalize_pci_bus_id("000000000:3b:00.0"));  // domain > 8 digits
  EXPECT_FALSE(normalize_pci_bus_id("0000:3b:00.0 "));
  EXPECT_FALSE(normalize_pci_bus_id("0000:xx:00.0"));
  EXPECT_FALSE(normalize_pci_bus_id("0:0000:3b:00.0"));
}

TEST(CudaIdentity, ParsesOrdinals) {
  EXPECT_EQ(parse_gpu_ordinal("0"), 0);
  EXPECT_EQ(parse_gpu_ordinal("7"), 7);
  EXPECT_EQ(parse_gpu_ordinal("12"), 12);
  EXPECT_EQ(parse_gpu_ordinal("007"), 7);
  EXPECT_FALSE(parse_gpu_ordinal(""));
  EXPECT_FALSE(parse_gpu_ordinal("-1"));
  EXPECT_FALSE(parse_gpu_ordinal("+1"));
  EXPECT_FALSE(parse_gpu_ordinal(" 1"));
  EXPECT_FALSE(parse_gpu_ordinal("1a"));
  EXPECT_FALSE(parse_gpu_ordinal("99999999999999999999"));
}

TEST(CudaIdentity, ClassifiesDeviceSpecs) {
  auto ordinal = parse_device_spec("3");
  ASSERT_TRUE(ordinal.ok());
  EXPECT_EQ(ordinal->kind, DeviceSpec::Kind::kOrdinal);
  EXPECT_EQ(ordinal->ordinal, 3);

  auto uuid = parse_device_spec("5B8A1C2D-00FF-1234-ABCD-EF0123456789");
  ASSERT_TRUE(uuid.ok());
  EXPECT_EQ(uuid->kind, DeviceSpec::Kind::kUuid);
  EXPECT_EQ(uuid->value, "GPU-5b8a1c2d-00ff-1234-abcd-ef0123456789");

  // 32 decimal digits: too long for an ordinal, a UUID without dashes.
  auto digits = parse_device_spec("12345678901234567890123456789012");
  ASSERT_TRUE(digits.ok());
  EXPECT_EQ(digits->kind, DeviceSpec::Kind::kUuid);

  auto pci = parse_device_spec("00000000:3B:00.0");
  ASSERT_TRUE(pci.ok());
  EXPECT_EQ(pci->kind, DeviceSpec::Kind::kPciBusId);
  EXPECT_EQ(pci->value, "0000:3b:00.0");

  auto short_pci = parse_device_spec("3b:00.0");
  ASSERT_TRUE(short_pci.ok());
  EXPECT_EQ(short_pci->kind, DeviceSpec::Kind::kPciBusId);
  EXPECT_EQ(short_pci->value, "0000:3b:00.0");

  for (const char* bad : {"", "cuda:0", "-1", "gpu0", "GPU-xyz", "3b:00"}) {
    auto r = parse_device_spec(bad);
    ASSERT_FALSE(r.ok()) << bad;
    EXPECT_EQ(r.error().code, StatusCode::kInvalidArgument) << bad;
  }
}

TEST(CudaErrors, MapsOutOfMemoryAndCarriesTheDriverText) {
  Error oom = make_cuda_error(cu::kErrorOutOfMemory, "cuMemCreate", "CUDA_ERROR_OUT_OF_MEMORY",
                              "out of memory");
  EXPECT_EQ(oom.code, StatusCode::kOutOfMemory);
  EXPECT_EQ(oom.message, "cuMemCreate: CUDA_ERROR_OUT_OF_MEMORY (out of memory)");

  Error other = make_cuda_error(cu::kErrorInvalidValue, "cuMemMap", "CUDA_ERROR_INVALID_VALUE",
                                "invalid argument");
  EXPECT_EQ(other.code, StatusCode::kCudaError);
  EXPECT_EQ(other.message, "cuMemMap: CUDA_ERROR_INVALID_VALUE (invalid argument)");

  Error unknown = make_cuda_error(12345, "cuInit", nullptr, nullptr);
  EXPECT_EQ(unknown.code, StatusCode::kCudaError);
  EXPECT_EQ(unknown.message, "cuInit: CUDA error 12345");

  // Without a loaded driver the call name and the number are still there.
  Error fallback = cuda_error(cu::kErrorOutOfMemory, "cuMemAlloc");
  EXPECT_EQ(fallback.code, StatusCode::kOutOfMemory);
  EXPECT_NE(fallback.message.find("cuMemAlloc: "), std::string::npos);

  Error with = with_context(std::move(other), "importing");
  EXPECT_EQ(with.code, StatusCode::kCudaError);
  EXPECT_EQ(with.message, "importing: cuMemMap: CUDA_ERROR_INVALID_VALUE (invalid argument)");

  EXPECT_TRUE(check(cu::kSuccess, "cuInit").ok());
  auto failed = check(cu::kErrorNoDevice, "cuInit");
  ASSERT_FALSE(failed.ok());
  EXPECT_EQ(failed.error().code, StatusCode::kCudaError);
  EXPECT_EQ(failed.error().message.rfind("cuInit: ", 0), 0u);
}

TEST(CudaSlabChecks, SegmentSizes) {
  const uint64_t g = 2 << 20;
  const uint64_t max = uint64_t{16} << 30;
  EXPECT_TRUE(check_segment_sizes({g}, g, max, "cuda-vmm").ok());
  EXPECT_TRUE(check_segment_sizes({32 * g, 4 * g, max}, g, max, "cuda-vmm").ok());
  for (const std::vector<uint64_t>& bad :
       std::vector<std::vector<uint64_t>>{{}, {0}, {g + 1}, {g, g / 2}, {max + g}}) {
    auto r = check_segment_sizes(bad, g, max, "cuda-vmm");
    ASSERT_FALSE(r.ok());
    EXPECT_EQ(r.error().code, StatusCode::kInvalidArgument);
    EXPECT_EQ(r.error().message.rfind("cuda-vmm: ", 0), 0u);
  }
}

TEST(CudaSlabChecks, WriteRanges) {
  const uint64_t size = 4096;
  EXPECT_TRUE(check_write("m", false, 0, 2, size, 0, size).ok());
  EXPECT_TRUE(check_write("m", false, 1, 2, size, size, 0).ok());
  EXPECT_TRUE(check_write("m", false, 1, 2, size, 100, size - 100).ok());
  EXPECT_FALSE(check_write("m", true, 0, 2, size, 0, 1).ok());                // sealed
  EXPECT_FALSE(check_write("m", false, 2, 2, size, 0, 1).ok());               // no such segment
  EXPECT_FALSE(check_write("m", false, 0, 2, size, 1, size).ok());            // past the end
  EXPECT_FALSE(check_write("m", false, 0, 2, size, size + 1, 0).ok());        // offset past end
  EXPECT_FALSE(check_write("m", false, 0, 2, size, 8, UINT64_MAX - 4).ok());  // overflow
}

}  // namespace
}  // namespace companion::memory::cuda
