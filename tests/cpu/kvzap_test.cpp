// KVzip+ and KVzap (arXiv 2601.07891): ReconstructionEvict with output factors and observe()'s
// query weights, checked against scores formed in double from W_o itself; the KVzap policy
// (hidden-state scorer), its file and its ridge fit against brute force.
#include <algorithm>
#include <catch2/catch.hpp>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <kvpack/kvpack.hpp>
#include <kvpack/linalg/ridge.hpp>
#include <map>
#include <memory>
#include <numeric>
#include <set>
#include <string>
#include <tuple>
#include <vector>

#include "test_util.hpp"

using Catch::Matchers::Contains;
using kvpack::ActivationView;
using kvpack::Budget;
using kvpack::BudgetScope;
using kvpack::ModelShape;
using kvpack::OutputFactors;
using kvpack::ReconstructionEvict;

namespace {

const ModelShape kShape{2, 6, 2, 32, {}};  // GQA group of 3
constexpr int kHidden = 40;

/// A random output projection per layer: [hidden × q_heads · head_dim], row-major.
std::vector<std::vector<float>> output_weights() {
  std::vector<std::vector<float>> w;
  for (int l = 0; l < kShape.layers; ++l) {
    w.push_back(
        kvpack_test::random_values(kHidden * kShape.q_heads * kShape.head_dim, 70 + l, 0.2f));
  }
  return w;
}

std::shared_ptr<const OutputFactors> factors_of(const std::vector<std::vector<float>>& w) {
  auto g = std::make_shared<OutputFactors>(kShape);
  for (int l = 0; l < kShape.layers; ++l) g->set_layer(l, w[l].data(), kHidden);
  return g;
}

/// ‖W_o,h · v‖ in double, from the weights themselves (not from the factors).
double contribution(const std::vector<float>& w, int qh, const float* v) {
  const int d = kShape.head_dim, cols = kShape.q_heads * d;
  double sq = 0;
  for (int o = 0; o < kHidden; ++o) {
    double acc = 0;
    for (int i = 0; i < d; ++i) acc += static_cast<double>(w[o * cols + qh * d + i]) * v[i];
    sq += acc * acc;
  }
  return std::sqrt(sq);
}

}  // namespace

