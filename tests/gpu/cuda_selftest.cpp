// cuda_selftest: end-to-end check of the CUDA backends on a real GPU.
//
//   cuda_selftest [--device SPEC] [--backend cuda-vmm|cuda-ipc|all] [--verbose]
//
// Prints one line per check (PASS / FAIL, INFO for measurements) and a SUMMARY line. Exit status:
// 0 all checks passed, 1 some failed, 77 no usable CUDA driver/GPU ("SKIP: <reason>").
//
// For each backend the parent allocates a 2-segment slab, fills it with a deterministic pattern,
// seals and exports it, then fork+execs itself as a client (`cuda_selftest --child ...`; VMM fds
// travel over a socketpair with SCM_RIGHTS, legacy IPC handles as hex on the command line). The
// client imports the segments, checksums them ON THE GPU with a hand-written PTX kernel, compares
// with the parent's host-side checksum, and checks each mapping's access (check_access): cuda-vmm
// read-only, and a write through it refused; cuda-ipc read-write (the driver cannot restrict it),
// a write through it seen by the parent, then undone. The parent checks that the client's mapping
// costs no GPU memory.
//
// Then publishing, per backend: the digest of a 1 GiB segment is timed (INFO ... GB/s), a slab is
// exported writable, filled (cuda-vmm: through a read-write import in this process, made
// read-only afterwards), digested on the GPU and sealed. cuda-vmm runs last: it ends with a write
// through the now read-only mapping, which must be refused, and exits right after the SUMMARY.
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cctype>
#include <chrono>
#include <cinttypes>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "common/checksum.hpp"
#include "common/log.hpp"
#include "common/util.hpp"
#include "memory/backend.hpp"
#include "memory/cuda_backend.hpp"
#include "memory/cuda_checksum.hpp"
#include "memory/cuda_driver.hpp"
#include "memory/cuda_slab.hpp"

