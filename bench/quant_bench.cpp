/// \file bench/quant_bench.cpp
/// \brief Quantize (KIVI) on the reference-model attention shape (one layer of SmolLM2-135M: 9
/// query heads, 3 kv heads, head_dim 64): quantization throughput of compress(), and decode
/// attention over 4-bit and 2-bit caches against dense fp16 (Identity) and fp32 (IdentityF32)
/// caches of the same tokens, timed in the same run.
///
/// BM_QuantizeCompress: compress() of a cache whose tokens are all in the fp16 tail (as after
/// prefill), on a fresh copy each iteration (copy not timed). bytes_per_second counts the fp16
/// K/V that compress() quantizes (every token but the residual window), fraction_of_copy divides
/// that by the memcpy rate (bytes read + written per second). Issue target: ≥ 0.5.
///
/// BM_QuantAttendDecode: one query token (9 heads) at the last of 32 K positions. Each iteration
/// times the quantized cache, then an Identity and an IdentityF32 cache of the same K/V, so the
/// ratios see the same machine state. Counters: x_fp16 = fp16 time / quantized time (target
/// ≥ 1.5), x_fp32 = fp32 time / quantized time (target ≥ 3), fp16_us, fp32_us, and the quantized
/// cache's bytes (cache.bytes(), all read) per second against the read baseline. cold:1 reads
/// 64 MiB of unrelated data before each timed call, so K/V come from DRAM as in a 30-layer
/// decode step; cold:0 repeats the call on caches that may stay in the 32 MiB L3.
///
/// Run with OMP_WAIT_POLICY=passive on a shared machine (see bench_util.hpp), e.g.
/// --benchmark_filter='BM_Quant'.

#include <benchmark/benchmark.h>

#include <memory>
#include <vector>

#include "bench_util.hpp"

namespace kvpack_bench {
namespace {

constexpr int64_t kResidual = 128;

void BM_QuantizeCompress(benchmark::State& state) {
  using Cache = kvpack::KVCache<kvpack::Quantize>;
  const int64_t tokens = state.range(0);
  const int bits = static_cast<int>(state.range(1));
  Cache prepared(model_shape(), kvpack::Quantize(bits, 32, kResidual));
  fill_layer(prepared, 0, kv_data(tokens), tokens);
  const int64_t quantized = (tokens - kResidual) / 32 * 32;
  const double input = 2.0 * quantized * kKvHeads * kHeadDim * sizeof(kvpack::Half);
  double ratio = 0.0;
  for (auto _ : state) {
    auto cache = std::make_unique<Cache>(prepared);
    const double t0 = now_seconds();
    cache->compress();
    state.SetIterationTime(now_seconds() - t0);
    ratio = static_cast<double>(cache->dense_bytes()) / static_cast<double>(cache->bytes());
  }
  add_bytes_per_second(state, input);
  add_fraction(state, Baseline::kCopy, input);
  state.counters["ratio"] = ratio;
}
BENCHMARK(BM_QuantizeCompress)
    ->ArgNames({"tokens", "bits"})
    ->ArgsProduct({{4096, 32768}, {4, 2}})
    ->UseManualTime()
    ->Unit(benchmark::kMillisecond);

/// Seconds of one decode attend (after a cache flush when `cold`).
template <class Cache>
double time_attend(const Cache& cache, const kvpack::ActivationView& q,
                   const std::vector<int64_t>& position, const kvpack::OutputView& out,
                   bool cold) {
  if (cold) flush_caches();
  const double t0 = now_seconds();
  cache.attend(0, q, position, out);
  benchmark::ClobberMemory();
  return now_seconds() - t0;
}

void BM_QuantAttendDecode(benchmark::State& state) {
  const int bits = static_cast<int>(state.range(0));
  const bool cold = state.range(1) != 0;
  constexpr int64_t kTokens = 32768;
  const KvData& data = kv_data(kTokens);
  kvpack::KVCache<kvpack::Quantize> quant(model_shape(), kvpack::Quantize(bits, 32, kResidual));
  kvpack::KVCache<kvpack::Identity> fp16(model_shape());
  kvpack::KVCache<kvpack::IdentityF32> fp32(model_shape());
  fill_layer(quant, 0, data, kTokens);
  fill_layer(fp16, 0, data, kTokens);
  fill_layer(fp32, 0, data, kTokens);
  quant.compress();
  const std::vector<float> q = query_data(1);
  const std::vector<int64_t> position{kTokens - 1};
  std::vector<float> out(static_cast<std::size_t>(kQHeads) * kHeadDim);
  const auto q_view = kvpack::ActivationView::nhd(q.data(), 1, kQHeads, kHeadDim);
  const auto out_view = kvpack::OutputView::nhd(out.data(), 1, kQHeads, kHeadDim);
  double quant_s = 0, fp16_s = 0, fp32_s = 0;
  for (auto _ : state) {
    const double t = time_attend(quant, q_view, position, out_view, cold);
    state.SetIterationTime(t);
    quant_s += t;
    fp16_s += time_attend(fp16, q_view, position, out_view, cold);
    fp32_s += time_attend(fp32, q_view, position, out_view, cold);
  }
  const double bytes = static_cast<double>(quant.bytes());
  add_bytes_per_second(state, bytes);
  add_fraction(state, Baseline::kRead, bytes);
  const double n = static_cast<double>(state.iterations());
  state.counters["fp16_us"] = 1e6 * fp16_s / n;
  state.counters["fp32_us"] = 1e6 * fp32_s / n;
  state.counters["x_fp16"] = fp16_s / quant_s;
  state.counters["x_fp32"] = fp32_s / quant_s;
  state.counters["ratio"] =
      static_cast<double>(quant.dense_bytes()) / static_cast<double>(quant.bytes());
}
BENCHMARK(BM_QuantAttendDecode)
    ->ArgNames({"bits", "cold"})
    ->ArgsProduct({{4, 2}, {0, 1}})
    ->UseManualTime()
    ->Unit(benchmark::kMicrosecond);

}  // namespace
}  // namespace kvpack_bench
