// Shared helpers of the low-rank policy tests (CrossLayerSVD, ChannelShrink): K/V with a
// low-rank structure shared across layers, the pre-RoPE keys a cache holds, the Eckart–Young
// optimum, and a snapshot of everything observable about a cache.
#pragma once

#include <Eigen/SVD>
#include <cmath>
#include <cstdint>
#include <kvpack/kvpack.hpp>
#include <memory>
#include <vector>

#include "test_util.hpp"

namespace kvpack_test {

using RowMat = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

/// 4 layers, 6 query heads, 2 kv heads, head_dim 32, half-split RoPE.
inline const kvpack::ModelShape kLowRankShape{
    4, 6, 2, 32, {kvpack::RopeStyle::kHalfSplit, 10000.0}};

/// Keys/values with a decaying spectrum shared across layers (as real caches have), appended
/// post-RoPE like an engine would at `positions` (one per token). Returns per layer the pre-RoPE
/// tokens × (K channels | V channels).
template <class Cache>
std::vector<RowMat> fill_low_rank(Cache& cache, const std::vector<int64_t>& positions,
                                  uint32_t seed) {
  const auto& s = cache.shape();
  const int64_t n = static_cast<int64_t>(positions.size());
  const int c = s.kv_heads * s.head_dim;
  const int latent = 12;
  const auto basis = random_values(n * latent, seed);
  std::vector<RowMat> pre_rope;
  const kvpack::Rope rope(s.rope, s.head_dim);
  for (int l = 0; l < s.layers; ++l) {
    const auto mix = random_values(latent * 2 * c, seed + 10 + l);
    const auto noise = random_values(n * 2 * c, seed + 50 + l, 0.05f);
    RowMat x = Eigen::Map<const RowMat>(basis.data(), n, latent) *
                   Eigen::Map<const RowMat>(mix.data(), latent, 2 * c) +
               Eigen::Map<const RowMat>(noise.data(), n, 2 * c);
    pre_rope.push_back(x);
    RowMat k = x.leftCols(c), v = x.rightCols(c);
    for (int64_t t = 0; t < n; ++t) {
      for (int h = 0; h < s.kv_heads; ++h) {
        rope.rotate(k.data() + t * c + h * s.head_dim, positions[t]);
      }
    }
    cache.append(l, kvpack::ActivationView::nhd(k.data(), n, s.kv_heads, s.head_dim),
                 kvpack::ActivationView::nhd(v.data(), n, s.kv_heads, s.head_dim), positions);
  }
  return pre_rope;
}

/// fill_low_rank at positions 0 .. n-1.
template <class Cache>
std::vector<RowMat> fill_low_rank(Cache& cache, int64_t n, uint32_t seed) {
  return fill_low_rank(cache, iota_positions(n), seed);
}

/// Pre-RoPE keys of one layer as the cache now holds them (tokens x channels).
template <class Cache>
RowMat held_pre_rope_keys(const Cache& cache, int layer) {
  const auto& s = cache.shape();
  const auto dense = cache.materialize(layer);
  const int64_t n = static_cast<int64_t>(dense.heads[0].positions.size());
  RowMat k(n, s.kv_heads * s.head_dim);
  const kvpack::Rope rope(s.rope, s.head_dim);
  for (int h = 0; h < s.kv_heads; ++h) {
    for (int64_t t = 0; t < n; ++t) {
      std::vector<float> row(dense.heads[h].k.begin() + t * s.head_dim,
                             dense.heads[h].k.begin() + (t + 1) * s.head_dim);
      rope.unrotate(row.data(), dense.heads[h].positions[t]);
      for (int i = 0; i < s.head_dim; ++i) k(t, h * s.head_dim + i) = row[i];
    }
  }
  return k;
}

/// Eckart–Young: the smallest ‖X − X_r‖_F over rank-r X_r (singular values only).
inline double optimal_error(const RowMat& x, int rank) {
  Eigen::BDCSVD<Eigen::MatrixXf> svd(x);
  double e = 0;
  for (Eigen::Index i = rank; i < svd.singularValues().size(); ++i) {
    e += double(svd.singularValues()(i)) * svd.singularValues()(i);
  }
  return std::sqrt(e);
}

/// Everything observable about a cache, to prove a failed call changed nothing.
template <class Cache>
std::vector<std::vector<float>> snapshot(const Cache& cache) {
  std::vector<std::vector<float>> s{
      {static_cast<float>(cache.bytes()), static_cast<float>(cache.dense_bytes())}};
  for (int l = 0; l < cache.shape().layers; ++l) {
    for (const auto& h : cache.materialize(l).heads) {
      s.push_back(h.k);
      s.push_back(h.v);
      s.emplace_back(h.positions.begin(), h.positions.end());
    }
  }
  return s;
}

/// Positions with gaps (as after an engine's own eviction or a skipped prompt) and a large
/// offset: RopeRun re-anchors at every jump and the angles are large.
inline std::vector<int64_t> gapped_positions(int64_t n) {
  std::vector<int64_t> p(n);
  int64_t at = 100000;
  for (int64_t t = 0; t < n; ++t) {
    p[t] = at;
    at += (t % 97 == 96) ? 13 : 1;
  }
  return p;
}

/// ChannelShrink projections at ranks (rk, rv), calibrated on `tokens` fill_low_rank tokens.
inline kvpack::ChannelProjections projections_for(const kvpack::ModelShape& shape, int rk, int rv,
                                                  int64_t tokens = 500, uint32_t seed = 21) {
  kvpack::KVCache<kvpack::Identity> calib(shape);
  const auto pre = fill_low_rank(calib, tokens, seed);
  const int c = shape.kv_heads * shape.head_dim;
  std::vector<std::vector<float>> keys, values;
  for (const RowMat& x : pre) {
    const RowMat k = x.leftCols(c), v = x.rightCols(c);
    keys.emplace_back(k.data(), k.data() + k.size());
    values.emplace_back(v.data(), v.data() + v.size());
  }
  return kvpack::ChannelProjections::calibrate(keys, values, shape.kv_heads, shape.head_dim, rk,
                                               rv);
}

/// projections_for on the seed-21 subspace, shared as ChannelShrink holds them.
inline std::shared_ptr<const kvpack::ChannelProjections> calibrated_projections(
    const kvpack::ModelShape& shape, int rk, int rv) {
  return std::make_shared<const kvpack::ChannelProjections>(projections_for(shape, rk, rv));
}

/// Bytes a token basis of `tokens` × `rank` holds in pages of `page_bytes`, by the layout of
/// docs/page_formats.md ("Low-rank bases in pages"): KIVI blocks (bits > 0: whole groups of rows,
/// one block per column) page_bytes / block_bytes to a page, then the fp16 rows page_bytes / 2
/// elements to a page; whole pages, a page-table entry (id, address) each, and the basis struct.
inline std::size_t basis_bytes(std::size_t page_bytes, int64_t tokens, int rank, int bits = 0,
                               int group = 32) {
  const int64_t quantized = bits == 0 ? 0 : tokens / group * group;
  const int64_t blocks = quantized / group * rank;
  const std::size_t block_bytes = 4 + static_cast<std::size_t>(group) * bits / 8;
  const int64_t per_page = bits == 0 ? 1 : static_cast<int64_t>(page_bytes / block_bytes);
  const int64_t halves = (tokens - quantized) * rank;
  const int64_t half_pages = static_cast<int64_t>(page_bytes / 2);
  const int64_t pages = (blocks + per_page - 1) / per_page + (halves + half_pages - 1) / half_pages;
  return static_cast<std::size_t>(pages) * (page_bytes + sizeof(int32_t) + sizeof(void*)) +
         sizeof(kvpack::detail::LowRankBasis);
}

}  // namespace kvpack_test
