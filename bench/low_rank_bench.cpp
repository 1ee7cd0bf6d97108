/// \file bench/low_rank_bench.cpp
/// \brief The low-rank policies on the reference-model shape (SmolLM2-135M: 3 kv heads, 9 query
/// heads, head_dim 64): decode attend on factors against a dense fp16 cache of the same tokens
/// (same process, same run), and compress() of a whole 30-layer cache against the model's
/// prefill of the same tokens.
///
/// BM_LowRankAttendDecode: one query token at the last position, layer 0 of a CrossLayerSVD
/// cache (G = 4 layers, target ratio 4, as kvpack-eval's xkv row) or of a ChannelShrink cache
/// (ranks of kvpack-eval's cskv row at ratio 4: r_k = 23, r_v = 68, window 32). Counters:
/// dense_us = the same attend on an Identity (fp16) cache, x_dense = time / dense_us,
/// ratio = dense_bytes / bytes, cpu_us = CPU time of the whole process per call (every thread;
/// on a loaded machine the wall time grows, this much less); rank_k, rank_v of layer 0, and
/// flop_per_second / fraction_of_gemm of the multiply-adds the attend must do (key rebuild,
/// scores, P·A) against an Eigen GEMM measured in this process.
///
/// BM_LowRankCompress: compress() of a 30-layer cache (every layer filled), timed once per
/// iteration on a fresh copy. fraction_of_prefill = time / (tokens / 280 tokens/s), the prefill
/// rate kvpack-eval measures for SmolLM2-135M on this 2-vCPU machine kind (2 threads; it is not
/// measured here: that needs the model). The project's target is ≤ 0.2. cpu_s: CPU time of every
/// thread; on an idle 2-core machine the wall time is about cpu_s / 2.
///
/// K/V are standard normal (full rank, flat spectrum): the worst case for accuracy, and the
/// rank and the time do not depend on the spectrum. Run e.g. with
/// OMP_WAIT_POLICY=passive --benchmark_filter=BM_LowRank.

#include <benchmark/benchmark.h>

#include <algorithm>
#include <cmath>
#include <ctime>
#include <memory>
#include <type_traits>
#include <vector>

#include "bench_util.hpp"

