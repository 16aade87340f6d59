// sample_page_cache: what `--direct-io auto` decides from.
#include "loader/page_cache.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <string>

#include <gtest/gtest.h>

#include "common/unique_fd.hpp"
#include "test_support.hpp"

namespace companion::loader {
namespace {

constexpr uint64_t kMiB = 1ull << 20;

TEST(PageCache, AFileJustWrittenIsResidentAndAnEvictedOneIsNot) {
  testing::TempDir dir;
  std::string path = dir / "data";
  testing::write_file(path, std::string(16 * kMiB, 'x'));
  UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  ASSERT_TRUE(fd);
  auto warm = sample_page_cache(fd.get(), 16 * kMiB);
  ASSERT_TRUE(warm.ok()) << warm.error().to_string();
  EXPECT_GT(warm->pages_sampled, 0u);
  EXPECT_LE(warm->pages_sampled, 4096u);
  EXPECT_GE(warm->fraction(), kCachedFraction);

  ASSERT_EQ(::fdatasync(fd.get()), 0);
  ASSERT_EQ(::posix_fadvise(fd.get(), 0, 0, POSIX_FADV_DONTNEED), 0);
  auto cold = sample_page_cache(fd.get(), 16 * kMiB);
  ASSERT_TRUE(cold.ok());
  if (cold->fraction() >= kCachedFraction) GTEST_SKIP() << "this filesystem keeps the pages";
  EXPECT_LT(cold->fraction(), 0.1);

  char buffer[4096];
  for (uint64_t at = 0; at < 16 * kMiB; at += sizeof(buffer)) {
    ASSERT_EQ(::pread(fd.get(), buffer, sizeof(buffer), static_cast<off_t>(at)),
              static_cast<ssize_t>(sizeof(buffer)));
  }
  auto again = sample_page_cache(fd.get(), 16 * kMiB);
  ASSERT_TRUE(again.ok());
  EXPECT_GE(again->fraction(), kCachedFraction);
}

TEST(PageCache, LargeSparseAndEmptyFiles) {
  testing::TempDir dir;
  std::string path = dir / "sparse";
  UniqueFd fd(::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0600));
  ASSERT_TRUE(fd);
  auto empty = sample_page_cache(fd.get(), 0);
  ASSERT_TRUE(empty.ok());
  EXPECT_EQ(empty->pages_sampled, 0u);
  EXPECT_EQ(empty->fraction(), 0.0);
  // 64 GiB of holes: sampled in bounded time and memory, nothing resident.
  ASSERT_EQ(::ftruncate(fd.get(), static_cast<off_t>(64ull << 30)), 0);
  auto sparse = sample_page_cache(fd.get(), 64ull << 30);
  ASSERT_TRUE(sparse.ok()) << sparse.error().to_string();
  EXPECT_GT(sparse->pages_sampled, 1000u);
  EXPECT_LE(sparse->pages_sampled, 4096u);
  EXPECT_EQ(sparse->pages_resident, 0u);
  // An odd size: the last window ends at the file's last page.
  ASSERT_EQ(::ftruncate(fd.get(), 12345), 0);
  auto odd = sample_page_cache(fd.get(), 12345);
  ASSERT_TRUE(odd.ok());
  EXPECT_EQ(odd->pages_sampled, (12345 + ::sysconf(_SC_PAGESIZE) - 1) / ::sysconf(_SC_PAGESIZE));
}

TEST(PageCache, ABadDescriptorIsAnError) {
  auto r = sample_page_cache(-1, 4096);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code, StatusCode::kIoError);
}

}  // namespace
}  // namespace companion::loader
