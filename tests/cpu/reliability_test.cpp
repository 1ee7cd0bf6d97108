// Kinds of fault users of other KV-cache compressors reported, each checked on every policy it
// can hit: emptied heads under global / head-level budgets, budgets over a growing sequence,
// derived values that would not fit fp16, rollback of compressed caches, and knobs validated
// against the stage they constrain.
#include <algorithm>
#include <catch2/catch.hpp>
#include <cmath>
#include <kvpack/kvpack.hpp>
#include <memory>
#include <vector>

#include "low_rank_util.hpp"
#include "test_util.hpp"

using kvpack::ActivationView;
using kvpack::Budget;
using kvpack::BudgetScope;
using kvpack::ModelShape;
using kvpack::OutputView;
using kvpack_test::random_values;

namespace {

/// Context tokens (position < `end`) one head holds.
template <class Cache>
int64_t held_before(const Cache& cache, int layer, int head, int64_t end) {
  const auto p = cache.materialize(layer).heads[head].positions;
  return std::count_if(p.begin(), p.end(), [&](int64_t x) { return x < end; });
}

/// One decode query at `position` on every layer; checks the result against double-precision
/// attention over what the cache holds.
template <class Cache>
void attend_checked(const Cache& cache, int64_t position, uint32_t seed) {
  const auto& s = cache.shape();
  for (int l = 0; l < s.layers; ++l) {
    const double err = kvpack_test::attend_error(cache, l, {position}, seed + l);
    REQUIRE(err < 2e-3);
  }
}

/// Appends `n` tokens (NHD fp32, values times `scale`) at positions first.. to one layer.
template <class Cache>
void append_random(Cache& cache, int layer, int64_t first, int64_t n, uint32_t seed,
                   float scale = 1.0f) {
  const auto& s = cache.shape();
  const auto k = random_values(n * s.kv_heads * s.head_dim, seed, scale);
  const auto v = random_values(n * s.kv_heads * s.head_dim, seed + 1, scale);
  cache.append(layer, ActivationView::nhd(k.data(), n, s.kv_heads, s.head_dim),
               ActivationView::nhd(v.data(), n, s.kv_heads, s.head_dim),
               kvpack_test::iota_positions(n, first));
}

/// A KVzip repeat pass: `n` repeat tokens after the context, observed, then rolled back.
template <class Cache>
void repeat_pass(Cache& cache, int64_t context, int64_t n, uint32_t seed) {
  const auto& s = cache.shape();
  const auto q = random_values(n * s.q_heads * s.head_dim, seed, 2.0f);
  for (int l = 0; l < s.layers; ++l) {
    append_random(cache, l, context, n, seed + 10 + l);
    cache.observe(l, ActivationView::nhd(q.data(), n, s.q_heads, s.head_dim),
                  kvpack_test::iota_positions(n, context));
  }
  cache.truncate(context - 1);
}

}  // namespace

// --- 1. A global or head-level budget never empties a head --------------------------------------

