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

/// \brief RoPE configuration: style and base frequency theta (angle = pos * theta^(-2i/d)).
struct RopeConfig {
  RopeStyle style = RopeStyle::kInterleaved;
  double theta = 10000.0;
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
    detail::require(std::isfinite(rope.theta) && rope.theta > 1.0, where, "rope.theta", rope.theta,
                    "a finite value > 1");
  }
};

}  // namespace kvpack
