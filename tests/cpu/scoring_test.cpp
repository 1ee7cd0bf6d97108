// Policies that score with observed queries: ReconstructionEvict (KVzip) and LazyLayerDrop
// (SimLayerKV), checked against brute-force softmax probabilities.
#include <algorithm>
#include <catch2/catch.hpp>
#include <cstdio>
#include <fstream>
#include <kvpack/kvpack.hpp>
#include <map>
#include <memory>
#include <numeric>
#include <set>

#include "test_util.hpp"

using Catch::Matchers::Contains;
using kvpack::ActivationView;
using kvpack::Budget;
using kvpack::BudgetScope;
using kvpack::ModelShape;
using kvpack::ReconstructionEvict;
using kvpack::ScoreWindow;

namespace {

const ModelShape kShape{2, 9, 3, 64, {}};

/// Softmax probabilities (double) of query row q at position qpos over the keys of `head` whose
/// position passes `in_window`, causal.
template <class InWindow>
std::vector<double> probabilities(const float* q, const kvpack::DenseHead& head, int64_t qpos,
                                  InWindow&& in_window) {
  const int d = 64;
  const std::size_t n = head.positions.size();
  std::vector<double> s(n, -INFINITY);
  double max = -INFINITY;
  for (std::size_t t = 0; t < n; ++t) {
    if (head.positions[t] > qpos || !in_window(head.positions[t])) continue;
    double acc = 0;
    for (int i = 0; i < d; ++i) acc += static_cast<double>(q[i]) * head.k[t * d + i];
    s[t] = acc / 8.0;
    max = std::max(max, s[t]);
  }
  double sum = 0;
  for (auto& v : s) sum += (v = std::isinf(v) ? 0.0 : std::exp(v - max));
  for (auto& v : s) v /= sum;
  return s;
}

std::set<int64_t> kept_positions(const kvpack::DenseHead& head) {
  return {head.positions.begin(), head.positions.end()};
}

/// Top `k` positions by score (ties by lower position), plus every position in `always`.
std::set<int64_t> top_k(const std::map<int64_t, double>& scores, int64_t k,
                        const std::set<int64_t>& always = {}) {
  std::vector<std::pair<double, int64_t>> v;
  std::set<int64_t> kept = always;
  for (const auto& [pos, score] : scores) {
    if (!always.count(pos)) v.push_back({-score, pos});
  }
  std::sort(v.begin(), v.end());
  for (int64_t i = 0; i < k - static_cast<int64_t>(always.size()); ++i) kept.insert(v[i].second);
  return kept;
}

struct RepeatScenario {
  int64_t context = 200, repeat = 60;
  std::vector<float> q = kvpack_test::random_values(60 * 9 * 64, 31, 3.0f);
  std::vector<int64_t> qpos = kvpack_test::iota_positions(60, 200);
  ActivationView qv() const { return ActivationView::nhd(q.data(), repeat, 9, 64); }
};

/// Brute-force KVzip scores of the scenario's context keys: per (layer · 3 + head), position →
/// max softmax probability over the repeat queries and the head's GQA rows.
std::vector<std::map<int64_t, double>> brute_force_scores(
    const kvpack::KVCache<ReconstructionEvict>& cache, const RepeatScenario& sc) {
  std::vector<std::map<int64_t, double>> per_head(6);
  for (int l = 0; l < 2; ++l) {
    const auto dense = cache.materialize(l);
    for (int h = 0; h < 3; ++h) {
      for (int64_t t = 0; t < sc.repeat; ++t) {
        for (int j = 0; j < 3; ++j) {
          const auto p = probabilities(sc.q.data() + (t * 9 + h * 3 + j) * 64, dense.heads[h],
                                       sc.qpos[t], [](int64_t) { return true; });
          for (int64_t key = 0; key < sc.context; ++key) {
            auto& s = per_head[l * 3 + h][key];
            s = std::max(s, p[key]);
          }
        }
      }
    }
  }
  return per_head;
}

}  // namespace

