// cuda::gram_factorize (the xKV / CSKV factorisation on the device) on seeded random matrices
// with decaying spectra: the Eckart–Young optimum, against a double-precision SVD; refusals.
// Attention over low-rank factors (LowRankAttentionHead: fp16 and KIVI bases, RoPE styles,
// partial rotary, YaRN's attention factor) against double-precision attention.
#include <catch2/catch.hpp>
#include <cstdint>
#include <kvpack/backend/cuda/kernels/low_rank_attention.cuh>
#include <kvpack/kvpack.hpp>
#include <memory>
#include <random>
#include <vector>

#include "attention_checks.hpp"
#include "cache_checks.hpp"
#include "low_rank_checks.hpp"

namespace kc = kvpack::cuda;

namespace {

/// rows × cols with singular values decaying as decay^i, plus a little noise.
std::vector<float> decaying(int rows, int cols, double decay, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<double> gauss(0.0, 1.0);
  Eigen::MatrixXd u = Eigen::MatrixXd::NullaryExpr(rows, cols, [&] { return gauss(rng); });
  Eigen::MatrixXd v = Eigen::MatrixXd::NullaryExpr(cols, cols, [&] { return gauss(rng); });
  const Eigen::MatrixXd qu = Eigen::HouseholderQR<Eigen::MatrixXd>(u).householderQ() *
                             Eigen::MatrixXd::Identity(rows, cols);
  const Eigen::MatrixXd qv = Eigen::HouseholderQR<Eigen::MatrixXd>(v).householderQ();
  Eigen::VectorXd s(cols);
  for (int i = 0; i < cols; ++i) s(i) = 10.0 * std::pow(decay, i);
  const Eigen::MatrixXd x = qu * s.asDiagonal() * qv.transpose();
  std::vector<float> out(static_cast<std::size_t>(rows) * cols);
  for (int r = 0; r < rows; ++r) {
    for (int c = 0; c < cols; ++c) {
      out[static_cast<std::size_t>(r) * cols + c] = static_cast<float>(x(r, c) + 1e-3 * gauss(rng));
    }
  }
  return out;
}

}  // namespace

TEST_CASE("CUDA low rank: gram_factorize reaches the Eckart-Young optimum", "[cuda][low_rank]") {
  KVPACK_SKIP_WITHOUT_DEVICE();
  kvpack::test::require_gram_factorize_optimal(decaying(300, 96, 0.9, 1), 300, 96, 8, 1e-7);
  kvpack::test::require_gram_factorize_optimal(decaying(300, 96, 0.95, 2), 300, 96, 40, 1e-7);
  kvpack::test::require_gram_factorize_optimal(decaying(64, 64, 0.8, 3), 64, 64, 64, 1e-7);
  kvpack::test::require_gram_factorize_optimal(decaying(500, 192, 0.97, 4), 500, 192, 1, 1e-7);
}

TEST_CASE("CUDA low rank: bad rank or non-finite input throws and writes nothing",
          "[cuda][low_rank]") {
  KVPACK_SKIP_WITHOUT_DEVICE();
  kc::CudaContext context(0);
  std::vector<float> x(40 * 8, 1.0f);
  auto dx = kvpack::test::upload(x);
  std::vector<float> fill(40 * 8, 7.0f);
  auto basis = kvpack::test::upload(fill);
  auto factors = kvpack::test::upload(fill);
  std::vector<float> singular;
  REQUIRE_THROWS_WITH(
      kc::gram_factorize(context, dx.data(), 40, 8, 9, basis.data(), factors.data(), singular),
      Catch::Contains("rank") && Catch::Contains("min(rows, cols) = 8"));
  REQUIRE_THROWS_WITH(
      kc::gram_factorize(context, dx.data(), 40, 8, 0, basis.data(), factors.data(), singular),
      Catch::Contains("rank"));
  x[17] = NAN;
  auto bad = kvpack::test::upload(x);
  REQUIRE_THROWS(
      kc::gram_factorize(context, bad.data(), 40, 8, 2, basis.data(), factors.data(), singular));
  REQUIRE(kvpack::test::download(basis, fill.size()) == fill);
  REQUIRE(kvpack::test::download(factors, fill.size()) == fill);
  REQUIRE(singular.empty());
}

