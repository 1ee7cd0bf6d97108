/// \file bench/isa_bench.cpp
/// \brief The CPU kernels under each instruction set the run-time dispatch can choose (isa.hpp),
/// in one run, on the reference-model attention shape (9 query heads, 3 kv heads, head_dim 64).
///
/// BM_IsaAttendDecode: decode attend (one query token) over 4 K and 32 K tokens held as fp16
/// (Identity) or 4-bit KIVI (Quantize), with the kernels of `isa` (0 scalar, 1 AVX2, 2 AVX-512);
/// bytes_per_second counts cache.bytes() (all read), fraction_of_read divides it by the read
/// baseline. BM_IsaQuantize: compress() of a 32 K-token fp16 tail to 4 bits; bytes_per_second
/// counts the fp16 K/V quantized.
///
/// This file is also built alone with the baseline x86-64 flags (kvpack_bench_baseline_flags,
/// what a consumer gets from find_package without -march): scripts/bench_isa_flags.sh runs the
/// same benchmarks from both binaries and prints the baseline-flags / native time ratios.

#include <benchmark/benchmark.h>

#include <memory>
#include <type_traits>
#include <vector>

#include "bench_util.hpp"

namespace kvpack_bench {
namespace {

/// Sets the instruction set of the benchmark's arg 0; false (and skips) when the CPU lacks it.
bool use_isa(benchmark::State& state, kvpack::Isa& previous) {
  const auto isa = static_cast<kvpack::Isa>(state.range(0));
  if (isa > kvpack::cpu_isa_supported()) {
    state.SkipWithError("this CPU does not support the instruction set");
    return false;
  }
  previous = kvpack::set_cpu_isa(isa);
  state.SetLabel(kvpack::isa_name(isa));
  return true;
}

template <class Policy>
Policy isa_bench_policy() {
  if constexpr (std::is_same_v<Policy, kvpack::Quantize>) {
    return kvpack::Quantize(4, 32, 128);
  } else {
    return Policy{};
  }
}

template <class Policy>
void BM_IsaAttendDecode(benchmark::State& state) {
  kvpack::Isa previous{};
  if (!use_isa(state, previous)) return;
  const int64_t tokens = state.range(1);
  kvpack::KVCache<Policy> cache(model_shape(), isa_bench_policy<Policy>());
  fill_layer(cache, 0, kv_data(tokens), tokens);
  cache.compress();
  const std::vector<float> q = query_data(1);
  const std::vector<int64_t> position{tokens - 1};
  std::vector<float> out(static_cast<std::size_t>(kQHeads) * kHeadDim);
  const auto q_view = kvpack::ActivationView::nhd(q.data(), 1, kQHeads, kHeadDim);
  const auto out_view = kvpack::OutputView::nhd(out.data(), 1, kQHeads, kHeadDim);
  const double bytes = static_cast<double>(cache.bytes());
  for (auto _ : state) {
    cache.attend(0, q_view, position, out_view);
    benchmark::ClobberMemory();
  }
  add_bytes_per_second(state, bytes);
  add_fraction(state, Baseline::kRead, bytes);
  kvpack::set_cpu_isa(previous);
}
BENCHMARK_TEMPLATE(BM_IsaAttendDecode, kvpack::Identity)
    ->ArgNames({"isa", "tokens"})
    ->ArgsProduct({{0, 1, 2}, {4096, 32768}})
    ->Unit(benchmark::kMicrosecond);
BENCHMARK_TEMPLATE(BM_IsaAttendDecode, kvpack::Quantize)
    ->ArgNames({"isa", "tokens"})
    ->ArgsProduct({{0, 1, 2}, {4096, 32768}})
    ->Unit(benchmark::kMicrosecond);

void BM_IsaQuantize(benchmark::State& state) {
  kvpack::Isa previous{};
  if (!use_isa(state, previous)) return;
  using Cache = kvpack::KVCache<kvpack::Quantize>;
  const int64_t tokens = 32768;
  Cache prepared(model_shape(), kvpack::Quantize(4, 32, 128));
  fill_layer(prepared, 0, kv_data(tokens), tokens);
  const double input = 2.0 * ((tokens - 128) / 32 * 32) * kKvHeads * kHeadDim * 2;
  for (auto _ : state) {
    auto cache = std::make_unique<Cache>(prepared);
    const double t0 = now_seconds();
    cache->compress();
    state.SetIterationTime(now_seconds() - t0);
  }
  add_bytes_per_second(state, input);
  add_fraction(state, Baseline::kCopy, input);
  kvpack::set_cpu_isa(previous);
}
BENCHMARK(BM_IsaQuantize)
    ->ArgNames({"isa"})
    ->Arg(0)
    ->Arg(1)
    ->Arg(2)
    ->UseManualTime()
    ->Unit(benchmark::kMillisecond);

}  // namespace
}  // namespace kvpack_bench