namespace kvpack_bench {
namespace {

constexpr int kGroupLayers = 4;
constexpr double kTargetRatio = 4.0;
constexpr int kModelLayers = 30;
/// kvpack-eval's measured prefill rate of SmolLM2-135M on this machine kind (tokens/s).
constexpr double kPrefillTokensPerSecond = 280.0;

/// ChannelShrink projections calibrated on the first 1024 tokens of kv_data, every layer alike,
/// at kvpack-eval's cskv ranks for ratio 4 on this shape.
std::shared_ptr<const kvpack::ChannelProjections> projections(int layers) {
  const KvData& data = kv_data(1024);
  const std::size_t n = static_cast<std::size_t>(1024) * kKvHeads * kHeadDim;
  std::vector<std::vector<float>> keys(layers,
                                       std::vector<float>(data.k.begin(), data.k.begin() + n));
  std::vector<std::vector<float>> values(layers,
                                         std::vector<float>(data.v.begin(), data.v.begin() + n));
  return std::make_shared<const kvpack::ChannelProjections>(
      kvpack::ChannelProjections::calibrate(keys, values, kKvHeads, kHeadDim, 23, 68));
}

template <class Policy>
Policy low_rank_policy(int layers);
template <>
kvpack::CrossLayerSVD low_rank_policy<kvpack::CrossLayerSVD>(int) {
  return kvpack::CrossLayerSVD::with_ratio(kGroupLayers, kTargetRatio);
}
template <>
kvpack::ChannelShrink low_rank_policy<kvpack::ChannelShrink>(int layers) {
  return kvpack::ChannelShrink(projections(layers), 32);
}

/// Layers a decode benchmark fills: one xKV group, or one layer.
template <class Policy>
constexpr int decode_layers() {
  return std::is_same_v<Policy, kvpack::CrossLayerSVD> ? kGroupLayers : 1;
}

/// Median seconds of `calls` timed calls of f.
template <class F>
double median_seconds(int calls, F&& f) {
  std::vector<double> t;
  for (int i = 0; i < calls; ++i) {
    const double t0 = now_seconds();
    f();
    t.push_back(now_seconds() - t0);
  }
  std::nth_element(t.begin(), t.begin() + t.size() / 2, t.end());
  return t[t.size() / 2];
}

template <class Policy>
void BM_LowRankAttendDecode(benchmark::State& state) {
  const int64_t tokens = state.range(0);
  const int layers = decode_layers<Policy>();
  const KvData& data = kv_data(tokens);
  kvpack::KVCache<Policy> cache(model_shape(layers), low_rank_policy<Policy>(layers));
  for (int l = 0; l < layers; ++l) fill_layer(cache, l, data, tokens);
  cache.compress();
  kvpack::KVCache<kvpack::Identity> dense(model_shape(1));
  fill_layer(dense, 0, data, tokens);

  const std::vector<float> q = query_data(1);
  const std::vector<int64_t> position{tokens - 1};
  std::vector<float> out(static_cast<std::size_t>(kQHeads) * kHeadDim);
  const auto q_view = kvpack::ActivationView::nhd(q.data(), 1, kQHeads, kHeadDim);
  const auto out_view = kvpack::OutputView::nhd(out.data(), 1, kQHeads, kHeadDim);
  const double dense_seconds = median_seconds(tokens > 8192 ? 21 : 101, [&] {
    dense.attend(0, q_view, position, out_view);
    benchmark::ClobberMemory();
  });
  double total = 0.0;
  const std::clock_t c0 = std::clock();
  for (auto _ : state) {
    const double t0 = now_seconds();
    cache.attend(0, q_view, position, out_view);
    benchmark::ClobberMemory();
    const double t = now_seconds() - t0;
    state.SetIterationTime(t);
    total += t;
  }
  const double iterations = static_cast<double>(state.iterations());
  state.counters["cpu_us"] =
      1e6 * static_cast<double>(std::clock() - c0) / CLOCKS_PER_SEC / iterations;
  state.counters["dense_us"] = dense_seconds * 1e6;
  state.counters["x_dense"] = total / iterations / dense_seconds;
  state.counters["ratio"] = static_cast<double>(cache.dense_bytes()) / cache.bytes();
  // What bounds it: rebuilding every factored key of the layer's kv heads (2 · r_k · kv_heads ·
  // head_dim FLOPs per token: RoPE comes after A·B, so B cannot move to the query side), the
  // scores (2 · q_heads · head_dim) and P·A for values (2 · q_heads · r_v), against the
  // process's Eigen GEMM rate.
  const kvpack::LowRankHeadFactors f = cache.low_rank_factors(0, 0);
  const double flop =
      2.0 * static_cast<double>(f.factored) *
      (f.key_basis.rank * kKvHeads * kHeadDim + kQHeads * kHeadDim + kQHeads * f.value_basis.rank);
  state.counters["rank_k"] = f.key_basis.rank;
  state.counters["rank_v"] = f.value_basis.rank;
  state.counters["flop_per_second"] = flop * iterations / total;
  state.counters["fraction_of_gemm"] = flop * iterations / total / mlp_gemm_flop_per_second();
}
BENCHMARK_TEMPLATE(BM_LowRankAttendDecode, kvpack::CrossLayerSVD)
    ->ArgName("tokens")
    ->Arg(2048)
    ->Arg(32768)
    ->UseManualTime()
    ->Unit(benchmark::kMicrosecond);
BENCHMARK_TEMPLATE(BM_LowRankAttendDecode, kvpack::ChannelShrink)
    ->ArgName("tokens")
    ->Arg(2048)
    ->Arg(32768)
    ->UseManualTime()
    ->Unit(benchmark::kMicrosecond);

template <class Policy>
void BM_LowRankCompress(benchmark::State& state) {
  const int64_t tokens = state.range(0);
  const KvData& data = kv_data(tokens);
  kvpack::KVCache<Policy> prepared(model_shape(kModelLayers),
                                   low_rank_policy<Policy>(kModelLayers));
  for (int l = 0; l < kModelLayers; ++l) fill_layer(prepared, l, data, tokens);
  double ratio = 0.0, total = 0.0, cpu = 0.0;
  for (auto _ : state) {
    auto cache = std::make_unique<kvpack::KVCache<Policy>>(prepared);
    const std::clock_t c0 = std::clock();
    const double t0 = now_seconds();
    cache->compress();
    const double t = now_seconds() - t0;
    cpu += static_cast<double>(std::clock() - c0) / CLOCKS_PER_SEC;
    state.SetIterationTime(t);
    total += t;
    ratio = static_cast<double>(cache->dense_bytes()) / cache->bytes();
  }
  const double prefill_seconds = static_cast<double>(tokens) / kPrefillTokensPerSecond;
  const double iterations = static_cast<double>(state.iterations());
  state.counters["fraction_of_prefill"] = total / iterations / prefill_seconds;
  state.counters["cpu_s"] = cpu / iterations;
  state.counters["ratio"] = ratio;
}
BENCHMARK_TEMPLATE(BM_LowRankCompress, kvpack::CrossLayerSVD)
    ->ArgName("tokens")
    ->Arg(2048)
    ->Arg(8192)
    ->UseManualTime()
    ->Iterations(1)
    ->Unit(benchmark::kMillisecond);
BENCHMARK_TEMPLATE(BM_LowRankCompress, kvpack::ChannelShrink)
    ->ArgName("tokens")
    ->Arg(2048)
    ->Arg(8192)
    ->UseManualTime()
    ->Iterations(1)
    ->Unit(benchmark::kMillisecond);

}  // namespace
}  // namespace kvpack_bench
