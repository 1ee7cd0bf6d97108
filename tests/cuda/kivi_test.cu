// KIVI on the CUDA backend, on seeded random inputs. The kernels launched directly: block
// quantization against the CPU backend's quantizer (bit for bit; bits 2/4/8, groups 16-128, fp32
// and fp16 inputs with outliers and signed zeros), and attention over KIVI blocks plus an fp16
// residual against double-precision attention over the dequantized values, with forced key
// splits and GQA. Then KVCache<Quantize, backend::Cuda> against KVCache<Quantize, backend::Cpu>:
// held values bit for bit, bytes(), attention, truncate and errors; and Compose<A, Quantize>
// (eviction, then KIVI of the kept rows) against the CPU's.
// The kernel checks also run on the reference model's K/V in
// tests/model/cuda_emulated_model_test.cpp.
#include <algorithm>
#include <catch2/catch.hpp>
#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

#include "cache_checks.hpp"
#include "kivi_checks.hpp"

using kvpack::Half;
using kvpack::test::kivi_attention_error;
using kvpack::test::KiviAttentionCase;
using kvpack::test::require_quantize_matches_cpu;

namespace {

std::vector<float> quantize_input(int head_dim, int64_t tokens, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> gauss(0.0f, 2.0f);
  std::vector<float> rows(tokens * head_dim);
  for (auto& x : rows) x = gauss(rng);
  for (int64_t t = 0; t < tokens; t += 5) rows[t * head_dim + t % head_dim] = 40.0f;  // outliers
  for (int c = 0; c < head_dim; c += 7) rows[c] = -0.0f;  // signed zeros: the reference's order
  return rows;
}

KiviAttentionCase random_case(int q_heads, int kv_heads, int head_dim, int64_t size,
                              int64_t residual, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> gauss(0.0f, 1.0f);
  KiviAttentionCase c;
  c.q_heads = q_heads;
  c.kv_heads = kv_heads;
  c.head_dim = head_dim;
  c.size = size;
  c.residual = residual;
  for (int h = 0; h < kv_heads; ++h) {
    c.k.emplace_back(size * head_dim);
    c.v.emplace_back(size * head_dim);
    for (auto& x : c.k.back()) x = gauss(rng) * 2.0f + 0.5f;
    for (auto& x : c.v.back()) x = gauss(rng);
  }
  for (int64_t t = 0; t < size; ++t) c.positions.push_back(static_cast<int32_t>(2 * t + 1));
  // The newest token sees every key; the others stop inside the blocks and inside the residual.
  c.q_positions = {static_cast<int32_t>(2 * size - 1), static_cast<int32_t>(size | 1),
                   static_cast<int32_t>(2 * size - 3)};
  c.q.resize(c.q_positions.size() * q_heads * head_dim);
  for (auto& x : c.q) x = gauss(rng);
  return c;
}

}  // namespace

TEST_CASE("CUDA KIVI: quantize kernels equal the CPU quantizer bit for bit", "[cuda]") {
  KVPACK_SKIP_WITHOUT_DEVICE();
  require_quantize_matches_cpu<4, 32, float>(quantize_input(128, 96, 1), 128);
  require_quantize_matches_cpu<4, 32, Half>(quantize_input(64, 64, 2), 64);
  require_quantize_matches_cpu<2, 32, float>(quantize_input(64, 64, 3), 64);
  require_quantize_matches_cpu<8, 32, Half>(quantize_input(128, 32, 4), 128);
  require_quantize_matches_cpu<2, 16, float>(quantize_input(64, 32, 5), 64);
  require_quantize_matches_cpu<4, 64, float>(quantize_input(128, 64, 6), 128);
  require_quantize_matches_cpu<8, 128, Half>(quantize_input(128, 128, 7), 128);
}

