// Quantize::int8_query: KIVI key scores from an int8 query (quant/int8_query.hpp). The reference
// against exact double scores and its error bound, the AVX2 and AVX-512 VNNI kernels against the
// reference, and attend with the knob against attend without it and across instruction sets.
#include <algorithm>
#include <catch2/catch.hpp>
#include <cmath>
#include <cstdint>
#include <kvpack/kvpack.hpp>
#include <random>
#include <utility>
#include <vector>

#include "test_util.hpp"

using kvpack::Half;
using kvpack::QuantBlock;
using kvpack::Quantize;

namespace {

/// d random key blocks: fp16 scales in [1e-3, 0.3], minima around 0, random codes.
template <int Bits, int G>
std::vector<QuantBlock<Bits, G>> random_key_group(int d, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_int_distribution<int> byte(0, 255);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<QuantBlock<Bits, G>> kb(d);
  for (auto& b : kb) {
    b.scale = kvpack::to_half(std::fabs(normal(rng)) * 0.1f + 1e-3f);
    b.min = kvpack::to_half(normal(rng));
    for (auto& c : b.codes) c = static_cast<uint8_t>(byte(rng));
  }
  return kb;
}

/// Checks the int8-query scores of R rows against one key group: the reference within
/// α/2 · Σ_c code_ct of the exact (double) score, and `kernel` (through int8_key_group_scores)
/// equal to the reference up to the fp32 order of the bias sum.
template <int R, int Bits, int G>
void check_group(int d, uint32_t seed, int kernel) {
  INFO("rows " << R << ", bits " << Bits << ", group " << G << ", head_dim " << d);
  const auto kb = random_key_group<Bits, G>(d, seed);
  const auto q = kvpack_test::random_values(static_cast<std::size_t>(R) * d, seed + 1);
  std::vector<float> ref(R * G), got(R * G), w((R + 1) * d),
      w2(kvpack::detail::int8_key_scratch_floats(R, d));
  kvpack::detail::int8_query_group_scores<Bits, G>(
      kb.data(), d, q.data(), R, ref.data(), G, w.data(), reinterpret_cast<int8_t*>(w.data() + d));
#if defined(KVPACK_X86_DISPATCH)
  kvpack::detail::int8_key_group_scores<R, Bits, G>(
      static_cast<kvpack::detail::Int8KeyKernel>(kernel), kb.data(), d, q.data(), got.data(), G,
      w2.data());
#else
  (void)kernel;
  got = ref;
#endif
  double worst_bound = 0.0, worst_kernel = 0.0;
  for (int r = 0; r < R; ++r) {
    double amax = 0.0;
    for (int c = 0; c < d; ++c) {
      amax = std::max(amax, std::fabs(double{q[r * d + c] * kvpack::to_float(kb[c].scale)}));
    }
    for (int t = 0; t < G; ++t) {
      double exact = 0.0, codes = 0.0, magnitude = 0.0;
      for (int c = 0; c < d; ++c) {
        const double code = kvpack::detail::get_code<Bits>(kb[c].codes, t);
        const double k = code * kvpack::to_float(kb[c].scale) + kvpack::to_float(kb[c].min);
        exact += q[r * d + c] * k;
        codes += code;
        magnitude += std::fabs(q[r * d + c] * k);
      }
      // α/2 per code unit, plus fp32 rounding of the bias sum and the final fma.
      const double bound = amax / 127.0 / 2.0 * codes + 1e-5 * magnitude;
      worst_bound = std::max(worst_bound, std::fabs(ref[r * G + t] - exact) / bound);
      worst_kernel = std::max(worst_kernel, std::fabs(double{got[r * G + t]} - ref[r * G + t]) /
                                                (1e-6 * (magnitude + 1.0)));
    }
  }
  CHECK(worst_bound <= 1.0);
  CHECK(worst_kernel <= 1.0);
}

/// The same check on the largest code sums: every code at its maximum and a query of one sign,
/// so every int8 query byte is ±127 (the 16-bit partial sums of the AVX2 4-bit kernel at their
/// bound, 8 · 2 · 15 · 127; 8-bit codes that vpmaddubsw would saturate).
template <int R, int Bits, int G>
void check_extreme_group(int d, float sign, int kernel) {
  INFO("extreme codes, rows " << R << ", bits " << Bits << ", sign " << sign);
  std::vector<QuantBlock<Bits, G>> kb(d);
  for (auto& b : kb) {
    b.scale = kvpack::to_half(0.125f);
    b.min = kvpack::to_half(-1.0f);
    for (auto& c : b.codes) c = 0xFF;
  }
  std::vector<float> q(static_cast<std::size_t>(R) * d, sign * 0.5f), ref(R * G), got(R * G);
  std::vector<float> w((R + 1) * d), w2(kvpack::detail::int8_key_scratch_floats(R, d));
  kvpack::detail::int8_query_group_scores<Bits, G>(
      kb.data(), d, q.data(), R, ref.data(), G, w.data(), reinterpret_cast<int8_t*>(w.data() + d));
  const float want = sign * 0.5f * d * (0.125f * ((1 << Bits) - 1) - 1.0f);
  for (float x : ref) REQUIRE(x == Approx(want).epsilon(1e-6));
#if defined(KVPACK_X86_DISPATCH)
  kvpack::detail::int8_key_group_scores<R, Bits, G>(
      static_cast<kvpack::detail::Int8KeyKernel>(kernel), kb.data(), d, q.data(), got.data(), G,
      w2.data());
  for (int i = 0; i < R * G; ++i) CHECK(got[i] == Approx(ref[i]).epsilon(1e-6));
#else
  (void)kernel;
#endif
}

/// Decode attend of one query token over layer 0 of a Quantize cache (n seeded tokens).
std::vector<float> attend_kivi(const kvpack::ModelShape& shape, const Quantize& policy, int64_t n) {
  kvpack::KVCache<Quantize> cache(shape, policy);
  kvpack_test::fill_layer(cache, 0, n, 31, 250);
  cache.compress();
  return kvpack_test::attend_decode(cache, n, 32, 2.0f);
}

}  // namespace

