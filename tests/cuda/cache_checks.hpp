// Helpers of the CUDA cache tests (tests/cuda/cache_test.cu, kivi_test.cu): seeded inputs fed
// to a CPU and a CUDA cache alike, and the checks that the two hold and compute the same.
#pragma once

#include <algorithm>
#include <catch2/catch.hpp>
#include <cmath>
#include <cstdint>
#include <kvpack/backend/cuda.hpp>
#include <kvpack/kvpack.hpp>
#include <random>
#include <string>
#include <vector>

#include "../cpu/test_util.hpp"

namespace cache_checks {

using kvpack::ActivationView;
using kvpack::BFloat16;
using kvpack::Half;
using kvpack::ModelShape;
using kvpack::OutputView;

using kvpack_test::random_values;  // seeded Gaussian values

/// Multiples of 1/8 in [-4, 4]: exact in fp16, bf16 and fp32, and their squares sum exactly in
/// fp32, so L2 scores are bit-identical on both backends (with or without FMA contraction) and
/// ties are frequent (the index tie-break is exercised).
inline std::vector<float> grid_values(std::size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_int_distribution<int> dist(-32, 32);
  std::vector<float> x(n);
  for (auto& v : x) v = static_cast<float>(dist(rng)) / 8.0f;
  return x;
}

template <class T>
std::vector<T> convert(const std::vector<float>& x);
template <>
inline std::vector<Half> convert<Half>(const std::vector<float>& x) {
  std::vector<Half> y(x.size());
  for (std::size_t i = 0; i < x.size(); ++i) y[i] = kvpack::to_half(x[i]);
  return y;
}
template <>
inline std::vector<BFloat16> convert<BFloat16>(const std::vector<float>& x) {
  std::vector<BFloat16> y(x.size());
  for (std::size_t i = 0; i < x.size(); ++i) y[i] = kvpack::to_bfloat16(x[i]);
  return y;
}

inline int64_t position_of(int64_t t) { return 3 + 2 * t; }  // gaps: positions are not indices

inline std::vector<int64_t> positions_range(int64_t t0, int64_t n) {
  std::vector<int64_t> p(n);
  for (int64_t i = 0; i < n; ++i) p[i] = position_of(t0 + i);
  return p;
}

/// Appends tokens [t0, t0 + n) of `layer` to every cache, in the given layout and dtype.
/// `keys_on_grid` makes keys grid_values (exact L2 scores). Layouts: 0 = NHD fp32,
/// 1 = HND fp16 with padding, 2 = NHD bf16.
template <class... Caches>
inline void feed(const ModelShape& s, int layer, int64_t t0, int64_t n, int layout,
                 bool keys_on_grid, Caches&... caches) {
  const int64_t heads = s.kv_heads, d = s.head_dim;
  const uint32_t seed = static_cast<uint32_t>(1000 * layer + t0 + 17);
  const std::size_t count = static_cast<std::size_t>(n * heads * d);
  const auto pos = positions_range(t0, n);
  if (layout == 1) {
    // Heads-first with padded rows: element (t, h, i) at h * hs + t * ts + i.
    const int64_t ts = d + 8, hs = n * ts + 16;
    std::vector<float> k(static_cast<std::size_t>(heads * hs), 0.0f), v(k.size(), 0.0f);
    const auto kk = keys_on_grid ? grid_values(count, seed) : random_values(count, seed);
    const auto vv = random_values(count, seed + 1);
    for (int64_t t = 0; t < n; ++t) {
      for (int64_t h = 0; h < heads; ++h) {
        for (int64_t i = 0; i < d; ++i) {
          k[h * hs + t * ts + i] = kk[(t * heads + h) * d + i];
          v[h * hs + t * ts + i] = vv[(t * heads + h) * d + i];
        }
      }
    }
    const auto k16 = convert<Half>(k), v16 = convert<Half>(v);
    (caches.append(layer, ActivationView(k16.data(), n, heads, d, ts, hs),
                   ActivationView(v16.data(), n, heads, d, ts, hs), pos),
     ...);
    return;
  }
  const auto k = keys_on_grid ? grid_values(count, seed) : random_values(count, seed);
  const auto v = random_values(count, seed + 1);
  if (layout == 0) {
    (caches.append(layer, ActivationView::nhd(k.data(), n, heads, d),
                   ActivationView::nhd(v.data(), n, heads, d), pos),
     ...);
  } else {
    const auto kb = convert<BFloat16>(k), vb = convert<BFloat16>(v);
    (caches.append(layer, ActivationView::nhd(kb.data(), n, heads, d),
                   ActivationView::nhd(vb.data(), n, heads, d), pos),
     ...);
  }
}

/// Prefill in two chunks (NHD fp32, padded HND fp16), then `decode` one-token bf16 appends, on
/// every layer.
template <class... Caches>
inline void feed_sequence(const ModelShape& s, int64_t prefill, int64_t decode, bool keys_on_grid,
                          Caches&... caches) {
  const int64_t first = prefill * 3 / 5;
  for (int l = 0; l < s.layers; ++l) {
    feed(s, l, 0, first, 0, keys_on_grid, caches...);
    feed(s, l, first, prefill - first, 1, keys_on_grid, caches...);
    for (int64_t t = prefill; t < prefill + decode; ++t)
      feed(s, l, t, 1, 2, keys_on_grid, caches...);
  }
}

/// What the CUDA cache holds: per held token its K and V rows, one int32 position and, for
/// policies scored by observed queries or hidden states, one fp32 score; plus the bookkeeping it
/// counts at the CPU cache's per-head and per-layer sizes (LazyLayerDrop: one statistic per layer).
/// (The CPU cache holds whole pages and page tables, so its bytes() is larger: the CUDA storage is
/// not paged.)
template <class CudaCache>
inline std::size_t held_bytes(const CudaCache& gpu) {
  using Storage = typename CudaCache::storage_type;
  using Policy = std::decay_t<decltype(gpu.policy())>;
  constexpr std::size_t score = kvpack::cuda::is_query_scored_policy<Policy>::value ||
                                        kvpack::cuda::is_hidden_scored_policy<Policy>::value
                                    ? 4
                                    : 0;
  const ModelShape& s = gpu.shape();
  constexpr std::size_t observation = kvpack::cuda::is_lazy_layer_policy<Policy>::value
                                          ? sizeof(kvpack::detail::LayerObservation)
                                          : 0;
  std::size_t total =
      static_cast<std::size_t>(s.layers) * s.kv_heads * sizeof(kvpack::detail::HeadStore<Storage>) +
      static_cast<std::size_t>(s.layers) * (sizeof(kvpack::detail::LayerState) + observation);
  for (int l = 0; l < s.layers; ++l) {
    for (int h = 0; h < s.kv_heads; ++h) {
      total +=
          static_cast<std::size_t>(gpu.tokens(l, h)) *
          (2 * static_cast<std::size_t>(s.head_dim) * sizeof(Storage) + sizeof(int32_t) + score);
    }
  }
  return total;
}

/// Both caches hold the same tokens, positions and values (bit for bit), the CUDA cache's
/// bytes() is `gpu_bytes`.
template <class CpuCache, class CudaCache>
inline void require_same_state(const CpuCache& cpu, const CudaCache& gpu, std::size_t gpu_bytes) {
  const ModelShape& s = cpu.shape();
  REQUIRE(gpu.bytes() == gpu_bytes);
  REQUIRE(gpu.dense_bytes() == cpu.dense_bytes());
  for (int l = 0; l < s.layers; ++l) {
    REQUIRE(gpu.appended(l) == cpu.appended(l));
    const auto a = gpu.materialize(l);
    const auto b = cpu.materialize(l);
    for (int h = 0; h < s.kv_heads; ++h) {
      INFO("layer " << l << " head " << h);
      REQUIRE(gpu.tokens(l, h) == cpu.tokens(l, h));
      REQUIRE(a.heads[h].positions == b.heads[h].positions);  // the kept set, in order
      REQUIRE(a.heads[h].k == b.heads[h].k);                  // bit-identical storage
      REQUIRE(a.heads[h].v == b.heads[h].v);
    }
  }
}

/// require_same_state for caches of rows: the CUDA cache's bytes() is held_bytes().
template <class CpuCache, class CudaCache>
inline void require_same_state(const CpuCache& cpu, const CudaCache& gpu) {
  require_same_state(cpu, gpu, held_bytes(gpu));
}

/// ‖a − b‖ / ‖b‖ (‖a − b‖ when b is zero).
inline double normalised_error(const std::vector<float>& a, const std::vector<float>& b) {
  double num = 0, den = 0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    num += (static_cast<double>(a[i]) - b[i]) * (static_cast<double>(a[i]) - b[i]);
    den += static_cast<double>(b[i]) * b[i];
  }
  return den == 0 ? std::sqrt(num) : std::sqrt(num / den);
}

