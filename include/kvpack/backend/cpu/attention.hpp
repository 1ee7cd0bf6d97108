/// \file backend/cpu/attention.hpp
/// \brief Tiled decode/prefill attention over one head's stored K/V on the CPU.
///
/// Keys are visited in tiles; each tile is converted to fp32 once and reused by every query row
/// of the GQA group (and of the query block), so K and V are read from memory once per call.
/// Few rows (decode) use per-key dot products; many rows (prefill chunks) use Eigen GEMMs.
#pragma once

#include <Eigen/Core>
#include <algorithm>
#include <cstdint>
#include <vector>

#include "../../config.hpp"
#include "../../detail/convert.hpp"
#include "../../detail/online_softmax.hpp"

namespace kvpack {
namespace cpu {

/// Keys per tile: 128 × head_dim fp32 for K and V stays inside L1/L2.
constexpr int64_t kAttentionTile = 128;
/// Row counts at or above this use GEMMs for the score and value products.
constexpr int kGemmRows = 16;

/// \brief One head's stored keys/values (row-major n × d) and ascending positions.
template <class T>
struct HeadRows {
  const T* k;
  const T* v;
  const int32_t* positions;
  int64_t size;
};

/// \brief Partial attention state of `rows` query rows: running max, denominator, accumulator.
struct PartialState {
  std::vector<float> max, sum, acc;  // rows, rows, rows × d
  void reset(int rows, int d) {
    max.assign(rows, detail::neg_inf());
    sum.assign(rows, 0.0f);
    acc.assign(static_cast<std::size_t>(rows) * d, 0.0f);
  }
};

/// Attends `rows` query rows q (row-major rows × d, already scaled by 1/sqrt(d)) over keys
/// [begin, end) of `head`. Row r sees only keys with index < visible[r] (causal by position).
/// Accumulates into `state` (online softmax), so splits can be merged afterwards.
template <class T>
void attend_rows(const HeadRows<T>& head, int d, const float* q, int rows, const int64_t* visible,
                 int64_t begin, int64_t end, PartialState& state, std::vector<float>& scratch) {
  using RowMat = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  using Vec = Eigen::Map<Eigen::VectorXf>;
  using ConstVec = Eigen::Map<const Eigen::VectorXf>;
  int64_t row_visible_max = 0;
  for (int r = 0; r < rows; ++r) row_visible_max = std::max(row_visible_max, visible[r]);
  end = std::min(end, row_visible_max);
  if (begin >= end) return;

  scratch.resize(static_cast<std::size_t>(kAttentionTile) * (2 * d + rows));
  float* kt = scratch.data();
  float* vt = kt + kAttentionTile * d;
  float* s = vt + kAttentionTile * d;  // rows × tile scores
  Eigen::Map<const RowMat> qm(q, rows, d);

  for (int64_t t0 = begin; t0 < end; t0 += kAttentionTile) {
    const int64_t tn = std::min(kAttentionTile, end - t0);
    for (int64_t i = 0; i < tn; ++i) detail::load_row(head.k + (t0 + i) * d, kt + i * d, d);
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
      float* sr = s + r * tn;
      const int64_t vis = std::clamp<int64_t>(visible[r] - t0, 0, tn);
      float tile_max = detail::neg_inf();
      for (int64_t i = 0; i < vis; ++i) tile_max = std::max(tile_max, sr[i]);
      if (vis == 0) {
        std::fill(sr, sr + tn, 0.0f);
        continue;
      }
      const float new_max = std::max(state.max[r], tile_max);
      const float rescale = detail::softmax_rescale(state.max[r], new_max);
      float sum = 0.0f;
      for (int64_t i = 0; i < vis; ++i) {
        sr[i] = std::exp(sr[i] - new_max);
        sum += sr[i];
      }
      std::fill(sr + vis, sr + tn, 0.0f);
      state.sum[r] = state.sum[r] * rescale + sum;
      state.max[r] = new_max;
      if (rescale != 1.0f) Vec(state.acc.data() + r * d, d) *= rescale;
    }
    for (int64_t i = 0; i < tn; ++i) detail::load_row(head.v + (t0 + i) * d, vt + i * d, d);
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
