/// \file backend/cpu/simd/avx2.hpp
/// \brief AVX2 + FMA + F16C vector primitives (8 fp32 lanes, 16 ymm registers) under the names
/// the ISA-generic kernels use (simd/decode_kernels.inc); every function carries the AVX2 target
/// attribute, whatever the consumer's flags.
#pragma once

#include <cstdint>

#include "../../../half.hpp"
#include "../../../isa.hpp"

#if defined(KVPACK_X86_DISPATCH)
namespace kvpack {
namespace detail {
namespace avx2 {

using Vec = __m256;
constexpr int kLanes = 8;
/// Key rows scored at once by R query rows: R · K accumulators + K keys + 1 query ≤ 16 ymm.
template <int R>
constexpr int kScoreKeys = R >= 4 ? 2 : 3;
/// Vectors of a value-accumulation channel chunk: R · C accumulators + C rows + 1 ≤ 16 ymm.
template <int R>
constexpr int kValueVectors = R >= 4 ? 2 : 3;

KVPACK_TARGET_AVX2 inline Vec zero() { return _mm256_setzero_ps(); }
KVPACK_TARGET_AVX2 inline Vec set1(float x) { return _mm256_set1_ps(x); }
KVPACK_TARGET_AVX2 inline Vec broadcast(const float* p) { return _mm256_broadcast_ss(p); }
KVPACK_TARGET_AVX2 inline Vec load(const float* p) { return _mm256_loadu_ps(p); }
KVPACK_TARGET_AVX2 inline Vec load(const Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
KVPACK_TARGET_AVX2 inline void store(float* p, Vec x) { _mm256_storeu_ps(p, x); }
KVPACK_TARGET_AVX2 inline Vec add(Vec a, Vec b) { return _mm256_add_ps(a, b); }
KVPACK_TARGET_AVX2 inline Vec sub(Vec a, Vec b) { return _mm256_sub_ps(a, b); }
KVPACK_TARGET_AVX2 inline Vec max(Vec a, Vec b) { return _mm256_max_ps(a, b); }
/// a · b + c, one rounding.
KVPACK_TARGET_AVX2 inline Vec fmadd(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }

/// exp of 8 lanes (Cephes expf: range reduction by ln 2, degree-5 polynomial); relative error
/// ≤ 2 ulp on [-87.3, 88.3]; inputs below clamp to exp(-87.3) ≈ 1.2e-38. Lane for lane the same
/// operations as avx512::exp, so both give the same bits.
KVPACK_TARGET_AVX2 inline Vec exp(Vec x) {
  x = _mm256_min_ps(x, _mm256_set1_ps(88.3762626647949f));
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.3365447504f));
  const __m256 fx = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), x);
  y = _mm256_add_ps(y, _mm256_set1_ps(1.0f));
  const __m256i e =
      _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(fx), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

/// Sum of the 8 lanes.
KVPACK_TARGET_AVX2 inline float hsum(Vec a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

/// Max of the 8 lanes.
KVPACK_TARGET_AVX2 inline float hmax(Vec a) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
}

/// Stores the horizontal sums of a and b to dst[0] and dst[1].
KVPACK_TARGET_AVX2 inline void store_sums(float* dst, Vec a, Vec b) {
  const __m256 h = _mm256_hadd_ps(a, b);  // a01 a23 b01 b23 | a45 a67 b45 b67
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
  s = _mm_hadd_ps(s, s);  // a b a b
  _mm_storel_pi(reinterpret_cast<__m64*>(dst), s);
}

}  // namespace avx2
}  // namespace detail
}  // namespace kvpack
#endif  // KVPACK_X86_DISPATCH
