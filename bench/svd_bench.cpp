/// \file bench/svd_bench.cpp
/// \brief The routes of kvpack::truncated_svd on the matrices CrossLayerSVD factors: the
/// reference model's stacked keys (2 K, 4 K, 8 K tokens × 192, 384, 768, 960 columns: groups of
/// G = 1, 2, 4, 5 layers × 3 kv heads × head_dim 64) at the value rank r_v that
/// CrossLayerSVD::ranks_for_ratio gives at ratio 4 (the larger of r_k, r_v; e.g. 2048 × 768:
/// r_k = 82, r_v = 123), and a Llama-3-8B-like group (32 K tokens × 4 layers × 8 kv heads × 128
/// = 4096 columns, rank 512; Gram and randomized only: BDC's cost grows as m·n² + n³ with a
/// constant ~10× Gram's, i.e. several minutes).
///
/// Counters:
///  - flop_per_second: the route's own arithmetic (svd_flops below: Gram m·n² + 4/3·n³ + 2mnr;
///    randomized (4q + 4)·m·n·l + QR and small-SVD terms; BDC the textbook thin SVD 6mn² + 20n³),
///    divided by the time; fraction_of_gemm: that rate over Eigen's fp32 GEMM rate measured in
///    this process on the model's MLP shape (512 × 576 · 576 × 1536) with the same thread count
///    (the yardstick of bench/gemm_bench.cpp and bench/prefill_bench.cpp);
///  - fraction_of_prefill (reference shapes): 2·⌈30/G⌉ factorisations like this one (both sides
///    of every group of the 30-layer model) over the model's prefill of the same tokens at 280
///    tokens/s, kvpack-eval's measured rate on this 2-vCPU machine kind (2 threads; not measured
///    here). Project target: ≤ 0.2. BM_LowRankCompress (low_rank_bench.cpp) times the real thing;
///  - rel_error = ‖X − U·S·Vᵀ‖_F / ‖X‖_F (skipped for the Llama shape), opt_ratio = that error
///    over the Eckart–Young optimum from BDCSVD's singular values (up to 4096 rows).
///
/// Input: keys-like data, a rank-64 signal with a decaying spectrum (0.93^i) plus dense noise
/// (std 0.01), so the spectrum flattens past rank ~64 like real K does past its outlier channels.
/// On a machine shared with other jobs run with OMP_WAIT_POLICY=passive and check `uptime`; e.g.
/// --benchmark_filter='BM_TruncatedSvd/.*rows:2048' --benchmark_min_time=0.1.

#include <benchmark/benchmark.h>

#include <Eigen/Core>
#include <Eigen/SVD>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <kvpack/kvpack.hpp>
#include <kvpack/linalg/truncated_svd.hpp>
#include <map>
#include <memory>
#include <mutex>
#include <random>
#include <utility>
#include <vector>

#include "bench_util.hpp"

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

/// FLOPs of a route's own arithmetic for an m × n matrix (m ≥ n) at rank r (see the file comment).
double svd_flops(kvpack::SvdRoute route, double m, double n, double r,
                 const kvpack::SvdOptions& options) {
  if (m < n) std::swap(m, n);
  switch (route) {
    case kvpack::SvdRoute::kGram:
      return m * n * n + 4.0 / 3.0 * n * n * n + 2.0 * m * n * r + 2.0 * n * n * r;
    case kvpack::SvdRoute::kRandomized: {
      const double l = std::min(r + options.oversampling, n);
      const double q = options.power_iterations;
      return (4.0 * q + 4.0) * m * n * l + 4.0 * (q + 1.0) * m * l * l + n * l * l +
             4.0 / 3.0 * l * l * l + 2.0 * m * l * r;
    }
    default:
      return 6.0 * m * n * n + 20.0 * n * n * n;
  }
}

/// FLOP/s of Eigen's fp32 GEMM on the model's MLP shape at `threads` threads: median of passes
/// over ~0.3 s, measured once per thread count.
double gemm_flop_per_second(int threads) {
  static std::mutex mutex;
  static std::map<int, double> rates;
  std::lock_guard<std::mutex> lock(mutex);
  if (auto it = rates.find(threads); it != rates.end()) return it->second;
  using RowMat = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  const RowMat a = RowMat::Random(512, 576), b = RowMat::Random(576, 1536);
  RowMat c(512, 1536);
  const int previous = Eigen::nbThreads();
  Eigen::setNbThreads(threads);
  std::vector<double> samples;
  const double start = now_seconds();
  while (samples.size() < 3 || (now_seconds() - start < 0.3 && samples.size() < 64)) {
    const double t0 = now_seconds();
    c.noalias() = a * b;
    benchmark::DoNotOptimize(c.data());
    samples.push_back(2.0 * 512 * 576 * 1536 / (now_seconds() - t0));
  }
  Eigen::setNbThreads(previous);
  std::nth_element(samples.begin(), samples.begin() + samples.size() / 2, samples.end());
  return rates[threads] = samples[samples.size() / 2];
}