TEST_CASE(
    "ReconstructionEvict: scores are the max softmax probability over queries and the GQA "
    "group, and eviction keeps the brute-force top-k",
    "[scoring][kvzip]") {
  for (auto scope : {BudgetScope::kPerHead, BudgetScope::kGlobal}) {
    RepeatScenario sc;
    Budget budget = Budget::ratio(0.3, scope).with_protection(4, 0);
    kvpack::KVCache<ReconstructionEvict> cache(kShape, ReconstructionEvict(budget));
    kvpack_test::fill_layer(cache, 1, sc.context + sc.repeat, 30);  // context + repeat prompt
    kvpack_test::fill_layer(cache, 0, sc.context + sc.repeat, 40);
    for (int l = 0; l < 2; ++l) cache.observe(l, sc.qv(), sc.qpos);
    // Brute force: scores of the context keys, per (layer, head).
    const auto per_head = brute_force_scores(cache, sc);
    std::map<int64_t, double> all_scores;  // key: (layer*3 + head) * 1e6 + position
    for (int hh = 0; hh < 6; ++hh) {
      for (const auto& [pos, score] : per_head[hh]) all_scores[hh * 1000000 + pos] = score;
    }
    cache.truncate(sc.context - 1);  // the repeat prompt was never part of the sequence
    REQUIRE(cache.appended(0) == sc.context);
    cache.compress();
    // 60 kept per head (ceil(0.3 * 200)), sinks 0..3 always kept.
    const std::set<int64_t> sinks{0, 1, 2, 3};
    if (scope == BudgetScope::kPerHead) {
      for (int l = 0; l < 2; ++l) {
        for (int h = 0; h < 3; ++h) {
          REQUIRE(kept_positions(cache.materialize(l).heads[h]) ==
                  top_k(per_head[l * 3 + h], 60, sinks));
        }
      }
    } else {
      std::set<int64_t> always;
      for (int hh = 0; hh < 6; ++hh) {
        for (int64_t p : sinks) always.insert(hh * 1000000 + p);
      }
      const auto expected = top_k(all_scores, 6 * 60, always);
      for (int l = 0; l < 2; ++l) {
        for (int h = 0; h < 3; ++h) {
          std::set<int64_t> mine;
          for (int64_t p : expected) {
            if (p / 1000000 == l * 3 + h) mine.insert(p % 1000000);
          }
          REQUIRE(kept_positions(cache.materialize(l).heads[h]) == mine);
        }
      }
    }
  }
}

TEST_CASE("ReconstructionEvict: chunk-local softmax windows", "[scoring][kvzip]") {
  RepeatScenario sc;
  Budget budget = Budget::ratio(0.5).with_protection(4, 0);
  kvpack::KVCache<ReconstructionEvict> cache(kShape, ReconstructionEvict(budget));
  kvpack_test::fill_layer(cache, 0, sc.context + sc.repeat, 50);
  kvpack_test::fill_layer(cache, 1, sc.context + sc.repeat, 51);
  const ScoreWindow windows[] = {ScoreWindow::chunk(4, 4, 100, 200),
                                 ScoreWindow::chunk(4, 100, 200, 200)};
  for (const auto& w : windows) {
    cache.policy().window = w;
    cache.observe(0, sc.qv(), sc.qpos);
  }
  cache.policy().window = ScoreWindow::all();
  cache.observe(1, sc.qv(), sc.qpos);
  const auto dense = cache.materialize(0);
  cache.truncate(199);
  cache.compress();
  for (int h = 0; h < 3; ++h) {
    std::map<int64_t, double> scores;
    for (const auto& w : windows) {
      for (int64_t t = 0; t < sc.repeat; ++t) {
        for (int j = 0; j < 3; ++j) {
          const auto p = probabilities(sc.q.data() + (t * 9 + h * 3 + j) * 64, dense.heads[h],
                                       sc.qpos[t], [&](int64_t pos) { return w.contains(pos); });
          for (int64_t key = 0; key < 200; ++key) scores[key] = std::max(scores[key], p[key]);
        }
      }
    }
    REQUIRE(kept_positions(cache.materialize(0).heads[h]) == top_k(scores, 100, {0, 1, 2, 3}));
  }
}

TEST_CASE("ReconstructionEvict: tokens appended after scoring are never evicted",
          "[scoring][kvzip]") {
  RepeatScenario sc;
  kvpack::KVCache<ReconstructionEvict> cache(kShape, ReconstructionEvict(Budget::ratio(0.2)));
  kvpack_test::fill_layer(cache, 0, 260, 60);
  kvpack_test::fill_layer(cache, 1, 260, 61);
  for (int l = 0; l < 2; ++l) cache.observe(l, sc.qv(), sc.qpos);
  cache.truncate(199);
  const auto k = kvpack_test::random_values(10 * 3 * 64, 62, 5.0f);
  const auto question = kvpack_test::iota_positions(10, 200);
  for (int l = 0; l < 2; ++l) {
    cache.append(l, ActivationView::nhd(k.data(), 10, 3, 64),
                 ActivationView::nhd(k.data(), 10, 3, 64), question);
  }
  cache.compress();
  for (int l = 0; l < 2; ++l) {
    for (int h = 0; h < 3; ++h) {
      const auto kept = kept_positions(cache.materialize(l).heads[h]);
      for (int64_t p : question) REQUIRE(kept.count(p) == 1);
    }
  }
}

