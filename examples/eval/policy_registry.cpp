#include "policy_registry.hpp"

#include <sstream>
#include <stdexcept>

#include "typed_eval_cache.hpp"

namespace kvpack::eval {
namespace {

/// The eviction budget of a row: its keep ratio, the entry's scope, and its protected sinks
/// (the system prompt, set by the runner; 4 when built without one). No recent window: a row
/// compresses a context once, before any question, as in the papers' context-compression
/// tables (the library's default window protects decode tokens, which these rows do not evict).
Budget eviction_budget(const PolicySpec& spec, BudgetScope scope) {
  return Budget::ratio(spec.keep, scope)
      .with_protection(spec.sinks >= 0 ? spec.sinks : Budget::kDefaultSinkTokens, 0);
}

/// A factory for the selection stage `select(spec)`: alone, or composed with the row's KIVI.
template <class Select>
CacheFactory stage(Select select) {
  return [select](const PolicySpec& spec, const ModelShape& shape, const Quantize* quant,
                  const EvalCache* home) {
    const auto first = select(spec);
    if (quant == nullptr) return make_typed_cache(shape, first, home);
    using P = Compose<std::decay_t<decltype(first)>, Quantize>;
    return make_typed_cache(shape, P(first, *quant), home);
  };
}

std::vector<PolicyEntry> make_registry() {
  std::vector<PolicyEntry> r;
  auto add = [&](PolicyEntry e) { r.push_back(std::move(e)); };
  const auto full = [](const PolicySpec&, const ModelShape& shape, const Quantize*,
                       const EvalCache* home) { return make_typed_cache(shape, Identity{}, home); };
  add({"full",
       "the uncompressed fp16 cache (the reference every row is compared with)",
       RowKnob::kNone,
       BudgetScope::kPerHead,
       {},
       false,
       full});
  add({"full-f32",
       "an uncompressed fp32 cache",
       RowKnob::kNone,
       BudgetScope::kPerHead,
       {},
       false,
       [](const PolicySpec&, const ModelShape& shape, const Quantize*, const EvalCache* home) {
         return make_typed_cache(shape, IdentityF32{}, home);
       }});
  add({"quant",
       "KIVI 2/4/8-bit (--bits, --group, --residual)",
       RowKnob::kNone,
       BudgetScope::kPerHead,
       {},
       false,
       [](const PolicySpec&, const ModelShape& shape, const Quantize* quant,
          const EvalCache* home) { return make_typed_cache(shape, *quant, home); }});
  add({"l2",
       "L2-norm eviction, per head, layers 0-1 whole",
       RowKnob::kKeep,
       BudgetScope::kPerHead,
       {},
       true,
       stage([](const PolicySpec& s) {
         return L2NormEvict(eviction_budget(s, BudgetScope::kPerHead), 2);
       })});
  add({"streaming",
       "StreamingLLM: sinks + the most recent tokens",
       RowKnob::kKeep,
       BudgetScope::kPerHead,
       {},
       true,
       stage([](const PolicySpec& s) {
         return StreamingLLM(eviction_budget(s, BudgetScope::kPerHead));
       })});
  DriverNeeds snap;
  snap.last_queries = 32;  // SnapKV's observation window
  add({"snapkv", "SnapKV: the last 32 prompt queries score the keys, max-pooled (kernel 7)",
       RowKnob::kKeep, BudgetScope::kPerHead, snap, true, stage([](const PolicySpec& s) {
         return SnapKV(eviction_budget(s, BudgetScope::kPerHead), 32, 7);
       })});
  // A scored eviction's two rows: NAME (one global threshold) and NAME-uniform (the same keep
  // ratio in every head); select(spec, scope) makes the policy.
  auto add_scopes = [&](const std::string& name, const std::string& help, const DriverNeeds& needs,
                        auto select) {
    for (BudgetScope scope : {BudgetScope::kGlobal, BudgetScope::kPerHead}) {
      const bool global = scope == BudgetScope::kGlobal;
      add({global ? name : name + "-uniform",
           global ? help + ", one global threshold" : help + ", the same keep ratio in every head",
           RowKnob::kKeep, scope, needs, true,
           stage([select, scope](const PolicySpec& s) { return select(s, scope); })});
    }
  };
  DriverNeeds repeat;
  repeat.repeat_pass = true;
  repeat.shared_scores = "kvzip";
  add_scopes("kvzip", "KVzip: scores from a context-reconstruction pass", repeat,
             [](const PolicySpec& s, BudgetScope scope) {
               return ReconstructionEvict(eviction_budget(s, scope));
             });
  DriverNeeds repeat_plus = repeat;
  repeat_plus.shared_scores = "kvzip-plus";
  repeat_plus.output_factors = true;
  add_scopes("kvzip-plus", "KVzip+: KVzip scores weighted by |W_o v| / |x| (KVzap paper)",
             repeat_plus, [](const PolicySpec& s, BudgetScope scope) {
               if (!s.output_factors) throw std::runtime_error(s.name + " needs output factors");
               return ReconstructionEvict(eviction_budget(s, scope), s.output_factors);
             });
  // KVzip+ with the displacement weight (ValueWeighting::kDisplacement): what evicting the key
  // alone moves the head's output by, renormalisation included.
  DriverNeeds repeat_displacement = repeat_plus;
  repeat_displacement.shared_scores = "kvzip-displacement";
  add_scopes("kvzip-displacement",
             "KVzip+ with |W_o (o - v)| / (1 - p) for |W_o v|: the output's displacement when "
             "the key alone is evicted (kvpack's; docs/evaluation.md)",
             repeat_displacement, [](const PolicySpec& s, BudgetScope scope) {
               if (!s.output_factors) throw std::runtime_error(s.name + " needs output factors");
               ReconstructionEvict policy(eviction_budget(s, scope), s.output_factors);
               policy.weighting = ValueWeighting::kDisplacement;
               return policy;
             });
  // KVzip+ taken apart: only the value norms |W_o v|, or only the query weights 1 / |x|.
  for (const bool value_norms : {true, false}) {
    DriverNeeds part = value_norms ? repeat_plus : repeat;
    part.shared_scores = value_norms ? "kvzip-vnorm" : "kvzip-qnorm";
    const auto make = stage([value_norms](const PolicySpec& s) {
      if (value_norms && !s.output_factors) throw std::runtime_error(s.name + " needs factors");
      return value_norms
                 ? ReconstructionEvict(eviction_budget(s, BudgetScope::kGlobal), s.output_factors)
                 : ReconstructionEvict(eviction_budget(s, BudgetScope::kGlobal));
    });
    add({part.shared_scores,
         value_norms ? "KVzip+ without its query weights: probabilities times |W_o v| only"
                     : "KVzip+ without its value norms: probabilities times 1 / |x| only",
         RowKnob::kKeep, BudgetScope::kGlobal, part, true,
         [make, value_norms](const PolicySpec& s, const ModelShape& shape, const Quantize* q,
                             const EvalCache* home) {
           auto cache = make(s, shape, q, home);
           cache->set_query_weights(!value_norms);
           return cache;
         }});
  }
  DriverNeeds scorer;
  scorer.hidden_scorer = true;
  add_scopes("kvzap",
             "KVzap: a linear scorer of hidden states fitted to KVzip+ (--kvzap-scorer), no "
             "repeat pass, a 128-token recent window kept",
             scorer, [](const PolicySpec& s, BudgetScope scope) {
               if (!s.kvzap_scorer) throw std::runtime_error(s.name + " needs a fitted scorer");
               // KVzap's own recent window (128 tokens, kvpress's), where the other scored
               // rows select on scores alone: the scorer predicts a token's reconstruction
               // score from its hidden state and knows nothing of recency, so the method
               // (paper and kvpress alike) always keeps a sliding window. Counted in the budget.
               Budget budget = eviction_budget(s, scope);
               budget.recent_tokens = KVzap().budget.recent_tokens;
               return KVzap(s.kvzap_scorer, budget);
             });
  add({"kvzap-threshold",
       "KVzap by threshold: evict every token whose log-score is below --threshold, outside the "
       "sinks and a recent window of --lazy-recent tokens (kvpress's ThresholdPress)",
       RowKnob::kThreshold, BudgetScope::kPerHead, scorer, true, stage([](const PolicySpec& s) {
         if (!s.kvzap_scorer) throw std::runtime_error(s.name + " needs a fitted scorer");
         Budget protection = eviction_budget(s, BudgetScope::kPerHead);
         protection.recent_tokens = s.lazy_recent;
         return KVzap::with_threshold(s.kvzap_scorer, s.threshold, protection);
       })});
  DriverNeeds heads;
  heads.head_scores = true;
  add({"kvzip-head",
       "KVzip head level: whole heads kept by scores from one sample (--keep = share "
       "of heads)",
       RowKnob::kKeep, BudgetScope::kGlobal, heads, true, stage([](const PolicySpec& s) {
         if (!s.head_scores) throw std::runtime_error("kvzip-head needs head scores");
         return HeadLevelEvict(s.head_scores, eviction_budget(s, BudgetScope::kGlobal));
       })});
  DriverNeeds last;
  last.last_queries = 1;  // SimLayerKV decides from the last prompt token's query
  add({"lazy",
       "SimLayerKV: lazy layers cut to initial + recent tokens (--threshold, "
       "--lazy-recent)",
       RowKnob::kThreshold, BudgetScope::kPerHead, last, true, stage([](const PolicySpec& s) {
         return LazyLayerDrop(s.threshold, s.sinks >= 0 ? s.sinks : 4, s.lazy_recent);
       })});
  DriverNeeds groups;
  groups.layer_groups = true;
  add({"xkv", "xKV: cross-layer SVD of --xkv-group layers, ranks for --ratio", RowKnob::kRatio,
       BudgetScope::kPerHead, groups, true,
       stage([](const PolicySpec& s) { return CrossLayerSVD::with_ratio(s.xkv_group, s.ratio); })});
  DriverNeeds calibrated;
  calibrated.projections = true;
  add({"cskv", "CSKV: calibrated per-layer channel projections, ranks for --ratio", RowKnob::kRatio,
       BudgetScope::kPerHead, calibrated, true, stage([](const PolicySpec& s) {
         if (!s.projections) throw std::runtime_error(s.name + " needs calibrated projections");
         return ChannelShrink(s.projections, s.cskv_residual);
       })});
  return r;
}

}  // namespace

const std::vector<PolicyEntry>& policy_registry() {
  static const std::vector<PolicyEntry> registry = make_registry();
  return registry;
}

std::string known_policy_names() {
  std::ostringstream os;
  std::string composing;
  for (const PolicyEntry& e : policy_registry()) {
    os << (os.tellp() > 0 ? ", " : "") << e.name;
    if (e.composes) composing += (composing.empty() ? "" : ", ") + e.name + "+quant";
  }
  return os.str() + ", and " + composing;
}

ResolvedPolicy resolve_policy(const std::string& written) {
  ResolvedPolicy r;
  std::string base = written;
  // A trailing bit width on a quant name: "quant4", "l2+quant2".
  const auto q = base.find("quant");
  if (q != std::string::npos && q + 5 < base.size() &&
      base.find_first_not_of("0123456789", q + 5) == std::string::npos) {
    r.bits = std::stoi(base.substr(q + 5));
    if (r.bits != 2 && r.bits != 4 && r.bits != 8) {
      throw std::runtime_error("policy '" + written + "': bits must be 2, 4 or 8");
    }
    base.resize(q + 5);
  }
  r.quantized = base == "quant";
  const auto plus = base.find("+quant");
  if (plus != std::string::npos && plus + 6 == base.size()) {
    base.resize(plus);
    r.quantized = true;
  }
  for (const PolicyEntry& e : policy_registry()) {
    if (e.name == base && (!r.quantized || e.composes || e.name == "quant")) {
      r.entry = &e;
      return r;
    }
  }
  throw std::runtime_error("unknown policy '" + written + "'; known: " + known_policy_names());
}

std::string PolicySpec::label() const {
  const ResolvedPolicy r = resolve_policy(name);
  std::ostringstream os;
  os << name;
  if (r.quantized) os << bits << (int8_query ? " int8q" : "");
  switch (r.entry->knob) {
    case RowKnob::kKeep:
      if (keep_from_ratio) {
        os << " x" << ratio;
      } else {
        os << " keep=" << keep;
      }
      break;
    case RowKnob::kThreshold:
      os << " thr=" << threshold << " w=" << lazy_recent;
      break;
    case RowKnob::kRatio:
      if (r.entry->needs.layer_groups) os << " G=" << xkv_group;
      os << " x" << ratio;
      break;
    case RowKnob::kNone:
      break;
  }
  return os.str();
}

std::unique_ptr<EvalCache> make_cache(const PolicySpec& spec, const ModelShape& shape,
                                      const EvalCache* home) {
  const ResolvedPolicy r = resolve_policy(spec.name);
  Quantize quant(spec.bits, spec.group, spec.residual);
  quant.int8_query = spec.int8_query;
  return r.entry->make(spec, shape, r.quantized ? &quant : nullptr, home);
}

}  // namespace kvpack::eval