TEST_CASE("Global and head-level budgets leave every head at least one token", "[reliability]") {
  const ModelShape shape{1, 4, 2, 64, {}};
  const int64_t n = 64;
  // Head 0's keys are all equal (flat scores: uniform attention), head 1's are random.
  auto k = random_values(n * 2 * 64, 7);
  const auto v = random_values(n * 2 * 64, 8);
  for (int64_t t = 0; t < n; ++t) std::copy_n(k.data(), 64, k.data() + t * 128);
  const auto append = [&](auto& cache) {
    cache.append(0, ActivationView::nhd(k.data(), n, 2, 64),
                 ActivationView::nhd(v.data(), n, 2, 64), kvpack_test::iota_positions(n));
  };

  SECTION("ReconstructionEvict, global threshold, no sinks") {
    for (double keep : {0.02, 0.1, 0.3}) {
      kvpack::KVCache<kvpack::ReconstructionEvict> cache(
          shape, kvpack::ReconstructionEvict(
                     Budget::ratio(keep, BudgetScope::kGlobal).with_protection(0, 0)));
      append(cache);
      const auto q = random_values(16 * 4 * 64, 9, 3.0f);
      cache.observe(0, ActivationView::nhd(q.data(), 16, 4, 64),
                    kvpack_test::iota_positions(16, 48));
      cache.compress();
      REQUIRE(cache.tokens(0, 0) >= 1);
      REQUIRE(cache.tokens(0, 1) >= 1);
      attend_checked(cache, n - 1, 11);
    }
  }
  SECTION("HeadLevelEvict keep 0.5, no sinks, global and per layer") {
    auto scores = std::make_shared<kvpack::HeadScores>();
    scores->layers = 1;
    scores->kv_heads = 2;
    scores->score = {0.1f, 0.9f};
    for (auto scope : {BudgetScope::kGlobal, BudgetScope::kPerHead}) {
      kvpack::KVCache<kvpack::HeadLevelEvict> cache(
          shape, kvpack::HeadLevelEvict(scores, Budget::ratio(0.5, scope).with_protection(0, 0)));
      append(cache);
      cache.compress();
      REQUIRE(cache.tokens(0, 0) == 1);  // the dropped head keeps its best token: the first
      REQUIRE(cache.materialize(0).heads[0].positions == std::vector<int64_t>{0});
      REQUIRE(cache.tokens(0, 1) == n);
      attend_checked(cache, n - 1, 12);
    }
  }
}

// --- 2. Recompressing during decoding holds what was scored -------------------------------------

namespace {

const ModelShape kDecodeShape{2, 8, 2, 64, {}};
constexpr int64_t kContext = 512;

/// 256 decode steps (append, attend, compress() every 16). `check(step)` runs after each
/// compress().
template <class Cache, class Check>
void decode(Cache& cache, Check&& check) {
  for (int64_t step = 0; step < 256; ++step) {
    for (int l = 0; l < kDecodeShape.layers; ++l) {
      append_random(cache, l, kContext + step, 1, 5000 + 7 * step + l);
    }
    if (step % 64 == 0) attend_checked(cache, kContext + step, 900 + step);
    if (step % 16 == 15) {
      cache.compress();
      check(step);
    }
  }
}

}  // namespace

TEST_CASE("KVzip budgets over a growing sequence keep the scored context", "[reliability]") {
  for (auto scope : {BudgetScope::kGlobal, BudgetScope::kPerHead}) {
    Budget budget = Budget::ratio(0.3, scope).with_protection(4, 0);
    kvpack::KVCache<kvpack::ReconstructionEvict> cache(kDecodeShape,
                                                       kvpack::ReconstructionEvict(budget));
    for (int l = 0; l < 2; ++l) append_random(cache, l, 0, kContext, 40 + l);
    repeat_pass(cache, kContext, 128, 77);
    cache.compress();
    int64_t context_held = 0;
    for (int l = 0; l < 2; ++l) {
      for (int h = 0; h < 2; ++h) context_held += held_before(cache, l, h, kContext);
    }
    // The budget over the scored tokens: 30 % of 512 per head on average.
    REQUIRE(context_held == 4 * static_cast<int64_t>(std::ceil(0.3 * kContext)));
    decode(cache, [&](int64_t step) {
      int64_t now = 0;
      for (int l = 0; l < 2; ++l) {
        for (int h = 0; h < 2; ++h) {
          now += held_before(cache, l, h, kContext);
          // Tokens no query has scored yet stay, outside the scored tokens' budget.
          REQUIRE(cache.tokens(l, h) - held_before(cache, l, h, kContext) == step + 1);
        }
      }
      REQUIRE(now == context_held);
    });
  }
}