TEST_CASE("CUDA KIVI: attention over blocks and residual equals double-precision attention",
          "[cuda]") {
  KVPACK_SKIP_WITHOUT_DEVICE();
  const auto a = random_case(4, 2, 64, 200, 40, 11);
  const auto b = random_case(6, 2, 128, 150, 20, 12);
  const auto c = random_case(3, 3, 64, 97, 0, 13);
  const auto d = random_case(8, 1, 128, 300, 64, 14);
  for (int64_t splits : {1, 3, 16}) {
    INFO("splits " << splits);
    CHECK(kivi_attention_error<4, 32>(a, splits) < 1e-5);
    CHECK(kivi_attention_error<2, 32>(b, splits) < 1e-5);
    CHECK(kivi_attention_error<8, 16>(c, splits) < 1e-5);
    CHECK(kivi_attention_error<4, 128>(d, splits) < 1e-5);
  }
}

TEST_CASE("CUDA KIVI: a head_dim that is not whole groups is refused", "[cuda]") {
  KVPACK_SKIP_WITHOUT_DEVICE();
  kvpack::cuda::DeviceBuffer<float> rows(64 * 64, 0);
  kvpack::cuda::DeviceBuffer<kvpack::QuantBlock<4, 128>> keys(64, 0), values(64, 0);
  REQUIRE_THROWS_WITH((kvpack::cuda::launch_quantize_rows<4, 128, float>(
                          rows.data(), rows.data(), 1, 64, keys.data(), values.data(), nullptr)),
                      Catch::Contains("not a multiple of the KIVI group 128"));
}

namespace {

using cache_checks::decode_tokens;
using cache_checks::error_of;
using cache_checks::feed;
using cache_checks::position_of;
using cache_checks::random_values;
using kvpack::Budget;
using kvpack::BudgetScope;
using kvpack::KVCache;
using kvpack::ModelShape;
using kvpack::Quantize;
namespace backend = kvpack::backend;

/// What a KIVI CUDA cache holds when head (l, h) has quantized_of(l, h) tokens in blocks: per
/// head the key and value blocks of those tokens, fp16 K/V rows of the rest, one int32 position
/// (and `score_bytes` of score) per token, and the bookkeeping at the CPU cache's per-head and
/// per-layer sizes.
template <class CudaCache, class QuantizedOf>
std::size_t kivi_bytes(const CudaCache& gpu, const Quantize& p, QuantizedOf&& quantized_of,
                       std::size_t score_bytes) {
  const ModelShape& s = gpu.shape();
  std::size_t block = 0;
  kvpack::dispatch_quant(p.bits, p.group, [&](auto b, auto g) {
    block = sizeof(kvpack::QuantBlock<decltype(b)::value, decltype(g)::value>);
  });
  std::size_t total =
      static_cast<std::size_t>(s.layers) * s.kv_heads * sizeof(kvpack::detail::QuantizedHeadStore) +
      static_cast<std::size_t>(s.layers) * sizeof(kvpack::detail::LayerState);
  for (int l = 0; l < s.layers; ++l) {
    for (int h = 0; h < s.kv_heads; ++h) {
      const std::size_t tokens = static_cast<std::size_t>(gpu.tokens(l, h));
      const std::size_t q = static_cast<std::size_t>(quantized_of(l, h));
      total += (tokens - q) * 2 * s.head_dim * sizeof(Half) +
               tokens * (sizeof(int32_t) + score_bytes) + q / p.group * s.head_dim * block +
               q * (s.head_dim / p.group) * block;
    }
  }
  return total;
}

/// kivi_bytes of KVCache<Quantize, backend::Cuda> whose layer l holds quantized[l] tokens in
/// blocks on every head.
template <class CudaCache>
std::size_t kivi_held_bytes(const CudaCache& gpu, const std::vector<int64_t>& quantized) {
  return kivi_bytes(
      gpu, gpu.policy(), [&](int l, int) { return quantized[l]; }, 0);
}

/// compress() on both caches; `quantized` follows KIVI's rule: every whole group older than the
/// newest `residual` tokens becomes blocks.
template <class CpuCache, class CudaCache>
void compress_both(CpuCache& cpu, CudaCache& gpu, std::vector<int64_t>& quantized) {
  cpu.compress();
  gpu.compress();
  const Quantize& p = gpu.policy();
  for (std::size_t l = 0; l < quantized.size(); ++l) {
    const int64_t tail = gpu.tokens(static_cast<int>(l), 0) - quantized[l];
    if (tail > p.residual) quantized[l] += (tail - p.residual) / p.group * p.group;
  }
}

}  // namespace

