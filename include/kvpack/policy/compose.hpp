/// \file policy/compose.hpp
/// \brief Compose<A, B>: apply A, then B to what A keeps (e.g. eviction, then quantization).
#pragma once

#include <type_traits>

#include "policy_base.hpp"
#include "quantize.hpp"

namespace kvpack {

/// \brief Two-stage policy: `first` decides what is kept (an eviction policy, LazyLayerDrop, or a
/// low-rank policy: CrossLayerSVD, ChannelShrink), `second` stores it compactly (Quantize).
/// bytes() of the composed cache is the true total.
///
/// What Quantize applies to: after eviction or lazy layers, the kept rows (KIVI as alone,
/// residual window included); after a low-rank stage, the token bases (xKV's shared U,
/// CSKV's latents), per basis column over groups of `group` tokens, while the small per-head
/// factors stay fp32 and the low-rank stage's exact tail stays fp16 (Quantize::residual is
/// not used there: the exact window is the low-rank policy's).
///
/// Splitting a bytes budget R between the stages: quantization takes its fixed factor R_q (the
/// ratio it reaches alone), the first stage the rest. Eviction keeps a token share of R_q / R
/// (kvpack-eval's `--ratio`); CrossLayerSVD with derived ranks prices basis values at the
/// quantized cost (ranks_for_ratio's basis_bytes), so its target_ratio is the composed total's.
template <class First, class Second>
struct Compose : PolicyBase {
  static_assert(std::is_same_v<Second, Quantize>,
                "Compose<A, B>: B must be Quantize (the only storage stage so far)");
  static_assert(!std::is_same_v<First, Quantize>, "Compose<Quantize, ...> quantizes twice");
  static constexpr bool needs_observe = First::needs_observe || Second::needs_observe;
  First first{};
  Second second{};

  Compose() = default;
  Compose(First a, Second b) : first(a), second(b) {}

  /// Each stage's knobs against what they constrain: quantized rows need group | head_dim,
  /// quantized low-rank bases (grouped along tokens) only a valid block format.
  void validate(const ModelShape& shape) const {
    first.validate(shape);
    if constexpr (First::storage_format == StorageFormat::kLowRankFactors) {
      second.validate_basis();
    } else {
      second.validate(shape);
    }
  }
};

namespace detail {

/// The stages the container runs: a selection stage (eviction / lazy layers / none) and
/// whether the kept tokens are then quantized.
template <class P>
struct PolicyStages {
  using selection = P;
  static constexpr bool quantized = std::is_same_v<P, Quantize>;
  static const P& select_knobs(const P& p) { return p; }
  static P& select_knobs(P& p) { return p; }
  static const Quantize* quant_knobs(const P& p) {
    if constexpr (quantized) {
      return &p;
    } else {
      return nullptr;
    }
  }
};

template <class A>
struct PolicyStages<Compose<A, Quantize>> {
  using selection = A;
  static constexpr bool quantized = true;
  static const A& select_knobs(const Compose<A, Quantize>& p) { return p.first; }
  static A& select_knobs(Compose<A, Quantize>& p) { return p.first; }
  static const Quantize* quant_knobs(const Compose<A, Quantize>& p) { return &p.second; }
};

}  // namespace detail
}  // namespace kvpack