namespace {

/// A low-rank layer as the CPU store holds it: bases A_k, A_v (fp16 rows, or KIVI blocks per
/// column over whole groups of `group` rows when bits > 0) shared by the kv heads, a factor per
/// head, an fp16 tail of post-RoPE rows.
struct LowRankCase {
  int q_heads = 0, kv_heads = 0, head_dim = 0, rank_k = 0, rank_v = 0, bits = 0, group = 32;
  int64_t factored = 0, tail = 0;
  kvpack::RopeConfig rope;
};

/// ‖out − ref‖ / ‖ref‖ of attention over LowRankAttentionHead (`splits` key splits) against
/// double-precision attention over the keys rebuilt from the decoded bases in double and rotated
/// at their positions in double.
double low_rank_attention_error(const LowRankCase& c, int64_t splits, uint32_t seed) {
  using kvpack::Half;
  namespace test = kvpack::test;
  std::mt19937 rng(seed);
  std::normal_distribution<float> gauss(0.0f, 1.0f);
  const int d = c.head_dim;
  const int64_t size = c.factored + c.tail;
  auto random = [&](std::size_t n, float scale) {
    std::vector<float> x(n);
    for (auto& e : x) e = gauss(rng) * scale;
    return x;
  };
  // Basis columns fall off like PCA latents; the KIVI blocks see per-column scales.
  auto basis_of = [&](int rank) {
    std::vector<float> a = random(static_cast<std::size_t>(c.factored) * rank, 1.0f);
    for (int64_t t = 0; t < c.factored; ++t) {
      for (int j = 0; j < rank; ++j) a[t * rank + j] *= 4.0f / (1.0f + j);
    }
    kvpack::detail::LowRankBasis basis;
    basis.assign(a.data(), c.factored, rank, c.bits, c.group);
    return basis;
  };
  const kvpack::detail::LowRankBasis ak = basis_of(c.rank_k), av = basis_of(c.rank_v);
  std::vector<float> ak_held(c.factored * c.rank_k), av_held(c.factored * c.rank_v);
  ak.load(0, c.factored, ak_held.data());
  av.load(0, c.factored, av_held.data());

  test::HeldAttention held;
  held.q_heads = c.q_heads;
  held.head_dim = d;
  for (int64_t t = 0; t < size; ++t) held.positions.push_back(static_cast<int32_t>(3 + 2 * t));
  held.q_positions = {held.positions.back(), held.positions[c.factored / 2],
                      held.positions[c.factored + c.tail / 2]};
  held.q = random(held.q_positions.size() * c.q_heads * d, 1.0f);
  const kvpack::Rope rope(c.rope, d);
  const std::vector<double>& inv_freq = rope.inv_freq();

  std::vector<std::vector<float>> bk, bv;
  std::vector<std::vector<Half>> tk, tv;
  for (int h = 0; h < c.kv_heads; ++h) {
    bk.push_back(random(static_cast<std::size_t>(c.rank_k) * d, 0.3f));
    bv.push_back(random(static_cast<std::size_t>(c.rank_v) * d, 0.3f));
    std::vector<Half> k(c.tail * d), v(c.tail * d);
    for (auto& x : k) x = kvpack::to_half(gauss(rng));
    for (auto& x : v) x = kvpack::to_half(gauss(rng));
    tk.push_back(k);
    tv.push_back(v);
    std::vector<double> keys(size * d), values(size * d);
    for (int64_t t = 0; t < c.factored; ++t) {
      double* key = &keys[t * d];
      for (int ch = 0; ch < d; ++ch) {
        for (int j = 0; j < c.rank_k; ++j)
          key[ch] += double{ak_held[t * c.rank_k + j]} * bk[h][j * d + ch];
        for (int j = 0; j < c.rank_v; ++j) {
          values[t * d + ch] += double{av_held[t * c.rank_v + j]} * bv[h][j * d + ch];
        }
      }
      for (int i = 0; i < rope.rotary_dim() / 2; ++i) {
        int a = 0, b = 0;
        kvpack::detail::rope_pair(c.rope.style, i, rope.rotary_dim(), a, b);
        const double angle = held.positions[t] * inv_freq[i], f = rope.attention_factor();
        const double x = key[a], y = key[b];
        key[a] = f * (x * std::cos(angle) - y * std::sin(angle));
        key[b] = f * (x * std::sin(angle) + y * std::cos(angle));
      }
    }
    for (int64_t i = 0; i < c.tail * d; ++i) {
      keys[c.factored * d + i] = kvpack::to_float(k[i]);
      values[c.factored * d + i] = kvpack::to_float(v[i]);
    }
    held.k.push_back(keys);
    held.v.push_back(values);
  }

  auto d_ak_blocks = test::upload(ak.blocks), d_av_blocks = test::upload(av.blocks);
  auto d_ak_rows = test::upload(ak.rows), d_av_rows = test::upload(av.rows);
  auto d_positions = test::upload(held.positions);
  auto d_inv_freq = test::upload(inv_freq);
  std::vector<kvpack::cuda::DeviceBuffer<float>> d_factors;
  std::vector<kvpack::cuda::DeviceBuffer<Half>> d_tails;
  const kvpack::cuda::KiviFormat format =
      c.bits > 0 ? kvpack::cuda::KiviFormat::of(c.bits, c.group) : kvpack::cuda::KiviFormat{};
  auto view = [&](const kvpack::detail::LowRankBasis& basis, const auto& blocks, const auto& rows) {
    return kvpack::cuda::LowRankBasisView{
        {blocks.data(), nullptr, basis.quantized_rows(), format}, rows.data(), basis.rank};
  };
  std::vector<kvpack::cuda::LowRankAttentionHead> heads;
  for (int h = 0; h < c.kv_heads; ++h) {
    d_factors.push_back(test::upload(bk[h]));
    d_factors.push_back(test::upload(bv[h]));
    d_tails.push_back(test::upload(tk[h]));
    d_tails.push_back(test::upload(tv[h]));
    heads.push_back(
        {view(ak, d_ak_blocks, d_ak_rows),
         view(av, d_av_blocks, d_av_rows),
         d_factors[2 * h].data(),
         d_factors[2 * h + 1].data(),
         d_tails[2 * h].data(),
         d_tails[2 * h + 1].data(),
         d_positions.data(),
         size,
         c.factored,
         {d_inv_freq.data(), rope.rotary_dim(), c.rope.style, rope.attention_factor()}});
  }
  return test::head_attention_error(heads, held, splits);
}

}  // namespace