namespace {

using namespace companion;
using namespace companion::memory;

constexpr int kExitSkip = 77;
constexpr uint64_t kMiB = uint64_t{1} << 20;
constexpr int64_t kMemorySlack = 64 * static_cast<int64_t>(kMiB);
constexpr int kTimeoutMs = 120'000;

// ---- reporting -------------------------------------------------------------------------------

std::string g_prefix;  // "[child cuda-vmm] " in the client
int g_passed = 0;
int g_failed = 0;

bool check(bool ok, const std::string& name, const std::string& detail = {}) {
  std::printf("%s%s %s%s%s\n", g_prefix.c_str(), ok ? "PASS" : "FAIL", name.c_str(),
              detail.empty() ? "" : ": ", detail.c_str());
  ++(ok ? g_passed : g_failed);
  return ok;
}

template <typename T>
bool check_ok(const Result<T>& r, const std::string& name, const std::string& detail = {}) {
  return r.ok() ? check(true, name, detail) : check(false, name, r.error().to_string());
}

template <typename T>
bool check_fails(const Result<T>& r, StatusCode expected, const std::string& name) {
  if (r.ok()) return check(false, name, "unexpectedly succeeded");
  return check(r.error().code == expected, name, r.error().to_string());
}

void info(const std::string& text) {
  std::printf("%sINFO %s\n", g_prefix.c_str(), text.c_str());
}

std::string mib(uint64_t bytes) {
  return format_bytes(bytes);
}

// ---- the pattern and its checksum ------------------------------------------------------------

uint32_t pattern_word(uint64_t seed, size_t segment, uint64_t index) {
  uint64_t x = seed ^ (static_cast<uint64_t>(segment + 1) << 56) ^ index;  // splitmix64
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  x ^= x >> 31;
  return static_cast<uint32_t>(x);
}

std::vector<uint32_t> make_pattern(uint64_t seed, size_t segment, uint64_t bytes) {
  std::vector<uint32_t> words(bytes / 4);
  for (uint64_t i = 0; i < words.size(); ++i) words[i] = pattern_word(seed, segment, i);
  return words;
}

// sum over 32-bit words of word * (2 * index + 1), mod 2^64: what the PTX kernel computes.
uint64_t host_checksum(const std::vector<uint32_t>& words) {
  uint64_t sum = 0;
  for (uint64_t i = 0; i < words.size(); ++i) sum += uint64_t{words[i]} * (2 * i + 1);
  return sum;
}

// The GPU checksum is the library's (memory/cuda_checksum.hpp): the same wsum64 as host_checksum.
using GpuChecksum = memory::DeviceChecksum;

// Free device memory (cuMemGetInfo, all processes).
Result<uint64_t> free_memory(int ordinal) {
  COMPANION_ASSIGN_OR_RETURN(const cuda::DriverApi* api, cuda::driver());
  COMPANION_TRY(cuda::make_current(ordinal));
  size_t free_bytes = 0;
  size_t total = 0;
  COMPANION_TRY(COMPANION_CU(*api, cuMemGetInfo, &free_bytes, &total));
  return static_cast<uint64_t>(free_bytes);
}

// ---- parent <-> child plumbing ---------------------------------------------------------------

std::string to_hex(const uint8_t* data, size_t n) {
  static constexpr char kDigits[] = "0123456789abcdef";
  std::string out;
  for (size_t i = 0; i < n; ++i) {
    out += kDigits[data[i] >> 4];
    out += kDigits[data[i] & 15];
  }
  return out;
}

bool from_hex(const std::string& text, uint8_t* out, size_t n) {
  if (text.size() != 2 * n) return false;
  auto nibble = [](char c) -> int {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
  };
  for (size_t i = 0; i < n; ++i) {
    const int hi = nibble(text[2 * i]);
    const int lo = nibble(text[2 * i + 1]);
    if (hi < 0 || lo < 0) return false;
    out[i] = static_cast<uint8_t>(hi * 16 + lo);
  }
  return true;
}

bool send_line(int sock, const std::string& line) {
  const std::string data = line + "\n";
  size_t done = 0;
  while (done < data.size()) {
    const ssize_t n = ::send(sock, data.data() + done, data.size() - done, MSG_NOSIGNAL);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return false;
    done += static_cast<size_t>(n);
  }
  return true;
}

// One line, without its newline; nullopt on EOF, error or timeout.
std::optional<std::string> recv_line(int sock, int timeout_ms = kTimeoutMs) {
  std::string line;
  for (;;) {
    pollfd p{sock, POLLIN, 0};
    const int ready = ::poll(&p, 1, timeout_ms);
    if (ready < 0 && errno == EINTR) continue;
    if (ready <= 0) return std::nullopt;
    char c = 0;
    const ssize_t n = ::recv(sock, &c, 1, 0);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return std::nullopt;
    if (c == '\n') return line;
    line += c;
  }
}

bool send_fds(int sock, const std::vector<int>& fds) {
  char byte = 'F';
  iovec iov{&byte, 1};
  std::vector<char> control(CMSG_SPACE(sizeof(int) * fds.size()), 0);
  msghdr msg{};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  msg.msg_control = control.data();
  msg.msg_controllen = control.size();
  cmsghdr* c = CMSG_FIRSTHDR(&msg);
  c->cmsg_level = SOL_SOCKET;
  c->cmsg_type = SCM_RIGHTS;
  c->cmsg_len = CMSG_LEN(sizeof(int) * fds.size());
  std::memcpy(CMSG_DATA(c), fds.data(), sizeof(int) * fds.size());
  return ::sendmsg(sock, &msg, MSG_NOSIGNAL) == 1;
}

std::vector<int> recv_fds(int sock, size_t count) {
  char byte = 0;
  iovec iov{&byte, 1};
  std::vector<char> control(CMSG_SPACE(sizeof(int) * count), 0);
  msghdr msg{};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  msg.msg_control = control.data();
  msg.msg_controllen = control.size();
  pollfd p{sock, POLLIN, 0};
  if (::poll(&p, 1, kTimeoutMs) <= 0) return {};
  if (::recvmsg(sock, &msg, MSG_CMSG_CLOEXEC) != 1) return {};
  std::vector<int> fds;
  for (cmsghdr* c = CMSG_FIRSTHDR(&msg); c != nullptr; c = CMSG_NXTHDR(&msg, c)) {
    if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
    const size_t n = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
    fds.resize(n);
    std::memcpy(fds.data(), CMSG_DATA(c), n * sizeof(int));
  }
  return fds;
}

// ---- the client ------------------------------------------------------------------------------

struct ChildSegment {
  uint64_t size = 0;
  uint64_t checksum = 0;
  std::array<uint8_t, kIpcHandleBytes> handle{};
  int fd = -1;
};

// The access the driver gives this process through a mapping: CU_POINTER_ATTRIBUTE_ACCESS_FLAGS
// (kPointerAccessFlag...).
Result<int> driver_access_flags(const void* address) {
  COMPANION_ASSIGN_OR_RETURN(const cuda::DriverApi* api, cuda::driver());
  int flags = -1;
  const auto ptr = static_cast<cu::CUdeviceptr>(reinterpret_cast<uintptr_t>(address));
  COMPANION_TRY(
      COMPANION_CU(*api, cuPointerGetAttribute, &flags, cu::kPointerAttributeAccessFlags, ptr));
  return flags;
}

// "CU_POINTER_ATTRIBUTE_ACCESS_FLAGS 1", or the driver's error.
std::string describe(const Result<int>& flags) {
  return flags.ok() ? "CU_POINTER_ATTRIBUTE_ACCESS_FLAGS " + std::to_string(*flags)
                    : flags.error().to_string();
}

// Whether the driver answered, and with exactly `expected`.
bool has_access(const Result<int>& flags, int expected) {
  return flags.ok() && *flags == expected;
}

// What docs/architecture.md ("Memory backends and slab layout") says of a client's mapping: a
// cuda-vmm import is read-only in the driver's eyes and says so (writable() false, which the
// client's "read_only" is made of); a legacy IPC mapping is read-write, cannot be restricted
// (cuMemSetAccess takes cuMemMap'd ranges only; make_read_only() is a no-op), says so, and a
// write through it lands in the memory the server and every client share. That write is made
// on the last word of the segment, read back by the parent through the server's own pointer
// (WROTE / SEEN on the socket), then undone.
void check_access(MappedSegment& mapping, bool vmm, int ordinal, int sock, uint64_t checksum,
                  GpuChecksum& kernel) {
  auto api = cuda::driver();
  if (!api.ok() || !cuda::make_current(ordinal).ok()) {
    check(false, "access checks: no context");
    return;
  }
  const auto ptr = static_cast<cu::CUdeviceptr>(reinterpret_cast<uintptr_t>(mapping.address()));
  const uint64_t size = mapping.size();
  const auto flags = driver_access_flags(mapping.address());
  check(has_access(flags, vmm ? cu::kPointerAccessFlagRead : cu::kPointerAccessFlagReadWrite),
        vmm ? "the driver gives the VMM import read access only"
            : "the driver gives the IPC mapping read-write access",
        describe(flags));
  check(mapping.writable() == !vmm, vmm ? "the VMM import reports itself read-only"
                                        : "the IPC mapping reports itself writable");
  if (vmm) return;  // its write test ends the client (a fault leaves the context unusable)

  cu::CUmemAccessDesc desc{};
  desc.location.type = cu::kMemLocationTypeDevice;
  desc.location.id = ordinal;
  desc.flags = cu::kMemAccessFlagsProtRead;
  auto set = COMPANION_CU(**api, cuMemSetAccess, ptr, size, &desc, 1);
  check(!set.ok(), "cuMemSetAccess(PROT_READ) cannot restrict the IPC mapping",
        set.ok() ? "the driver accepted it: cuda-ipc mappings could be made read-only"
                 : set.error().to_string());
  auto made = mapping.make_read_only();
  check(made.ok() && mapping.writable(), "make_read_only leaves the IPC mapping writable");

  const uint64_t offset = size - 4;
  uint32_t original = 0;
  auto wrote = COMPANION_CU(**api, cuMemcpyDtoH, &original, ptr + offset, 4);
  const uint32_t changed = ~original;
  if (wrote.ok()) wrote = COMPANION_CU(**api, cuMemsetD32, ptr + offset, changed, 1);
  if (wrote.ok()) wrote = COMPANION_CU(**api, cuCtxSynchronize);
  if (!check_ok(wrote, "a write through the IPC mapping goes through")) return;
  send_line(sock, "WROTE " + std::to_string(offset) + " " + std::to_string(changed));
  const auto answer = recv_line(sock);
  check(answer == std::optional<std::string>("SEEN"),
        "the server's allocation holds the client's write", answer ? *answer : "no answer");
  auto restored = COMPANION_CU(**api, cuMemcpyHtoD, ptr + offset, &original, 4);
  auto sum = restored.ok() ? kernel.run(ptr, size) : Result<uint64_t>(restored.error());
  check(sum.ok() && sum.value() == checksum, "the written word is put back",
        sum.ok() ? hex64(sum.value()) : sum.error().to_string());
}

// argv: --child <backend> <uuid> <socket fd> <count> <size:checksum[:ipc-hex]>...
int child_main(int argc, char** argv) {
  if (argc < 6) {
    std::fprintf(stderr, "child: bad arguments\n");
    return 2;
  }
  const std::string backend = argv[2];
  const std::string uuid = argv[3];
  const int sock = std::atoi(argv[4]);
  const size_t count = static_cast<size_t>(std::atoi(argv[5]));
  g_prefix = "[child " + backend + "] ";
  const bool vmm = backend == "cuda-vmm";
  if (argc != 6 + static_cast<int>(count)) {
    std::fprintf(stderr, "child: bad segment count\n");
    return 2;
  }
  std::vector<ChildSegment> segments(count);
  for (size_t i = 0; i < count; ++i) {
    const std::string arg = argv[6 + i];
    const size_t c1 = arg.find(':');
    const size_t c2 = arg.find(':', c1 + 1);
    segments[i].size = std::strtoull(arg.substr(0, c1).c_str(), nullptr, 10);
    segments[i].checksum = std::strtoull(arg.substr(c1 + 1, c2 - c1 - 1).c_str(), nullptr, 16);
    if (!vmm && (c2 == std::string::npos ||
                 !from_hex(arg.substr(c2 + 1), segments[i].handle.data(), kIpcHandleBytes))) {
      std::fprintf(stderr, "child: bad IPC handle\n");
      return 2;
    }
  }
  auto finish = [&]() {
    send_line(sock, "RESULT " + std::to_string(g_passed) + " " + std::to_string(g_failed));
    std::fflush(stdout);
    std::fflush(stderr);
    // _exit: after the deliberate write fault the context is unusable; skip static destructors.
    ::_exit(g_failed == 0 ? 0 : 1);
  };

  std::vector<struct stat> fd_ids(count);  // to tell, after the import, that the fd was closed
  if (vmm) {
    const std::vector<int> fds = recv_fds(sock, count);
    if (!check(fds.size() == count, "received segment fds over SCM_RIGHTS",
               std::to_string(fds.size()) + " of " + std::to_string(count))) {
      finish();
    }
    for (size_t i = 0; i < count; ++i) {
      segments[i].fd = fds[i];
      ::fstat(fds[i], &fd_ids[i]);
    }
  }

  if (!check_ok(cuda_available(), "client: cuda_available")) finish();
  auto gpu = resolve_gpu(uuid);
  if (!check_ok(gpu, "client: resolve_gpu by UUID",
                gpu.ok() ? "ordinal " + std::to_string(gpu->ordinal) : "")) {
    finish();
  }
  const int ordinal = gpu->ordinal;
  auto kernel = GpuChecksum::create(ordinal);
  if (!check_ok(kernel, "client: checksum kernel loaded (cuModuleLoadDataEx of the PTX)")) finish();

  send_line(sock, "READY");
  if (recv_line(sock) != "GO") finish();

  std::vector<std::unique_ptr<MappedSegment>> mapped(count);
  for (size_t i = 0; i < count; ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    Result<std::unique_ptr<MappedSegment>> r =
        vmm ? import_cuda_vmm_segment(UniqueFd(segments[i].fd), segments[i].size, ordinal)
            : import_cuda_ipc_segment(segments[i].handle, segments[i].size, ordinal);
    const auto us =
        std::chrono::duration_cast<std::chrono::microseconds>(std::chrono::steady_clock::now() - t0)
            .count();
    const std::string name =
        "import+map segment " + std::to_string(i) + " (" + mib(segments[i].size) + ")";
    if (!check_ok(r, name, std::to_string(us) + " us")) continue;
    mapped[i] = std::move(r).value();
    info(name + " took " + std::to_string(us) + " us");
    check(mapped[i]->on_device() && mapped[i]->size() == segments[i].size &&
              mapped[i]->address() != nullptr,
          "segment " + std::to_string(i) + " mapping looks right",
          "address " + hex64(reinterpret_cast<uintptr_t>(mapped[i]->address())) + ", size " +
              std::to_string(mapped[i]->size()));
    if (vmm) {
      // The import closes the fd it was given. Its number may be reused at once (by a dup in the
      // driver, say), so this is reported, not checked.
      struct stat now {};
      const int flags = ::fcntl(segments[i].fd, F_GETFD);
      const bool same = flags >= 0 && (flags & FD_CLOEXEC) != 0 &&
                        ::fstat(segments[i].fd, &now) == 0 && now.st_dev == fd_ids[i].st_dev &&
                        now.st_ino == fd_ids[i].st_ino;
      info("segment " + std::to_string(i) + " fd " + std::to_string(segments[i].fd) +
           " after the import: " +
           (flags < 0 ? "closed"
            : same    ? "still open?"
                      : "closed, number reused"));
    }
  }

  send_line(sock, "MAPPED");
  if (recv_line(sock) != "GO") finish();

  for (size_t i = 0; i < count; ++i) {
    if (!mapped[i]) continue;
    auto sum = (*kernel)->run(reinterpret_cast<uintptr_t>(mapped[i]->address()), mapped[i]->size());
    if (!check_ok(sum, "GPU checksum of imported segment " + std::to_string(i))) continue;
    check(*sum == segments[i].checksum,
          "imported segment " + std::to_string(i) + " holds the parent's data",
          "gpu " + hex64(*sum) + " vs host " + hex64(segments[i].checksum));
  }

  if (mapped[0]) check_access(*mapped[0], vmm, ordinal, sock, segments[0].checksum, **kernel);

  if (!vmm && mapped[0]) {
    // Two MappedSegments of one handle share one open, and the handle closes with the last.
    const uint64_t size0 = segments[0].size;
    auto again = import_cuda_ipc_segment(segments[0].handle, size0, ordinal);
    if (check_ok(again, "importing the same IPC handle twice")) {
      check((*again)->address() == mapped[0]->address(),
            "second import shares the first's mapping");
      mapped[0].reset();
      auto sum = (*kernel)->run(reinterpret_cast<uintptr_t>((*again)->address()), size0);
      check(sum.ok() && *sum == segments[0].checksum,
            "mapping stays valid after the first of two imports is dropped",
            sum.ok() ? hex64(*sum) : sum.error().to_string());
      again->reset();
      const auto t0 = std::chrono::steady_clock::now();
      auto third = import_cuda_ipc_segment(segments[0].handle, size0, ordinal);
      const auto us = std::chrono::duration_cast<std::chrono::microseconds>(
                          std::chrono::steady_clock::now() - t0)
                          .count();
      if (check_ok(third, "re-import after every mapping was dropped",
                   std::to_string(us) + " us")) {
        auto sum3 = (*kernel)->run(reinterpret_cast<uintptr_t>((*third)->address()), size0);
        check(sum3.ok() && *sum3 == segments[0].checksum, "re-imported segment holds the data");
      }
    }
    auto too_big = import_cuda_ipc_segment(segments[0].handle, size0 * 2, ordinal);
    check_fails(too_big, StatusCode::kInvalidArgument,
                "IPC import larger than its allocation is refused");
  }

  if (vmm && count > 1 && mapped[1]) {
    mapped[1].reset();  // exercises the unmap / address free / release path
    check(true, "segment 1 unmapped");
  }

  if (vmm && mapped[0]) {
    // Must be last: a write fault leaves this process's context unusable.
    auto api = cuda::driver();
    (void)cuda::make_current(ordinal);
    const auto ptr =
        static_cast<cu::CUdeviceptr>(reinterpret_cast<uintptr_t>(mapped[0]->address()));
    auto set = COMPANION_CU(**api, cuMemsetD32, ptr, 0xdeadbeefu, 1024);
    std::string detail;
    bool refused = !set.ok();
    if (refused) {
      detail = "cuMemsetD32 refused: " + set.error().to_string();
    } else {
      auto sync = COMPANION_CU(**api, cuCtxSynchronize);
      refused = !sync.ok();
      detail = refused ? "cuMemsetD32 accepted, then the GPU faulted: " + sync.error().to_string()
                       : "cuMemsetD32 and cuCtxSynchronize both succeeded";
    }
    check(refused, "write through the read-only VMM mapping is refused", detail);
  }
  finish();
  return 0;
}

// ---- the server side -------------------------------------------------------------------------

std::string g_self_path;

void wait_child(pid_t pid) {
  int status = 0;
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(kTimeoutMs);
  for (;;) {
    const pid_t r = ::waitpid(pid, &status, WNOHANG);
    if (r == pid) break;
    if (r < 0 && errno != EINTR) {
      check(false, "client exit", std::string("waitpid: ") + std::strerror(errno));
      return;
    }
    if (std::chrono::steady_clock::now() > deadline) {
      ::kill(pid, SIGKILL);
      ::waitpid(pid, &status, 0);
      check(false, "client exit", "timed out, killed");
      return;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  if (WIFEXITED(status)) {
    check(WEXITSTATUS(status) == 0, "client exited 0",
          "status " + std::to_string(WEXITSTATUS(status)));
  } else {
    check(false, "client exited 0", "killed by signal " + std::to_string(WTERMSIG(status)));
  }
}

// segment0: the server's device pointer of segment 0 (to read back a cuda-ipc client's write).
void run_child(const std::string& backend, const GpuIdentity& gpu,
               std::vector<SegmentExport>& exports, const std::vector<uint64_t>& checksums,
               uint64_t slab_bytes, cu::CUdeviceptr segment0) {
  const bool vmm = backend == "cuda-vmm";
  int sv[2];
  if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) != 0) {
    check(false, "socketpair", std::strerror(errno));
    return;
  }
  UniqueFd parent_end(sv[0]);
  UniqueFd child_end(sv[1]);
  ::fcntl(child_end.get(), F_SETFD, 0);  // inherited by the client

  std::vector<std::string> args = {g_self_path,
                                   "--child",
                                   backend,
                                   gpu.uuid,
                                   std::to_string(child_end.get()),
                                   std::to_string(exports.size())};
  for (size_t i = 0; i < exports.size(); ++i) {
    std::string a = std::to_string(exports[i].size) + ":" + hex64(checksums[i]);
    if (!vmm) a += ":" + to_hex(exports[i].ipc_handle.data(), kIpcHandleBytes);
    args.push_back(a);
  }
  std::vector<char*> argv;
  for (auto& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);

  const auto free_at_spawn = free_memory(gpu.ordinal);
  std::fflush(stdout);
  std::fflush(stderr);
  const pid_t pid = ::fork();
  if (pid < 0) {
    check(false, "fork", std::strerror(errno));
    return;
  }
  if (pid == 0) {
    // Only exec here: CUDA must not be used in a forked child.
    ::execv(argv[0], argv.data());
    ::_exit(127);
  }
  child_end.reset();
  const int sock = parent_end.get();

  if (vmm) {
    std::vector<int> fds;
    for (auto& e : exports) fds.push_back(e.fd.get());
    check(send_fds(sock, fds), "sent segment fds to the client over SCM_RIGHTS");
  }

  std::optional<uint64_t> free_ready;
  std::optional<uint64_t> free_mapped;
  if (recv_line(sock) == std::optional<std::string>("READY")) {
    if (auto f = free_memory(gpu.ordinal); f.ok()) free_ready = *f;
    send_line(sock, "GO");
    if (recv_line(sock) == std::optional<std::string>("MAPPED")) {
      if (auto f = free_memory(gpu.ordinal); f.ok()) free_mapped = *f;
      send_line(sock, "GO");
    }
  }
  if (free_ready && free_mapped) {
    if (free_at_spawn.ok()) {
      info("client context + module cost " +
           std::to_string(
               (static_cast<int64_t>(*free_at_spawn) - static_cast<int64_t>(*free_ready)) /
               static_cast<int64_t>(kMiB)) +
           " MiB of GPU memory");
    }
    const int64_t growth = static_cast<int64_t>(*free_ready) - static_cast<int64_t>(*free_mapped);
    check(growth < kMemorySlack, "client mapping uses no extra GPU memory (zero-copy)",
          "used memory grew by " + std::to_string(growth / static_cast<int64_t>(kMiB)) +
              " MiB while the client mapped " + mib(slab_bytes) + " (slack 64 MiB)");
  } else {
    check(false, "client reached the mapped state", "it stopped early (see its lines above)");
  }
  auto result = recv_line(sock);
  if (result && result->rfind("WROTE ", 0) == 0) {  // check_access, cuda-ipc
    unsigned long long offset = 0;
    unsigned int value = 0;
    uint32_t seen = 0;
    auto api = cuda::driver();
    const bool read = std::sscanf(result->c_str(), "WROTE %llu %u", &offset, &value) == 2 &&
                      api.ok() && cuda::make_current(gpu.ordinal).ok() &&
                      (*api)->cuMemcpyDtoH(&seen, segment0 + offset, 4) == cu::kSuccess;
    check(read && seen == value, "the server reads the client's write through its own pointer",
          read ? hex64(seen) + " vs " + hex64(value) : "could not read it");
    send_line(sock, read && seen == value ? "SEEN" : "UNSEEN " + hex64(seen));
    result = recv_line(sock);
  }
  int child_passed = 0;
  int child_failed = 0;
  if (result && std::sscanf(result->c_str(), "RESULT %d %d", &child_passed, &child_failed) == 2) {
    g_passed += child_passed;
    g_failed += child_failed;
    info("client reported " + std::to_string(child_passed) + " passed, " +
         std::to_string(child_failed) + " failed");
  } else {
    check(false, "client reported its results");
  }
  wait_child(pid);
}

Result<std::unique_ptr<Backend>> make_backend(const std::string& name, int ordinal) {
  return name == "cuda-vmm" ? make_cuda_vmm_backend(ordinal) : make_cuda_ipc_backend(ordinal);
}

void run_backend(const std::string& name, const GpuIdentity& gpu, GpuChecksum& kernel) {
  std::printf("=== backend %s on GPU %d (%s)\n", name.c_str(), gpu.ordinal, gpu.uuid.c_str());
  const bool vmm = name == "cuda-vmm";
  const int ordinal = gpu.ordinal;
  auto made = make_backend(name, ordinal);
  if (!check_ok(made, name + ": backend created")) return;
  Backend& backend = **made;
  const uint64_t g = backend.granularity();
  check(backend.name() == name, "backend name", backend.name());
  check(g > 0 && (g & (g - 1)) == 0, "granularity is a power of two", mib(g));
  check(backend.max_segment_bytes() == (uint64_t{16} << 30), "max segment 16 GiB",
        mib(backend.max_segment_bytes()));

  const std::vector<uint64_t> sizes = {align_up(256 * kMiB, g), align_up(8 * kMiB, g)};
  const uint64_t slab_bytes = sizes[0] + sizes[1];
  check_fails(backend.allocate({g + 1}, "bad"), StatusCode::kInvalidArgument,
              "size not a multiple of the granularity is refused");
  const auto free_before_slab = free_memory(ordinal);
  auto allocated = backend.allocate(sizes, "selftest-" + name);
  if (!check_ok(allocated, "allocate " + mib(sizes[0]) + " + " + mib(sizes[1]))) return;
  Slab& slab = **allocated;
  check(slab.kind() == (vmm ? SegmentKind::kCudaVmmFd : SegmentKind::kCudaIpcHandle), "slab kind",
        segment_kind_name(slab.kind()));
  check(slab.segment_count() == 2 && slab.segment_size(0) == sizes[0] &&
            slab.segment_size(1) == sizes[1] && slab.host_address(0) == nullptr,
        "slab shape");
  if (auto after = free_memory(ordinal); after.ok() && free_before_slab.ok()) {
    const int64_t used = static_cast<int64_t>(*free_before_slab) - static_cast<int64_t>(*after);
    check(used >= static_cast<int64_t>(slab_bytes) - kMemorySlack, "the slab's memory is committed",
          std::to_string(used / static_cast<int64_t>(kMiB)) + " MiB more in use");
  }

  const uint64_t seed = vmm ? 0x1234 : 0x5678;
  std::vector<std::vector<uint32_t>> patterns;
  std::vector<uint64_t> checksums;
  for (size_t s = 0; s < 2; ++s) {
    patterns.push_back(make_pattern(seed, s, sizes[s]));
    checksums.push_back(host_checksum(patterns[s]));
  }

  // Segment 0 through write(), in unaligned pieces.
  {
    const auto* bytes = reinterpret_cast<const uint8_t*>(patterns[0].data());
    const uint64_t cuts[] = {0, kMiB + 3, sizes[0] / 2 + 1, sizes[0] - 12345, sizes[0]};
    bool ok = true;
    std::string detail;
    for (size_t i = 0; i + 1 < std::size(cuts) && ok; ++i) {
      auto r = slab.write(0, cuts[i], bytes + cuts[i], cuts[i + 1] - cuts[i]);
      if (!r.ok()) {
        ok = false;
        detail = r.error().to_string();
      }
    }
    check(ok, "write() segment 0 in 4 unaligned pieces", detail);
  }
  // Segment 1 through the loader's path: pinned staging buffer + stream + device pointer.
  {
    auto dst = cuda_segment_device_pointer(slab, 1);
    auto ord = cuda_slab_device_ordinal(slab);
    check(dst.ok() && *dst != 0 && ord.ok() && *ord == ordinal, "cuda_segment_device_pointer");
    auto pinned = cuda::PinnedHostBuffer::allocate(ordinal, 3 * kMiB);
    auto stream = cuda::Stream::create(ordinal);
    bool ok =
        check_ok(pinned, "pinned host buffer") && check_ok(stream, "stream created") && dst.ok();
    std::string detail;
    const auto* bytes = reinterpret_cast<const uint8_t*>(patterns[1].data());
    for (uint64_t off = 0; ok && off < sizes[1]; off += pinned->size()) {
      const uint64_t n = std::min<uint64_t>(pinned->size(), sizes[1] - off);
      std::memcpy(pinned->data(), bytes + off, n);
      auto r = stream->copy_to_device_async(*dst + off, pinned->data(), n);
      if (r.ok()) r = stream->synchronize();
      if (!r.ok()) {
        ok = false;
        detail = r.error().to_string();
      }
    }
    check(ok, "segment 1 filled with pinned staging + cuMemcpyHtoDAsync", detail);
  }
  check_fails(slab.write(1, sizes[1] - 4, patterns[1].data(), 8), StatusCode::kInternal,
              "write past the end of a segment is refused");
  check_fails(slab.write(2, 0, patterns[1].data(), 8), StatusCode::kInternal,
              "write to a missing segment is refused");
  check_fails(slab.export_segments(), StatusCode::kNotReady, "export before seal is refused");
  check_ok(slab.seal(), "seal");
  check_fails(slab.write(0, 0, patterns[0].data(), 4), StatusCode::kInternal,
              "write after seal is refused");

  for (size_t s = 0; s < 2; ++s) {
    auto ptr = cuda_segment_device_pointer(slab, s);
    auto sum = ptr.ok() ? kernel.run(*ptr, sizes[s]) : Result<uint64_t>(ptr.error());
    if (check_ok(sum, "server-side GPU checksum of segment " + std::to_string(s))) {
      check(*sum == checksums[s], "segment " + std::to_string(s) + " holds the written pattern",
            "gpu " + hex64(*sum) + " vs host " + hex64(checksums[s]));
    }
  }

  auto exported = slab.export_segments();
  if (!check_ok(exported, "export_segments")) return;
  std::vector<SegmentExport>& exports = *exported;
  {
    bool ok = exports.size() == 2;
    for (size_t i = 0; ok && i < exports.size(); ++i) {
      ok = exports[i].size == sizes[i] &&
           exports[i].kind == (vmm ? SegmentKind::kCudaVmmFd : SegmentKind::kCudaIpcHandle);
      if (vmm) {
        ok = ok && exports[i].fd.valid() &&
             (::fcntl(exports[i].fd.get(), F_GETFD) & FD_CLOEXEC) != 0;
      } else {
        ok = ok && std::any_of(exports[i].ipc_handle.begin(), exports[i].ipc_handle.end(),
                               [](uint8_t b) { return b != 0; });
      }
    }
    check(ok, "exports have the right kind, size and handle" +
                  std::string(vmm ? " (close-on-exec fds)" : ""));
  }
  if (vmm) {
    auto second = slab.export_segments();
    check(second.ok() && (*second)[0].fd.valid() && (*second)[0].fd.get() != exports[0].fd.get(),
          "each export gives new fds");
  }

  auto segment0 = cuda_segment_device_pointer(slab, 0);
  run_child(name, gpu, exports, checksums, slab_bytes, segment0.ok() ? *segment0 : 0);

  for (size_t s = 0; s < 2; ++s) {
    auto ptr = cuda_segment_device_pointer(slab, s);
    auto sum = ptr.ok() ? kernel.run(*ptr, sizes[s]) : Result<uint64_t>(ptr.error());
    check(sum.ok() && *sum == checksums[s],
          "segment " + std::to_string(s) + " intact after the client is gone",
          sum.ok() ? hex64(*sum) : sum.error().to_string());
  }

  if (vmm) {
    // A process may import its own export: a second, read-only mapping of the same memory.
    auto again = slab.export_segments();
    if (check_ok(again, "export again for a same-process import")) {
      const auto t0 = std::chrono::steady_clock::now();
      auto self = import_cuda_vmm_segment(std::move((*again)[1].fd), sizes[1], ordinal);
      const auto us = std::chrono::duration_cast<std::chrono::microseconds>(
                          std::chrono::steady_clock::now() - t0)
                          .count();
      if (check_ok(self, "same-process import of segment 1", std::to_string(us) + " us")) {
        auto sum = kernel.run(reinterpret_cast<uintptr_t>((*self)->address()), sizes[1]);
        check(sum.ok() && *sum == checksums[1], "same-process read-only mapping reads the data");
      }
    }
    UniqueFd null_fd(::open("/dev/null", O_RDONLY | O_CLOEXEC));
    auto bad = import_cuda_vmm_segment(std::move(null_fd), g, ordinal);
    check(!bad.ok() && bad.error().code == StatusCode::kCudaError &&
              bad.error().message.find("cuMemImportFromShareableHandle") != std::string::npos,
          "importing a non-CUDA fd fails with the driver's message",
          bad.ok() ? "succeeded" : bad.error().to_string());
  }

  // Out of memory: more 16 GiB segments than the GPU has memory; everything allocated is released.
  {
    const auto before = free_memory(ordinal);
    const uint64_t max = backend.max_segment_bytes();
    const std::vector<uint64_t> huge(static_cast<size_t>(gpu.total_memory / max + 2), max);
    const auto t0 = std::chrono::steady_clock::now();
    auto r = backend.allocate(huge, "selftest-oom");
    const auto ms =
        std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now() - t0)
            .count();
    check_fails(r, StatusCode::kOutOfMemory,
                "allocating " + std::to_string(huge.size()) + " x 16 GiB gives kOutOfMemory (" +
                    std::to_string(ms) + " ms)");
    const auto after = free_memory(ordinal);
    if (before.ok() && after.ok()) {
      const int64_t leaked = static_cast<int64_t>(*before) - static_cast<int64_t>(*after);
      check(leaked < kMemorySlack, "partial allocations released after the failure",
            std::to_string(leaked / static_cast<int64_t>(kMiB)) + " MiB not returned");
    }
  }

