/// \file backend/cpu/simd/int8_key_scores_avx2.hpp
/// \brief KIVI key-group scores from an int8 query (Quantize::int8_query, quant/int8_query.hpp)
/// with AVX2 integer dot products, for CPUs without AVX-512 VNNI (int8_key_scores.hpp).
///
/// Keys are stored per channel (block c holds the G codes of channel c), and the AVX2 integer
/// dot products sum adjacent pairs: the code bytes of channels c and c + 1 of one token are
/// interleaved (vpunpcklbw of [c | c + 2] with [c + 1 | c + 3]: the low 128-bit lane pairs c
/// with c + 1, the high one c + 2 with c + 3) and multiplied by the query pairs (w8_c, w8_c+1),
/// (w8_c+2, w8_c+3) repeated in those lanes.
/// - 4 bits: vpmaddubsw (unsigned codes × signed query bytes, pairs summed into 16 bits). A pair
///   sum is at most 2 · 15 · 127 = 3810, so the sums of 8 channel quads (32 channels, ≤ 30480)
///   stay in 16 bits before they are widened to 32; the low nibbles give the even tokens, the
///   high nibbles the odd ones.
/// - 8 bits: a pair sum reaches 2 · 255 · 127 > 32767, which vpmaddubsw would saturate; the codes
///   are widened to 16 bits and multiplied by the 16-bit query with vpmaddwd (pairs into 32 bits).
/// Every code sum is exact, so results equal the scalar reference's except for the order of the
/// fp32 sum of the bias term (as the VNNI kernel's).
#pragma once

#include <cstdint>

#include "../../../isa.hpp"
#include "../../../quant/int8_query.hpp"
#include "../../../quant/quant_block.hpp"
#include "avx2.hpp"
#include "quant_scales_avx2.hpp"

#if defined(KVPACK_X86_DISPATCH)
namespace kvpack {
namespace detail {

/// Where avx2_int8_group_scores keeps the query pairs of `rows` rows in its scratch w: after the
/// scales and the int8 rows of the other kernels (int8_key_scratch_floats), 32-byte aligned.
inline __m256i* int8_key_pairs(float* w, int rows, int d) {
  const auto at = reinterpret_cast<std::uintptr_t>(w + d + (rows * d + 3) / 4);
  return reinterpret_cast<__m256i*>((at + 31) / 32 * 32);
}

/// [the 16 code bytes at `offset` of b[0] | those of b[2]].
template <class Block>
KVPACK_TARGET_AVX2 inline __m256i avx2_code_lanes(const Block* b, int offset) {
  const __m128i lo = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b[0].codes + offset));
  const __m128i hi = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b[2].codes + offset));
  return _mm256_inserti128_si256(_mm256_castsi128_si256(lo), hi, 1);
}

/// The query pairs of 8 channels c .. c + 7 (w16: their int8 values as 16 bits) as the code-sum
/// loops read them: wq[0] for channels c .. c + 3, wq[1] for c + 4 .. c + 7. 4 bits: bytes
/// [(w8_c, w8_c+1) × 8 | (w8_c+2, w8_c+3) × 8]; 8 bits: the same pairs in 16 bits, 4 times a lane.
template <int Bits>
KVPACK_TARGET_AVX2 inline void avx2_query_pairs(__m128i w16, __m256i* wq) {
  if constexpr (Bits == 4) {
    const __m256i bytes = _mm256_broadcastsi128_si256(_mm_packs_epi16(w16, w16));
    wq[0] = _mm256_shuffle_epi8(
        bytes, _mm256_setr_epi8(0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 2, 3, 2, 3, 2, 3, 2,
                                3, 2, 3, 2, 3, 2, 3, 2, 3));
    wq[1] = _mm256_shuffle_epi8(
        bytes, _mm256_setr_epi8(4, 5, 4, 5, 4, 5, 4, 5, 4, 5, 4, 5, 4, 5, 4, 5, 6, 7, 6, 7, 6, 7, 6,
                                7, 6, 7, 6, 7, 6, 7, 6, 7));
  } else {
    const __m256i words = _mm256_castsi128_si256(w16);
    wq[0] = _mm256_permutevar8x32_epi32(words, _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1));
    wq[1] = _mm256_permutevar8x32_epi32(words, _mm256_setr_epi32(2, 2, 2, 2, 3, 3, 3, 3));
  }
}

