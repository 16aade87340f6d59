#include "memory/cuda_checksum.hpp"

#include <algorithm>
#include <cstring>

#include "memory/cuda_driver.hpp"

namespace companion::memory {
namespace {

// out[0] += sum over i < words of data[i] * (2*i + 1)  (mod 2^64), grid-stride loop, one
// atom.global.add.u64 per thread (order-independent). JIT-compiled for whatever GPU runs it.
constexpr char kChecksumPtx[] = R"(
.version 7.0
.target sm_70
.address_size 64

.visible .entry companion_checksum(
    .param .u64 param_data,
    .param .u64 param_words,
    .param .u64 param_out)
{
    .reg .pred %p<2>;
    .reg .b32 %r<6>;
    .reg .b64 %rd<16>;

    ld.param.u64 %rd1, [param_data];
    ld.param.u64 %rd2, [param_words];
    ld.param.u64 %rd3, [param_out];
    cvta.to.global.u64 %rd1, %rd1;
    cvta.to.global.u64 %rd3, %rd3;
    mov.u32 %r1, %ctaid.x;
    mov.u32 %r2, %ntid.x;
    mov.u32 %r3, %tid.x;
    mov.u32 %r4, %nctaid.x;
    mul.wide.u32 %rd4, %r1, %r2;
    cvt.u64.u32 %rd5, %r3;
    add.u64 %rd4, %rd4, %rd5;
    mul.wide.u32 %rd6, %r4, %r2;
    mov.u64 %rd7, 0;
LOOP:
    setp.ge.u64 %p1, %rd4, %rd2;
    @%p1 bra DONE;
    shl.b64 %rd8, %rd4, 2;
    add.u64 %rd9, %rd1, %rd8;
    ld.global.u32 %r5, [%rd9];
    cvt.u64.u32 %rd10, %r5;
    shl.b64 %rd11, %rd4, 1;
    add.u64 %rd11, %rd11, 1;
    mad.lo.u64 %rd7, %rd10, %rd11, %rd7;
    add.u64 %rd4, %rd4, %rd6;
    bra.uni LOOP;
DONE:
    atom.global.add.u64 %rd12, [%rd3], %rd7;
    ret;
}
)";

class CudaChecksum final : public DeviceChecksum {
 public:
  CudaChecksum(const cuda::DriverApi* api, int ordinal) : api_(api), ordinal_(ordinal) {}

  ~CudaChecksum() override {
    if (!cuda::make_current(ordinal_).ok()) return;
    if (out_ != 0) (void)api_->cuMemFree(out_);
    if (module_ != nullptr) (void)api_->cuModuleUnload(module_);
  }

  Result<void> init() {
    COMPANION_TRY(cuda::make_current(ordinal_));
    char log[8192] = {};
    cu::CUjitOption options[] = {cu::kJitErrorLogBuffer, cu::kJitErrorLogBufferSizeBytes};
    void* values[] = {log, reinterpret_cast<void*>(static_cast<uintptr_t>(sizeof(log)))};
    auto loaded =
        COMPANION_CU(*api_, cuModuleLoadDataEx, &module_, kChecksumPtx, 2, options, values);
    if (!loaded.ok()) {
      module_ = nullptr;
      return cuda::with_context(std::move(loaded).error(),
                                std::string("JIT of the checksum kernel (") + log + ")");
    }
    COMPANION_TRY(
        COMPANION_CU(*api_, cuModuleGetFunction, &function_, module_, "companion_checksum"));
    COMPANION_TRY(COMPANION_CU(*api_, cuMemAlloc, &out_, sizeof(uint64_t)));
    return ok_result();
  }

  Result<uint64_t> run(uint64_t device_ptr, uint64_t bytes) override {
    COMPANION_TRY(cuda::make_current(ordinal_));
    COMPANION_TRY(COMPANION_CU(*api_, cuMemsetD32, out_, 0, 2));
    uint64_t data = device_ptr;
    uint64_t words = bytes / 4;
    cu::CUdeviceptr out = out_;
    void* params[] = {&data, &words, &out};
    const unsigned threads = 256;
    const uint64_t blocks = std::clamp<uint64_t>((words + threads - 1) / threads, 1, 4096);
    if (words > 0) {
      COMPANION_TRY(COMPANION_CU(*api_, cuLaunchKernel, function_, static_cast<unsigned>(blocks), 1,
                                 1, threads, 1, 1, 0, nullptr, params, nullptr));
    }
    COMPANION_TRY(COMPANION_CU(*api_, cuCtxSynchronize));
    uint64_t sum = 0;
    COMPANION_TRY(COMPANION_CU(*api_, cuMemcpyDtoH, &sum, out_, sizeof(sum)));
    if (bytes % 4 != 0) {  // the zero-padded last word, read back and added on the host
      uint32_t tail = 0;
      COMPANION_TRY(COMPANION_CU(*api_, cuMemcpyDtoH, &tail, device_ptr + words * 4, bytes % 4));
      sum += uint64_t{tail} * (2 * words + 1);
    }
    return sum;
  }

  Result<void> try_write(uint64_t device_ptr) override {
    COMPANION_TRY(cuda::make_current(ordinal_));
    COMPANION_TRY(COMPANION_CU(*api_, cuMemsetD32, device_ptr, 0, 1));
    return COMPANION_CU(*api_, cuCtxSynchronize);
  }

 private:
  const cuda::DriverApi* api_;
  int ordinal_;
  cu::CUmodule module_ = nullptr;
  cu::CUfunction function_ = nullptr;
  cu::CUdeviceptr out_ = 0;
};

}  // namespace

Result<std::unique_ptr<DeviceChecksum>> DeviceChecksum::create(int ordinal) {
  COMPANION_ASSIGN_OR_RETURN(const cuda::DriverApi* api, cuda::driver());
  COMPANION_TRY(cuda::check_ordinal(*api, ordinal));
  auto k = std::make_unique<CudaChecksum>(api, ordinal);
  COMPANION_TRY(k->init());
  return std::unique_ptr<DeviceChecksum>(std::move(k));
}

}  // namespace companion::memory