TEST_CASE("L2 budgets over a growing sequence cover every token, context included",
          "[reliability]") {
  for (auto scope : {BudgetScope::kGlobal, BudgetScope::kPerHead}) {
    Budget budget = Budget::ratio(0.3, scope);
    budget.sink_tokens = 4;
    budget.recent_tokens = 8;
    kvpack::KVCache<kvpack::L2NormEvict> cache(kDecodeShape, kvpack::L2NormEvict(budget, 0));
    for (int l = 0; l < 2; ++l) append_random(cache, l, 0, kContext, 40 + l);
    cache.compress();
    decode(cache, [&](int64_t step) {
      const int64_t target = static_cast<int64_t>(std::ceil(0.3 * (kContext + step + 1)));
      int64_t total = 0;
      for (int l = 0; l < 2; ++l) {
        for (int h = 0; h < 2; ++h) {
          total += cache.tokens(l, h);
          if (scope == BudgetScope::kPerHead) REQUIRE(cache.tokens(l, h) == target);
          // Context and decode keys have the same distribution: the context keeps a share.
          REQUIRE(held_before(cache, l, h, kContext) > target / 3);
          REQUIRE(held_before(cache, l, h, 4) == 4);  // sinks
        }
      }
      REQUIRE(total == 4 * target);
    });
  }
}

TEST_CASE("Head-level and lazy-layer budgets over a growing sequence", "[reliability]") {
  SECTION("HeadLevelEvict: kept heads grow, dropped heads hold sinks and the recent window") {
    auto scores = std::make_shared<kvpack::HeadScores>();
    scores->layers = 2;
    scores->kv_heads = 2;
    scores->score = {0.1f, 0.9f, 0.8f, 0.2f};
    Budget budget = Budget::ratio(0.5, BudgetScope::kGlobal);
    budget.sink_tokens = 4;
    budget.recent_tokens = 16;
    kvpack::KVCache<kvpack::HeadLevelEvict> cache(kDecodeShape,
                                                  kvpack::HeadLevelEvict(scores, budget));
    for (int l = 0; l < 2; ++l) append_random(cache, l, 0, kContext, 40 + l);
    cache.compress();
    decode(cache, [&](int64_t step) {
      const int64_t appended = kContext + step + 1;
      REQUIRE(cache.tokens(0, 1) == appended);
      REQUIRE(cache.tokens(1, 0) == appended);
      REQUIRE(cache.tokens(0, 0) == 4 + 16);
      REQUIRE(cache.tokens(1, 1) == 4 + 16);
    });
  }
  SECTION("LazyLayerDrop: a lazy layer keeps initial + recent tokens as it grows") {
    const kvpack::LazyLayerDrop lazy(0.0, 4, 64);  // threshold 0: every observed layer is lazy
    kvpack::KVCache<kvpack::LazyLayerDrop> cache(kDecodeShape, lazy);
    for (int l = 0; l < 2; ++l) append_random(cache, l, 0, kContext, 40 + l);
    const auto q = random_values(8 * 64, 3);
    for (int l = 0; l < 2; ++l) {
      cache.observe(l, ActivationView::nhd(q.data(), 1, 8, 64), std::vector<int64_t>{kContext - 1});
    }
    cache.compress();
    decode(cache, [&](int64_t) {
      for (int l = 0; l < 2; ++l) {
        REQUIRE(cache.is_lazy(l));
        for (int h = 0; h < 2; ++h) {
          REQUIRE(cache.tokens(l, h) == 4 + 64);
          REQUIRE(held_before(cache, l, h, 4) == 4);
        }
      }
    });
  }
}

