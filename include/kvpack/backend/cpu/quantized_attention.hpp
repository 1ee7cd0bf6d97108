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
/// decode kernels (attention.hpp). Results equal the generic path (dequantize a tile, then attend)
/// up to fp32 rounding.
#pragma once

#include "../../config.hpp"
// clang-format off
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>
// clang-format on

#include "../../quant/quant_block.hpp"
#include "attention.hpp"
#include "quantized_head_store.hpp"
#include "simd/int8_key_scores.hpp"
#include "simd/quant_scales_avx2.hpp"

namespace kvpack {
namespace detail {

#if defined(KVPACK_X86_DISPATCH)

/// Codes of a block are decoded in chunks of kChunk = 32 elements (16 when G = 16), two
/// vectors of 8 per pass, in "slot order": the lanes of one 8-byte load widened to 32 bits
/// (vpmovzxbd), each lane holding 8 / Bits codes, give one vector per code slot without any byte
/// shuffling. 4-bit: pass p yields elements 16p + {0, 2, .., 14} and 16p + {1, 3, .., 15};
/// 2-bit: pass 0 yields elements 4i and 4i + 1, pass 1 4i + 2 and 4i + 3 (i < 8); 8-bit is in
/// element order. avx2_natural_order() puts the results of all passes back in element order.
template <int Bits, int G>
constexpr int code_chunk() {
  return G % 32 == 0 ? 32 : 16;
}

/// 8 bytes widened to 8 lanes of 32 bits.
KVPACK_TARGET_AVX2 inline __m256i avx2_widen8(const uint8_t* p) {
  return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
}

/// Pass `pass` of the chunk of codes starting at element `first` (see code_chunk).
template <int Bits, int Chunk>
KVPACK_TARGET_AVX2 inline void avx2_decode_pass(const uint8_t* codes, int first, int pass,
                                                __m256& x0, __m256& x1) {
  if constexpr (Bits == 8) {
    const uint8_t* c = codes + first + 16 * pass;
    x0 = _mm256_cvtepi32_ps(avx2_widen8(c));
    x1 = _mm256_cvtepi32_ps(avx2_widen8(c + 8));
  } else if constexpr (Bits == 4) {
    const __m256i w = avx2_widen8(codes + (first + 16 * pass) / 2);
    x0 = _mm256_cvtepi32_ps(_mm256_and_si256(w, _mm256_set1_epi32(0x0F)));
    x1 = _mm256_cvtepi32_ps(_mm256_srli_epi32(w, 4));
  } else if constexpr (Chunk == 32) {
    const __m256i w = _mm256_srli_epi32(avx2_widen8(codes + first / 4), 4 * pass);
    const __m256i mask = _mm256_set1_epi32(0x03);
    x0 = _mm256_cvtepi32_ps(_mm256_and_si256(w, mask));
    x1 = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(w, 2), mask));
  } else {
    // 16 2-bit codes are 4 bytes: unpack them in element order instead.
    int32_t word;
    std::memcpy(&word, codes + first / 4, sizeof(word));
    const __m128i x = _mm_cvtsi32_si128(word);
    const __m128i mask = _mm_set1_epi8(0x03);
    const __m128i b0 = _mm_and_si128(x, mask), b1 = _mm_and_si128(_mm_srli_epi16(x, 2), mask);
    const __m128i b2 = _mm_and_si128(_mm_srli_epi16(x, 4), mask);
    const __m128i b3 = _mm_and_si128(_mm_srli_epi16(x, 6), mask);
    const __m128i b = _mm_unpacklo_epi16(_mm_unpacklo_epi8(b0, b1), _mm_unpacklo_epi8(b2, b3));
    x0 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(b));
    x1 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_unpackhi_epi64(b, b)));
  }
}