/// Code sums D_t of R int8 query rows over tokens 32k + 16 · Part + [0, 16) of a 4-bit key
/// group: sums[r][0][j] for token 2j, sums[r][1][j] for token 2j + 1 (of the 16). wq[r · d / 4 +
/// c / 4]: row r's query pairs (avx2_query_pairs<4>) of channels c .. c + 3.
template <int R, int Part, int G>
KVPACK_TARGET_AVX2 inline void avx2_int4_code_sums(const QuantBlock<4, G>* kb, int d,
                                                   const __m256i* wq, int k,
                                                   int32_t (*sums)[2][8]) {
  const __m256i nibble = _mm256_set1_epi8(0x0F);
  for (int r = 0; r < R; ++r) {  // vector stores: the vector loads below then forward from them
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(sums[r][0]), _mm256_setzero_si256());
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(sums[r][1]), _mm256_setzero_si256());
  }
  for (int c0 = 0; c0 < d; c0 += 32) {  // 32 channels: 16-bit sums without overflow
    __m256i even[R], odd[R];
    for (int r = 0; r < R; ++r) even[r] = odd[r] = _mm256_setzero_si256();
    const int c1 = c0 + 32 < d ? c0 + 32 : d;
    for (int c = c0; c < c1; c += 4) {
      const __m256i u = avx2_code_lanes(kb + c, 16 * k);
      const __m256i v = avx2_code_lanes(kb + c + 1, 16 * k);
      const __m256i x = Part == 0 ? _mm256_unpacklo_epi8(u, v) : _mm256_unpackhi_epi8(u, v);
      const __m256i lo = _mm256_and_si256(x, nibble);
      const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(x, 4), nibble);
      for (int r = 0; r < R; ++r) {
        const __m256i w = _mm256_load_si256(wq + r * (d / 4) + c / 4);
        even[r] = _mm256_add_epi16(even[r], _mm256_maddubs_epi16(lo, w));
        odd[r] = _mm256_add_epi16(odd[r], _mm256_maddubs_epi16(hi, w));
      }
    }
    for (int r = 0; r < R; ++r) {  // both lanes hold the same tokens (other channels): add
      for (int p = 0; p < 2; ++p) {
        const __m256i x = p == 0 ? even[r] : odd[r];
        __m256i* dst = reinterpret_cast<__m256i*>(sums[r][p]);
        const __m256i w = _mm256_add_epi32(_mm256_cvtepi16_epi32(_mm256_castsi256_si128(x)),
                                           _mm256_cvtepi16_epi32(_mm256_extracti128_si256(x, 1)));
        _mm256_storeu_si256(dst, _mm256_add_epi32(_mm256_loadu_si256(dst), w));
      }
    }
  }
}

/// Code sums of R int8 query rows over tokens 32k + 8 · Eighth + [0, 8) of an 8-bit key group,
/// in token order. wq: as avx2_int4_code_sums, from avx2_query_pairs<8>.
template <int R, int Eighth, int G>
KVPACK_TARGET_AVX2 inline void avx2_int8_code_sums(const QuantBlock<8, G>* kb, int d,
                                                   const __m256i* wq, int k, __m256i* sums) {
  __m256i a0[R], a1[R];  // tokens 0-3 / 4-7 of the 8, each lane pair of channels apart
  for (int r = 0; r < R; ++r) a0[r] = a1[r] = _mm256_setzero_si256();
  const __m256i zero = _mm256_setzero_si256();
  for (int c = 0; c < d; c += 4) {
    const __m256i u = avx2_code_lanes(kb + c, 32 * k + 16 * (Eighth / 2));
    const __m256i v = avx2_code_lanes(kb + c + 1, 32 * k + 16 * (Eighth / 2));
    const __m256i x = Eighth % 2 == 0 ? _mm256_unpacklo_epi8(u, v) : _mm256_unpackhi_epi8(u, v);
    const __m256i x0 = _mm256_unpacklo_epi8(x, zero), x1 = _mm256_unpackhi_epi8(x, zero);
    for (int r = 0; r < R; ++r) {
      const __m256i w = _mm256_load_si256(wq + r * (d / 4) + c / 4);
      a0[r] = _mm256_add_epi32(a0[r], _mm256_madd_epi16(x0, w));
      a1[r] = _mm256_add_epi32(a1[r], _mm256_madd_epi16(x1, w));
    }
  }
  for (int r = 0; r < R; ++r) {
    const __m128i t0 =
        _mm_add_epi32(_mm256_castsi256_si128(a0[r]), _mm256_extracti128_si256(a0[r], 1));
    const __m128i t1 =
        _mm_add_epi32(_mm256_castsi256_si128(a1[r]), _mm256_extracti128_si256(a1[r], 1));
    sums[r] = _mm256_inserti128_si256(_mm256_castsi128_si256(t0), t1, 1);
  }
}

/// fma(float(sums), alpha, bias): the scores of 8 tokens from their code sums, as the reference.
KVPACK_TARGET_AVX2 inline __m256 avx2_int8_scores(__m256i sums, float alpha, float bias) {
  return _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), _mm256_set1_ps(alpha), _mm256_set1_ps(bias));
}

