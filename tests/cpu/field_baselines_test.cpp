// The field's baselines as kvpack policies: StreamingLLM (sinks + recent window) and SnapKV
// (observation-window scores, max-pooled), against brute force.
#include <algorithm>
#include <catch2/catch.hpp>
#include <cmath>
#include <kvpack/kvpack.hpp>
#include <set>
#include <vector>

#include "test_util.hpp"

using kvpack::ActivationView;
using kvpack::Budget;
using kvpack::BudgetScope;
using kvpack::ModelShape;
using kvpack_test::random_values;

namespace {

const ModelShape kShape{2, 8, 2, 64, {}};

std::set<int64_t> kept_positions(const kvpack::DenseHead& head) {
  return {head.positions.begin(), head.positions.end()};
}

}  // namespace

TEST_CASE("StreamingLLM keeps the sinks and the newest tokens up to the budget", "[baselines]") {
  for (auto scope : {BudgetScope::kPerHead, BudgetScope::kGlobal}) {
    for (double keep : {0.1, 0.25, 0.5}) {
      Budget budget = Budget::ratio(keep, scope).with_protection(4, 0);
      kvpack::KVCache<kvpack::StreamingLLM> cache(kShape, kvpack::StreamingLLM(budget));
      for (int l = 0; l < 2; ++l) kvpack_test::fill_layer(cache, l, 300, 10 + l, 64);
      cache.compress();
      const auto target = static_cast<int64_t>(std::ceil(keep * 300));
      std::set<int64_t> expected;
      for (int64_t p = 0; p < 4; ++p) expected.insert(p);
      for (int64_t p = 300 - (target - 4); p < 300; ++p) expected.insert(p);
      for (int l = 0; l < 2; ++l) {
        const auto layer = cache.materialize(l);
        for (int h = 0; h < 2; ++h) REQUIRE(kept_positions(layer.heads[h]) == expected);
        REQUIRE(kvpack_test::attend_error(cache, l, {299}, 20 + l) < 1e-5);
      }
    }
  }
  SECTION("decoding: the window slides, the sinks stay") {
    Budget budget = Budget::tokens(64).with_protection(4, 0);
    kvpack::KVCache<kvpack::StreamingLLM> cache(kShape, kvpack::StreamingLLM(budget));
    for (int l = 0; l < 2; ++l) kvpack_test::fill_layer(cache, l, 100, 30 + l);
    cache.compress();
    kvpack_test::append_decode_tokens(cache, 100, 40, 31);
    cache.compress();
    std::set<int64_t> expected{0, 1, 2, 3};
    for (int64_t p = 140 - 60; p < 140; ++p) expected.insert(p);
    REQUIRE(kept_positions(cache.materialize(1).heads[0]) == expected);
  }
}

namespace {

/// SnapKV by brute force for one (layer, kv head): double-precision softmax of each window
/// query of the GQA group over the keys it sees, summed per key, max-pooled over `kernel`
/// neighbours; keeps the window and the best others up to `target`.
std::set<int64_t> snapkv_brute_force(const kvpack::DenseHead& head, const std::vector<float>& q,
                                     const std::vector<int64_t>& qpos, int kv_head, int64_t target,
                                     int64_t window, int kernel) {
  const int d = 64, g = kShape.group_size();
  const int64_t n = static_cast<int64_t>(head.positions.size());
  std::vector<double> score(n, 0.0);
  for (std::size_t t = 0; t < qpos.size(); ++t) {
    for (int j = 0; j < g; ++j) {
      const float* row = q.data() + (t * kShape.q_heads + kv_head * g + j) * d;
      std::vector<double> logits;
      double peak = -INFINITY;
      for (int64_t i = 0; i < n && head.positions[i] <= qpos[t]; ++i) {
        double s = 0;
        for (int c = 0; c < d; ++c) s += double(row[c]) * head.k[i * d + c];
        logits.push_back(s / 8.0);
        peak = std::max(peak, logits.back());
      }
      double sum = 0;
      for (double x : logits) sum += std::exp(x - peak);
      for (std::size_t i = 0; i < logits.size(); ++i) score[i] += std::exp(logits[i] - peak) / sum;
    }
  }
  std::vector<double> pooled(n);
  for (int64_t i = 0; i < n; ++i) {
    pooled[i] = score[i];
    for (int64_t o = -kernel / 2; o <= kernel / 2; ++o) {
      if (i + o >= 0 && i + o < n) pooled[i] = std::max(pooled[i], score[i + o]);
    }
  }
  std::set<int64_t> kept;
  std::vector<std::pair<double, int64_t>> candidates;
  for (int64_t i = 0; i < n; ++i) {
    if (head.positions[i] > head.positions.back() - window) {
      kept.insert(head.positions[i]);
    } else {
      candidates.push_back({-pooled[i], i});
    }
  }
  std::sort(candidates.begin(), candidates.end());
  for (int64_t i = 0; i < target - window; ++i) kept.insert(head.positions[candidates[i].second]);
  return kept;
}

}  // namespace

