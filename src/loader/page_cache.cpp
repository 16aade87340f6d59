#include "loader/page_cache.hpp"

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <vector>

#include "companion/result.hpp"

namespace companion::loader {

namespace {
constexpr uint64_t kWindowPages = 64;  // one mincore call covers a window
}

Result<PageCacheSample> sample_page_cache(int fd, uint64_t size, uint64_t max_pages) {
  PageCacheSample sample;
  if (size == 0) return sample;
  const uint64_t page = static_cast<uint64_t>(::sysconf(_SC_PAGESIZE));
  const uint64_t pages = (size + page - 1) / page;
  void* base = ::mmap(nullptr, size, PROT_READ, MAP_SHARED, fd, 0);
  if (base == MAP_FAILED) return errno_error(StatusCode::kIoError, "mmap for mincore", errno);
  const uint64_t windows =
      std::max<uint64_t>(1, std::min(pages, std::max<uint64_t>(max_pages, 1)) / kWindowPages);
  const uint64_t stride = pages / windows;  // >= kWindowPages when there is more than one
  std::vector<unsigned char> resident(kWindowPages);
  int error = 0;
  for (uint64_t w = 0; w < windows && error == 0; ++w) {
    const uint64_t first = w * stride;
    const uint64_t count = std::min(kWindowPages, pages - first);
    auto* start = static_cast<unsigned char*>(base) + first * page;
    if (::mincore(start, count * page, resident.data()) != 0) {
      error = errno;
      break;
    }
    sample.pages_sampled += count;
    for (uint64_t i = 0; i < count; ++i) sample.pages_resident += resident[i] & 1;
  }
  ::munmap(base, size);
  if (error != 0) return errno_error(StatusCode::kIoError, "mincore", error);
  return sample;
}

}  // namespace companion::loader
