/// \file backend/cpu/quantized_attention.hpp
/// \brief Decode attention over a Quantize (KIVI) head without a dense copy of the cache: the
/// dequantization is folded into the dot products.
///
/// Keys are stored per channel over groups of G tokens (x̂ = code · scale + min), so a score is
/// q · k̂_t = Σ_c (q_c · scale_c) · code_ct + Σ_c q_c · min_c: per group, the query is scaled
/// once and the min term is one dot product; the kernel then multiplies 8-bit-expanded codes of
/// 16 tokens by broadcast query elements, as a GEMM over (channel, token). Values are stored per
/// token over groups of G channels, so Σ_t p_t · v̂_t = Σ_t (p_t · scale_t) · code_t +
/// Σ_t p_t · min_t per channel group. The fp16 tail (the newest tokens) goes through the dense
/// AVX2 kernels. Results equal the generic path (dequantize a tile, then attend) up to fp32
/// rounding.
#pragma once

#include "../../config.hpp"
// clang-format off
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>
// clang-format on

#include "../../detail/quantized_head_store.hpp"
#include "../../quant/quant_block.hpp"
#include "attention.hpp"

namespace kvpack {
namespace detail {

#if defined(KVPACK_CPU_AVX2)

/// Largest head_dim of the AVX2 quantized kernels (their per-group scales live on the stack).
constexpr int kMaxQuantizedHeadDim = 256;

/// Codes [16k, 16k + 16) of a block's packed codes, one byte each, in token order.
template <int Bits>
inline __m128i avx2_unpack16(const uint8_t* codes, int k) {
  if constexpr (Bits == 8) {
    return _mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + 16 * k));
  } else if constexpr (Bits == 4) {
    const __m128i x = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(codes + 8 * k));
    const __m128i mask = _mm_set1_epi8(0x0F);
    // Element 2i is the low nibble of byte i, 2i + 1 the high one.
    return _mm_unpacklo_epi8(_mm_and_si128(x, mask), _mm_and_si128(_mm_srli_epi16(x, 4), mask));
  } else {
    int32_t word;
    std::memcpy(&word, codes + 4 * k, sizeof(word));
    const __m128i x = _mm_cvtsi32_si128(word);
    const __m128i mask = _mm_set1_epi8(0x03);
    // Element 4i + j sits in bits 2j of byte i.
    const __m128i b0 = _mm_and_si128(x, mask), b1 = _mm_and_si128(_mm_srli_epi16(x, 2), mask);
    const __m128i b2 = _mm_and_si128(_mm_srli_epi16(x, 4), mask);
    const __m128i b3 = _mm_and_si128(_mm_srli_epi16(x, 6), mask);
    return _mm_unpacklo_epi16(_mm_unpacklo_epi8(b0, b1), _mm_unpacklo_epi8(b2, b3));
  }
}

/// The low (half 0) or high (half 1) 8 of 16 byte codes as floats.
inline __m256 avx2_codes_to_float(__m128i codes, int half) {
  return _mm256_cvtepi32_ps(
      _mm256_cvtepu8_epi32(half == 0 ? codes : _mm_unpackhi_epi64(codes, codes)));
}

inline float half_bits_to_float(Half h) { return _cvtsh_ss(h.bits); }

/// Scores of R ≤ 3 query rows (q, row stride d) against the G tokens of key group `grp`:
/// s[r · s_stride + i] for i < G.
template <int R, int Bits, int G>
void avx2_quantized_group_scores(const QuantBlock<Bits, G>* kb, int d, const float* q, float* s,
                                 int64_t s_stride, float* qs) {
  // qs[r · d + c] = q_rc · scale_c; bias_r = Σ_c q_rc · min_c. The group's scales and mins
  // are decoded once for all rows.
  alignas(32) float scale[kMaxQuantizedHeadDim], min[kMaxQuantizedHeadDim];
  for (int c = 0; c < d; ++c) {
    scale[c] = half_bits_to_float(kb[c].scale);
    min[c] = half_bits_to_float(kb[c].min);
  }
  float bias[R];
  for (int r = 0; r < R; ++r) {
    __m256 b = _mm256_setzero_ps();
    for (int c = 0; c < d; c += 8) {
      const __m256 qv = _mm256_loadu_ps(q + r * d + c);
      _mm256_storeu_ps(qs + r * d + c, _mm256_mul_ps(qv, _mm256_load_ps(scale + c)));
      b = _mm256_fmadd_ps(qv, _mm256_load_ps(min + c), b);
    }
    bias[r] = avx2_sum(b);
  }
  for (int k = 0; k < G / 16; ++k) {
    __m256 a[R][2];
    for (int r = 0; r < R; ++r) a[r][0] = a[r][1] = _mm256_set1_ps(bias[r]);
    for (int c = 0; c < d; ++c) {
      const __m128i codes = avx2_unpack16<Bits>(kb[c].codes, k);
      const __m256 lo = avx2_codes_to_float(codes, 0), hi = avx2_codes_to_float(codes, 1);
      for (int r = 0; r < R; ++r) {
        const __m256 b = _mm256_broadcast_ss(qs + r * d + c);
        a[r][0] = _mm256_fmadd_ps(b, lo, a[r][0]);
        a[r][1] = _mm256_fmadd_ps(b, hi, a[r][1]);
      }
    }
    for (int r = 0; r < R; ++r) {
      _mm256_storeu_ps(s + r * s_stride + 16 * k, a[r][0]);
      _mm256_storeu_ps(s + r * s_stride + 16 * k + 8, a[r][1]);
    }
  }
}

