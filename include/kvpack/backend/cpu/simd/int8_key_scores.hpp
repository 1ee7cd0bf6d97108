/// \file backend/cpu/simd/int8_key_scores.hpp
/// \brief KIVI key-group scores from an int8 query (Quantize::int8_query, quant/int8_query.hpp)
/// with AVX-512 VNNI: vpdpbusd multiplies 64 codes by 64 query bytes and sums them in fours, where
/// the fp32 kernel's FMA takes 16 (or 8) products and a conversion of each code.
///
/// Keys are stored per channel (block c holds the G codes of channel c), but vpdpbusd sums the
/// four bytes of one 32-bit lane: the codes of four channels of one token must sit side by side.
/// One vpermb (AVX-512 VBMI) transposes the 16-byte code runs of channels c .. c + 3 into that
/// order; 4-bit codes then split into the even tokens (low nibbles) and the odd ones (high).
/// Results equal the scalar reference's except for the order of the fp32 sum of the bias term.
#pragma once

#include <cstdint>
#include <cstring>

#include "../../../isa.hpp"
#include "../../../quant/int8_query.hpp"
#include "../../../quant/quant_block.hpp"
#include "int8_key_scores_avx2.hpp"

#if defined(KVPACK_X86_DISPATCH)
namespace kvpack {
namespace detail {

/// Whether a format has the integer-dot kernels (AVX-512 VNNI here, AVX2 in
/// int8_key_scores_avx2.hpp): 4 or 8 bits (2-bit codes take the scalar reference), groups of
/// whole 32-token chunks.
template <int Bits, int G>
constexpr bool kInt8KeyKernel = (Bits == 4 || Bits == 8) && G % 32 == 0;

/// Which kernel scores keys from an int8 query.
enum class Int8KeyKernel {
  kReference,  ///< the scalar reference (quant/int8_query.hpp)
  kAvx2,       ///< vpmaddubsw / vpmaddwd (int8_key_scores_avx2.hpp)
  kAvx512Vnni  ///< vpdpbusd (avx512_int8_group_scores)
};

/// The fastest int8-query key kernel the chosen instruction set (cpu_isa()) allows.
inline Int8KeyKernel int8_key_kernel() {
  if (cpu_isa() >= Isa::kAvx512 && cpu_has_avx512_vnni_vbmi()) return Int8KeyKernel::kAvx512Vnni;
  return cpu_isa() >= Isa::kAvx2 ? Int8KeyKernel::kAvx2 : Int8KeyKernel::kReference;
}

/// The fp16 scales and minima of the 16 blocks b[0, 16) as fp32 (first_words4: no gather).
template <class Block>
KVPACK_TARGET_AVX512_VNNI inline void avx512_scales_and_mins(const Block* b, __m512& scale,
                                                             __m512& min) {
  __m512i words = _mm512_castsi128_si512(first_words4([&](int j) { return b + j; }));
  words = _mm512_inserti32x4(words, first_words4([&](int j) { return b + 4 + j; }), 1);
  words = _mm512_inserti32x4(words, first_words4([&](int j) { return b + 8 + j; }), 2);
  words = _mm512_inserti32x4(words, first_words4([&](int j) { return b + 12 + j; }), 3);
  scale = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(words));
  min = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32(words, 16)));
}

/// The 16 code bytes at `offset` of blocks b[0, 4), transposed: byte 4j + i = byte j of b[i].
template <class Block>
KVPACK_TARGET_AVX512_VNNI inline __m512i avx512_code_quad(const Block* b, int offset,
                                                          __m512i transpose) {
  // Explicit loads, not a lambda: a lambda would not inherit the target attribute.
  const auto* p0 = reinterpret_cast<const __m128i*>(b[0].codes + offset);
  const auto* p1 = reinterpret_cast<const __m128i*>(b[1].codes + offset);
  const auto* p2 = reinterpret_cast<const __m128i*>(b[2].codes + offset);
  const auto* p3 = reinterpret_cast<const __m128i*>(b[3].codes + offset);
  __m512i x = _mm512_castsi128_si512(_mm_loadu_si128(p0));
  x = _mm512_inserti32x4(x, _mm_loadu_si128(p1), 1);
  x = _mm512_inserti32x4(x, _mm_loadu_si128(p2), 2);
  x = _mm512_inserti32x4(x, _mm_loadu_si128(p3), 3);
  return _mm512_permutexvar_epi8(transpose, x);
}

