/// \file backend/cpu/attention.hpp
/// \brief Tiled decode/prefill attention over one head's stored K/V on the CPU.
///
/// Keys are visited in tiles; each tile is read from memory once per call and reused by every
/// query row of the GQA group (and of the query block). Few rows (decode) run register-blocked
/// AVX2 kernels that convert fp16 rows inside the dot products and the value accumulation (the
/// decode step is bound by memory bandwidth, so K and V are read once and never written back);
/// many rows (prefill chunks) convert a tile to fp32 once and use Eigen GEMMs. Softmax uses a
/// vectorised exp (Cephes polynomial, ≤ 2 ulp) on AVX2. The AVX2 kernels carry target
/// attributes and are chosen at run time (isa.hpp), whatever the consumer's flags.
#pragma once

#include <Eigen/Core>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "../../config.hpp"
#include "../../detail/convert.hpp"
#include "../../detail/online_softmax.hpp"
#include "../../half.hpp"
#include "../../isa.hpp"
#include "dense_rows.hpp"

namespace kvpack {
namespace cpu {

/// Keys per tile: 128 × head_dim fp32 for K and V stays inside L1/L2.
constexpr int64_t kAttentionTile = 128;
/// Row counts at or above this use GEMMs for the score and value products.
constexpr int kGemmRows = 16;

/// Query rows the decode kernels take in one pass: a whole GQA group of up to four (Llama-3's
/// 32 / 8) converts or decodes each key and value once. More rows split evenly (8 → 4 + 4,
/// 9 → 3 + 3 + 3).
constexpr int kDecodePassRows = 4;

/// Rows of each pass when `rows` rows are split evenly into passes of ≤ kDecodePassRows.
inline int decode_pass_rows(int rows) {
  const int passes = (rows + kDecodePassRows - 1) / kDecodePassRows;
  return (rows + passes - 1) / passes;
}

/// \brief Partial attention state of `rows` query rows: running max, denominator, accumulator.
struct PartialState {
  std::vector<float> max, sum, acc;  // rows, rows, rows × d
  void reset(int rows, int d) {
    max.assign(rows, detail::neg_inf());
    sum.assign(rows, 0.0f);
    acc.assign(static_cast<std::size_t>(rows) * d, 0.0f);
  }
};

}  // namespace cpu

namespace detail {

#if defined(KVPACK_X86_DISPATCH)
KVPACK_TARGET_AVX2 inline __m256 avx2_load(const float* p) { return _mm256_loadu_ps(p); }
KVPACK_TARGET_AVX2 inline __m256 avx2_load(const Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

/// exp of 8 lanes (Cephes expf: range reduction by ln 2, degree-5 polynomial); relative error
/// ≤ 2 ulp on [-87.3, 88.3]; inputs below clamp to exp(-87.3) ≈ 1.2e-38.
KVPACK_TARGET_AVX2 inline __m256 avx2_exp(__m256 x) {
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

KVPACK_TARGET_AVX2 inline float avx2_sum(__m256 a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

KVPACK_TARGET_AVX2 inline float avx2_max(__m256 a) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
}

/// Stores the horizontal sums of a and b to dst[0] and dst[1].
KVPACK_TARGET_AVX2 inline void avx2_store_sums(float* dst, __m256 a, __m256 b) {
  const __m256 h = _mm256_hadd_ps(a, b);  // a01 a23 b01 b23 | a45 a67 b45 b67
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
  s = _mm_hadd_ps(s, s);  // a b a b
  _mm_storel_pi(reinterpret_cast<__m64*>(dst), s);
}

/// Scores of R query rows (q, row stride d) against the K key rows k[0..K) (d % 8 == 0):
/// s[r * s_stride + i] = q_r · k_i. Each query load serves K keys, each key load R rows; R · K ≤ 9
/// accumulators plus K keys and one query stay within the 16 ymm registers. Rows are addressed
/// one by one (a tile's row pointers), so a group may span pages.
template <int R, int K, class T>
KVPACK_TARGET_AVX2 void avx2_score_keys(const float* q, int d, const T* const* k, float* s,
                                        int64_t s_stride) {
  __m256 a[R][K];
  for (int r = 0; r < R; ++r) {
    for (int i = 0; i < K; ++i) a[r][i] = _mm256_setzero_ps();
  }
  for (int j = 0; j < d; j += 8) {
    __m256 x[K];
    for (int i = 0; i < K; ++i) x[i] = avx2_load(k[i] + j);
    for (int r = 0; r < R; ++r) {
      const __m256 qv = _mm256_loadu_ps(q + r * d + j);
      for (int i = 0; i < K; ++i) a[r][i] = _mm256_fmadd_ps(qv, x[i], a[r][i]);
    }
  }
  // Every key's horizontal sum in the same order (a lone key as half of a pair), so a score does
  // not depend on how keys were grouped (K) or rows passed (R): bit-identical for any grouping.
  for (int r = 0; r < R; ++r) {
    int i = 0;
    for (; i + 2 <= K; i += 2) avx2_store_sums(s + r * s_stride + i, a[r][i], a[r][i + 1]);
    if (i < K) {
      float pair[2];
      avx2_store_sums(pair, a[r][i], a[r][i]);
      s[r * s_stride + i] = pair[0];
    }
  }
}

/// Prefetches `count` elements from p into L1.
template <class T>
KVPACK_TARGET_AVX2 void avx2_prefetch(const T* p, int64_t count) {
  const char* bytes = reinterpret_cast<const char*>(p);
  for (int64_t o = 0; o < count * static_cast<int64_t>(sizeof(T)); o += 64) {
    _mm_prefetch(bytes + o, _MM_HINT_T0);
  }
}

/// Scores of R query rows against key rows k[0, n), K = 3 keys at a time (2 for four rows: R · K
/// accumulators + K keys + 1 query ≤ 16 ymm). The value rows v of the same keys are prefetched as
/// the keys go by (v null: not), so the value pass that follows does not wait for memory.
template <int R, class T>
KVPACK_TARGET_AVX2 void avx2_tile_scores(const float* q, int d, const T* const* k, int64_t n,
                                         float* s, int64_t s_stride, const T* const* v) {
  constexpr int K = R >= 4 ? 2 : 3;
  int64_t i = 0;
  for (; i + K <= n; i += K) {
    if (v != nullptr) {
      for (int j = 0; j < K; ++j) avx2_prefetch(v[i + j], d);
    }
    avx2_score_keys<R, K>(q, d, k + i, s + i, s_stride);
  }
  if (n - i == 2) avx2_score_keys<R, 2>(q, d, k + i, s + i, s_stride);
  if (n - i == 1) avx2_score_keys<R, 1>(q, d, k + i, s + i, s_stride);
}

/// acc[r][j0, j0 + 8C) += Σ_i p[r * p_stride + i] · v_i[j0, j0 + 8C) over value rows v[0, n). The
/// R · C accumulators stay in registers for the whole tile (R · C + C + 1 ≤ 16 ymm: no spill,
/// whose store-to-load round trip would serialise the loop). Row i also prefetches key row
/// next[i] while i < next_rows (the next tile).
template <int R, int C, class T>
KVPACK_TARGET_AVX2 void avx2_tile_values_chunk(const float* p, int64_t p_stride, const T* const* v,
                                               int64_t n, int d, int j0, float* acc,
                                               const T* const* next, int64_t next_rows) {
  __m256 a[R][C];
  for (int r = 0; r < R; ++r) {
    for (int c = 0; c < C; ++c) a[r][c] = _mm256_loadu_ps(acc + r * d + j0 + 8 * c);
  }
  for (int64_t i = 0; i < n; ++i) {
    if (i < next_rows) avx2_prefetch(next[i], d);
    const T* vi = v[i] + j0;
    __m256 x[C];
    for (int c = 0; c < C; ++c) x[c] = avx2_load(vi + 8 * c);
    for (int r = 0; r < R; ++r) {
      const __m256 pr = _mm256_broadcast_ss(p + r * p_stride + i);
      for (int c = 0; c < C; ++c) a[r][c] = _mm256_fmadd_ps(pr, x[c], a[r][c]);
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int c = 0; c < C; ++c) _mm256_storeu_ps(acc + r * d + j0 + 8 * c, a[r][c]);
  }
}

/// Value accumulation of R rows over value rows v[0, n) in channel chunks of 24 (16 for four
/// rows, see avx2_tile_values_chunk), then 16 or 8.
template <int R, class T>
KVPACK_TARGET_AVX2 void avx2_tile_values(const float* p, int64_t p_stride, const T* const* v,
                                         int64_t n, int d, float* acc, const T* const* next,
                                         int64_t next_rows) {
  // The first chunk also prefetches `next_rows` key rows of the next tile.
  constexpr int kWide = R >= 4 ? 16 : 24;
  int j0 = 0;
  for (; j0 + kWide <= d; j0 += kWide) {
    avx2_tile_values_chunk<R, kWide / 8>(p, p_stride, v, n, d, j0, acc, next,
                                         j0 == 0 ? next_rows : 0);
  }
  if (d - j0 == 16) {
    avx2_tile_values_chunk<R, 2>(p, p_stride, v, n, d, j0, acc, next, j0 == 0 ? next_rows : 0);
  }
  if (d - j0 == 8) {
    avx2_tile_values_chunk<R, 1>(p, p_stride, v, n, d, j0, acc, next, j0 == 0 ? next_rows : 0);
  }
}

/// row_max on AVX2 (n >= 1).
KVPACK_TARGET_AVX2 inline float avx2_row_max(const float* x, int64_t n) {
  float m = x[0];
  int64_t i = 0;
  if (n >= 8) {
    __m256 mv = _mm256_loadu_ps(x);
    for (i = 8; i + 8 <= n; i += 8) mv = _mm256_max_ps(mv, _mm256_loadu_ps(x + i));
    m = avx2_max(mv);
  }
  for (; i < n; ++i) m = std::max(m, x[i]);
  return m;
}

/// exp_shifted on AVX2: every lane, the tail included, comes from the same polynomial.
KVPACK_TARGET_AVX2 inline float avx2_exp_shifted(float* x, int64_t n, float shift) {
  int64_t i = 0;
  float sum = 0.0f;
  const __m256 sv = _mm256_set1_ps(shift);
  __m256 acc = _mm256_setzero_ps();
  for (; i + 8 <= n; i += 8) {
    const __m256 e = avx2_exp(_mm256_sub_ps(_mm256_loadu_ps(x + i), sv));
    _mm256_storeu_ps(x + i, e);
    acc = _mm256_add_ps(acc, e);
  }
  if (i < n) {  // tail through a padded copy
    alignas(32) float tail[8] = {};
    std::copy(x + i, x + n, tail);
    _mm256_store_ps(tail, avx2_exp(_mm256_sub_ps(_mm256_load_ps(tail), sv)));
    std::copy(tail, tail + (n - i), x + i);
    for (int64_t j = 0; j < n - i; ++j) sum += tail[j];
  }
  return sum + avx2_sum(acc);
}
#endif  // KVPACK_X86_DISPATCH

/// Max of x[0, n), n >= 1.
inline float row_max(const float* x, int64_t n) {
#if defined(KVPACK_X86_DISPATCH)
  if (cpu_isa() == Isa::kAvx2) return avx2_row_max(x, n);
#endif
  float m = x[0];
  for (int64_t i = 1; i < n; ++i) m = std::max(m, x[i]);
  return m;
}

/// x[i] = exp(x[i] − shift) for i in [0, n); returns the sum of the results.
inline float exp_shifted(float* x, int64_t n, float shift) {
#if defined(KVPACK_X86_DISPATCH)
  if (cpu_isa() == Isa::kAvx2) return avx2_exp_shifted(x, n, shift);
#endif
  float sum = 0.0f;
  for (int64_t i = 0; i < n; ++i) {
    x[i] = std::exp(x[i] - shift);
    sum += x[i];
  }
  return sum;
}

/// Online-softmax step of one query row over one tile: scores sr[0, vis) become unnormalised
/// probabilities (sr[vis, tn) become 0), and the row's max / denominator / accumulator are
/// rescaled to the new max.
inline void softmax_tile_row(float* sr, int64_t vis, int64_t tn, float& max, float& sum, float* acc,
                             int d) {
  if (vis == 0) {
    std::fill(sr, sr + tn, 0.0f);
    return;
  }
  const float new_max = std::max(max, row_max(sr, vis));
  const float rescale = softmax_rescale(max, new_max);
  const float tile_sum = exp_shifted(sr, vis, new_max);
  std::fill(sr + vis, sr + tn, 0.0f);
  sum = sum * rescale + tile_sum;
  max = new_max;
  if (rescale != 1.0f) {
    for (int i = 0; i < d; ++i) acc[i] *= rescale;
  }
}

#if defined(KVPACK_X86_DISPATCH)
/// One pass of avx2_attend_rows: R rows (q, state rows r0 ..) over the n keys of a tile.
template <int R, class T>
KVPACK_TARGET_AVX2 void avx2_tile_pass(const float* q, int d, const T* const* kp,
                                       const T* const* vp, int64_t n, float* s, int64_t stride,
                                       const T* const* prefetch, const int64_t* visible, int64_t t0,
                                       int64_t tn, cpu::PartialState& state, int r0,
                                       const T* const* next_kp, int64_t next_rows) {
  float* acc = state.acc.data() + static_cast<std::size_t>(r0) * d;
  avx2_tile_scores<R>(q, d, kp, n, s, stride, prefetch);
  for (int r = 0; r < R; ++r) {
    const int64_t vis = std::clamp<int64_t>(visible[r] - t0, 0, tn);
    softmax_tile_row(s + r * stride, vis, n, state.max[r0 + r], state.sum[r0 + r], acc + r * d, d);
  }
  avx2_tile_values<R>(s, stride, vp, n, d, acc, next_kp, next_rows);
}

/// Decode path of cpu::attend_rows: rows < kGemmRows, d % 8 == 0, a dense row source
/// (DenseRows or PagedRows). Rows go in passes of up to four (a GQA group of 3 or 4 in one pass:
/// each key and value row is converted once per pass); K and V are converted inside the kernels.
/// A row's arithmetic does not depend on the rows beside it, so passes of any size agree bit for
/// bit. Rows are addressed one by one, so tiles and key groups are the same whatever the page
/// size: paged and contiguous rows give bit-identical results.
template <class Rows>
KVPACK_TARGET_AVX2 void avx2_attend_rows(const Rows& head, int d, const float* q, int rows,
                                         const int64_t* visible, int64_t begin, int64_t end,
                                         cpu::PartialState& state, std::vector<float>& scratch) {
  using T = typename cpu::is_dense_rows<Rows>::element_type;
  constexpr int64_t stride = cpu::kAttentionTile;
  scratch.resize(static_cast<std::size_t>(rows) * stride);
  float* s = scratch.data();
  // Row pointers of this tile's keys and values and of the next tile's keys: the page table
  // walked once per tile, not once per row and channel chunk.
  const T* kp[stride];
  const T* vp[stride];
  const T* next_kp[stride];
  const auto fill = [&](const T** dst, int64_t t0, int64_t n, bool keys) {
    for (int64_t i = 0; i < n; ++i) dst[i] = keys ? head.key(t0 + i) : head.value(t0 + i);
  };
  fill(next_kp, begin, std::min(stride, end - begin), true);
  const int pass_rows = cpu::decode_pass_rows(rows);
  for (int64_t t0 = begin; t0 < end; t0 += stride) {
    const int64_t tn = std::min(stride, end - t0);
    std::copy(next_kp, next_kp + tn, kp);
    fill(vp, t0, tn, false);
    const int64_t next_n = std::min(stride, end - t0 - tn);
    fill(next_kp, t0 + tn, next_n, true);
    for (int r0 = 0; r0 < rows; r0 += pass_rows) {
      const int nr = std::min(pass_rows, rows - r0);
      int64_t n = 0;  // keys of this tile that some row of the pass sees
      for (int r = r0; r < r0 + nr; ++r)
        n = std::max(n, std::clamp<int64_t>(visible[r] - t0, 0, tn));
      if (n == 0) continue;
      const float* qg = q + static_cast<std::size_t>(r0) * d;
      float* sg = s + r0 * stride;
      // Keys of the next tile, prefetched by the last pass's value pass.
      const int64_t next_rows = r0 + nr == rows ? next_n : 0;
      const T* const* prefetch = r0 == 0 ? vp : nullptr;
      if (nr == 4) {
        avx2_tile_pass<4>(qg, d, kp, vp, n, sg, stride, prefetch, visible + r0, t0, tn, state, r0,
                          next_kp, next_rows);
      } else if (nr == 3) {
        avx2_tile_pass<3>(qg, d, kp, vp, n, sg, stride, prefetch, visible + r0, t0, tn, state, r0,
                          next_kp, next_rows);
      } else if (nr == 2) {
        avx2_tile_pass<2>(qg, d, kp, vp, n, sg, stride, prefetch, visible + r0, t0, tn, state, r0,
                          next_kp, next_rows);
      } else {
        avx2_tile_pass<1>(qg, d, kp, vp, n, sg, stride, prefetch, visible + r0, t0, tn, state, r0,
                          next_kp, next_rows);
      }
    }
  }
}
#endif  // KVPACK_X86_DISPATCH

}  // namespace detail

namespace cpu {

/// Attends `rows` query rows q (row-major rows × d, already scaled by 1/sqrt(d)) over keys
/// [begin, end) of `head`. Row r sees only keys with index < visible[r] (causal by position).
/// Accumulates into `state` (online softmax), so splits can be merged afterwards.
/// `Rows` provides load_keys / load_values (see DenseRows); dense fp16/fp32 rows take the AVX2
/// decode kernels when cpu_isa() is Isa::kAvx2; they read the stored rows directly.
template <class Rows>
void attend_rows(const Rows& head, int d, const float* q, int rows, const int64_t* visible,
                 int64_t begin, int64_t end, PartialState& state, std::vector<float>& scratch) {
  using RowMat = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  using Vec = Eigen::Map<Eigen::VectorXf>;
  using ConstVec = Eigen::Map<const Eigen::VectorXf>;
  int64_t row_visible_max = 0;
  for (int r = 0; r < rows; ++r) row_visible_max = std::max(row_visible_max, visible[r]);
  end = std::min(end, row_visible_max);
  if (begin >= end) return;

#if defined(KVPACK_X86_DISPATCH)
  if constexpr (is_dense_rows<Rows>::value) {
    using T = typename is_dense_rows<Rows>::element_type;
    if constexpr (std::is_same_v<T, float> || std::is_same_v<T, Half>) {
      if (rows < kGemmRows && d % 8 == 0 && cpu_isa() == Isa::kAvx2) {
        detail::avx2_attend_rows(head, d, q, rows, visible, begin, end, state, scratch);
        return;
      }
    }
  }
#endif

  scratch.resize(static_cast<std::size_t>(kAttentionTile) * (2 * d + rows));
  float* kt = scratch.data();
  float* vt = kt + kAttentionTile * d;
  float* s = vt + kAttentionTile * d;  // rows × tile scores
  Eigen::Map<const RowMat> qm(q, rows, d);

  for (int64_t t0 = begin; t0 < end; t0 += kAttentionTile) {
    const int64_t tn = std::min(kAttentionTile, end - t0);
    head.load_keys(t0, tn, kt);
    Eigen::Map<RowMat> sm(s, rows, tn);
    if (rows >= kGemmRows) {
      sm.noalias() = qm * Eigen::Map<const RowMat>(kt, tn, d).transpose();
    } else {
      for (int64_t i = 0; i < tn; ++i) {
        ConstVec ki(kt + i * d, d);
        for (int r = 0; r < rows; ++r) s[r * tn + i] = ConstVec(q + r * d, d).dot(ki);
      }
    }
    // Online softmax per row; masked keys get probability 0.
    for (int r = 0; r < rows; ++r) {
      const int64_t vis = std::clamp<int64_t>(visible[r] - t0, 0, tn);
      detail::softmax_tile_row(s + r * tn, vis, tn, state.max[r], state.sum[r],
                               state.acc.data() + static_cast<std::size_t>(r) * d, d);
    }
    head.load_values(t0, tn, vt);
    Eigen::Map<RowMat> acc(state.acc.data(), rows, d);
    if (rows >= kGemmRows) {
      acc.noalias() += sm * Eigen::Map<const RowMat>(vt, tn, d);
    } else {
      for (int64_t i = 0; i < tn; ++i) {
        ConstVec vi(vt + i * d, d);
        for (int r = 0; r < rows; ++r) {
          const float p = s[r * tn + i];
          if (p != 0.0f) Vec(state.acc.data() + r * d, d) += p * vi;
        }
      }
    }
  }
}

}  // namespace cpu
}  // namespace kvpack
