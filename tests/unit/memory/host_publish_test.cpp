// Publishing on the host backend: the server hands one writer client a writable memfd, the writer
// fills it and drops its writable mapping, the server digests and seals it, and readers map it
// read-only. The seal must wait for every writable mapping to be gone.
#include <fcntl.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "common/checksum.hpp"
#include "memory/backend.hpp"
#include "memory/host_backend.hpp"
#include "memory/host_checksum.hpp"

namespace companion::memory {
namespace {

uint64_t page() {
  return static_cast<uint64_t>(::sysconf(_SC_PAGESIZE));
}

std::string pattern(uint64_t size, unsigned seed) {
  std::string out(size, '\0');
  for (uint64_t i = 0; i < size; ++i)
    out[i] = static_cast<char>((i * 167 + seed * 13 + i / 509) & 0xFF);
  return out;
}

// True when a write to p faults (checked in a forked child, which dies of SIGSEGV).
bool write_faults(const void* p) {
  auto* target = static_cast<volatile char*>(const_cast<void*>(p));
  const char before = target[0];
  pid_t pid = ::fork();
  if (pid < 0) return false;
  if (pid == 0) {
    struct sigaction dfl {};
    dfl.sa_handler = SIG_DFL;
    ::sigaction(SIGSEGV, &dfl, nullptr);
    ::sigaction(SIGBUS, &dfl, nullptr);
    target[0] = static_cast<char>(before + 1);
    ::_exit(0);
  }
  int status = 0;
  if (::waitpid(pid, &status, 0) != pid) return false;
  return WIFSIGNALED(status) && WTERMSIG(status) == SIGSEGV && target[0] == before;
}

std::unique_ptr<MappedSegment> import_writable(Slab& slab, size_t segment) {
  auto exports = slab.export_writable();
  EXPECT_TRUE(exports.ok()) << exports.error().to_string();
  if (!exports.ok()) return nullptr;
  EXPECT_EQ(exports->size(), slab.segment_count());
  auto mapped = import_segment(std::move((*exports)[segment]), ImportTarget{}, Access::kReadWrite);
  EXPECT_TRUE(mapped.ok()) << mapped.error().to_string();
  if (!mapped.ok()) return nullptr;
  return std::move(mapped).value();
}

TEST(HostPublish, WriterFillsThenDropsWriteAccessThenSealSucceeds) {
  auto backend = make_host_backend();
  const uint64_t size = 3 * page();
  auto allocated = backend->allocate({size}, "publish");
  ASSERT_TRUE(allocated.ok());
  Slab& slab = **allocated;

  auto writer = import_writable(slab, 0);
  ASSERT_TRUE(writer);
  EXPECT_TRUE(writer->writable());
  EXPECT_FALSE(writer->on_device());
  EXPECT_EQ(writer->size(), size);
  const std::string bytes = pattern(size, 1);
  std::memcpy(const_cast<void*>(writer->address()), bytes.data(), size);

  // The digest sees the writer's bytes before the seal.
  auto before = slab.digest(0);
  ASSERT_TRUE(before.ok()) << before.error().to_string();
  EXPECT_EQ(*before, wsum64(bytes.data(), size));

  // Still mapped writable: the seal is refused, the slab stays unsealed.
  auto refused = slab.seal();
  ASSERT_FALSE(refused.ok());
  EXPECT_EQ(refused.error().code, StatusCode::kModelInUse) << refused.error().to_string();
  auto not_yet = slab.export_segments();
  ASSERT_FALSE(not_yet.ok());
  EXPECT_EQ(not_yet.error().code, StatusCode::kNotReady);
  EXPECT_FALSE(slab.seal().ok());  // and again

  // Write access dropped in place: same address, same bytes, writes fault.
  const void* address = writer->address();
  ASSERT_TRUE(writer->make_read_only().ok());
  EXPECT_FALSE(writer->writable());
  EXPECT_EQ(writer->address(), address);
  EXPECT_EQ(std::string(static_cast<const char*>(writer->address()), size), bytes);
  EXPECT_TRUE(write_faults(writer->address()));
  errno = 0;
  EXPECT_NE(::mprotect(const_cast<void*>(writer->address()), size, PROT_READ | PROT_WRITE), 0);
  EXPECT_EQ(errno, EACCES) << std::strerror(errno);
  EXPECT_TRUE(writer->make_read_only().ok());  // again: nothing to do

  auto sealed = slab.seal();
  ASSERT_TRUE(sealed.ok()) << sealed.error().to_string();

  auto digest = slab.digest(0);
  ASSERT_TRUE(digest.ok()) << digest.error().to_string();
  EXPECT_EQ(*digest, wsum64(bytes.data(), size));
  auto out_of_range = slab.digest(1);
  ASSERT_FALSE(out_of_range.ok());
  EXPECT_EQ(out_of_range.error().code, StatusCode::kInvalidArgument);

  // Readers see the bytes through read-only mappings.
  auto exports = slab.export_segments();
  ASSERT_TRUE(exports.ok()) << exports.error().to_string();
  auto reader = import_segment(std::move((*exports)[0]), ImportTarget{});
  ASSERT_TRUE(reader.ok()) << reader.error().to_string();
  EXPECT_FALSE((*reader)->writable());
  EXPECT_TRUE((*reader)->make_read_only().ok());
  EXPECT_EQ(std::string(static_cast<const char*>((*reader)->address()), size), bytes);
  EXPECT_TRUE(write_faults((*reader)->address()));
  errno = 0;
  EXPECT_NE(::mprotect(const_cast<void*>((*reader)->address()), size, PROT_READ | PROT_WRITE), 0);
  EXPECT_EQ(errno, EACCES) << std::strerror(errno);
  // The writer's old mapping reads the same bytes still.
  EXPECT_EQ(std::string(static_cast<const char*>(writer->address()), size), bytes);

  // No more writers once sealed.
  auto late = slab.export_writable();
  ASSERT_FALSE(late.ok());
  EXPECT_EQ(late.error().code, StatusCode::kInvalidArgument);
}

TEST(HostPublish, SealWaitsForAWriterThatNeverRemaps) {
  auto backend = make_host_backend();
  auto allocated = backend->allocate({page(), 2 * page()}, "unmapped");
  ASSERT_TRUE(allocated.ok());
  Slab& slab = **allocated;
  auto writer = import_writable(slab, 1);
  ASSERT_TRUE(writer);
  const std::string bytes = pattern(2 * page(), 2);
  std::memcpy(const_cast<void*>(writer->address()), bytes.data(), bytes.size());
  for (int attempt = 0; attempt < 3; ++attempt) {
    auto r = slab.seal();
    ASSERT_FALSE(r.ok());
    EXPECT_EQ(r.error().code, StatusCode::kModelInUse);
  }
  writer.reset();  // munmap
  auto sealed = slab.seal();
  ASSERT_TRUE(sealed.ok()) << sealed.error().to_string();
  EXPECT_TRUE(slab.seal().ok());
  auto digest = slab.digest(1);
  ASSERT_TRUE(digest.ok());
  EXPECT_EQ(*digest, wsum64(bytes.data(), bytes.size()));
  auto zeros = slab.digest(0);
  ASSERT_TRUE(zeros.ok());
  EXPECT_EQ(*zeros, 0u);
  auto exports = slab.export_segments();
  ASSERT_TRUE(exports.ok());
  auto reader = import_segment(std::move((*exports)[1]), ImportTarget{});
  ASSERT_TRUE(reader.ok()) << reader.error().to_string();
  EXPECT_EQ(std::string(static_cast<const char*>((*reader)->address()), bytes.size()), bytes);
}

TEST(HostPublish, ServerWritesAfterARefusedSealStillWork) {
  auto backend = make_host_backend();
  auto allocated = backend->allocate({page()}, "retry");
  ASSERT_TRUE(allocated.ok());
  Slab& slab = **allocated;
  auto writer = import_writable(slab, 0);
  ASSERT_TRUE(writer);
  ASSERT_FALSE(slab.seal().ok());
  const std::string bytes = pattern(page(), 3);
  ASSERT_TRUE(slab.write(0, 0, bytes.data(), bytes.size()).ok());
  EXPECT_EQ(std::string(static_cast<const char*>(writer->address()), page()), bytes);
  ASSERT_TRUE(writer->make_read_only().ok());
  ASSERT_TRUE(slab.seal().ok());
  EXPECT_EQ(slab.host_address(0), nullptr);
}

TEST(HostPublish, WritableImportRefusesSealedOrMismatchedSegments) {
  auto backend = make_host_backend();
  auto allocated = backend->allocate({page()}, "refuse");
  ASSERT_TRUE(allocated.ok());
  Slab& slab = **allocated;
  auto writable = slab.export_writable();
  ASSERT_TRUE(writable.ok());
  auto wrong_size =
      import_host_segment(std::move((*writable)[0].fd), 2 * page(), Access::kReadWrite);
  ASSERT_FALSE(wrong_size.ok());
  EXPECT_EQ(wrong_size.error().code, StatusCode::kProtocolError);

  // An fd exported writable cannot resize the memfd (the server relies on its size).
  auto again = slab.export_writable();
  ASSERT_TRUE(again.ok());
  EXPECT_NE(::ftruncate((*again)[0].fd.get(), static_cast<off_t>(2 * page())), 0);
  EXPECT_NE(::ftruncate((*again)[0].fd.get(), 0), 0);

  // Unsealed memfds are refused for readers.
  auto as_reader = import_segment(std::move((*again)[0]), ImportTarget{});
  ASSERT_FALSE(as_reader.ok());
  EXPECT_EQ(as_reader.error().code, StatusCode::kProtocolError);

  ASSERT_TRUE(slab.seal().ok());
  auto exports = slab.export_segments();
  ASSERT_TRUE(exports.ok());
  auto sealed = import_segment(std::move((*exports)[0]), ImportTarget{}, Access::kReadWrite);
  ASSERT_FALSE(sealed.ok());
  EXPECT_EQ(sealed.error().code, StatusCode::kInvalidArgument);
}

TEST(HostPublish, DigestMatchesWsum64) {
  // Sizes around the lane and thread split points, odd tails included.
  std::string bytes = pattern((size_t{1} << 20) + 4096 + 7, 5);
  for (size_t size : {size_t{0}, size_t{1}, size_t{3}, size_t{4}, size_t{5}, size_t{63}, size_t{64},
                      size_t{65}, size_t{127}, size_t{4099}, bytes.size()}) {
    for (unsigned threads : {0u, 1u, 2u, 3u, 7u}) {
      EXPECT_EQ(host_wsum64(bytes.data(), size, threads), wsum64(bytes.data(), size))
          << size << " bytes, " << threads << " threads";
    }
  }
  // Words with all bits set overflow every partial sum.
  std::string ones(100003, '\xff');
  EXPECT_EQ(host_wsum64(ones.data(), ones.size(), 4), wsum64(ones.data(), ones.size()));
}

TEST(HostPublish, DigestThroughput) {
  auto backend = make_host_backend();
  const uint64_t size = uint64_t{256} << 20;
  auto allocated = backend->allocate({size}, "throughput");
  ASSERT_TRUE(allocated.ok());
  Slab& slab = **allocated;
  auto* p = static_cast<uint32_t*>(slab.host_address(0));
  ASSERT_NE(p, nullptr);
  for (uint64_t i = 0; i < size / 4; ++i) p[i] = static_cast<uint32_t>(i * 2654435761u);
  ASSERT_TRUE(slab.seal().ok());

  auto t0 = std::chrono::steady_clock::now();
  auto digest = slab.digest(0);
  const double digest_s =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  ASSERT_TRUE(digest.ok()) << digest.error().to_string();

  // The reference over a private mapping of the same bytes.
  auto exports = slab.export_segments();
  ASSERT_TRUE(exports.ok());
  auto reader = import_segment(std::move((*exports)[0]), ImportTarget{});
  ASSERT_TRUE(reader.ok());
  t0 = std::chrono::steady_clock::now();
  const uint64_t expected = wsum64((*reader)->address(), size);
  const double scalar_s =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  t0 = std::chrono::steady_clock::now();
  const uint64_t fast = host_wsum64((*reader)->address(), size);
  const double fast_s =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  t0 = std::chrono::steady_clock::now();
  const uint64_t one = host_wsum64((*reader)->address(), size, 1);
  const double one_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  EXPECT_EQ(*digest, expected);
  EXPECT_EQ(fast, expected);
  EXPECT_EQ(one, expected);
  const double mb = static_cast<double>(size) / 1e6;
  std::printf(
      "digest of %.0f MB: slab.digest %.0f MB/s (mapping included), host_wsum64 %.0f MB/s, "
      "1 thread %.0f MB/s, scalar wsum64 %.0f MB/s\n",
      mb, mb / digest_s, mb / fast_s, mb / one_s, mb / scalar_s);
}

}  // namespace
}  // namespace companion::memory
