// Attention on low-rank factors (backend/cpu/low_rank_attention.hpp) against double-precision
// attention over the cache's own reconstruction, and RopeRun against Rope.
#include <catch2/catch.hpp>
#include <cstdint>
#include <kvpack/kvpack.hpp>
#include <memory>
#include <vector>

#include "low_rank_util.hpp"
#include "test_util.hpp"

using kvpack::ActivationView;
using kvpack::ChannelProjections;
using kvpack::ChannelShrink;
using kvpack::CrossLayerSVD;
using kvpack::ModelShape;
using kvpack::OutputView;
using kvpack_test::attention_error;
using kvpack_test::fill_low_rank;
using kvpack_test::kLowRankShape;
using kvpack_test::RowMat;

using kvpack_test::append_decode_tokens;
using kvpack_test::attend_error;
using kvpack_test::calibrated_projections;
using kvpack_test::gapped_positions;

TEST_CASE("RopeRun rotates and un-rotates like Rope over runs, jumps and large positions",
          "[lowrank][rope]") {
  for (auto style : {kvpack::RopeStyle::kInterleaved, kvpack::RopeStyle::kHalfSplit}) {
    const kvpack::Rope rope({style, 100000.0}, 64);
    const kvpack::detail::RopeRun run(rope);
    // 700 positions: runs longer than RopeRun::kAnchor, jumps, and values near 2^21.
    std::vector<int32_t> pos(700);
    for (int t = 0; t < 700; ++t) pos[t] = (t < 300 ? t : 2000000 + t + (t > 500 ? 77 : 0));
    const auto x = kvpack_test::random_values(700 * 64, 5);
    for (bool inverse : {false, true}) {
      INFO("style " << static_cast<int>(style) << " inverse " << inverse);
      std::vector<float> expected = x, got = x;
      for (int t = 0; t < 700; ++t) {
        if (inverse) {
          rope.unrotate(expected.data() + t * 64, pos[t]);
        } else {
          rope.rotate(expected.data() + t * 64, pos[t]);
        }
      }
      run.apply(got.data(), pos.data(), 700, inverse);
      double worst = 0.0;
      for (std::size_t i = 0; i < x.size(); ++i) {
        worst = std::max(worst, static_cast<double>(std::abs(got[i] - expected[i])));
      }
      // Angles differ by ~1e-13 rad after 256 steps of angle addition: far below fp32 rounding.
      CHECK(worst <= 1e-6);
    }
  }
}

TEST_CASE("CrossLayerSVD: attention on factors plus an exact tail of decode tokens",
          "[lowrank][xkv][attention]") {
  for (auto positions : {kvpack_test::iota_positions(700), gapped_positions(700)}) {
    kvpack::KVCache<CrossLayerSVD> cache(kLowRankShape, CrossLayerSVD(2, 20, 30));
    fill_low_rank(cache, positions, 7);
    cache.compress();
    const int64_t last = positions.back();
    append_decode_tokens(cache, last + 1, 5, 300);
    for (int layer : {0, 3}) {
      INFO("layer " << layer << " first position " << positions.front());
      // One decode query at the end (sees factors and tail), one inside the factored range.
      CHECK(attend_error(cache, layer, {last + 5}, 11) < 1e-5);
      CHECK(attend_error(cache, layer, {positions[350]}, 12) < 1e-5);
      // A prefill-like block of 8 query tokens (24 rows per kv head: the GEMM path of the tail),
      // spanning the factored range and the tail.
      std::vector<int64_t> block;
      for (int64_t t = 0; t < 4; ++t) block.push_back(positions[690 + t]);
      for (int64_t t = 1; t <= 4; ++t) block.push_back(last + t);
      CHECK(attend_error(cache, layer, block, 13) < 1e-5);
    }
    // A second compress() refactors the tail into the factors; attention still matches.
    cache.compress();
    CHECK(cache.tokens(1, 1) == 705);
    CHECK(attend_error(cache, 1, {last + 5}, 14) < 1e-5);
  }
}

TEST_CASE("ChannelShrink: attention on latents plus the exact window",
          "[lowrank][cskv][attention]") {
  const auto projections = calibrated_projections(kLowRankShape, 12, 16);
  kvpack::KVCache<ChannelShrink> cache(kLowRankShape, ChannelShrink(projections, 32));
  const auto positions = gapped_positions(600);
  fill_low_rank(cache, positions, 21);
  cache.compress();
  append_decode_tokens(cache, positions.back() + 1, 3, 400);
  for (int layer : {0, 2}) {
    INFO("layer " << layer);
    CHECK(attend_error(cache, layer, {positions.back() + 3}, 15) < 1e-5);
    CHECK(attend_error(cache, layer, {positions[100]}, 16) < 1e-5);
  }
}

TEST_CASE("Low-rank attention splits long caches and merges the splits exactly",
          "[lowrank][xkv][attention]") {
  // 3000 tokens: decode attention splits each head into several key spans (one per ~512 tokens)
  // whose partial softmax states are merged; each span covers several 256-token tiles.
  const ModelShape shape{2, 6, 2, 32, {kvpack::RopeStyle::kInterleaved, 500000.0}};
  kvpack::KVCache<CrossLayerSVD> cache(shape, CrossLayerSVD::with_ratio(2, 3.0));
  fill_low_rank(cache, 3000, 31);
  cache.compress();
  CHECK(attend_error(cache, 1, {2999}, 17) < 1e-5);
  CHECK(attend_error(cache, 0, {1234}, 18) < 1e-5);
}
