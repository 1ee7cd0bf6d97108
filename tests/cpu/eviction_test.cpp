#include <algorithm>
#include <catch2/catch.hpp>
#include <kvpack/kvpack.hpp>
#include <set>

#include "test_util.hpp"

using kvpack::Budget;
using kvpack::BudgetScope;
using kvpack::L2NormEvict;
using kvpack::ModelShape;

namespace {

struct Token {
  double norm2;
  int64_t position;
};

/// Norms of the stored (fp16-rounded) keys of one head, by brute force.
std::vector<Token> head_tokens(const kvpack::DenseHead& head, int d) {
  std::vector<Token> tokens;
  for (std::size_t t = 0; t < head.positions.size(); ++t) {
    double s = 0;
    for (int i = 0; i < d; ++i) s += static_cast<double>(head.k[t * d + i]) * head.k[t * d + i];
    tokens.push_back({s, head.positions[t]});
  }
  return tokens;
}

std::set<int64_t> kept_positions(const kvpack::DenseHead& head) {
  return std::set<int64_t>(head.positions.begin(), head.positions.end());
}

const ModelShape kShape{4, 9, 3, 64, {}};

}  // namespace

TEST_CASE("L2NormEvict: per head keeps exactly the lowest-norm keys", "[eviction]") {
  for (double keep : {0.1, 0.25, 0.5, 1.0}) {
    kvpack::KVCache<L2NormEvict> cache(
        kShape, L2NormEvict(Budget::ratio(keep).with_protection(0, 0), /*skip=*/1));
    for (int l = 0; l < kShape.layers; ++l) kvpack_test::fill_layer(cache, l, 1000, 100 + l, 256);
    std::vector<kvpack::DenseLayer> before;
    for (int l = 0; l < kShape.layers; ++l) before.push_back(cache.materialize(l));
    cache.compress();
    const auto target = static_cast<int64_t>(std::ceil(keep * 1000));
    for (int l = 0; l < kShape.layers; ++l) {
      for (int h = 0; h < kShape.kv_heads; ++h) {
        auto tokens = head_tokens(before[l].heads[h], 64);
        const auto after = cache.materialize(l).heads[h];
        if (l < 1) {  // skipped layer: untouched
          REQUIRE(after.positions.size() == 1000);
          continue;
        }
        std::sort(tokens.begin(), tokens.end(),
                  [](const Token& a, const Token& b) { return a.norm2 < b.norm2; });
        std::set<int64_t> expected;
        for (int64_t i = 0; i < target; ++i) expected.insert(tokens[i].position);
        REQUIRE(kept_positions(after) == expected);
        REQUIRE(std::is_sorted(after.positions.begin(), after.positions.end()));
        REQUIRE(cache.tokens(l, h) == target);
      }
    }
  }
}

TEST_CASE("L2NormEvict: sinks and the recent window are always kept", "[eviction]") {
  Budget budget = Budget::ratio(0.2);
  budget.sink_tokens = 4;
  budget.recent_tokens = 16;
  kvpack::KVCache<L2NormEvict> cache(kShape, L2NormEvict(budget, 0));
  kvpack_test::fill_layer(cache, 0, 500, 5);
  const auto before = cache.materialize(0);
  cache.compress();
  for (int h = 0; h < kShape.kv_heads; ++h) {
    auto tokens = head_tokens(before.heads[h], 64);
    std::set<int64_t> expected;
    std::vector<Token> rest;
    for (const auto& t : tokens) {
      if (t.position < 4 || t.position >= 500 - 16) {
        expected.insert(t.position);
      } else {
        rest.push_back(t);
      }
    }
    std::sort(rest.begin(), rest.end(),
              [](const Token& a, const Token& b) { return a.norm2 < b.norm2; });
    for (int i = 0; i < 100 - 20; ++i) expected.insert(rest[i].position);
    REQUIRE(kept_positions(cache.materialize(0).heads[h]) == expected);
  }
}