/// out[0, Chunk) in element order from the pass results v[0, Chunk / 8) (v[2p], v[2p + 1] from
/// pass p; see code_chunk).
template <int Bits, int Chunk>
KVPACK_TARGET_AVX2 inline void avx2_natural_order(const __m256* v, float* out) {
  if constexpr (Bits == 8 || (Bits == 2 && Chunk == 16)) {
    for (int i = 0; i < Chunk / 8; ++i) _mm256_storeu_ps(out + 8 * i, v[i]);
  } else if constexpr (Bits == 4) {
    for (int p = 0; p < Chunk / 16; ++p) {  // even / odd elements → interleaved
      const __m256 lo = _mm256_unpacklo_ps(v[2 * p], v[2 * p + 1]);
      const __m256 hi = _mm256_unpackhi_ps(v[2 * p], v[2 * p + 1]);
      _mm256_storeu_ps(out + 16 * p, _mm256_permute2f128_ps(lo, hi, 0x20));
      _mm256_storeu_ps(out + 16 * p + 8, _mm256_permute2f128_ps(lo, hi, 0x31));
    }
  } else {  // 2-bit, 32 elements: element 4i + j is lane i of v[j] (a 4 × 8 transpose)
    const __m256 t0 = _mm256_unpacklo_ps(v[0], v[1]), t1 = _mm256_unpackhi_ps(v[0], v[1]);
    const __m256 t2 = _mm256_unpacklo_ps(v[2], v[3]), t3 = _mm256_unpackhi_ps(v[2], v[3]);
    const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
    const __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
    _mm256_storeu_ps(out, _mm256_permute2f128_ps(u0, u1, 0x20));
    _mm256_storeu_ps(out + 8, _mm256_permute2f128_ps(u2, u3, 0x20));
    _mm256_storeu_ps(out + 16, _mm256_permute2f128_ps(u0, u1, 0x31));
    _mm256_storeu_ps(out + 24, _mm256_permute2f128_ps(u2, u3, 0x31));
  }
}

/// Independent accumulator chains: an FMA's result feeds the next FMA of its accumulator 4
/// cycles later and two FMAs issue a cycle, so one or two rows (2R accumulators) leave the units
/// idle; they split the reduction into two interleaved chains. Three rows with two chains (12
/// accumulators) spill registers and measured 20 % slower on Zen 3, so from three rows on: one.
template <int R>
constexpr int fma_chains() {
  return R >= 3 ? 1 : 2;
}

/// Scores of R ≤ cpu::kDecodePassRows query rows (q, row stride d) against the G tokens of key
/// group `kb` (d blocks, one per channel): s[r · s_stride + i] for i < G. qs: scratch of R · d
/// floats. d must be a multiple of 16. Kept out of line: inlined into avx2_quantized_pass it
/// measured 12 percent slower on Zen 3 (register allocation of the larger function).
template <int R, int Bits, int G>
KVPACK_TARGET_AVX2 __attribute__((noinline)) void avx2_quantized_group_scores(
    const QuantBlock<Bits, G>* kb, int d, const float* q, float* s, int64_t s_stride, float* qs) {
  // 16 tokens per pass; channels alternate between the chains.
  constexpr int kChunk = code_chunk<Bits, G>();
  constexpr int kChains = fma_chains<R>();
  // qs[r · d + c] = q_rc · scale_c; bias_r = Σ_c q_rc · min_c, 8 channels at a time.
  __m256 b[R];
  for (int r = 0; r < R; ++r) b[r] = _mm256_setzero_ps();
  for (int c = 0; c < d; c += 8) {
    __m256 scale, min;
    avx2_scales_and_mins(kb + c, scale, min);
    for (int r = 0; r < R; ++r) {
      const __m256 qv = _mm256_loadu_ps(q + r * d + c);
      _mm256_storeu_ps(qs + r * d + c, _mm256_mul_ps(qv, scale));
      b[r] = _mm256_fmadd_ps(qv, min, b[r]);
    }
  }
  float bias[R];
  for (int r = 0; r < R; ++r) bias[r] = avx2::hsum(b[r]);
  for (int k = 0; k < G / kChunk; ++k) {
    __m256 v[R][kChunk / 8];
    for (int pass = 0; pass < kChunk / 16; ++pass) {
      __m256 a[kChains][R][2];
      for (int h = 0; h < kChains; ++h)
        for (int r = 0; r < R; ++r) a[h][r][0] = a[h][r][1] = _mm256_setzero_ps();
      for (int c = 0; c < d; c += kChains) {
        for (int h = 0; h < kChains; ++h) {
          __m256 x0, x1;
          avx2_decode_pass<Bits, kChunk>(kb[c + h].codes, kChunk * k, pass, x0, x1);
          for (int r = 0; r < R; ++r) {
            const __m256 b = _mm256_broadcast_ss(qs + r * d + c + h);
            a[h][r][0] = _mm256_fmadd_ps(b, x0, a[h][r][0]);
            a[h][r][1] = _mm256_fmadd_ps(b, x1, a[h][r][1]);
          }
        }
      }
      for (int r = 0; r < R; ++r) {
        const __m256 bias_r = _mm256_set1_ps(bias[r]);
        v[r][2 * pass] = _mm256_add_ps(a[0][r][0], bias_r);
        v[r][2 * pass + 1] = _mm256_add_ps(a[0][r][1], bias_r);
        for (int h = 1; h < kChains; ++h) {
          v[r][2 * pass] = _mm256_add_ps(v[r][2 * pass], a[h][r][0]);
          v[r][2 * pass + 1] = _mm256_add_ps(v[r][2 * pass + 1], a[h][r][1]);
        }
      }
    }
    for (int r = 0; r < R; ++r)
      avx2_natural_order<Bits, kChunk>(v[r], s + r * s_stride + kChunk * k);
  }
}

