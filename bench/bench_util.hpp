/// \file bench/bench_util.hpp
/// \brief Shared pieces of the kvpack microbenchmarks: the reference-model shape, reproducible
/// K/V/Q data, cache filling, memory-bandwidth baselines measured in the same process, and a
/// last-level-cache flush for "cold" measurements.
///
/// Every rate the benchmarks report is compared with a baseline measured by this process on this
/// machine (never with a number from a data sheet): `fraction_of_copy` divides by the memcpy
/// rate (bytes read + written per second), `fraction_of_read` by the read-only sum rate. Both
/// baselines run on kvpack::default_executor(), the pool kvpack's parallel loops run on, with all
/// of its threads (KVPACK_NUM_THREADS sets their number).
///
/// The pool's idle threads block rather than spin, so a machine shared with other jobs costs
/// time slices only while work runs (libgomp's default spin-waiting used to turn every parallel
/// region into a wait for a time slice there); still check `uptime` and say what else ran.
#pragma once

#include <benchmark/benchmark.h>

#include <Eigen/Core>
#include <algorithm>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <kvpack/kvpack.hpp>
#include <map>
#include <memory>
#include <mutex>
#include <random>
#include <utility>
#include <vector>

namespace kvpack_bench {

// ---- Reference model: SmolLM2-135M attention, one layer ---------------------------------------

constexpr int kQHeads = 9;
constexpr int kKvHeads = 3;
constexpr int kHeadDim = 64;
/// Tokens per append() call when filling a cache, as a prefill chunk would.
constexpr int64_t kAppendBlock = 512;

inline kvpack::ModelShape model_shape(int layers = 1) {
  kvpack::ModelShape shape;
  shape.layers = layers;
  shape.q_heads = kQHeads;
  shape.kv_heads = kKvHeads;
  shape.head_dim = kHeadDim;
  shape.rope = {kvpack::RopeStyle::kInterleaved, 100000.0};
  return shape;
}

/// Threads of kvpack's default executor (what its parallel loops use).
inline int max_threads() { return kvpack::default_executor().concurrency(); }

/// Runs body(t) for t in [0, threads) on kvpack's default executor.
template <class Body>
void on_threads(int threads, Body body) {
  kvpack::default_executor().parallel_for(threads, kvpack::TaskRef(body));
}

/// Seconds on a monotonic clock, for benchmarks that time one call with UseManualTime().
inline double now_seconds() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// ---- Data --------------------------------------------------------------------------------------

/// fp32 K and V of `tokens` tokens (NHD: tokens × kv_heads × head_dim), positions 0..tokens-1.
/// Standard-normal entries: key norms vary from token to token, so L2NormEvict has a real choice.
struct KvData {
  std::vector<float> k, v;
  std::vector<int64_t> positions;
  int64_t tokens = 0;
};

/// Shared read-only data for the largest size any benchmark uses; smaller sizes use a prefix.
inline const KvData& kv_data(int64_t tokens) {
  static std::mutex mutex;
  static std::unique_ptr<KvData> data;
  std::lock_guard<std::mutex> lock(mutex);
  if (!data || data->tokens < tokens) {
    data = std::make_unique<KvData>();
    data->tokens = tokens;
    const std::size_t n = static_cast<std::size_t>(tokens) * kKvHeads * kHeadDim;
    data->k.resize(n);
    data->v.resize(n);
    std::mt19937 rng(20240611);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    for (float& x : data->k) x = normal(rng);
    for (float& x : data->v) x = normal(rng);
    data->positions.resize(tokens);
    for (int64_t t = 0; t < tokens; ++t) data->positions[t] = t;
  }
  return *data;
}

/// Query rows (tokens × q_heads × head_dim), standard normal, reproducible.
inline std::vector<float> query_data(int64_t tokens, uint32_t seed = 7) {
  std::vector<float> q(static_cast<std::size_t>(tokens) * kQHeads * kHeadDim);
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (float& x : q) x = normal(rng);
  return q;
}

/// Appends the first `tokens` tokens of `data` to `layer` in blocks of kAppendBlock.
template <class Cache>
void fill_layer(Cache& cache, int layer, const KvData& data, int64_t tokens) {
  const int64_t row = static_cast<int64_t>(kKvHeads) * kHeadDim;
  for (int64_t t0 = 0; t0 < tokens; t0 += kAppendBlock) {
    const int64_t n = std::min(kAppendBlock, tokens - t0);
    cache.append(layer,
                 kvpack::ActivationView::nhd(data.k.data() + t0 * row, n, kKvHeads, kHeadDim),
                 kvpack::ActivationView::nhd(data.v.data() + t0 * row, n, kKvHeads, kHeadDim),
                 kvpack::Positions(data.positions.data() + t0, static_cast<std::size_t>(n)));
  }
}

// ---- Memory-bandwidth baselines ----------------------------------------------------------------

/// Bytes of each baseline buffer: far larger than the 32 MiB L3 of this machine kind.
constexpr std::size_t kBaselineBytes = std::size_t{256} << 20;

/// A page-aligned buffer whose pages are touched (so first-touch faults stay out of timings).
class Buffer {
 public:
  explicit Buffer(std::size_t bytes) : bytes_(bytes) {
    void* p = std::aligned_alloc(4096, bytes);
    if (p == nullptr) throw std::bad_alloc();
    data_.reset(static_cast<unsigned char*>(p));
    // Non-constant content, touched by the threads that will use it.
    const std::size_t words = bytes / sizeof(uint64_t);
    uint64_t* w = reinterpret_cast<uint64_t*>(data_.get());
    const int threads = max_threads();
    on_threads(threads, [&](int64_t t) {
      for (std::size_t i = words * t / threads; i < words * (t + 1) / threads; ++i) {
        w[i] = i * 0x9E3779B97F4A7C15ull;
      }
    });
  }
  unsigned char* data() const { return data_.get(); }
  const uint64_t* words() const { return reinterpret_cast<const uint64_t*>(data_.get()); }
  std::size_t bytes() const { return bytes_; }