TEST_CASE(
    "KVzip+: scores are max over queries and the GQA group of p * weight * |W_o v|, or of the "
    "displacement p / (1 - p) * weight * |W_o (o - v)|",
    "[scoring][kvzip]") {
  const auto w = output_weights();
  const int64_t context = 80, repeat = 24;
  const int d = kShape.head_dim, g = kShape.group_size();
  const bool displacement = GENERATE(false, true);
  INFO((displacement ? "ValueWeighting::kDisplacement" : "ValueWeighting::kNorm"));
  ReconstructionEvict policy(Budget::ratio(0.25, BudgetScope::kGlobal).with_protection(0, 0),
                             factors_of(w));
  if (displacement) policy.weighting = kvpack::ValueWeighting::kDisplacement;
  kvpack::KVCache<ReconstructionEvict> cache(kShape, policy);
  for (int l = 0; l < 2; ++l) kvpack_test::fill_layer(cache, l, context + repeat, 10 + 5 * l);
  const auto q = kvpack_test::random_values(repeat * kShape.q_heads * d, 3, 2.0f);
  const auto qpos = kvpack_test::iota_positions(repeat, context);
  std::vector<float> weights(repeat);
  for (int64_t t = 0; t < repeat; ++t) weights[t] = 0.5f + 0.07f * static_cast<float>(t % 23);
  for (int l = 0; l < 2; ++l) {
    cache.observe(l, ActivationView::nhd(q.data(), repeat, kShape.q_heads, d), qpos, weights);
  }
  std::vector<double> all;  // every context key's reference score, for the global threshold
  for (int l = 0; l < 2; ++l) {
    const auto dense = cache.materialize(l);
    for (int h = 0; h < kShape.kv_heads; ++h) {
      const auto& head = dense.heads[h];
      std::vector<double> expected(context + repeat, 0.0);
      for (int64_t t = 0; t < repeat; ++t) {
        for (int gi = 0; gi < g; ++gi) {
          const int qh = h * g + gi;
          const float* qrow = q.data() + (t * kShape.q_heads + qh) * d;
          std::vector<double> s(qpos[t] + 1);
          double max = -INFINITY, sum = 0;
          for (int64_t j = 0; j <= qpos[t]; ++j) {
            double acc = 0;
            for (int i = 0; i < d; ++i) acc += static_cast<double>(qrow[i]) * head.k[j * d + i];
            max = std::max(max, s[j] = acc / std::sqrt(static_cast<double>(d)));
          }
          for (auto& x : s) sum += (x = std::exp(x - max));
          std::vector<double> o(d, 0.0);  // the attention output, in double
          for (int64_t j = 0; j <= qpos[t]; ++j) {
            for (int i = 0; i < d; ++i) o[i] += s[j] / sum * head.v[j * d + i];
          }
          for (int64_t j = 0; j <= qpos[t]; ++j) {
            const double p = s[j] / sum;
            double weight = 0;
            if (displacement) {
              // Evicting j alone moves the output by p / (1 - p) (o - v_j).
              std::vector<float> diff(d);
              for (int i = 0; i < d; ++i) diff[i] = static_cast<float>(o[i] - head.v[j * d + i]);
              weight = contribution(w[l], qh, diff.data()) / (1.0 - p);
            } else {
              weight = contribution(w[l], qh, head.v.data() + j * d);
            }
            expected[j] = std::max(expected[j], p * weights[t] * weight);
          }
        }
      }
      const auto got = cache.token_scores(l, h);
      REQUIRE(got.size() == expected.size());
      double worst = 0;
      for (std::size_t j = 0; j < got.size(); ++j) {
        worst = std::max(worst, std::fabs(got[j] - expected[j]) / expected[j]);
      }
      // The displacement sums d differences of w = P U and u in float: a little looser.
      CHECK(worst < (displacement ? 3e-4 : 1e-4));
      all.insert(all.end(), expected.begin(), expected.begin() + context);
    }
  }
  // Roll back the repeat prompt; the global threshold keeps the reference's top scores.
  cache.truncate(context - 1);
  cache.compress();
  std::sort(all.rbegin(), all.rend());
  const std::size_t keep = 4 * static_cast<std::size_t>(std::ceil(0.25 * context));
  int64_t held = 0;
  double lowest_kept = INFINITY;
  for (int l = 0; l < 2; ++l) {
    for (int h = 0; h < kShape.kv_heads; ++h) {
      held += cache.tokens(l, h);
      for (float s : cache.token_scores(l, h)) lowest_kept = std::min<double>(lowest_kept, s);
    }
  }
  REQUIRE(held == static_cast<int64_t>(keep));
  // Nothing below the reference threshold.
  CHECK(lowest_kept >= all[keep - 1] * (1 - (displacement ? 3e-4 : 1e-4)));
}

