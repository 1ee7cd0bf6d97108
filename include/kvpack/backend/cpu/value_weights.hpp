/// \file backend/cpu/value_weights.hpp
/// \brief KVzip+'s weights of a score strip's probabilities (ReconstructionEvict with
/// OutputFactors, policy/output_factors.hpp): the value norms ‖W_o,h·v_j‖ of the KVzap paper, or
/// the displacement ‖W_o,h·(o_q − v_j)‖ / (1 − p_qj) (ValueWeighting), and the query weights.
///
/// ‖W_o,h·x‖ = ‖R_h·x‖ with R_h the d × d factor of OutputFactors, so every weight is computed in
/// head_dim space from u_j = R_h·v_j: one small GEMM per window range and query head of the
/// GQA group.
#pragma once

#include "../../config.hpp"
// clang-format off
#include <Eigen/Core>
// clang-format on
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <utility>
#include <vector>

#include "scoring.hpp"

namespace kvpack {
namespace cpu {

/// Calls sink(gi, j, u) with u = V·R_giᵀ [len × d] (row-major) for each range of window keys
/// (packed order: `ranges` of `head`; j = the range's first window index) and each query head gi
/// of the GQA group, R_gi = factors + gi · d² (OutputFactors::head, row-major d × d): one small
/// GEMM per range and gi, so only one range's values are held at a time.
template <class Rows, class Sink>
void for_each_value_output(const Rows& head, int d,
                           const std::vector<std::pair<int64_t, int64_t>>& ranges,
                           const float* factors, int g, Sink&& sink) {
  using RowMatrix = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  RowMatrix v, u;
  int64_t j = 0;
  for (const auto& range : ranges) {
    const int64_t len = range.second - range.first;
    if (len <= 0) continue;
    v.resize(len, d);
    head.load_values(range.first, len, v.data());
    for (int gi = 0; gi < g; ++gi) {
      const Eigen::Map<const RowMatrix> r(factors + static_cast<std::size_t>(gi) * d * d, d, d);
      u.noalias() = v * r.transpose();
      sink(gi, j, u);
    }
    j += len;
  }
}

/// KVzip+'s value weights (ValueWeighting::kNorm): out[gi · n + j] = ‖W_o,gi·v_j‖ = ‖R_gi·v_j‖
/// for window key j (n keys in all) and query head gi of the GQA group (see
/// for_each_value_output).
template <class Rows>
void value_output_norms(const Rows& head, int d,
                        const std::vector<std::pair<int64_t, int64_t>>& ranges, int64_t n,
                        const float* factors, int g, std::vector<float>& out) {
  out.assign(static_cast<std::size_t>(g) * n, 0.0f);
  for_each_value_output(head, d, ranges, factors, g, [&](int gi, int64_t j, const auto& u) {
    Eigen::Map<Eigen::VectorXf>(out.data() + static_cast<std::size_t>(gi) * n + j, u.rows()) =
        u.rowwise().norm();
  });
}

/// u_j = R_gi·v_j of every window key and query head gi (see for_each_value_output): out
/// [g][n][d], row-major per gi (ValueWeighting::kDisplacement: g · n · d floats a kv head).
template <class Rows>
void value_output_rows(const Rows& head, int d,
                       const std::vector<std::pair<int64_t, int64_t>>& ranges, int64_t n,
                       const float* factors, int g, std::vector<float>& out) {
  using RowMatrix = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  out.assign(static_cast<std::size_t>(g) * n * d, 0.0f);
  for_each_value_output(head, d, ranges, factors, g, [&](int gi, int64_t j, const auto& u) {
    Eigen::Map<RowMatrix>(out.data() + (static_cast<std::size_t>(gi) * n + j) * d, u.rows(), d) = u;
  });
}

/// Weights a strip's probabilities in place: row r (query token r / g, group member r % g) by
/// row_weights[r / g] (null: 1) and its key j by key_weights[(r % g) · n + j] (null: 1).
inline void weight_strip(ScoreStrip& strip, int rows, int g, const float* row_weights,
                         const float* key_weights, int64_t n) {
  for (int r = 0; r < rows; ++r) {
    if (row_weights != nullptr) strip.inv_sum[r] *= row_weights[r / g];
    if (key_weights == nullptr) continue;
    float* p = strip.values.data() + r * strip.stride;
    const float* w = key_weights + static_cast<std::size_t>(r % g) * n;
    for (int64_t j = 0; j < strip.limit[r]; ++j) p[j] *= w[j];
  }
}

/// ValueWeighting::kDisplacement: multiplies probability p_rj of the strip (a softmax over the
/// window keys, before any query weight) by ‖w_r − u_j‖ / (1 − p_rj), where u [g][n][d] are the
/// window's u_j = R·v_j (value_output_rows) and w_r = Σ_j p_rj·u_j = R·o_r the row's attention
/// output through R: removing key j alone moves head h's output by p_rj/(1 − p_rj)·(o_r − v_j)
/// (the softmax renormalises the rest), so p_rj times the weight is that displacement in the
/// residual stream. w_r is one GEMM per group member over the block's rows; each ‖w_r − u_j‖ is
/// summed from the differences themselves (not ‖w‖² + ‖u‖² − 2w·u, which loses the digits a key
/// holding most of the attention needs). Where 1 − p_rj rounds below 1e-6 (a key holding all
/// the attention in fp32, e.g. the only key a row sees) the weight is ‖u_j‖, the displacement
/// when no other key is left. Scratch: p, w (the rows' w_r and one row's distances).
inline void displacement_weight_strip(ScoreStrip& strip, int rows, int g, const float* u, int64_t n,
                                      int d, std::vector<float>& p, std::vector<float>& w) {
  using RowMatrix = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  for (int gi = 0; gi < g; ++gi) {
    const int m = (rows - gi + g - 1) / g;  // rows gi, gi + g, ...
    if (m <= 0) continue;
    int64_t widest = 0;
    for (int i = 0; i < m; ++i) widest = std::max(widest, strip.limit[gi + i * g]);
    if (widest == 0) continue;
    // P [m × widest]: the rows' probabilities, zero past each row's limit.
    p.assign(static_cast<std::size_t>(m) * widest, 0.0f);
    for (int i = 0; i < m; ++i) {
      const int r = gi + i * g;
      const float* src = strip.row(r);
      float* dst = p.data() + static_cast<std::size_t>(i) * widest;
      for (int64_t j = 0; j < strip.limit[r]; ++j) dst[j] = src[j] * strip.inv_sum[r];
    }
    const Eigen::Map<const RowMatrix> uj(u + static_cast<std::size_t>(gi) * n * d, widest, d);
    // w: the rows' w_r [m × d], then one row's distances (widest), allocated once per call.
    w.resize(static_cast<std::size_t>(m) * d + widest);
    Eigen::Map<RowMatrix> wm(w.data(), m, d);
    wm.noalias() = Eigen::Map<const RowMatrix>(p.data(), m, widest) * uj;
    for (int i = 0; i < m; ++i) {
      const int r = gi + i * g;
      const int64_t limit = strip.limit[r];
      float* values = strip.values.data() + r * strip.stride;
      const float* pr = p.data() + static_cast<std::size_t>(i) * widest;
      Eigen::Map<Eigen::VectorXf> distance(w.data() + static_cast<std::size_t>(m) * d, limit);
      distance = (uj.topRows(limit).rowwise() - wm.row(i)).rowwise().norm();
      for (int64_t j = 0; j < limit; ++j) {
        const float rest = 1.0f - pr[j];
        values[j] *= rest < 1e-6f ? uj.row(j).norm() : distance[j] / rest;
      }
    }
  }
}

}  // namespace cpu
}  // namespace kvpack
