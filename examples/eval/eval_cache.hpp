#pragma once
// Type-erased kvpack caches for the evaluation: one interface over KVCache<Policy> for every
// policy kvpack-eval can run, built from a PolicySpec (name + knobs).

#include <cstddef>
#include <kvpack/kvpack.hpp>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "attention_cache.hpp"

namespace kvpack::eval {

/// What the command line says about one policy row.
struct PolicySpec {
  std::string name = "full";  ///< a registry name (policy_registry.hpp); "A+quant" composes
  double keep = 0.25;         ///< keep ratio of the eviction stage
  int bits = 4;
  int group = 32;
  int64_t residual = 128;
  bool int8_query = false;  ///< Quantize::int8_query of quant rows (--int8-query)
  double threshold = 0.9;   ///< LazyLayerDrop; chosen from the measured mass (docs/evaluation.md)
  int64_t lazy_recent = 1024;
  int64_t sinks = -1;  ///< protected first tokens; -1: the policy's default
  double ratio = 4.0;  ///< target bytes ratio of the low-rank policies (xkv, cskv)
  /// Eviction rows: keep = R_store / ratio per context, R_store measured (see kvpack-eval --help).
  bool keep_from_ratio = false;
  int xkv_group = 4;  ///< CrossLayerSVD layers per group
  int64_t cskv_residual = 32;
  /// ChannelShrink projections for each layer, calibrated per ratio (set by the runner).
  std::shared_ptr<const ChannelProjections> projections;
  /// KVzip head-level scores from a sample (set by the runner for kvzip-head).
  std::shared_ptr<const HeadScores> head_scores;
  /// KVzip+: the model's output-projection factors (set by the runner for kvzip-plus rows).
  std::shared_ptr<const OutputFactors> output_factors;
  /// KVzap: the fitted hidden-state scorer (set by the runner for kvzap rows).
  std::shared_ptr<const HiddenScorer> kvzap_scorer;

  /// A short label for tables: e.g. "kvzip keep=0.25", "lazy+quant4".
  std::string label() const;
};

/// Ranks (r_k, r_v) of ChannelShrink for a target bytes ratio on `shape` at `tokens` tokens (the
/// projections it holds count): keys compressed three times harder than values (CSKV: K 75 % /
/// V 25 % at 2x beats the reverse).
std::pair<int, int> cskv_ranks(const ModelShape& shape, double ratio, int64_t tokens,
                               double latent_bytes = 2.0);

/// \brief A kvpack cache the model can run on, whatever its policy.
class EvalCache {
 public:
  virtual ~EvalCache() = default;
  /// The cache as the forward pass sees it.
  virtual llama::AttentionCache& attention() = 0;
  /// Whether the forward pass hands its queries to observe() (off during plain prefill).
  virtual void set_observe(bool on) = 0;
  /// Whether observe() gets 1 / ‖x_t‖ query weights (default: exactly for KVzip+ rows).
  virtual void set_query_weights(bool on) = 0;
  /// Softmax window of the next observe() calls (ReconstructionEvict only; ignored otherwise).
  virtual void set_window(const ScoreWindow& window) = 0;
  virtual void compress() = 0;
  /// Drops every token at a position > last_position (the repeat pass of KVzip).
  virtual void truncate(int64_t last_position) = 0;
  virtual std::size_t bytes() const = 0;
  virtual std::size_t dense_bytes() const = 0;
  /// An independent copy (compress once, answer several questions).
  virtual std::unique_ptr<EvalCache> clone() const = 0;
  /// LazyLayerDrop's per-layer statistic and decision (empty for other policies).
  virtual std::vector<double> observed_mass() const = 0;
  virtual std::vector<bool> lazy_layers() const = 0;
  /// KVzip head scores of what a repeat pass observed (ReconstructionEvict; throws otherwise).
  virtual HeadScores head_scores() const = 0;
  virtual int layers() const = 0;
  /// Dense copy of one layer (every kv head), for copying a prefilled cache into another.
  virtual DenseLayer materialize(int layer) const = 0;
  /// Appends every token of `source` at a position < `end_position`, layer by layer: the same
  /// K/V a prefill of those tokens would have appended (prefill attention reads the uncompressed
  /// cache, so it does not depend on the policy). `source` must hold the same tokens in every head.
  void copy_prefix_from(const EvalCache& source, int64_t end_position);
  /// Sets the keep ratio and scope of the eviction stage (a cache observed once, compressed at
  /// several budgets); throws for policies without one.
  virtual void set_budget(double keep, BudgetScope scope) = 0;
  /// Keeps every attention input the forward pass hands this cache (x per layer, positions 0..
  /// in order): a prefill captured once feeds the hidden-state scorers of the rows copied from it.
  virtual void set_capture_hidden(bool on) = 0;
  /// What set_capture_hidden(true) kept of `layer`: tokens × hidden, row-major (empty if none).
  virtual const std::vector<float>& captured_hidden(int layer) const = 0;
  /// KVCache::token_scores of a policy that scores tokens (throws for others).
  virtual std::vector<float> token_scores(int layer, int head) const = 0;
  /// Seconds this cache spent scoring hidden states copied in by copy_prefix_from (KVzap).
  double hidden_score_seconds() const { return hidden_score_seconds_; }

 protected:
  virtual void append_rows(int layer, const float* k, const float* v, const int64_t* positions,
                           int64_t n) = 0;
  /// Scores copied-in tokens from their captured attention inputs (KVzap; a no-op otherwise).
  virtual void observe_hidden_rows(int layer, const float* x, const int64_t* positions, int64_t n,
                                   int hidden) = 0;

 private:
  double hidden_score_seconds_ = 0;
};

/// The cache of a row: its policy's registry entry (policy_registry.hpp) builds it, as a new
/// sequence of `home`'s KVCacheBatch when `home` holds the same policy type, else in a batch of
/// its own.
std::unique_ptr<EvalCache> make_cache(const PolicySpec& spec, const ModelShape& shape,
                                      const EvalCache* home = nullptr);

}  // namespace kvpack::eval
