/// \file detail/convert.hpp
/// \brief Row conversions between fp32 and the 16-bit storage types (F16C when cpu_isa() has it).
#pragma once

// clang-format off
#include "internal.hpp"  // first, before anything defines the macro it checks
// clang-format on

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <vector>

#include "../half.hpp"
#include "../isa.hpp"
#include "../span.hpp"

namespace kvpack {
namespace detail {

#if defined(KVPACK_X86_DISPATCH)
/// fp16 → fp32 for [0, 8 · floor(n / 8)); returns that bound.
KVPACK_TARGET_AVX2 inline int64_t f16c_load_row(const Half* src, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i));
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(h));
  }
  return i;
}

/// fp32 → fp16 (round to nearest even, as to_half()) for [0, 8 · floor(n / 8)); returns that
/// bound.
KVPACK_TARGET_AVX2 inline int64_t f16c_store_row(const float* src, Half* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m128i h = _mm256_cvtps_ph(_mm256_loadu_ps(src + i), 0);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), h);
  }
  return i;
}

/// f16c_store_row that also ANDs into `ok` whether every |src[i]| <= limit (false for NaN) over
/// the same bound: the check and the conversion read the input once.
KVPACK_TARGET_AVX2 inline int64_t f16c_store_row_checked(const float* src, Half* dst, int64_t n,
                                                         float limit, bool& ok) {
  const __m256 magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  const __m256 bound = _mm256_set1_ps(limit);
  __m256 good = _mm256_castsi256_ps(_mm256_set1_epi32(-1));
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 x = _mm256_loadu_ps(src + i);
    good = _mm256_and_ps(good, _mm256_cmp_ps(_mm256_and_ps(x, magnitude), bound, _CMP_LE_OQ));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), _mm256_cvtps_ph(x, 0));
  }
  ok = ok && _mm256_movemask_ps(good) == 0xFF;
  return i;
}
#endif

inline void load_row(const float* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = src[i];
}

inline void load_row(const Half* src, float* dst, int64_t n) {
  int64_t i = 0;
#if defined(KVPACK_X86_DISPATCH)
  if (cpu_isa() >= Isa::kAvx2) i = f16c_load_row(src, dst, n);
#endif
  for (; i < n; ++i) dst[i] = to_float(src[i]);
}

inline void load_row(const BFloat16* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = to_float(src[i]);
}

inline void store_row(const float* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = src[i];
}

inline void store_row(const float* src, Half* dst, int64_t n) {
  int64_t i = 0;
#if defined(KVPACK_X86_DISPATCH)
  if (cpu_isa() >= Isa::kAvx2) i = f16c_store_row(src, dst, n);
#endif
  for (; i < n; ++i) dst[i] = to_half(src[i]);
}

/// store_row() that also tells whether every |src[i]| <= limit (false for NaN): the validation
/// of an append fused with its conversion, so the input is read once. The elements are written
/// whatever they are; a caller that gets false discards them.
inline bool store_row_checked(const float* src, float* dst, int64_t n, float limit) {
  int ok = 1;  // branch-free, so the loop vectorises
  for (int64_t i = 0; i < n; ++i) {
    ok &= std::fabs(src[i]) <= limit;
    dst[i] = src[i];
  }
  return ok != 0;
}

inline bool store_row_checked(const float* src, Half* dst, int64_t n, float limit) {
  int64_t i = 0;
  bool ok = true;
#if defined(KVPACK_X86_DISPATCH)
  if (cpu_isa() >= Isa::kAvx2) i = f16c_store_row_checked(src, dst, n, limit, ok);
#endif
  int good = 1;
  for (; i < n; ++i) {
    good &= std::fabs(src[i]) <= limit;
    dst[i] = to_half(src[i]);
  }
  return ok && good != 0;
}

/// Appends n rows of keys and values (fp32, n × head_dim each, row-major) to `k` and `v` in
/// their element type T, and their first n positions: what every CPU head store does on append.
template <class T>
inline void append_rows(std::vector<T>& k, std::vector<T>& v, std::vector<int32_t>& positions,
                        const float* k_rows, const float* v_rows, Positions pos, int64_t n,
                        int head_dim) {
  const std::size_t old = k.size();
  k.resize(old + n * head_dim);
  v.resize(old + n * head_dim);
  store_row(k_rows, k.data() + old, n * head_dim);
  store_row(v_rows, v.data() + old, n * head_dim);
  for (int64_t t = 0; t < n; ++t) positions.push_back(static_cast<int32_t>(pos[t]));
}

}  // namespace detail
}  // namespace kvpack
