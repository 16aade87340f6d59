// F16/BF16/F32 conversions, bit-exact with torch's scalar CPU casts (c10::Half, c10::BFloat16).
#include "checkpoint/dtype_convert.hpp"

#include <bit>
#include <cstdint>
#include <cstring>
#include <string>

namespace companion::checkpoint {
namespace {

static_assert(std::endian::native == std::endian::little,
              "checkpoint bytes are little-endian and converted in place of host words");

constexpr uint32_t kF32AbsMask = 0x7fffffffu;
constexpr uint32_t kF32Inf = 0x7f800000u;
constexpr uint32_t kF32QuietBit = 0x00400000u;
constexpr uint16_t kF16Inf = 0x7c00u;
constexpr uint16_t kF16QuietNan = 0x7e00u;
constexpr uint16_t kBF16QuietNan = 0x7fc0u;

// c10::BFloat16 rounds to nearest even and turns every NaN into 0x7fc0, sign dropped. (torch's
// AVX2/AVX-512 kernels give 0xffff instead; the scalar result is the portable one.)
inline uint16_t f32_to_bf16(uint32_t bits) {
  auto rounded = static_cast<uint16_t>((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
  return (bits & kF32AbsMask) > kF32Inf ? kBF16QuietNan : rounded;
}

inline uint32_t bf16_to_f32(uint16_t bits) {
  return static_cast<uint32_t>(bits) << 16;
}

// Round to nearest even; NaN becomes 0x7e00 with its sign kept, as c10::Half does.
inline uint16_t f32_to_f16(uint32_t bits) {
  auto sign = static_cast<uint16_t>((bits >> 16) & 0x8000u);
  uint32_t abs = bits & kF32AbsMask;
  if (abs > kF32Inf) return sign | kF16QuietNan;
  // 65520 is halfway between the largest half (65504) and 65536: it and above round to inf.
  if (abs >= 0x477ff000u) return sign | kF16Inf;
  if (abs >= 0x38800000u) {  // normal half: rebias the exponent (127 -> 15), round off 13 bits
    uint32_t rebiased = abs - 0x38000000u;
    return sign | static_cast<uint16_t>((rebiased + 0xfffu + ((rebiased >> 13) & 1u)) >> 13);
  }
  // Subnormal half (or zero): the result counts units of 2^-24. At most 2^-25 (half a unit,
  // ties to even) gives zero.
  if (abs <= 0x33000000u) return sign;
  uint32_t exponent = abs >> 23;  // 102..112 here
  uint32_t mantissa = (abs & 0x7fffffu) | 0x800000u;
  uint32_t shift = 126 - exponent;  // 14..24
  uint32_t result = mantissa >> shift;
  uint32_t rest = mantissa & ((1u << shift) - 1);
  uint32_t half = 1u << (shift - 1);
  if (rest > half || (rest == half && (result & 1u))) ++result;  // may carry into the normals
  return sign | static_cast<uint16_t>(result);
}

// Exact; NaN payloads are kept and made quiet, as c10::Half does.
inline uint32_t f16_to_f32(uint16_t bits) {
  uint32_t sign = static_cast<uint32_t>(bits & 0x8000u) << 16;
  uint32_t exponent = (bits >> 10) & 0x1fu;
  uint32_t mantissa = bits & 0x3ffu;
  if (exponent == 0x1f) return sign | kF32Inf | (mantissa << 13) | (mantissa ? kF32QuietBit : 0);
  if (exponent != 0) return sign | ((exponent + 112) << 23) | (mantissa << 13);
  if (mantissa == 0) return sign;
  // Subnormal half: mantissa * 2^-24 with the leading one at bit `top` becomes a normal float.
  auto top = static_cast<uint32_t>(31 - std::countl_zero(mantissa));
  return sign | ((top + 103) << 23) | ((mantissa << (23 - top)) & 0x7fffffu);
}

template <typename From, typename To, To (*Convert)(From)>
void convert_loop(const void* src, void* dst, size_t count) {
  const auto* in = static_cast<const unsigned char*>(src);
  auto* out = static_cast<unsigned char*>(dst);
  // memcpy per element: checkpoint buffers need not be aligned for From or To.
  for (size_t i = 0; i < count; ++i) {
    From value;
    std::memcpy(&value, in + i * sizeof(From), sizeof(From));
    To converted = Convert(value);
    std::memcpy(out + i * sizeof(To), &converted, sizeof(To));
  }
}

inline uint16_t f16_to_bf16(uint16_t bits) {
  return f32_to_bf16(f16_to_f32(bits));
}
// bf16 -> f32 is exact, so this rounds once.
inline uint16_t bf16_to_f16(uint16_t bits) {
  return f32_to_f16(bf16_to_f32(bits));
}

}  // namespace

Result<void> convert_elements(DType from, DType to, const void* src, void* dst, size_t count) {
  if (!dtype_is_float_convertible(from) || !dtype_is_float_convertible(to))
    return make_error(StatusCode::kUnknownDtype, std::string("cannot convert ") + dtype_name(from) +
                                                     " to " + dtype_name(to) +
                                                     ": only F16, BF16 and F32 convert");
  if (count == 0) return ok_result();
  if (from == to) {
    std::memcpy(dst, src, count * dtype_size(from));
    return ok_result();
  }
  if (from == DType::kF32 && to == DType::kBF16)
    convert_loop<uint32_t, uint16_t, f32_to_bf16>(src, dst, count);
  else if (from == DType::kF32 && to == DType::kF16)
    convert_loop<uint32_t, uint16_t, f32_to_f16>(src, dst, count);
  else if (from == DType::kBF16 && to == DType::kF32)
    convert_loop<uint16_t, uint32_t, bf16_to_f32>(src, dst, count);
  else if (from == DType::kF16 && to == DType::kF32)
    convert_loop<uint16_t, uint32_t, f16_to_f32>(src, dst, count);
  else if (from == DType::kF16 && to == DType::kBF16)
    convert_loop<uint16_t, uint16_t, f16_to_bf16>(src, dst, count);
  else
    convert_loop<uint16_t, uint16_t, bf16_to_f16>(src, dst, count);
  return ok_result();
}

}  // namespace companion::checkpoint
