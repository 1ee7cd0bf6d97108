/// \file policy/output_factors.hpp
/// \brief What KVzip+ (KVzap, arXiv 2601.07891, §3) needs of the model's output projection: per
/// (layer, query head) a small factor R_h of the head's slice of W_o, so that the norm of a
/// value's contribution to the residual stream, ‖W_o,h · v‖ = ‖R_h · v‖, is computed from the
/// cached value alone.
#pragma once

#include <Eigen/Core>
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <vector>

#include "../config.hpp"
#include "../error.hpp"
#include "../shape.hpp"

namespace kvpack {

namespace detail {

/// R [d × d], row-major, of W [rows × d] = Q·R by modified Gram-Schmidt with one
/// re-orthogonalisation pass (accurate to rounding in double for the d <= 256 of attention
/// heads), so that RᵀR = WᵀW. A column that is (numerically) a combination of the earlier ones
/// gets a zero row in R. Written out rather than Eigen's QR so that caches which never use
/// KVzip+ do not pay for Eigen's decomposition headers (tests/include_cost).
inline std::vector<double> gram_schmidt_r(const Eigen::MatrixXd& w) {
  const Eigen::Index rows = w.rows(), d = w.cols();
  Eigen::MatrixXd q = Eigen::MatrixXd::Zero(rows, d);
  std::vector<double> r(static_cast<std::size_t>(d * d), 0.0);
  for (Eigen::Index j = 0; j < d; ++j) {
    Eigen::VectorXd v = w.col(j);
    for (int pass = 0; pass < 2; ++pass) {
      for (Eigen::Index i = 0; i < j; ++i) {
        const double c = q.col(i).dot(v);
        r[static_cast<std::size_t>(i * d + j)] += c;
        v -= c * q.col(i);
      }
    }
    const double norm = v.norm();
    if (norm > 1e-12 * w.col(j).norm()) {
      r[static_cast<std::size_t>(j * d + j)] = norm;
      q.col(j) = v / norm;
    }
  }
  return r;
}

}  // namespace detail

/// \brief R_h [head_dim × head_dim] with R_hᵀ·R_h = W_o,hᵀ·W_o,h for every (layer, query head),
/// where W_o,h [hidden × head_dim] is the block of the output projection's columns that head h's
/// attention output multiplies: the R of W_o,h = Q·R (Gram-Schmidt in double; a row is zero for
/// each column dependent on earlier ones, e.g. past `hidden` when hidden < head_dim). ‖R_h·v‖ is a
/// sum of squares, so it keeps its digits where vᵀ·(WᵀW)·v would cancel in float. Held as float,
/// layer-major: factor[((layer · q_heads) + h) · head_dim² + i · head_dim + j] (row-major R). A few
/// MB for a 7 B model (layers × q_heads × head_dim² floats), where W_o itself is layers × hidden².
struct OutputFactors {
  int layers = 0, q_heads = 0, head_dim = 0;
  std::vector<float> factor;

  OutputFactors() = default;
  /// Zeros for every (layer, query head) of `shape`; fill them with set_layer().
  explicit OutputFactors(const ModelShape& shape)
      : layers(shape.layers),
        q_heads(shape.q_heads),
        head_dim(shape.head_dim),
        factor(static_cast<std::size_t>(shape.layers) * shape.q_heads * shape.head_dim *
                   shape.head_dim,
               0.0f) {}

  /// Sets `layer`'s factors from its output projection `w_o`, row-major [hidden × q_heads ·
  /// head_dim] (out × in: how Hugging Face o_proj.weight and GGUF attn_output store it), whose
  /// columns [h · head_dim, (h + 1) · head_dim) take query head h's output. Throws kvpack::error,
  /// changing nothing, for a bad layer, hidden <= 0, a null or non-finite w_o, or a factor entry
  /// beyond float's range.
  void set_layer(int layer, const float* w_o, int hidden) {
    constexpr const char* where = "OutputFactors::set_layer";
    detail::require(layer >= 0 && layer < layers, where, "layer", layer,
                    [&] { return detail::concat("in [0, ", layers, ")"); });
    detail::require(hidden > 0, where, "hidden", hidden, "> 0");
    detail::require(w_o != nullptr, where, "w_o", "null", "the layer's output projection");
    const Eigen::Index cols = static_cast<Eigen::Index>(q_heads) * head_dim;
    using RowMatrix = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
    const Eigen::Map<const RowMatrix> w(w_o, hidden, cols);
    detail::require(w.allFinite(), where, "w_o", "non-finite values", "finite weights");
    std::vector<float> out(static_cast<std::size_t>(q_heads) * head_dim * head_dim, 0.0f);
    for (int h = 0; h < q_heads; ++h) {
      const std::vector<double> r = detail::gram_schmidt_r(
          w.middleCols(static_cast<Eigen::Index>(h) * head_dim, head_dim).cast<double>());
      float* dst = out.data() + static_cast<std::size_t>(h) * head_dim * head_dim;
      for (std::size_t i = 0; i < r.size(); ++i) {
        detail::require(std::fabs(r[i]) <= 3.0e38, where, "factor entry", r[i],
                        "within float's range (an output projection this large overflows)");
        dst[i] = static_cast<float>(r[i]);
      }
    }
    std::copy(out.begin(), out.end(), head(layer, 0));
  }

  /// R of (layer, query head): head_dim × head_dim, row-major.
  const float* head(int layer, int h) const {
    return factor.data() + (static_cast<std::size_t>(layer) * q_heads + h) * head_dim * head_dim;
  }
  float* head(int layer, int h) {
    return factor.data() + (static_cast<std::size_t>(layer) * q_heads + h) * head_dim * head_dim;
  }

  /// Made for `shape` (layers, q_heads, head_dim), every entry finite.
  void validate(const ModelShape& shape, const char* where) const {
    detail::require(
        layers == shape.layers && q_heads == shape.q_heads && head_dim == shape.head_dim, where,
        "output factors layers x q_heads x head_dim",
        [&] { return detail::concat(layers, " x ", q_heads, " x ", head_dim); },
        [&] {
          return detail::concat(shape.layers, " x ", shape.q_heads, " x ", shape.head_dim,
                                " (the model's)");
        });
    detail::require(
        factor.size() == static_cast<std::size_t>(layers) * q_heads * head_dim * head_dim, where,
        "output factors size", factor.size(), "layers x q_heads x head_dim^2");
    for (std::size_t i = 0; i < factor.size(); ++i) {
      if (!std::isfinite(factor[i])) {
        throw error(detail::concat(where, ": output factor[", i, "] = ", factor[i],
                                   ", expected a finite value"));
      }
    }
  }
};

}  // namespace kvpack