TEST_CASE(
    "KVzip head level: head scores are each head's largest pair score, saved and reused, and the "
    "top heads keep their context, the others their protected tokens",
    "[scoring][kvzip][headlevel]") {
  RepeatScenario sc;
  kvpack::KVCache<ReconstructionEvict> sample(kShape);
  kvpack_test::fill_layer(sample, 0, sc.context + sc.repeat, 50);
  kvpack_test::fill_layer(sample, 1, sc.context + sc.repeat, 51);
  REQUIRE_THROWS_WITH(sample.head_scores(), Contains("observe()"));
  for (int l = 0; l < 2; ++l) sample.observe(l, sc.qv(), sc.qpos);
  // Brute force: max over queries, GQA rows and the keys after the 4 protected sinks (the
  // default ReconstructionEvict budget's), which head_scores() leaves out.
  std::vector<double> expected(6, 0.0);
  const auto per_head = brute_force_scores(sample, sc);
  for (int i = 0; i < 6; ++i) {
    for (const auto& [pos, score] : per_head[i]) {
      if (pos >= 4) expected[i] = std::max(expected[i], score);
    }
  }
  sample.truncate(sc.context - 1);
  const kvpack::HeadScores scores = sample.head_scores();
  REQUIRE(scores.sample_tokens == sc.context);
  for (int i = 0; i < 6; ++i) REQUIRE(scores.at(i / 3, i % 3) == Approx(expected[i]).margin(1e-5));

  const std::string path = "kvpack_test_head_scores.bin";
  scores.save(path);
  const auto shared = std::make_shared<const kvpack::HeadScores>(kvpack::HeadScores::load(path));
  REQUIRE(shared->score == scores.score);
  std::remove(path.c_str());

  // Heads ranked by score (ties to the lower index), as heads_kept must choose them.
  std::vector<int> rank(6);
  std::iota(rank.begin(), rank.end(), 0);
  std::stable_sort(rank.begin(), rank.end(),
                   [&](int a, int b) { return scores.score[a] > scores.score[b]; });
  for (auto scope : {BudgetScope::kGlobal, BudgetScope::kPerHead}) {
    // Global: the best 3 of 6 heads. Per layer: the best 1 of each layer's 3 (ceil(0.33 * 3)).
    Budget budget = Budget::ratio(scope == BudgetScope::kGlobal ? 0.5 : 0.33, scope);
    budget.sink_tokens = 4;
    budget.recent_tokens = 8;
    std::set<int> whole;
    if (scope == BudgetScope::kGlobal) {
      whole = {rank[0], rank[1], rank[2]};
    } else {
      for (int l = 0; l < 2; ++l) {
        for (int i : rank) {
          if (i / 3 == l) {
            whole.insert(i);
            break;
          }
        }
      }
    }
    // Another input: no observe() needed, the sample's scores decide.
    kvpack::KVCache<kvpack::HeadLevelEvict> cache(kShape, kvpack::HeadLevelEvict(shared, budget));
    const std::size_t empty = cache.bytes();
    kvpack_test::fill_layer(cache, 0, sc.context, 60);
    kvpack_test::fill_layer(cache, 1, sc.context, 61);
    cache.compress();
    std::set<int64_t> protected_positions{0, 1, 2, 3};
    for (int64_t p = sc.context - 8; p < sc.context; ++p) protected_positions.insert(p);
    std::size_t held = 0;
    for (int i = 0; i < 6; ++i) {
      INFO("layer " << i / 3 << " head " << i % 3);
      const auto kept = kept_positions(cache.materialize(i / 3).heads[i % 3]);
      if (whole.count(i)) {
        REQUIRE(kept.size() == static_cast<std::size_t>(sc.context));
      } else {
        REQUIRE(kept == protected_positions);
      }
      held += kvpack_test::paged_head_bytes(static_cast<int64_t>(kept.size()));
    }
    // Every byte: fp16 K and V rows in whole pages, the page table, an int32 position per token.
    REQUIRE(cache.bytes() - empty == held);
  }
}

