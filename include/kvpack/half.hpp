/// \file half.hpp
/// \brief IEEE fp16 and bfloat16 storage types with exact conversions usable on host and device.
#pragma once

#include <cstdint>
#include <cstring>

#include "config.hpp"

namespace kvpack {

/// \brief IEEE 754 binary16 as raw bits; the library's dense storage type.
struct Half {
  uint16_t bits;
};
/// \brief bfloat16 as raw bits (upper half of an fp32).
struct BFloat16 {
  uint16_t bits;
};
static_assert(sizeof(Half) == 2 && sizeof(BFloat16) == 2, "16-bit storage types");

namespace detail {

KVPACK_HOST_DEVICE uint32_t float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
KVPACK_HOST_DEVICE float bits_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

}  // namespace detail

/// fp16 -> fp32, exact (subnormals, infinities and NaN included).
KVPACK_HOST_DEVICE float to_float(Half h) {
  const uint32_t sign = static_cast<uint32_t>(h.bits & 0x8000u) << 16;
  const uint32_t exp = (h.bits >> 10) & 0x1Fu;
  uint32_t mant = h.bits & 0x3FFu;
  if (exp == 0x1F) return detail::bits_float(sign | 0x7F800000u | (mant << 13));
  if (exp != 0) return detail::bits_float(sign | ((exp + 112u) << 23) | (mant << 13));
  if (mant == 0) return detail::bits_float(sign);
  // Subnormal: normalise the mantissa.
  int e = -1;
  do {
    ++e;
    mant <<= 1;
  } while ((mant & 0x400u) == 0);
  return detail::bits_float(sign | ((112u - e) << 23) | ((mant & 0x3FFu) << 13));
}

/// fp32 -> fp16 with round-to-nearest-even; overflow goes to infinity, NaN stays NaN.
KVPACK_HOST_DEVICE Half to_half(float f) {
  const uint32_t u = detail::float_bits(f);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t abs = u & 0x7FFFFFFFu;
  if (abs >= 0x7F800000u) {  // Inf or NaN
    return Half{static_cast<uint16_t>(sign | 0x7C00u | (abs > 0x7F800000u ? 0x200u : 0u))};
  }
  if (abs >= 0x477FF000u) return Half{static_cast<uint16_t>(sign | 0x7C00u)};  // rounds to Inf
  if (abs < 0x38800000u) {  // result is subnormal or zero: scale into the subnormal grid
    if (abs < 0x33000000u) return Half{sign};  // below half the smallest subnormal
    const uint32_t exp = abs >> 23;
    const uint32_t mant = (abs & 0x7FFFFFu) | 0x800000u;
    const uint32_t shift = 126u - exp;  // 14..24
    uint32_t q = mant >> shift;
    const uint32_t rem = mant & ((1u << shift) - 1u);
    const uint32_t halfway = 1u << (shift - 1u);
    if (rem > halfway || (rem == halfway && (q & 1u))) ++q;
    return Half{static_cast<uint16_t>(sign | q)};
  }
  uint32_t q = ((abs >> 13) - (112u << 10));
  const uint32_t rem = abs & 0x1FFFu;
  if (rem > 0x1000u || (rem == 0x1000u && (q & 1u))) ++q;  // may carry into the exponent: fine
  return Half{static_cast<uint16_t>(sign | q)};
}

KVPACK_HOST_DEVICE float to_float(BFloat16 b) {
  return detail::bits_float(static_cast<uint32_t>(b.bits) << 16);
}

/// fp32 -> bf16 with round-to-nearest-even.
KVPACK_HOST_DEVICE BFloat16 to_bfloat16(float f) {
  const uint32_t u = detail::float_bits(f);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return BFloat16{static_cast<uint16_t>((u >> 16) | 0x40u)};
  const uint32_t rounded = u + 0x7FFFu + ((u >> 16) & 1u);
  return BFloat16{static_cast<uint16_t>(rounded >> 16)};
}

KVPACK_HOST_DEVICE float to_float(float f) { return f; }

}  // namespace kvpack