TEST_CASE("int8 query: quantize_query_int8 rounds to the nearest step of max|w| / 127",
          "[quantize][int8_query]") {
  for (const uint32_t seed : {1u, 2u, 3u}) {
    const int n = 80;
    auto w = kvpack_test::random_values(n, seed, 0.3f);
    w[7] = -2.0f;  // the largest magnitude: −127 exactly
    std::vector<int8_t> w8(n);
    const float alpha = kvpack::detail::quantize_query_int8(w.data(), n, w8.data());
    CHECK(alpha == 2.0f / 127.0f);
    CHECK(w8[7] == -127);
    for (int c = 0; c < n; ++c) {
      INFO("channel " << c);
      CHECK(std::fabs(w[c] - alpha * w8[c]) <= alpha / 2 * (1 + 1e-5));
    }
  }
  std::vector<float> zero(16, 0.0f);
  std::vector<int8_t> w8(16, 5);
  CHECK(kvpack::detail::quantize_query_int8(zero.data(), 16, w8.data()) == 0.0f);
  CHECK(std::all_of(w8.begin(), w8.end(), [](int8_t x) { return x == 0; }));
}

TEST_CASE(
    "int8 query: group scores stay within α/2 · Σ code of the exact score, every kernel "
    "equal to the reference",
    "[quantize][int8_query][isa]") {
#if defined(KVPACK_X86_DISPATCH)
  using kvpack::detail::Int8KeyKernel;
  std::vector<int> kernels{static_cast<int>(Int8KeyKernel::kReference)};
  if (kvpack::cpu_isa_supported() >= kvpack::Isa::kAvx2) {
    kernels.push_back(static_cast<int>(Int8KeyKernel::kAvx2));
  } else {
    WARN("no AVX2 here: the AVX2 kernel is not checked");
  }
  if (kvpack::detail::cpu_has_avx512_vnni_vbmi()) {
    kernels.push_back(static_cast<int>(Int8KeyKernel::kAvx512Vnni));
  } else {
    WARN("no AVX-512 VNNI + VBMI here: the VNNI kernel is not checked");
  }
#else
  const std::vector<int> kernels{0};
#endif
  for (const int use : kernels) {
    INFO("kernel " << use);
    for (int d : {16, 64, 80, 128}) {
      check_group<1, 4, 32>(d, 11, use);
      check_group<3, 4, 32>(d, 12, use);
      check_group<4, 4, 64>(d, 13, use);
      check_group<2, 8, 32>(d, 14, use);
      check_group<4, 8, 128>(d, 15, use);
      check_group<3, 2, 32>(d, 16, use);  // no integer-dot kernel: the reference
      check_group<2, 4, 16>(d, 17, use);  // idem
      for (const float sign : {1.0f, -1.0f}) {
        check_extreme_group<4, 4, 32>(d, sign, use);
        check_extreme_group<3, 8, 64>(d, sign, use);
      }
    }
  }
}

