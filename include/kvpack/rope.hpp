/// \file rope.hpp
/// \brief Exact rotary position embedding: rotate and un-rotate head vectors at any position.
///
/// Engines cache post-RoPE keys; low-rank methods want pre-RoPE keys. RoPE is a rotation, so
/// un-rotating is exact up to fp32 rounding. Angles are formed in double precision so that
/// positions up to millions keep full accuracy.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "config.hpp"
#include "shape.hpp"

namespace kvpack {
namespace detail {

/// Index pair (a, b) rotated together by frequency index i, for the channels [0, rotary_dim)
/// that RoPE rotates (the rest of the head passes through unchanged).
KVPACK_HOST_DEVICE void rope_pair(RopeStyle style, int i, int rotary_dim, int& a, int& b) {
  if (style == RopeStyle::kInterleaved) {
    a = 2 * i;
    b = 2 * i + 1;
  } else {
    a = i;
    b = i + rotary_dim / 2;
  }
}

/// Rotates one pair by (cos, sin); `sign` = +1 rotates, -1 un-rotates.
KVPACK_HOST_DEVICE void rotate_pair(float& x, float& y, double c, double s) {
  const double nx = static_cast<double>(x) * c - static_cast<double>(y) * s;
  const double ny = static_cast<double>(x) * s + static_cast<double>(y) * c;
  x = static_cast<float>(nx);
  y = static_cast<float>(ny);
}

/// The rotary_dim / 2 inverse frequencies of `config` (validated), as Hugging Face's
/// `_compute_{default,linear,llama3,yarn}_parameters` form them, in double.
inline std::vector<double> rope_inv_freq(const RopeConfig& config, int head_dim) {
  const int rd = config.rotary_dim == 0 ? head_dim : config.rotary_dim;
  std::vector<double> inv(rd / 2);
  for (int i = 0; i < rd / 2; ++i) inv[i] = std::pow(config.theta, -2.0 * i / rd);
  const double factor = config.factor;
  switch (config.scaling) {
    case RopeScaling::kNone:
      break;
    case RopeScaling::kLinear:
      for (double& f : inv) f /= factor;
      break;
    case RopeScaling::kLlama3: {
      const double pi = std::acos(-1.0);
      const double context = static_cast<double>(config.original_context);
      const double low_wavelen = context / config.low_freq_factor;
      const double high_wavelen = context / config.high_freq_factor;
      for (double& f : inv) {
        const double wavelen = 2.0 * pi / f;
        if (wavelen > low_wavelen) {
          f /= factor;  // low frequencies: interpolated
        } else if (wavelen >= high_wavelen) {
          const double smooth = (context / wavelen - config.low_freq_factor) /
                                (config.high_freq_factor - config.low_freq_factor);
          f = (1.0 - smooth) * f / factor + smooth * f;
        }  // high frequencies: kept
      }
      break;
    }
    case RopeScaling::kYarn: {
      // Frequency index at which a dimension completes `rotations` turns over the original
      // context; the ramp between the two (floored / ceiled) blends extrapolation into
      // interpolation.
      const double pi = std::acos(-1.0);
      const auto correction_dim = [&](double rotations) {
        return rd *
               std::log(static_cast<double>(config.original_context) / (rotations * 2.0 * pi)) /
               (2.0 * std::log(config.theta));
      };
      const double low = std::max(0.0, std::floor(correction_dim(config.beta_fast)));
      double high =
          std::min(static_cast<double>(rd - 1), std::ceil(correction_dim(config.beta_slow)));
      if (low == high) high += 0.001;
      for (int i = 0; i < rd / 2; ++i) {
        const double ramp = std::clamp((i - low) / (high - low), 0.0, 1.0);
        const double extrapolation = 1.0 - ramp;  // share of the original frequency
        inv[i] = inv[i] / factor * (1.0 - extrapolation) + inv[i] * extrapolation;
      }
      break;
    }
  }
  return inv;
}

/// The factor YaRN multiplies cos and sin by (1 for the other scalings).
inline double rope_attention_factor(const RopeConfig& config) {
  if (config.scaling != RopeScaling::kYarn) return 1.0;
  if (config.attention_factor > 0.0) return config.attention_factor;
  return config.factor > 1.0 ? 0.1 * std::log(config.factor) + 1.0 : 1.0;
}

}  // namespace detail

/// \brief Applies or removes RoPE on head vectors of one head_dim.
///
/// rotate() turns channel pairs (RopeStyle) of the first rotary_dim channels by pos · inv_freq_i
/// (frequencies scaled per RopeConfig::scaling) and, for YaRN, scales them by the attention
/// factor; unrotate() is its exact inverse up to fp32 rounding. Throws kvpack::error for an
/// invalid config (RopeConfig::validate).
class Rope {
 public:
  Rope(RopeConfig config, int head_dim) : config_(config), head_dim_(head_dim) {
    detail::require(head_dim > 0 && head_dim % 2 == 0, "Rope", "head_dim", head_dim,
                    "a positive even number");
    config_.validate(head_dim);
    rotary_dim_ = config.rotary_dim == 0 ? head_dim : config.rotary_dim;
    inv_freq_ = detail::rope_inv_freq(config_, head_dim);
    attention_factor_ = detail::rope_attention_factor(config_);
  }

  int head_dim() const { return head_dim_; }
  const RopeConfig& config() const { return config_; }
  /// Channels rotated: [0, rotary_dim()); the others pass through.
  int rotary_dim() const { return rotary_dim_; }
  /// rotary_dim() / 2 angular frequencies, radians per position.
  const std::vector<double>& inv_freq() const { return inv_freq_; }
  /// What cos and sin are multiplied by (YaRN's attention factor; 1 otherwise).
  double attention_factor() const { return attention_factor_; }

  /// Rotates x (head_dim floats) to position `pos`.
  void rotate(float* x, int64_t pos) const { apply(x, pos, false); }
  /// Inverse of rotate(): recovers the pre-RoPE vector.
  void unrotate(float* x, int64_t pos) const { apply(x, pos, true); }

 private:
  void apply(float* x, int64_t pos, bool inverse) const {
    const double scale = inverse ? 1.0 / attention_factor_ : attention_factor_;
    const double sign = inverse ? -1.0 : 1.0;
    for (int i = 0; i < rotary_dim_ / 2; ++i) {
      const double angle = static_cast<double>(pos) * inv_freq_[i];
      int a, b;
      detail::rope_pair(config_.style, i, rotary_dim_, a, b);
      detail::rotate_pair(x[a], x[b], scale * std::cos(angle), scale * sign * std::sin(angle));
    }
  }

  RopeConfig config_;
  int head_dim_;
  int rotary_dim_ = 0;
  std::vector<double> inv_freq_;
  double attention_factor_ = 1.0;
};

}  // namespace kvpack
