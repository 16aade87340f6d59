#include "memory/host_checksum.hpp"

#include <algorithm>
#include <cstring>
#include <thread>
#include <vector>

#include "common/checksum.hpp"

namespace companion::memory {
namespace {

constexpr size_t kLanes = 16;  // 32-bit words per step, one 64-bit accumulator pair per lane

// Sums of the words of data[0, words): s = sum w[i], and the weighted sum as if the block began at
// word 0: sum w[i] * (2i + 1). Lane l takes the words i = kLanes*q + l; per lane, a running sum a
// and a sum of running sums b give sum q*w = (n-1)*a - b without multiplications in the loop.
struct BlockSums {
  uint64_t s = 0;
  uint64_t weighted = 0;
};

BlockSums block_sums(const uint8_t* p, size_t words) noexcept {
  const size_t steps = words / kLanes;
  uint64_t a[kLanes] = {};
  uint64_t b[kLanes] = {};
  for (size_t q = 0; q < steps; ++q) {
    uint32_t w[kLanes];
    std::memcpy(w, p + q * kLanes * 4, sizeof(w));
    for (size_t l = 0; l < kLanes; ++l) {
      b[l] += a[l];
      a[l] += w[l];
    }
  }
  BlockSums out;
  // Word kLanes*q + l has weight 2*kLanes*q + 2l + 1.
  for (size_t l = 0; l < kLanes; ++l) {
    const uint64_t sum_qw = steps == 0 ? 0 : (steps - 1) * a[l] - b[l];
    out.s += a[l];
    out.weighted += 2 * kLanes * sum_qw + (2 * l + 1) * a[l];
  }
  for (size_t i = steps * kLanes; i < words; ++i) {
    uint32_t w = 0;
    std::memcpy(&w, p + 4 * i, 4);
    out.s += w;
    out.weighted += uint64_t{w} * (2 * uint64_t{i} + 1);
  }
  return out;
}

// Weighted sum of words [first, first + count): the block's own sums shifted by 2*first*s.
uint64_t range_wsum(const uint8_t* base, size_t first, size_t count) noexcept {
  BlockSums sums = block_sums(base + 4 * first, count);
  return sums.weighted + 2 * uint64_t{first} * sums.s;
}

}  // namespace

uint64_t host_wsum64(const void* data, size_t size, unsigned threads) noexcept {
  const auto* p = static_cast<const uint8_t*>(data);
  const size_t words = size / 4;
  constexpr size_t kPerThread = size_t{64} << 20;  // bytes worth a thread of their own
  if (threads == 0) {
    const unsigned hw = std::max(1u, std::thread::hardware_concurrency());
    threads = static_cast<unsigned>(std::min<size_t>({hw, 16, size / kPerThread + 1}));
  }
  uint64_t sum = 0;
  if (threads <= 1 || words < kLanes * threads) {
    sum = range_wsum(p, 0, words);
  } else {
    std::vector<uint64_t> parts(threads, 0);
    std::vector<std::thread> pool;
    // Ranges of whole lane steps; the last takes what is left.
    const size_t per = ((words + threads - 1) / threads + kLanes - 1) / kLanes * kLanes;
    auto count_of = [&](unsigned t, size_t first) {
      return t + 1 == threads ? words - first : std::min(words - first, per);
    };
    try {
      pool.reserve(threads);
      for (unsigned t = 1; t < threads; ++t) {
        const size_t first = std::min(words, per * t);
        const size_t count = count_of(t, first);
        pool.emplace_back([&parts, p, t, first, count] { parts[t] = range_wsum(p, first, count); });
      }
    } catch (...) {  // no thread: the rest on this one
      for (unsigned t = static_cast<unsigned>(pool.size()) + 1; t < threads; ++t) {
        const size_t first = std::min(words, per * t);
        parts[t] = range_wsum(p, first, count_of(t, first));
      }
    }
    parts[0] = range_wsum(p, 0, count_of(0, 0));
    for (auto& th : pool) th.join();
    for (uint64_t part : parts) sum += part;
  }
  if (size % 4 != 0) {
    uint32_t w = 0;
    std::memcpy(&w, p + 4 * words, size % 4);
    sum += uint64_t{w} * (2 * uint64_t{words} + 1);
  }
  return sum;
}

}  // namespace companion::memory
