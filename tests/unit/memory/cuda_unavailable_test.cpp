// Without a CUDA driver (CI, CPU-only hosts) every CUDA entry point reports kUnavailable, quickly,
// with the reason, and never crashes. Skipped where a driver and a GPU are present.
#include <fcntl.h>
#include <unistd.h>

#include <array>
#include <chrono>
#include <string>
#include <thread>
#include <vector>

#include <gtest/gtest.h>

#include "memory/backend.hpp"
#include "memory/cuda_backend.hpp"
#include "memory/cuda_driver.hpp"
#include "memory/cuda_slab.hpp"
#include "memory/host_backend.hpp"

namespace companion::memory {
namespace {

bool cuda_present() {
  return cuda_available().ok();
}

void expect_unavailable(const Error& error, const char* what) {
  EXPECT_EQ(error.code, StatusCode::kUnavailable) << what << ": " << error.to_string();
  EXPECT_FALSE(error.message.empty()) << what;
}

TEST(CudaUnavailable, ReportsWhy) {
  if (cuda_present()) GTEST_SKIP() << "a CUDA driver and GPU are present";
  auto r = cuda_available();
  ASSERT_FALSE(r.ok());
  expect_unavailable(r.error(), "cuda_available");
  // Where libcuda.so.1 is missing, the message is dlerror's, which names the library.
  if (r.error().message.find("cannot load") != std::string::npos) {
    EXPECT_NE(r.error().message.find("libcuda.so.1"), std::string::npos) << r.error().message;
  }
  auto api = cuda::driver();
  ASSERT_FALSE(api.ok());
  EXPECT_EQ(api.error().message, r.error().message);
}

TEST(CudaUnavailable, EveryEntryPointSaysUnavailable) {
  if (cuda_present()) GTEST_SKIP() << "a CUDA driver and GPU are present";
  {
    auto r = list_gpus();
    ASSERT_FALSE(r.ok());
    expect_unavailable(r.error(), "list_gpus");
  }
  for (const char* spec : {"0", "GPU-5b8a1c2d-00ff-1234-abcd-ef0123456789", "3b:00.0"}) {
    auto r = resolve_gpu(spec);
    ASSERT_FALSE(r.ok());
    expect_unavailable(r.error(), spec);
  }
  {
    // A name that is no GPU's is the caller's mistake, driver or not.
    auto r = resolve_gpu("junk");
    ASSERT_FALSE(r.ok());
    EXPECT_EQ(r.error().code, StatusCode::kInvalidArgument) << r.error().to_string();
  }
  {
    auto r = make_cuda_vmm_backend(0);
    ASSERT_FALSE(r.ok());
    expect_unavailable(r.error(), "make_cuda_vmm_backend");
  }
  {
    auto r = make_cuda_ipc_backend(0);
    ASSERT_FALSE(r.ok());
    expect_unavailable(r.error(), "make_cuda_ipc_backend");
  }
  {
    // The fd is owned by the call, and closed even though nothing was imported.
    const int fd = ::open("/dev/null", O_RDONLY | O_CLOEXEC);
    ASSERT_GE(fd, 0);
    auto r = import_cuda_vmm_segment(UniqueFd(fd), 2 << 20, 0);
    ASSERT_FALSE(r.ok());
    expect_unavailable(r.error(), "import_cuda_vmm_segment");
    EXPECT_EQ(::fcntl(fd, F_GETFD), -1) << "the segment fd was not closed";
  }
  {
    std::array<uint8_t, kIpcHandleBytes> handle{};
    handle[0] = 1;
    auto r = import_cuda_ipc_segment(handle, 2 << 20, 0);
    ASSERT_FALSE(r.ok());
    expect_unavailable(r.error(), "import_cuda_ipc_segment");
  }
  {
    SegmentExport e;
    e.kind = SegmentKind::kCudaIpcHandle;
    e.size = 2 << 20;
    auto r = import_segment(std::move(e), ImportTarget{0});
    ASSERT_FALSE(r.ok());
    expect_unavailable(r.error(), "import_segment(cuda-ipc)");
  }
  {
    auto r = cuda::make_current(0);
    ASSERT_FALSE(r.ok());
    expect_unavailable(r.error(), "make_current");
  }
  {
    auto r = cuda::ScopedContext::enter(0);
    ASSERT_FALSE(r.ok());
    expect_unavailable(r.error(), "ScopedContext");
  }
  {
    auto r = cuda::vmm_granularity(0);
    ASSERT_FALSE(r.ok());
    expect_unavailable(r.error(), "vmm_granularity");
  }
  {
    auto r = cuda::PinnedHostBuffer::allocate(0, 1 << 20);
    ASSERT_FALSE(r.ok());
    expect_unavailable(r.error(), "PinnedHostBuffer");
  }
  {
    auto r = cuda::Stream::create(0);
    ASSERT_FALSE(r.ok());
    expect_unavailable(r.error(), "Stream");
  }
  {
    auto r = cuda::copy_to_device(0, 0x1000, "x", 1);
    ASSERT_FALSE(r.ok());
    expect_unavailable(r.error(), "copy_to_device");
  }
}

TEST(CudaUnavailable, IsQuickAfterTheFirstCall) {
  if (cuda_present()) GTEST_SKIP() << "a CUDA driver and GPU are present";
  const auto start = std::chrono::steady_clock::now();
  for (int i = 0; i < 10000; ++i) {
    ASSERT_FALSE(cuda_available().ok());
    ASSERT_FALSE(make_cuda_vmm_backend(0).ok());
  }
  const auto elapsed = std::chrono::steady_clock::now() - start;
  EXPECT_LT(elapsed, std::chrono::seconds(1));  // ~1 µs per call in practice
}

TEST(CudaUnavailable, ConcurrentCallersSeeTheSameAnswer) {
  const bool present = cuda_present();
  std::vector<std::thread> threads;
  std::vector<int> ok(8, -1);
  for (size_t i = 0; i < ok.size(); ++i) {
    threads.emplace_back([&ok, i] { ok[i] = cuda::driver().ok() ? 1 : 0; });
  }
  for (auto& t : threads) t.join();
  for (int v : ok) EXPECT_EQ(v, present ? 1 : 0);
}

TEST(CudaSlab, HostSlabsHaveNoDevicePointer) {
  auto backend = make_host_backend();
  ASSERT_NE(backend, nullptr);
  auto slab = backend->allocate({backend->granularity()}, "host");
  ASSERT_TRUE(slab.ok()) << slab.error().to_string();
  auto ptr = cuda_segment_device_pointer(**slab, 0);
  ASSERT_FALSE(ptr.ok());
  EXPECT_EQ(ptr.error().code, StatusCode::kInvalidArgument);
  auto ordinal = cuda_slab_device_ordinal(**slab);
  ASSERT_FALSE(ordinal.ok());
  EXPECT_EQ(ordinal.error().code, StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace companion::memory
