/// \file policy/kvzap.hpp
/// \brief KVzap (Jegou et al., arXiv 2601.07891): evict the KV pairs a small learned scorer,
/// applied to each token's hidden state, predicts KVzip+ would evict, with no repeat pass, in
/// prefill and in decoding alike.
#pragma once

#include <Eigen/Core>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "../config.hpp"
#include "../detail/checked_file.hpp"
#include "../error.hpp"
#include "policy_base.hpp"

namespace kvpack {

/// \brief KVzap's linear scorer: per layer, s = x · W + b, one log-score per kv head for a
/// token whose attention input (the RMS-normed hidden state the layer's Q/K/V projections read)
/// is x [hidden]. Fitted to log KVzip+ scores by ridge regression (kvpack-eval --kvzap-scorer).
///
/// File format (little-endian): "KVPKZAPL", u32 version (1), u32 layers, u32 kv_heads, u32
/// hidden, f32 weight (layers × hidden × kv_heads), f32 bias (layers × kv_heads), u64 count and
/// f32 held-out R² per layer (0 or layers of them, for the record), f64 ridge λ, u64 FNV-1a
/// checksum of every preceding byte.
struct HiddenScorer {
  int layers = 0, kv_heads = 0, hidden = 0;
  std::vector<float> weight;       ///< [layer][hidden][kv_head]
  std::vector<float> bias;         ///< [layer][kv_head]
  std::vector<float> held_out_r2;  ///< [layer]: the fit on held-out tokens (empty: not measured)
  double ridge = 0.0;              ///< the largest ridge λ a layer's fit chose (for the record)

  HiddenScorer() = default;
  /// Zero weights for `layers` × `kv_heads` with `hidden` inputs.
  HiddenScorer(int layers_, int kv_heads_, int hidden_)
      : layers(layers_),
        kv_heads(kv_heads_),
        hidden(hidden_),
        weight(static_cast<std::size_t>(layers_) * hidden_ * kv_heads_, 0.0f),
        bias(static_cast<std::size_t>(layers_) * kv_heads_, 0.0f) {}

  /// W of `layer`: hidden × kv_heads, row-major.
  const float* layer_weight(int layer) const {
    return weight.data() + static_cast<std::size_t>(layer) * hidden * kv_heads;
  }

  /// Log-scores of `tokens` rows x (row-major [tokens × hidden], row stride `stride` floats)
  /// into out [tokens × kv_heads]. No checks: the cache validates first.
  void score(int layer, const float* x, int64_t tokens, int64_t stride, float* out) const {
    using RowMatrix = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
    const Eigen::Map<const RowMatrix, 0, Eigen::OuterStride<>> xs(x, tokens, hidden,
                                                                  Eigen::OuterStride<>(stride));
    const Eigen::Map<const RowMatrix> w(layer_weight(layer), hidden, kv_heads);
    const Eigen::Map<const Eigen::RowVectorXf> b(
        bias.data() + static_cast<std::size_t>(layer) * kv_heads, kv_heads);
    Eigen::Map<RowMatrix> s(out, tokens, kv_heads);
    s.noalias() = xs * w;
    s.rowwise() += b;
  }

  /// Made for `shape`'s layers and kv heads, hidden > 0, every weight and bias finite (the
  /// hidden size is the engine's: observe_hidden() checks its inputs against it).
  void validate(const ModelShape& shape, const char* where) const {
    detail::require(
        layers == shape.layers && kv_heads == shape.kv_heads, where, "scorer layers x kv_heads",
        [&] { return detail::concat(layers, " x ", kv_heads); },
        [&] { return detail::concat(shape.layers, " x ", shape.kv_heads, " (the model's)"); });
    detail::require(hidden > 0, where, "scorer hidden", hidden, "> 0");
    detail::require(
        weight.size() == static_cast<std::size_t>(layers) * hidden * kv_heads &&
            bias.size() == static_cast<std::size_t>(layers) * kv_heads,
        where, "scorer weight/bias sizes",
        [&] { return detail::concat(weight.size(), "/", bias.size()); },
        "layers x hidden x kv_heads / layers x kv_heads");
    for (const auto* v : {&weight, &bias}) {
      for (std::size_t i = 0; i < v->size(); ++i) {
        if (!std::isfinite((*v)[i])) {
          throw error(detail::concat(where, ": scorer ", v == &weight ? "weight" : "bias", "[", i,
                                     "] = ", (*v)[i], ", expected a finite value"));
        }
      }
    }
  }

  void save(const std::string& path) const {
    detail::CheckedFileWriter out("KVPKZAPL");
    out.put_u32(kVersion);
    out.put_u32(static_cast<uint32_t>(layers));
    out.put_u32(static_cast<uint32_t>(kv_heads));
    out.put_u32(static_cast<uint32_t>(hidden));
    out.put_floats(weight);
    out.put_floats(bias);
    out.put_vector(held_out_r2);
    out.put_f64(ridge);
    out.write(path, "HiddenScorer::save");
  }

