/// \file detail/cache_front.hpp
/// \brief The part of KVCache every backend shares: shape, policy, per-layer state, the checks
/// of each public call, the compress() preconditions and the rollback plan of truncate().
#pragma once

// clang-format off
#include "internal.hpp"  // first, before anything defines the macro it checks
// clang-format on

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "../error.hpp"
#include "../half.hpp"
#include "../policy/compose.hpp"
#include "../policy/policy_base.hpp"
#include "../shape.hpp"
#include "../span.hpp"
#include "../view.hpp"
#include "validate.hpp"

namespace kvpack {
namespace detail {

/// \brief Front end of KVCache<Policy, Backend>: a backend derives from it and adds storage.
/// Every check here runs before any state changes, so a refused call leaves the cache as it was.
template <class Policy>
class CacheFront {
  static_assert(is_policy_v<Policy>,
                "Policy lacks what KVCache needs: derive it from kvpack::PolicyBase (or "
                "EvictionPolicy) and provide storage_type and validate(const ModelShape&)");

 public:
  using policy_type = Policy;
  /// Element type of stored rows: Half or float.
  using storage_type = typename Policy::storage_type;
  static_assert(std::is_same_v<storage_type, Half> || std::is_same_v<storage_type, float>,
                "KVCache stores Half or float rows");

  const ModelShape& shape() const { return shape_; }
  const Policy& policy() const { return policy_; }
  /// Runtime knobs a driver changes between calls (e.g. a query-scored policy's window).
  /// Changing a knob that validate() checks is re-validated by the next compress().
  Policy& policy() { return policy_; }

  /// What an uncompressed fp16 cache of the appended tokens would hold (K and V only).
  std::size_t dense_bytes() const {
    std::size_t total = 0;
    for (const auto& layer : layers_) {
      total += static_cast<std::size_t>(layer.appended) * shape_.kv_heads * shape_.head_dim * 2 * 2;
    }
    return total;
  }

  /// Tokens ever appended to `layer` (the logical sequence length).
  int64_t appended(int layer) const {
    check_layer("KVCache::appended", shape_, layer);
    return layers_[layer].appended;
  }

 protected:
  /// Validates the shape and the policy's knobs; throws kvpack::error on a bad value.
  CacheFront(const ModelShape& shape, Policy policy) : shape_(shape), policy_(std::move(policy)) {
    shape_.validate();
    policy_.validate(shape_);
    layers_.resize(shape_.layers);
  }

  /// Largest magnitude append() accepts: what storage_type holds (fp16: 65504).
  static constexpr float storage_limit() {
    return std::is_same_v<storage_type, Half> ? 65504.0f : std::numeric_limits<float>::max();
  }

  /// append(): layer, both views, equal token counts, positions after the layer's last.
  void check_append(const char* where, int layer, const ActivationView& k, const ActivationView& v,
                    Positions positions) const {
    check_layer(where, shape_, layer);
    check_view(where, "k", k, shape_.kv_heads, shape_.head_dim);
    check_view(where, "v", v, shape_.kv_heads, shape_.head_dim);
    require(v.tokens() == k.tokens(), where, "v.tokens", v.tokens(),
            [&] { return concat(k.tokens(), " (k.tokens)"); });
    check_append_positions(where, positions, k.tokens(), layers_[layer]);
  }

  /// append(): every element of k and v finite and inside the storage range (check_values).
  void check_append_values(const char* where, const ActivationView& k,
                           const ActivationView& v) const {
    check_values(where, "k", k, storage_limit());
    check_values(where, "v", v, storage_limit());
  }

  /// Records an appended block of `n` tokens at `positions` in the layer's state.
  void record_append(int layer, Positions positions, int64_t n) {
    LayerState& state = layers_[layer];
    if (state.appended == 0) state.first_position = positions[0];
    state.last_position = positions[n - 1];
    state.appended += n;
  }

