#include "memory/cuda_checksum.hpp"

#include <algorithm>
#include <cstring>

#include "memory/cuda_driver.hpp"

namespace companion::memory {
namespace {

// out[0] += sum over i < words of data[i] * (2*i + 1)  (mod 2^64). Order-independent, so each
// thread sums its share, each warp adds its threads' sums with shuffles, and lane 0 adds the
// warp's sum with one atom.global.add.u64. JIT-compiled for whatever GPU runs it.
//
// companion_checksum (data 16-byte aligned): grid-stride over 16-byte vectors, two loads in flight
// per thread. Vector v holds words 4v..4v+3 (a, b, c, d) and adds
// (8v + 1) * (a + b + c + d) + 2 * (b + 2c + 3d). The last words % 4 words: one thread each.
// companion_checksum_words (data 4-byte aligned): the same sum one word at a time.
constexpr char kChecksumPtx[] = R"(
.version 7.0
.target sm_70
.address_size 64

.visible .entry companion_checksum(
    .param .u64 param_data,
    .param .u64 param_words,
    .param .u64 param_out)
{
    .reg .pred %p<8>;
    .reg .b32 %r<32>;
    .reg .b64 %rd<48>;

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
    add.u64 %rd4, %rd4, %rd5;       // thread index
    mul.wide.u32 %rd6, %r4, %r2;    // stride, in vectors
    mov.u64 %rd7, 0;                // this thread's sum
    shr.u64 %rd8, %rd2, 2;          // vectors
    mov.u64 %rd9, %rd4;             // v
    add.u64 %rd40, %rd6, %rd6;      // 2 * stride
PAIR:
    add.u64 %rd10, %rd9, %rd6;      // v2 = v + stride
    setp.ge.u64 %p1, %rd10, %rd8;
    @%p1 bra SINGLE;
    shl.b64 %rd11, %rd9, 4;
    add.u64 %rd11, %rd1, %rd11;
    shl.b64 %rd12, %rd10, 4;
    add.u64 %rd12, %rd1, %rd12;
    ld.global.nc.v4.u32 {%r5, %r6, %r7, %r8}, [%rd11];
    ld.global.nc.v4.u32 {%r9, %r10, %r11, %r12}, [%rd12];
    // first vector
    cvt.u64.u32 %rd13, %r5;
    cvt.u64.u32 %rd14, %r6;
    cvt.u64.u32 %rd15, %r7;
    cvt.u64.u32 %rd16, %r8;
    add.u64 %rd17, %rd15, %rd16;    // c + d
    add.u64 %rd18, %rd13, %rd14;
    add.u64 %rd18, %rd18, %rd17;    // s = a + b + c + d
    add.u64 %rd19, %rd17, %rd16;    // c + 2d
    add.u64 %rd19, %rd19, %rd17;    // 2c + 3d
    add.u64 %rd19, %rd19, %rd14;    // t = b + 2c + 3d
    shl.b64 %rd19, %rd19, 1;
    add.u64 %rd7, %rd7, %rd19;
    shl.b64 %rd20, %rd9, 3;
    add.u64 %rd20, %rd20, 1;        // 8v + 1
    mad.lo.u64 %rd7, %rd18, %rd20, %rd7;
    // second vector
    cvt.u64.u32 %rd21, %r9;
    cvt.u64.u32 %rd22, %r10;
    cvt.u64.u32 %rd23, %r11;
    cvt.u64.u32 %rd24, %r12;
    add.u64 %rd25, %rd23, %rd24;
    add.u64 %rd26, %rd21, %rd22;
    add.u64 %rd26, %rd26, %rd25;
    add.u64 %rd27, %rd25, %rd24;
    add.u64 %rd27, %rd27, %rd25;
    add.u64 %rd27, %rd27, %rd22;
    shl.b64 %rd27, %rd27, 1;
    add.u64 %rd7, %rd7, %rd27;
    shl.b64 %rd28, %rd10, 3;
    add.u64 %rd28, %rd28, 1;
    mad.lo.u64 %rd7, %rd26, %rd28, %rd7;
    add.u64 %rd9, %rd9, %rd40;
    bra.uni PAIR;
SINGLE:
    setp.ge.u64 %p2, %rd9, %rd8;
    @%p2 bra TAIL;
    shl.b64 %rd11, %rd9, 4;
    add.u64 %rd11, %rd1, %rd11;
    ld.global.nc.v4.u32 {%r5, %r6, %r7, %r8}, [%rd11];
    cvt.u64.u32 %rd13, %r5;
    cvt.u64.u32 %rd14, %r6;
    cvt.u64.u32 %rd15, %r7;
    cvt.u64.u32 %rd16, %r8;
    add.u64 %rd17, %rd15, %rd16;
    add.u64 %rd18, %rd13, %rd14;
    add.u64 %rd18, %rd18, %rd17;
    add.u64 %rd19, %rd17, %rd16;
    add.u64 %rd19, %rd19, %rd17;
    add.u64 %rd19, %rd19, %rd14;
    shl.b64 %rd19, %rd19, 1;
    add.u64 %rd7, %rd7, %rd19;
    shl.b64 %rd20, %rd9, 3;
    add.u64 %rd20, %rd20, 1;
    mad.lo.u64 %rd7, %rd18, %rd20, %rd7;
TAIL:
    shl.b64 %rd29, %rd8, 2;
    add.u64 %rd29, %rd29, %rd4;     // word 4 * vectors + thread index
    setp.ge.u64 %p3, %rd29, %rd2;
    @%p3 bra REDUCE;
    shl.b64 %rd30, %rd29, 2;
    add.u64 %rd30, %rd1, %rd30;
    ld.global.u32 %r13, [%rd30];
    cvt.u64.u32 %rd31, %r13;
    shl.b64 %rd32, %rd29, 1;
    add.u64 %rd32, %rd32, 1;
    mad.lo.u64 %rd7, %rd31, %rd32, %rd7;
REDUCE:
    mov.b64 {%r14, %r15}, %rd7;
    shfl.sync.down.b32 %r16, %r14, 16, 31, 0xffffffff;
    shfl.sync.down.b32 %r17, %r15, 16, 31, 0xffffffff;
    mov.b64 %rd33, {%r16, %r17};
    add.u64 %rd7, %rd7, %rd33;
    mov.b64 {%r14, %r15}, %rd7;
    shfl.sync.down.b32 %r16, %r14, 8, 31, 0xffffffff;
    shfl.sync.down.b32 %r17, %r15, 8, 31, 0xffffffff;
    mov.b64 %rd33, {%r16, %r17};
    add.u64 %rd7, %rd7, %rd33;
    mov.b64 {%r14, %r15}, %rd7;
    shfl.sync.down.b32 %r16, %r14, 4, 31, 0xffffffff;
    shfl.sync.down.b32 %r17, %r15, 4, 31, 0xffffffff;
    mov.b64 %rd33, {%r16, %r17};
    add.u64 %rd7, %rd7, %rd33;
    mov.b64 {%r14, %r15}, %rd7;
    shfl.sync.down.b32 %r16, %r14, 2, 31, 0xffffffff;
    shfl.sync.down.b32 %r17, %r15, 2, 31, 0xffffffff;
    mov.b64 %rd33, {%r16, %r17};
    add.u64 %rd7, %rd7, %rd33;
    mov.b64 {%r14, %r15}, %rd7;
    shfl.sync.down.b32 %r16, %r14, 1, 31, 0xffffffff;
    shfl.sync.down.b32 %r17, %r15, 1, 31, 0xffffffff;
    mov.b64 %rd33, {%r16, %r17};
    add.u64 %rd7, %rd7, %rd33;
    and.b32 %r18, %r3, 31;
    setp.ne.u32 %p4, %r18, 0;
    @%p4 bra DONE;
    atom.global.add.u64 %rd34, [%rd3], %rd7;
DONE:
    ret;
}

.visible .entry companion_checksum_words(
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

constexpr unsigned kThreads = 256;    // per block: whole warps (the warp reduction needs them)
constexpr uint64_t kBlocksPerSm = 8;  // 2048 threads: a full SM

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
    COMPANION_TRY(COMPANION_CU(*api_, cuModuleGetFunction, &words_function_, module_,
                               "companion_checksum_words"));
    cu::CUdevice dev = 0;
    COMPANION_TRY(COMPANION_CU(*api_, cuDeviceGet, &dev, ordinal_));
    int sms = 0;
    COMPANION_TRY(
        COMPANION_CU(*api_, cuDeviceGetAttribute, &sms, cu::kDevAttrMultiprocessorCount, dev));
    max_blocks_ = static_cast<uint64_t>(std::max(sms, 1)) * kBlocksPerSm;
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
    // One resident wave of blocks: each thread strides over the whole range.
    const bool vectors = device_ptr % 16 == 0;
    const uint64_t items = vectors ? words / 4 + 3 : words;  // + the last words % 4 words
    const uint64_t blocks = std::clamp<uint64_t>((items + kThreads - 1) / kThreads, 1, max_blocks_);
    if (words > 0) {
      COMPANION_TRY(COMPANION_CU(*api_, cuLaunchKernel, vectors ? function_ : words_function_,
                                 static_cast<unsigned>(blocks), 1, 1, kThreads, 1, 1, 0, nullptr,
                                 params, nullptr));
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
  cu::CUfunction function_ = nullptr;        // 16-byte loads
  cu::CUfunction words_function_ = nullptr;  // 4-byte loads, for unaligned data
  uint64_t max_blocks_ = 1024;
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
