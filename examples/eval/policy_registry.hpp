#pragma once
// kvpack-eval's policy registry: one entry per policy name, saying how to build its cache from a
// PolicySpec, which knob its rows are swept over, what the driver runs before compress(), and
// how its rows are labelled. Adding a policy to the evaluation is one entry in
// policy_registry.cpp; nothing else in kvpack-eval names a policy.

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "eval_cache.hpp"

namespace kvpack::eval {

/// The knob a policy's rows are swept over.
enum class RowKnob {
  kNone,       ///< one row (full; quant rows vary only their bits)
  kKeep,       ///< keep ratio (--keep), or a target bytes ratio turned into one (--ratio)
  kRatio,      ///< target bytes ratio (--ratio) that sets low-rank ranks
  kThreshold,  ///< lazy-layer threshold and recent window (--threshold, --lazy-recent)
};

/// What the driver runs on a row's cache before compress().
struct DriverNeeds {
  bool repeat_pass = false;  ///< KVzip: re-read the context, every query observed
  /// Entries with the same key score alike (their rows differ only in the budget): one repeat
  /// pass per context serves them all.
  std::string shared_scores;
  int64_t last_queries = 0;     ///< observe the queries of the last N context tokens
  bool projections = false;     ///< ChannelShrink projections calibrated on held-out text
  bool head_scores = false;     ///< KVzip head scores from one sample
  bool output_factors = false;  ///< KVzip+: output-projection factors (query weights: 1 / ‖x‖)
  bool hidden_scorer = false;   ///< KVzap: a fitted scorer, and the prefill's attention inputs
  bool layer_groups = false;    ///< rows also swept over --xkv-group
};

/// Builds a row's cache; `quant` is the KIVI stage of a NAME+quant row (null otherwise); `home`:
/// a cache whose batch the new one joins as a sequence when it has the same policy type (null:
/// a new batch).
using CacheFactory = std::function<std::unique_ptr<EvalCache>(
    const PolicySpec&, const ModelShape&, const Quantize* quant, const EvalCache* home)>;

struct PolicyEntry {
  std::string name;  ///< as written on the command line
  std::string help;  ///< one line for --help
  RowKnob knob = RowKnob::kNone;
  BudgetScope scope = BudgetScope::kPerHead;  ///< of the eviction budget (set_budget)
  DriverNeeds needs;
  bool composes = false;  ///< NAME+quant rows exist (KIVI of what this stage keeps)
  CacheFactory make;
};

/// Every policy kvpack-eval can run, in --help order.
const std::vector<PolicyEntry>& policy_registry();

/// A written name resolved: "kvzip+quant4" is kvzip's entry, quantized, at 4 bits.
struct ResolvedPolicy {
  const PolicyEntry* entry = nullptr;
  bool quantized = false;  ///< "quant", or a "+quant" composition
  int bits = 0;            ///< bits written into the name; 0 when none
};

/// Throws std::runtime_error naming the known policies for an unknown name or a bad bit width.
ResolvedPolicy resolve_policy(const std::string& written);

/// For --help and errors: every name, and which compose with +quant.
std::string known_policy_names();

}  // namespace kvpack::eval