TEST_CASE("CUDA low rank: attention over factors and tail equals double-precision attention",
          "[cuda][low_rank]") {
  KVPACK_SKIP_WITHOUT_DEVICE();
  LowRankCase neox;  // ChannelShrink-like: SmolLM2's GQA 3:1, d 64
  neox.q_heads = 9;
  neox.kv_heads = 3;
  neox.head_dim = 64;
  neox.rank_k = 24;
  neox.rank_v = 40;
  neox.factored = 150;
  neox.tail = 21;
  neox.rope.style = kvpack::RopeStyle::kHalfSplit;
  LowRankCase llama = neox;  // interleaved pairs, d 128, 4-bit basis, llama3 frequency scaling
  llama.q_heads = 8;
  llama.kv_heads = 2;
  llama.head_dim = 128;
  llama.rank_k = 32;
  llama.rank_v = 48;
  llama.bits = 4;
  llama.factored = 200;  // 6 whole groups in blocks, 8 fp16 rows
  llama.tail = 7;
  llama.rope.style = kvpack::RopeStyle::kInterleaved;
  llama.rope.theta = 500000.0;
  llama.rope.scaling = kvpack::RopeScaling::kLlama3;
  llama.rope.factor = 8.0;
  llama.rope.original_context = 64;
  LowRankCase partial = neox;  // partial rotary, YaRN's attention factor, 2-bit groups of 16
  partial.q_heads = 4;
  partial.kv_heads = 4;
  partial.rope.rotary_dim = 32;
  partial.rope.scaling = kvpack::RopeScaling::kYarn;
  partial.rope.factor = 4.0;
  partial.rope.original_context = 64;
  partial.bits = 2;
  partial.group = 16;
  partial.factored = 64;
  partial.tail = 40;
  for (int64_t splits : {1, 4}) {
    INFO("splits " << splits);
    CHECK(low_rank_attention_error(neox, splits, 21) < 1e-5);
    CHECK(low_rank_attention_error(llama, splits, 22) < 1e-5);
    CHECK(low_rank_attention_error(partial, splits, 23) < 1e-5);
  }
}

