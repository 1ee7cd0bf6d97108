// The cross-backend test table (in the spirit of ggml's test-backend-ops): one list of cases
// (policy, shape, budget, tolerances), run by every backend's test file against the same
// references. A backend that lacks a case's policy reports it skipped, by name.
//
// Each case fills a cache with seeded random K/V (fp16-exact, so every backend stores the same
// values), observes seeded queries when the policy scores with them, compresses, and checks:
//  - kept set: per (layer, kv head), the positions held after compress() against a brute-force
//    selection from double-precision reference scores (sinks and the recent window protected,
//    per-head budget); overlap = |held ∩ reference| / |reference| must reach `min_overlap`;
//  - output: attend() of fresh decode and prefill queries against double-precision attention
//    over the original rows at the positions held (so quantization and low-rank error count),
//    worst relative row error ≤ `max_error`; and against double-precision attention over what
//    materialize() reports held (the kernel alone), ≤ kKernelError for every case.
#pragma once

#include <algorithm>
#include <catch2/catch.hpp>
#include <cmath>
#include <cstdint>
#include <iterator>
#include <kvpack/kvpack.hpp>
#include <memory>
#include <string>
#include <vector>

#include "../cpu/low_rank_util.hpp"
#include "../cpu/test_util.hpp"

namespace kvpack_backend_ops {

using kvpack::ModelShape;

/// How the reference kept set of a case is computed (from the policy's ScoreSource).
enum class Reference {
  kKeepAll,         ///< nothing evicted (Identity, Quantize, low rank)
  kKeyNorm,         ///< top-k of the L2 norm of the key, lowest kept (L2NormEvict)
  kRecency,         ///< sinks + the newest tokens (StreamingLLM)
  kMaxProbability,  ///< top-k of the max softmax probability over observed queries (KVzip)
  kPooledSum,       ///< top-k of the summed probability, max-pooled over kPoolWidth (SnapKV)
};

/// SnapKV's pooling width in the table's case (the paper's 7).
constexpr int kPoolWidth = 7;

inline bool observes_queries(Reference r) {
  return r == Reference::kMaxProbability || r == Reference::kPooledSum;
}

struct Case {
  std::string name;    ///< "policy/shape/budget", unique
  std::string policy;  ///< the policy's name, for the skip report
  ModelShape shape;
  int64_t tokens = 0;  ///< context appended before compress()
  double keep = 1.0;   ///< per-head keep ratio (eviction cases)
  int64_t sinks = 0, recent = 0;
  Reference reference = Reference::kKeepAll;
  double min_overlap = 1.0;
  double max_error = 1e-4;
};

/// Values that fp16 holds exactly (so every backend's storage is bit-identical to them).
inline std::vector<float> fp16_exact(std::size_t n, uint32_t seed, float scale = 1.0f) {
  auto x = kvpack_test::random_values(n, seed, scale);
  for (auto& v : x) v = kvpack::to_float(kvpack::to_half(v));
  return x;
}

inline ModelShape shape(int layers, int q_heads, int kv_heads, int head_dim) {
  ModelShape s;
  s.layers = layers;
  s.q_heads = q_heads;
  s.kv_heads = kv_heads;
  s.head_dim = head_dim;
  return s;
}

/// The inputs of one case: K/V per layer [tokens, kv_heads, head_dim] and observed queries
/// [observed, q_heads, head_dim] at the last positions of the context (causal: the query at
/// position p sees keys 0..p).
struct Inputs {
  std::vector<std::vector<float>> k, v;
  std::vector<float> q;
  std::vector<int64_t> positions, query_positions;
  static constexpr int64_t kObserved = 8;

