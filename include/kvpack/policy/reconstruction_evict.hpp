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

#include "policy_base.hpp"
#include "score_window.hpp"

namespace kvpack {

/// \brief KVzip scoring + budgeted eviction.
///
/// Knobs (paper defaults): budget keep 0.3, global scope, sinks protected (`budget.sink_tokens`,
/// the system prompt; 4 by default). `window` is the softmax window of the next observe() calls:
/// set it per repeated chunk (ScoreWindow::chunk) for the chunk-local softmax of the reference,
/// or leave ScoreWindow::all(). Tokens no observed query has seen (e.g. a question or decode
/// tokens appended after scoring) are never evicted and do not count against the budget, which
/// applies to the scored tokens (Budget: "over a growing sequence").
struct ReconstructionEvict : QueryScoredEviction {
  static constexpr const char* name = "ReconstructionEvict";
  ReconstructionEvict() {
    budget = Budget::ratio(0.3, BudgetScope::kGlobal);
    budget.sink_tokens = 4;
  }
  explicit ReconstructionEvict(Budget b) { budget = b; }
};

}  // namespace kvpack