  if (!vmm) {
    // Last, in case the driver lets it through and closing that mapping disturbs the slab.
    auto own = import_cuda_ipc_segment(exports[0].ipc_handle, sizes[0], ordinal);
    info("opening this process's own IPC handle: " +
         (own.ok() ? std::string("the driver allowed it") : own.error().to_string()));
  }
}

// ---- publishing: a writer fills a slab through its own writable mapping --------------------

// Times slab.digest of one segment filled with cuMemsetD32(value): wsum64 of n equal words v is
// v * n^2 (mod 2^64), so the result is checked too.
void time_digest(const std::string& name, Backend& backend, int ordinal, uint64_t bytes) {
  auto allocated = backend.allocate({align_up(bytes, backend.granularity())}, "selftest-digest");
  if (!check_ok(allocated, name + ": allocate " + mib(bytes) + " for the digest timing")) return;
  Slab& slab = **allocated;
  const uint64_t size = slab.segment_size(0);
  auto ptr = cuda_segment_device_pointer(slab, 0);
  auto api = cuda::driver();
  const uint32_t value = 0x9e3779b9u;
  if (!ptr.ok() || !api.ok() || !cuda::make_current(ordinal).ok()) {
    check(false, name + ": digest timing setup");
    return;
  }
  auto set = COMPANION_CU(**api, cuMemsetD32, *ptr, value, size / 4);
  if (set.ok()) set = COMPANION_CU(**api, cuCtxSynchronize);
  if (!check_ok(set, name + ": fill " + mib(size) + " with cuMemsetD32")) return;
  const uint64_t n = size / 4;
  const uint64_t expected = uint64_t{value} * n * n;
  auto first = slab.digest(0);  // loads the kernel
  check(first.ok() && *first == expected, name + ": digest of " + mib(size) + " is v * n^2",
        first.ok() ? hex64(*first) + " vs " + hex64(expected) : first.error().to_string());
  double best = 1e9;
  for (int i = 0; i < 5; ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    auto sum = slab.digest(0);
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (!sum.ok() || *sum != expected) {
      check(false, name + ": repeated digest", sum.ok() ? hex64(*sum) : sum.error().to_string());
      return;
    }
    best = std::min(best, s);
  }
  char line[200];
  std::snprintf(line, sizeof(line), "%s: digest of %s takes %.3f ms (%.0f GB/s)", name.c_str(),
                mib(size).c_str(), best * 1e3, static_cast<double>(size) / best / 1e9);
  info(line);
}