/// acc[r · d + c] += Σ_t p[r · p_stride + t] · v̂_t[c] over tokens t < n, whose d / G value
/// blocks start at vt[t] (in their pages: a tile's tokens span pages, and copying them into one
/// run took a fifth of the 4-bit attend on Zen 3); p[r · p_stride + t] for t in [n, n rounded up
/// to 8) are zeroed. ps: scratch of R · (d / G) · (n + 8) floats.
template <int R, int Bits, int G>
KVPACK_TARGET_AVX2 void avx2_quantized_values(const QuantBlock<Bits, G>* const* vt, int d, float* p,
                                              int64_t p_stride, int64_t n, float* acc, float* ps) {
  constexpr int kChunk = code_chunk<Bits, G>();  // 16 channels per pass, as the key kernel
  constexpr int kChains = fma_chains<R>();
  const int groups = d / G;
  const int64_t n8 = (n + 7) / 8 * 8;
  for (int r = 0; r < R; ++r) std::fill(p + r * p_stride + n, p + r * p_stride + n8, 0.0f);
  // ps[(r · groups + g) · n8 + t] = p_rt · scale_tg and the min terms Σ_t p_rt · min_tg,
  // 8 tokens at a time.
  float min_sum[R][16];
  for (int g = 0; g < groups; ++g) {
    __m256 m[R];
    for (int r = 0; r < R; ++r) m[r] = _mm256_setzero_ps();
    for (int64_t t0 = 0; t0 < n8; t0 += 8) {
      __m256 scale, min;
      avx2_row_scales_and_mins(vt + t0, g, static_cast<int>(std::min<int64_t>(8, n - t0)), scale,
                               min);
      for (int r = 0; r < R; ++r) {
        const __m256 pv = _mm256_loadu_ps(p + r * p_stride + t0);
        _mm256_storeu_ps(ps + (r * groups + g) * n8 + t0, _mm256_mul_ps(pv, scale));
        m[r] = _mm256_fmadd_ps(pv, min, m[r]);
      }
    }
    for (int r = 0; r < R; ++r) min_sum[r][g] = avx2::hsum(m[r]);
  }
  for (int g = 0; g < groups; ++g) {
    for (int k = 0; k < G / kChunk; ++k) {
      const int c0 = g * G + kChunk * k;
      __m256 v[R][kChunk / 8];
      for (int pass = 0; pass < kChunk / 16; ++pass) {
        // Tokens alternate between the chains (fma_chains); an odd last token goes to chain 0.
        __m256 a[kChains][R][2];
        for (int h = 0; h < kChains; ++h)
          for (int r = 0; r < R; ++r) a[h][r][0] = a[h][r][1] = _mm256_setzero_ps();
        const int64_t paired = n / kChains * kChains;
        for (int64_t t = 0; t < n; t += kChains) {
          const int chains = t < paired ? kChains : 1;
          for (int h = 0; h < chains; ++h) {
            __m256 x0, x1;
            avx2_decode_pass<Bits, kChunk>(vt[t + h][g].codes, kChunk * k, pass, x0, x1);
            for (int r = 0; r < R; ++r) {
              const __m256 b = _mm256_broadcast_ss(ps + (r * groups + g) * n8 + t + h);
              a[h][r][0] = _mm256_fmadd_ps(b, x0, a[h][r][0]);
              a[h][r][1] = _mm256_fmadd_ps(b, x1, a[h][r][1]);
            }
          }
        }
        for (int r = 0; r < R; ++r) {
          v[r][2 * pass] = a[0][r][0];
          v[r][2 * pass + 1] = a[0][r][1];
          for (int h = 1; h < kChains; ++h) {
            v[r][2 * pass] = _mm256_add_ps(v[r][2 * pass], a[h][r][0]);
            v[r][2 * pass + 1] = _mm256_add_ps(v[r][2 * pass + 1], a[h][r][1]);
          }
        }
      }
      // Back to channel order, then acc += Σ_t p_t (scale_t · code_t + min_t).
      for (int r = 0; r < R; ++r) {
        alignas(32) float natural[32];
        avx2_natural_order<Bits, kChunk>(v[r], natural);
        const __m256 m = _mm256_set1_ps(min_sum[r][g]);
        for (int i = 0; i < kChunk; i += 8) {
          float* dst = acc + r * d + c0 + i;
          _mm256_storeu_ps(dst, _mm256_add_ps(_mm256_loadu_ps(dst),
                                              _mm256_add_ps(_mm256_load_ps(natural + i), m)));
        }
      }
    }
  }
}

