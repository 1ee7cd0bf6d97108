// Low-rank policies: CrossLayerSVD (xKV) and ChannelShrink (CSKV) against exact references.
#include <Eigen/SVD>
#include <algorithm>
#include <catch2/catch.hpp>
#include <cstdio>
#include <fstream>
#include <kvpack/kvpack.hpp>

#include "low_rank_util.hpp"
#include "test_util.hpp"

using Catch::Matchers::Contains;
using kvpack::ActivationView;
using kvpack::ChannelProjections;
using kvpack::ChannelShrink;
using kvpack::CrossLayerSVD;
using kvpack::ModelShape;
using kvpack_test::RowMat;

using kvpack_test::fill_low_rank;
using kvpack_test::held_pre_rope_keys;
using kvpack_test::kLowRankShape;
using kvpack_test::optimal_error;

TEST_CASE("CrossLayerSVD: stacked keys reach the Eckart-Young error of their group",
          "[lowrank][xkv]") {
  for (int group : {1, 2, 4}) {
    const int rank = 10 * group;
    kvpack::KVCache<CrossLayerSVD> cache(kLowRankShape, CrossLayerSVD(group, rank, rank));
    const auto pre = fill_low_rank(cache, 300, 3);
    cache.compress();
    for (int l0 = 0; l0 < 4; l0 += group) {
      RowMat stacked(300, group * 64), held(300, group * 64);
      for (int l = l0; l < l0 + group; ++l) {
        stacked.middleCols((l - l0) * 64, 64) = pre[l].leftCols(64);
        held.middleCols((l - l0) * 64, 64) = held_pre_rope_keys(cache, l);
      }
      const double err = (stacked - held).norm();
      const double opt = optimal_error(stacked, rank);
      INFO("group " << group << " layers " << l0 << " err " << err << " optimal " << opt);
      // fp16 storage of the basis adds ~1e-3 relative noise on top of the optimum.
      REQUIRE(err <= 1.02 * opt + 2e-3 * stacked.norm());
    }
  }
}

TEST_CASE("CrossLayerSVD: full rank is exact, decode tokens stay exact, bytes are counted",
          "[lowrank][xkv]") {
  kvpack::KVCache<CrossLayerSVD> cache(kLowRankShape, CrossLayerSVD(2, 128, 128));
  const auto pre = fill_low_rank(cache, 200, 5);
  const std::size_t empty =
      kvpack::KVCache<CrossLayerSVD>(kLowRankShape, CrossLayerSVD(2, 128, 128)).bytes();
  cache.compress();
  for (int l = 0; l < 4; ++l) {
    const RowMat held = held_pre_rope_keys(cache, l);
    REQUIRE((held - pre[l].leftCols(64)).norm() <= 2e-3 * pre[l].leftCols(64).norm());
  }
  // Bytes: per group and side a 200 x 128 fp16 basis in pages of the pool; per (layer, head,
  // side) B 128 x 32 fp32; positions; plus the fixed bookkeeping of the empty cache.
  const std::size_t page = cache.page_pool()->page_bytes();
  REQUIRE(page == 2 * 16 * 32 * 2);  // a dense fp16 page of 16 tokens
  const std::size_t expected = 2 * 2 * kvpack_test::basis_bytes(page, 200, 128) +
                               4 * 2 * 2 * (128 * 32 * 4) + 4 * 2 * 200 * 4;
  REQUIRE(cache.bytes() - empty == expected);
  // A decode token appended after compression is held exactly (fp16).
  const auto k = kvpack_test::random_values(64, 9), v = kvpack_test::random_values(64, 10);
  for (int l = 0; l < 4; ++l) {
    cache.append(l, ActivationView::nhd(k.data(), 1, 2, 32),
                 ActivationView::nhd(v.data(), 1, 2, 32), std::vector<int64_t>{200});
  }
  const auto dense = cache.materialize(3);
  for (int i = 0; i < 32; ++i) {
    REQUIRE(dense.heads[1].v[200 * 32 + i] == kvpack::to_float(kvpack::to_half(v[32 + i])));
  }
}