// The writer of a published slab: export_writable, import read-write, write, make_read_only,
// digest on the server's side. With fault_last (cuda-vmm), ends with a write through the
// read-only mapping, which must be refused: a GPU fault leaves the context unusable, so the caller
// runs nothing on the GPU afterwards.
void run_publish(const std::string& name, const GpuIdentity& gpu, GpuChecksum& kernel,
                 bool fault_last) {
  std::printf("=== publishing with %s on GPU %d\n", name.c_str(), gpu.ordinal);
  const bool vmm = name == "cuda-vmm";
  const int ordinal = gpu.ordinal;
  auto made = make_backend(name, ordinal);
  if (!check_ok(made, name + ": backend created for publishing")) return;
  Backend& backend = **made;
  time_digest(name, backend, ordinal, uint64_t{1} << 30);

  const uint64_t size = align_up(32 * kMiB, backend.granularity());
  auto allocated = backend.allocate({size}, "selftest-publish-" + name);
  if (!check_ok(allocated, name + ": allocate a slab to publish")) return;
  Slab& slab = **allocated;
  const auto words = make_pattern(vmm ? 0xabc : 0xdef, 0, size);
  const uint64_t expected = host_checksum(words);
  auto api = cuda::driver();
  if (!api.ok()) return;

  auto writable = slab.export_writable();
  if (!check_ok(writable, name + ": export_writable before seal")) return;
  check(writable->size() == 1 && (*writable)[0].size == size &&
            (*writable)[0].kind == slab.kind() &&
            (vmm ? (*writable)[0].fd.valid()
                 : std::any_of((*writable)[0].ipc_handle.begin(), (*writable)[0].ipc_handle.end(),
                               [](uint8_t b) { return b != 0; })),
        name + ": writable export has the slab's kind, size and handle");

  if (!vmm) {
    // This process cannot open its own legacy IPC handle: write through the slab instead.
    check_ok(slab.write(0, 0, words.data(), size), name + ": slab filled with write()");
    auto sum = slab.digest(0);
    check(sum.ok() && *sum == expected, name + ": digest matches the host wsum64",
          sum.ok() ? hex64(*sum) + " vs " + hex64(expected) : sum.error().to_string());
    check_ok(slab.seal(), name + ": seal");
    check_fails(slab.export_writable(), StatusCode::kInvalidArgument,
                name + ": export_writable after seal is refused");
    auto after = slab.digest(0);
    check(after.ok() && *after == expected, name + ": digest after seal",
          after.ok() ? hex64(*after) : after.error().to_string());
    return;
  }

  // cuda-vmm: this process maps its own export read-write, as a writer client would.
  auto mapped =
      import_segment(std::move((*writable)[0]), ImportTarget{ordinal}, Access::kReadWrite);
  if (!check_ok(mapped, name + ": import_segment kReadWrite")) return;
  MappedSegment& writer = **mapped;
  check(writer.writable() && writer.on_device() && writer.size() == size,
        name + ": writer mapping is writable, on the device, of the slab's size");
  const auto ptr = static_cast<cu::CUdeviceptr>(reinterpret_cast<uintptr_t>(writer.address()));
  (void)cuda::make_current(ordinal);
  auto copied = COMPANION_CU(**api, cuMemcpyHtoD, ptr, words.data(), size);
  check_ok(copied, name + ": cuMemcpyHtoD through the writer's mapping");
  auto before = slab.digest(0);
  check(before.ok() && *before == expected, name + ": digest sees the writer's bytes",
        before.ok() ? hex64(*before) + " vs " + hex64(expected) : before.error().to_string());
  auto through = kernel.run(ptr, size);
  check(through.ok() && *through == expected, name + ": checksum through the writer's mapping");
  const void* address = writer.address();
  const auto writer_flags = driver_access_flags(address);
  check(has_access(writer_flags, cu::kPointerAccessFlagReadWrite),
        name + ": the driver gives the writer's mapping read-write access", describe(writer_flags));
  check_ok(writer.make_read_only(), name + ": make_read_only");
  check(!writer.writable() && writer.address() == address,
        name + ": the mapping stays at its address, no longer writable");
  const auto read_only_flags = driver_access_flags(address);
  check(has_access(read_only_flags, cu::kPointerAccessFlagRead),
        name + ": the driver gives it read access only after make_read_only",
        describe(read_only_flags));
  auto read_back = kernel.run(ptr, size);
  check(read_back.ok() && *read_back == expected, name + ": read-only mapping reads the bytes",
        read_back.ok() ? hex64(*read_back) : read_back.error().to_string());
  check_ok(slab.seal(), name + ": seal");
  check_fails(slab.export_writable(), StatusCode::kInvalidArgument,
              name + ": export_writable after seal is refused");
  auto sealed = slab.digest(0);
  check(sealed.ok() && *sealed == expected, name + ": digest after seal matches the host wsum64",
        sealed.ok() ? hex64(*sealed) + " vs " + hex64(expected) : sealed.error().to_string());
  if (!fault_last) return;
  // Last: a refused write may leave this process's context unusable.
  auto attempt = kernel.try_write(ptr);
  check(!attempt.ok(), name + ": write through the mapping after make_read_only is refused",
        attempt.ok() ? "the write went through" : attempt.error().to_string());
  std::printf("SUMMARY: %d passed, %d failed\n", g_passed, g_failed);
  std::fflush(stdout);
  // The context may be unusable now: skip the destructors' driver calls.
  ::_exit(g_failed == 0 ? 0 : 1);
}

