#include "capi/view_plan.hpp"

#include <algorithm>
#include <tuple>

#include "companion/types.hpp"

namespace companion::capi {
namespace {

constexpr size_t kMaxInterleaved = 8;

bool viewable(const PlanRecord& r, size_t segments) {
  if (r.dtype < 0 || r.dtype >= kDTypeCount || r.nbytes == 0 || r.segment >= segments ||
      r.strides.size() != r.shape.size())
    return false;
  return std::none_of(r.shape.begin(), r.shape.end(), [](int64_t s) { return s <= 0; });
}

uint64_t mix(uint64_t h, uint64_t v) {
  h ^= v + 0x9E3779B97F4A7C15ull + (h << 6) + (h >> 2);
  return h * 0xBF58476D1CE4E5B9ull;
}

bool same_group(const PlanRecord& a, const PlanRecord& b) {
  uint64_t size = dtype_size(static_cast<DType>(a.dtype));
  return a.segment == b.segment && a.dtype == b.dtype && a.offset % size == b.offset % size &&
         std::equal(a.shape.begin(), a.shape.end(), b.shape.begin(), b.shape.end()) &&
         std::equal(a.strides.begin(), a.strides.end(), b.strides.begin(), b.strides.end());
}

// A strict order on groups for the rare case of two groups hashed alike.
bool group_less(const PlanRecord& a, const PlanRecord& b) {
  uint64_t sa = dtype_size(static_cast<DType>(a.dtype));
  uint64_t sb = dtype_size(static_cast<DType>(b.dtype));
  auto key = [](const PlanRecord& r, uint64_t size) {
    return std::make_tuple(r.segment, r.dtype, r.offset % size, r.shape.size());
  };
  if (key(a, sa) != key(b, sb)) return key(a, sa) < key(b, sb);
  if (!std::equal(a.shape.begin(), a.shape.end(), b.shape.begin(), b.shape.end()))
    return std::lexicographical_compare(a.shape.begin(), a.shape.end(), b.shape.begin(),
                                        b.shape.end());
  return std::lexicographical_compare(a.strides.begin(), a.strides.end(), b.strides.begin(),
                                      b.strides.end());
}

// Appends the runs of one group: `rows` sorted by offset (ties in table order).
void plan_group(std::span<const PlanRecord> records, std::span<const uint32_t> rows,
                ViewPlan& plan) {
  auto offset = [&](size_t k) { return records[rows[k]].offset; };
  size_t count = rows.size();
  auto emit = [&](size_t start, size_t stride, size_t n, uint64_t step) {
    ViewRun run;
    run.first = static_cast<uint32_t>(plan.rows.size());
    run.count = static_cast<uint32_t>(n);
    run.step = step;
    for (size_t k = 0; k < n; ++k) plan.rows.push_back(rows[start + k * stride]);
    plan.runs.push_back(run);
  };
  // Interleaved progressions: every `ways`-th offset from each start steps evenly (and not by
  // 0, which would be offsets shared by several tensors: those go through the runs below).
  for (size_t ways = 1; ways <= std::min(kMaxInterleaved, count / 2); ++ways) {
    bool even = true;
    for (size_t start = 0; start < ways && even; ++start) {
      if (start + ways >= count) continue;  // one tensor: a run of one
      uint64_t step = offset(start + ways) - offset(start);
      if (step == 0) even = false;
      for (size_t k = start + ways; even && k + ways < count; k += ways)
        even = offset(k + ways) - offset(k) == step;
    }
    if (!even) continue;
    for (size_t start = 0; start < ways; ++start) {
      size_t n = (count - start + ways - 1) / ways;
      emit(start, ways, n, n > 1 ? offset(start + ways) - offset(start) : 0);
    }
    return;
  }
  for (size_t k = 0; k < count;) {
    size_t j = k + 1;
    uint64_t step = 0;
    if (j < count) {
      step = offset(j) - offset(k);
      while (j + 1 < count && offset(j + 1) - offset(j) == step) ++j;
      ++j;
    }
    emit(k, 1, j - k, j - k > 1 ? step : 0);
    k = j;
  }
}

}  // namespace

// What a run's tensors share, hashed: segment, dtype, residue, shape and strides.
uint64_t group_hash(const PlanRecord& r) {
  uint64_t size = dtype_size(static_cast<DType>(r.dtype));
  uint64_t h =
      mix(mix(mix(r.segment, static_cast<uint64_t>(r.dtype)), r.offset % size), r.shape.size());
  for (int64_t s : r.shape) h = mix(h, static_cast<uint64_t>(s));
  for (int64_t s : r.strides) h = mix(h, static_cast<uint64_t>(s));
  return h;
}

ViewPlan plan_views(std::span<const PlanRecord> records, size_t segments, GroupHash hash) {
  ViewPlan plan;
  plan.segment_ends.assign(segments, 0);
  std::vector<uint32_t> order;
  std::vector<uint32_t> left;
  std::vector<uint64_t> hashes(records.size());
  order.reserve(records.size());
  for (size_t i = 0; i < records.size(); ++i) {
    const auto& r = records[i];
    if (!viewable(r, segments)) {
      left.push_back(static_cast<uint32_t>(i));
      continue;
    }
    order.push_back(static_cast<uint32_t>(i));
    hashes[i] = hash(r);
    plan.segment_ends[r.segment] = std::max(plan.segment_ends[r.segment], r.offset + r.nbytes);
  }
  // By group (its hash), then offset, then row: one sort of cheap keys.
  auto by_hash = [&](uint32_t a, uint32_t b) {
    if (hashes[a] != hashes[b]) return hashes[a] < hashes[b];
    if (records[a].offset != records[b].offset) return records[a].offset < records[b].offset;
    return a < b;
  };
  std::sort(order.begin(), order.end(), by_hash);
  bool collided = false;
  for (size_t k = 1; k < order.size() && !collided; ++k)
    collided = hashes[order[k]] == hashes[order[k - 1]] &&
               !same_group(records[order[k]], records[order[k - 1]]);
  if (collided) {  // two groups hashed alike: order by the groups themselves
    std::sort(order.begin(), order.end(), [&](uint32_t a, uint32_t b) {
      if (group_less(records[a], records[b])) return true;
      if (group_less(records[b], records[a])) return false;
      if (records[a].offset != records[b].offset) return records[a].offset < records[b].offset;
      return a < b;
    });
  }
  plan.rows.reserve(records.size());
  for (size_t k = 0; k < order.size();) {
    size_t j = k + 1;
    while (j < order.size() && same_group(records[order[k]], records[order[j]])) ++j;
    plan_group(records, std::span<const uint32_t>(order).subspan(k, j - k), plan);
    k = j;
  }
  plan.planned = plan.rows.size();
  plan.rows.insert(plan.rows.end(), left.begin(), left.end());
  return plan;
}

}  // namespace companion::capi
