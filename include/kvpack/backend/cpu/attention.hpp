/// \file backend/cpu/attention.hpp
/// \brief Tiled decode/prefill attention over one head's stored K/V on the CPU.
///
/// Keys are visited in tiles; each tile is read from memory once per call and reused by every
/// query row of the GQA group (and of the query block). Few rows (decode) run register-blocked
/// SIMD kernels that convert fp16 rows inside the dot products and the value accumulation (the
/// decode step is bound by memory bandwidth, so K and V are read once and never written back);
/// many rows (prefill chunks) convert a tile to fp32 once and use Eigen GEMMs. Softmax uses a
/// vectorised exp (Cephes polynomial, ≤ 2 ulp). The kernels are written once
/// (simd/decode_kernels.inc) over per-ISA primitives (simd/avx2.hpp, simd/avx512.hpp), carry
/// target attributes and are chosen at run time (isa.hpp), whatever the consumer's flags.
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
#include "simd/avx2.hpp"
#include "simd/avx512.hpp"

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

/// Prefetches `count` elements from p into L1 (prefetcht0 per 64-byte line).
template <class T>
inline void prefetch_l1(const T* p, int64_t count) {
  const char* bytes = reinterpret_cast<const char*>(p);
  for (int64_t o = 0; o < count * static_cast<int64_t>(sizeof(T)); o += 64) {
    __builtin_prefetch(bytes + o, 0, 3);
  }
}

/// Online-softmax step of one query row over one tile (defined below, after the kernels).
inline void softmax_tile_row(float* sr, int64_t vis, int64_t tn, float& max, float& sum, float* acc,
                             int d);

}  // namespace detail
}  // namespace kvpack

// The decode kernels, written once (simd/decode_kernels.inc) and compiled per instruction set.
#if defined(KVPACK_X86_DISPATCH)
#define KVPACK_SIMD_NS avx2
#define KVPACK_SIMD_TARGET KVPACK_TARGET_AVX2
#include "simd/decode_kernels.inc"
#undef KVPACK_SIMD_NS
#undef KVPACK_SIMD_TARGET
#define KVPACK_SIMD_NS avx512
#define KVPACK_SIMD_TARGET KVPACK_TARGET_AVX512
#include "simd/decode_kernels.inc"
#undef KVPACK_SIMD_NS
#undef KVPACK_SIMD_TARGET
#endif  // KVPACK_X86_DISPATCH

namespace kvpack {
namespace detail {

/// Max of x[0, n), n >= 1.
inline float row_max(const float* x, int64_t n) {
#if defined(KVPACK_X86_DISPATCH)
  const Isa isa = cpu_isa();
  if (isa >= Isa::kAvx512) return avx512::row_max(x, n);
  if (isa >= Isa::kAvx2) return avx2::row_max(x, n);
#endif
  float m = x[0];
  for (int64_t i = 1; i < n; ++i) m = std::max(m, x[i]);
  return m;
}

/// x[i] = exp(x[i] − shift) for i in [0, n); returns the sum of the results.
inline float exp_shifted(float* x, int64_t n, float shift) {
#if defined(KVPACK_X86_DISPATCH)
  const Isa isa = cpu_isa();
  if (isa >= Isa::kAvx512) return avx512::exp_shifted(x, n, shift);
  if (isa >= Isa::kAvx2) return avx2::exp_shifted(x, n, shift);
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

/// The portable path of cpu::attend_rows, which every row format has: tiles of keys and values
/// decoded to fp32 (load_keys / load_values), Eigen dot products, GEMMs from kGemmRows rows.
/// Arguments as attend_rows; `end` already clamped to the rows' largest `visible`.
template <class Rows>
void attend_rows_tiled(const Rows& head, int d, const float* q, int rows, const int64_t* visible,
                       int64_t begin, int64_t end, cpu::PartialState& state,
                       std::vector<float>& scratch) {
  using RowMat = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  using Vec = Eigen::Map<Eigen::VectorXf>;
  using ConstVec = Eigen::Map<const Eigen::VectorXf>;
  scratch.resize(static_cast<std::size_t>(cpu::kAttentionTile) * (2 * d + rows));
  float* kt = scratch.data();
  float* vt = kt + cpu::kAttentionTile * d;
  float* s = vt + cpu::kAttentionTile * d;  // rows × tile scores
  Eigen::Map<const RowMat> qm(q, rows, d);

  for (int64_t t0 = begin; t0 < end; t0 += cpu::kAttentionTile) {
    const int64_t tn = std::min(cpu::kAttentionTile, end - t0);
    head.load_keys(t0, tn, kt);
    Eigen::Map<RowMat> sm(s, rows, tn);
    if (rows >= cpu::kGemmRows) {
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
    if (rows >= cpu::kGemmRows) {
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

}  // namespace detail

namespace cpu {

/// \brief How attend_rows() attends one row format. The primary template: dense fp16/fp32 rows
/// take the decode kernels of cpu_isa() (AVX-512 when head_dim % 16 == 0, else AVX2 when
/// head_dim % 8 == 0), which read the stored rows directly; everything else the tiled path. A
/// format with kernels of its own specialises it (KiviRows: quantized_attention.hpp).
///
/// A class template, not overloads of attend_rows: a qualified call binds the overloads declared
/// before the caller's definition, so the order in which a translation unit included the headers
/// chose the kernel, and two units compiled the same symbol differently (ODR: an int8-query KIVI
/// attend lost its folded kernel). A specialisation is looked up where the call is instantiated,
/// and one declared after that point is a compile error, never a silent fallback.
template <class Rows>
struct RowsAttention {
  static void attend(const Rows& head, int d, const float* q, int rows, const int64_t* visible,
                     int64_t begin, int64_t end, PartialState& state, std::vector<float>& scratch) {
#if defined(KVPACK_X86_DISPATCH)
    if constexpr (is_dense_rows<Rows>::value) {
      using T = typename is_dense_rows<Rows>::element_type;
      if constexpr (std::is_same_v<T, float> || std::is_same_v<T, Half>) {
        const Isa isa = cpu_isa();
        if (rows < kGemmRows && isa >= Isa::kAvx512 && d % 16 == 0) {
          detail::avx512::attend_rows(head, d, q, rows, visible, begin, end, state, scratch);
          return;
        }
        if (rows < kGemmRows && isa >= Isa::kAvx2 && d % 8 == 0) {
          detail::avx2::attend_rows(head, d, q, rows, visible, begin, end, state, scratch);
          return;
        }
      }
    }
#endif
    detail::attend_rows_tiled(head, d, q, rows, visible, begin, end, state, scratch);
  }
};

/// Attends `rows` query rows q (row-major rows × d, already scaled by 1/sqrt(d)) over keys
/// [begin, end) of `head`. Row r sees only keys with index < visible[r] (causal by position).
/// Accumulates into `state` (online softmax), so splits can be merged afterwards.
/// `Rows` provides load_keys / load_values (see DenseRows); RowsAttention<Rows> picks the kernel.
template <class Rows>
void attend_rows(const Rows& head, int d, const float* q, int rows, const int64_t* visible,
                 int64_t begin, int64_t end, PartialState& state, std::vector<float>& scratch) {
  int64_t row_visible_max = 0;
  for (int r = 0; r < rows; ++r) row_visible_max = std::max(row_visible_max, visible[r]);
  end = std::min(end, row_visible_max);
  if (begin >= end) return;
  RowsAttention<Rows>::attend(head, d, q, rows, visible, begin, end, state, scratch);
}

}  // namespace cpu
}  // namespace kvpack
