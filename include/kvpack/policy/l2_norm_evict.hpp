/// \file policy/l2_norm_evict.hpp
/// \brief L2NormEvict (Devoto et al., EMNLP 2024): keep the keys with the lowest L2 norm.
///
/// Low key norm correlates with high attention, so the score needs keys only: no queries, no
/// attention maps. The reference leaves the first layers whole.
#pragma once

#include "../config.hpp"
#include "../half.hpp"
#include "policy_base.hpp"

namespace kvpack {

/// \brief Per (layer, kv-head), keeps the tokens whose post-RoPE key has the lowest L2 norm.
///
/// Knobs (paper defaults): budget (keep ratio 0.5, per head), layers 0–1 left whole (the paper
/// finds no norm–attention correlation there). The default skip is kPaperSkip: 2 layers, capped
/// at layers − 1 so a model of 1 or 2 layers is still compressed (its last layer) instead of
/// refused; an explicit skip is taken as given (and refused past the model's layers). The
/// budget protects 4 sinks and the 32 most recent tokens unless told otherwise (Budget).
struct L2NormEvict : EvictionPolicy {
  static constexpr const char* name = "L2NormEvict";
  static constexpr int kPaperSkipLayers = 2;
  L2NormEvict() { skip_layers = kPaperSkip; }
  explicit L2NormEvict(Budget b, int skip = kPaperSkip) {
    budget = b;
    skip_layers = skip;
  }

  static constexpr bool token_score_reads_values = false;  ///< keys only
  /// Score of one token: −‖k‖² (higher = keep); `value` is not read (may be null). Shared by the
  /// CPU and CUDA backends.
  template <class T>
  KVPACK_HOST_DEVICE static float token_score(const T* key, const T* /*value*/, int head_dim) {
    float acc = 0.0f;
    for (int i = 0; i < head_dim; ++i) {
      const float x = to_float(key[i]);
      acc += x * x;
    }
    return -acc;
  }
};

}  // namespace kvpack
