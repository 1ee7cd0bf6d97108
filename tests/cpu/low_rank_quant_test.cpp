// Compose<CrossLayerSVD | ChannelShrink, Quantize>: low-rank token bases held as KIVI blocks
// (one per basis column over each group of tokens), checked against the scalar reference
// quantizer, against the plain low-rank policies and against attention over the decoded cache.
#include <algorithm>
#include <catch2/catch.hpp>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <kvpack/kvpack.hpp>
#include <vector>

#include "low_rank_util.hpp"
#include "test_util.hpp"

using Catch::Matchers::Contains;
using kvpack::ChannelShrink;
using kvpack::Compose;
using kvpack::CrossLayerSVD;
using kvpack::Quantize;
using kvpack_test::attend_error;
using kvpack_test::fill_low_rank;
using kvpack_test::held_pre_rope_keys;
using kvpack_test::kLowRankShape;
using kvpack_test::RowMat;

namespace {

using XkvQuant = Compose<CrossLayerSVD, Quantize>;
using CskvQuant = Compose<ChannelShrink, Quantize>;

/// Relative Frobenius distance between the pre-RoPE keys two caches hold, over all layers.
template <class A, class B>
double key_distance(const A& a, const B& b) {
  double diff = 0.0, norm = 0.0;
  for (int l = 0; l < a.shape().layers; ++l) {
    const RowMat ka = held_pre_rope_keys(a, l), kb = held_pre_rope_keys(b, l);
    diff += (ka - kb).squaredNorm();
    norm += kb.squaredNorm();
  }
  return std::sqrt(diff / norm);
}

}  // namespace

TEST_CASE("LowRankBasis: quantized columns hold the reference codes, within scale/2",
          "[lowrank][quantize][compose]") {
  // 100 rows = 3 whole groups of 32 + 4 fp16 rows; columns whose scales span 4 decades, as the
  // columns of U·Σ-ordered bases and PCA latents do.
  const int64_t n = 100;
  const int r = 20;
  auto a = kvpack_test::random_values(n * r, 77);
  for (int64_t t = 0; t < n; ++t) {
    for (int j = 0; j < r; ++j) a[t * r + j] *= std::pow(10.0f, -j / 5.0f);
  }
  // Pages of 256 bytes: a row group's 20 blocks span pages, fp16 rows (40 bytes) cross them.
  auto pool = std::make_shared<kvpack::PagePool>(256, 4);
  for (int bits : {2, 4, 8}) {
    INFO("bits " << bits);
    kvpack::detail::LowRankBasis basis;
    basis.assign(a.data(), n, r, bits, 32, pool);
    REQUIRE(basis.quantized_rows() == 96);
    REQUIRE(basis.bytes() + sizeof(basis) == kvpack_test::basis_bytes(256, n, r, bits, 32));
    REQUIRE(pool->pages_in_use() == static_cast<std::size_t>(basis.pages.size()));
    std::vector<float> all(n * r);
    basis.load(0, n, all.data());
    kvpack::dispatch_quant(bits, 32, [&](auto b, auto g) {
      constexpr int B = decltype(b)::value, G = decltype(g)::value;
      auto block = [&](int64_t i) {  // block i by the documented page layout
        const std::size_t per_page = 256 / sizeof(kvpack::QuantBlock<B, G>);
        return reinterpret_cast<const kvpack::QuantBlock<B, G>*>(
            pool->data(basis.pages.ids[i / per_page]))[i % per_page];
      };
      // What byte budgets price a quantized value at is the block's real size per value.
      REQUIRE(Quantize(B, G).bytes_per_value() == double(sizeof(kvpack::QuantBlock<B, G>)) / G);
      for (int64_t grp = 0; grp < 3; ++grp) {
        for (int j = 0; j < r; ++j) {
          kvpack::QuantBlock<B, G> ref;
          kvpack::quantize_block_ref(a.data() + grp * G * r + j, r, ref);
          const auto& got = block(grp * r + j);
          REQUIRE(std::memcmp(&got, &ref, sizeof(ref)) == 0);
          const float half_step = 0.5f * kvpack::to_float(ref.scale);
          for (int i = 0; i < G; ++i) {
            const int64_t at = (grp * G + i) * r + j;
            REQUIRE(std::abs(all[at] - a[at]) <= half_step * 1.0001f + 1e-7f);
          }
        }
      }
    });
    for (int64_t at = 96 * r; at < n * r; ++at) {
      REQUIRE(all[at] == kvpack::to_float(kvpack::to_half(a[at])));
    }
    // Any range (unaligned to the groups, across the fp16 rows) reads the same values.
    for (auto [begin, count] : {std::pair<int64_t, int64_t>{5, 70}, {31, 2}, {90, 10}, {64, 32}}) {
      std::vector<float> part(count * r);
      basis.load(begin, count, part.data());
      REQUIRE(std::equal(part.begin(), part.end(), all.begin() + begin * r));
    }
  }
}