  explicit Inputs(const Case& c) {
    const auto& s = c.shape;
    const std::size_t row = static_cast<std::size_t>(s.kv_heads) * s.head_dim;
    for (int l = 0; l < s.layers; ++l) {
      k.push_back(fp16_exact(c.tokens * row, 100 + 2 * l));
      v.push_back(fp16_exact(c.tokens * row, 101 + 2 * l));
    }
    q = fp16_exact(kObserved * s.q_heads * s.head_dim, 7, 1.5f);
    positions = kvpack_test::iota_positions(c.tokens);
    query_positions = kvpack_test::iota_positions(kObserved, c.tokens - kObserved);
  }
  const float* key(int l, int64_t t, int h, int d, int kv) const {
    return k[l].data() + (t * kv + h) * d;
  }
};

/// Reference scores of one (layer, kv head), higher = keep, in double.
inline std::vector<double> reference_scores(const Case& c, const Inputs& in, int l, int h) {
  const auto& s = c.shape;
  const int d = s.head_dim, g = s.group_size();
  std::vector<double> score(c.tokens, 0.0);
  for (int64_t t = 0; t < c.tokens; ++t) {
    if (c.reference == Reference::kKeyNorm) {
      double sq = 0;
      for (int i = 0; i < d; ++i)
        sq += double(in.key(l, t, h, d, s.kv_heads)[i]) * in.key(l, t, h, d, s.kv_heads)[i];
      score[t] = -std::sqrt(sq);
    } else if (c.reference == Reference::kRecency) {
      score[t] = static_cast<double>(t);
    }
  }
  if (observes_queries(c.reference)) {
    for (int64_t r = 0; r < Inputs::kObserved; ++r) {
      for (int j = 0; j < g; ++j) {
        const float* q = in.q.data() + (r * s.q_heads + h * g + j) * d;
        const int64_t visible = in.query_positions[r] + 1;
        std::vector<double> logits(visible);
        double max = -INFINITY, sum = 0;
        for (int64_t t = 0; t < visible; ++t) {
          double dot = 0;
          for (int i = 0; i < d; ++i) dot += double(q[i]) * in.key(l, t, h, d, s.kv_heads)[i];
          logits[t] = dot / std::sqrt(double(d));
          max = std::max(max, logits[t]);
        }
        for (auto& x : logits) sum += (x = std::exp(x - max));
        for (int64_t t = 0; t < visible; ++t) {
          const double p = logits[t] / sum;
          score[t] = c.reference == Reference::kPooledSum ? score[t] + p : std::max(score[t], p);
        }
      }
    }
  }
  if (c.reference == Reference::kPooledSum) {
    const std::vector<double> raw = score;
    for (int64_t t = 0; t < c.tokens; ++t) {
      for (int64_t u = std::max<int64_t>(0, t - kPoolWidth / 2);
           u <= std::min<int64_t>(c.tokens - 1, t + kPoolWidth / 2); ++u) {
        score[t] = std::max(score[t], raw[u]);
      }
    }
  }
  return score;
}

/// Brute-force selection: sinks and the recent window, then the best scores up to the budget
/// (ceil(keep · tokens)), lowest position on ties.
inline std::vector<int64_t> reference_kept(const Case& c, const std::vector<double>& score) {
  if (c.reference == Reference::kKeepAll) return kvpack_test::iota_positions(c.tokens);
  const int64_t budget = static_cast<int64_t>(std::ceil(c.keep * c.tokens - 1e-9));
  std::vector<int64_t> kept, rest;
  for (int64_t t = 0; t < c.tokens; ++t) {
    (t < c.sinks || t >= c.tokens - c.recent ? kept : rest).push_back(t);
  }
  std::stable_sort(rest.begin(), rest.end(),
                   [&](int64_t a, int64_t b) { return score[a] > score[b]; });
  for (int64_t t : rest) {
    if (static_cast<int64_t>(kept.size()) >= budget) break;
    kept.push_back(t);
  }
  std::sort(kept.begin(), kept.end());
  return kept;
}

/// What a backend reported for one case.
struct Outcome {
  bool skipped = false;
  double overlap = 1.0;  ///< worst over (layer, kv head)
  double error = 0.0;    ///< worst relative row error of attend() against the original rows
  /// Worst relative row error of attend() against what materialize() says is held (the
  /// kernel alone, whatever the format lost): must stay at fp32 rounding (kKernelError).
  double kernel_error = 0.0;
};

/// attend() against double-precision attention over materialize(): every case, every backend.
constexpr double kKernelError = 1e-4;

/// Runs `c` on `cache` (a fresh KVCache of any backend, built with the case's shape and policy).
template <class Cache>
Outcome run_case(const Case& c, Cache& cache) {
  const auto& s = c.shape;
  const Inputs in(c);
  for (int l = 0; l < s.layers; ++l) {
    cache.append(l, kvpack::ActivationView::nhd(in.k[l].data(), c.tokens, s.kv_heads, s.head_dim),
                 kvpack::ActivationView::nhd(in.v[l].data(), c.tokens, s.kv_heads, s.head_dim),
                 in.positions);
    if (observes_queries(c.reference)) {
      cache.observe(
          l, kvpack::ActivationView::nhd(in.q.data(), Inputs::kObserved, s.q_heads, s.head_dim),
          in.query_positions);
    }
  }
  cache.compress();
  Outcome out;
  for (int l = 0; l < s.layers; ++l) {
    const kvpack::DenseLayer held = cache.materialize(l);
    for (int h = 0; h < s.kv_heads; ++h) {
      const auto ref = reference_kept(c, reference_scores(c, in, l, h));
      const auto& got = held.heads[h].positions;
      std::vector<int64_t> common;
      std::set_intersection(got.begin(), got.end(), ref.begin(), ref.end(),
                            std::back_inserter(common));
      out.overlap = std::min(out.overlap, double(common.size()) / double(ref.size()));
      if (got.size() != ref.size()) out.overlap = std::min(out.overlap, 0.0);
    }
    // attend() of a decode query (the last position) and a prefill block (the last 5, causal)
    // against the original rows at the held positions.
    for (int64_t n : {int64_t{1}, int64_t{5}}) {
      const auto q = fp16_exact(n * s.q_heads * s.head_dim, 300 + l + n);
      const auto qpos = kvpack_test::iota_positions(n, c.tokens - n);
      std::vector<float> o(q.size());
      cache.attend(l, kvpack::ActivationView::nhd(q.data(), n, s.q_heads, s.head_dim), qpos,
                   kvpack::OutputView::nhd(o.data(), n, s.q_heads, s.head_dim));
      out.kernel_error =
          std::max(out.kernel_error, kvpack_test::attention_error(cache, l, q, qpos, o));
      for (int64_t t = 0; t < n; ++t) {
        for (int qh = 0; qh < s.q_heads; ++qh) {
          const int h = qh / s.group_size();
          const auto& pos = held.heads[h].positions;
          std::vector<float> k, v;
          for (int64_t p : pos) {
            const float* kr = in.key(l, p, h, s.head_dim, s.kv_heads);
            const float* vr = in.v[l].data() + (p * s.kv_heads + h) * s.head_dim;
            k.insert(k.end(), kr, kr + s.head_dim);
            v.insert(v.end(), vr, vr + s.head_dim);
          }
          const std::size_t row = (t * s.q_heads + qh) * s.head_dim;
          const auto ref =
              kvpack_test::reference_attention(q.data() + row, k, v, pos, qpos[t], s.head_dim);
          out.error = std::max(out.error, kvpack_test::max_relative_row_error(o.data() + row, ref));
        }
      }
    }
  }
  return out;
}

/// The checks every backend's test makes on one case's outcome (Catch2 assertions).
inline void check_outcome(const Case& c, const Outcome& o) {
  INFO(c.name << ": kept-set overlap " << o.overlap << " (min " << c.min_overlap
              << "), attend error " << o.error << " (max " << c.max_error << "), kernel error "
              << o.kernel_error);
  CHECK(o.overlap >= c.min_overlap);
  CHECK(o.error <= c.max_error);
  CHECK(o.kernel_error <= kKernelError);
}

/// The table: calls `visit(Case, policy)` for every case with a policy object of its type, so a
/// backend's test instantiates only the (policy, backend) pairs it implements.
template <class Visit>
void for_each_case(Visit&& visit) {
  const ModelShape gqa = shape(2, 8, 2, 64), mha = shape(1, 4, 4, 128), g3 = shape(2, 6, 2, 64);
  auto budget = [](double keep, int64_t sinks, int64_t recent) {
    kvpack::Budget b = kvpack::Budget::ratio(keep);
    b.sink_tokens = sinks;
    b.recent_tokens = recent;
    return b;
  };
  for (const ModelShape& s : {gqa, mha}) {
    const std::string tag = std::to_string(s.q_heads) + "q" + std::to_string(s.kv_heads) + "kv" +
                            std::to_string(s.head_dim) + "d";
    visit(Case{"identity/" + tag, "Identity", s, 200, 1.0, 0, 0, Reference::kKeepAll, 1.0, 1e-4},
          kvpack::Identity{});
    visit(Case{"l2/" + tag + "/keep0.4", "L2NormEvict", s, 200, 0.4, 4, 8, Reference::kKeyNorm, 1.0,
               1e-4},
          kvpack::L2NormEvict(budget(0.4, 4, 8), 0));
    visit(Case{"streaming_llm/" + tag + "/keep0.3", "StreamingLLM", s, 200, 0.3, 4, 0,
               Reference::kRecency, 1.0, 1e-4},
          kvpack::StreamingLLM(budget(0.3, 4, 0)));
    visit(Case{"kvzip/" + tag + "/keep0.3", "ReconstructionEvict", s, 200, 0.3, 4, 0,
               Reference::kMaxProbability, 0.97, 1e-4},
          kvpack::ReconstructionEvict(budget(0.3, 4, 0)));
    // SnapKV: the observed queries are its observation window (kept as the recent tokens).
    visit(Case{"snapkv/" + tag + "/keep0.3", "SnapKV", s, 200, 0.3, 4, Inputs::kObserved,
               Reference::kPooledSum, 0.95, 1e-4},
          kvpack::SnapKV(budget(0.3, 4, Inputs::kObserved), Inputs::kObserved, kPoolWidth));
    // KIVI: 4-bit keys per channel and values per token lose ~1e-1 of a random row's norm.
    visit(Case{"quant4/" + tag, "Quantize", s, 200, 1.0, 0, 0, Reference::kKeepAll, 1.0, 0.25},
          kvpack::Quantize(4));
  }
  visit(Case{"xkv/" + std::string("6q2kv64d/rank_full"), "CrossLayerSVD", g3, 120, 1.0, 0, 0,
             Reference::kKeepAll, 1.0, 1e-3},
        kvpack::CrossLayerSVD(2, 120, 120));
  visit(Case{"cskv/6q2kv64d/rank_full", "ChannelShrink", g3, 120, 1.0, 0, 0, Reference::kKeepAll,
             1.0, 1e-3},
        kvpack::ChannelShrink(kvpack_test::calibrated_projections(g3, 128, 128), 16));
}

}  // namespace kvpack_backend_ops
