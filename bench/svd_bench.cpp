/// \file bench/svd_bench.cpp
/// \brief The three routes of kvpack::truncated_svd on the shapes the low-rank policies factor:
/// the reference model's keys (tokens × 192 for one layer of 3 heads × 64, × 768 for an xKV group
/// of G = 4 layers, × 960 for G = 5) at rank cols/4, and a Llama-3-8B-like xKV group
/// (8192 × 4096 at rank 1024; Gram and randomized only).
///
/// Counters: bytes_per_second = rows·cols·4 bytes of fp32 input per second; rel_error =
/// ‖X − U·S·Vᵀ‖_F / ‖X‖_F of the last factorisation (computed outside the timing, skipped for the
/// Llama shape where it alone would cost a 8192 × 4096 × 1024 double GEMM); opt_ratio = that error
/// over the Eckart–Young optimum from BDCSVD's full spectrum (reference-model shapes up to 2048
/// tokens only; BDCSVD of 8192 × 960 alone takes ~10 s here).
///
/// Input: keys-like data, a rank-64 signal with a decaying spectrum (0.93^i) plus dense noise
/// (std 0.01), so the spectrum flattens past rank ~64 like real K does past its outlier channels.
///
/// The Llama shape uses 8192 tokens, not 32768: at 32768 × 4096 one factorisation takes ~1.5 min
/// per route on one core here (the Gram matrix alone is 5.5e11 double flops), too long for a
/// benchmark run. Run with e.g. --benchmark_filter=BM_TruncatedSvd/.*cols:192
/// --benchmark_min_time=0.1.

#include <benchmark/benchmark.h>

#include <Eigen/Core>
#include <Eigen/SVD>
#include <cmath>
#include <cstdint>
#include <kvpack/linalg/truncated_svd.hpp>
#include <map>
#include <memory>
#include <mutex>
#include <random>
#include <utility>

namespace kvpack_bench {
namespace {

/// Reproducible keys-like rows × cols matrix, built once per shape.
const Eigen::MatrixXf& svd_input(Eigen::Index rows, Eigen::Index cols) {
  static std::mutex mutex;
  static std::map<std::pair<Eigen::Index, Eigen::Index>, std::unique_ptr<Eigen::MatrixXf>> cache;
  std::lock_guard<std::mutex> lock(mutex);
  auto& slot = cache[{rows, cols}];
  if (!slot) {
    constexpr Eigen::Index kSignalRank = 64;
    std::mt19937 rng(static_cast<uint32_t>(rows * 131 + cols));
    std::normal_distribution<float> normal(0.0f, 1.0f);
    Eigen::MatrixXf a(rows, kSignalRank), b(kSignalRank, cols);
    for (Eigen::Index j = 0; j < kSignalRank; ++j) {
      const float decay = std::pow(0.93f, static_cast<float>(j));
      for (Eigen::Index i = 0; i < rows; ++i) a(i, j) = decay * normal(rng);
    }
    for (Eigen::Index j = 0; j < cols; ++j) {
      for (Eigen::Index i = 0; i < kSignalRank; ++i) b(i, j) = normal(rng);
    }
    slot = std::make_unique<Eigen::MatrixXf>(a * b);
    for (Eigen::Index j = 0; j < cols; ++j) {
      for (Eigen::Index i = 0; i < rows; ++i) (*slot)(i, j) += 0.01f * normal(rng);
    }
  }
  return *slot;
}

void BM_TruncatedSvd(benchmark::State& state) {
  const auto route = static_cast<kvpack::SvdRoute>(state.range(0));
  const Eigen::Index rows = state.range(1), cols = state.range(2), rank = state.range(3);
  const int threads = static_cast<int>(state.range(4));
  const Eigen::MatrixXf& x = svd_input(rows, cols);
  kvpack::SvdOptions options;
  options.route = route;
  options.rank = rank;

  const int previous = Eigen::nbThreads();
  Eigen::setNbThreads(threads);
  kvpack::SvdFactors f;
  for (auto _ : state) {
    f = kvpack::truncated_svd(x, options);
    benchmark::DoNotOptimize(f.U.data());
    benchmark::ClobberMemory();
  }
  Eigen::setNbThreads(previous);

  const double bytes = static_cast<double>(rows) * static_cast<double>(cols) * sizeof(float);
  state.counters["bytes_per_second"] =
      benchmark::Counter(bytes, benchmark::Counter::kIsIterationInvariantRate);
  if (cols < 4096) {
    const double error = kvpack::frobenius_error(x, f);
    state.counters["rel_error"] = error / x.cast<double>().norm();
    if (rows <= 2048) {
      const Eigen::BDCSVD<Eigen::MatrixXf> full(x);
      state.counters["opt_ratio"] =
          error / kvpack::optimal_truncation_error(full.singularValues(), rank);
    }
  }
}

void svd_shapes(benchmark::internal::Benchmark* b) {
  b->ArgNames({"route", "rows", "cols", "rank", "threads"});
  const int64_t bdc = static_cast<int64_t>(kvpack::SvdRoute::kBdc);
  const int64_t gram = static_cast<int64_t>(kvpack::SvdRoute::kGram);
  const int64_t randomized = static_cast<int64_t>(kvpack::SvdRoute::kRandomized);
  const int64_t automatic = static_cast<int64_t>(kvpack::SvdRoute::kAuto);
  for (int64_t rows : {2048, 8192}) {
    for (int64_t cols : {192, 768, 960}) {
      for (int64_t route : {bdc, gram, randomized, automatic})
        b->Args({route, rows, cols, cols / 4, 1});
    }
  }
  // Llama-3-8B-like xKV group: 4 layers × 8 KV heads × 128 = 4096 channels.
  for (int64_t route : {gram, randomized}) b->Args({route, 8192, 4096, 1024, 1});
  // Two threads (Eigen's OpenMP GEMMs; the double Gram accumulation stays on one thread).
  for (int64_t route : {gram, randomized}) b->Args({route, 8192, 960, 240, 2});
}

BENCHMARK(BM_TruncatedSvd)->Apply(svd_shapes)->UseRealTime()->Unit(benchmark::kMillisecond);

}  // namespace
}  // namespace kvpack_bench
