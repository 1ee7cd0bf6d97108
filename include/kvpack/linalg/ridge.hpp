/// \file linalg/ridge.hpp
/// \brief Ridge regression with an unpenalised intercept and λ chosen on held-out rows: how
/// KVzap's linear scorer is fitted (arXiv 2601.07891 fits it by gradient descent; the closed
/// form reaches the same minimiser).
#pragma once

#include <Eigen/Cholesky>
#include <Eigen/Core>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "../error.hpp"
#include "matrix.hpp"

namespace kvpack {

/// A fitted linear map y ≈ x · w + b.
struct RidgeFit {
  Eigen::MatrixXd w;                  ///< [inputs × outputs]
  Eigen::RowVectorXd b;               ///< [outputs]
  double lambda = 0.0;                ///< the λ chosen
  double held_out_r2 = std::nan("");  ///< mean over outputs of 1 − SSE/SST on the held-out rows
};

/// \brief Fits w, b minimising ‖X·w + 1·b − Y‖² + λ‖w‖² on the first rows of (X, Y) for each λ
/// of `lambdas`, and keeps the one with the best R² on the last `held_out` rows.
///
/// X [rows × inputs] and Y [rows × outputs] are row-major fp32 (one row per token). The split
/// is by row order: put tokens of other documents last, so that the held-out R² says how the
/// scorer does on text it has not seen. Solved in double through the centred normal equations
/// (X_cᵀX_c + λ·I)·w = X_cᵀY_c (LDLT), b = ȳ − x̄·w; λ is relative to the mean diagonal of
/// X_cᵀX_c, so one grid (e.g. 1e-4 … 10) serves inputs of any scale. Throws kvpack::error for
/// mismatched rows, fewer than 2 training or held-out rows, an empty or negative λ grid, or
/// non-finite values.
inline RidgeFit ridge_fit(const RowMajorMatrixXf& x, const RowMajorMatrixXf& y,
                          const std::vector<double>& lambdas, int64_t held_out) {
  constexpr const char* where = "ridge_fit";
  detail::require(
      x.rows() == y.rows(), where, "rows of X and Y",
      [&] { return detail::concat(x.rows(), " and ", y.rows()); }, "equal");
  const int64_t train = x.rows() - held_out;
  detail::require(held_out >= 2 && train >= 2, where, "held_out", held_out, [&] {
    return detail::concat("in [2, ", x.rows() - 2, "] (rows: ", x.rows(), ")");
  });
  detail::require(!lambdas.empty(), where, "lambdas", "empty", "at least one λ >= 0");
  for (double l : lambdas)
    detail::require(l >= 0.0 && std::isfinite(l), where, "lambda", l, ">= 0");
  detail::require(x.allFinite() && y.allFinite(), where, "X, Y", "non-finite values",
                  "finite values");

  const Eigen::MatrixXd xt = x.topRows(train).cast<double>();
  const Eigen::MatrixXd yt = y.topRows(train).cast<double>();
  const Eigen::RowVectorXd x_mean = xt.colwise().mean(), y_mean = yt.colwise().mean();
  const Eigen::MatrixXd xc = xt.rowwise() - x_mean, yc = yt.rowwise() - y_mean;
  const Eigen::MatrixXd gram = xc.transpose() * xc, cross = xc.transpose() * yc;
  const double scale = std::max(gram.diagonal().mean(), std::numeric_limits<double>::min());

  const Eigen::MatrixXd xh = x.bottomRows(held_out).cast<double>();
  const Eigen::MatrixXd yh = y.bottomRows(held_out).cast<double>();
  const Eigen::RowVectorXd sst = (yh.rowwise() - yh.colwise().mean()).colwise().squaredNorm();
  RidgeFit best;
  double best_r2 = -std::numeric_limits<double>::infinity();
  for (double lambda : lambdas) {
    Eigen::MatrixXd a = gram;
    a.diagonal().array() += lambda * scale;
    RidgeFit fit;
    fit.w = a.ldlt().solve(cross);
    fit.b = y_mean - x_mean * fit.w;
    fit.lambda = lambda;
    const Eigen::MatrixXd residual = ((xh * fit.w).rowwise() + fit.b) - yh;
    const Eigen::RowVectorXd sse = residual.colwise().squaredNorm();
    double r2 = 0.0;
    for (Eigen::Index j = 0; j < sse.size(); ++j) r2 += sst[j] > 0 ? 1.0 - sse[j] / sst[j] : 0.0;
    fit.held_out_r2 = r2 / static_cast<double>(sse.size());
    if (best.w.size() == 0 || fit.held_out_r2 > best_r2) {  // the first λ, then any better
      best_r2 = fit.held_out_r2;
      best = std::move(fit);
    }
  }
  return best;
}

}  // namespace kvpack