  /// observe() / attend(): layer, the query view, positions inside what the layer has seen.
  void check_query_shape(const char* where, int layer, const ActivationView& q,
                         Positions positions) const {
    check_layer(where, shape_, layer);
    check_view(where, "q", q, shape_.q_heads, shape_.head_dim);
    check_query_positions(where, positions, q.tokens(), layers_[layer]);
  }

  /// observe(): query weights (KVzip+'s 1 / ‖x_t‖), one finite value > 0 per query token, only
  /// for policies scored by observed queries; none is always fine.
  void check_observe_weights(const char* where, const ActivationView& q,
                             Span<const float> query_weights) const {
    if (query_weights.empty()) return;
    require(PolicyStages<Policy>::selection::score_source == ScoreSource::kObservedQueries, where,
            "query_weights", "given",
            "none (only policies scored by observed queries weight them)");
    check_query_weights(where, query_weights, q.tokens());
  }

  /// observe_hidden(): x is tokens × 1 × `hidden` (the scorer's input size); positions as for
  /// queries.
  void check_hidden_shape(const char* where, int layer, const ActivationView& x,
                          Positions positions, int hidden) const {
    check_layer(where, shape_, layer);
    require(x.data() != nullptr && x.tokens() > 0, where, "x", "empty or null",
            "tokens x 1 x hidden states");
    require(
        x.heads() == 1 && x.head_dim() == hidden, where, "x shape",
        [&] { return concat(x.tokens(), " x ", x.heads(), " x ", x.head_dim()); },
        [&] { return concat(x.tokens(), " x 1 x ", hidden, " (the scorer's hidden size)"); });
    check_query_positions(where, positions, x.tokens(), layers_[layer]);
  }

  /// observe_hidden(): the error for log-score `index` ([token][kv head]) not being finite. The
  /// dot product of huge (finite) inputs overflows to inf, or to NaN where inf - inf meets; which
  /// one depends on the summation order and on fused multiply-adds, so both are refused alike.
  [[noreturn]] void refuse_non_finite_log_score(const char* where, int64_t index,
                                                Positions positions) const {
    const int64_t heads = shape_.kv_heads;
    throw error(concat(
        where, ": the scorer's log-score of token ", index / heads, " (position ",
        positions[index / heads], "), kv head ", index % heads,
        " is not finite (inf or NaN: the dot product overflowed); expected hidden states of a "
        "sane magnitude"));
  }

  /// attend(): the output view matches the queries.
  void check_output(const char* where, const ActivationView& q, const OutputView& out) const {
    require(out.data() != nullptr, where, "out", "null data", "a writable buffer");
    require(
        out.tokens() == q.tokens() && out.heads() == shape_.q_heads &&
            out.head_dim() == shape_.head_dim,
        where, "out shape",
        [&] { return concat(out.tokens(), "x", out.heads(), "x", out.head_dim()); },
        [&] { return concat(q.tokens(), "x", shape_.q_heads, "x", shape_.head_dim); });
  }

  /// attend(): every kv head of `layer` holds a key at or before the earliest query.
  /// `held(h)` gives the head's token count and its first held position.
  template <class Held>
  void check_visible(const char* where, int layer, Positions positions, Held&& held) const {
    int64_t min_query = positions[0];
    for (std::size_t t = 1; t < positions.size(); ++t)
      min_query = std::min(min_query, positions[t]);
    for (int h = 0; h < shape_.kv_heads; ++h) {
      const auto [size, first] = held(h);
      if (size == 0 || first > min_query) {
        throw error(
            concat(where, ": layer ", layer, " kv head ", h,
                   size == 0 ? " holds no tokens" : " holds no token at or before position ",
                   size == 0 ? "" : std::to_string(min_query),
                   ", expected at least one visible key per query"));
      }
    }
  }

  void check_head(const char* where, int layer, int head) const {
    check_layer(where, shape_, layer);
    require(head >= 0 && head < shape_.kv_heads, where, "head", head,
            [&] { return concat("in [0, ", shape_.kv_heads, ")"); });
  }