/// One pass of R rows (q, state rows r0 .. r0 + R − 1) over tokens [a, a + n) of the tile of
/// whole key groups starting at t0 (a − t0 < G); row r sees vis[r − r0] of those tokens.
/// kb[i]: the key blocks of the tile's group i; vt[i]: the d / G value blocks of token a + i. Keys
/// are scored in fp32, or from an int8 query (`int8`: Quantize::int8_query) by the integer-dot
/// kernel `keys`. Scratch: s (R × stride scores), qs (int8_key_scratch_floats(R, d) ≥ R × d), ps (R
/// × (n + 8) × (d / G)).
template <int R, int Bits, int G>
KVPACK_TARGET_AVX2 void avx2_quantized_pass(const QuantBlock<Bits, G>* const* kb,
                                            const QuantBlock<Bits, G>* const* vt, int d,
                                            const float* q, const int64_t* vis, int64_t t0,
                                            int64_t a, int64_t n, float* max, float* sum,
                                            float* acc, float* s, int64_t stride, float* qs,
                                            float* ps, bool int8, Int8KeyKernel keys) {
  // Scores of the whole groups covering [a, a + n); s[r · stride + (t − t0)].
  for (int64_t g0 = t0; g0 < a + n; g0 += G) {
    const QuantBlock<Bits, G>* group = kb[(g0 - t0) / G];
    // The next group's d blocks (scales first): without this, the first scale loads of each
    // group waited on memory (~40 % of the key kernel's samples on Zen 4).
    if (g0 + G < a + n) prefetch_l1(kb[(g0 - t0) / G + 1], d);
    if (int8) {
      int8_key_group_scores<R, Bits, G>(keys, group, d, q, s + (g0 - t0), stride, qs);
    } else {
      avx2_quantized_group_scores<R, Bits, G>(group, d, q, s + (g0 - t0), stride, qs);
    }
  }
  float* sa = s + (a - t0);
  for (int r = 0; r < R; ++r)
    softmax_tile_row(sa + r * stride, vis[r], n, max[r], sum[r], acc + r * d, d);
  avx2_quantized_values<R, Bits, G>(vt, d, sa, stride, n, acc, ps);
}

