// KVCache::low_rank_factors: the read-only view of a low-rank cache's storage. Every held key and
// value rebuilt from the view alone, by the rule docs/page_formats.md states (basis rows decoded
// from fp16 or KIVI blocks, times the head's factor, keys rotated at their positions, the exact
// tail), equals what materialize() returns; bad heads are refused.
#include <catch2/catch.hpp>
#include <cmath>
#include <cstdint>
#include <kvpack/kvpack.hpp>
#include <vector>

#include "low_rank_util.hpp"

using kvpack::Compose;
using kvpack::CrossLayerSVD;
using kvpack::LowRankBasisData;
using kvpack::LowRankHeadFactors;
using kvpack::Quantize;
using kvpack_test::kLowRankShape;

namespace {

/// A[t][j] of a basis, decoded by the documented page layout (docs/page_formats.md, "Low-rank
/// bases") from the pages of `pool`.
double basis_at(const LowRankBasisData& b, const kvpack::PagePool& pool, int64_t t, int j) {
  if (t >= b.quantized) {
    const int64_t e = (t - b.quantized) * b.rank + j;
    const int64_t per_page = static_cast<int64_t>(b.page_bytes / 2);
    REQUIRE(b.block_pages + e / per_page < b.pages);
    const auto* page =
        reinterpret_cast<const kvpack::Half*>(pool.data(b.page_ids[b.block_pages + e / per_page]));
    return kvpack::to_float(page[e % per_page]);
  }
  double value = 0;
  kvpack::dispatch_quant(b.bits, b.group, [&](auto bits, auto group) {
    using Block = kvpack::QuantBlock<decltype(bits)::value, decltype(group)::value>;
    const int64_t i = (t / b.group) * b.rank + j;
    const int64_t per_page = static_cast<int64_t>(b.page_bytes / sizeof(Block));
    REQUIRE(i / per_page < b.block_pages);
    const auto* page = reinterpret_cast<const Block*>(pool.data(b.page_ids[i / per_page]));
    value = kvpack::dequantize_ref(page[i % per_page], static_cast<int>(t % b.group));
  });
  return value;
}

/// The largest |rebuilt − materialized| over the keys and values of `layer`, relative to the
/// largest magnitude held, with keys and values rebuilt in double from low_rank_factors() alone.
template <class Cache>
double largest_rebuild_error(const Cache& cache, int layer) {
  const kvpack::DenseLayer dense = cache.materialize(layer);
  const kvpack::PagePool& pool = *cache.page_pool();
  double worst = 0, peak = 0;
  for (int h = 0; h < cache.shape().kv_heads; ++h) {
    const LowRankHeadFactors f = cache.low_rank_factors(layer, h);
    const int d = f.head_dim;
    REQUIRE(f.tokens == static_cast<int64_t>(dense.heads[h].positions.size()));
    for (int64_t t = 0; t < f.tokens; ++t) {
      REQUIRE(f.positions[t] == dense.heads[h].positions[t]);
      std::vector<double> k(d, 0.0), v(d, 0.0);
      if (t < f.factored) {
        for (int c = 0; c < d; ++c) {
          for (int j = 0; j < f.key_basis.rank; ++j)
            k[c] += basis_at(f.key_basis, pool, t, j) * f.key_factor[j * d + c];
          for (int j = 0; j < f.value_basis.rank; ++j)
            v[c] += basis_at(f.value_basis, pool, t, j) * f.value_factor[j * d + c];
        }
        const kvpack::Rope& rope = *f.rope;
        for (int i = 0; i < rope.rotary_dim() / 2; ++i) {
          int a = 0, b = 0;
          kvpack::detail::rope_pair(rope.config().style, i, rope.rotary_dim(), a, b);
          const double angle = f.positions[t] * rope.inv_freq()[i], x = k[a], y = k[b];
          k[a] = rope.attention_factor() * (x * std::cos(angle) - y * std::sin(angle));
          k[b] = rope.attention_factor() * (x * std::sin(angle) + y * std::cos(angle));
        }
      } else {
        for (int c = 0; c < d; ++c) {
          k[c] = kvpack::to_float(f.tail_k[(t - f.factored) * d + c]);
          v[c] = kvpack::to_float(f.tail_v[(t - f.factored) * d + c]);
        }
      }
      for (int c = 0; c < d; ++c) {
        const double mk = dense.heads[h].k[t * d + c], mv = dense.heads[h].v[t * d + c];
        worst = std::max({worst, std::abs(k[c] - mk), std::abs(v[c] - mv)});
        peak = std::max({peak, std::abs(mk), std::abs(mv)});
      }
    }
  }
  return worst / peak;
}

template <class Cache>
void check_view(Cache& cache) {
  const auto positions = kvpack_test::gapped_positions(300);
  kvpack_test::fill_low_rank(cache, positions, 41);
  // Before compress(): nothing factored, every token in the tail.
  const LowRankHeadFactors before = cache.low_rank_factors(1, 1);
  REQUIRE(before.factored == 0);
  REQUIRE(before.key_basis.rank == 0);
  REQUIRE(before.tokens == 300);
  CHECK(largest_rebuild_error(cache, 1) == 0.0);
  cache.compress();
  kvpack_test::append_decode_tokens(cache, positions.back() + 1, 5, 42);
  const LowRankHeadFactors after = cache.low_rank_factors(2, 0);
  REQUIRE(after.factored > 0);
  REQUIRE(after.tokens >= after.factored + 5);  // the decode tokens (and CSKV's window) exact
  for (int layer = 0; layer < kLowRankShape.layers; ++layer) {
    INFO("layer " << layer);
    CHECK(largest_rebuild_error(cache, layer) < 2e-6);  // fp32 rounding: 4.4e-7 seen
  }
  REQUIRE_THROWS_WITH(cache.low_rank_factors(kLowRankShape.layers, 0),
                      Catch::Contains("low_rank_factors") && Catch::Contains("layer"));
  REQUIRE_THROWS_WITH(cache.low_rank_factors(0, kLowRankShape.kv_heads),
                      Catch::Contains("low_rank_factors") && Catch::Contains("head"));
}

}  // namespace