  /// compress(): observe() came first when the policy needs it; the knobs are still valid.
  void check_compress() const {
    if constexpr (Policy::needs_observe) {
      require(observed_, "KVCache::compress", "observe()", "never called",
              "observe() (queries) or observe_hidden() (KVzap: hidden states) before "
              "compress() for this policy");
    }
    policy_.validate(shape_);
  }

  /// truncate(): tokens to drop per layer. `after(l, h)` counts the tokens of (layer, head)
  /// at positions > last_position; every head of a layer must drop the same count (else some
  /// were evicted, and the rollback would not be a rollback).
  template <class After>
  std::vector<int64_t> plan_truncate(const char* where, int64_t last_position,
                                     After&& after) const {
    std::vector<int64_t> drop(shape_.layers, 0);
    for (int l = 0; l < shape_.layers; ++l) {
      if (layers_[l].last_position <= last_position) continue;
      for (int h = 0; h < shape_.kv_heads; ++h) {
        const int64_t count = after(l, h);
        if (h == 0) drop[l] = count;
        if (count != drop[l]) {
          throw error(concat(where, ": last_position = ", last_position,
                             ", expected a position after which layer ", l,
                             " still holds every appended token (some were evicted)"));
        }
      }
    }
    return drop;
  }

  /// truncate() of KIVI blocks: refuses a rollback that would leave `split` tokens of (layer,
  /// head) inside a quantized group (a group's key blocks span all its tokens: cutting one would
  /// re-quantize or widen it to fp16). positions: the head's `size` held positions, ascending.
  void refuse_group_split(const char* where, int64_t last_position, int layer, int head,
                          int64_t split, const int32_t* positions, int64_t size,
                          int64_t drop) const {
    if (split == 0) return;
    const int64_t whole = size - drop - split;  // tokens in the groups that stay whole
    throw error(
        concat(where, ": last_position = ", last_position,
               " would cut inside a quantized group of layer ", layer, " kv head ", head, " (",
               split, " of its tokens stay), expected the end of a group: ",
               whole > 0 ? concat("position ", positions[whole - 1]) : std::string("clear()"),
               ", or a position in the fp16 residual"));
  }

  /// Whether layer l is touched by a truncate to last_position that drops drop[l] tokens.
  bool truncates(int layer, int64_t last_position, const std::vector<int64_t>& drop) const {
    return drop[layer] != 0 || layers_[layer].last_position > last_position;
  }

  /// Updates the layers' state after the heads dropped drop[l] tokens each.
  void commit_truncate(int64_t last_position, const std::vector<int64_t>& drop) {
    for (int l = 0; l < shape_.layers; ++l) {
      if (!truncates(l, last_position, drop)) continue;
      LayerState& state = layers_[l];
      state.appended -= drop[l];
      state.last_position = state.appended == 0 ? -1 : std::min(state.last_position, last_position);
      if (state.appended == 0) state.first_position = -1;
    }
  }

  /// clear(): forget the layers' sequences.
  void clear_front() {
    for (auto& layer : layers_) layer = LayerState{};
    observed_ = false;
  }

  ModelShape shape_;
  Policy policy_;
  std::vector<LayerState> layers_;
  bool observed_ = false;
};

}  // namespace detail
}  // namespace kvpack

/// Declares `Front` and the front end's members a backend's KVCache uses unqualified (names of a
/// dependent base need a using-declaration; Eigen's EIGEN_DENSE_PUBLIC_INTERFACE idiom). Use in
/// a private section of the backend's class.
#define KVPACK_CACHE_FRONT_MEMBERS(Policy)            \
  using Front = ::kvpack::detail::CacheFront<Policy>; \
  using Front::layers_;                               \
  using Front::observed_;                             \
  using Front::policy_;                               \
  using Front::shape_
