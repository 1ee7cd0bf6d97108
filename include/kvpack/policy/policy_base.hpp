/// \file policy/policy_base.hpp
/// \brief Bases every policy derives from, and the traits the container checks policies with.
///
/// A policy is a small struct of knobs (with the paper's defaults) plus hooks. Hooks a policy
/// does not need come from these bases. The container asks the traits below what kind of
/// policy it holds and fails with a readable static_assert when a policy lacks what it needs.
#pragma once

#include <cstdint>
#include <limits>
#include <type_traits>

#include "../budget.hpp"
#include "../config.hpp"
#include "../half.hpp"
#include "../shape.hpp"
#include "score_window.hpp"

namespace kvpack {

struct OutputFactors;  // policy/output_factors.hpp

/// Where a policy's selection stage gets its scores. The container runs the matching scoring
/// pass and selection; it never names a concrete policy.
enum class ScoreSource {
  kNone,             ///< no selection by score (keep everything, quantize, low rank)
  kKeyValue,         ///< static token_score(key, value, head_dim) of each held row (L2 norm)
  kPosition,         ///< static position_score(position, last_position): recency (StreamingLLM)
  kObservedQueries,  ///< softmax attention of the queries handed to observe() (KVzip, SnapKV)
  kHeadScores,       ///< one score per (layer, kv head): heads kept whole or cut to protection
  kLayerMass,        ///< observed attention mass per layer (SimLayerKV's lazy layers)
  kHiddenStates,     ///< a learned scorer of the hidden states handed to observe_hidden() (KVzap)
};

/// How the softmax probabilities that observed queries give a key become its score.
enum class QueryReduction {
  kMax,  ///< the largest over queries and the query heads of the GQA group (KVzip)
  kSum,  ///< the sum over queries and the query heads of the GQA group (SnapKV)
};

/// What the selection stage of a policy keeps: token rows (dense, or KIVI blocks when quantized)
/// or low-rank factors (a token basis shared by heads times per-head factors). It decides the
/// store the container uses and what a following Quantize stage quantizes.
enum class StorageFormat {
  kRows,            ///< one row per kept token and head
  kLowRankFactors,  ///< basis A (tokens × rank) · factor B (rank × head_dim), exact recent tail
};

/// \brief Defaults for every policy: fp16 rows, no knobs to validate, no queries needed.
struct PolicyBase {
  static constexpr StorageFormat storage_format = StorageFormat::kRows;
  static constexpr ScoreSource score_source = ScoreSource::kNone;
  /// Element type of stored K/V rows (Half or float).
  using storage_type = Half;
  /// Whether compress() needs observe() to have been called first.
  static constexpr bool needs_observe = false;
  void validate(const ModelShape&) const {}
};

/// \brief Base of token-eviction policies: a budget, layers left whole, a minimum length.
///
/// Derived policies provide the scores (higher = keep); the container selects per the budget
/// and compacts storage so evicted tokens free their memory.
struct EvictionPolicy : PolicyBase {
  static constexpr ScoreSource score_source = ScoreSource::kKeyValue;
  /// Whether token_score reads the value row (false: the backend may pass a null value and skip
  /// decoding values). A policy derived from one that says false and reads values says true.
  static constexpr bool token_score_reads_values = true;
  Budget budget{};
  /// Marks a policy's paper-default layer skip (kPaperSkipLayers): resolved per model by
  /// detail::first_layer(), so that a default never refuses a small model.
  static constexpr int kPaperSkip = -1;
  int skip_layers = 0;     ///< layers [0, skip_layers) are never compressed (kPaperSkip: see above)
  int64_t min_tokens = 0;  ///< layers with fewer appended tokens are not compressed

  /// The paper's layer skip of a policy whose skip_layers is kPaperSkip (see first_layer()).
  static constexpr int kPaperSkipLayers = 0;

  void validate(const ModelShape& shape) const {
    budget.validate("EvictionPolicy");
    detail::require(
        skip_layers == kPaperSkip || (skip_layers >= 0 && skip_layers <= shape.layers),
        "EvictionPolicy", "skip_layers", skip_layers,
        detail::concat("in [0, ", shape.layers, "] (this model's layers), or ", "kPaperSkip"));
    detail::require(min_tokens >= 0, "EvictionPolicy", "min_tokens", min_tokens, ">= 0");
  }