namespace {

/// A CPU low-rank cache after a prefill, compress() and decode tokens: attention_kernel over its
/// own factors (read through low_rank_factors()) equals its attend(), with 1 and 3 key splits.
template <class Policy>
void check_kernel_on_cpu_cache(const char* label, const kvpack::ModelShape& s, const Policy& policy,
                               uint32_t seed) {
  INFO(label << "; d " << s.head_dim << " q_heads " << s.q_heads << " kv_heads " << s.kv_heads);
  kvpack::KVCache<Policy, kvpack::backend::Cpu> cpu(s, policy);
  cache_checks::feed_sequence(s, 260, 0, false, cpu);
  cpu.compress();
  cache_checks::decode_tokens(s, 260, 266, false, cpu);
  REQUIRE(cpu.low_rank_factors(0, 0).factored > 0);
  REQUIRE(cpu.low_rank_factors(0, 1).tokens > cpu.low_rank_factors(0, 1).factored);
  for (int64_t splits : {1, 3}) {
    INFO("splits " << splits);
    const kvpack::test::LowRankKernelAttention<decltype(cpu)> kernel(cpu, splits);
    cache_checks::require_same_attention_everywhere(cpu, kernel, seed);
  }
}

/// Random projections with orthonormal columns for every layer of `s` (rank_k, rank_v).
std::shared_ptr<const kvpack::ChannelProjections> random_projections(const kvpack::ModelShape& s,
                                                                     int rank_k, int rank_v,
                                                                     uint32_t seed) {
  const int c = s.kv_heads * s.head_dim;
  std::vector<std::vector<float>> keys, values;
  for (int l = 0; l < s.layers; ++l) {
    keys.push_back(cache_checks::random_values(static_cast<std::size_t>(4 * c) * c, seed + l));
    values.push_back(
        cache_checks::random_values(static_cast<std::size_t>(4 * c) * c, seed + 9 + l));
  }
  return std::make_shared<const kvpack::ChannelProjections>(
      kvpack::ChannelProjections::calibrate(keys, values, s.kv_heads, s.head_dim, rank_k, rank_v));
}

}  // namespace

TEST_CASE("CUDA low rank: the attention kernel on a CPU low-rank cache's factors equals attend()",
          "[cuda][low_rank]") {
  KVPACK_SKIP_WITHOUT_DEVICE();
  using kvpack::Quantize;
  const kvpack::ModelShape neox{4, 6, 2, 64, {kvpack::RopeStyle::kHalfSplit, 10000.0}};
  kvpack::ModelShape llama{2, 8, 2, 128, {kvpack::RopeStyle::kInterleaved, 500000.0}};
  llama.rope.scaling = kvpack::RopeScaling::kLlama3;
  llama.rope.factor = 8.0;
  llama.rope.original_context = 256;
  for (const kvpack::ModelShape& s : {neox, llama}) {
    check_kernel_on_cpu_cache("xKV", s, kvpack::CrossLayerSVD(2, 20, 30), 400);
    check_kernel_on_cpu_cache(
        "xKV + 4-bit bases", s,
        kvpack::Compose<kvpack::CrossLayerSVD, Quantize>({2, 24, 24}, Quantize(4, 32, 0)), 410);
    const auto projections = random_projections(s, 24, 40, 420);
    check_kernel_on_cpu_cache("CSKV", s, kvpack::ChannelShrink(projections, 32), 430);
    check_kernel_on_cpu_cache("CSKV + 2-bit bases", s,
                              kvpack::Compose<kvpack::ChannelShrink, Quantize>(
                                  kvpack::ChannelShrink(projections, 32), Quantize(2, 16, 0)),
                              440);
  }
}