TEST_CASE("KVzip+ displacement: a key holding almost all the attention, and a row seeing one key",
          "[scoring][kvzip]") {
  const auto w = output_weights();
  const int d = kShape.head_dim, g = kShape.group_size();
  ReconstructionEvict policy(Budget::ratio(0.5).with_protection(0, 0), factors_of(w));
  policy.weighting = kvpack::ValueWeighting::kDisplacement;
  kvpack::KVCache<ReconstructionEvict> cache(kShape, policy);
  kvpack_test::fill_layer(cache, 0, 10, 21);
  const auto dense = cache.materialize(0);
  // Token 9 queries with a multiple of key 3 that leads the next score by 10 (1 - p of key 3
  // near 1e-4: the regime where expanding ‖w − u‖² lost every digit); token 0 sees key 0 alone
  // (p = 1: the weight is ‖W_o v‖).
  const int64_t dominant = 3;
  const auto q = kvpack_test::dominant_key_queries(dense, kShape, 10, dominant, 10.0);
  const std::vector<int64_t> qpos{0, 9};
  cache.observe(0, ActivationView::nhd(q.data(), 2, kShape.q_heads, d), qpos);
  for (int h = 0; h < kShape.kv_heads; ++h) {
    const auto& head = dense.heads[h];
    std::vector<double> expected(10, 0.0);
    double dominant_rest = 1.0;
    for (int gi = 0; gi < g; ++gi) {
      const int qh = h * g + gi;
      // Token 0: one visible key, p = 1.
      expected[0] = std::max(expected[0], contribution(w[0], qh, head.v.data()));
      const float* qrow = q.data() + (kShape.q_heads + qh) * d;
      std::vector<double> s(10);
      double max = -INFINITY, sum = 0;
      for (int64_t j = 0; j < 10; ++j) {
        double acc = 0;
        for (int i = 0; i < d; ++i) acc += static_cast<double>(qrow[i]) * head.k[j * d + i];
        max = std::max(max, s[j] = acc / std::sqrt(static_cast<double>(d)));
      }
      for (auto& x : s) sum += (x = std::exp(x - max));
      std::vector<double> o(d, 0.0);
      for (int64_t j = 0; j < 10; ++j) {
        for (int i = 0; i < d; ++i) o[i] += s[j] / sum * head.v[j * d + i];
      }
      for (int64_t j = 0; j < 10; ++j) {
        // 1 - p as the sum of the other keys' probabilities (no cancellation in double).
        double rest = 0;
        for (int64_t i = 0; i < 10; ++i) rest += i == j ? 0.0 : s[i] / sum;
        if (j == dominant) dominant_rest = std::min(dominant_rest, rest);
        std::vector<float> diff(d);
        for (int i = 0; i < d; ++i) diff[i] = static_cast<float>(o[i] - head.v[j * d + i]);
        expected[j] =
            std::max(expected[j], s[j] / sum * contribution(w[0], qh, diff.data()) / rest);
      }
    }
    INFO("kv head " << h << ": 1 - p of the dominant key " << dominant_rest);
    REQUIRE(dominant_rest > 1e-5);  // the case under test: p close to 1, not rounded to it
    REQUIRE(dominant_rest < 1e-2);
    const auto got = cache.token_scores(0, h);
    for (int64_t j = 0; j < 10; ++j) {
      INFO("key " << j << ": " << got[j] << " vs " << expected[j]);
      CHECK(std::fabs(got[j] - expected[j]) <= 2e-2 * expected[j] + 1e-9);
    }
  }
}

TEST_CASE("KVzip+: unit query weights leave plain KVzip scores unchanged", "[scoring][kvzip]") {
  const int d = kShape.head_dim;
  kvpack::KVCache<ReconstructionEvict> plain(kShape), weighted(kShape);
  for (auto* cache : {&plain, &weighted}) kvpack_test::fill_layer(*cache, 0, 50, 4);
  const auto q = kvpack_test::random_values(8 * kShape.q_heads * d, 5);
  const auto qpos = kvpack_test::iota_positions(8, 42);
  const ActivationView qv = ActivationView::nhd(q.data(), 8, kShape.q_heads, d);
  plain.observe(0, qv, qpos);
  weighted.observe(0, qv, qpos, std::vector<float>(8, 1.0f));
  for (int h = 0; h < kShape.kv_heads; ++h) {
    const auto a = plain.token_scores(0, h), b = weighted.token_scores(0, h);
    REQUIRE(a.size() == b.size());
    for (std::size_t j = 0; j < a.size(); ++j) REQUIRE(a[j] == b[j]);  // bit-identical
  }
  // Keys appended after the observation have no score yet.
  kvpack_test::append_decode_tokens(plain, 50, 1, 9);
  CHECK(std::isnan(plain.token_scores(0, 0).back()));
}