TEST_CASE("Eviction budgets protect 4 sinks and the 32 newest tokens unless told otherwise",
          "[reliability]") {
  // Whether one head holds every position in [first, end).
  const auto holds = [](const auto& cache, int l, int h, int64_t first, int64_t end) {
    const auto held = cache.materialize(l);
    const auto& p = held.heads[h].positions;
    for (int64_t x = first; x < end; ++x) {
      if (std::find(p.begin(), p.end(), x) == p.end()) return false;
    }
    return true;
  };
  REQUIRE(Budget::ratio(0.25).sink_tokens == Budget::kDefaultSinkTokens);
  REQUIRE(Budget::tokens(8).recent_tokens == Budget::kDefaultRecentTokens);
  SECTION("L2NormEvict: decode keys compete with the context, the newest 32 stay") {
    kvpack::KVCache<kvpack::L2NormEvict> cache(kDecodeShape,
                                               kvpack::L2NormEvict(Budget::ratio(0.25), 0));
    for (int l = 0; l < 2; ++l) append_random(cache, l, 0, kContext, 60 + l);
    cache.compress();
    decode(cache, [&](int64_t step) {
      const int64_t end = kContext + step + 1;
      for (int l = 0; l < 2; ++l) {
        for (int h = 0; h < 2; ++h) {
          REQUIRE(holds(cache, l, h, 0, 4));
          REQUIRE(holds(cache, l, h, end - 32, end));
        }
      }
    });
  }
  SECTION("ReconstructionEvict: sinks and the last 32 scored tokens") {
    kvpack::KVCache<kvpack::ReconstructionEvict> cache(
        kDecodeShape, kvpack::ReconstructionEvict(Budget::ratio(0.25, BudgetScope::kGlobal)));
    for (int l = 0; l < 2; ++l) append_random(cache, l, 0, kContext, 60 + l);
    repeat_pass(cache, kContext, 64, 91);
    cache.compress();
    for (int l = 0; l < 2; ++l) {
      for (int h = 0; h < 2; ++h) {
        REQUIRE(holds(cache, l, h, 0, 4));
        REQUIRE(holds(cache, l, h, kContext - 32, kContext));
      }
    }
  }
  SECTION("HeadLevelEvict: a dropped head keeps its sinks and recent window") {
    auto scores = std::make_shared<kvpack::HeadScores>();
    scores->layers = 2;
    scores->kv_heads = 2;
    scores->score = {0.1f, 0.9f, 0.8f, 0.2f};
    kvpack::KVCache<kvpack::HeadLevelEvict> cache(
        kDecodeShape, kvpack::HeadLevelEvict(scores, Budget::ratio(0.5, BudgetScope::kGlobal)));
    for (int l = 0; l < 2; ++l) append_random(cache, l, 0, kContext, 60 + l);
    cache.compress();
    REQUIRE(cache.tokens(0, 0) == 4 + 32);
    REQUIRE(holds(cache, 0, 0, 0, 4));
    REQUIRE(holds(cache, 0, 0, kContext - 32, kContext));
  }
  SECTION("with_protection(0, 0) selects on scores alone") {
    const auto b = Budget::ratio(0.25).with_protection(0, 0);
    REQUIRE((b.sink_tokens == 0 && b.recent_tokens == 0 && b.keep_ratio == 0.25));
  }
}

// --- 3. Derived values never overflow their storage type
// ------------------------------------------