TEST_CASE("CUDA Quantize cache: blocks, residual, bytes and attention equal the CPU's",
          "[cuda][kivi]") {
  KVPACK_SKIP_WITHOUT_DEVICE();
  // One knob set per shape (kShapes: GQA groups 1, 3, 8, 8; head_dim 64, 128, 64, 128):
  // every bit width, group 16 to 128, residual 0 to 128.
  const Quantize knobs[] = {Quantize(4, 32, 128), Quantize(2, 16, 32), Quantize(8, 64, 0),
                            Quantize(4, 128, 128)};
  uint32_t seed = 200;
  for (std::size_t i = 0; i < cache_checks::kShapes.size(); ++i) {
    const ModelShape& s = cache_checks::kShapes[i];
    const Quantize& policy = knobs[i];
    INFO("q_heads " << s.q_heads << " kv_heads " << s.kv_heads << " d " << s.head_dim << "; bits "
                    << policy.bits << " group " << policy.group << " residual " << policy.residual);
    KVCache<Quantize, backend::Cpu> cpu(s, policy);
    KVCache<Quantize, backend::Cuda> gpu(s, policy);
    std::vector<int64_t> quantized(s.layers, 0);
    cache_checks::feed_sequence(s, 260, 6, false, cpu, gpu);
    cache_checks::require_same_state(cpu, gpu, kivi_held_bytes(gpu, quantized));
    compress_both(cpu, gpu, quantized);
    REQUIRE(quantized[0] > 0);
    cache_checks::require_same_state(cpu, gpu, kivi_held_bytes(gpu, quantized));
    cache_checks::require_same_attention_everywhere(cpu, gpu, seed++);
    // Decoding goes on: the groups that leave the window are quantized by the next compress.
    decode_tokens(s, 266, 336, false, cpu, gpu);
    cache_checks::require_same_attention_everywhere(cpu, gpu, seed++);
    compress_both(cpu, gpu, quantized);
    cache_checks::require_same_state(cpu, gpu, kivi_held_bytes(gpu, quantized));
    cache_checks::require_same_attention_everywhere(cpu, gpu, seed++);
  }
}

/// Compose<A, Quantize> on both backends: A's eviction over blocks and residual (a head that
/// loses tokens keeps the rest as fp16 rows, its blocks decoded as the CPU's keep() decodes
/// them), then KIVI of the kept rows; a second round of decoding makes the eviction meet
/// quantized tokens. `observe(cpu, gpu)` feeds a query-scored A before the first compress().
template <class A, class Observe>
void check_compose(const ModelShape& s, const A& selection, const Quantize& quant,
                   Observe&& observe, uint32_t seed) {
  using P = kvpack::Compose<A, Quantize>;
  INFO(A::name << " + KIVI " << quant.bits << "-bit group " << quant.group << "; q_heads "
               << s.q_heads << " kv_heads " << s.kv_heads << " d " << s.head_dim);
  const P policy(selection, quant);
  KVCache<P, backend::Cpu> cpu(s, policy);
  KVCache<P, backend::Cuda> gpu(s, policy);
  constexpr std::size_t score = kvpack::cuda::is_query_scored_policy<A>::value ||
                                        kvpack::cuda::is_hidden_scored_policy<A>::value
                                    ? sizeof(float)
                                    : 0;
  auto held = [&] {
    return kivi_bytes(
        gpu, quant, [&](int l, int h) { return cpu.kivi_pages(l, h).quantized; }, score);
  };
  cache_checks::feed_sequence(s, 260, 0, false, cpu, gpu);
  observe(cpu, gpu);
  for (int round = 0; round < 2; ++round) {
    cpu.compress();
    gpu.compress();
    REQUIRE(cpu.kivi_pages(0, 0).quantized > 0);
    cache_checks::require_same_state(cpu, gpu, held());
    cache_checks::require_same_attention_everywhere(cpu, gpu, seed++);
    decode_tokens(s, 260 + 70 * round, 330 + 70 * round, false, cpu, gpu);
  }
}

