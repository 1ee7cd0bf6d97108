/// \file bench/baseline_bench.cpp
/// \brief Memory-bandwidth baselines that the kvpack benchmarks are compared with: memcpy of a
/// buffer 8× the L3 (bytes read + written per second) and a read-only sum (bytes read per
/// second), on 1 and 2 threads.

#include <benchmark/benchmark.h>

#include "bench_util.hpp"

namespace kvpack_bench {
namespace {

void BM_MemoryCopy(benchmark::State& state) {
  const int threads = static_cast<int>(state.range(0));
  Buffer src(kBaselineBytes), dst(kBaselineBytes);
  for (auto _ : state) {
    parallel_copy(dst.data(), src.data(), kBaselineBytes, threads);
    benchmark::ClobberMemory();
  }
  add_bytes_per_second(state, 2.0 * kBaselineBytes);
}
BENCHMARK(BM_MemoryCopy)
    ->ArgName("threads")
    ->Arg(1)
    ->Arg(2)
    ->UseRealTime()
    ->Unit(benchmark::kMillisecond);

void BM_MemoryReadSum(benchmark::State& state) {
  const int threads = static_cast<int>(state.range(0));
  Buffer src(kBaselineBytes);
  for (auto _ : state) benchmark::DoNotOptimize(parallel_sum(src, threads));
  add_bytes_per_second(state, 1.0 * kBaselineBytes);
}
BENCHMARK(BM_MemoryReadSum)
    ->ArgName("threads")
    ->Arg(1)
    ->Arg(2)
    ->UseRealTime()
    ->Unit(benchmark::kMillisecond);

}  // namespace
}  // namespace kvpack_bench