/// Eckart–Young optimum at `rank`, from BDCSVD's singular values, once per matrix and rank.
double optimum(const Eigen::MatrixXf& x, Eigen::Index rank) {
  static std::mutex mutex;
  static std::map<const Eigen::MatrixXf*, Eigen::VectorXf> spectra;
  std::lock_guard<std::mutex> lock(mutex);
  auto& s = spectra[&x];
  if (s.size() == 0) s = Eigen::BDCSVD<Eigen::MatrixXf>(x).singularValues();
  return kvpack::optimal_truncation_error(s, rank);
}

constexpr int kModelLayers = 30;
constexpr int kColumnsPerLayer = 3 * 64;
constexpr double kPrefillTokensPerSecond = 280.0;

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
  double total = 0.0;
  for (auto _ : state) {
    const double t0 = now_seconds();
    f = kvpack::truncated_svd(x, options);
    benchmark::DoNotOptimize(f.U.data());
    benchmark::ClobberMemory();
    total += now_seconds() - t0;
  }
  Eigen::setNbThreads(previous);
  const double seconds = total / static_cast<double>(state.iterations());

  const double flops = svd_flops(f.route, static_cast<double>(rows), static_cast<double>(cols),
                                 static_cast<double>(rank), options);
  state.counters["flop_per_second"] = flops / seconds;
  state.counters["fraction_of_gemm"] = flops / seconds / gemm_flop_per_second(threads);
  state.counters["route_taken"] = static_cast<double>(f.route);
  if (cols % kColumnsPerLayer == 0 && cols <= 5 * kColumnsPerLayer) {
    const int group = static_cast<int>(cols / kColumnsPerLayer);
    const double factorisations = 2.0 * ((kModelLayers + group - 1) / group);
    state.counters["fraction_of_prefill"] =
        factorisations * seconds / (static_cast<double>(rows) / kPrefillTokensPerSecond);
  }
  if (cols < 4096) {
    const double error = kvpack::frobenius_error(x, f);
    state.counters["rel_error"] = error / x.cast<double>().norm();
    if (rows <= 4096) state.counters["opt_ratio"] = error / optimum(x, rank);
  }
}

void svd_shapes(benchmark::internal::Benchmark* b) {
  b->ArgNames({"route", "rows", "cols", "rank", "threads"});
  const int64_t bdc = static_cast<int64_t>(kvpack::SvdRoute::kBdc);
  const int64_t gram = static_cast<int64_t>(kvpack::SvdRoute::kGram);
  const int64_t randomized = static_cast<int64_t>(kvpack::SvdRoute::kRandomized);
  const int64_t automatic = static_cast<int64_t>(kvpack::SvdRoute::kAuto);
  for (int64_t rows : {2048, 4096, 8192}) {
    for (int group : {1, 2, 4, 5}) {
      const int64_t cols = group * kColumnsPerLayer;
      const int64_t rank =
          kvpack::CrossLayerSVD::ranks_for_ratio(rows, group, 3, 64, 4.0).second;
      // BDC: 2048 rows only (8192 × 960 takes ~10 s on one core here, ~10× Gram).
      if (rows == 2048) b->Args({bdc, rows, cols, rank, 1});
      for (int64_t route : {gram, randomized, automatic}) b->Args({route, rows, cols, rank, 1});
      b->Args({automatic, rows, cols, rank, 2});
    }
  }
  // Llama-3-8B-like xKV group: 4 layers × 8 KV heads × 128 = 4096 channels, 32 K tokens.
  for (int64_t route : {gram, randomized}) b->Args({route, 32768, 4096, 512, 2});
}

BENCHMARK(BM_TruncatedSvd)->Apply(svd_shapes)->UseRealTime()->Unit(benchmark::kMillisecond);

}  // namespace
}  // namespace kvpack_bench