 private:
  struct Free {
    void operator()(unsigned char* p) const { std::free(p); }
  };
  std::unique_ptr<unsigned char, Free> data_;
  std::size_t bytes_;
};

/// [begin, end) of `bytes` for thread `t` of `n`, split on 4 KiB boundaries.
inline std::pair<std::size_t, std::size_t> thread_range(std::size_t bytes, int t, int n) {
  const std::size_t pages = bytes / 4096;
  return {pages * t / n * 4096, t + 1 == n ? bytes : pages * (t + 1) / n * 4096};
}

/// memcpy of the whole buffer, split across `threads` threads.
inline void parallel_copy(unsigned char* dst, const unsigned char* src, std::size_t bytes,
                          int threads) {
  on_threads(threads, [&](int64_t t) {
    const auto [begin, end] = thread_range(bytes, static_cast<int>(t), threads);
    std::memcpy(dst + begin, src + begin, end - begin);
  });
}

/// Sum of 64-bit words (vectorises without -ffast-math: integer addition is associative).
inline uint64_t sum_words(const uint64_t* w, std::size_t n) {
  uint64_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
  std::size_t i = 0;
  for (; i + 4 <= n; i += 4) {
    s0 += w[i];
    s1 += w[i + 1];
    s2 += w[i + 2];
    s3 += w[i + 3];
  }
  for (; i < n; ++i) s0 += w[i];
  return s0 + s1 + s2 + s3;
}

/// Read-only pass over the whole buffer, split across `threads` threads.
inline uint64_t parallel_sum(const Buffer& buffer, int threads) {
  uint64_t total = 0;
  std::vector<uint64_t> partial(threads, 0);
  on_threads(threads, [&](int64_t t) {
    const auto [begin, end] = thread_range(buffer.bytes(), static_cast<int>(t), threads);
    partial[t] = sum_words(buffer.words() + begin / 8, (end - begin) / 8);
  });
  for (uint64_t p : partial) total += p;
  return total;
}

enum class Baseline { kCopy, kRead };

/// Bytes per second of a baseline (copy: read + written; read: read), median of passes over
/// ~0.5 s, measured once per (kind, thread count) at first use and cached.
inline double baseline_bytes_per_second(Baseline kind, int threads) {
  static std::mutex mutex;
  static std::map<std::pair<int, int>, double> cache;
  std::lock_guard<std::mutex> lock(mutex);
  const auto key = std::make_pair(static_cast<int>(kind), threads);
  if (auto it = cache.find(key); it != cache.end()) return it->second;

  Buffer src(kBaselineBytes);
  std::unique_ptr<Buffer> dst;
  if (kind == Baseline::kCopy) dst = std::make_unique<Buffer>(kBaselineBytes);
  const double moved = kind == Baseline::kCopy ? 2.0 * kBaselineBytes : 1.0 * kBaselineBytes;
  std::vector<double> rates;
  const double start = now_seconds();
  while (rates.size() < 3 || (now_seconds() - start < 0.5 && rates.size() < 64)) {
    const double t0 = now_seconds();
    if (kind == Baseline::kCopy) {
      parallel_copy(dst->data(), src.data(), kBaselineBytes, threads);
      benchmark::ClobberMemory();
    } else {
      benchmark::DoNotOptimize(parallel_sum(src, threads));
    }
    rates.push_back(moved / (now_seconds() - t0));
  }
  std::nth_element(rates.begin(), rates.begin() + rates.size() / 2, rates.end());
  return cache[key] = rates[rates.size() / 2];
}

/// Adds `fraction_of_copy` or `fraction_of_read`: bytes/s of the benchmark divided by the
/// baseline at max_threads() threads.
inline void add_fraction(benchmark::State& state, Baseline kind, double bytes_per_iteration) {
  const double baseline = baseline_bytes_per_second(kind, max_threads());
  state.counters[kind == Baseline::kCopy ? "fraction_of_copy" : "fraction_of_read"] =
      benchmark::Counter(bytes_per_iteration / baseline,
                         benchmark::Counter::kIsIterationInvariantRate);
}

inline void add_bytes_per_second(benchmark::State& state, double bytes_per_iteration) {
  state.counters["bytes_per_second"] =
      benchmark::Counter(bytes_per_iteration, benchmark::Counter::kIsIterationInvariantRate);
}

/// FLOP/s of Eigen's fp32 GEMM on the reference model's MLP shape (512 × 576 · 576 × 1536, a
/// prefill chunk through the up-projection) with Eigen's current thread count: median of passes
/// over ~0.3 s, measured once per process. Compute-bound kernels are judged against it.
inline double mlp_gemm_flop_per_second() {
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

/// Evicts this core's caches and most of the shared L3 by reading 2 × L3 of unrelated data.
/// Reading (not writing) leaves clean lines, so the timed code pays no write-backs for it.
inline void flush_caches() {
  static Buffer buffer(std::size_t{64} << 20);
  benchmark::DoNotOptimize(parallel_sum(buffer, max_threads()));
}

}  // namespace kvpack_bench