TEST_CASE("L2NormEvict: global scope applies one threshold across layers and heads", "[eviction]") {
  kvpack::KVCache<L2NormEvict> cache(
      kShape, L2NormEvict(Budget::ratio(0.3, BudgetScope::kGlobal).with_protection(0, 0), 0));
  // Different scales per layer so the global threshold gives clearly ragged budgets.
  for (int l = 0; l < kShape.layers; ++l) {
    const int64_t n = 400;
    const auto k = kvpack_test::random_values(n * 3 * 64, 50 + l, 0.5f + 0.5f * l);
    const auto v = kvpack_test::random_values(n * 3 * 64, 60 + l);
    cache.append(l, kvpack::ActivationView::nhd(k.data(), n, 3, 64),
                 kvpack::ActivationView::nhd(v.data(), n, 3, 64), kvpack_test::iota_positions(n));
  }
  std::vector<std::pair<double, std::pair<int, int64_t>>> all;  // norm, (layer*3+head, position)
  for (int l = 0; l < kShape.layers; ++l) {
    const auto layer = cache.materialize(l);
    for (int h = 0; h < 3; ++h) {
      for (const auto& t : head_tokens(layer.heads[h], 64))
        all.push_back({t.norm2, {l * 3 + h, t.position}});
    }
  }
  std::sort(all.begin(), all.end());
  const int64_t total_keep = 4 * 3 * 120;
  std::vector<std::set<int64_t>> expected(12);
  for (int64_t i = 0; i < total_keep; ++i)
    expected[all[i].second.first].insert(all[i].second.second);
  // A head the threshold empties keeps its best token (lowest norm): attention needs a key.
  int64_t emptied = 0;
  for (int head = 0; head < 12; ++head) {
    if (!expected[head].empty()) continue;
    ++emptied;
    for (const auto& [norm2, where] : all) {
      if (where.first == head) {
        expected[head].insert(where.second);
        break;
      }
    }
  }
  REQUIRE(emptied > 0);  // the layer-0 scale empties heads: the contract is exercised
  const std::size_t bytes_before = cache.bytes();
  cache.compress();
  int64_t kept = 0;
  std::size_t freed = 0;
  std::set<int64_t> counts;
  for (int l = 0; l < kShape.layers; ++l) {
    const auto layer = cache.materialize(l);
    for (int h = 0; h < 3; ++h) {
      REQUIRE(kept_positions(layer.heads[h]) == expected[l * 3 + h]);
      kept += cache.tokens(l, h);
      counts.insert(cache.tokens(l, h));
      freed +=
          kvpack_test::paged_head_bytes(400) - kvpack_test::paged_head_bytes(cache.tokens(l, h));
    }
  }
  REQUIRE(kept == total_keep + emptied);
  REQUIRE(counts.size() > 3);  // budgets really differ per head
  // bytes() is what the kept rows' pages hold plus the fixed bookkeeping, nothing else.
  REQUIRE(bytes_before - cache.bytes() == freed);
}

TEST_CASE("L2NormEvict: the paper's layer skip is a default that fits any model", "[eviction]") {
  // Layers [0, min(2, layers - 1)) stay whole: 1- and 2-layer models compress their last layer
  // instead of refusing a knob nobody set; an explicit skip is taken as given. 200 tokens: the
  // budget (50) exceeds the default protection (4 sinks + 32 recent).
  for (int layers : {1, 2, 3, 4}) {
    INFO("layers " << layers);
    const ModelShape shape{layers, 9, 3, 64, {}};
    kvpack::KVCache<L2NormEvict> cache(shape, L2NormEvict(Budget::ratio(0.25)));
    for (int l = 0; l < layers; ++l) kvpack_test::fill_layer(cache, l, 200, 50 + l);
    cache.compress();
    const int first = std::min(2, layers - 1);
    for (int l = 0; l < layers; ++l) CHECK(cache.tokens(l, 1) == (l < first ? 200 : 50));
  }
  kvpack::KVCache<L2NormEvict> explicit_skip(ModelShape{4, 9, 3, 64, {}},
                                             L2NormEvict(Budget::ratio(0.25), 3));
  for (int l = 0; l < 4; ++l) kvpack_test::fill_layer(explicit_skip, l, 200, 60 + l);
  explicit_skip.compress();
  CHECK(explicit_skip.tokens(2, 0) == 200);
  CHECK(explicit_skip.tokens(3, 0) == 50);
  CHECK_THROWS_WITH((kvpack::KVCache<L2NormEvict>(ModelShape{1, 9, 3, 64, {}},
                                                  L2NormEvict(Budget::ratio(0.25), 2))),
                    Catch::Contains("skip_layers = 2"));
}

