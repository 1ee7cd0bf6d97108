/// \file backend/cpu/simd/avx512.hpp
/// \brief AVX-512 F/BW/VL/DQ vector primitives (16 fp32 lanes, 32 zmm registers) under the names
/// the ISA-generic kernels use (simd/decode_kernels.inc); every function carries the AVX-512
/// target attribute, whatever the consumer's flags.
#pragma once

#include <cstdint>

#include "../../../half.hpp"
#include "../../../isa.hpp"
#include "avx2.hpp"

#if defined(KVPACK_X86_DISPATCH)
namespace kvpack {
namespace detail {
namespace avx512 {

using Vec = __m512;
constexpr int kLanes = 16;
/// Key rows scored at once by R query rows: R · K accumulators + K keys + 1 query ≤ 32 zmm.
template <int R>
constexpr int kScoreKeys = R >= 4   ? 4
                           : R == 3 ? 6
                                    : 8;
/// Vectors of a value-accumulation channel chunk: R · C accumulators + C rows + 1 ≤ 32 zmm
/// (4 vectors = 64 channels for three or four rows, 8 = 128 for fewer).
template <int R>
constexpr int kValueVectors = R >= 3 ? 4 : 8;

KVPACK_TARGET_AVX512 inline Vec zero() { return _mm512_setzero_ps(); }
KVPACK_TARGET_AVX512 inline Vec set1(float x) { return _mm512_set1_ps(x); }
KVPACK_TARGET_AVX512 inline Vec broadcast(const float* p) { return _mm512_set1_ps(*p); }
KVPACK_TARGET_AVX512 inline Vec load(const float* p) { return _mm512_loadu_ps(p); }
KVPACK_TARGET_AVX512 inline Vec load(const Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
KVPACK_TARGET_AVX512 inline void store(float* p, Vec x) { _mm512_storeu_ps(p, x); }
KVPACK_TARGET_AVX512 inline Vec add(Vec a, Vec b) { return _mm512_add_ps(a, b); }
KVPACK_TARGET_AVX512 inline Vec sub(Vec a, Vec b) { return _mm512_sub_ps(a, b); }
KVPACK_TARGET_AVX512 inline Vec max(Vec a, Vec b) { return _mm512_max_ps(a, b); }
/// a · b + c, one rounding.
KVPACK_TARGET_AVX512 inline Vec fmadd(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }

/// exp of 16 lanes: lane for lane the operations of avx2::exp (same bits, same ≤ 2 ulp bound).
KVPACK_TARGET_AVX512 inline Vec exp(Vec x) {
  x = _mm512_min_ps(x, _mm512_set1_ps(88.3762626647949f));
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.3365447504f));
  const __m512 fx = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                         _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  x = _mm512_fnmadd_ps(fx, _mm512_set1_ps(0.693359375f), x);
  x = _mm512_fnmadd_ps(fx, _mm512_set1_ps(-2.12194440e-4f), x);
  __m512 y = _mm512_set1_ps(1.9875691500e-4f);
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(1.3981999507e-3f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(8.3334519073e-3f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(4.1665795894e-2f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(1.6666665459e-1f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(5.0000001201e-1f));
  y = _mm512_fmadd_ps(y, _mm512_mul_ps(x, x), x);
  y = _mm512_add_ps(y, _mm512_set1_ps(1.0f));
  const __m512i e =
      _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(fx), _mm512_set1_epi32(127)), 23);
  return _mm512_mul_ps(y, _mm512_castsi512_ps(e));
}

/// The two 8-lane halves of a.
KVPACK_TARGET_AVX512 inline __m256 low_half(Vec a) { return _mm512_castps512_ps256(a); }
KVPACK_TARGET_AVX512 inline __m256 high_half(Vec a) { return _mm512_extractf32x8_ps(a, 1); }

/// Sum of the 16 lanes: the halves added, then avx2::hsum's order.
KVPACK_TARGET_AVX512 inline float hsum(Vec a) {
  return avx2::hsum(_mm256_add_ps(low_half(a), high_half(a)));
}

/// Max of the 16 lanes.
KVPACK_TARGET_AVX512 inline float hmax(Vec a) { return _mm512_reduce_max_ps(a); }

/// Stores the horizontal sums of a and b to dst[0] and dst[1] (halves added, then as AVX2).
KVPACK_TARGET_AVX512 inline void store_sums(float* dst, Vec a, Vec b) {
  avx2::store_sums(dst, _mm256_add_ps(low_half(a), high_half(a)),
                   _mm256_add_ps(low_half(b), high_half(b)));
}

}  // namespace avx512
}  // namespace detail
}  // namespace kvpack
#endif  // KVPACK_X86_DISPATCH
