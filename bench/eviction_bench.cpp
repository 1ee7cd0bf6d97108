/// \file bench/eviction_bench.cpp
/// \brief Eviction on the reference-model shape (SmolLM2-135M: 9 query heads, 3 kv heads,
/// head_dim 64): ReconstructionEvict's (KVzip) query scoring in observe(), compress() with one
/// global threshold, and the scoring cost of a KVzip repeat pass against the model's prefill.
///
/// BM_ObserveScoring: observe() of a 2 K-query chunk (the last 2048 cached positions, as the
/// repeat tokens of a KVzip pass) against 8 K or 32 K cached tokens, one layer. window:0 scores
/// against every cached key (causal); window:1 uses KVzip's chunk-local window (4 sinks, a
/// 2 K-token chunk of the context, the repeat tokens). flop_per_second counts 2 · head_dim FLOPs
/// per (query head, query, visible key) dot, once: the scoring computes each score once.
/// fraction_of_gemm divides by the FLOP/s of an Eigen fp32 GEMM of the model's MLP shape
/// measured in this process (the rate the model's prefill runs at).
///
/// BM_CompressGlobal: compress() of a 4-layer cache with one global threshold (keep 0.25 of all
/// layers and heads, BudgetScope::kGlobal, 4 sinks), on a fresh copy each iteration (copy not
/// timed). bytes_per_second counts the fp16 K/V held before compress (dense_bytes(): what an
/// eviction has to look at and compact), fraction_of_copy divides by memcpy (read + written).
/// ReconstructionEvict's scores come from one observe() before the timed region.
///
/// BM_RepeatPassLayer: one layer of the model, dense fp32 GEMMs of SmolLM2-135M's projections
/// (QKV 576→960, O 576→576, gate/up 576→3072, down 1536→576) plus kvpack attention, run (a) as a
/// prefill of a 2 K-token context and (b) as KVzip's repeat pass over it (instruction + the
/// context again, appended, attended and observed with the chunk window, then truncated).
/// fused:0 scores with observe() after attend(); fused:1 with attend_observe() (each score
/// computed once), whose scoring cost is its time less that of attend() on the same queries,
/// run just before it as a probe (not counted in the pass). Counters: observe_ms (scoring only),
/// repeat_forward_ms (the pass without its scoring), prefill_ms, and the ratios of scoring to
/// each. The target is scoring < 0.1 of the forward pass. The real model also runs norms,
/// RoPE and the LM head; they are small next to these GEMMs (the proxy's prefill is within a few
/// percent of kvpack-eval's 280 tokens/s).
///
/// Run with OMP_WAIT_POLICY=passive on a shared machine (see bench_util.hpp), e.g.
/// --benchmark_filter='BM_ObserveScoring|BM_CompressGlobal|BM_RepeatPassLayer'.

#include <benchmark/benchmark.h>

#include <Eigen/Core>
#include <algorithm>
#include <memory>
#include <type_traits>
#include <vector>

#include "bench_util.hpp"

