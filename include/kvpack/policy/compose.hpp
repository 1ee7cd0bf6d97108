/// \file policy/compose.hpp
/// \brief Compose<A, B>: apply A, then B to what A keeps (e.g. eviction, then quantization).
#pragma once

#include <type_traits>

#include "policy_base.hpp"
#include "quantize.hpp"

namespace kvpack {

/// \brief Two-stage policy: `first` selects what is kept (an eviction policy or LazyLayerDrop),
/// `second` stores it compactly (Quantize). bytes() of the composed cache is the true total.
///
/// Splitting a bytes budget: a target bytes ratio R is met by keeping a token share of
/// R_q / R, where R_q is the ratio the quantizer alone reaches (see kvpack-eval's
/// `--bytes-ratio`); the eviction stage takes what quantization cannot give.
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

  void validate(const ModelShape& shape) const {
    first.validate(shape);
    second.validate(shape);
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