TEST_CASE("CrossLayerSVD: attention on factors equals attention on their reconstruction",
          "[lowrank][xkv][attention]") {
  kvpack::KVCache<CrossLayerSVD> cache(kLowRankShape, CrossLayerSVD::with_ratio(4, 4.0));
  fill_low_rank(cache, 400, 7);
  cache.compress();
  INFO("ratio " << double(cache.dense_bytes()) / cache.bytes());
  REQUIRE(double(cache.dense_bytes()) / cache.bytes() > 3.0);
  const auto dense = cache.materialize(2);
  const auto q = kvpack_test::random_values(2 * 6 * 32, 8);
  const std::vector<int64_t> qpos{150, 399};
  std::vector<float> out(q.size());
  cache.attend(2, ActivationView::nhd(q.data(), 2, 6, 32), qpos,
               kvpack::OutputView::nhd(out.data(), 2, 6, 32));
  for (int t = 0; t < 2; ++t) {
    for (int h = 0; h < 6; ++h) {
      const auto& head = dense.heads[h / 3];
      const auto ref = kvpack_test::reference_attention(q.data() + (t * 6 + h) * 32, head.k, head.v,
                                                        head.positions, qpos[t], 32);
      REQUIRE(kvpack_test::max_relative_row_error(out.data() + (t * 6 + h) * 32, ref) < 1e-5);
    }
  }
}

TEST_CASE(
    "CrossLayerSVD: a group size that does not divide the layers leaves a smaller last "
    "group",
    "[lowrank][xkv]") {
  const ModelShape five{5, 6, 2, 32, {}};
  kvpack::KVCache<CrossLayerSVD> cache(five, CrossLayerSVD(2, 64, 64));
  fill_low_rank(cache, 100, 11);
  cache.compress();  // groups {0,1}, {2,3}, {4}: the last one at rank min(64, 64 columns)
  REQUIRE(cache.tokens(4, 1) == 100);
}

TEST_CASE("CrossLayerSVD: bad knobs are refused", "[lowrank][errors]") {
  using Cache = kvpack::KVCache<CrossLayerSVD>;
  REQUIRE_THROWS_WITH(Cache(kLowRankShape, CrossLayerSVD(0, 8, 8)), Contains("group_layers = 0"));
  REQUIRE_THROWS_WITH(Cache(kLowRankShape, CrossLayerSVD(5, 8, 8)), Contains("group_layers = 5"));
  REQUIRE_THROWS_WITH(Cache(kLowRankShape, CrossLayerSVD(1, 65, 8)), Contains("rank_k = 65"));
  REQUIRE_THROWS_WITH(Cache(kLowRankShape, CrossLayerSVD(1, -1, 8)), Contains("rank_k = -1"));
  REQUIRE_THROWS_WITH(Cache(kLowRankShape, CrossLayerSVD(1, 8, 0)), Contains("both set"));
  REQUIRE_THROWS_WITH(Cache(kLowRankShape, CrossLayerSVD::with_ratio(2, 0.5)),
                      Contains("target_ratio"));
}

