// The thread-safety contract under load: one writer per cache (append, observe, compress), caches
// on different threads at once, then many concurrent attend() readers on each compressed cache.
// Built a second time under ThreadSanitizer (scripts/run_sanitizers.sh), without OpenMP so that
// only kvpack's own synchronisation is checked.
#include <atomic>
#include <catch2/catch.hpp>
#include <kvpack/kvpack.hpp>
#include <thread>
#include <vector>

#include "test_util.hpp"

using kvpack::ActivationView;
using kvpack::Budget;
using kvpack::BudgetScope;
using kvpack::OutputView;

namespace {

const kvpack::ModelShape kShape{2, 8, 2, 64, {}};
constexpr int64_t kTokens = 384;

/// Fills every layer, scores with a repeat-pass-like block of queries when the policy asks for
/// it, appends 8 decode tokens and compresses. One thread per cache.
template <class Cache>
void write(Cache& cache, uint32_t seed) {
  for (int l = 0; l < kShape.layers; ++l) kvpack_test::fill_layer(cache, l, kTokens, seed + l, 96);
  if constexpr (Cache::policy_type::needs_observe) {
    const auto q = kvpack_test::random_values(32 * 8 * 64, seed + 7);
    for (int l = 0; l < kShape.layers; ++l) {
      cache.observe(l, ActivationView::nhd(q.data(), 32, 8, 64),
                    kvpack_test::iota_positions(32, kTokens - 32));
    }
  }
  cache.compress();
  kvpack_test::append_decode_tokens(cache, kTokens, 8, seed + 11);
  cache.compress();
}

/// attend() of one decode query per layer.
template <class Cache>
std::vector<float> read(const Cache& cache, uint32_t seed) {
  const auto q = kvpack_test::random_values(kShape.layers * 8 * 64, seed);
  std::vector<float> out(q.size());
  for (int l = 0; l < kShape.layers; ++l) {
    cache.attend(l, ActivationView::nhd(q.data() + l * 8 * 64, 1, 8, 64),
                 std::vector<int64_t>{kTokens + 7},
                 OutputView::nhd(out.data() + l * 8 * 64, 1, 8, 64));
  }
  return out;
}

/// Writers of `caches` run at once; then `readers` threads per cache attend concurrently, each
/// result equal (bit for bit) to the same call made alone.
template <class Cache>
void stress(std::vector<Cache>& caches, int readers) {
  std::vector<std::thread> threads;
  for (std::size_t i = 0; i < caches.size(); ++i) {
    threads.emplace_back([&, i] { write(caches[i], 100 + 17 * static_cast<uint32_t>(i)); });
  }
  for (auto& t : threads) t.join();
  threads.clear();
  std::vector<std::vector<float>> alone;
  for (const auto& cache : caches) alone.push_back(read(cache, 5));
  std::atomic<int> mismatches{0};
  std::atomic<bool> go{false};
  for (std::size_t i = 0; i < caches.size(); ++i) {
    for (int r = 0; r < readers; ++r) {
      threads.emplace_back([&, i] {
        while (!go.load()) std::this_thread::yield();
        for (int rep = 0; rep < 3; ++rep) mismatches += read(caches[i], 5) != alone[i];
      });
    }
  }
  go = true;
  for (auto& t : threads) t.join();
  REQUIRE(mismatches.load() == 0);
}

}  // namespace

TEST_CASE("Caches written on their own threads, then read by concurrent attend calls",
          "[threads]") {
  SECTION("fp16 rows, L2 eviction, KIVI, KVzip global, xKV") {
    std::vector<kvpack::KVCache<kvpack::Identity>> dense(3,
                                                         kvpack::KVCache<kvpack::Identity>(kShape));
    stress(dense, 3);
    Budget global = Budget::ratio(0.4, BudgetScope::kGlobal);
    global.sink_tokens = 4;
    std::vector<kvpack::KVCache<kvpack::L2NormEvict>> l2(
        3, kvpack::KVCache<kvpack::L2NormEvict>(kShape, kvpack::L2NormEvict(global, 0)));
    stress(l2, 3);
    std::vector<kvpack::KVCache<kvpack::Quantize>> quant(
        3, kvpack::KVCache<kvpack::Quantize>(kShape, kvpack::Quantize(4, 32, 64)));
    stress(quant, 3);
    std::vector<kvpack::KVCache<kvpack::ReconstructionEvict>> kvzip(
        2,
        kvpack::KVCache<kvpack::ReconstructionEvict>(kShape, kvpack::ReconstructionEvict(global)));
    stress(kvzip, 3);
    std::vector<kvpack::KVCache<kvpack::CrossLayerSVD>> xkv(
        2, kvpack::KVCache<kvpack::CrossLayerSVD>(kShape, kvpack::CrossLayerSVD(2, 16, 24)));
    stress(xkv, 3);
  }
}