/// Scores of R query rows (q, row stride d) against the G tokens of key group kb (d blocks, one
/// per channel; d % 16 == 0): s[r · s_stride + t] for t < G, as int8_query_group_scores.
/// Scratch w: d floats (the scales), then R · d bytes (the int8 query rows).
template <int R, int Bits, int G>
KVPACK_TARGET_AVX512_VNNI __attribute__((noinline)) void avx512_int8_group_scores(
    const QuantBlock<Bits, G>* kb, int d, const float* q, float* s, int64_t s_stride, float* w) {
  static_assert(kInt8KeyKernel<Bits, G>, "no VNNI kernel for this format");
  int8_t* w8 = reinterpret_cast<int8_t*>(w + d);
  // Scales into w; bias_r = Σ_c q_rc · min_c; max_c |q_rc · scale_c|.
  __m512 bias_v[R], amax_v[R];
  for (int r = 0; r < R; ++r) bias_v[r] = amax_v[r] = _mm512_setzero_ps();
  for (int c = 0; c < d; c += 16) {
    __m512 scale, min;
    avx512_scales_and_mins(kb + c, scale, min);
    _mm512_storeu_ps(w + c, scale);
    for (int r = 0; r < R; ++r) {
      const __m512 qv = _mm512_loadu_ps(q + r * d + c);
      bias_v[r] = _mm512_fmadd_ps(qv, min, bias_v[r]);
      amax_v[r] = _mm512_max_ps(amax_v[r], _mm512_abs_ps(_mm512_mul_ps(qv, scale)));
    }
  }
  // The int8 rows, rounded as quantize_query_int8 rounds (same products, same conversion).
  float alpha[R], bias[R];
  for (int r = 0; r < R; ++r) {
    const Int8QueryStep step = int8_query_step(_mm512_reduce_max_ps(amax_v[r]));
    bias[r] = _mm512_reduce_add_ps(bias_v[r]);
    alpha[r] = step.alpha;
    const __m512 inverse = _mm512_set1_ps(step.inverse);
    for (int c = 0; c < d; c += 16) {
      const __m512 x = _mm512_mul_ps(
          _mm512_mul_ps(_mm512_loadu_ps(q + r * d + c), _mm512_loadu_ps(w + c)), inverse);
      const __m512i i = _mm512_min_epi32(
          _mm512_max_epi32(_mm512_cvtps_epi32(x), _mm512_set1_epi32(-127)), _mm512_set1_epi32(127));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(w8 + r * d + c), _mm512_cvtepi32_epi8(i));
    }
  }
  alignas(64) uint8_t order[64];
  for (int j = 0; j < 16; ++j) {
    for (int i = 0; i < 4; ++i) order[4 * j + i] = static_cast<uint8_t>(16 * i + j);
  }
  const __m512i transpose = _mm512_load_si512(order);
  const __m512i nibble = _mm512_set1_epi8(0x0F);
  // 4-bit: lane j of the sums holds token 2j (low nibbles) and 2j + 1 (high): interleave.
  const __m512i even_odd_lo =
      _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  const __m512i even_odd_hi =
      _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
  for (int k = 0; k < G / 32; ++k) {
    __m512i a0[R], a1[R];  // tokens 2j / 2j + 1 (4-bit) or j / 16 + j (8-bit) in lane j
    for (int r = 0; r < R; ++r) a0[r] = a1[r] = _mm512_setzero_si512();
    for (int c = 0; c < d; c += 4) {
      __m512i x0, x1;
      if constexpr (Bits == 4) {
        const __m512i x = avx512_code_quad(kb + c, 16 * k, transpose);
        x0 = _mm512_and_si512(x, nibble);
        x1 = _mm512_and_si512(_mm512_srli_epi16(x, 4), nibble);
      } else {
        x0 = avx512_code_quad(kb + c, 32 * k, transpose);
        x1 = avx512_code_quad(kb + c, 32 * k + 16, transpose);
      }
      for (int r = 0; r < R; ++r) {
        int32_t quad;
        std::memcpy(&quad, w8 + r * d + c, sizeof(quad));
        const __m512i wq = _mm512_set1_epi32(quad);
        a0[r] = _mm512_dpbusd_epi32(a0[r], x0, wq);
        a1[r] = _mm512_dpbusd_epi32(a1[r], x1, wq);
      }
    }
    for (int r = 0; r < R; ++r) {
      const __m512 al = _mm512_set1_ps(alpha[r]), b = _mm512_set1_ps(bias[r]);
      const __m512 f0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a0[r]), al, b);
      const __m512 f1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a1[r]), al, b);
      float* out = s + r * s_stride + 32 * k;
      if constexpr (Bits == 4) {
        _mm512_storeu_ps(out, _mm512_permutex2var_ps(f0, even_odd_lo, f1));
        _mm512_storeu_ps(out + 16, _mm512_permutex2var_ps(f0, even_odd_hi, f1));
      } else {
        _mm512_storeu_ps(out, f0);
        _mm512_storeu_ps(out + 16, f1);
      }
    }
  }
}

/// Int8-query scores of R rows against key group kb (see avx512_int8_group_scores) by `kernel`
/// where the format has it, else by the scalar reference; d % 16 == 0. Scratch w:
/// int8_key_scratch_floats(R, d) floats.
template <int R, int Bits, int G>
void int8_key_group_scores(Int8KeyKernel kernel, const QuantBlock<Bits, G>* kb, int d,
                           const float* q, float* s, int64_t s_stride, float* w) {
  if constexpr (kInt8KeyKernel<Bits, G>) {
    if (kernel == Int8KeyKernel::kAvx512Vnni) {
      avx512_int8_group_scores<R, Bits, G>(kb, d, q, s, s_stride, w);
      return;
    }
    if (kernel == Int8KeyKernel::kAvx2) {
      avx2_int8_group_scores<R, Bits, G>(kb, d, q, s, s_stride, w);
      return;
    }
  }
  int8_query_group_scores<Bits, G>(kb, d, q, R, s, s_stride, w, reinterpret_cast<int8_t*>(w + d));
}

}  // namespace detail
}  // namespace kvpack
#endif  // KVPACK_X86_DISPATCH
