/// \file bench/prefill_bench.cpp
/// \brief Prefill attention: a chunk of 256 query tokens (9 heads) attends causally over a cache
/// that already holds the chunk, 2 K or 8 K tokens in all (fp16 storage, reference-model shape).
/// FLOP/s counts 4 · q_heads · head_dim per visible (query token, key) pair: the score and the
/// value products, each a multiply-add.

#include <benchmark/benchmark.h>

#include <vector>

#include "bench_util.hpp"

namespace kvpack_bench {
namespace {

constexpr int64_t kChunk = 256;

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
  state.counters["flop_per_second"] = benchmark::Counter(
      4.0 * kQHeads * kHeadDim * visible_pairs, benchmark::Counter::kIsIterationInvariantRate);
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