TEST_CASE("KVzip+: bad weights and output factors are refused and change nothing",
          "[scoring][kvzip][errors]") {
  const int d = kShape.head_dim;
  kvpack::KVCache<ReconstructionEvict> cache(kShape);
  kvpack_test::fill_layer(cache, 0, 30, 1);
  const auto q = kvpack_test::random_values(2 * kShape.q_heads * d, 2);
  const ActivationView qv = ActivationView::nhd(q.data(), 2, kShape.q_heads, d);
  const std::vector<int64_t> qpos{28, 29};
  REQUIRE_THROWS_WITH(cache.observe(0, qv, qpos, std::vector<float>{1.0f}),
                      Contains("query_weights.size() = 1") && Contains("2 (one per query"));
  for (float bad : {0.0f, -1.0f, NAN, INFINITY}) {
    REQUIRE_THROWS_WITH(cache.observe(0, qv, qpos, std::vector<float>{1.0f, bad}),
                        Contains("query_weights[1]") && Contains("finite value > 0"));
  }
  CHECK(std::isnan(cache.token_scores(0, 0)[0]));  // nothing was scored
  REQUIRE_THROWS_WITH(cache.token_scores(2, 0), Contains("layer"));

  // Only query-scored policies take weights.
  kvpack::KVCache<kvpack::LazyLayerDrop> lazy(kShape);
  kvpack_test::fill_layer(lazy, 0, 30, 1);
  REQUIRE_THROWS_WITH(lazy.observe(0, qv, qpos, std::vector<float>{1.0f, 1.0f}),
                      Contains("query_weights"));
  CHECK(std::isnan(lazy.observed_mass(0)));

  // The displacement weights KVzip+'s value weights: without output factors it is refused.
  ReconstructionEvict displaced(Budget::ratio(0.5));
  displaced.weighting = kvpack::ValueWeighting::kDisplacement;
  REQUIRE_THROWS_WITH(kvpack::KVCache<ReconstructionEvict>(kShape, displaced),
                      Contains("weighting") && Contains("without output_factors"));

  // Factors of another shape, non-finite, or built from bad weights.
  const ModelShape other{2, 6, 2, 16, {}};
  REQUIRE_THROWS_WITH(
      kvpack::KVCache<ReconstructionEvict>(
          kShape, ReconstructionEvict(Budget::ratio(0.5), std::make_shared<OutputFactors>(other))),
      Contains("output factors layers x q_heads x head_dim = 2 x 6 x 16"));
  auto factors = std::make_shared<OutputFactors>(kShape);
  factors->factor[5] = NAN;
  REQUIRE_THROWS_WITH(kvpack::KVCache<ReconstructionEvict>(
                          kShape, ReconstructionEvict(Budget::ratio(0.5), factors)),
                      Contains("output factor[5] = nan"));
  factors->factor[5] = -1.0f;
  std::vector<float> w(kHidden * kShape.q_heads * d, 1.0f);
  REQUIRE_THROWS_WITH(factors->set_layer(2, w.data(), kHidden), Contains("layer = 2"));
  REQUIRE_THROWS_WITH(factors->set_layer(0, w.data(), 0), Contains("hidden = 0"));
  w[7] = INFINITY;
  REQUIRE_THROWS_WITH(factors->set_layer(0, w.data(), kHidden), Contains("non-finite"));
  CHECK(factors->factor[5] == -1.0f);  // a refused layer leaves the factors as they were
}