TEST_CASE("KVzip head level: bad scores and budgets are refused", "[scoring][headlevel][errors]") {
  using Cache = kvpack::KVCache<kvpack::HeadLevelEvict>;
  kvpack::HeadScores hs;
  hs.layers = 2;
  hs.kv_heads = 3;
  hs.score = {0.1f, 0.2f, 0.3f, 0.4f, 0.5f, 0.6f};
  const Budget half = Budget::ratio(0.5, BudgetScope::kGlobal);
  REQUIRE_THROWS_WITH(Cache(kShape, kvpack::HeadLevelEvict(nullptr, half)),
                      Contains("scores = null"));
  auto other = hs;
  other.kv_heads = 2;
  other.score.resize(4);
  REQUIRE_THROWS_WITH(
      Cache(kShape, kvpack::HeadLevelEvict(std::make_shared<kvpack::HeadScores>(other), half)),
      Contains("2 x 2"));
  auto nan = hs;
  nan.score[4] = NAN;
  REQUIRE_THROWS_WITH(
      Cache(kShape, kvpack::HeadLevelEvict(std::make_shared<kvpack::HeadScores>(nan), half)),
      Contains("layer 1 head 1"));
  REQUIRE_THROWS_WITH(Cache(kShape, kvpack::HeadLevelEvict(std::make_shared<kvpack::HeadScores>(hs),
                                                           Budget::tokens(10))),
                      Contains("keep_tokens = 10"));
  // A knob broken at run time: compress() refuses and holds what it held.
  Cache cache(kShape, kvpack::HeadLevelEvict(std::make_shared<kvpack::HeadScores>(hs), half));
  kvpack_test::fill_layer(cache, 0, 100, 1);
  const std::size_t bytes = cache.bytes();
  cache.policy().scores = nullptr;
  REQUIRE_THROWS_WITH(cache.compress(), Contains("scores = null"));
  REQUIRE(cache.bytes() == bytes);
  // Files: foreign, corrupted, wrong version.
  const std::string path = "kvpack_test_head_scores_bad.bin";
  hs.save(path);
  std::vector<char> bytes_of;
  {
    std::ifstream in(path, std::ios::binary);
    bytes_of.assign(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
  }
  auto write = [&](std::vector<char> b) {
    std::ofstream out(path, std::ios::binary | std::ios::trunc);
    out.write(b.data(), static_cast<std::streamsize>(b.size()));
  };
  auto flipped = bytes_of;
  flipped[30] ^= 0x10;
  write(flipped);
  REQUIRE_THROWS_WITH(kvpack::HeadScores::load(path), Contains("checksum mismatch"));
  auto foreign = bytes_of;
  foreign[3] = 'X';
  write(foreign);
  REQUIRE_THROWS_WITH(kvpack::HeadScores::load(path), Contains("not a kvpack head score file"));
  std::remove(path.c_str());
  REQUIRE_THROWS_WITH(kvpack::HeadScores::load(path), Contains("cannot read"));
}

TEST_CASE("ReconstructionEvict: bad calls are refused and change nothing", "[scoring][errors]") {
  // No protection: with the default 4 + 32 protected tokens the budget (30 of 100) would keep
  // the same set in every head, and the rollback below would be allowed.
  kvpack::KVCache<ReconstructionEvict> cache(
      kShape, ReconstructionEvict(Budget::ratio(0.3, BudgetScope::kGlobal).with_protection(0, 0)));
  kvpack_test::fill_layer(cache, 0, 100, 1);
  const std::size_t bytes = cache.bytes();
  REQUIRE_THROWS_WITH(cache.compress(), Contains("observe()"));
  REQUIRE(cache.bytes() == bytes);
  const auto q = kvpack_test::random_values(9 * 64, 3);
  cache.observe(0, ActivationView::nhd(q.data(), 1, 9, 64), std::vector<int64_t>{99});
  cache.compress();  // per-head eviction on layer 0
  REQUIRE_THROWS_WITH(cache.truncate(50), Contains("evicted"));
  const std::vector<int64_t> beyond{150};
  REQUIRE_THROWS_WITH(cache.observe(0, ActivationView::nhd(q.data(), 1, 9, 64), beyond),
                      Contains("positions[0] = 150"));
}

TEST_CASE("LazyLayerDrop: observed mass matches brute force, lazy layers keep initial + recent",
          "[scoring][simlayerkv]") {
  const int64_t n = 600;
  kvpack::LazyLayerDrop policy(0.5, 4, 128);
  kvpack::KVCache<kvpack::LazyLayerDrop> cache(kShape, policy);
  // Layer 0: the first keys are large, so queries attend to them (lazy); layer 1: random.
  for (int l = 0; l < 2; ++l) {
    auto k = kvpack_test::random_values(n * 3 * 64, 70 + l);
    const auto v = kvpack_test::random_values(n * 3 * 64, 80 + l);
    const auto q = kvpack_test::random_values(2 * 9 * 64, 90);
    if (l == 0) {
      for (int t = 0; t < 4; ++t) {
        for (int h = 0; h < 3; ++h) {
          // Twice the sum of the group's queries: every query of the group favours these keys.
          for (int i = 0; i < 64; ++i) {
            float sum = 0;
            for (int r = 0; r < 2; ++r) {
              for (int j = 0; j < 3; ++j) sum += q[(r * 9 + h * 3 + j) * 64 + i];
            }
            k[(t * 3 + h) * 64 + i] = 2.0f * sum;
          }
        }
      }
    }
    cache.append(l, ActivationView::nhd(k.data(), n, 3, 64),
                 ActivationView::nhd(v.data(), n, 3, 64), kvpack_test::iota_positions(n));
  }
  REQUIRE_THROWS_WITH(cache.compress(), Contains("observe()"));
  const auto q = kvpack_test::random_values(2 * 9 * 64, 90);
  const std::vector<int64_t> qpos{n - 2, n - 1};
  for (int l = 0; l < 2; ++l) cache.observe(l, ActivationView::nhd(q.data(), 2, 9, 64), qpos);
  double mass[2];
  for (int l = 0; l < 2; ++l) {
    const auto dense = cache.materialize(l);
    double total = 0;
    for (int t = 0; t < 2; ++t) {
      for (int h = 0; h < 9; ++h) {
        const auto p = probabilities(q.data() + (t * 9 + h) * 64, dense.heads[h / 3], qpos[t],
                                     [](int64_t) { return true; });
        for (int64_t key = 0; key < n; ++key) {
          if (key < 4 || key > qpos[t] - 128) total += p[key];
        }
      }
    }
    mass[l] = total / 18.0;
    REQUIRE(cache.observed_mass(l) == Approx(mass[l]).epsilon(1e-4));
  }
  REQUIRE(mass[0] > 0.5);
  REQUIRE(mass[1] < 0.5);
  cache.compress();
  REQUIRE(cache.is_lazy(0));
  REQUIRE_FALSE(cache.is_lazy(1));
  for (int h = 0; h < 3; ++h) {
    REQUIRE(cache.tokens(0, h) == 4 + 128);
    REQUIRE(cache.tokens(1, h) == n);
  }
  // The lazy layer keeps a sliding window as the sequence grows.
  const auto k = kvpack_test::random_values(5 * 3 * 64, 99);
  for (int l = 0; l < 2; ++l) {
    cache.append(l, ActivationView::nhd(k.data(), 5, 3, 64),
                 ActivationView::nhd(k.data(), 5, 3, 64), kvpack_test::iota_positions(5, n));
  }
  cache.compress();
  const auto kept = cache.materialize(0).heads[0].positions;
  REQUIRE(kept.size() == 4 + 128);
  REQUIRE(kept[4] == n + 5 - 128);
  REQUIRE(cache.tokens(1, 0) == n + 5);
}

namespace {

/// Brute-force (double) max probability per key: over rows r, the softmax of row r over the keys
/// of `positions` inside `window` and at indices < visible[r]; -1 for keys no row sees.
std::vector<double> reference_max_probability(const std::vector<float>& q, int rows, int d,
                                              const std::vector<float>& k,
                                              const std::vector<int32_t>& positions,
                                              const std::vector<int64_t>& visible,
                                              const ScoreWindow& window) {
  const std::size_t n = positions.size();
  std::vector<double> best(n, -1.0);
  for (int r = 0; r < rows; ++r) {
    std::vector<double> s(n, -INFINITY);
    double max = -INFINITY;
    for (std::size_t t = 0; t < n; ++t) {
      if (static_cast<int64_t>(t) >= visible[r] || !window.contains(positions[t])) continue;
      double acc = 0;
      for (int i = 0; i < d; ++i) acc += static_cast<double>(q[r * d + i]) * k[t * d + i];
      s[t] = acc;
      max = std::max(max, acc);
    }
    if (max == -INFINITY) continue;
    double sum = 0;
    for (double v : s) sum += std::isinf(v) ? 0.0 : std::exp(v - max);
    for (std::size_t t = 0; t < n; ++t) {
      if (!std::isinf(s[t])) best[t] = std::max(best[t], std::exp(s[t] - max) / sum);
    }
  }
  return best;
}

}  // namespace

TEST_CASE(
    "Query scoring kernel: max softmax probability per key matches a double brute force "
    "(windows, causal limits, odd sizes, fp16 and fp32 rows)",
    "[scoring][kvzip]") {
  struct Case {
    int d, rows;
    int64_t keys;
  };
  // Row counts around the kernel's group of 6 and block of 48; key counts off the 16-key panel.
  const Case cases[] = {{64, 1, 37},   {64, 5, 300},  {64, 13, 517}, {64, 48, 1000},
                        {64, 50, 129}, {128, 7, 250}, {40, 9, 200}};
  uint32_t seed = 100;
  for (const Case& c : cases) {
    // Keys at positions 3, 5, 7, ... (gaps, so windows cut between held tokens).
    std::vector<int32_t> positions(c.keys);
    for (int64_t t = 0; t < c.keys; ++t) positions[t] = static_cast<int32_t>(3 + 2 * t);
    const int32_t last = positions.back();
    const ScoreWindow windows[] = {ScoreWindow::all(),
                                   ScoreWindow::chunk(10, last / 3, last / 2 + 1, last - 40),
                                   ScoreWindow::chunk(0, last / 4, last + 1, INT64_MAX),
                                   ScoreWindow::chunk(8, 1000000, 1, last)};
    // Scaled queries so some rows are peaked (max probability near 1), others flat.
    const auto q = kvpack_test::random_values(static_cast<std::size_t>(c.rows) * c.d, seed++, 0.6f);
    const auto k_values =
        kvpack_test::random_values(static_cast<std::size_t>(c.keys) * c.d, seed++);
    std::vector<kvpack::Half> k_half(k_values.size());
    std::vector<float> k_rounded(k_values.size());  // what the fp16 rows hold, as fp32
    for (std::size_t i = 0; i < k_values.size(); ++i) {
      k_half[i] = kvpack::to_half(k_values[i]);
      k_rounded[i] = kvpack::to_float(k_half[i]);
    }
    // Causal limits: every key, none, a few, and everything in between.
    std::vector<int64_t> visible(c.rows);
    for (int r = 0; r < c.rows; ++r) visible[r] = (r * 7919 + 13) % (c.keys + 1);
    visible[0] = c.keys;
    if (c.rows > 2) visible[1] = 0;
    for (const auto& window : windows) {
      for (bool half : {true, false}) {
        const auto& k_ref = half ? k_rounded : k_values;
        const auto expected =
            reference_max_probability(q, c.rows, c.d, k_ref, positions, visible, window);
        const auto ranges = kvpack::cpu::window_ranges(positions.data(), c.keys, window);
        kvpack::cpu::PackedKeys keys;
        if (half) {
          keys.pack(kvpack::cpu::DenseRows<kvpack::Half>{k_half.data(), k_half.data(),
                                                         positions.data(), c.keys, c.d},
                    c.d, ranges);
        } else {
          keys.pack(kvpack::cpu::DenseRows<float>{k_values.data(), k_values.data(),
                                                  positions.data(), c.keys, c.d},
                    c.d, ranges);
        }
        // The cache's path: blocks of rows, max into window-indexed scores.
        std::vector<float> best(keys.size(), -1.0f);
        kvpack::cpu::ScoreStrip strip;
        for (int r0 = 0; r0 < c.rows; r0 += 16) {
          const int n = std::min(16, c.rows - r0);
          kvpack::cpu::score_strip(keys, q.data() + r0 * c.d, n, visible.data() + r0, strip);
          kvpack::cpu::max_probabilities(strip, n, best.data());
        }
        // The per-key reducer interface over the same rows.
        std::vector<double> reduced(c.keys, -1.0);
        kvpack::cpu::for_each_probability(
            kvpack::cpu::DenseRows<float>{k_ref.data(), k_ref.data(), positions.data(), c.keys,
                                          c.d},
            c.d, q.data(), c.rows, visible.data(), ranges,
            [&](int, int64_t key, float p) { reduced[key] = std::max<double>(reduced[key], p); });
        std::vector<double> got(c.keys, -1.0);
        for (std::size_t i = 0; i < ranges.size(); ++i) {
          for (int64_t t = ranges[i].first; t < ranges[i].second; ++t) {
            got[t] = best[keys.offset(i) + t - ranges[i].first];
          }
        }
        for (int64_t t = 0; t < c.keys; ++t) {
          INFO("d " << c.d << " rows " << c.rows << " keys " << c.keys << " key " << t << " half "
                    << half);
          if (expected[t] < 0) {
            REQUIRE(got[t] == -1.0);  // no row saw this key: it stays unscored
            REQUIRE(reduced[t] == -1.0);
          } else {
            REQUIRE(got[t] == Approx(expected[t]).epsilon(2e-5).margin(1e-12));
            REQUIRE(reduced[t] == Approx(expected[t]).epsilon(2e-5).margin(1e-12));
          }
        }
      }
    }
  }
}

namespace {

/// attend_observe() of `fused` against attend() then observe() of `split` (the same cache
/// before): the attention within 2e-6 of the largest output (another summation order), the
/// stored scores bit-identical (each score is the same dot product), for every layer.
/// One round: `split` attends then observes, `fused` attends and observes in one call (fp32
/// output, or fp16 when `half_out`); outputs and stored scores compared as above.
template <class Cache>
void compare_round(Cache& split, Cache& fused, const RepeatScenario& sc,
                   const std::vector<float>& query_weights, bool half_out) {
  const std::size_t n = sc.q.size();
  for (int l = 0; l < 2; ++l) {
    std::vector<float> a(n), b(n);
    std::vector<kvpack::Half> bh(n);
    split.attend(l, sc.qv(), sc.qpos, kvpack::OutputView::nhd(a.data(), sc.repeat, 9, 64));
    split.observe(l, sc.qv(), sc.qpos, query_weights);
    if (half_out) {
      fused.attend_observe(l, sc.qv(), sc.qpos,
                           kvpack::OutputView::nhd(bh.data(), sc.repeat, 9, 64), query_weights);
      for (std::size_t i = 0; i < n; ++i) {
        b[i] = kvpack::to_float(bh[i]);
        a[i] = kvpack::to_float(kvpack::to_half(a[i]));
      }
    } else {
      fused.attend_observe(l, sc.qv(), sc.qpos, kvpack::OutputView::nhd(b.data(), sc.repeat, 9, 64),
                           query_weights);
    }
    float peak = 0, worst = 0;
    for (std::size_t i = 0; i < n; ++i) {
      peak = std::max(peak, std::abs(a[i]));
      worst = std::max(worst, std::abs(a[i] - b[i]));
    }
    CHECK(worst <= (half_out ? 1e-3f : 2e-6f) * peak);  // fp16: one rounding step apart at most
    for (int h = 0; h < 3; ++h) {
      const auto x = split.token_scores(l, h), y = fused.token_scores(l, h);
      REQUIRE(x.size() == y.size());
      for (std::size_t t = 0; t < x.size(); ++t) {
        REQUIRE((std::isnan(x[t]) ? std::isnan(y[t]) : x[t] == y[t]));
      }
    }
  }
}

template <class Policy>
void require_fused_equals_split(const Policy& policy, const ScoreWindow& window,
                                std::vector<float> query_weights) {
  for (const kvpack::Isa isa : kvpack_test::supported_isas()) {
    kvpack_test::IsaScope scope(isa);
    INFO("instruction set " << kvpack::isa_name(isa));
    RepeatScenario sc;
    kvpack::KVCache<Policy> split(kShape, policy);
    for (int l = 0; l < 2; ++l) kvpack_test::fill_layer(split, l, sc.context + sc.repeat, 60 + l);
    kvpack::KVCache<Policy> fused = split;
    split.policy().window = window;
    fused.policy().window = window;
    compare_round(split, fused, sc, query_weights, false);
    split.compress();
    fused.compress();
    for (int l = 0; l < 2; ++l) {
      for (int h = 0; h < 3; ++h) {
        REQUIRE(kept_positions(split.materialize(l).heads[h]) ==
                kept_positions(fused.materialize(l).heads[h]));
      }
    }
    // Again over what compress() kept (heads now hold different tokens), fp16 output.
    compare_round(split, fused, sc, query_weights, true);
  }
}

}  // namespace

TEST_CASE("attend_observe: one pass equals attend() then observe()", "[scoring][kvzip]") {
  const Budget budget = Budget::ratio(0.5).with_protection(4, 0);
  std::vector<float> weights(60);
  for (std::size_t t = 0; t < weights.size(); ++t) weights[t] = 0.5f + 0.01f * t;
  SECTION("KVzip, every key") {
    require_fused_equals_split(ReconstructionEvict(budget), ScoreWindow::all(), {});
  }
  SECTION("KVzip, a chunk-local window and query weights") {
    require_fused_equals_split(ReconstructionEvict(budget), ScoreWindow::chunk(4, 60, 140, 200),
                               weights);
  }
  SECTION("KVzip+ with the displacement weight, a chunk-local window and query weights") {
    auto factors = std::make_shared<kvpack::OutputFactors>(kShape);
    for (int l = 0; l < kShape.layers; ++l) {
      const auto w = kvpack_test::random_values(48 * kShape.q_heads * kShape.head_dim, 90 + l);
      factors->set_layer(l, w.data(), 48);
    }
    ReconstructionEvict policy(budget, factors);
    policy.weighting = kvpack::ValueWeighting::kDisplacement;
    require_fused_equals_split(policy, ScoreWindow::chunk(4, 60, 140, 200), weights);
  }
  SECTION("SnapKV (sums of probabilities), a window") {
    require_fused_equals_split(kvpack::SnapKV(budget), ScoreWindow::chunk(4, 4, 120, 200), {});
  }
  SECTION("a cache without query scores runs attend() and observe()") {
    RepeatScenario sc;
    kvpack::KVCache<kvpack::L2NormEvict> cache(kShape, kvpack::L2NormEvict(budget, 0));
    kvpack_test::fill_layer(cache, 0, sc.context + sc.repeat, 70);
    std::vector<float> a(sc.q.size()), b(sc.q.size());
    cache.attend(0, sc.qv(), sc.qpos, kvpack::OutputView::nhd(a.data(), sc.repeat, 9, 64));
    cache.attend_observe(0, sc.qv(), sc.qpos, kvpack::OutputView::nhd(b.data(), sc.repeat, 9, 64));
    REQUIRE(a == b);
  }
}

TEST_CASE("attend_observe: bad calls are refused and change nothing", "[scoring][errors]") {
  RepeatScenario sc;
  kvpack::KVCache<ReconstructionEvict> cache(kShape, ReconstructionEvict(Budget::ratio(0.5)));
  kvpack_test::fill_layer(cache, 0, sc.context + sc.repeat, 80);
  std::vector<float> out(sc.q.size(), 7.0f);
  const auto view = kvpack::OutputView::nhd(out.data(), sc.repeat, 9, 64);
  const std::vector<float> few(3, 1.0f);
  REQUIRE_THROWS_WITH(cache.attend_observe(0, sc.qv(), sc.qpos, view, few),
                      Contains("attend_observe") && Contains("query_weights"));
  REQUIRE_THROWS_WITH(cache.attend_observe(2, sc.qv(), sc.qpos, view), Contains("layer"));
  const auto small = kvpack::OutputView::nhd(out.data(), sc.repeat, 8, 64);
  REQUIRE_THROWS_AS(cache.attend_observe(0, sc.qv(), sc.qpos, small), kvpack::error);
  REQUIRE(std::all_of(out.begin(), out.end(), [](float x) { return x == 7.0f; }));
  const auto scores = cache.token_scores(0, 0);
  REQUIRE(std::all_of(scores.begin(), scores.end(), [](float x) { return std::isnan(x); }));
  // A cache that runs the two calls refuses before attend() writes `out` too.
  using KiviKvzip = kvpack::Compose<ReconstructionEvict, kvpack::Quantize>;
  kvpack::KVCache<KiviKvzip> kivi(
      kShape, KiviKvzip(ReconstructionEvict(Budget::ratio(0.5)), kvpack::Quantize(4, 32, 0)));
  kvpack_test::fill_layer(kivi, 0, sc.context + sc.repeat, 81);
  REQUIRE_THROWS_WITH(kivi.attend_observe(0, sc.qv(), sc.qpos, view, few),
                      Contains("attend_observe") && Contains("query_weights"));
  REQUIRE(std::all_of(out.begin(), out.end(), [](float x) { return x == 7.0f; }));
}

TEST_CASE("window_ranges: every position the window contains, a tail before the chunk too",
          "[scoring]") {
  std::vector<int32_t> positions;
  for (int32_t p = 0; p < 400; p += 3) positions.push_back(p);
  const int64_t n = static_cast<int64_t>(positions.size());
  for (const ScoreWindow& w :
       {ScoreWindow::all(), ScoreWindow::chunk(4, 60, 140, 300),
        ScoreWindow::chunk(4, 200, 260, 100), ScoreWindow::chunk(0, 0, 50, 40),
        ScoreWindow::chunk(30, 10, 20, 500)}) {
    const auto ranges = kvpack::cpu::window_ranges(positions.data(), n, w);
    std::vector<bool> in(positions.size(), false);
    for (std::size_t i = 1; i < ranges.size(); ++i) REQUIRE(ranges[i - 1].second < ranges[i].first);
    for (const auto& [a, b] : ranges) {
      for (int64_t i = a; i < b; ++i) in[i] = true;
    }
    for (int64_t i = 0; i < n; ++i) REQUIRE(in[i] == w.contains(positions[i]));
  }
}
