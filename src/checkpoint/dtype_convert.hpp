// Element type conversion between the floating types a model may be cast to.
#pragma once

#include <cstddef>

#include "companion/result.hpp"
#include "companion/types.hpp"

namespace companion::checkpoint {

// Converts `count` elements of `from` at src into `to` at dst (F16, BF16, F32 in any direction;
// from == to copies). Rounding is to nearest, ties to even; NaN stays NaN (quiet), overflow
// becomes infinity, as torch's and numpy's casts do. Other dtypes give kUnknownDtype.
// src and dst must not overlap.
Result<void> convert_elements(DType from, DType to, const void* src, void* dst, size_t count);

}  // namespace companion::checkpoint
