// The host backend: memfd slabs written by the server, sealed, exported as fresh fds and mapped
// read-only by clients; whatever a client does, the bytes cannot change under other clients.
#include <fcntl.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/sysinfo.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "memory/backend.hpp"
#include "memory/host_backend.hpp"

namespace companion::memory {
namespace {

uint64_t page() {
  return static_cast<uint64_t>(::sysconf(_SC_PAGESIZE));
}

std::string pattern(uint64_t size, unsigned seed) {
  std::string out(size, '\0');
  for (uint64_t i = 0; i < size; ++i)
    out[i] = static_cast<char>((i * 131 + seed * 7 + i / 251) & 0xFF);
  return out;
}

// A slab of the given segment sizes, filled with pattern(size, segment index), sealed.
std::unique_ptr<Slab> filled_slab(Backend& backend, const std::vector<uint64_t>& sizes,
                                  bool seal = true) {
  auto slab = backend.allocate(sizes, "test");
  EXPECT_TRUE(slab.ok()) << slab.error().to_string();
  if (!slab.ok()) return nullptr;
  for (size_t i = 0; i < sizes.size(); ++i) {
    std::string bytes = pattern(sizes[i], static_cast<unsigned>(i));
    auto w = (*slab)->write(i, 0, bytes.data(), bytes.size());
    EXPECT_TRUE(w.ok()) << w.error().to_string();
  }
  if (seal) {
    auto s = (*slab)->seal();
    EXPECT_TRUE(s.ok()) << s.error().to_string();
  }
  return std::move(slab).value();
}

// An fd nobody sealed: a plain memfd of `size` bytes.
UniqueFd unsealed_memfd(uint64_t size, unsigned flags = MFD_CLOEXEC | MFD_ALLOW_SEALING) {
  UniqueFd fd(::memfd_create("companion-test", flags));
  EXPECT_TRUE(fd.valid()) << std::strerror(errno);
  EXPECT_EQ(::ftruncate(fd.get(), static_cast<off_t>(size)), 0) << std::strerror(errno);
  return fd;
}

TEST(HostBackend, Properties) {
  auto backend = make_host_backend();
  EXPECT_EQ(backend->name(), "host");
  EXPECT_EQ(backend->granularity(), page());
  EXPECT_GE(backend->max_segment_bytes(), 1ull << 30);
  EXPECT_EQ(backend->max_segment_bytes() % backend->granularity(), 0u);
}

TEST(HostBackend, SegmentSizesAndTotal) {
  auto backend = make_host_backend();
  auto slab = backend->allocate({page(), 3 * page(), 2 * page()}, "sizes");
  ASSERT_TRUE(slab.ok()) << slab.error().to_string();
  Slab& s = **slab;
  EXPECT_EQ(s.kind(), SegmentKind::kHostMemfd);
  ASSERT_EQ(s.segment_count(), 3u);
  EXPECT_EQ(s.segment_size(0), page());
  EXPECT_EQ(s.segment_size(1), 3 * page());
  EXPECT_EQ(s.segment_size(2), 2 * page());
  EXPECT_EQ(s.segment_size(3), 0u);  // out of range
  EXPECT_EQ(s.total_bytes(), 6 * page());
  for (size_t i = 0; i < 3; ++i) EXPECT_NE(s.host_address(i), nullptr) << i;
  EXPECT_EQ(s.host_address(3), nullptr);
  // Fresh memory reads as zeros.
  const auto* p = static_cast<const unsigned char*>(s.host_address(1));
  for (uint64_t i = 0; i < 3 * page(); i += 97) ASSERT_EQ(p[i], 0) << i;
}

TEST(HostBackend, SizeNotAMultipleOfThePageIsRefused) {
  auto backend = make_host_backend();
  for (uint64_t size : {uint64_t{1}, page() + 1, page() / 2, 3 * page() - 256}) {
    auto slab = backend->allocate({page(), size}, "odd");
    ASSERT_FALSE(slab.ok()) << size;
    EXPECT_NE(slab.error().code, StatusCode::kOk);
  }
}

TEST(HostBackend, WriteThenHostAddressShowsBytes) {
  auto backend = make_host_backend();
  auto slab = backend->allocate({2 * page()}, "write");
  ASSERT_TRUE(slab.ok());
  std::string bytes = pattern(1000, 3);
  ASSERT_TRUE((*slab)->write(0, page() - 10, bytes.data(), bytes.size()).ok());
  const char* p = static_cast<const char*>((*slab)->host_address(0));
  EXPECT_EQ(std::string(p + page() - 10, bytes.size()), bytes);
  // Direct writes through the address and write() land in the same memory.
  static_cast<char*>((*slab)->host_address(0))[0] = 'x';
  EXPECT_EQ(p[0], 'x');
}

TEST(HostBackend, WriteOutOfBoundsIsRefused) {
  auto backend = make_host_backend();
  auto slab = backend->allocate({page()}, "bounds");
  ASSERT_TRUE(slab.ok());
  char buf[16] = {};
  EXPECT_FALSE((*slab)->write(0, page() - 8, buf, 16).ok());
  EXPECT_FALSE((*slab)->write(0, page() + 1, buf, 0).ok());
  EXPECT_FALSE((*slab)->write(0, UINT64_MAX, buf, 2).ok());
  EXPECT_FALSE((*slab)->write(0, 8, buf, UINT64_MAX).ok());
  EXPECT_FALSE((*slab)->write(1, 0, buf, 1).ok());  // no such segment
  EXPECT_TRUE((*slab)->write(0, page() - 16, buf, 16).ok());
  EXPECT_TRUE((*slab)->write(0, page(), buf, 0).ok());
}

TEST(HostBackend, ExportBeforeSealIsNotReady) {
  auto backend = make_host_backend();
  auto slab = filled_slab(*backend, {page()}, /*seal=*/false);
  ASSERT_TRUE(slab);
  auto exports = slab->export_segments();
  ASSERT_FALSE(exports.ok());
  EXPECT_EQ(exports.error().code, StatusCode::kNotReady);
}

TEST(HostBackend, SealEndsWriting) {
  auto backend = make_host_backend();
  auto slab = filled_slab(*backend, {page()}, /*seal=*/false);
  ASSERT_TRUE(slab);
  ASSERT_TRUE(slab->seal().ok());
  EXPECT_TRUE(slab->seal().ok());  // again: nothing to do
  EXPECT_EQ(slab->host_address(0), nullptr);
  char c = 1;
  EXPECT_FALSE(slab->write(0, 0, &c, 1).ok());
  EXPECT_EQ(slab->segment_size(0), page());  // sizes survive the unmap
}

TEST(HostBackend, ExportIsAFreshFdForTheSameSealedMemfd) {
  auto backend = make_host_backend();
  auto slab = filled_slab(*backend, {page(), 4 * page()});
  ASSERT_TRUE(slab);
  auto first = slab->export_segments();
  auto second = slab->export_segments();
  ASSERT_TRUE(first.ok()) << first.error().to_string();
  ASSERT_TRUE(second.ok());
  ASSERT_EQ(first->size(), 2u);
  ASSERT_EQ(second->size(), 2u);
  for (size_t i = 0; i < 2; ++i) {
    const SegmentExport& a = (*first)[i];
    const SegmentExport& b = (*second)[i];
    EXPECT_EQ(a.kind, SegmentKind::kHostMemfd);
    EXPECT_EQ(a.size, slab->segment_size(i));
    ASSERT_TRUE(a.fd.valid());
    ASSERT_TRUE(b.fd.valid());
    EXPECT_NE(a.fd.get(), b.fd.get());
    struct stat sa {
    }, sb{};
    ASSERT_EQ(::fstat(a.fd.get(), &sa), 0);
    ASSERT_EQ(::fstat(b.fd.get(), &sb), 0);
    EXPECT_EQ(sa.st_ino, sb.st_ino);
    EXPECT_EQ(sa.st_dev, sb.st_dev);
    EXPECT_EQ(static_cast<uint64_t>(sa.st_size), a.size);
    // Not leaked into exec'ed children.
    EXPECT_TRUE(::fcntl(a.fd.get(), F_GETFD) & FD_CLOEXEC);
    int seals = ::fcntl(a.fd.get(), F_GET_SEALS);
    ASSERT_GE(seals, 0);
    EXPECT_EQ(seals & (F_SEAL_WRITE | F_SEAL_GROW | F_SEAL_SHRINK | F_SEAL_SEAL),
              F_SEAL_WRITE | F_SEAL_GROW | F_SEAL_SHRINK | F_SEAL_SEAL);
  }
  // The two segments are different memfds.
  struct stat s0 {
  }, s1{};
  ASSERT_EQ(::fstat((*first)[0].fd.get(), &s0), 0);
  ASSERT_EQ(::fstat((*first)[1].fd.get(), &s1), 0);
  EXPECT_NE(s0.st_ino, s1.st_ino);
}

TEST(HostBackend, SealedExportRefusesWritableMappingsWritesAndResizes) {
  auto backend = make_host_backend();
  auto slab = filled_slab(*backend, {2 * page()});
  ASSERT_TRUE(slab);
  auto exports = slab->export_segments();
  ASSERT_TRUE(exports.ok());
  int fd = (*exports)[0].fd.get();

  errno = 0;
  void* p = ::mmap(nullptr, 2 * page(), PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  EXPECT_EQ(p, MAP_FAILED);
  EXPECT_EQ(errno, EPERM) << std::strerror(errno);
  if (p != MAP_FAILED) ::munmap(p, 2 * page());

  char c = 'x';
  errno = 0;
  EXPECT_EQ(::pwrite(fd, &c, 1, 0), -1);
  EXPECT_EQ(errno, EPERM) << std::strerror(errno);
  errno = 0;
  EXPECT_EQ(::write(fd, &c, 1), -1);
  EXPECT_EQ(errno, EPERM) << std::strerror(errno);

  EXPECT_EQ(::ftruncate(fd, static_cast<off_t>(page())), -1);
  EXPECT_EQ(::ftruncate(fd, static_cast<off_t>(4 * page())), -1);
  // Seals cannot be removed or added to.
  EXPECT_EQ(::fcntl(fd, F_ADD_SEALS, F_SEAL_FUTURE_WRITE), -1);

  // A private (copy-on-write) mapping is fine: its writes never reach the memfd.
  void* priv = ::mmap(nullptr, 2 * page(), PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
  ASSERT_NE(priv, MAP_FAILED) << std::strerror(errno);
  static_cast<char*>(priv)[0] = static_cast<char>(~pattern(1, 0)[0]);
  ::munmap(priv, 2 * page());

  auto mapped = import_host_segment(std::move((*exports)[0].fd), 2 * page());
  ASSERT_TRUE(mapped.ok()) << mapped.error().to_string();
  EXPECT_EQ(std::string(static_cast<const char*>((*mapped)->address()), 2 * page()),
            pattern(2 * page(), 0));
}

TEST(HostBackend, ImportMapsReadOnlyWithTheBytes) {
  auto backend = make_host_backend();
  std::vector<uint64_t> sizes = {page(), 5 * page()};
  auto slab = filled_slab(*backend, sizes);
  ASSERT_TRUE(slab);
  auto exports = slab->export_segments();
  ASSERT_TRUE(exports.ok());
  for (size_t i = 0; i < sizes.size(); ++i) {
    SegmentExport e = std::move((*exports)[i]);
    auto mapped = import_segment(std::move(e), ImportTarget{});
    ASSERT_TRUE(mapped.ok()) << mapped.error().to_string();
    const MappedSegment& m = **mapped;
    EXPECT_FALSE(m.on_device());
    EXPECT_EQ(m.size(), sizes[i]);
    ASSERT_NE(m.address(), nullptr);
    EXPECT_EQ(std::string(static_cast<const char*>(m.address()), sizes[i]),
              pattern(sizes[i], static_cast<unsigned>(i)));
    // The mapping cannot be made writable either.
    errno = 0;
    EXPECT_NE(::mprotect(const_cast<void*>(m.address()), sizes[i], PROT_READ | PROT_WRITE), 0);
    EXPECT_EQ(errno, EACCES) << std::strerror(errno);
  }
  // The mappings outlive the server's slab.
  auto again = slab->export_segments();
  ASSERT_TRUE(again.ok());
  auto mapped = import_host_segment(std::move((*again)[1].fd), sizes[1]);
  ASSERT_TRUE(mapped.ok());
  slab.reset();
  EXPECT_EQ(std::string(static_cast<const char*>((*mapped)->address()), sizes[1]),
            pattern(sizes[1], 1));
}

TEST(HostBackend, ClientWriteThroughTheMappingCrashes) {
  auto backend = make_host_backend();
  auto slab = filled_slab(*backend, {page()});
  ASSERT_TRUE(slab);
  auto exports = slab->export_segments();
  ASSERT_TRUE(exports.ok());
  auto mapped = import_host_segment(std::move((*exports)[0].fd), page());
  ASSERT_TRUE(mapped.ok()) << mapped.error().to_string();
  auto* target = static_cast<volatile char*>(const_cast<void*>((*mapped)->address()));
  char before = target[10];

  pid_t pid = ::fork();
  ASSERT_GE(pid, 0) << std::strerror(errno);
  if (pid == 0) {
    // The default action, not a sanitizer's handler: the child must die of the signal.
    struct sigaction dfl {};
    dfl.sa_handler = SIG_DFL;
    ::sigaction(SIGSEGV, &dfl, nullptr);
    ::sigaction(SIGBUS, &dfl, nullptr);
    target[10] = static_cast<char>(before + 1);
    ::_exit(0);  // reached only if the write went through
  }
  int status = 0;
  ASSERT_EQ(::waitpid(pid, &status, 0), pid);
  ASSERT_TRUE(WIFSIGNALED(status)) << "child exited with " << WEXITSTATUS(status);
  EXPECT_EQ(WTERMSIG(status), SIGSEGV);
  EXPECT_EQ(target[10], before);
}

TEST(HostBackend, ImportRefusesAnUnsealedMemfd) {
  UniqueFd fd = unsealed_memfd(page());
  auto mapped = import_host_segment(std::move(fd), page());
  ASSERT_FALSE(mapped.ok());
  EXPECT_EQ(mapped.error().code, StatusCode::kProtocolError);

  // Sealed against growth only: the server could still write or shrink it.
  UniqueFd partly = unsealed_memfd(page());
  ASSERT_EQ(::fcntl(partly.get(), F_ADD_SEALS, F_SEAL_GROW), 0);
  auto r2 = import_host_segment(std::move(partly), page());
  ASSERT_FALSE(r2.ok());
  EXPECT_EQ(r2.error().code, StatusCode::kProtocolError);

  // A memfd that cannot be sealed at all.
  UniqueFd unsealable = unsealed_memfd(page(), MFD_CLOEXEC);
  auto r3 = import_host_segment(std::move(unsealable), page());
  ASSERT_FALSE(r3.ok());
  EXPECT_EQ(r3.error().code, StatusCode::kProtocolError);
}

TEST(HostBackend, ImportRefusesFdsThatAreNotMemfds) {
  char path[] = "/tmp/companion_host_backend_XXXXXX";
  UniqueFd file(::mkstemp(path));
  ASSERT_TRUE(file.valid());
  ::unlink(path);
  ASSERT_EQ(::ftruncate(file.get(), static_cast<off_t>(page())), 0);
  auto r = import_host_segment(std::move(file), page());
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code, StatusCode::kProtocolError);

  int pipe_fds[2];
  ASSERT_EQ(::pipe(pipe_fds), 0);
  UniqueFd read_end(pipe_fds[0]);
  UniqueFd write_end(pipe_fds[1]);
  auto r2 = import_host_segment(std::move(read_end), page());
  ASSERT_FALSE(r2.ok());
  EXPECT_EQ(r2.error().code, StatusCode::kProtocolError);

  auto r3 = import_host_segment(UniqueFd(), page());
  ASSERT_FALSE(r3.ok());
  EXPECT_EQ(r3.error().code, StatusCode::kProtocolError);
}

TEST(HostBackend, ImportRefusesASizeMismatch) {
  auto backend = make_host_backend();
  auto slab = filled_slab(*backend, {2 * page()});
  ASSERT_TRUE(slab);
  for (uint64_t wrong : {page(), 3 * page(), uint64_t{0}, 2 * page() + 1}) {
    auto exports = slab->export_segments();
    ASSERT_TRUE(exports.ok());
    auto mapped = import_host_segment(std::move((*exports)[0].fd), wrong);
    ASSERT_FALSE(mapped.ok()) << wrong;
    EXPECT_EQ(mapped.error().code, StatusCode::kProtocolError) << wrong;
  }
  // Through the generic importer too.
  auto exports = slab->export_segments();
  ASSERT_TRUE(exports.ok());
  (*exports)[0].size = 4 * page();
  auto mapped = import_segment(std::move((*exports)[0]), ImportTarget{});
  ASSERT_FALSE(mapped.ok());
  EXPECT_EQ(mapped.error().code, StatusCode::kProtocolError);
}

TEST(HostBackend, ManySlabsAreIndependent) {
  auto backend = make_host_backend();
  auto a = filled_slab(*backend, {page()});
  auto b = backend->allocate({page()}, "b");
  ASSERT_TRUE(a);
  ASSERT_TRUE(b.ok());
  std::string bytes(page(), 'b');
  ASSERT_TRUE((*b)->write(0, 0, bytes.data(), bytes.size()).ok());
  ASSERT_TRUE((*b)->seal().ok());
  auto ea = a->export_segments();
  auto eb = (*b)->export_segments();
  ASSERT_TRUE(ea.ok() && eb.ok());
  auto ma = import_host_segment(std::move((*ea)[0].fd), page());
  auto mb = import_host_segment(std::move((*eb)[0].fd), page());
  ASSERT_TRUE(ma.ok() && mb.ok());
  EXPECT_EQ(std::string(static_cast<const char*>((*ma)->address()), page()), pattern(page(), 0));
  EXPECT_EQ(std::string(static_cast<const char*>((*mb)->address()), page()), bytes);
}

// Descriptors of this process open on a memfd of the host backend.
int open_slab_memfds() {
  int count = 0;
  for (const auto& entry : std::filesystem::directory_iterator("/proc/self/fd")) {
    std::error_code ec;
    auto target = std::filesystem::read_symlink(entry.path(), ec);
    if (!ec && target.string().find("memfd:companion:") != std::string::npos) ++count;
  }
  return count;
}

TEST(HostBackend, AllocationReservesEveryPage) {
  {
    UniqueFd probe = unsealed_memfd(page());
    if (::fallocate(probe.get(), 0, 0, static_cast<off_t>(page())) != 0 && errno == EOPNOTSUPP)
      GTEST_SKIP() << "no fallocate for memfds here: pages are taken as written";
  }
  auto backend = make_host_backend();
  EXPECT_TRUE(backend->allocation_is_resident());
  const std::vector<uint64_t> sizes = {64 * page(), 3 * page()};
  auto slab = backend->allocate(sizes, "reserved");
  ASSERT_TRUE(slab.ok()) << slab.error().to_string();
  auto exported = (*slab)->export_writable();
  ASSERT_TRUE(exported.ok()) << exported.error().to_string();
  for (size_t i = 0; i < sizes.size(); ++i) {
    struct stat st {};
    ASSERT_EQ(::fstat((*exported)[i].fd.get(), &st), 0);
    // The pages are there before anything is written: a shortage cannot come later.
    EXPECT_GE(static_cast<uint64_t>(st.st_blocks) * 512, sizes[i]) << "segment " << i;
  }
}

TEST(HostBackend, SlabPastRamAndSwapIsRefusedAtOnceAndLeavesNothing) {
  auto backend = make_host_backend();
  struct sysinfo info {};
  ASSERT_EQ(::sysinfo(&info), 0);
  const uint64_t unit = info.mem_unit == 0 ? 1 : info.mem_unit;
  // Twice RAM + swap, in segments of at most max_segment_bytes(): nothing is written.
  uint64_t wanted = 2 * (static_cast<uint64_t>(info.totalram) + info.totalswap) * unit;
  std::vector<uint64_t> sizes;
  while (wanted > 0) {
    uint64_t size = std::min(wanted, backend->max_segment_bytes());
    size -= size % page();
    if (size == 0) break;
    sizes.push_back(size);
    wanted -= std::min(wanted, size);
  }
  const int memfds_before = open_slab_memfds();
  auto slab = backend->allocate(sizes, "too-big");
  ASSERT_FALSE(slab.ok());
  EXPECT_EQ(slab.error().code, StatusCode::kOutOfMemory);
  EXPECT_NE(slab.error().message.find("MemAvailable"), std::string::npos) << slab.error().message;
  EXPECT_NE(slab.error().message.find("RAM"), std::string::npos) << slab.error().message;
  EXPECT_EQ(open_slab_memfds(), memfds_before);
  // The backend goes on allocating.
  EXPECT_TRUE(backend->allocate({page()}, "after").ok());
}

}  // namespace
}  // namespace companion::memory