TEST_CASE("ChannelShrink latents beyond the fp16 range are stored without inf", "[reliability]") {
  const ModelShape shape{2, 4, 2, 64, {kvpack::RopeStyle::kHalfSplit, 10000.0}};
  const int c = 2 * 64;
  const int64_t n = 256;
  // Rows near 8,200 · (1, …, 1) plus a little structure: the leading latent is ≈ 8,200 · √128.
  std::vector<std::vector<float>> keys(2), values(2);
  for (int l = 0; l < 2; ++l) {
    const auto noise = random_values(n * 2 * c, 300 + l, 300.0f);
    for (int64_t t = 0; t < n; ++t) {
      for (int i = 0; i < c; ++i) {
        keys[l].push_back(8200.0f + noise[t * 2 * c + i]);
        values[l].push_back(-8200.0f + noise[t * 2 * c + c + i]);
      }
    }
  }
  auto proj = std::make_shared<const kvpack::ChannelProjections>(
      kvpack::ChannelProjections::calibrate(keys, values, 2, 64, 16, 16));
  const auto check = [&](auto& cache) {
    const kvpack::Rope rope(shape.rope, shape.head_dim);
    for (int l = 0; l < 2; ++l) {
      std::vector<float> k = keys[l];
      for (int64_t t = 0; t < n; ++t) {
        for (int h = 0; h < 2; ++h) rope.rotate(k.data() + t * c + h * 64, t);
      }
      cache.append(l, ActivationView::nhd(k.data(), n, 2, 64),
                   ActivationView::nhd(values[l].data(), n, 2, 64), kvpack_test::iota_positions(n));
    }
    cache.compress();
    for (int l = 0; l < 2; ++l) {
      const auto dense = cache.materialize(l);
      double err = 0, ref = 0;
      for (int h = 0; h < 2; ++h) {
        for (std::size_t i = 0; i < dense.heads[h].v.size(); ++i) {
          const float x = dense.heads[h].v[i];
          REQUIRE(std::isfinite(x));
          REQUIRE(std::isfinite(dense.heads[h].k[i]));
          const std::size_t t = i / 64, j = i % 64;
          const double want = values[l][t * c + h * 64 + j];
          err += (x - want) * (x - want);
          ref += want * want;
        }
      }
      REQUIRE(err / ref < 1e-2);  // the projections keep the dominant direction
      const auto q = random_values(4 * 64, 50 + l, 0.001f);
      std::vector<float> out(q.size());
      cache.attend(l, ActivationView::nhd(q.data(), 1, 4, 64), std::vector<int64_t>{n - 1},
                   OutputView::nhd(out.data(), 1, 4, 64));
      for (float x : out) REQUIRE(std::isfinite(x));
      REQUIRE(kvpack_test::attention_error(cache, l, q, {n - 1}, out) < 2e-3);
    }
  };
  SECTION("fp16 latents") {
    kvpack::KVCache<kvpack::ChannelShrink> cache(shape, kvpack::ChannelShrink(proj, 32));
    check(cache);
  }
  SECTION("4-bit latents") {
    using P = kvpack::Compose<kvpack::ChannelShrink, kvpack::Quantize>;
    kvpack::KVCache<P> cache(shape, P(kvpack::ChannelShrink(proj, 32), kvpack::Quantize(4)));
    check(cache);
  }
}

// --- 4. Rollback drops only the tokens after the position ----------------------------------------

namespace {

/// 200 tokens compressed, 16 more appended, truncate(99): tokens 0..99 as they were after
/// compress() (bit for bit), bytes() no larger than before the 16 appends.
template <class Policy>
void check_rollback(const ModelShape& shape, Policy policy) {
  kvpack::KVCache<Policy> cache(shape, policy);
  kvpack_test::fill_low_rank(cache, 200, 31);
  cache.compress();
  const std::size_t bytes_compressed = cache.bytes();
  std::vector<kvpack::DenseLayer> before;
  for (int l = 0; l < shape.layers; ++l) before.push_back(cache.materialize(l));
  kvpack_test::append_decode_tokens(cache, 200, 16, 32);
  cache.truncate(99);
  REQUIRE(cache.bytes() <= bytes_compressed);
  for (int l = 0; l < shape.layers; ++l) {
    REQUIRE(cache.appended(l) == 100);
    const auto after = cache.materialize(l);
    for (int h = 0; h < shape.kv_heads; ++h) {
      const auto& a = after.heads[h];
      const auto& b = before[l].heads[h];
      const std::size_t kept = a.positions.size();
      REQUIRE(std::vector<int64_t>(b.positions.begin(), b.positions.begin() + kept) == a.positions);
      REQUIRE(a.positions.back() <= 99);
      const std::size_t values = kept * shape.head_dim;
      REQUIRE(std::equal(a.k.begin(), a.k.end(), b.k.begin(), b.k.begin() + values));
      REQUIRE(std::equal(a.v.begin(), a.v.end(), b.v.begin(), b.v.begin() + values));
    }
  }
  // The rolled-back cache keeps working: decode and compress again.
  kvpack_test::append_decode_tokens(cache, 100, 40, 33);
  cache.compress();
  for (int l = 0; l < shape.layers; ++l) {
    REQUIRE(kvpack_test::attend_error(cache, l, {139}, 34 + l) < 2e-3);
  }
}

}  // namespace