namespace {

constexpr int kScorerHidden = 24;

std::shared_ptr<const kvpack::HiddenScorer> random_scorer() {
  auto s = std::make_shared<kvpack::HiddenScorer>(kShape.layers, kShape.kv_heads, kScorerHidden);
  s->weight = kvpack_test::random_values(s->weight.size(), 81, 0.5f);
  s->bias = kvpack_test::random_values(s->bias.size(), 82, 1.0f);
  return s;
}

/// Appends `n` tokens to every layer at positions first.., in one block (n > 1: a prefill chunk)
/// or one token a call, handing each block's hidden states to observe_hidden(); keeps the
/// reference log-scores (double) of every (layer, head, position) in `reference`.
template <class Cache>
void append_scored(Cache& cache, const kvpack::HiddenScorer& scorer, int64_t first, int64_t n,
                   bool one_by_one, uint32_t seed,
                   std::map<std::tuple<int, int, int64_t>, double>& reference) {
  const int kv = kShape.kv_heads, d = kShape.head_dim;
  const int64_t block = one_by_one ? 1 : n;
  for (int64_t t0 = 0; t0 < n; t0 += block) {
    const auto k = kvpack_test::random_values(block * kv * d, seed + 3 * t0);
    const auto v = kvpack_test::random_values(block * kv * d, seed + 3 * t0 + 1);
    const auto x = kvpack_test::random_values(block * kScorerHidden, seed + 3 * t0 + 2);
    const auto pos = kvpack_test::iota_positions(block, first + t0);
    for (int l = 0; l < kShape.layers; ++l) {
      cache.append(l, ActivationView::nhd(k.data(), block, kv, d),
                   ActivationView::nhd(v.data(), block, kv, d), pos);
      cache.observe_hidden(l, ActivationView::nhd(x.data(), block, 1, kScorerHidden), pos);
      for (int64_t t = 0; t < block; ++t) {
        for (int h = 0; h < kv; ++h) {
          double s = scorer.bias[l * kv + h];
          for (int i = 0; i < kScorerHidden; ++i) {
            s += static_cast<double>(x[t * kScorerHidden + i]) *
                 scorer.weight[(static_cast<std::size_t>(l) * kScorerHidden + i) * kv + h];
          }
          reference[{l, h, pos[t]}] = s;
        }
      }
    }
  }
}

}  // namespace

TEST_CASE(
    "KVzap: scores are the scorer's, eviction keeps the brute-force top-k, decode tokens "
    "are scored and evicted like prompt tokens",
    "[scoring][kvzap]") {
  const auto scorer = random_scorer();
  Budget budget = Budget::ratio(0.3, BudgetScope::kGlobal);
  budget.sink_tokens = 2;
  budget.recent_tokens = 5;
  kvpack::KVCache<kvpack::KVzap> cache(kShape, kvpack::KVzap(scorer, budget));
  std::map<std::tuple<int, int, int64_t>, double> reference;
  append_scored(cache, *scorer, 0, 40, false, 100, reference);  // prefill
  append_scored(cache, *scorer, 40, 20, true, 200, reference);  // decode steps
  for (int round = 0; round < 2; ++round) {
    if (round == 1) append_scored(cache, *scorer, 60, 30, true, 300, reference);  // more decoding
    const int64_t appended = cache.appended(0);
    // Scores: exp(log-score) of every held token.
    for (int l = 0; l < kShape.layers; ++l) {
      for (int h = 0; h < kShape.kv_heads; ++h) {
        const auto dense = cache.materialize(l);
        const auto got = cache.token_scores(l, h);
        for (std::size_t t = 0; t < got.size(); ++t) {
          const double want = std::exp(reference.at({l, h, dense.heads[h].positions[t]}));
          REQUIRE(std::fabs(got[t] - want) <= 1e-5 * want);
        }
      }
    }
    // Brute force: protected tokens stay; the best others fill the global room.
    std::vector<std::pair<double, std::tuple<int, int, int64_t>>> candidates;
    std::set<std::tuple<int, int, int64_t>> expected;
    int64_t room = 0;
    for (int l = 0; l < kShape.layers; ++l) {
      for (int h = 0; h < kShape.kv_heads; ++h) {
        room += static_cast<int64_t>(std::ceil(0.3 * appended));
        const auto layer = cache.materialize(l);
        for (int64_t p : layer.heads[h].positions) {
          if (p < 2 || p > appended - 1 - 5) {
            expected.insert({l, h, p});
            --room;
          } else {
            candidates.push_back({-reference.at({l, h, p}), {l, h, p}});
          }
        }
      }
    }
    std::sort(candidates.begin(), candidates.end());
    for (int64_t i = 0; i < room; ++i) expected.insert(candidates[i].second);
    cache.compress();
    std::set<std::tuple<int, int, int64_t>> kept;
    for (int l = 0; l < kShape.layers; ++l) {
      for (int h = 0; h < kShape.kv_heads; ++h) {
        const auto layer = cache.materialize(l);
        for (int64_t p : layer.heads[h].positions) kept.insert({l, h, p});
      }
    }
    REQUIRE(kept == expected);
  }
  // The second round evicted decode tokens that left the recent window, not only context.
  int64_t decode_kept = 0;
  const auto last_layer = cache.materialize(1);
  for (int h = 0; h < kShape.kv_heads; ++h) {
    for (int64_t p : last_layer.heads[h].positions) decode_kept += p >= 40 && p < 85;
  }
  CHECK(decode_kept > 0);
  CHECK(decode_kept < 2 * 45);
}