TEST_CASE("Compose<CrossLayerSVD, Quantize>: quantized bases, exact bytes, attention on them",
          "[lowrank][xkv][quantize][compose]") {
  kvpack::KVCache<CrossLayerSVD> plain(kLowRankShape, CrossLayerSVD(2, 20, 30));
  fill_low_rank(plain, 300, 5);
  plain.compress();
  double previous = 0.0;
  for (int bits : {8, 4, 2}) {
    INFO("bits " << bits);
    const XkvQuant policy(CrossLayerSVD(2, 20, 30), Quantize(bits, 32));
    kvpack::KVCache<XkvQuant> cache(kLowRankShape, policy);
    const std::size_t empty = kvpack::KVCache<XkvQuant>(kLowRankShape, policy).bytes();
    fill_low_rank(cache, 300, 5);
    cache.compress();
    // Two groups x (keys at rank 20, values at rank 30): 9 whole groups of 32 tokens in
    // blocks, 12 fp16 rows, in pages; fp32 factors per (layer, head, side); positions.
    const std::size_t page = cache.page_pool()->page_bytes();
    const std::size_t bases = 2 * (kvpack_test::basis_bytes(page, 300, 20, bits, 32) +
                                   kvpack_test::basis_bytes(page, 300, 30, bits, 32));
    const std::size_t expected = bases + 4 * 2 * (20 + 30) * 32 * 4 + 4 * 2 * 300 * 4;
    REQUIRE(cache.bytes() - empty == expected);
    // The same SVD as the plain policy; only the basis rounding differs, more at fewer bits.
    const double distance = key_distance(cache, plain);
    CHECK(distance < (bits == 8 ? 0.01 : bits == 4 ? 0.1 : 0.5));
    CHECK(distance > previous);
    previous = distance;
    // Attention reads the quantized basis tile by tile: equal to attention over the decoded
    // cache, for a decode query (after two exact tokens) and a query inside the factored range.
    kvpack_test::append_decode_tokens(cache, 300, 2, 90);
    for (int layer : {0, 3}) {
      CHECK(attend_error(cache, layer, {301}, 91) < 1e-5);
      CHECK(attend_error(cache, layer, {150}, 92) < 1e-5);
    }
  }
}

TEST_CASE("Compose<CrossLayerSVD, Quantize>: ranks from a bytes ratio price the quantized basis",
          "[lowrank][xkv][quantize][compose]") {
  // At the same 8x, quantized basis values cost 0.625 bytes instead of 2: the composed policy
  // affords higher ranks, and on data of latent rank 12 it reconstructs the keys better. Pages
  // of one token (128 bytes): with 16-token pages (2 KB) the last, partly filled page of each
  // basis is ~10 % of this 400-token cache and the ratio reads 7.2x (it is < 1 % at 2 K tokens).
  const kvpack::PageOptions small_pages{1, nullptr};
  kvpack::KVCache<CrossLayerSVD> plain(kLowRankShape, CrossLayerSVD::with_ratio(4, 8.0),
                                       small_pages);
  kvpack::KVCache<XkvQuant> both(
      kLowRankShape, XkvQuant(CrossLayerSVD::with_ratio(4, 8.0), Quantize(4, 32)), small_pages);
  kvpack::KVCache<kvpack::Identity> exact(kLowRankShape);
  fill_low_rank(plain, 400, 17);
  fill_low_rank(both, 400, 17);
  fill_low_rank(exact, 400, 17);
  plain.compress();
  both.compress();
  const double plain_ratio = double(plain.dense_bytes()) / plain.bytes();
  const double both_ratio = double(both.dense_bytes()) / both.bytes();
  INFO("plain " << plain_ratio << "x, composed " << both_ratio << "x");
  CHECK(plain_ratio == Approx(8.0).epsilon(0.1));
  CHECK(both_ratio == Approx(8.0).epsilon(0.1));
  CHECK(key_distance(both, exact) < 0.7 * key_distance(plain, exact));
}

