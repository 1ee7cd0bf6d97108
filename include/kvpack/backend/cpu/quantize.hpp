/// \file backend/cpu/quantize.hpp
/// \brief KIVI block quantization on the CPU, bit for bit equal to quantize_block_ref.
///
/// Inputs are fp32 or fp16 (kvpack::Half: the cache's tail, read in place; fp16 → fp32 is exact,
/// so the codes are those of the widened rows).
///
/// Keys are quantized per channel over a group of G tokens: with the group's rows token-major
/// (G × d), 8 channels are one AVX2 vector, so the min/max and the codes of 8 blocks are
/// computed side by side in the reference's order. Values are quantized per token over groups
/// of G channels, 8 channels per vector. Every step is the reference's fp32 operation (min, max,
/// the directed fp16 roundings through F16C, one division, one fma per code), so the results
/// are identical; blocks whose min or max is a signed zero, where a reordered min/max could
/// pick the other zero, go through the reference. The AVX2 code runs when cpu_isa() is
/// Isa::kAvx2 or above (isa.hpp); otherwise every block goes through the reference.
#pragma once

#include "../../config.hpp"
// clang-format off
#include <cstdint>
#include <cstring>
#include <type_traits>
// clang-format on

#include "../../half.hpp"
#include "../../quant/quant_block.hpp"
#include "attention.hpp"