TEST_CASE("L2NormEvict: keep 0.25 of 4096 tokens frees memory (bytes <= 0.30 dense)",
          "[eviction][memory]") {
  const ModelShape shape{2, 9, 3, 64, {}};
  kvpack::KVCache<L2NormEvict> cache(shape, L2NormEvict(Budget::ratio(0.25), 0));
  for (int l = 0; l < 2; ++l) kvpack_test::fill_layer(cache, l, 4096, 7 + l, 512);
  const std::size_t dense = cache.dense_bytes();
  REQUIRE(dense == 2u * 3 * 4096 * 64 * 2 * 2);
  cache.compress();
  INFO("bytes " << cache.bytes() << " dense " << dense);
  REQUIRE(cache.bytes() <= 0.30 * dense);
  REQUIRE(cache.bytes() > 0.25 * dense);  // the kept quarter, positions, pages: nothing hidden
  REQUIRE(cache.dense_bytes() == dense);  // dense size is of the appended sequence
}

TEST_CASE("Identity: bytes() is the dense size of what it stores", "[memory]") {
  const ModelShape shape{3, 9, 3, 64, {}};
  kvpack::KVCache<kvpack::Identity> cache(shape);
  const std::size_t empty = cache.bytes();
  for (int l = 0; l < 3; ++l) kvpack_test::fill_layer(cache, l, 333, l);
  cache.compress();
  // fp16 K and V rows in whole pages, the page table, an int32 position per token.
  REQUIRE(cache.bytes() - empty == 3u * 3 * kvpack_test::paged_head_bytes(333));
  REQUIRE(cache.dense_bytes() == 3u * 3 * 333 * 64 * 2 * 2);
  cache.clear();
  REQUIRE(cache.bytes() == empty);
  REQUIRE(cache.dense_bytes() == 0);
}

TEST_CASE("L2NormEvict: compress during decoding holds the budget of the sequence", "[eviction]") {
  const ModelShape shape{1, 9, 3, 64, {}};
  kvpack::KVCache<L2NormEvict> cache(shape, L2NormEvict(Budget::ratio(0.25), 0));
  kvpack_test::fill_layer(cache, 0, 1000, 1);
  cache.compress();
  REQUIRE(cache.tokens(0, 0) == 250);
  // 40 decode tokens, one at a time, then compress again.
  const auto k = kvpack_test::random_values(40 * 3 * 64, 2),
             v = kvpack_test::random_values(40 * 3 * 64, 3);
  for (int64_t t = 0; t < 40; ++t) {
    const std::vector<int64_t> pos{1000 + t};
    cache.append(0, kvpack::ActivationView::nhd(k.data() + t * 192, 1, 3, 64),
                 kvpack::ActivationView::nhd(v.data() + t * 192, 1, 3, 64), pos);
  }
  REQUIRE(cache.tokens(0, 0) == 290);
  cache.compress();
  REQUIRE(cache.tokens(0, 0) == 260);  // ceil(0.25 * 1040)
  REQUIRE(cache.appended(0) == 1040);
}

TEST_CASE("L2NormEvict: fixed token budget and min_tokens", "[eviction]") {
  const ModelShape shape{2, 9, 3, 64, {}};
  L2NormEvict policy(Budget::tokens(64), 0);
  policy.min_tokens = 300;
  kvpack::KVCache<L2NormEvict> cache(shape, policy);
  kvpack_test::fill_layer(cache, 0, 500, 1);
  kvpack_test::fill_layer(cache, 1, 200, 2);  // below min_tokens: left whole
  cache.compress();
  for (int h = 0; h < 3; ++h) {
    REQUIRE(cache.tokens(0, h) == 64);
    REQUIRE(cache.tokens(1, h) == 200);
  }
}

TEST_CASE("attend after eviction equals attention over the kept tokens", "[eviction][attention]") {
  const ModelShape shape{1, 9, 3, 64, {}};
  kvpack::KVCache<L2NormEvict> cache(shape, L2NormEvict(Budget::ratio(0.3), 0));
  kvpack_test::fill_layer(cache, 0, 3000, 77, 500);
  cache.compress();
  const auto dense = cache.materialize(0);
  const auto q = kvpack_test::random_values(9 * 64, 78, 2.0f);
  std::vector<float> out(9 * 64);
  const std::vector<int64_t> pos{2999};
  cache.attend(0, kvpack::ActivationView::nhd(q.data(), 1, 9, 64), pos,
               kvpack::OutputView::nhd(out.data(), 1, 9, 64));
  for (int h = 0; h < 9; ++h) {
    const auto& head = dense.heads[h / 3];
    const auto ref = kvpack_test::reference_attention(q.data() + h * 64, head.k, head.v,
                                                      head.positions, 2999, 64);
    REQUIRE(kvpack_test::max_relative_row_error(out.data() + h * 64, ref) < 1e-5);
  }
}
