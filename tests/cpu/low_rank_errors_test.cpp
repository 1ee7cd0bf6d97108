// Bad input to the low-rank policies: every refusal is a kvpack::error whose message names the
// argument and the value, and a refused compress() leaves the cache as it was.
#include <catch2/catch.hpp>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <iterator>
#include <kvpack/kvpack.hpp>
#include <memory>
#include <string>
#include <vector>

#include "low_rank_util.hpp"
#include "test_util.hpp"

using Catch::Matchers::Contains;
using kvpack::ActivationView;
using kvpack::ChannelProjections;
using kvpack::ChannelShrink;
using kvpack::CrossLayerSVD;
using kvpack::ModelShape;
using kvpack_test::fill_low_rank;
using kvpack_test::kLowRankShape;
using kvpack_test::RowMat;
using kvpack_test::snapshot;

namespace {

/// `call` throws a kvpack::error containing `fragment` and changes nothing in `cache`.
template <class Cache, class F>
void require_refused_unchanged(Cache& cache, F&& call, const std::string& fragment) {
  const auto before = snapshot(cache);
  REQUIRE_THROWS_AS(call(), kvpack::error);
  REQUIRE_THROWS_WITH(call(), Contains(fragment));
  REQUIRE(snapshot(cache) == before);
}

ChannelProjections projections_for(const ModelShape& shape, int rk, int rv, uint32_t seed = 3) {
  return kvpack_test::projections_for(shape, rk, rv, 200, seed);
}

std::vector<char> read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

void write_file(const std::string& path, const std::vector<char>& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

/// Rewrites the trailing FNV-1a checksum, so that a test reaches the checks behind it.
std::vector<char> with_checksum(std::vector<char> bytes) {
  uint64_t h = 1469598103934665603ull;
  for (std::size_t i = 0; i + 8 < bytes.size(); ++i) {
    h = (h ^ static_cast<uint8_t>(bytes[i])) * 1099511628211ull;
  }
  std::memcpy(bytes.data() + bytes.size() - 8, &h, 8);
  return bytes;
}

void put_u32(std::vector<char>& bytes, std::size_t at, uint32_t v) {
  std::memcpy(bytes.data() + at, &v, 4);
}

}  // namespace

TEST_CASE("CrossLayerSVD: ranks larger than the matrix, zero or negative are refused",
          "[lowrank][xkv][errors]") {
  using Cache = kvpack::KVCache<CrossLayerSVD>;
  // Columns of a group of 2 layers: 2 x 2 kv heads x 32 = 128.
  REQUIRE_THROWS_AS(Cache(kLowRankShape, CrossLayerSVD(2, 129, 10)), kvpack::error);
  REQUIRE_THROWS_WITH(Cache(kLowRankShape, CrossLayerSVD(2, 129, 10)),
                      Contains("CrossLayerSVD: rank_k = 129, expected in [0, 128]"));
  REQUIRE_THROWS_WITH(Cache(kLowRankShape, CrossLayerSVD(2, 10, 500)),
                      Contains("rank_v = 500, expected in [0, 128]"));
  REQUIRE_THROWS_WITH(Cache(kLowRankShape, CrossLayerSVD(2, -3, 10)), Contains("rank_k = -3"));
  REQUIRE_THROWS_WITH(Cache(kLowRankShape, CrossLayerSVD(2, 10, -1)), Contains("rank_v = -1"));
  REQUIRE_THROWS_WITH(Cache(kLowRankShape, CrossLayerSVD(2, 0, 10)),
                      Contains("rank_k/rank_v = 0/10, expected both set or both 0"));
  REQUIRE_THROWS_WITH(Cache(kLowRankShape, CrossLayerSVD(2, 10, 0)), Contains("both set"));
  CrossLayerSVD bad_route(2, 10, 10);
  bad_route.svd_route = static_cast<kvpack::SvdRoute>(7);
  REQUIRE_THROWS_WITH(Cache(kLowRankShape, bad_route), Contains("svd_route = 7"));
  CrossLayerSVD nan_ratio = CrossLayerSVD::with_ratio(2, std::nan(""));
  REQUIRE_THROWS_WITH(Cache(kLowRankShape, nan_ratio), Contains("target_ratio"));

  // Knobs changed on a filled cache are checked by the next compress(), which changes nothing.
  Cache cache(kLowRankShape, CrossLayerSVD(2, 8, 12));
  fill_low_rank(cache, 60, 5);
  cache.compress();
  cache.policy().rank_k = 200;
  require_refused_unchanged(
      cache, [&] { cache.compress(); }, "rank_k = 200");
  cache.policy().rank_k = -1;
  require_refused_unchanged(
      cache, [&] { cache.compress(); }, "rank_k = -1");
  cache.policy().rank_k = 0;
  require_refused_unchanged(
      cache, [&] { cache.compress(); }, "both set or both 0");

  // A rank above the tokens held: a rank-r basis of fewer than r rows would outweigh the rows.
  cache.policy().rank_k = 61;
  require_refused_unchanged(
      cache, [&] { cache.compress(); },
      "CrossLayerSVD rank_k = 61, expected at most min(tokens, columns) = 60 for layers [0, 2)");
  cache.policy().rank_k = 60;
  REQUIRE_NOTHROW(cache.compress());
}

TEST_CASE("CrossLayerSVD: the smaller last group is factored alone and bounds explicit ranks",
          "[lowrank][xkv][errors]") {
  // 5 layers at G = 2: groups {0, 1}, {2, 3} and {4}; the last one has 64 columns.
  const ModelShape five{5, 6, 2, 32, {kvpack::RopeStyle::kHalfSplit, 10000.0}};
  using Cache = kvpack::KVCache<CrossLayerSVD>;
  REQUIRE_THROWS_WITH(Cache(five, CrossLayerSVD(2, 65, 65)),
                      Contains("rank_k = 65, expected in [0, 64]") &&
                          Contains("the last group has only 1 x 2 x 32 columns: group_layers = 2 "
                                   "does not divide the 5 layers"));
  REQUIRE_NOTHROW(Cache(five, CrossLayerSVD(2, 64, 64)));

  Cache cache(five, CrossLayerSVD(2, 10, 10));
  const auto pre = fill_low_rank(cache, 150, 9);
  cache.compress();
  // The last group is layer 4 alone: its keys are the best rank-10 approximation of that layer.
  const RowMat k4 = pre[4].leftCols(64);
  const RowMat held = kvpack_test::held_pre_rope_keys(cache, 4);
  const double optimum = kvpack_test::optimal_error(k4, 10);
  CHECK((held - k4).norm() <= 1.02 * optimum + 2e-3 * k4.norm());
  // Ratio-derived ranks work for the smaller group too.
  Cache derived(five, CrossLayerSVD::with_ratio(2, 3.0));
  fill_low_rank(derived, 150, 9);
  REQUIRE_NOTHROW(derived.compress());
  CHECK(static_cast<double>(derived.dense_bytes()) / derived.bytes() > 2.0);
}

TEST_CASE("CrossLayerSVD: layers of a group holding different tokens are refused",
          "[lowrank][xkv][errors]") {
  kvpack::KVCache<CrossLayerSVD> cache(kLowRankShape, CrossLayerSVD(2, 8, 8));
  fill_low_rank(cache, 40, 13);
  // One more token in layer 0 only (an engine appending layer by layer, interrupted).
  const auto k = kvpack_test::random_values(64, 1), v = kvpack_test::random_values(64, 2);
  cache.append(0, ActivationView::nhd(k.data(), 1, 2, 32), ActivationView::nhd(v.data(), 1, 2, 32),
               std::vector<int64_t>{40});
  require_refused_unchanged(
      cache, [&] { cache.compress(); },
      "CrossLayerSVD needs every head and layer it factors together to hold the same tokens; "
      "layer 1 head 0 differs from layer 0 head 0");
}

TEST_CASE("ChannelShrink: projections of another shape or inconsistent ones are refused",
          "[lowrank][cskv][errors]") {
  using Cache = kvpack::KVCache<ChannelShrink>;
  const auto good =
      std::make_shared<const ChannelProjections>(projections_for(kLowRankShape, 8, 12));
  const ModelShape more_layers{6, 6, 2, 32, kLowRankShape.rope};
  const ModelShape more_heads{4, 9, 3, 32, kLowRankShape.rope};
  const ModelShape wider_heads{4, 6, 2, 64, kLowRankShape.rope};
  for (const ModelShape& other : {more_layers, more_heads, wider_heads}) {
    INFO(other.layers << " x " << other.kv_heads << " x " << other.head_dim);
    REQUIRE_THROWS_AS(Cache(other, ChannelShrink(good)), kvpack::error);
    REQUIRE_THROWS_WITH(Cache(other, ChannelShrink(good)),
                        Contains("ChannelShrink: projections shape = 4x2x32, expected"));
  }
  REQUIRE_THROWS_WITH(Cache(kLowRankShape, ChannelShrink(good, -1)), Contains("residual = -1"));
  REQUIRE_THROWS_WITH(Cache(kLowRankShape, ChannelShrink()), Contains("projections = null"));

  ChannelProjections hand = projections_for(kLowRankShape, 8, 12);
  hand.pk[2].resize(10);
  REQUIRE_THROWS_WITH(
      Cache(kLowRankShape, ChannelShrink(std::make_shared<ChannelProjections>(hand))),
      Contains("projections pk size = 10 (layer 2), expected 64 channels x rank 8"));
  hand = projections_for(kLowRankShape, 8, 12);
  hand.rank_v[1] = 0;
  REQUIRE_THROWS_WITH(
      Cache(kLowRankShape, ChannelShrink(std::make_shared<ChannelProjections>(hand))),
      Contains("projections rank_v = 0 (layer 1)"));
  hand = projections_for(kLowRankShape, 8, 12);
  hand.pv.pop_back();
  REQUIRE_THROWS_WITH(
      Cache(kLowRankShape, ChannelShrink(std::make_shared<ChannelProjections>(hand))),
      Contains("projections rank_k/rank_v/pk/pv sizes = 4/4/4/3, expected 4"));

  // Swapped on a filled cache: the next compress() refuses and changes nothing.
  Cache cache(kLowRankShape, ChannelShrink(good, 8));
  fill_low_rank(cache, 50, 17);
  cache.compress();
  const ModelShape three_heads{4, 6, 3, 32, kLowRankShape.rope};
  cache.policy().projections =
      std::make_shared<const ChannelProjections>(projections_for(three_heads, 8, 12));
  require_refused_unchanged(
      cache, [&] { cache.compress(); }, "projections shape = 4x3x32");
  cache.policy().projections = nullptr;
  require_refused_unchanged(
      cache, [&] { cache.compress(); }, "projections = null");
  cache.policy().projections = good;
  REQUIRE_NOTHROW(cache.compress());
}

TEST_CASE("ChannelProjections::load refuses corrupted, truncated and foreign files",
          "[lowrank][cskv][errors]") {
  const std::string path = "kvpack_low_rank_errors_projections.bin";
  projections_for(kLowRankShape, 8, 12).save(path);
  const std::vector<char> bytes = read_file(path);
  REQUIRE(ChannelProjections::load(path).layers == 4);
  // Header: magic 0..7, version 8, layers 12, kv_heads 16, head_dim 20, layer 0's r_k 24, r_v 28.
  struct Bad {
    const char* name;
    std::vector<char> bytes;
    const char* message;
  };
  std::vector<Bad> bad;
  auto flipped = bytes;
  flipped[200] ^= 0x01;
  bad.push_back({"one bit flipped", flipped, "checksum mismatch"});
  bad.push_back({"truncated", std::vector<char>(bytes.begin(), bytes.end() - 100), "checksum"});
  bad.push_back({"too short", std::vector<char>(bytes.begin(), bytes.begin() + 20), "too short"});
  auto foreign = bytes;
  std::memcpy(foreign.data(), "GGUF\0\0\0\0", 8);
  bad.push_back({"foreign magic", foreign, "bad magic"});
  auto version = bytes;
  put_u32(version, 8, 2);
  bad.push_back({"version 2", with_checksum(version), "version = 2, expected 1"});
  auto zero_layers = bytes;
  put_u32(zero_layers, 12, 0);
  bad.push_back({"0 layers", with_checksum(zero_layers), "implausible shape"});
  auto rank = bytes;
  put_u32(rank, 24, 65);
  bad.push_back({"rank above channels", with_checksum(rank), "rank 65 out of range"});
  auto fewer_layers = bytes;
  put_u32(fewer_layers, 12, 3);
  bad.push_back({"header says 3 layers", with_checksum(fewer_layers), "trailing bytes"});
  auto more_layers = bytes;
  put_u32(more_layers, 12, 5);
  bad.push_back({"header says 5 layers", with_checksum(more_layers), "truncated"});
  for (const Bad& b : bad) {
    INFO(b.name);
    write_file(path, b.bytes);
    REQUIRE_THROWS_AS(ChannelProjections::load(path), kvpack::error);
    REQUIRE_THROWS_WITH(
        ChannelProjections::load(path),
        Contains("ChannelProjections::load('" + path + "')") && Contains(b.message));
  }
  std::remove(path.c_str());
  REQUIRE_THROWS_WITH(ChannelProjections::load(path), Contains("cannot read"));
}
