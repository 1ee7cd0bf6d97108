/// \file bench/cache_bench.cpp
/// \brief KVCache on the reference-model attention shape (one layer of SmolLM2-135M: 9 query
/// heads, 3 kv heads, head_dim 64) at 4 K and 32 K tokens: append, compress (L2NormEvict, keep
/// 0.25) and decode attend (one query token), against the bandwidth baselines of this process.
///
/// "cold:1" variants read 64 MiB of unrelated data before each timed call, so the cache's K/V
/// come from DRAM as they do when a decode step walks through 30 layers; "cold:0" variants repeat
/// the call on the same cache, which stays in the 32 MiB L3 when it fits.

#include <benchmark/benchmark.h>

#include <memory>
#include <vector>

#include "bench_util.hpp"

namespace kvpack_bench {
namespace {

constexpr double kKeepRatio = 0.25;

/// The policy a benchmark runs: L2NormEvict keeps 0.25 of every layer (none skipped).
template <class Policy>
Policy bench_policy() {
  return Policy{};
}
template <>
kvpack::L2NormEvict bench_policy<kvpack::L2NormEvict>() {
  return kvpack::L2NormEvict(kvpack::Budget::ratio(kKeepRatio), /*skip=*/0);
}

/// Bytes of the fp32 K and V that append() consumes for `tokens` tokens.
double input_bytes(int64_t tokens) { return 2.0 * tokens * kKvHeads * kHeadDim * sizeof(float); }

/// Times fill_layer() of `tokens` tokens (state.range(0)) into a fresh make_cache() per
/// iteration. bytes_per_second: fp32 K+V consumed. fraction_of_copy: (consumed + stored) against
/// memcpy.
template <class MakeCache>
void time_append(benchmark::State& state, MakeCache&& make_cache) {
  const int64_t tokens = state.range(0);
  const KvData& data = kv_data(tokens);
  double stored = 0.0;
  for (auto _ : state) {
    auto cache = make_cache();
    const double t0 = now_seconds();
    fill_layer(*cache, 0, data, tokens);
    state.SetIterationTime(now_seconds() - t0);
    stored = static_cast<double>(cache->bytes());
  }
  add_bytes_per_second(state, input_bytes(tokens));
  add_fraction(state, Baseline::kCopy, input_bytes(tokens) + stored);
}

template <class Policy>
void BM_Append(benchmark::State& state) {
  time_append(state, [] {
    return std::make_unique<kvpack::KVCache<Policy>>(model_shape(), bench_policy<Policy>());
  });
}
BENCHMARK_TEMPLATE(BM_Append, kvpack::Identity)
    ->ArgName("tokens")
    ->Arg(4096)
    ->Arg(32768)
    ->UseManualTime()
    ->Unit(benchmark::kMillisecond);
BENCHMARK_TEMPLATE(BM_Append, kvpack::IdentityF32)
    ->ArgName("tokens")
    ->Arg(4096)
    ->Arg(32768)
    ->UseManualTime()
    ->Unit(benchmark::kMillisecond);

/// append() as an engine runs it in steady state: the cache takes its pages from a shared pool
/// whose memory earlier sequences already touched (filled once and removed before timing), so
/// what is timed is validation, conversion and page bookkeeping, not the operating system's
/// first-touch page faults that BM_Append's fresh private pool pays. Counters as BM_Append.
template <class Policy>
void BM_AppendPooled(benchmark::State& state) {
  using Cache = kvpack::KVCache<Policy>;
  kvpack::PageOptions pages;
  pages.pool = std::make_shared<kvpack::PagePool>(
      kvpack::detail::dense_page_bytes<typename Cache::storage_type>(pages.page_tokens, kHeadDim),
      256);
  {
    Cache warm(model_shape(), bench_policy<Policy>(), pages);
    fill_layer(warm, 0, kv_data(state.range(0)), state.range(0));
  }
  time_append(
      state, [&] { return std::make_unique<Cache>(model_shape(), bench_policy<Policy>(), pages); });
}
BENCHMARK_TEMPLATE(BM_AppendPooled, kvpack::Identity)
    ->ArgName("tokens")
    ->Arg(4096)
    ->Arg(32768)
    ->UseManualTime()
    ->Unit(benchmark::kMillisecond);

/// compress() only: each iteration copies a prepared cache outside the timed region.
/// bytes_per_second counts the K/V the cache held before compress (what it must read).
template <class Policy>
void BM_Compress(benchmark::State& state) {
  using Cache = kvpack::KVCache<Policy>;
  const int64_t tokens = state.range(0);
  const bool cold = state.range(1) != 0;
  Cache prepared(model_shape(), bench_policy<Policy>());
  fill_layer(prepared, 0, kv_data(tokens), tokens);
  const double held = static_cast<double>(prepared.dense_bytes());
  int64_t kept = 0;
  for (auto _ : state) {
    auto cache = std::make_unique<Cache>(prepared);
    if (cold) flush_caches();
    const double t0 = now_seconds();
    cache->compress();
    state.SetIterationTime(now_seconds() - t0);
    kept = cache->tokens(0, 0);
  }
  add_bytes_per_second(state, held);
  add_fraction(state, Baseline::kCopy, held);
  state.counters["kept_tokens"] = static_cast<double>(kept);
}
BENCHMARK_TEMPLATE(BM_Compress, kvpack::L2NormEvict)
    ->ArgNames({"tokens", "cold"})
    ->ArgsProduct({{4096, 32768}, {0, 1}})
    ->UseManualTime()
    ->Unit(benchmark::kMillisecond);

/// Decode attention: one query token (9 heads) at the last position over everything held.
/// bytes_per_second counts cache.bytes() (K/V rows and positions), all of which are read.
template <class Policy>
void BM_AttendDecode(benchmark::State& state) {
  using Cache = kvpack::KVCache<Policy>;
  const int64_t tokens = state.range(0);
  const bool cold = state.range(1) != 0;
  Cache cache(model_shape(), bench_policy<Policy>());
  fill_layer(cache, 0, kv_data(tokens), tokens);
  cache.compress();
  const std::vector<float> q = query_data(1);
  const std::vector<int64_t> position{tokens - 1};
  std::vector<float> out(static_cast<std::size_t>(kQHeads) * kHeadDim);
  const auto q_view = kvpack::ActivationView::nhd(q.data(), 1, kQHeads, kHeadDim);
  const auto out_view = kvpack::OutputView::nhd(out.data(), 1, kQHeads, kHeadDim);
  const double bytes = static_cast<double>(cache.bytes());
  for (auto _ : state) {
    if (cold) flush_caches();
    const double t0 = now_seconds();
    cache.attend(0, q_view, position, out_view);
    benchmark::ClobberMemory();
    state.SetIterationTime(now_seconds() - t0);
  }
  add_bytes_per_second(state, bytes);
  add_fraction(state, Baseline::kRead, bytes);
  state.counters["kept_tokens"] = static_cast<double>(cache.tokens(0, 0));
}
BENCHMARK_TEMPLATE(BM_AttendDecode, kvpack::Identity)
    ->ArgNames({"tokens", "cold"})
    ->ArgsProduct({{4096, 32768}, {0, 1}})
    ->UseManualTime()
    ->Unit(benchmark::kMicrosecond);
BENCHMARK_TEMPLATE(BM_AttendDecode, kvpack::L2NormEvict)
    ->ArgNames({"tokens", "cold"})
    ->ArgsProduct({{4096, 32768}, {0, 1}})
    ->UseManualTime()
    ->Unit(benchmark::kMicrosecond);
BENCHMARK_TEMPLATE(BM_AttendDecode, kvpack::IdentityF32)
    ->ArgNames({"tokens", "cold"})
    ->ArgsProduct({{4096, 32768}, {0, 1}})
    ->UseManualTime()
    ->Unit(benchmark::kMicrosecond);

}  // namespace
}  // namespace kvpack_bench