namespace kvpack_bench {
namespace {

constexpr int64_t kQueryChunk = 2048;
constexpr int64_t kSinks = 4;

/// Pairs (query, key) that observe() scores: key position ≤ query position and in the window.
double visible_pairs(const std::vector<int64_t>& query_positions, int64_t keys,
                     const kvpack::ScoreWindow& window) {
  double pairs = 0.0;
  int64_t in_window = 0, next = 0;  // keys [0, next) counted, in_window of them in the window
  for (int64_t p : query_positions) {
    for (; next <= p && next < keys; ++next) in_window += window.contains(next);
    pairs += static_cast<double>(in_window);
  }
  return pairs;
}

void BM_ObserveScoring(benchmark::State& state) {
  const int64_t cached = state.range(0);
  const bool chunk_window = state.range(1) != 0;
  kvpack::KVCache<kvpack::ReconstructionEvict> cache(model_shape());
  fill_layer(cache, 0, kv_data(cached), cached);
  const std::vector<float> q = query_data(kQueryChunk);
  std::vector<int64_t> positions(kQueryChunk);
  for (int64_t t = 0; t < kQueryChunk; ++t) positions[t] = cached - kQueryChunk + t;
  const int64_t context = cached - kQueryChunk;
  const int64_t chunk_begin = std::max(kSinks, context / 2 - kQueryChunk / 2);
  const kvpack::ScoreWindow window =
      chunk_window
          ? kvpack::ScoreWindow::chunk(kSinks, chunk_begin, chunk_begin + kQueryChunk, context)
          : kvpack::ScoreWindow::all();
  cache.policy().window = window;
  const auto q_view = kvpack::ActivationView::nhd(q.data(), kQueryChunk, kQHeads, kHeadDim);
  for (auto _ : state) {
    cache.observe(0, q_view, positions);
    benchmark::ClobberMemory();
  }
  const double pairs = visible_pairs(positions, cached, window);
  const double flop = 2.0 * kHeadDim * kQHeads * pairs;
  state.counters["flop_per_second"] =
      benchmark::Counter(flop, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["fraction_of_gemm"] = benchmark::Counter(
      flop / mlp_gemm_flop_per_second(), benchmark::Counter::kIsIterationInvariantRate);
  state.counters["keys_per_query"] = pairs / kQueryChunk;
}
BENCHMARK(BM_ObserveScoring)
    ->ArgNames({"cached", "window"})
    ->ArgsProduct({{8192, 32768}, {0, 1}})
    ->UseRealTime()
    ->Unit(benchmark::kMillisecond);

template <class Policy>
Policy global_policy() {
  kvpack::Budget budget = kvpack::Budget::ratio(0.25, kvpack::BudgetScope::kGlobal);
  budget.sink_tokens = kSinks;
  if constexpr (std::is_same_v<Policy, kvpack::L2NormEvict>) {
    return kvpack::L2NormEvict(budget, /*skip=*/0);
  } else {
    return Policy(budget);
  }
}

template <class Policy>
void BM_CompressGlobal(benchmark::State& state) {
  constexpr int kLayers = 4;
  using Cache = kvpack::KVCache<Policy>;
  const int64_t tokens = state.range(0);
  Cache prepared(model_shape(kLayers), global_policy<Policy>());
  for (int l = 0; l < kLayers; ++l) fill_layer(prepared, l, kv_data(tokens), tokens);
  if constexpr (Policy::needs_observe) {
    // Scores from the last 256 tokens as queries, every key in their window.
    constexpr int64_t kQueries = 256;
    const std::vector<float> q = query_data(kQueries, 11);
    std::vector<int64_t> positions(kQueries);
    for (int64_t t = 0; t < kQueries; ++t) positions[t] = tokens - kQueries + t;
    for (int l = 0; l < kLayers; ++l) {
      prepared.observe(l, kvpack::ActivationView::nhd(q.data(), kQueries, kQHeads, kHeadDim),
                       positions);
    }
  }
  const double held = static_cast<double>(prepared.dense_bytes());
  int64_t kept = 0;
  for (auto _ : state) {
    auto cache = std::make_unique<Cache>(prepared);
    const double t0 = now_seconds();
    cache->compress();
    state.SetIterationTime(now_seconds() - t0);
    kept = 0;
    for (int l = 0; l < kLayers; ++l) {
      for (int h = 0; h < kKvHeads; ++h) kept += cache->tokens(l, h);
    }
  }
  add_bytes_per_second(state, held);
  add_fraction(state, Baseline::kCopy, held);
  state.counters["kept_fraction"] =
      static_cast<double>(kept) / (static_cast<double>(tokens) * kLayers * kKvHeads);
}
BENCHMARK_TEMPLATE(BM_CompressGlobal, kvpack::L2NormEvict)
    ->ArgName("tokens")
    ->Arg(8192)
    ->Arg(32768)
    ->UseManualTime()
    ->Unit(benchmark::kMillisecond);
BENCHMARK_TEMPLATE(BM_CompressGlobal, kvpack::ReconstructionEvict)
    ->ArgName("tokens")
    ->Arg(8192)
    ->Arg(32768)
    ->UseManualTime()
    ->Unit(benchmark::kMillisecond);

// ---- One model layer: prefill vs KVzip repeat pass ------------------------------------------

using RowMat = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

/// SmolLM2-135M's layer as dense fp32 GEMMs (weights out × in, as kvpack-eval's forward) around
/// kvpack's append / attend / observe. Norms, RoPE and the activation are left out.
class LayerProxy {
 public:
  static constexpr int kHidden = 576, kFfn = 1536;

  LayerProxy()
      : qkv_(RowMat::Random((kQHeads + 2 * kKvHeads) * kHeadDim, kHidden) * 0.05f),
        out_(RowMat::Random(kHidden, kQHeads * kHeadDim) * 0.05f),
        gate_up_(RowMat::Random(2 * kFfn, kHidden) * 0.05f),
        down_(RowMat::Random(kHidden, kFfn) * 0.05f) {}

  /// What a repeat pass scores with: nothing (prefill), observe() after attend(), or
  /// attend_observe() (one pass).
  enum class Scoring { kNone, kObserve, kFused };
  struct Timing {
    double scoring_s = 0;  ///< observe(), or attend_observe() less attend() of the same queries
    double probe_s = 0;    ///< the attend() run only to measure that difference (not the pass's)
  };

  /// Runs the layer over x (tokens × hidden) at `positions`, scoring as `scoring` says.
  template <class Cache>
  Timing forward(Cache& cache, const RowMat& x, const std::vector<int64_t>& positions,
                 Scoring scoring) {
    const int64_t n = x.rows();
    const int qd = kQHeads * kHeadDim, kvd = kKvHeads * kHeadDim;
    qkv.noalias() = x * qkv_.transpose();
    q = qkv.leftCols(qd);
    k = qkv.middleCols(qd, kvd);
    v = qkv.rightCols(kvd);
    cache.append(0, kvpack::ActivationView::nhd(k.data(), n, kKvHeads, kHeadDim),
                 kvpack::ActivationView::nhd(v.data(), n, kKvHeads, kHeadDim), positions);
    attn.resize(n, qd);
    const auto q_view = kvpack::ActivationView::nhd(q.data(), n, kQHeads, kHeadDim);
    const auto out_view = kvpack::OutputView::nhd(attn.data(), n, kQHeads, kHeadDim);
    Timing timing;
    double t0 = now_seconds();
    cache.attend(0, q_view, positions, out_view);  // attend() has no side effect: a probe
    const double attend_s = now_seconds() - t0;
    if (scoring == Scoring::kObserve) {
      t0 = now_seconds();
      cache.observe(0, q_view, positions);
      timing.scoring_s = now_seconds() - t0;
    } else if (scoring == Scoring::kFused) {
      t0 = now_seconds();
      cache.attend_observe(0, q_view, positions, out_view);
      timing.scoring_s = now_seconds() - t0 - attend_s;
      timing.probe_s = attend_s;
    }
    h.noalias() = attn * out_.transpose();
    gate_up.noalias() = h * gate_up_.transpose();
    act = gate_up.leftCols(kFfn).cwiseProduct(gate_up.rightCols(kFfn));
    h.noalias() = act * down_.transpose();
    benchmark::DoNotOptimize(h.data());
    return timing;
  }

 private:
  RowMat qkv_, out_, gate_up_, down_;
  RowMat qkv, q, k, v, attn, h, gate_up, act;
};

void BM_RepeatPassLayer(benchmark::State& state) {
  const int64_t context = state.range(0);
  const auto scoring =
      state.range(1) == 1 ? LayerProxy::Scoring::kFused : LayerProxy::Scoring::kObserve;
  constexpr int64_t kInstruction = 22;  // kvpack-eval's repeat instruction, in tokens
  LayerProxy layer;
  const RowMat x_context = RowMat::Random(context, LayerProxy::kHidden);
  const RowMat x_repeat = RowMat::Random(kInstruction + context, LayerProxy::kHidden);
  std::vector<int64_t> context_positions(context), repeat_positions(kInstruction + context);
  for (int64_t t = 0; t < context; ++t) context_positions[t] = t;
  for (int64_t t = 0; t < kInstruction + context; ++t) repeat_positions[t] = context + t;

  kvpack::KVCache<kvpack::ReconstructionEvict> cache(model_shape());
  layer.forward(cache, x_context, context_positions, LayerProxy::Scoring::kNone);
  // One chunk covers the context: sinks + the whole context + the repeat tokens.
  cache.policy().window = kvpack::ScoreWindow::chunk(kSinks, kSinks, context, context);
  double observe_s = 0, repeat_s = 0, prefill_s = 0;
  for (auto _ : state) {
    // Prefill of the same context on a fresh cache (the cost the issue compares with).
    {
      kvpack::KVCache<kvpack::ReconstructionEvict> fresh(model_shape());
      const double t0 = now_seconds();
      layer.forward(fresh, x_context, context_positions, LayerProxy::Scoring::kNone);
      prefill_s += now_seconds() - t0;
    }
    const double t0 = now_seconds();
    const LayerProxy::Timing timing = layer.forward(cache, x_repeat, repeat_positions, scoring);
    const double total = now_seconds() - t0 - timing.probe_s;
    const double observed = timing.scoring_s;
    cache.truncate(context - 1);
    state.SetIterationTime(total);
    observe_s += observed;
    repeat_s += total - observed;
  }
  const double n = static_cast<double>(state.iterations());
  state.counters["observe_ms"] = 1e3 * observe_s / n;
  state.counters["repeat_forward_ms"] = 1e3 * repeat_s / n;
  state.counters["prefill_ms"] = 1e3 * prefill_s / n;
  state.counters["observe_over_repeat_forward"] = observe_s / repeat_s;
  state.counters["observe_over_prefill"] = observe_s / prefill_s;
}
BENCHMARK(BM_RepeatPassLayer)
    ->ArgNames({"context", "fused"})
    ->Args({2048, 0})
    ->Args({2048, 1})
    ->UseManualTime()
    ->Unit(benchmark::kMillisecond);

}  // namespace
}  // namespace kvpack_bench
