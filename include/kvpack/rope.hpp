/// \file rope.hpp
/// \brief Exact rotary position embedding: rotate and un-rotate head vectors at any position.
///
/// Engines cache post-RoPE keys; low-rank methods want pre-RoPE keys. RoPE is a rotation, so
/// un-rotating is exact up to fp32 rounding. Angles are formed in double precision so that
/// positions up to millions keep full accuracy.
#pragma once

#include <cmath>
#include <cstdint>
#include <vector>

#include "config.hpp"
#include "shape.hpp"

namespace kvpack {
namespace detail {

/// Index pair (a, b) rotated together by frequency index i for the given style.
KVPACK_HOST_DEVICE void rope_pair(RopeStyle style, int i, int head_dim, int& a, int& b) {
  if (style == RopeStyle::kInterleaved) {
    a = 2 * i;
    b = 2 * i + 1;
  } else {
    a = i;
    b = i + head_dim / 2;
  }
}

/// Rotates one pair by (cos, sin); `sign` = +1 rotates, -1 un-rotates.
KVPACK_HOST_DEVICE void rotate_pair(float& x, float& y, double c, double s) {
  const double nx = static_cast<double>(x) * c - static_cast<double>(y) * s;
  const double ny = static_cast<double>(x) * s + static_cast<double>(y) * c;
  x = static_cast<float>(nx);
  y = static_cast<float>(ny);
}

}  // namespace detail

/// \brief Applies or removes RoPE on head vectors of one head_dim.
class Rope {
 public:
  Rope(RopeConfig config, int head_dim) : config_(config), head_dim_(head_dim) {
    detail::require(head_dim > 0 && head_dim % 2 == 0, "Rope", "head_dim", head_dim,
                    "a positive even number");
    detail::require(std::isfinite(config.theta) && config.theta > 1.0, "Rope", "theta",
                    config.theta, "a finite value > 1");
    inv_freq_.resize(head_dim / 2);
    for (int i = 0; i < head_dim / 2; ++i) {
      inv_freq_[i] = std::pow(config.theta, -2.0 * i / head_dim);
    }
  }

  int head_dim() const { return head_dim_; }
  const RopeConfig& config() const { return config_; }

  /// Rotates x (head_dim floats) to position `pos`.
  void rotate(float* x, int64_t pos) const { apply(x, pos, 1.0); }
  /// Inverse of rotate(): recovers the pre-RoPE vector.
  void unrotate(float* x, int64_t pos) const { apply(x, pos, -1.0); }

 private:
  void apply(float* x, int64_t pos, double sign) const {
    for (int i = 0; i < head_dim_ / 2; ++i) {
      const double angle = static_cast<double>(pos) * inv_freq_[i];
      int a, b;
      detail::rope_pair(config_.style, i, head_dim_, a, b);
      detail::rotate_pair(x[a], x[b], std::cos(angle), sign * std::sin(angle));
    }
  }

  RopeConfig config_;
  int head_dim_;
  std::vector<double> inv_freq_;
};

}  // namespace kvpack