TEST_CASE("KVzap: a threshold keeps every token scoring at least it, plus the protected ones",
          "[scoring][kvzap]") {
  const auto scorer = random_scorer();
  std::map<std::tuple<int, int, int64_t>, double> reference;
  Budget protection;
  protection.sink_tokens = 3;
  protection.recent_tokens = 4;
  // A threshold half-way between two neighbouring reference scores (none sits on it).
  kvpack::KVCache<kvpack::KVzap> probe(kShape, kvpack::KVzap(scorer, protection));
  append_scored(probe, *scorer, 0, 50, false, 7, reference);
  std::vector<double> sorted;
  for (const auto& [key, s] : reference) sorted.push_back(s);
  std::sort(sorted.begin(), sorted.end());
  const double threshold = 0.5 * (sorted[sorted.size() / 2] + sorted[sorted.size() / 2 + 1]);

  kvpack::KVCache<kvpack::KVzap> cache(
      kShape, kvpack::KVzap::with_threshold(scorer, threshold, protection));
  reference.clear();
  append_scored(cache, *scorer, 0, 50, false, 7, reference);
  cache.compress();
  for (int l = 0; l < kShape.layers; ++l) {
    for (int h = 0; h < kShape.kv_heads; ++h) {
      std::set<int64_t> expected;
      for (int64_t p = 0; p < 50; ++p) {
        if (p < 3 || p > 45 || reference.at({l, h, p}) >= threshold) expected.insert(p);
      }
      const auto layer = cache.materialize(l);
      const auto& held = layer.heads[h].positions;
      REQUIRE(std::set<int64_t>(held.begin(), held.end()) == expected);
    }
  }
}

