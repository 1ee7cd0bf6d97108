/// \file shape.hpp
/// \brief The model shape a cache is built for: layers, GQA heads, head_dim and RoPE.
#pragma once

#include <cmath>
#include <cstdint>

#include "error.hpp"

namespace kvpack {

/// How RoPE pairs the channels of a head.
enum class RopeStyle {
  kInterleaved,  ///< pairs (x[2i], x[2i+1]) — llama GGUF, Meta's original layout
  kHalfSplit,    ///< pairs (x[i], x[i + d/2]) — GPT-NeoX / Hugging Face layout
};

/// How RoPE frequencies are scaled for contexts beyond the pretraining length (the
/// `rope_scaling` of Hugging Face configs).
enum class RopeScaling {
  kNone,    ///< inv_freq_i = theta^(-2i / rotary_dim)
  kLinear,  ///< position interpolation: inv_freq_i / factor
  kLlama3,  ///< Llama 3.1: low frequencies / factor, high kept, a smooth ramp between
  kYarn,    ///< YaRN (Peng et al. 2023): ramp between interpolation and extrapolation by
            ///< rotations per original context, cos/sin scaled by the attention factor
};

/// \brief RoPE configuration: style, base frequency theta (angle = pos · inv_freq_i) and the
/// optional frequency scaling and partial rotary of newer models. Defaults: plain RoPE over the
/// whole head. Knob names follow Hugging Face's `rope_scaling`.
struct RopeConfig {
  RopeStyle style = RopeStyle::kInterleaved;
  double theta = 10000.0;
  RopeScaling scaling = RopeScaling::kNone;
  double factor = 1.0;              ///< scaling factor (linear, llama3, yarn), >= 1
  int64_t original_context = 8192;  ///< pretraining context (llama3, yarn), tokens
  double low_freq_factor = 1.0;     ///< llama3
  double high_freq_factor = 4.0;    ///< llama3, > low_freq_factor
  double beta_fast = 32.0;          ///< yarn: rotations where extrapolation ends
  double beta_slow = 1.0;           ///< yarn: rotations where interpolation starts
  double attention_factor = 0.0;    ///< yarn: cos/sin scale; 0 = 0.1 ln(factor) + 1
  int rotary_dim = 0;               ///< channels rotated (partial rotary); 0 = head_dim

  /// Throws kvpack::error naming the first knob out of range for a head of `head_dim`.
  void validate(int head_dim) const {
    constexpr const char* where = "RopeConfig";
    detail::require(std::isfinite(theta) && theta > 1.0, where, "theta", theta,
                    "a finite value > 1");
    const int rd = rotary_dim == 0 ? head_dim : rotary_dim;
    detail::require(rotary_dim >= 0 && rd % 2 == 0 && rd >= 2 && rd <= head_dim, where,
                    "rotary_dim", rotary_dim,
                    detail::concat("0 (all) or an even number in [2, head_dim = ", head_dim, "]"));
    const int kind = static_cast<int>(scaling);
    detail::require(kind >= 0 && kind <= static_cast<int>(RopeScaling::kYarn), where, "scaling",
                    kind, "one of RopeScaling::kNone, kLinear, kLlama3, kYarn");
    if (scaling == RopeScaling::kNone) return;
    detail::require(std::isfinite(factor) && factor >= 1.0, where, "factor", factor,
                    "a finite value >= 1");
    if (scaling == RopeScaling::kLinear) return;
    detail::require(original_context >= 1, where, "original_context", original_context, ">= 1");
    if (scaling == RopeScaling::kLlama3) {
      detail::require(std::isfinite(low_freq_factor) && low_freq_factor > 0.0, where,
                      "low_freq_factor", low_freq_factor, "a finite value > 0");
      detail::require(std::isfinite(high_freq_factor) && high_freq_factor > low_freq_factor, where,
                      "high_freq_factor", high_freq_factor,
                      detail::concat("a finite value > low_freq_factor (", low_freq_factor, ")"));
    } else {
      detail::require(std::isfinite(beta_slow) && beta_slow > 0.0, where, "beta_slow", beta_slow,
                      "a finite value > 0");
      detail::require(std::isfinite(beta_fast) && beta_fast > beta_slow, where, "beta_fast",
                      beta_fast, detail::concat("a finite value > beta_slow (", beta_slow, ")"));
      detail::require(std::isfinite(attention_factor) && attention_factor >= 0.0, where,
                      "attention_factor", attention_factor, "a finite value >= 0 (0: derived)");
    }
  }
};

/// \brief Shape of the attention of a decoder-only model. GQA is first-class: `q_heads` is a
/// multiple of `kv_heads` and query head `h` reads kv head `h / (q_heads / kv_heads)`.
struct ModelShape {
  int layers = 0;
  int q_heads = 0;
  int kv_heads = 0;
  int head_dim = 0;
  RopeConfig rope{};

  int group_size() const { return q_heads / kv_heads; }

  /// Throws kvpack::error naming the first field that is out of range.
  void validate() const {
    constexpr const char* where = "ModelShape";
    detail::require(layers > 0, where, "layers", layers, "> 0");
    detail::require(kv_heads > 0, where, "kv_heads", kv_heads, "> 0");
    detail::require(q_heads > 0 && q_heads % kv_heads == 0, where, "q_heads", q_heads,
                    detail::concat("a positive multiple of kv_heads (", kv_heads, ")"));
    detail::require(head_dim > 0 && head_dim % 2 == 0 && head_dim <= 1024, where, "head_dim",
                    head_dim, "an even number in [2, 1024]");
    rope.validate(head_dim);
  }
};

}  // namespace kvpack