TEST_CASE("CUDA Compose<A, Quantize>: eviction then KIVI, blocks and kept sets equal the CPU's",
          "[cuda][kivi][eviction]") {
  KVPACK_SKIP_WITHOUT_DEVICE();
  const auto no_observe = [](auto&, auto&) {};
  Budget half = Budget::ratio(0.5);
  half.sink_tokens = 4;
  half.recent_tokens = 16;
  // L2 scores keys decoded from their blocks in the second round.
  check_compose(cache_checks::kShapes[1], kvpack::L2NormEvict(half, 0), Quantize(4, 32, 32),
                no_observe, 300);
  check_compose(cache_checks::kShapes[3], kvpack::L2NormEvict(half, 0), Quantize(2, 16, 0),
                no_observe, 310);
  check_compose(cache_checks::kShapes[2], kvpack::StreamingLLM(half), Quantize(8, 64, 64),
                no_observe, 320);
  // KVzip (the demo's kvzip + quant4 row) under one global threshold: scores from a repeat
  // pass before the first compress.
  const ModelShape s = cache_checks::kShapes[1];
  auto repeat_pass = [&](auto& cpu, auto& gpu) {
    for (int l = 0; l < s.layers; ++l) {
      const auto q = random_values(20 * s.q_heads * s.head_dim, 330 + l, 1.5f);
      const auto qv = kvpack::ActivationView::nhd(q.data(), 20, s.q_heads, s.head_dim);
      cpu.observe(l, qv, cache_checks::positions_range(240, 20));
      gpu.observe(l, qv, cache_checks::positions_range(240, 20));
    }
  };
  check_compose(s, kvpack::ReconstructionEvict(Budget::ratio(0.4, BudgetScope::kGlobal)),
                Quantize(4, 32, 32), repeat_pass, 340);
  // observe() after compress() quantized the layers: keys in blocks are scored decoded, as the
  // CPU scores them, and the next compress() keeps the same tokens.
  using P = kvpack::Compose<kvpack::ReconstructionEvict, Quantize>;
  const P policy(kvpack::ReconstructionEvict(Budget::ratio(0.5)), Quantize(4, 32, 32));
  KVCache<P, backend::Cpu> cpu(s, policy);
  KVCache<P, backend::Cuda> gpu(s, policy);
  cache_checks::feed_sequence(s, 200, 0, false, cpu, gpu);
  for (uint32_t round = 0; round < 2; ++round) {
    const auto q = random_values(4 * s.q_heads * s.head_dim, 350 + round, 1.5f);
    const auto qv = kvpack::ActivationView::nhd(q.data(), 4, s.q_heads, s.head_dim);
    for (int l = 0; l < s.layers; ++l) {
      cpu.observe(l, qv, cache_checks::positions_range(196, 4));
      gpu.observe(l, qv, cache_checks::positions_range(196, 4));
    }
    for (int l = 0; l < s.layers; ++l) {
      for (int h = 0; h < s.kv_heads; ++h) {
        INFO("round " << round << " layer " << l << " head " << h);
        REQUIRE((round == 0 || cpu.kivi_pages(l, h).quantized > 0));
        const auto a = cpu.token_scores(l, h);
        const auto b = gpu.token_scores(l, h);
        REQUIRE(a.size() == b.size());
        for (std::size_t t = 0; t < a.size(); ++t) {
          REQUIRE(std::isnan(a[t]) == std::isnan(b[t]));
          if (!std::isnan(a[t])) REQUIRE(std::fabs(a[t] - b[t]) <= 1e-5f * std::fabs(a[t]) + 1e-7f);
        }
      }
    }
    cpu.compress();
    gpu.compress();
    cache_checks::require_same_state(
        cpu, gpu,
        kivi_bytes(
            gpu, policy.second, [&](int l, int h) { return cpu.kivi_pages(l, h).quantized; },
            sizeof(float)));
  }
}