TEST_CASE("Compose<ChannelShrink, Quantize>: quantized latents, bytes, attention on latents",
          "[lowrank][cskv][quantize][compose]") {
  const auto projections = kvpack_test::calibrated_projections(kLowRankShape, 12, 16);
  kvpack::KVCache<ChannelShrink> plain(kLowRankShape, ChannelShrink(projections, 32));
  kvpack::KVCache<CskvQuant> both(kLowRankShape,
                                  CskvQuant(ChannelShrink(projections, 32), Quantize(4, 32)));
  const auto positions = kvpack_test::gapped_positions(600);
  fill_low_rank(plain, positions, 21);
  fill_low_rank(both, positions, 21);
  plain.compress();
  both.compress();
  // 568 factored tokens per layer: 17 groups of 32 in 4-bit blocks (20 bytes) + 24 fp16 rows,
  // instead of 568 fp16 rows, in pages; keys at rank 12, values at rank 16; everything else the
  // same.
  const std::size_t page = both.page_pool()->page_bytes();
  REQUIRE(page == plain.page_pool()->page_bytes());
  const std::size_t saved_per_layer = kvpack_test::basis_bytes(page, 568, 12) +
                                      kvpack_test::basis_bytes(page, 568, 16) -
                                      kvpack_test::basis_bytes(page, 568, 12, 4, 32) -
                                      kvpack_test::basis_bytes(page, 568, 16, 4, 32);
  REQUIRE(plain.bytes() - both.bytes() == 4 * saved_per_layer);
  CHECK(key_distance(both, plain) < 0.1);
  kvpack_test::append_decode_tokens(both, positions.back() + 1, 3, 400);
  for (int layer : {0, 2}) {
    CHECK(attend_error(both, layer, {positions.back() + 3}, 15) < 1e-5);
    CHECK(attend_error(both, layer, {positions[100]}, 16) < 1e-5);
  }
  // A second compress() re-projects the decoded latents (idempotent up to rounding) and
  // quantizes the grown range.
  both.compress();
  CHECK(both.tokens(1, 0) == 603);
  CHECK(attend_error(both, 1, {positions.back() + 3}, 17) < 1e-5);
}

TEST_CASE("Compose<low rank, Quantize>: bad quantizer knobs are refused", "[lowrank][errors]") {
  using Cache = kvpack::KVCache<XkvQuant>;
  REQUIRE_THROWS_WITH(Cache(kLowRankShape, XkvQuant(CrossLayerSVD(2, 8, 8), Quantize(3))),
                      Contains("bits = 3"));
  REQUIRE_THROWS_WITH(Cache(kLowRankShape, XkvQuant(CrossLayerSVD(2, 8, 8), Quantize(4, 10))),
                      Contains("group = 10, expected 16, 32, 64 or 128"));
  // Basis groups run along tokens: a group larger than head_dim (32 here) is fine.
  REQUIRE_NOTHROW(Cache(kLowRankShape, XkvQuant(CrossLayerSVD(2, 8, 8), Quantize(4, 64))));
  REQUIRE_THROWS_WITH(Cache(kLowRankShape, XkvQuant(CrossLayerSVD(2, 200, 8), Quantize(4))),
                      Contains("rank_k = 200"));
  // A knob broken at run time: compress() refuses and holds what it held.
  Cache cache(kLowRankShape, XkvQuant(CrossLayerSVD(2, 8, 8), Quantize(4)));
  fill_low_rank(cache, 100, 3);
  const auto before = kvpack_test::snapshot(cache);
  cache.policy().second.bits = 5;
  REQUIRE_THROWS_WITH(cache.compress(), Contains("bits = 5"));
  REQUIRE(kvpack_test::snapshot(cache) == before);
}
