/// \file policy/reconstruction_evict.hpp
/// \brief ReconstructionEvict (KVzip, arXiv 2505.23416): evict the KV pairs the model does not
/// attend to while it re-reads ("repeats") its context.
///
/// The driver (an engine, or kvpack-eval) runs the model on a repeat prompt followed by the
/// context, teacher-forced, and hands every query of that pass to observe(). Each cached pair is
/// scored by the maximum softmax probability it receives over those queries and over the query
/// heads of its GQA group. One global threshold over all layers and heads keeps the top share,
/// so budgets are ragged; scores are query-agnostic, so one compression serves many questions.
#pragma once

#include <memory>
#include <utility>

#include "output_factors.hpp"
#include "policy_base.hpp"
#include "score_window.hpp"

namespace kvpack {

/// \brief KVzip scoring + budgeted eviction.
///
/// Knobs (paper defaults): budget keep 0.3, global scope; protected as every Budget by default
/// (4 sinks, the 32 most recent tokens; set the sinks to the system prompt's length). `window` is
/// the softmax window of the next observe() calls: set it per repeated chunk (ScoreWindow::chunk)
/// for the chunk-local softmax of the reference, or leave ScoreWindow::all(). Tokens no observed
/// query has seen (e.g. a question or decode tokens appended after scoring) are never evicted and
/// do not count against the budget, which applies to the scored tokens (Budget: "over a growing
/// sequence").
///
/// KVzip+ (KVzap, arXiv 2601.07891, §3): with `output_factors` set, the probability that query
/// head h of token t gives key j is multiplied by ‖W_o,h · v_j‖ (the norm of the value's
/// contribution to the residual stream through head h's slice of the output projection) and by
/// the token's weight handed to observe() (KVzap: 1 / ‖x_t‖, the norm of the layer's attention
/// input, i.e. the RMS-normed hidden state) before the max. Scores then compare what a key adds
/// to the residual stream rather than where attention parks; a key whose value is small scores
/// low even when attention sinks on it. Plain KVzip (no factors) stays the default. `weighting`
/// kDisplacement replaces ‖W_o,h·v_j‖ by the displacement of head h's output that evicting j
/// causes (ValueWeighting; docs/evaluation.md "Why KVzip+ loses").
struct ReconstructionEvict : QueryScoredEviction {
  static constexpr const char* name = "ReconstructionEvict";
  std::shared_ptr<const OutputFactors> output_factors;  ///< KVzip+ when set (see above)
  /// With output_factors: the value norm of the paper (default) or the displacement of the
  /// output that evicting the key causes (ValueWeighting::kDisplacement; both backends).
  ValueWeighting weighting = ValueWeighting::kNorm;

  ReconstructionEvict() { budget = Budget::ratio(0.3, BudgetScope::kGlobal); }
  explicit ReconstructionEvict(Budget b) { budget = b; }
  /// KVzip+ scoring with the model's output factors (OutputFactors::set_layer per layer).
  ReconstructionEvict(Budget b, std::shared_ptr<const OutputFactors> factors)
      : output_factors(std::move(factors)) {
    budget = b;
  }

  void validate(const ModelShape& shape) const {
    QueryScoredEviction::validate(shape);
    if (output_factors) output_factors->validate(shape, "ReconstructionEvict");
    detail::require(weighting == ValueWeighting::kNorm || output_factors != nullptr,
                    "ReconstructionEvict", "weighting", "kDisplacement",
                    "kNorm without output_factors (a weighting of KVzip+'s value weights)");
  }
  const OutputFactors* value_weights() const { return output_factors.get(); }
  ValueWeighting value_weighting() const { return weighting; }
};

}  // namespace kvpack
