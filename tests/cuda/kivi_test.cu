// The KIVI kernels launched directly, on seeded random inputs: block quantization against the
// CPU backend's quantizer (bit for bit; bits 2/4/8, groups 16-128, fp32 and fp16 inputs with
// outliers and signed zeros), and attention over KIVI blocks plus an fp16 residual against
// double-precision attention over the dequantized values, with forced key splits and GQA.
// The same checks run on the reference model's K/V in tests/model/cuda_emulated_model_test.cpp.
#include <catch2/catch.hpp>
#include <cstdint>
#include <random>
#include <vector>

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
                          rows.data(), 1, 64, keys.data(), values.data(), nullptr)),
                      Catch::Contains("not a multiple of the KIVI group 128"));
}
