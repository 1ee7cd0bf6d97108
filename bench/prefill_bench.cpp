/// \file bench/prefill_bench.cpp
/// \brief Prefill attention: a chunk of 256 query tokens (9 heads) attends causally over a cache
/// that already holds the chunk, 2 K or 8 K tokens in all (fp16 storage, reference-model shape).
/// FLOP/s counts 4 · q_heads · head_dim per visible (query token, key) pair: the score and the
/// value products, each a multiply-add. fraction_of_gemm divides by the rate of an Eigen fp32
/// GEMM of the model's MLP shape (512 × 576 · 576 × 1536) measured once in this process with
/// Eigen's current thread count: prefill attention is judged against what the dense layers reach.

#include <benchmark/benchmark.h>

#include <Eigen/Core>
#include <algorithm>
#include <vector>

#include "bench_util.hpp"

namespace kvpack_bench {
namespace {

constexpr int64_t kChunk = 256;

/// FLOP/s of Eigen's fp32 GEMM on the model's MLP shape: median of passes over ~0.3 s.
double gemm_flop_per_second() {
  static const double rate = [] {
    using RowMat = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
    const RowMat a = RowMat::Random(512, 576), b = RowMat::Random(576, 1536);
    RowMat c(512, 1536);
    std::vector<double> rates;
    const double start = now_seconds();
    while (rates.size() < 3 || (now_seconds() - start < 0.3 && rates.size() < 64)) {
      const double t0 = now_seconds();
      c.noalias() = a * b;
      benchmark::DoNotOptimize(c.data());
      rates.push_back(2.0 * 512 * 576 * 1536 / (now_seconds() - t0));
    }
    std::nth_element(rates.begin(), rates.begin() + rates.size() / 2, rates.end());
    return rates[rates.size() / 2];
  }();
  return rate;
}

template <class Policy>
void BM_AttendPrefill(benchmark::State& state) {
  const int64_t cached = state.range(0);
  kvpack::KVCache<Policy> cache(model_shape());
  fill_layer(cache, 0, kv_data(cached), cached);
  const std::vector<float> q = query_data(kChunk);
  std::vector<int64_t> positions(kChunk);
  double visible_pairs = 0.0;
  for (int64_t t = 0; t < kChunk; ++t) {
    positions[t] = cached - kChunk + t;
    visible_pairs += static_cast<double>(positions[t] + 1);
  }
  std::vector<float> out(static_cast<std::size_t>(kChunk) * kQHeads * kHeadDim);
  const auto q_view = kvpack::ActivationView::nhd(q.data(), kChunk, kQHeads, kHeadDim);
  const auto out_view = kvpack::OutputView::nhd(out.data(), kChunk, kQHeads, kHeadDim);
  for (auto _ : state) {
    cache.attend(0, q_view, positions, out_view);
    benchmark::ClobberMemory();
  }
  const double flop = 4.0 * kQHeads * kHeadDim * visible_pairs;
  state.counters["flop_per_second"] =
      benchmark::Counter(flop, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["fraction_of_gemm"] = benchmark::Counter(
      flop / gemm_flop_per_second(), benchmark::Counter::kIsIterationInvariantRate);
}
BENCHMARK_TEMPLATE(BM_AttendPrefill, kvpack::Identity)
    ->ArgName("cached")
    ->Arg(2048)
    ->Arg(8192)
    ->UseRealTime()
    ->Unit(benchmark::kMillisecond);
BENCHMARK_TEMPLATE(BM_AttendPrefill, kvpack::IdentityF32)
    ->ArgName("cached")
    ->Arg(2048)
    ->Arg(8192)
    ->UseRealTime()
    ->Unit(benchmark::kMillisecond);

}  // namespace
}  // namespace kvpack_bench