TEST_CASE("low_rank_factors: keys and values rebuilt from the view equal materialize()",
          "[lowrank][formats]") {
  SECTION("xKV, fp16 bases") {
    kvpack::KVCache<CrossLayerSVD> cache(kLowRankShape, CrossLayerSVD(2, 20, 30));
    check_view(cache);
  }
  SECTION("xKV, 4-bit bases") {
    using P = Compose<CrossLayerSVD, Quantize>;
    kvpack::KVCache<P> cache(kLowRankShape, P(CrossLayerSVD(2, 20, 30), Quantize(4, 32, 0)));
    REQUIRE(cache.low_rank_factors(0, 0).key_basis.bits == 0);  // no basis yet
    check_view(cache);
    REQUIRE(cache.low_rank_factors(0, 0).key_basis.bits == 4);
    REQUIRE(cache.low_rank_factors(0, 0).key_basis.quantized > 0);
  }
  SECTION("CSKV, 2-bit bases") {
    using P = Compose<kvpack::ChannelShrink, Quantize>;
    kvpack::KVCache<P> cache(
        kLowRankShape,
        P(kvpack::ChannelShrink(kvpack_test::calibrated_projections(kLowRankShape, 12, 16), 32),
          Quantize(2, 16, 0)));
    check_view(cache);
  }
  SECTION("CSKV, fp16 bases in a shared pool of larger pages (the pool's page size rules)") {
    auto pool = std::make_shared<kvpack::PagePool>(8192, 8);
    kvpack::KVCache<kvpack::ChannelShrink> cache(
        kLowRankShape,
        kvpack::ChannelShrink(kvpack_test::calibrated_projections(kLowRankShape, 12, 16), 32),
        kvpack::PageOptions{16, pool});
    check_view(cache);
    REQUIRE(cache.low_rank_factors(0, 0).key_basis.page_bytes == 8192);
  }
  SECTION("xKV, 4-bit bases in pages of one token: rows and row groups cross pages") {
    using P = Compose<CrossLayerSVD, Quantize>;
    kvpack::KVCache<P> cache(kLowRankShape, P(CrossLayerSVD(2, 20, 30), Quantize(4, 32, 0)),
                             kvpack::PageOptions{1, nullptr});
    REQUIRE(cache.page_pool()->page_bytes() == 128);  // 2 x 1 x 32 fp16: 6 blocks, 64 values
    check_view(cache);
    const LowRankBasisData b = cache.low_rank_factors(0, 0).value_basis;
    REQUIRE(b.block_pages == (b.quantized / 32 * 30 + 5) / 6);
    REQUIRE(b.pages == b.block_pages + ((b.tokens - b.quantized) * 30 + 63) / 64);
  }
}