/// Scores of R query rows (q, row stride d) against the G tokens of key group kb (d blocks, one
/// per channel; d % 8 == 0): s[r · s_stride + t] for t < G, as int8_query_group_scores.
/// Scratch w: int8_key_scratch_floats(R, d) floats: the scales (d floats), then the int8 query
/// rows as the pairs the code-sum loops read (R · d / 4 vectors, built once per group).
template <int R, int Bits, int G>
KVPACK_TARGET_AVX2 __attribute__((noinline)) void avx2_int8_group_scores(
    const QuantBlock<Bits, G>* kb, int d, const float* q, float* s, int64_t s_stride, float* w) {
  static_assert((Bits == 4 || Bits == 8) && G % 32 == 0,
                "no AVX2 int8-query kernel for this format");
  __m256i* wq = int8_key_pairs(w, R, d);
  // Scales into w; bias_r = Σ_c q_rc · min_c; max_c |q_rc · scale_c|.
  const __m256 sign = _mm256_set1_ps(-0.0f);
  __m256 bias_v[R], amax_v[R];
  for (int r = 0; r < R; ++r) bias_v[r] = amax_v[r] = _mm256_setzero_ps();
  for (int c = 0; c < d; c += 8) {
    __m256 scale, min;
    avx2_scales_and_mins(kb + c, scale, min);
    _mm256_storeu_ps(w + c, scale);
    for (int r = 0; r < R; ++r) {
      const __m256 qv = _mm256_loadu_ps(q + r * d + c);
      bias_v[r] = _mm256_fmadd_ps(qv, min, bias_v[r]);
      amax_v[r] = _mm256_max_ps(amax_v[r], _mm256_andnot_ps(sign, _mm256_mul_ps(qv, scale)));
    }
  }
  // The int8 rows, rounded as quantize_query_int8 rounds (same products, same conversion).
  float alpha[R], bias[R];
  for (int r = 0; r < R; ++r) {
    const Int8QueryStep step = int8_query_step(avx2::hmax(amax_v[r]));
    bias[r] = avx2::hsum(bias_v[r]);
    alpha[r] = step.alpha;
    const __m256 inverse = _mm256_set1_ps(step.inverse);
    for (int c = 0; c < d; c += 8) {
      const __m256 x = _mm256_mul_ps(
          _mm256_mul_ps(_mm256_loadu_ps(q + r * d + c), _mm256_loadu_ps(w + c)), inverse);
      const __m256i i = _mm256_min_epi32(
          _mm256_max_epi32(_mm256_cvtps_epi32(x), _mm256_set1_epi32(-127)), _mm256_set1_epi32(127));
      const __m128i i16 =
          _mm_packs_epi32(_mm256_castsi256_si128(i), _mm256_extracti128_si256(i, 1));
      avx2_query_pairs<Bits>(i16, wq + r * (d / 4) + c / 4);
    }
  }
  for (int k = 0; k < G / 32; ++k) {
    if constexpr (Bits == 4) {
      alignas(32) int32_t sums[R][2][8];
      for (int half = 0; half < 2; ++half) {
        if (half == 0) {
          avx2_int4_code_sums<R, 0, G>(kb, d, wq, k, sums);
        } else {
          avx2_int4_code_sums<R, 1, G>(kb, d, wq, k, sums);
        }
        for (int r = 0; r < R; ++r) {  // even / odd tokens → token order
          const __m256 even = avx2_int8_scores(
              _mm256_load_si256(reinterpret_cast<__m256i*>(sums[r][0])), alpha[r], bias[r]);
          const __m256 odd = avx2_int8_scores(
              _mm256_load_si256(reinterpret_cast<__m256i*>(sums[r][1])), alpha[r], bias[r]);
          const __m256 lo = _mm256_unpacklo_ps(even, odd), hi = _mm256_unpackhi_ps(even, odd);
          float* out = s + r * s_stride + 32 * k + 16 * half;
          _mm256_storeu_ps(out, _mm256_permute2f128_ps(lo, hi, 0x20));
          _mm256_storeu_ps(out + 8, _mm256_permute2f128_ps(lo, hi, 0x31));
        }
      }
    } else {
      __m256i sums[4][R];
      avx2_int8_code_sums<R, 0, G>(kb, d, wq, k, sums[0]);
      avx2_int8_code_sums<R, 1, G>(kb, d, wq, k, sums[1]);
      avx2_int8_code_sums<R, 2, G>(kb, d, wq, k, sums[2]);
      avx2_int8_code_sums<R, 3, G>(kb, d, wq, k, sums[3]);
      for (int e = 0; e < 4; ++e)
        for (int r = 0; r < R; ++r)
          _mm256_storeu_ps(s + r * s_stride + 32 * k + 8 * e,
                           avx2_int8_scores(sums[e][r], alpha[r], bias[r]));
    }
  }
}

}  // namespace detail
}  // namespace kvpack
#endif  // KVPACK_X86_DISPATCH