TEST_CASE("SnapKV keeps the observation window and the best pooled scores", "[baselines]") {
  const int64_t n = 400, window = 32;
  for (int kernel : {1, 7}) {
    kvpack::KVCache<kvpack::SnapKV> cache(
        kShape, kvpack::SnapKV(Budget::ratio(0.3).with_protection(0, 0), window, kernel));
    for (int l = 0; l < 2; ++l) kvpack_test::fill_layer(cache, l, n, 40 + l, 100);
    const auto q = random_values(window * kShape.q_heads * 64, 50, 3.0f);
    const auto qpos = kvpack_test::iota_positions(window, n - window);
    std::vector<kvpack::DenseLayer> before;
    for (int l = 0; l < 2; ++l) {
      before.push_back(cache.materialize(l));
      cache.observe(l, ActivationView::nhd(q.data(), window, kShape.q_heads, 64), qpos);
    }
    cache.compress();
    const int64_t target = 120;  // ceil(0.3 * 400)
    for (int l = 0; l < 2; ++l) {
      const auto after = cache.materialize(l);
      for (int h = 0; h < 2; ++h) {
        const auto kept = kept_positions(after.heads[h]);
        REQUIRE(static_cast<int64_t>(kept.size()) == target);
        for (int64_t p = n - window; p < n; ++p) REQUIRE(kept.count(p) == 1);
        const auto expected =
            snapkv_brute_force(before[l].heads[h], q, qpos, h, target, window, kernel);
        std::vector<int64_t> common;
        std::set_intersection(kept.begin(), kept.end(), expected.begin(), expected.end(),
                              std::back_inserter(common));
        // fp32 scores vs double: only near-ties may differ.
        REQUIRE(static_cast<double>(common.size()) >= 0.97 * target);
      }
      REQUIRE(kvpack_test::attend_error(cache, l, {n - 1}, 60 + l) < 1e-5);
    }
  }
}

TEST_CASE("SnapKV: bad knobs are refused", "[baselines][errors]") {
  kvpack::SnapKV even(Budget::ratio(0.3), 32, 6);
  REQUIRE_THROWS_WITH(kvpack::KVCache<kvpack::SnapKV>(kShape, even),
                      Catch::Contains("pool_kernel = 6, expected an odd width >= 1"));
  kvpack::SnapKV no_window(Budget::ratio(0.3), 0, 7);
  REQUIRE_THROWS_WITH(kvpack::KVCache<kvpack::SnapKV>(kShape, no_window),
                      Catch::Contains("observation_window = 0"));
  kvpack::KVCache<kvpack::SnapKV> cache(kShape, kvpack::SnapKV(Budget::ratio(0.3)));
  kvpack_test::fill_layer(cache, 0, 64, 1);
  REQUIRE_THROWS_WITH(cache.compress(), Catch::Contains("observe()"));
}