  /// Hook: odd width of the max pooling every backend applies to one (layer, kv head)'s scores,
  /// in held order, before selection (SnapKV's pooling over neighbouring tokens; see
  /// detail::max_pooled_score). 1: no pooling (the default).
  int score_pool_width() const { return 1; }
  /// Hook: when not NaN, compress() keeps every token whose score is at least this (on the
  /// scale the cache stores) instead of a budget's count; sinks and the recent window still
  /// stay (KVzap's threshold). Default NaN: the budget decides.
  float score_threshold() const { return std::numeric_limits<float>::quiet_NaN(); }
};

namespace detail {
/// Score of held token i after a max pooling of `radius` places on either side over the n raw
/// scores of one (layer, kv head) in held order (the scalar reference of score_pool_width();
/// unscored tokens hold a value below every score, so they never win a neighbourhood that holds
/// a scored one).
KVPACK_HOST_DEVICE float max_pooled_score(const float* raw, int64_t n, int64_t i, int64_t radius) {
  const int64_t lo = i - radius > 0 ? i - radius : 0;
  const int64_t hi = i + radius + 1 < n ? i + radius + 1 : n;
  float best = raw[lo];
  for (int64_t j = lo + 1; j < hi; ++j) best = raw[j] > best ? raw[j] : best;
  return best;
}

/// The first layer compress() touches: skip_layers, or for kPaperSkip the policy's paper value
/// (P::kPaperSkipLayers) capped at layers − 1, so at least one layer is compressed.
template <class P>
int first_layer(const P& policy, int layers) {
  if (policy.skip_layers != EvictionPolicy::kPaperSkip) return policy.skip_layers;
  return P::kPaperSkipLayers < layers - 1 ? P::kPaperSkipLayers : layers - 1;
}
}  // namespace detail

/// How KVzip+ (a query-scored policy with output factors, OutputFactors) weights the probability
/// p_qj that query head h of token q gives key j before the max over queries.
enum class ValueWeighting {
  /// ‖W_o,h·v_j‖: the value's own contribution to the residual stream (KVzap paper, §3).
  kNorm,
  /// ‖W_o,h·(o_q − v_j)‖ / (1 − p_qj), o_q the query's attention output over the window: evicting
  /// j alone renormalises the other probabilities, which moves the output by
  /// p_qj/(1 − p_qj)·(o_q − v_j), so p_qj times this weight is that displacement in the residual
  /// stream. kvpack's (derived from KVzip+; not in the papers): it differs from kNorm where the
  /// value is small and the attention large, which kNorm scores near zero.
  kDisplacement,
};

/// \brief Base of eviction policies scored by the queries handed to observe(): the container
/// keeps one float per held token, reduced over every observed query and the query heads of the
/// GQA group by `query_reduction`. Tokens no observed query has seen are kept outside the budget
/// (Budget: "over a growing sequence").
struct QueryScoredEviction : EvictionPolicy {
  static constexpr bool needs_observe = true;
  static constexpr ScoreSource score_source = ScoreSource::kObservedQueries;
  static constexpr QueryReduction query_reduction = QueryReduction::kMax;
  /// Keys that enter the softmax of the next observe() calls (default: every key).
  ScoreWindow window{};
  /// Hook: per (layer, query head) factors of the output projection that weight each key's
  /// probability by the norm of its value's contribution to the residual stream (KVzip+,
  /// OutputFactors), or null for plain probabilities (the default).
  const OutputFactors* value_weights() const { return nullptr; }
  /// Hook: how value_weights() weights each probability (used only when it is not null).
  ValueWeighting value_weighting() const { return ValueWeighting::kNorm; }
};

/// One factoring job of a low-rank policy: the first `tokens` held tokens of layers [l0, l1),
/// keys (pre-RoPE) or values, stacked side by side into X [tokens, (l1 - l0) · kv_heads ·
/// head_dim] (column block (layer - l0) · kv_heads + head) and factored at `rank`.
struct LowRankJob {
  int l0 = 0, l1 = 0;
  bool keys = true;
  int rank = 0;
  int64_t tokens = 0;
};

/// What a low-rank policy's factor() computes (see LowRankPolicy).
enum class LowRankFactorization {
  kTruncatedSvd,  ///< the rank-r truncated SVD of X (xKV)
  kProjection     ///< X times a fixed projection the policy holds (CSKV)
};

/// What a low-rank policy's plan sees of one layer: tokens held (every head of a layer holds the
/// same ones under a low-rank policy) and how many of them an earlier compress() factored.
struct LowRankLayer {
  int64_t tokens = 0;
  int64_t factored = 0;
};

/// \brief Base of low-rank policies (StorageFormat::kLowRankFactors). A derived policy provides
/// two hooks; the container gathers X, checks that the stacked heads hold the same tokens, runs
/// the jobs (in parallel, all before anything held changes) and stores the factors:
///  - `std::vector<LowRankJob> plan(const ModelShape&, const std::vector<LowRankLayer>&,
///     double basis_bytes, const char* where) const`: the jobs of one compress(), keys and
///     values of the same layers as adjacent pairs; `basis_bytes` is the cost of one basis
///     value (fp16: 2, quantized by Compose<…, Quantize>: Quantize::bytes_per_value()); throws
///     kvpack::error (prefixed by `where`) for a rank the held tokens cannot carry.
///  - `void factor(const LowRankJob&, const RowMatrixXf& x, RowMatrixXf& a, Eigen::MatrixXf& bt)
///     const`: X [tokens, cols] ≈ A [tokens, rank] · Btᵀ with Bt [cols, rank]; A becomes the
///     token basis shared by the job's heads, rows [c, c + head_dim) of Bt one head's factor.
///
/// Backends that factor on their own device (the CUDA cache) read what factor() computes from
/// the trait `factorization`: kTruncatedSvd (the default; A·Btᵀ is X's rank-r truncated SVD,
/// however Σ is split between A and Bt) or kProjection, where the policy also provides
/// `const float* projection(const LowRankJob&) const`: Bt [cols][rank] row-major (host), and
/// A = X·Bt.
struct LowRankPolicy : PolicyBase {
  static constexpr StorageFormat storage_format = StorageFormat::kLowRankFactors;
  static constexpr LowRankFactorization factorization = LowRankFactorization::kTruncatedSvd;
};

namespace detail {

template <class P, class = void>
struct has_validate : std::false_type {};
template <class P>
struct has_validate<
    P, std::void_t<decltype(std::declval<const P&>().validate(std::declval<const ModelShape&>()))>>
    : std::true_type {};

template <class P, class = void>
struct has_storage_type : std::false_type {};
template <class P>
struct has_storage_type<P, std::void_t<typename P::storage_type>> : std::true_type {};

template <class P, class T, class = void>
struct has_token_score : std::false_type {};
template <class P, class T>
struct has_token_score<
    P, T,
    std::void_t<decltype(P::token_score(std::declval<const T*>(), std::declval<const T*>(), 0))>>
    : std::true_type {};

/// P::token_score_reads_values, true for a policy that does not say (EvictionPolicy).
template <class P, class = void>
struct token_score_reads_values : std::true_type {};
template <class P>
struct token_score_reads_values<P, std::void_t<decltype(P::token_score_reads_values)>>
    : std::bool_constant<P::token_score_reads_values> {};

/// Whether P reduces observed probabilities by their sum (QueryReduction::kSum).
template <class P>
constexpr bool sums_query_scores() {
  if constexpr (P::score_source == ScoreSource::kObservedQueries) {
    return P::query_reduction == QueryReduction::kSum;
  } else {
    return false;
  }
}

}  // namespace detail

/// \brief True when P can be held by a KVCache (C++17 stand-in for a concept).
template <class P>
inline constexpr bool is_policy_v = std::is_base_of_v<PolicyBase, P>&&
    detail::has_validate<P>::value&& detail::has_storage_type<P>::value;

/// \brief True for policies that evict tokens by a per-token score.
template <class P>
inline constexpr bool is_eviction_policy_v = std::is_base_of_v<EvictionPolicy, P>;

}  // namespace kvpack
