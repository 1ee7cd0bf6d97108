/// \file bench/batch_bench.cpp
/// \brief Sequences in one page pool (reference-model shape, one layer): one batched decode
/// attend over 16 sequences × 4 K tokens against 16 attend() calls on the same caches, decode
/// appends (one token per call) against the copy baseline, and the page pool's cost per page.

#include <benchmark/benchmark.h>

#include <memory>
#include <vector>

#include "bench_util.hpp"

namespace kvpack_bench {
namespace {

/// 16 sequences of 4 K tokens in one KVCacheBatch, and one decode query per sequence.
struct BatchSetup {
  static constexpr int kSequences = 16;
  kvpack::KVCacheBatch<kvpack::Identity> batch{model_shape()};
  std::vector<std::vector<float>> q, out;
  std::vector<int64_t> last;
  std::vector<kvpack::BatchQuery> entries;

  explicit BatchSetup(int64_t tokens) {
    const KvData& data = kv_data(tokens);
    for (int s = 0; s < kSequences; ++s) {
      fill_layer(batch.add(s), 0, data, tokens);
      q.push_back(query_data(1, 100 + s));
      out.emplace_back(q.back().size());
    }
    last.assign(kSequences, tokens - 1);
    for (int s = 0; s < kSequences; ++s) {
      entries.push_back({s, kvpack::ActivationView::nhd(q[s].data(), 1, kQHeads, kHeadDim),
                         kvpack::Positions(&last[s], 1),
                         kvpack::OutputView::nhd(out[s].data(), 1, kQHeads, kHeadDim)});
    }
  }
  double kv_bytes() const {
    double total = 0;
    for (int s = 0; s < kSequences; ++s) total += batch.sequence(s).bytes();
    return total;
  }
};

BatchSetup& batch_setup(int64_t tokens) {
  static std::map<int64_t, std::unique_ptr<BatchSetup>> setups;
  auto& s = setups[tokens];
  if (!s) s = std::make_unique<BatchSetup>(tokens);
  return *s;
}

/// mode 0: one KVCacheBatch::attend over the 16 sequences; mode 1: 16 KVCache::attend calls.
/// fraction_of_read: the K/V bytes held (what a decode step reads) against the read baseline.
void BM_BatchDecode(benchmark::State& state) {
  BatchSetup& setup = batch_setup(state.range(1));
  const bool batched = state.range(0) == 0;
  for (auto _ : state) {
    if (batched) {
      setup.batch.attend(0, setup.entries);
    } else {
      for (const auto& e : setup.entries) {
        setup.batch.sequence(e.sequence).attend(0, e.q, e.positions, e.out);
      }
    }
    benchmark::ClobberMemory();
  }
  add_fraction(state, Baseline::kRead, setup.kv_bytes());
}
BENCHMARK(BM_BatchDecode)
    ->ArgNames({"single_calls", "tokens"})
    ->Args({0, 4096})
    ->Args({1, 4096})
    ->Unit(benchmark::kMicrosecond);

/// Decode appends: one token per append() call into a fresh cache, as a decode loop does.
/// fraction_of_copy: (fp32 K/V consumed + fp16 K/V stored) against the memcpy rate.
void BM_AppendDecode(benchmark::State& state) {
  const int64_t tokens = state.range(0);
  const KvData& data = kv_data(tokens);
  const int64_t row = static_cast<int64_t>(kKvHeads) * kHeadDim;
  for (auto _ : state) {
    auto cache = std::make_unique<kvpack::KVCache<kvpack::Identity>>(model_shape());
    const double t0 = now_seconds();
    for (int64_t t = 0; t < tokens; ++t) {
      cache->append(0, kvpack::ActivationView::nhd(data.k.data() + t * row, 1, kKvHeads, kHeadDim),
                    kvpack::ActivationView::nhd(data.v.data() + t * row, 1, kKvHeads, kHeadDim),
                    kvpack::Positions(data.positions.data() + t, 1));
    }
    state.SetIterationTime(now_seconds() - t0);
  }
  const double consumed = 2.0 * tokens * row * sizeof(float);
  add_bytes_per_second(state, consumed);
  add_fraction(state, Baseline::kCopy, consumed + consumed / 2);
}
BENCHMARK(BM_AppendDecode)
    ->ArgName("tokens")
    ->Arg(4096)
    ->UseManualTime()
    ->Unit(benchmark::kMillisecond);

/// Page pool: allocate then release `pages` pages (a sequence's worth), per page.
void BM_PagePool(benchmark::State& state) {
  const int64_t pages = state.range(0);
  kvpack::PagePool pool(kvpack::detail::dense_page_bytes<kvpack::Half>(16, kHeadDim), 64);
  std::vector<int32_t> ids(pages);
  for (auto _ : state) {
    for (auto& id : ids) id = pool.allocate().id;
    for (auto id : ids) pool.release(id);
  }
  state.SetItemsProcessed(state.iterations() * pages);  // items: one allocate + one release
}
BENCHMARK(BM_PagePool)->ArgName("pages")->Arg(256)->Unit(benchmark::kMicrosecond);

}  // namespace
}  // namespace kvpack_bench