/// acc[r · d + c] += Σ_t p[r · p_stride + t] · v̂_t[c] over tokens t < n of value blocks vb
/// (d / G blocks per token). ps is scratch of R · n · (d / G) floats.
template <int R, int Bits, int G>
void avx2_quantized_values(const QuantBlock<Bits, G>* vb, int d, const float* p, int64_t p_stride,
                           int64_t n, float* acc, float* ps) {
  const int groups = d / G;
  // ps[(r · n + t) · groups + g] = p_rt · scale_tg; the min terms summed per (row, group).
  float min_sum[R][16] = {};
  for (int64_t t = 0; t < n; ++t) {
    for (int g = 0; g < groups; ++g) {
      const QuantBlock<Bits, G>& b = vb[t * groups + g];
      const float scale = half_bits_to_float(b.scale), min = half_bits_to_float(b.min);
      for (int r = 0; r < R; ++r) {
        const float pr = p[r * p_stride + t];
        ps[(r * n + t) * groups + g] = pr * scale;
        min_sum[r][g] += pr * min;
      }
    }
  }
  for (int g = 0; g < groups; ++g) {
    for (int k = 0; k < G / 16; ++k) {
      const int c0 = g * G + 16 * k;
      __m256 a[R][2];
      for (int r = 0; r < R; ++r) {
        const __m256 m = _mm256_set1_ps(min_sum[r][g]);
        a[r][0] = _mm256_add_ps(_mm256_loadu_ps(acc + r * d + c0), m);
        a[r][1] = _mm256_add_ps(_mm256_loadu_ps(acc + r * d + c0 + 8), m);
      }
      for (int64_t t = 0; t < n; ++t) {
        const __m128i codes = avx2_unpack16<Bits>(vb[t * groups + g].codes, k);
        const __m256 lo = avx2_codes_to_float(codes, 0), hi = avx2_codes_to_float(codes, 1);
        for (int r = 0; r < R; ++r) {
          const __m256 b = _mm256_broadcast_ss(ps + (r * n + t) * groups + g);
          a[r][0] = _mm256_fmadd_ps(b, lo, a[r][0]);
          a[r][1] = _mm256_fmadd_ps(b, hi, a[r][1]);
        }
      }
      for (int r = 0; r < R; ++r) {
        _mm256_storeu_ps(acc + r * d + c0, a[r][0]);
        _mm256_storeu_ps(acc + r * d + c0 + 8, a[r][1]);
      }
    }
  }
}