int parent_main(int argc, char** argv) {
  std::string device = "0";
  std::string which = "all";
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--device" && i + 1 < argc) {
      device = argv[++i];
    } else if (arg == "--backend" && i + 1 < argc) {
      which = argv[++i];
    } else if (arg == "--verbose") {
      log::to_stderr(log::Level::kDebug);
    } else {
      std::fprintf(
          stderr,
          "usage: cuda_selftest [--device SPEC] [--backend cuda-vmm|cuda-ipc|all] [--verbose]\n");
      return 2;
    }
  }
  char self[4096] = {};
  const ssize_t n = ::readlink("/proc/self/exe", self, sizeof(self) - 1);
  g_self_path = n > 0 ? std::string(self, static_cast<size_t>(n)) : std::string(argv[0]);

  if (auto available = cuda_available(); !available.ok()) {
    std::printf("SKIP: %s\n", available.error().to_string().c_str());
    return kExitSkip;
  }
  auto api = cuda::driver();
  info("CUDA driver " + std::to_string((*api)->driver_version / 1000) + "." +
       std::to_string((*api)->driver_version % 1000 / 10) + ", " +
       std::to_string((*api)->device_count) + " GPU(s) visible");

  // ---- identity
  auto gpus = list_gpus();
  if (!check_ok(gpus, "list_gpus") || !check(!gpus->empty(), "at least one GPU")) {
    std::printf("SUMMARY: %d passed, %d failed\n", g_passed, g_failed);
    return 1;
  }
  for (const auto& gpu : *gpus) {
    info("GPU " + std::to_string(gpu.ordinal) + ": " + gpu.name + ", " + gpu.uuid + ", " +
         gpu.pci_bus_id + ", " + mib(gpu.total_memory));
    check(cuda::normalize_gpu_uuid(gpu.uuid) == gpu.uuid && gpu.uuid.size() == 40,
          "GPU " + std::to_string(gpu.ordinal) + " UUID is canonical", gpu.uuid);
    check(cuda::normalize_pci_bus_id(gpu.pci_bus_id) == gpu.pci_bus_id,
          "GPU " + std::to_string(gpu.ordinal) + " PCI bus id is canonical", gpu.pci_bus_id);
  }
  auto target = resolve_gpu(device);
  if (!check_ok(target, "resolve_gpu(\"" + device + "\")")) {
    std::printf("SUMMARY: %d passed, %d failed\n", g_passed, g_failed);
    return 1;
  }
  const GpuIdentity gpu = *target;
  std::string upper = gpu.uuid.substr(4);
  for (char& c : upper) c = static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
  std::string upper_pci = gpu.pci_bus_id;
  for (char& c : upper_pci) c = static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
  std::vector<std::string> specs = {std::to_string(gpu.ordinal), gpu.uuid, upper, gpu.pci_bus_id,
                                    "0000" + upper_pci};
  if (gpu.pci_bus_id.rfind("0000:", 0) == 0) specs.push_back(gpu.pci_bus_id.substr(5));
  for (const auto& spec : specs) {
    auto r = resolve_gpu(spec);
    check(r.ok() && r->ordinal == gpu.ordinal && r->uuid == gpu.uuid &&
              r->pci_bus_id == gpu.pci_bus_id && r->name == gpu.name &&
              r->total_memory == gpu.total_memory,
          "resolve_gpu(\"" + spec + "\") finds the same GPU",
          r.ok() ? "ordinal " + std::to_string(r->ordinal) : r.error().to_string());
  }
  check(gpus->size() > static_cast<size_t>(gpu.ordinal) &&
            (*gpus)[static_cast<size_t>(gpu.ordinal)].uuid == gpu.uuid,
        "list_gpus and resolve_gpu agree");
  check_fails(resolve_gpu("999"), StatusCode::kNotFound, "resolve_gpu of a missing ordinal");
  check_fails(resolve_gpu("GPU-00000000-0000-0000-0000-000000000000"), StatusCode::kNotFound,
              "resolve_gpu of an unknown UUID");
  check_fails(resolve_gpu("ff:1f.7"), StatusCode::kNotFound,
              "resolve_gpu of an unknown PCI bus id");
  check_fails(resolve_gpu("cuda:0"), StatusCode::kInvalidArgument, "resolve_gpu of junk");
  check_fails(make_cuda_vmm_backend(-1), StatusCode::kDeviceMismatch, "negative ordinal refused");
  check_fails(make_cuda_ipc_backend((*api)->device_count), StatusCode::kInvalidArgument,
              "ordinal past the last GPU refused");

  // ---- contexts: operations leave a thread's current context as they found it
  {
    bool ok = false;
    std::string detail;
    std::thread([&] {
      cu::CUcontext before = reinterpret_cast<cu::CUcontext>(1);
      cu::CUcontext after = reinterpret_cast<cu::CUcontext>(1);
      (void)(*api)->cuCtxGetCurrent(&before);
      auto g = cuda::vmm_granularity(gpu.ordinal);
      auto scoped = cuda::ScopedContext::enter(gpu.ordinal);
      cu::CUcontext inside = nullptr;
      (void)(*api)->cuCtxGetCurrent(&inside);
      auto primary = cuda::primary_context(gpu.ordinal);
      const bool inside_ok = scoped.ok() && primary.ok() && inside == *primary;
      { auto drop = std::move(scoped); }
      (void)(*api)->cuCtxGetCurrent(&after);
      ok = g.ok() && inside_ok && before == nullptr && after == nullptr;
      detail = "granularity " + (g.ok() ? mib(*g) : g.error().to_string());
    }).join();
    check(ok, "ScopedContext sets the primary context and restores the thread's (none)", detail);
  }

  auto kernel = GpuChecksum::create(gpu.ordinal);
  if (!check_ok(kernel, "checksum kernel loaded (cuModuleLoadDataEx of the PTX)")) {
    std::printf("SUMMARY: %d passed, %d failed\n", g_passed, g_failed);
    return 1;
  }
  {
    // The kernel itself, on a known buffer, before trusting it with the backends.
    auto words = make_pattern(99, 0, 4 * kMiB + 12);
    cu::CUdeviceptr buf = 0;
    auto r = COMPANION_CU(**api, cuMemAlloc, &buf, words.size() * 4);
    if (r.ok()) r = COMPANION_CU(**api, cuMemcpyHtoD, buf, words.data(), words.size() * 4);
    auto sum = r.ok() ? (*kernel)->run(buf, words.size() * 4) : Result<uint64_t>(r.error());
    check(sum.ok() && *sum == host_checksum(words),
          "checksum kernel matches the host on a known buffer",
          sum.ok() ? hex64(*sum) + " vs " + hex64(host_checksum(words)) : sum.error().to_string());
    // Unaligned start (4-byte loads) and a length that is no multiple of 4 or 16.
    const auto* host = reinterpret_cast<const uint8_t*>(words.data());
    const uint64_t odd_bytes = words.size() * 4 - 4 - 7;
    auto odd = r.ok() ? (*kernel)->run(buf + 4, odd_bytes) : Result<uint64_t>(r.error());
    const uint64_t odd_expected = companion::wsum64(host + 4, odd_bytes);
    check(odd.ok() && *odd == odd_expected,
          "checksum kernel matches the host at a 4-byte aligned start and an odd length",
          odd.ok() ? hex64(*odd) + " vs " + hex64(odd_expected) : odd.error().to_string());
    auto aligned_odd = r.ok() ? (*kernel)->run(buf, odd_bytes) : Result<uint64_t>(r.error());
    const uint64_t aligned_expected = companion::wsum64(host, odd_bytes);
    check(aligned_odd.ok() && *aligned_odd == aligned_expected,
          "checksum kernel matches the host at an aligned start and an odd length",
          aligned_odd.ok() ? hex64(*aligned_odd) + " vs " + hex64(aligned_expected)
                           : aligned_odd.error().to_string());
    if (buf != 0) (void)(*api)->cuMemFree(buf);
  }

  for (const std::string name : {"cuda-vmm", "cuda-ipc"}) {
    if (which == "all" || which == name) run_backend(name, gpu, **kernel);
  }
  // Publishing; cuda-vmm last, as it ends with a deliberate GPU fault (and exits).
  for (const std::string name : {"cuda-ipc", "cuda-vmm"}) {
    if (which == "all" || which == name) run_publish(name, gpu, **kernel, name == "cuda-vmm");
  }

  std::printf("SUMMARY: %d passed, %d failed\n", g_passed, g_failed);
  return g_failed == 0 ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  std::setvbuf(stdout, nullptr, _IOLBF, 0);
  companion::log::to_stderr(companion::log::Level::kWarn);  // --verbose: debug
  if (argc >= 2 && std::strcmp(argv[1], "--child") == 0) return child_main(argc, argv);
  return parent_main(argc, argv);
}