template <class F>
inline std::string error_of(F&& call) {
  try {
    call();
  } catch (const kvpack::error& e) {
    return e.what();
  } catch (const std::exception& e) {
    return std::string("not a kvpack::error: ") + e.what();
  }
  return "<no error>";
}

/// Attention of `qpos.size()` random query tokens on both caches: same error, or outputs within
/// a normalised error of `tolerance`. Returns whether outputs were compared.
template <class CpuCache, class CudaCache>
inline bool require_same_attention(const CpuCache& cpu, const CudaCache& gpu, int layer,
                                   const std::vector<int64_t>& qpos, uint32_t seed,
                                   double tolerance = 1e-5) {
  const ModelShape& s = cpu.shape();
  const int64_t n = static_cast<int64_t>(qpos.size());
  const auto q = random_values(static_cast<std::size_t>(n * s.q_heads * s.head_dim), seed);
  const auto qv = ActivationView::nhd(q.data(), n, s.q_heads, s.head_dim);
  std::vector<float> a(q.size(), -7.0f), b(q.size(), 7.0f);
  const std::string ea = error_of(
      [&] { gpu.attend(layer, qv, qpos, OutputView::nhd(a.data(), n, s.q_heads, s.head_dim)); });
  const std::string eb = error_of(
      [&] { cpu.attend(layer, qv, qpos, OutputView::nhd(b.data(), n, s.q_heads, s.head_dim)); });
  REQUIRE(ea == eb);
  if (eb != "<no error>") return false;
  INFO("layer " << layer << ", " << n << " query tokens");
  REQUIRE(normalised_error(a, b) < tolerance);
  return true;
}

