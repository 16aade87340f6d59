#pragma once

#include <cstdint>

#include "companion/result.hpp"

namespace companion::loader {

// How much of a file the page cache holds, estimated from a sample of its pages (mincore(2) on a
// read-only mapping, which reads nothing). `--direct-io auto` reads a mostly cached file through
// the cache (tens of GB/s) and the others with O_DIRECT (the disk's best, without the cache's
// copy).
struct PageCacheSample {
  uint64_t pages_sampled = 0;
  uint64_t pages_resident = 0;
  double fraction() const {
    return pages_sampled ? static_cast<double>(pages_resident) / pages_sampled : 0.0;
  }
};

// At most about `max_pages` pages, in evenly spaced windows over the file. An empty file gives
// an empty sample.
Result<PageCacheSample> sample_page_cache(int fd, uint64_t size, uint64_t max_pages = 4096);

// The share of sampled pages that must be resident for `auto` to read through the cache.
inline constexpr double kCachedFraction = 0.5;

}  // namespace companion::loader
