/// \file detail/convert.hpp
/// \brief Row conversions between fp32 and the 16-bit storage types (F16C when available).
#pragma once

// clang-format off
#include "internal.hpp"  // first, before anything defines the macro it checks
// clang-format on

#include <cstddef>
#include <cstdint>
#include <vector>

#include "../half.hpp"
#include "../span.hpp"

#if defined(__F16C__) && defined(__AVX__) && !defined(__CUDA_ARCH__)
#include <immintrin.h>
#define KVPACK_CPU_F16C 1
#endif

namespace kvpack {
namespace detail {

inline void load_row(const float* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = src[i];
}

inline void load_row(const Half* src, float* dst, int64_t n) {
  int64_t i = 0;
#if defined(KVPACK_CPU_F16C)
  for (; i + 8 <= n; i += 8) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i));
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(h));
  }
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
#if defined(KVPACK_CPU_F16C)
  // Immediate 0 = round to nearest even, identical to to_half().
  for (; i + 8 <= n; i += 8) {
    const __m128i h = _mm256_cvtps_ph(_mm256_loadu_ps(src + i), 0);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), h);
  }
#endif
  for (; i < n; ++i) dst[i] = to_half(src[i]);
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