TEST_CASE("Rollback into compressed tokens keeps the rest bit-identical and no larger",
          "[reliability]") {
  const ModelShape& s = kvpack_test::kLowRankShape;
  using kvpack::Compose;
  using kvpack::CrossLayerSVD;
  using kvpack::Quantize;
  SECTION("CrossLayerSVD") { check_rollback(s, CrossLayerSVD(2, 8, 12)); }
  SECTION("ChannelShrink") {
    check_rollback(s, kvpack::ChannelShrink(kvpack_test::calibrated_projections(s, 8, 12), 32));
  }
  SECTION("CrossLayerSVD + 4-bit bases") {
    check_rollback(s, Compose<CrossLayerSVD, Quantize>(CrossLayerSVD(2, 8, 12), Quantize(4, 32)));
  }
  SECTION("Quantize, cut at a group boundary (position 95 is the end of group 3)") {
    kvpack::KVCache<Quantize> cache(s, Quantize(4, 32, 32));
    kvpack_test::fill_low_rank(cache, 200, 31);
    cache.compress();  // 160 tokens in blocks, 40 fp16
    const auto before = cache.materialize(1);
    const std::size_t bytes = cache.bytes();
    cache.truncate(95);
    REQUIRE(cache.bytes() < bytes);
    const auto after = cache.materialize(1);
    for (int h = 0; h < s.kv_heads; ++h) {
      REQUIRE(after.heads[h].positions.size() == 96);
      REQUIRE(
          std::equal(after.heads[h].k.begin(), after.heads[h].k.end(), before.heads[h].k.begin()));
      REQUIRE(
          std::equal(after.heads[h].v.begin(), after.heads[h].v.end(), before.heads[h].v.begin()));
    }
  }
  SECTION("Quantize, cut inside a quantized group: refused, nothing changes") {
    kvpack::KVCache<Quantize> cache(s, Quantize(4, 32, 32));
    kvpack_test::fill_low_rank(cache, 200, 31);
    cache.compress();
    const auto snap = kvpack_test::snapshot(cache);
    REQUIRE_THROWS_WITH(cache.truncate(99), Catch::Contains("inside a quantized group") &&
                                                Catch::Contains("position 95"));
    REQUIRE(kvpack_test::snapshot(cache) == snap);
    REQUIRE_NOTHROW(cache.truncate(170));  // in the fp16 residual: fine
  }
}

// --- 5. Knobs are checked against what they constrain -------------------------------------------

TEST_CASE("Quantized low-rank bases accept any head_dim (their groups run along tokens)",
          "[reliability]") {
  const ModelShape shape{2, 4, 2, 80, {kvpack::RopeStyle::kHalfSplit, 10000.0}};
  using P = kvpack::Compose<kvpack::CrossLayerSVD, kvpack::Quantize>;
  kvpack::KVCache<P> cache(shape, P(kvpack::CrossLayerSVD(2, 16, 24), kvpack::Quantize(4, 32)));
  kvpack_test::fill_low_rank(cache, 128, 5);
  cache.compress();
  for (int l = 0; l < 2; ++l) REQUIRE(kvpack_test::attend_error(cache, l, {127}, 6 + l) < 2e-3);
  // Rows quantized after eviction are grouped along channels: there head_dim must divide.
  using R = kvpack::Compose<kvpack::L2NormEvict, kvpack::Quantize>;
  REQUIRE_THROWS_WITH(
      (kvpack::KVCache<R>(shape, R(kvpack::L2NormEvict(), kvpack::Quantize(4, 32)))),
      Catch::Contains("a divisor of head_dim (80)"));
}