/// Decode query at the last position, and a prefill-like block of query tokens at random
/// positions (causal masks differ per row).
template <class CpuCache, class CudaCache>
inline void require_same_attention_everywhere(const CpuCache& cpu, const CudaCache& gpu,
                                              uint32_t seed, double tolerance = 1e-5) {
  const ModelShape& s = cpu.shape();
  std::mt19937 rng(seed);
  for (int l = 0; l < s.layers; ++l) {
    const int64_t appended = cpu.appended(l);
    if (appended == 0) continue;
    const int64_t last = position_of(appended - 1);
    require_same_attention(cpu, gpu, l, {last}, seed + l, tolerance);
    std::vector<int64_t> block(37);
    for (auto& p : block) p = position_of(static_cast<int64_t>(rng() % appended)) - (rng() & 1);
    for (auto& p : block) p = std::max<int64_t>(p, position_of(0));
    block.back() = last;
    require_same_attention(cpu, gpu, l, block, seed + 100 + l, tolerance);
  }
}

/// One-token bf16 decode appends at positions position_of([t0, t1)) on every layer.
template <class... Caches>
inline void decode_tokens(const ModelShape& s, int64_t t0, int64_t t1, bool keys_on_grid,
                          Caches&... caches) {
  for (int l = 0; l < s.layers; ++l) {
    for (int64_t t = t0; t < t1; ++t) feed(s, l, t, 1, 2, keys_on_grid, caches...);
  }
}

/// compress() on both caches, then the same state and the same attention everywhere.
template <class CpuCache, class CudaCache>
inline void compress_and_compare(CpuCache& cpu, CudaCache& gpu, uint32_t seed) {
  cpu.compress();
  gpu.compress();
  require_same_state(cpu, gpu);
  require_same_attention_everywhere(cpu, gpu, seed);
}

inline const std::vector<ModelShape> kShapes{
    {3, 4, 4, 64, {}},    // GQA group 1
    {3, 6, 2, 128, {}},   // group 3
    {3, 16, 2, 64, {}},   // group 8
    {2, 24, 3, 128, {}},  // group 8, head_dim 128
};

}  // namespace cache_checks