TEST_CASE("ChannelShrink: calibrated PCA projections, exact window, file round trip",
          "[lowrank][cskv]") {
  // Calibrate on one sample, compress another drawn from the same subspace.
  kvpack::KVCache<kvpack::Identity> calib(kLowRankShape);
  const auto pre = fill_low_rank(calib, 500, 21);
  std::vector<std::vector<float>> keys, values;
  for (int l = 0; l < 4; ++l) {
    RowMat k = pre[l].leftCols(64), v = pre[l].rightCols(64);
    keys.emplace_back(k.data(), k.data() + k.size());
    values.emplace_back(v.data(), v.data() + v.size());
  }
  const auto proj = ChannelProjections::calibrate(keys, values, 2, 32, 12, 16);
  const std::string path = "kvpack_test_projections.bin";
  proj.save(path);
  const auto loaded = ChannelProjections::load(path);
  REQUIRE(loaded.pk == proj.pk);
  REQUIRE(loaded.pv == proj.pv);

  auto shared = std::make_shared<const ChannelProjections>(loaded);
  kvpack::KVCache<ChannelShrink> cache(kLowRankShape, ChannelShrink(shared, 32));
  const auto truth = fill_low_rank(cache, 300, 21);  // same latent basis seed: same subspace
  const auto before = cache.materialize(1);
  cache.compress();
  const auto after = cache.materialize(1);
  // The newest 32 tokens are untouched; older ones are (K P) Pᵀ.
  for (int h = 0; h < 2; ++h) {
    for (int64_t i = 268 * 32; i < 300 * 32; ++i)
      REQUIRE(after.heads[h].v[i] == before.heads[h].v[i]);
  }
  const RowMat held = held_pre_rope_keys(cache, 1);
  const Eigen::Map<const RowMat> p(proj.pk[1].data(), 64, 12);
  const RowMat k = truth[1].leftCols(64);
  const RowMat expected = k.topRows(268) * p * p.transpose();
  REQUIRE((held.topRows(268) - expected).norm() <= 2e-3 * expected.norm());
  REQUIRE(double(cache.dense_bytes()) / cache.bytes() > 1.8);

  // Corrupted, truncated and foreign files are refused.
  std::vector<char> bytes;
  {
    std::ifstream in(path, std::ios::binary);
    bytes.assign(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
  }
  auto write = [&](const std::vector<char>& b) {
    std::ofstream out(path, std::ios::binary | std::ios::trunc);
    out.write(b.data(), static_cast<std::streamsize>(b.size()));
  };
  auto flipped = bytes;
  flipped[100] ^= 0x40;
  write(flipped);
  REQUIRE_THROWS_WITH(ChannelProjections::load(path), Contains("checksum"));
  write(std::vector<char>(bytes.begin(), bytes.begin() + 500));
  REQUIRE_THROWS_WITH(ChannelProjections::load(path), Contains("checksum"));
  auto foreign = bytes;
  foreign[0] = 'X';
  write(foreign);
  REQUIRE_THROWS_WITH(ChannelProjections::load(path), Contains("magic"));
  std::remove(path.c_str());
  REQUIRE_THROWS_WITH(ChannelProjections::load(path), Contains("cannot read"));

  // Projections of another shape, or none, are refused when the cache is built.
  const ModelShape other{4, 6, 3, 32, {}};
  REQUIRE_THROWS_WITH(kvpack::KVCache<ChannelShrink>(other, ChannelShrink(shared)),
                      Contains("projections shape"));
  REQUIRE_THROWS_WITH(kvpack::KVCache<ChannelShrink>(kLowRankShape, ChannelShrink()),
                      Contains("projections"));
}

TEST_CASE("Low-rank bases live in pages of the cache's pool and go back to it",
          "[lowrank][pages]") {
  using Cache = kvpack::KVCache<CrossLayerSVD>;
  const std::size_t page = Cache::page_bytes(kLowRankShape, CrossLayerSVD(2, 20, 30), 16);
  // The page of a dense fp16 cache of the same page_tokens and head_dim: both share one pool.
  REQUIRE(page == kvpack::KVCache<kvpack::Identity>::page_bytes(kLowRankShape, {}, 16));
  auto pool = std::make_shared<kvpack::PagePool>(page, 8);
  const kvpack::PageOptions shared{16, pool};
  kvpack::KVCache<kvpack::Identity> dense(kLowRankShape, {}, shared);
  fill_low_rank(dense, 100, 3);
  const std::size_t dense_pages = pool->pages_in_use();
  REQUIRE(dense_pages == 4 * 2 * 7);  // 100 tokens in 16-token pages, per (layer, head)

  Cache cache(kLowRankShape, CrossLayerSVD(2, 20, 30), shared);
  REQUIRE(cache.page_pool() == pool);
  fill_low_rank(cache, 300, 5);
  REQUIRE(pool->pages_in_use() == dense_pages);  // the exact tail is not paged
  cache.compress();
  // Two groups, keys at rank 20 and values at rank 30 over 300 tokens: fp16, page / 2 values a
  // page.
  const int64_t per_page = static_cast<int64_t>(page / 2);
  const int64_t basis_pages =
      2 * ((300 * 20 + per_page - 1) / per_page + (300 * 30 + per_page - 1) / per_page);
  REQUIRE(pool->pages_in_use() == dense_pages + static_cast<std::size_t>(basis_pages));
  const auto f = cache.low_rank_factors(3, 1);
  REQUIRE(f.key_basis.pages + f.value_basis.pages == basis_pages / 2);
  std::vector<int32_t> ids(f.key_basis.page_ids, f.key_basis.page_ids + f.key_basis.pages);
  ids.insert(ids.end(), f.value_basis.page_ids, f.value_basis.page_ids + f.value_basis.pages);
  std::sort(ids.begin(), ids.end());
  REQUIRE(std::adjacent_find(ids.begin(), ids.end()) == ids.end());  // no page held twice

  // A copy (a fork of the sequence) shares the immutable bases: no page taken.
  {
    const Cache fork = cache;
    REQUIRE(pool->pages_in_use() == dense_pages + static_cast<std::size_t>(basis_pages));
    REQUIRE(kvpack_test::snapshot(fork) == kvpack_test::snapshot(cache));
  }
  // A second compress replaces the bases: the old ones' pages go back to the pool.
  kvpack_test::append_decode_tokens(cache, 300, 20, 6);
  cache.compress();
  const int64_t grown =
      2 * ((320 * 20 + per_page - 1) / per_page + (320 * 30 + per_page - 1) / per_page);
  REQUIRE(pool->pages_in_use() == dense_pages + static_cast<std::size_t>(grown));
  // truncate() into the factored part keeps the bases (shared, immutable), and the state saves
  // and loads: the basis holds more rows than the factored tokens.
  cache.truncate(249);
  REQUIRE(cache.low_rank_factors(0, 0).factored == 250);
  REQUIRE(cache.low_rank_factors(0, 0).key_basis.tokens == 320);
  const std::string path = kvpack_test::temp_path("low_rank_pages");
  cache.save(path);
  Cache loaded(kLowRankShape, CrossLayerSVD(2, 20, 30), shared);
  loaded.load(path);
  std::remove(path.c_str());
  REQUIRE(kvpack_test::snapshot(loaded) == kvpack_test::snapshot(cache));
  REQUIRE(pool->pages_in_use() == dense_pages + 2 * static_cast<std::size_t>(grown));
  cache.clear();
  loaded.clear();
  REQUIRE(pool->pages_in_use() == dense_pages);
}

TEST_CASE("Low-rank compress() that the pool cannot hold changes nothing", "[lowrank][errors]") {
  using Cache = kvpack::KVCache<CrossLayerSVD>;
  const std::size_t page = Cache::page_bytes(kLowRankShape, CrossLayerSVD(2, 20, 30), 16);
  // Caller memory for 20 pages: the four bases of 300 tokens need 2 × (6 + 9) = 30.
  std::vector<std::byte> memory(20 * page + 64);
  void* aligned = memory.data();
  std::size_t space = memory.size();
  REQUIRE(std::align(64, 20 * page, aligned, space) != nullptr);
  auto pool = std::make_shared<kvpack::PagePool>(aligned, 20 * page, page);
  Cache cache(kLowRankShape, CrossLayerSVD(2, 20, 30), kvpack::PageOptions{16, pool});
  fill_low_rank(cache, 300, 5);
  const auto before = kvpack_test::snapshot(cache);
  REQUIRE_THROWS_AS(cache.compress(), kvpack::error);
  REQUIRE(kvpack_test::snapshot(cache) == before);
  REQUIRE(pool->pages_in_use() == 0);
  REQUIRE(cache.low_rank_factors(0, 0).factored == 0);
}

TEST_CASE("Low-rank batch: bases a fork shares are counted once", "[lowrank][pages][batch]") {
  kvpack::KVCacheBatch<CrossLayerSVD> batch(kLowRankShape, CrossLayerSVD(2, 20, 30));
  auto& first = batch.add(0);
  fill_low_rank(first, 300, 5);
  first.compress();
  batch.fork(0, 1);
  auto& fork = batch.sequence(1);
  // The fork's bases are its source's: four of them (two groups, keys and values).
  const std::size_t page = batch.page_pool()->page_bytes();
  std::size_t shared = 0;
  std::vector<const int32_t*> seen;
  for (int l = 0; l < kLowRankShape.layers; ++l) {
    for (int h = 0; h < kLowRankShape.kv_heads; ++h) {
      const auto f = fork.low_rank_factors(l, h);
      REQUIRE(f.key_basis.page_ids == batch.sequence(0).low_rank_factors(l, h).key_basis.page_ids);
      for (const auto& b : {f.key_basis, f.value_basis}) {
        if (std::find(seen.begin(), seen.end(), b.page_ids) != seen.end()) continue;
        seen.push_back(b.page_ids);
        shared += kvpack_test::basis_bytes(page, b.tokens, b.rank, b.bits, b.group);
      }
    }
  }
  REQUIRE(seen.size() == 4);
  auto table = [&] {  // what the batch counts beyond its sequences' own bytes()
    return static_cast<long long>(batch.bytes()) - static_cast<long long>(first.bytes()) -
           static_cast<long long>(fork.bytes());
  };
  auto table_reserved = [&] {  // and beyond the pool's free pages and bookkeeping
    const kvpack::PagePool& pool = *batch.page_pool();
    return static_cast<long long>(batch.reserved_bytes()) -
           static_cast<long long>(first.reserved_bytes()) -
           static_cast<long long>(fork.reserved_bytes()) -
           static_cast<long long>(pool.reserved_bytes() - pool.bytes_in_use());
  };
  const long long sharing = table(), sharing_reserved = table_reserved();
  fork.compress();  // the same tokens: bases of the same sizes, now the fork's own
  REQUIRE(fork.low_rank_factors(0, 0).key_basis.page_ids !=
          first.low_rank_factors(0, 0).key_basis.page_ids);
  REQUIRE(table() - sharing == static_cast<long long>(shared));
  REQUIRE(table_reserved() - sharing_reserved == static_cast<long long>(shared));
}