TEST_CASE("CUDA Quantize cache: truncate keeps whole groups, knob errors as on the CPU",
          "[cuda][kivi][errors]") {
  KVPACK_SKIP_WITHOUT_DEVICE();
  const ModelShape s = cache_checks::kShapes[1];
  const Quantize policy(4, 32, 32);
  KVCache<Quantize, backend::Cpu> cpu(s, policy);
  KVCache<Quantize, backend::Cuda> gpu(s, policy);
  std::vector<int64_t> quantized(s.layers, 0);
  for (int l = 0; l < s.layers; ++l) feed(s, l, 0, 200, l % 2, false, cpu, gpu);
  compress_both(cpu, gpu, quantized);
  REQUIRE(quantized[0] == 160);  // (200 - 32) / 32 whole groups; 40 fp16 rows

  // Residual rows roll back; a cut inside a group is refused with the CPU's message and
  // changes nothing; a cut at a group's end drops the groups after it.
  cpu.truncate(position_of(179));
  gpu.truncate(position_of(179));
  cache_checks::require_same_state(cpu, gpu, kivi_held_bytes(gpu, quantized));
  const std::string split = error_of([&] { gpu.truncate(position_of(150)); });
  REQUIRE(split == error_of([&] { cpu.truncate(position_of(150)); }));
  REQUIRE_THAT(split, Catch::Contains("would cut inside a quantized group"));
  cache_checks::require_same_state(cpu, gpu, kivi_held_bytes(gpu, quantized));
  cpu.truncate(position_of(127));
  gpu.truncate(position_of(127));
  for (auto& q : quantized) q = 128;
  cache_checks::require_same_state(cpu, gpu, kivi_held_bytes(gpu, quantized));
  cache_checks::require_same_attention_everywhere(cpu, gpu, 31);
  // Appends after the rollback: the residual regrows and is quantized again.
  for (int l = 0; l < s.layers; ++l) feed(s, l, 128, 100, 2, false, cpu, gpu);
  compress_both(cpu, gpu, quantized);
  cache_checks::require_same_state(cpu, gpu, kivi_held_bytes(gpu, quantized));
  cache_checks::require_same_attention_everywhere(cpu, gpu, 32);
  REQUIRE(gpu.reserved_bytes() > 0);
  gpu.clear();
  REQUIRE(gpu.reserved_bytes() == 0);

  using Gpu = KVCache<Quantize, backend::Cuda>;
  using Cpu = KVCache<Quantize, backend::Cpu>;
  const ModelShape d64 = cache_checks::kShapes[0];
  for (const Quantize& bad :
       {Quantize(3), Quantize(4, 48), Quantize(4, 32, 40), Quantize(4, 32, -32)}) {
    REQUIRE(error_of([&] { Gpu g(d64, bad); }) == error_of([&] { Cpu c(d64, bad); }));
  }
  const std::string too_wide = error_of([&] { Gpu g(d64, Quantize(4, 128)); });
  REQUIRE(too_wide == error_of([&] { Cpu c(d64, Quantize(4, 128)); }));
  REQUIRE_THAT(too_wide, Catch::Contains("a divisor of head_dim"));
}