/// Decode attention of `rows` rows over quantized tokens [begin, end) (end ≤ store.quantized),
/// rows in passes of up to cpu::kDecodePassRows (one GQA group per pass), tiles of whole key
/// groups.
template <int Bits, int G, class Store>
KVPACK_TARGET_AVX2 void avx2_quantized_attend(const Store& store, int d, const float* q, int rows,
                                              const int64_t* visible, int64_t begin, int64_t end,
                                              cpu::PartialState& state,
                                              std::vector<float>& scratch) {
  using Block = QuantBlock<Bits, G>;
  constexpr int kRows = cpu::kDecodePassRows;
  constexpr int64_t kTile = G >= 128 ? G : 128 / G * G;  // whole groups, ~128 tokens
  constexpr int64_t stride = kTile + 8;  // room for the values kernel's zero padding
  // Scratch: scores (tile) and scaled probabilities ((tile + 8) × (d / G)) per pass row; the
  // key kernels' query scratch (the scaled rows, or the int8 key kernels' scales and rows).
  const int64_t query_scratch = int8_key_scratch_floats(kRows, d);
  scratch.resize(
      static_cast<std::size_t>(kRows * (stride + (kTile + 8) * (d / G)) + query_scratch));
  float* s = scratch.data();
  float* qs = s + kRows * stride;
  float* ps = qs + query_scratch;
  // Key blocks of each group of the tile and value blocks of each token: the page table walked
  // once per tile.
  const Block* kb[kTile / G];
  const Block* vt[kTile];
  const int pass_rows = cpu::decode_pass_rows(rows);
  const bool int8 = store.int8_query;
  const Int8KeyKernel keys = int8_key_kernel();
  for (int64_t t0 = begin / G * G; t0 < end; t0 += kTile) {
    const int64_t a = std::max(begin, t0);  // first token of this tile in the range
    const int64_t tn = std::min(t0 + kTile, end) - a;
    for (int64_t g = 0; g * G < a + tn - t0; ++g)
      kb[g] = reinterpret_cast<const Block*>(store.key_group(t0 / G + g));
    for (int64_t t = a; t < a + tn;) {  // page run by page run
      const auto* first = reinterpret_cast<const Block*>(store.value_token(t));
      const int64_t stop = std::min(a + tn, (t / store.page_tokens + 1) * store.page_tokens);
      for (int64_t i = 0; t + i < stop; ++i) vt[t - a + i] = first + i * (d / G);
      t = stop;
    }
    for (int r0 = 0; r0 < rows; r0 += pass_rows) {
      const int nr = std::min(pass_rows, rows - r0);
      int64_t vis[kRows];
      int64_t n = 0;  // tokens from a that some row of the pass sees
      for (int r = 0; r < nr; ++r) {
        vis[r] = std::clamp<int64_t>(visible[r0 + r] - a, 0, tn);
        n = std::max(n, vis[r]);
      }
      if (n == 0) continue;
      const float* qp = q + static_cast<std::size_t>(r0) * d;
      float* acc = state.acc.data() + static_cast<std::size_t>(r0) * d;
      float* mx = state.max.data() + r0;
      float* sm = state.sum.data() + r0;
      if (nr == 4) {
        avx2_quantized_pass<4, Bits, G>(kb, vt, d, qp, vis, t0, a, n, mx, sm, acc, s, stride, qs,
                                        ps, int8, keys);
      } else if (nr == 3) {
        avx2_quantized_pass<3, Bits, G>(kb, vt, d, qp, vis, t0, a, n, mx, sm, acc, s, stride, qs,
                                        ps, int8, keys);
      } else if (nr == 2) {
        avx2_quantized_pass<2, Bits, G>(kb, vt, d, qp, vis, t0, a, n, mx, sm, acc, s, stride, qs,
                                        ps, int8, keys);
      } else {
        avx2_quantized_pass<1, Bits, G>(kb, vt, d, qp, vis, t0, a, n, mx, sm, acc, s, stride, qs,
                                        ps, int8, keys);
      }
    }
  }
}

#endif  // KVPACK_X86_DISPATCH

}  // namespace detail

namespace cpu {

/// attend_rows (see attention.hpp) over a KIVI head (the cache's, or caller-owned pages): few
/// rows (decode) fold the dequantization into the dot products for the quantized tokens and read
/// the fp16 tail directly; many rows (prefill chunks) dequantize tile by tile and use GEMMs.
/// The store's int8_query (Quantize::int8_query) applies to the folded path only (AVX2 or better,
/// head_dim % 16 == 0, fewer than kGemmRows rows): the others score exactly.
template <class Store>
struct RowsAttention<detail::KiviRows<Store>> {
  static void attend(const detail::KiviRows<Store>& head, int d, const float* q, int rows,
                     const int64_t* visible, int64_t begin, int64_t end, PartialState& state,
                     std::vector<float>& scratch) {
#if defined(KVPACK_X86_DISPATCH)
    const Store& store = *head.store;
    // Value groups must not exceed the per-(row, group) min sums of the kernel (d / G ≤ 16).
    if (cpu_isa() >= Isa::kAvx2 && rows < kGemmRows && d % 16 == 0 && d / store.group <= 16) {
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
        const DenseRows<Half> tail{store.tail_keys(), store.tail_values(),
                                   head.positions != nullptr ? head.positions + first : nullptr,
                                   head.size - first, d};
        std::vector<int64_t> tail_visible(rows);
        for (int r = 0; r < rows; ++r) tail_visible[r] = std::max<int64_t>(0, visible[r] - first);
        attend_rows(tail, d, q, rows, tail_visible.data(), split - first, end - first, state,
                    scratch);
      }
      return;
    }
#endif
    detail::attend_rows_tiled(head, d, q, rows, visible, begin, end, state, scratch);
  }
};

}  // namespace cpu
}  // namespace kvpack