TEST_CASE(
    "int8 query: attend adds little to the KIVI error at 4 bits and agrees across "
    "instruction sets",
    "[quantize][int8_query][isa]") {
  const kvpack::ModelShape shape{1, 6, 2, 64, {}};
  const int d = shape.head_dim, group = shape.q_heads / shape.kv_heads;
  const int64_t n = 900;
  // The double-precision attention of the fp32 K/V fill_layer appends (seeds 31, 1031).
  const auto k = kvpack_test::random_values(n * shape.kv_heads * d, 31);
  const auto v = kvpack_test::random_values(n * shape.kv_heads * d, 31 + 1000);
  const auto q = kvpack_test::random_values(shape.q_heads * d, 32, 2.0f);
  const auto error = [&](const std::vector<float>& out) {
    double worst = 0.0;
    for (int h = 0; h < shape.q_heads; ++h) {
      std::vector<float> kh(n * d), vh(n * d);
      for (int64_t t = 0; t < n; ++t) {
        for (int c = 0; c < d; ++c) {
          kh[t * d + c] = k[(t * shape.kv_heads + h / group) * d + c];
          vh[t * d + c] = v[(t * shape.kv_heads + h / group) * d + c];
        }
      }
      const auto want = kvpack_test::reference_attention(q.data() + h * d, kh, vh,
                                                         kvpack_test::iota_positions(n), n - 1, d);
      worst = std::max(worst, kvpack_test::max_relative_row_error(out.data() + h * d, want));
    }
    return worst;
  };
  for (int bits : {4, 8}) {
    INFO("bits " << bits);
    Quantize exact(bits, 32, 128), int8 = exact;
    int8.int8_query = true;
    std::vector<float> first;
    for (const auto isa : kvpack_test::supported_isas()) {
      INFO("instruction set " << kvpack::isa_name(isa));
      kvpack_test::IsaScope scope(isa);
      const auto want = attend_kivi(shape, exact, n);
      const auto got = attend_kivi(shape, int8, n);
      const double exact_error = error(want), int8_error = error(got);
      INFO("relative error: exact scores " << exact_error << ", int8 query " << int8_error);
      if (isa == kvpack::Isa::kScalar) {
        CHECK(got == want);  // the knob serves the fused decode kernels only
        continue;
      }
      CHECK(got != want);  // the knob took effect
      // The query's rounding (≤ α/2 per code unit) is small beside the keys' own (≤ scale/2 per
      // channel) at 4 bits (here 0.208 against 0.179); at 8 bits it dominates (0.041 against
      // 0.0091), which Quantize::int8_query's comment says.
      CHECK(int8_error <= (bits == 8 ? 6.0 : 1.25) * exact_error);
      if (first.empty()) first = got;
      CHECK(kvpack_test::max_abs_difference(got, first) < 1e-5);  // AVX2 and VNNI kernels agree
    }
  }
}

TEST_CASE("int8 query: formats without the integer-dot kernel are refused, the cache unbuilt",
          "[quantize][int8_query][errors]") {
  const kvpack::ModelShape shape{1, 6, 2, 64, {}};
  for (const auto& [bits, group] : {std::pair{2, 32}, std::pair{4, 16}}) {
    Quantize policy(bits, group, 128);
    policy.int8_query = true;
    CHECK_THROWS_WITH(kvpack::KVCache<Quantize>(shape, policy),
                      Catch::Contains("int8_query") && Catch::Contains("bits 4 or 8"));
    policy.int8_query = false;
    CHECK_NOTHROW(kvpack::KVCache<Quantize>(shape, policy));
  }
}