/// Decode attention of `rows` rows over quantized tokens [begin, end) (end ≤ store.quantized),
/// rows in groups of up to three (one GQA group per pass), tiles of whole key groups.
template <int Bits, int G>
void avx2_quantized_attend(const QuantizedHeadStore& store, int d, const float* q, int rows,
                           const int64_t* visible, int64_t begin, int64_t end,
                           cpu::PartialState& state, std::vector<float>& scratch) {
  using Block = QuantBlock<Bits, G>;
  const auto* kb = reinterpret_cast<const Block*>(store.key_blocks.data());
  const auto* vb = reinterpret_cast<const Block*>(store.value_blocks.data());
  constexpr int64_t kTile = G >= 128 ? G : 128 / G * G;  // whole groups, ~128 tokens
  constexpr int64_t stride = kTile;
  // Scratch: scores 3 × tile, scaled queries 3 × d, value scales 3 × tile × (d / G).
  scratch.resize(static_cast<std::size_t>(3) * stride + 3 * d + 3 * kTile * (d / G));
  float* s = scratch.data();
  float* qs = s + 3 * stride;
  float* ps = qs + 3 * d;
  for (int64_t t0 = begin / G * G; t0 < end; t0 += kTile) {
    const int64_t a = std::max(begin, t0);  // first token of this tile in the range
    const int64_t tn = std::min(t0 + kTile, end) - a;
    for (int r0 = 0; r0 < rows; r0 += 3) {
      const int nr = std::min(3, rows - r0);
      int64_t n = 0;  // tokens from a that some row of the group sees
      for (int r = r0; r < r0 + nr; ++r)
        n = std::max(n, std::clamp<int64_t>(visible[r] - a, 0, tn));
      if (n == 0) continue;
      const float* qg = q + static_cast<std::size_t>(r0) * d;
      // Scores of the whole groups covering [a, a + n); s[r · stride + (t − t0)].
      for (int64_t g0 = t0; g0 < a + n; g0 += G) {
        const Block* group = kb + (g0 / G) * d;
        float* sg = s + (g0 - t0);
        if (nr == 3) {
          avx2_quantized_group_scores<3, Bits, G>(group, d, qg, sg, stride, qs);
        } else if (nr == 2) {
          avx2_quantized_group_scores<2, Bits, G>(group, d, qg, sg, stride, qs);
        } else {
          avx2_quantized_group_scores<1, Bits, G>(group, d, qg, sg, stride, qs);
        }
      }
      float* sa = s + (a - t0);
      for (int r = r0; r < r0 + nr; ++r) {
        const int64_t vis = std::clamp<int64_t>(visible[r] - a, 0, tn);
        softmax_tile_row(sa + (r - r0) * stride, vis, n, state.max[r], state.sum[r],
                         state.acc.data() + static_cast<std::size_t>(r) * d, d);
      }
      float* ag = state.acc.data() + static_cast<std::size_t>(r0) * d;
      const Block* vt = vb + a * (d / G);
      if (nr == 3) {
        avx2_quantized_values<3, Bits, G>(vt, d, sa, stride, n, ag, ps);
      } else if (nr == 2) {
        avx2_quantized_values<2, Bits, G>(vt, d, sa, stride, n, ag, ps);
      } else {
        avx2_quantized_values<1, Bits, G>(vt, d, sa, stride, n, ag, ps);
      }
    }
  }
}

#endif  // KVPACK_CPU_AVX2

}  // namespace detail

namespace cpu {

/// attend_rows (see attention.hpp) over a Quantize head: few rows (decode) fold the
/// dequantization into the dot products for the quantized tokens and read the fp16 tail
/// directly; many rows (prefill chunks) dequantize tile by tile and use GEMMs.
inline void attend_rows(const detail::QuantizedHeadStore::Rows& head, int d, const float* q,
                        int rows, const int64_t* visible, int64_t begin, int64_t end,
                        PartialState& state, std::vector<float>& scratch) {
#if defined(KVPACK_CPU_AVX2)
  const detail::QuantizedHeadStore& store = *head.store;
  int64_t row_visible_max = 0;
  for (int r = 0; r < rows; ++r) row_visible_max = std::max(row_visible_max, visible[r]);
  end = std::min(end, row_visible_max);
  // Value groups must not exceed the per-(row, group) min sums of the kernel (d / G ≤ 16).
  if (rows < kGemmRows && d % 16 == 0 && d <= detail::kMaxQuantizedHeadDim &&
      d / store.group <= 16 && begin < end) {
    const int64_t split = std::clamp(store.quantized, begin, end);
    if (begin < split) {
      dispatch_quant(store.bits, store.group, [&](auto b, auto g) {
        detail::avx2_quantized_attend<decltype(b)::value, decltype(g)::value>(
            store, d, q, rows, visible, begin, split, state, scratch);
      });
    }
    if (split < end) {
      // The fp16 tail as dense rows, indices shifted to start at the first tail token.
      const int64_t first = store.quantized;
      const DenseRows<Half> tail{store.tail_k.data(), store.tail_v.data(),
                                 store.positions.data() + first, store.size() - first, d};
      std::vector<int64_t> tail_visible(rows);
      for (int r = 0; r < rows; ++r) tail_visible[r] = std::max<int64_t>(0, visible[r] - first);
      attend_rows(tail, d, q, rows, tail_visible.data(), split - first, end - first, state,
                  scratch);
    }
    return;
  }
#endif
  attend_rows<detail::QuantizedHeadStore::Rows>(head, d, q, rows, visible, begin, end, state,
                                                scratch);
}

}  // namespace cpu
}  // namespace kvpack