  /// Reads a file written by save(); a truncated, corrupted, foreign or non-finite file is an
  /// error (kvpack::error).
  static HiddenScorer load(const std::string& path) {
    detail::CheckedFileReader in(path, "KVPKZAPL", "HiddenScorer::load", "scorer");
    in.expect_version(kVersion);
    const auto layers = static_cast<int>(in.get_u32());
    const auto kv_heads = static_cast<int>(in.get_u32());
    const auto hidden = static_cast<int>(in.get_u32());
    if (layers <= 0 || layers > 4096 || kv_heads <= 0 || kv_heads > 4096 || hidden <= 0 ||
        hidden > 65536) {
      throw error(detail::concat(in.where(), ": implausible shape in header (", layers,
                                 " layers x ", kv_heads, " kv heads x ", hidden, " hidden)"));
    }
    // Sizes from the header are checked against the bytes left before anything is allocated.
    HiddenScorer s;
    s.layers = layers;
    s.kv_heads = kv_heads;
    s.hidden = hidden;
    s.weight = in.get_floats(static_cast<std::size_t>(layers) * hidden * kv_heads, "weights");
    s.bias = in.get_floats(static_cast<std::size_t>(layers) * kv_heads, "biases");
    s.held_out_r2 = in.get_vector<float>(static_cast<std::size_t>(layers), "held-out R2");
    s.ridge = in.get_f64();
    in.finish();
    if (!s.held_out_r2.empty() && s.held_out_r2.size() != static_cast<std::size_t>(layers)) {
      throw error(detail::concat(in.where(), ": ", s.held_out_r2.size(),
                                 " held-out R2 values, expected 0 or one per layer (", layers,
                                 ")"));
    }
    ModelShape shape;
    shape.layers = layers;
    shape.kv_heads = kv_heads;
    s.validate(shape, in.where().c_str());
    return s;
  }

 private:
  static constexpr uint32_t kVersion = 1;
};

/// \brief KVzap eviction: tokens are scored when the engine hands their hidden states to
/// KVCache::observe_hidden() (prefill chunks and decode steps alike, right after append()), by
/// `scorer`; compress() then keeps the budget's share of the scored tokens (global or per head),
/// or, with `threshold` set, every token whose log-score is at least the threshold (kvpress's
/// ThresholdPress: the kept share then follows the input). Sinks and the recent window are never
/// evicted (KVzap keeps a sliding window: a token becomes evictable once it leaves it); tokens
/// never scored are kept outside the budget (Budget: "over a growing sequence").
///
/// Stored scores are exp(log-score), the predicted KVzip+ score itself (the scale of
/// ReconstructionEvict with an OutputFactors), with log-scores clamped to [-87, 88] so that they
/// fit a float; KVCache::token_scores() returns them.
struct KVzap : EvictionPolicy {
  static constexpr const char* name = "KVzap";
  static constexpr ScoreSource score_source = ScoreSource::kHiddenStates;
  static constexpr bool needs_observe = true;
  std::shared_ptr<const HiddenScorer> scorer;
  /// Log-score below which a token is evicted; NaN (the default): use the budget instead.
  double threshold = std::numeric_limits<double>::quiet_NaN();

  KVzap() {
    budget = Budget::ratio(0.5, BudgetScope::kGlobal);
    budget.recent_tokens = 128;  // kvpress's KVzap window; sinks: the Budget default (4)
  }
  KVzap(std::shared_ptr<const HiddenScorer> s, Budget b) : scorer(std::move(s)) { budget = b; }
  /// Threshold eviction (the budget's keep ratio is then unused; its sinks and window are not).
  static KVzap with_threshold(std::shared_ptr<const HiddenScorer> s, double log_threshold,
                              Budget protection = KVzap().budget) {
    KVzap p(std::move(s), protection);
    p.threshold = log_threshold;
    return p;
  }

  void validate(const ModelShape& shape) const {
    EvictionPolicy::validate(shape);
    detail::require(scorer != nullptr, "KVzap", "scorer", "null",
                    "a fitted scorer (HiddenScorer::load, kvpack-eval --kvzap-scorer)");
    scorer->validate(shape, "KVzap");
    detail::require(std::isnan(threshold) || (threshold >= -87.0 && threshold <= 88.0), "KVzap",
                    "threshold", threshold, "a log-score in [-87, 88], or NaN (use the budget)");
  }

  /// Hook: the scorer observe_hidden() applies (validate() has checked it is set).
  const HiddenScorer& hidden_scorer() const { return *scorer; }
  /// Hook: the stored-score threshold of compress() (NaN: the budget decides).
  float score_threshold() const {
    return std::isnan(threshold) ? std::nanf("") : std::exp(static_cast<float>(threshold));
  }
  /// Hook: stored score of a log-score (see above); host and device (the CUDA cache stores
  /// scores with it).
  KVPACK_HOST_DEVICE static float stored_score(float log_score) {
    return expf(log_score < -87.0f ? -87.0f : (log_score > 88.0f ? 88.0f : log_score));
  }
};

}  // namespace kvpack