TEST_CASE("KVzap: bad hidden states, scorers and files are refused and change nothing",
          "[scoring][kvzap][errors]") {
  const auto scorer = random_scorer();
  kvpack::KVCache<kvpack::KVzap> cache(kShape, kvpack::KVzap(scorer, Budget::ratio(0.5)));
  kvpack_test::fill_layer(cache, 0, 10, 1);
  REQUIRE_THROWS_WITH(cache.compress(), Contains("observe_hidden()"));
  auto x = kvpack_test::random_values(2 * kScorerHidden, 5);
  const std::vector<int64_t> pos{8, 9};
  REQUIRE_THROWS_WITH(cache.observe_hidden(0, ActivationView::nhd(x.data(), 2, 1, 16), pos),
                      Contains("x shape = 2 x 1 x 16") && Contains("2 x 1 x 24"));
  REQUIRE_THROWS_WITH(cache.observe_hidden(0, ActivationView::nhd(x.data(), 2, 1, kScorerHidden),
                                           std::vector<int64_t>{9, 10}),
                      Contains("positions[1] = 10"));
  x[30] = NAN;
  REQUIRE_THROWS_WITH(
      cache.observe_hidden(0, ActivationView::nhd(x.data(), 2, 1, kScorerHidden), pos),
      Contains("x[token 1, head 0, channel 6]"));
  CHECK(std::isnan(cache.token_scores(0, 0)[9]));  // nothing scored

  REQUIRE_THROWS_WITH(kvpack::KVCache<kvpack::KVzap>(kShape), Contains("scorer = null"));
  auto wrong = std::make_shared<kvpack::HiddenScorer>(3, kShape.kv_heads, kScorerHidden);
  REQUIRE_THROWS_WITH(kvpack::KVCache<kvpack::KVzap>(kShape, kvpack::KVzap(wrong, Budget{})),
                      Contains("scorer layers x kv_heads = 3 x 2"));
  REQUIRE_THROWS_WITH(
      kvpack::KVCache<kvpack::KVzap>(kShape, kvpack::KVzap::with_threshold(scorer, 100.0)),
      Contains("threshold = 100"));

  // File: round trip, corruption, a foreign file.
  const std::string path = "kvzap_scorer_test.bin";
  scorer->save(path);
  const auto back = kvpack::HiddenScorer::load(path);
  CHECK(back.weight == scorer->weight);
  CHECK(back.bias == scorer->bias);
  {
    std::fstream f(path, std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(40);
    f.put('\x7f');
  }
  REQUIRE_THROWS_WITH(kvpack::HiddenScorer::load(path), Contains("checksum"));
  kvpack::HeadScores other;
  other.layers = 1;
  other.kv_heads = 1;
  other.score = {0.5f};
  other.save(path);
  REQUIRE_THROWS_WITH(kvpack::HiddenScorer::load(path), Contains("not a kvpack scorer file"));
  {  // a header claiming 4096 layers x 4096 kv heads x 65536 inputs over no data (fuzz finding:
     // it used to allocate the claimed size before reading)
    kvpack::detail::CheckedFileWriter huge("KVPKZAPL");
    for (uint32_t v : {1u, 4096u, 4096u, 65536u}) huge.put_u32(v);
    huge.write(path, "test");
  }
  REQUIRE_THROWS_WITH(kvpack::HiddenScorer::load(path), Contains("weights truncated"));
  std::remove(path.c_str());
}

TEST_CASE("ridge_fit recovers a known linear map and picks lambda on held-out rows",
          "[scoring][kvzap]") {
  const int n = 600, p = 12, m = 3;
  kvpack::RowMajorMatrixXf x(n, p), y(n, m);
  const auto xs = kvpack_test::random_values(n * p, 11);
  const auto w = kvpack_test::random_values(p * m, 12);
  const auto noise = kvpack_test::random_values(n * m, 13, 0.01f);
  for (int i = 0; i < n; ++i) {
    for (int j = 0; j < p; ++j) x(i, j) = xs[i * p + j] + 0.5f;  // uncentred inputs
    for (int k = 0; k < m; ++k) {
      double acc = 0.7 * k - 1.0;  // intercepts
      for (int j = 0; j < p; ++j) acc += static_cast<double>(x(i, j)) * w[j * m + k];
      y(i, k) = static_cast<float>(acc) + noise[i * m + k];
    }
  }
  const auto fit = kvpack::ridge_fit(x, y, {1e-6, 1e-3, 1.0, 100.0}, 100);
  CHECK(fit.lambda <= 1e-3);  // the heavily shrunk fits lose on held-out rows
  CHECK(fit.held_out_r2 > 0.999);
  for (int j = 0; j < p; ++j) {
    for (int k = 0; k < m; ++k) CHECK(std::fabs(fit.w(j, k) - w[j * m + k]) < 2e-3);
  }
  for (int k = 0; k < m; ++k) CHECK(std::fabs(fit.b[k] - (0.7 * k - 1.0)) < 2e-3);
  REQUIRE_THROWS_WITH(kvpack::ridge_fit(x, y, {1.0}, 1), Contains("held_out = 1"));
  REQUIRE_THROWS_WITH(kvpack::ridge_fit(x, y, {-1.0}, 100), Contains("lambda = -1"));
  x(3, 3) = NAN;
  REQUIRE_THROWS_WITH(kvpack::ridge_fit(x, y, {1.0}, 100), Contains("non-finite"));
}
