/// \file bench/gemm_bench.cpp
/// \brief The fp32 GEMM rate of Eigen on this machine, the yardstick for the reference model's
/// prefill: a 512-token chunk through the MLP up-projection of SmolLM2-135M,
/// (512 × 576) · (576 × 1536), on 1 and 2 threads (Eigen's OpenMP parallel GEMM).

#include <benchmark/benchmark.h>

#include <Eigen/Core>

namespace kvpack_bench {
namespace {

void BM_EigenGemm(benchmark::State& state) {
  const int threads = static_cast<int>(state.range(0));
  const Eigen::Index m = state.range(1), k = state.range(2), n = state.range(3);
  using RowMat = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  const RowMat a = RowMat::Random(m, k), b = RowMat::Random(k, n);
  RowMat c(m, n);
  const int previous = Eigen::nbThreads();
  Eigen::setNbThreads(threads);
  for (auto _ : state) {
    c.noalias() = a * b;
    benchmark::DoNotOptimize(c.data());
    benchmark::ClobberMemory();
  }
  Eigen::setNbThreads(previous);
  state.counters["flop_per_second"] = benchmark::Counter(
      2.0 * static_cast<double>(m) * k * n, benchmark::Counter::kIsIterationInvariantRate);
}
BENCHMARK(BM_EigenGemm)
    ->ArgNames({"threads", "m", "k", "n"})
    ->Args({1, 512, 576, 1536})
    ->Args({2, 512, 576, 1536})
    ->UseRealTime()
    ->Unit(benchmark::kMillisecond);

}  // namespace
}  // namespace kvpack_bench