namespace kvpack {
namespace detail {

/// quantize_block_ref of x[i · stride] (fp32, or fp16 widened first), i < G.
template <int Bits, int G, class T>
void quantize_block_from(const T* x, int64_t stride, QuantBlock<Bits, G>& block) {
  if constexpr (std::is_same_v<T, float>) {
    quantize_block_ref(x, stride, block);
  } else {
    float widened[G];
    for (int i = 0; i < G; ++i) widened[i] = to_float(x[i * stride]);
    quantize_block_ref(widened, 1, block);
  }
}

#if defined(KVPACK_X86_DISPATCH)

/// half_down / half_up (quant_block.hpp) of 8 lanes, as fp16 bits.
template <bool kDown>
KVPACK_TARGET_AVX2 inline __m128i avx2_half_directed(__m256 x) {
  // Round to nearest even, as to_half().
  const __m128i h = _mm256_cvtps_ph(x, 0);
  const __m256 f = _mm256_cvtph_ps(h);
  const __m256 wrong = _mm256_cmp_ps(f, x, kDown ? _CMP_GT_OQ : _CMP_LT_OQ);
  const __m128i fix = _mm_packs_epi32(_mm256_castsi256_si128(_mm256_castps_si256(wrong)),
                                      _mm256_extractf128_si256(_mm256_castps_si256(wrong), 1));
  // One ulp towards −inf (down) or +inf (up): the magnitude moves with the sign.
  const __m128i negative =
      _mm_cmpeq_epi16(_mm_and_si128(h, _mm_set1_epi16(-0x8000)), _mm_set1_epi16(-0x8000));
  const __m128i one = _mm_set1_epi16(1), minus_one = _mm_set1_epi16(-1);
  const __m128i step =
      kDown ? _mm_blendv_epi8(minus_one, one, negative) : _mm_blendv_epi8(one, minus_one, negative);
  __m128i moved = _mm_add_epi16(h, step);
  // ±0 step to the smallest subnormal of the other sign (down: +0 → −2^-24; up: −0 → +2^-24).
  const __m128i zero = _mm_set1_epi16(kDown ? 0x0000 : -0x8000);
  moved =
      _mm_blendv_epi8(moved, _mm_set1_epi16(kDown ? -0x7FFF : 0x0001), _mm_cmpeq_epi16(h, zero));
  return _mm_blendv_epi8(h, moved, fix);
}

/// Codes of 8 lanes: clamp(floor(fma(x − min, inv, 0.5)), 0, levels), as in quantize_block_ref.
KVPACK_TARGET_AVX2 inline __m256i avx2_codes(__m256 x, __m256 min, __m256 inv, __m256i levels) {
  const __m256 c = _mm256_max_ps(_mm256_fmadd_ps(_mm256_sub_ps(x, min), inv, _mm256_set1_ps(0.5f)),
                                 _mm256_setzero_ps());
  return _mm256_min_epi32(_mm256_cvttps_epi32(c), levels);
}

/// The 8 codes of `codes` (lane i = element i) packed little-end first: 8 · Bits bits.
template <int Bits>
KVPACK_TARGET_AVX2 inline uint64_t avx2_pack8(__m256i codes) {
  const __m256i shifted = _mm256_sllv_epi32(
      codes, _mm256_setr_epi32(0, Bits, 2 * Bits, 3 * Bits, 0, Bits, 2 * Bits, 3 * Bits));
  // The shifted codes do not overlap, so sums are ORs: lane 0 gets lanes 0..3, lane 4 4..7.
  __m256i s = _mm256_add_epi32(shifted, _mm256_shuffle_epi32(shifted, 0x4E));
  s = _mm256_add_epi32(s, _mm256_shuffle_epi32(s, 0xB1));
  const uint64_t lo = static_cast<uint32_t>(_mm256_extract_epi32(s, 0));
  const uint64_t hi = static_cast<uint32_t>(_mm256_extract_epi32(s, 4));
  return lo | (hi << (4 * Bits));
}

/// min (kMax: max) of 8 lanes.
template <bool kMax>
KVPACK_TARGET_AVX2 inline __m256 avx2_min_or_max(__m256 a, __m256 b) {
  return kMax ? _mm256_max_ps(a, b) : _mm256_min_ps(a, b);
}

/// Lane j of the result = min (kMax: max) over the 8 lanes of v[j]: a transposing reduction.
template <bool kMax>
KVPACK_TARGET_AVX2 inline __m256 avx2_reduce8(const __m256* v) {
  __m256 q[4];
  for (int i = 0; i < 4; ++i) {  // lanes: v[2i] and v[2i + 1], 4 partials each
    q[i] = avx2_min_or_max<kMax>(_mm256_unpacklo_ps(v[2 * i], v[2 * i + 1]),
                                 _mm256_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  }
  const __m256 b0 = avx2_min_or_max<kMax>(_mm256_shuffle_ps(q[0], q[1], 0x44),
                                          _mm256_shuffle_ps(q[0], q[1], 0xEE));
  const __m256 b1 = avx2_min_or_max<kMax>(_mm256_shuffle_ps(q[2], q[3], 0x44),
                                          _mm256_shuffle_ps(q[2], q[3], 0xEE));
  return avx2_min_or_max<kMax>(_mm256_permute2f128_ps(b0, b1, 0x20),
                               _mm256_permute2f128_ps(b0, b1, 0x31));
}

/// quantize_key_group on AVX2 for the channels [0, 8 · floor(d / 8)); returns that bound.
template <int Bits, int G, class T>
KVPACK_TARGET_AVX2 int avx2_quantize_key_group(const T* rows, int d, QuantBlock<Bits, G>* blocks) {
  int c0 = 0;
  constexpr int kPerWord = 32 / Bits;  // codes per 32-bit word of a block
  constexpr int kWords = G / kPerWord;
  const __m256i levels = _mm256_set1_epi32(QuantBlock<Bits, G>::levels);
  for (; c0 + 8 <= d; c0 += 8) {
    __m256 lo = avx2::load(rows + c0), hi = lo;
    for (int i = 1; i < G; ++i) {  // the reference's order: v < lo ? v : lo
      const __m256 x = avx2::load(rows + i * d + c0);
      lo = _mm256_min_ps(x, lo);
      hi = _mm256_max_ps(x, hi);
    }
    const __m128i min_bits = avx2_half_directed<true>(lo);
    const __m256 min = _mm256_cvtph_ps(min_bits);
    const __m128i scale_bits = avx2_half_directed<false>(_mm256_div_ps(
        _mm256_sub_ps(hi, min), _mm256_set1_ps(static_cast<float>(QuantBlock<Bits, G>::levels))));
    const __m256 scale = _mm256_cvtph_ps(scale_bits);
    const __m256 inv = _mm256_and_ps(_mm256_div_ps(_mm256_set1_ps(1.0f), scale),
                                     _mm256_cmp_ps(scale, _mm256_setzero_ps(), _CMP_GT_OQ));
    alignas(32) uint16_t scales[8], mins[8];
    _mm_store_si128(reinterpret_cast<__m128i*>(scales), scale_bits);
    _mm_store_si128(reinterpret_cast<__m128i*>(mins), min_bits);
    alignas(32) uint32_t words[kWords][8];
    for (int w = 0; w < kWords; ++w) {
      __m256i word = _mm256_setzero_si256();
      for (int j = 0; j < kPerWord; ++j) {
        const __m256 x = avx2::load(rows + (w * kPerWord + j) * d + c0);
        word = _mm256_or_si256(word, _mm256_slli_epi32(avx2_codes(x, min, inv, levels), j * Bits));
      }
      _mm256_store_si256(reinterpret_cast<__m256i*>(words[w]), word);
    }
    for (int lane = 0; lane < 8; ++lane) {
      QuantBlock<Bits, G>& b = blocks[c0 + lane];
      b.scale.bits = scales[lane];
      b.min.bits = mins[lane];
      for (int w = 0; w < kWords; ++w) std::memcpy(b.codes + 4 * w, &words[w][lane], 4);
    }
  }
  return c0;
}

/// One value block (G channels of one token, G % 8 == 0) on AVX2; false, writing nothing, when
/// the block has a zero extreme (the reference decides its sign).
template <int Bits, int G, class T>
KVPACK_TARGET_AVX2 bool avx2_quantize_value_block(const T* x, QuantBlock<Bits, G>& b) {
  __m256 lo = avx2::load(x), hi = lo;
  for (int i = 8; i < G; i += 8) {
    lo = _mm256_min_ps(avx2::load(x + i), lo);
    hi = _mm256_max_ps(avx2::load(x + i), hi);
  }
  const float lo_s = -avx2::hmax(_mm256_sub_ps(_mm256_setzero_ps(), lo));
  const float hi_s = avx2::hmax(hi);
  // A zero extreme may carry either sign depending on the order: use the reference.
  if (lo_s == 0.0f || hi_s == 0.0f) return false;
  const __m128i min_bits = avx2_half_directed<true>(_mm256_set1_ps(lo_s));
  const __m256 min = _mm256_cvtph_ps(min_bits);
  const __m128i scale_bits = avx2_half_directed<false>(
      _mm256_div_ps(_mm256_sub_ps(_mm256_set1_ps(hi_s), min),
                    _mm256_set1_ps(static_cast<float>(QuantBlock<Bits, G>::levels))));
  const __m256 scale = _mm256_cvtph_ps(scale_bits);
  const __m256 inv = _mm256_and_ps(_mm256_div_ps(_mm256_set1_ps(1.0f), scale),
                                   _mm256_cmp_ps(scale, _mm256_setzero_ps(), _CMP_GT_OQ));
  b.scale.bits = static_cast<uint16_t>(_mm_extract_epi16(scale_bits, 0));
  b.min.bits = static_cast<uint16_t>(_mm_extract_epi16(min_bits, 0));
  const __m256i levels = _mm256_set1_epi32(QuantBlock<Bits, G>::levels);
  for (int i = 0; i < G; i += 8) {
    const uint64_t packed = avx2_pack8<Bits>(avx2_codes(avx2::load(x + i), min, inv, levels));
    std::memcpy(b.codes + i * Bits / 8, &packed, Bits);  // 8 codes = Bits bytes
  }
  return true;
}

/// quantize_value_rows on AVX2 for the tokens [0, 8 · floor(n / 8)); returns that bound.
template <int Bits, int G, class T>
KVPACK_TARGET_AVX2 int64_t avx2_quantize_value_rows(const T* rows, int64_t n, int d,
                                                    QuantBlock<Bits, G>* blocks) {
  const int groups = d / G;
  int64_t t0 = 0;
  const __m256i levels = _mm256_set1_epi32(QuantBlock<Bits, G>::levels);
  const __m256 level_count = _mm256_set1_ps(static_cast<float>(QuantBlock<Bits, G>::levels));
  for (; t0 + 8 <= n; t0 += 8) {
    for (int g = 0; g < groups; ++g) {
      __m256 lo[8], hi[8];
      for (int j = 0; j < 8; ++j) {
        const T* x = rows + (t0 + j) * d + g * G;
        lo[j] = hi[j] = avx2::load(x);
        for (int i = 8; i < G; i += 8) {
          lo[j] = _mm256_min_ps(avx2::load(x + i), lo[j]);
          hi[j] = _mm256_max_ps(avx2::load(x + i), hi[j]);
        }
      }
      const __m256 lo8 = avx2_reduce8<false>(lo), hi8 = avx2_reduce8<true>(hi);
      // A zero extreme may carry either sign depending on the order: those tokens use the
      // reference.
      const int zero =
          _mm256_movemask_ps(_mm256_or_ps(_mm256_cmp_ps(lo8, _mm256_setzero_ps(), _CMP_EQ_OQ),
                                          _mm256_cmp_ps(hi8, _mm256_setzero_ps(), _CMP_EQ_OQ)));
      const __m128i min_bits = avx2_half_directed<true>(lo8);
      const __m256 min = _mm256_cvtph_ps(min_bits);
      const __m128i scale_bits =
          avx2_half_directed<false>(_mm256_div_ps(_mm256_sub_ps(hi8, min), level_count));
      const __m256 scale = _mm256_cvtph_ps(scale_bits);
      const __m256 inv = _mm256_and_ps(_mm256_div_ps(_mm256_set1_ps(1.0f), scale),
                                       _mm256_cmp_ps(scale, _mm256_setzero_ps(), _CMP_GT_OQ));
      alignas(16) uint16_t scales[8], mins[8];
      _mm_store_si128(reinterpret_cast<__m128i*>(scales), scale_bits);
      _mm_store_si128(reinterpret_cast<__m128i*>(mins), min_bits);
      for (int j = 0; j < 8; ++j) {
        const T* x = rows + (t0 + j) * d + g * G;
        QuantBlock<Bits, G>& b = blocks[(t0 + j) * groups + g];
        if (zero & (1 << j)) {
          quantize_block_from(x, 1, b);
          continue;
        }
        const __m256i lane = _mm256_set1_epi32(j);
        const __m256 min_j = _mm256_permutevar8x32_ps(min, lane);
        const __m256 inv_j = _mm256_permutevar8x32_ps(inv, lane);
        b.scale.bits = scales[j];
        b.min.bits = mins[j];
        for (int i = 0; i < G; i += 8) {
          const uint64_t packed =
              avx2_pack8<Bits>(avx2_codes(avx2::load(x + i), min_j, inv_j, levels));
          std::memcpy(b.codes + i * Bits / 8, &packed, Bits);  // 8 codes = Bits bytes
        }
      }
    }
  }
  return t0;
}

#endif  // KVPACK_X86_DISPATCH

}  // namespace detail

namespace cpu {

/// \brief Quantizes one group of keys: `rows` (G tokens × d channels, token-major fp32 or fp16)
/// into `blocks[c]`, c < d, one block per channel. Equal to quantize_block_ref(rows + c, d,
/// blocks[c]) of the rows as fp32.
template <int Bits, int G, class T>
void quantize_key_group(const T* rows, int d, QuantBlock<Bits, G>* blocks) {
  int c0 = 0;
#if defined(KVPACK_X86_DISPATCH)
  if (cpu_isa() >= Isa::kAvx2) c0 = detail::avx2_quantize_key_group<Bits, G>(rows, d, blocks);
#endif
  for (int c = c0; c < d; ++c) detail::quantize_block_from(rows + c, d, blocks[c]);
}

/// \brief Quantizes one token's values: `row` (d channels, fp32 or fp16) into `blocks[g]`,
/// g < d / G. Equal to quantize_block_ref(row + g · G, 1, blocks[g]) of the row as fp32.
template <int Bits, int G, class T>
void quantize_value_row(const T* row, int d, QuantBlock<Bits, G>* blocks) {
  for (int g = 0; g < d / G; ++g) {
    const T* x = row + g * G;
#if defined(KVPACK_X86_DISPATCH)
    if constexpr (G % 8 == 0) {
      if (cpu_isa() >= Isa::kAvx2 && detail::avx2_quantize_value_block(x, blocks[g])) continue;
    }
#endif
    detail::quantize_block_from(x, 1, blocks[g]);
  }
}

/// \brief Quantizes the values of `n` tokens (rows n × d, fp32 or fp16) into blocks (d / G per
/// token, token-major). Equal to quantize_value_row on each row. With AVX2, 8 tokens share the
/// per-block steps (extremes, directed roundings, the division), one lane per token.
template <int Bits, int G, class T>
void quantize_value_rows(const T* rows, int64_t n, int d, QuantBlock<Bits, G>* blocks) {
  const int groups = d / G;
  int64_t t0 = 0;
#if defined(KVPACK_X86_DISPATCH)
  if constexpr (G % 8 == 0) {
    if (cpu_isa() >= Isa::kAvx2) t0 = detail::avx2_quantize_value_rows<Bits, G>(rows, n, d, blocks);
  }
#endif
  for (; t0 < n; ++t0) quantize_value_row<Bits, G>(rows + t0 * d, d, blocks + t0 * groups);
}

}  // namespace cpu
}  // namespace kvpack
