// cuda::gram_factorize (the xKV / CSKV factorisation on the device) on seeded random matrices
// with decaying spectra: the Eckart–Young optimum, against a double-precision SVD; refusals.
// Attention over low-rank factors (LowRankAttentionHead: fp16 and KIVI bases, RoPE styles,
// partial rotary, YaRN's attention factor) against double-precision attention.
#include <catch2/catch.hpp>
#include <cstdint>
#include <kvpack/backend/cuda.hpp>  // first: it includes Eigen under nvcc's warning 20012 suppression
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
  auto pool = std::make_shared<kvpack::PagePool>(4096, 8);
  auto basis_of = [&](int rank) {
    std::vector<float> a = random(static_cast<std::size_t>(c.factored) * rank, 1.0f);
    for (int64_t t = 0; t < c.factored; ++t) {
      for (int j = 0; j < rank; ++j) a[t * rank + j] *= 4.0f / (1.0f + j);
    }
    kvpack::detail::LowRankBasis basis;
    basis.assign(a.data(), c.factored, rank, c.bits, c.group, pool);
    return basis;
  };
  const kvpack::detail::LowRankBasis ak = basis_of(c.rank_k), av = basis_of(c.rank_v);
  std::vector<uint8_t> ak_blocks, av_blocks;  // unpaged, as the device kernels read them
  std::vector<Half> ak_rows, av_rows;
  ak.gather(ak_blocks, ak_rows);
  av.gather(av_blocks, av_rows);
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

  auto d_ak_blocks = test::upload(ak_blocks), d_av_blocks = test::upload(av_blocks);
  auto d_ak_rows = test::upload(ak_rows), d_av_rows = test::upload(av_rows);
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

namespace {

using LayerRows = std::vector<std::vector<float>>;  // [layer · kv_heads + head][tokens · d]

/// Keys (un-rotated to pre-RoPE on the host, in double) or values of every head of `cache`.
template <class Cache>
LayerRows held_rows(const Cache& cache, bool keys) {
  const kvpack::ModelShape& s = cache.shape();
  const kvpack::Rope rope(s.rope, s.head_dim);
  LayerRows rows;
  for (int l = 0; l < s.layers; ++l) {
    const kvpack::DenseLayer held = cache.materialize(l);
    for (const kvpack::DenseHead& head : held.heads) {
      std::vector<float> x = keys ? head.k : head.v;
      for (std::size_t t = 0; keys && t < head.positions.size(); ++t) {
        rope.unrotate(x.data() + t * s.head_dim, head.positions[t]);
      }
      rows.push_back(std::move(x));
    }
  }
  return rows;
}

/// The low-rank state of the CUDA cache equals the CPU cache's: tokens, positions and bytes()
/// exactly, rebuilt rows and attention within `tolerance` (normalised).
template <class Policy>
void require_same_low_rank(const kvpack::KVCache<Policy, kvpack::backend::Cpu>& cpu,
                           const kvpack::KVCache<Policy, kvpack::backend::Cuda>& gpu,
                           double tolerance, uint32_t seed) {
  const kvpack::ModelShape& s = cpu.shape();
  REQUIRE(gpu.bytes() == kvpack::test::device_bytes_of(cpu));
  for (int l = 0; l < s.layers; ++l) {
    const auto a = gpu.materialize(l), b = cpu.materialize(l);
    for (int h = 0; h < s.kv_heads; ++h) {
      INFO("layer " << l << " head " << h);
      REQUIRE(gpu.tokens(l, h) == cpu.tokens(l, h));
      REQUIRE(a.heads[h].positions == b.heads[h].positions);
      CHECK(cache_checks::normalised_error(a.heads[h].k, b.heads[h].k) < tolerance);
      CHECK(cache_checks::normalised_error(a.heads[h].v, b.heads[h].v) < tolerance);
    }
  }
  cache_checks::require_same_attention_everywhere(cpu, gpu, seed, tolerance);
}

const kvpack::ModelShape kNeox{4, 6, 2, 64, {kvpack::RopeStyle::kHalfSplit, 10000.0}};

kvpack::ModelShape llama_shape() {
  kvpack::ModelShape llama{2, 8, 2, 128, {kvpack::RopeStyle::kInterleaved, 500000.0}};
  llama.rope.scaling = kvpack::RopeScaling::kLlama3;
  llama.rope.factor = 8.0;
  llama.rope.original_context = 256;
  return llama;
}

}  // namespace

TEST_CASE("CUDA low-rank cache: CSKV equals the CPU cache through compress, decode, truncate",
          "[cuda][low_rank]") {
  KVPACK_SKIP_WITHOUT_DEVICE();
  for (const kvpack::ModelShape& s : {kNeox, llama_shape()}) {
    INFO("head_dim " << s.head_dim);
    const kvpack::ChannelShrink policy(random_projections(s, 24, 40, 500), 32);
    kvpack::KVCache<kvpack::ChannelShrink, kvpack::backend::Cpu> cpu(s, policy);
    kvpack::KVCache<kvpack::ChannelShrink, kvpack::backend::Cuda> gpu(s, policy);
    cache_checks::feed_sequence(s, 200, 0, false, cpu, gpu);
    require_same_low_rank(cpu, gpu, 1e-5, 510);  // nothing factored yet
    cpu.compress();
    gpu.compress();
    REQUIRE(gpu.bytes() < gpu.dense_bytes());
    // The bases are fp16 roundings of fp32 products summed in another order: an element may
    // round one ulp apart (~5e-4 of it), rarely.
    require_same_low_rank(cpu, gpu, 1e-4, 520);
    cache_checks::decode_tokens(s, 200, 240, false, cpu, gpu);  // into the exact tail
    require_same_low_rank(cpu, gpu, 1e-4, 530);
    cpu.compress();  // refactors the rebuilt rows and the tail older than the residual
    gpu.compress();
    require_same_low_rank(cpu, gpu, 1e-4, 540);
    const int64_t cut = cache_checks::position_of(150);  // inside the factored tokens
    cpu.truncate(cut);
    gpu.truncate(cut);
    require_same_low_rank(cpu, gpu, 1e-4, 550);
    cache_checks::decode_tokens(s, 151, 170, false, cpu, gpu);
    cpu.compress();
    gpu.compress();
    require_same_low_rank(cpu, gpu, 1e-4, 560);
  }
}

TEST_CASE(
    "CUDA low-rank cache: xKV at full rank equals the CPU cache, then truncates at the "
    "Eckart-Young optimum",
    "[cuda][low_rank]") {
  KVPACK_SKIP_WITHOUT_DEVICE();
  for (const kvpack::ModelShape& s : {kNeox, llama_shape()}) {
    INFO("head_dim " << s.head_dim);
    const kvpack::CrossLayerSVD policy(2, 200, 200);  // 200 tokens: the full rank
    kvpack::KVCache<kvpack::CrossLayerSVD, kvpack::backend::Cpu> cpu(s, policy);
    kvpack::KVCache<kvpack::CrossLayerSVD, kvpack::backend::Cuda> gpu(s, policy);
    cache_checks::feed_sequence(s, 200, 0, false, cpu, gpu);
    cpu.compress();
    gpu.compress();
    // Different factorisations of the same rows (SVD, Gram eigenvectors), each basis rounded
    // to fp16 on its own: ~3e-4 of a row apart.
    require_same_low_rank(cpu, gpu, 2e-3, 600);

    // 240 tokens at rank 200: a real truncation. Its error over every stacked (layer, head)
    // of a group must reach the optimum of the rows it factored (the state before compress).
    cache_checks::decode_tokens(s, 200, 240, false, cpu, gpu);
    const LayerRows keys = held_rows(gpu, true), values = held_rows(gpu, false);
    cpu.compress();
    gpu.compress();
    REQUIRE(gpu.bytes() == kvpack::test::device_bytes_of(cpu));
    const LayerRows keys_after = held_rows(gpu, true), values_after = held_rows(gpu, false);
    const int d = s.head_dim, heads = s.kv_heads, tokens = 240;
    for (int l0 = 0; l0 < s.layers; l0 += 2) {
      for (bool k : {true, false}) {
        INFO("layers " << l0 << ".." << l0 + 1 << (k ? " keys" : " values"));
        const LayerRows& before = k ? keys : values;
        const LayerRows& after = k ? keys_after : values_after;
        Eigen::MatrixXd x(tokens, 2 * heads * d);
        double error = 0;
        for (int j = 0; j < 2 * heads; ++j) {
          const std::size_t head = static_cast<std::size_t>(l0) * heads + j;
          for (int t = 0; t < tokens; ++t) {
            for (int c = 0; c < d; ++c) {
              const double b = before[head][t * d + c], a = after[head][t * d + c];
              x(t, j * d + c) = b;
              error += (a - b) * (a - b);
            }
          }
        }
        const Eigen::VectorXd sigma = Eigen::BDCSVD<Eigen::MatrixXd>(x).singularValues();
        const double optimum = std::sqrt(sigma.tail(sigma.size() - 200).squaredNorm());
        CHECK(std::sqrt(error) <= 1.01 * optimum);
        CHECK(std::sqrt(error) >= 0.99 * optimum);
      }
    }
    for (int l = 0; l < s.layers; ++l) {  // attention over the truncated factors
      const std::vector<int64_t> qpos{cache_checks::position_of(239)};
      const auto q = cache_checks::random_values(static_cast<std::size_t>(s.q_heads) * d, 610 + l);
      std::vector<float> out(q.size());
      gpu.attend(l, kvpack::ActivationView::nhd(q.data(), 1, s.q_heads, d), qpos,
                 kvpack::OutputView::nhd(out.data(), 1, s.q_heads, d));
      CHECK(kvpack_test::attention_error(gpu, l, q, qpos, out) < 1e-4);
    }
  }
}

TEST_CASE("CUDA low-rank cache: refused compress() changes nothing, with the CPU's messages",
          "[cuda][low_rank]") {
  KVPACK_SKIP_WITHOUT_DEVICE();
  const kvpack::ModelShape& s = kNeox;
  {  // xKV stacks layers 0 and 1, which hold different positions
    const kvpack::CrossLayerSVD policy(2, 8, 8);
    kvpack::KVCache<kvpack::CrossLayerSVD, kvpack::backend::Cpu> cpu(s, policy);
    kvpack::KVCache<kvpack::CrossLayerSVD, kvpack::backend::Cuda> gpu(s, policy);
    cache_checks::feed_sequence(s, 60, 0, false, cpu, gpu);
    for (int l = 0; l < s.layers; ++l) {
      const int64_t p = l == 1 ? 500 : cache_checks::position_of(60);
      const auto x = cache_checks::random_values(static_cast<std::size_t>(s.kv_heads) * 64, 7);
      const auto view = kvpack::ActivationView::nhd(x.data(), 1, s.kv_heads, 64);
      const std::vector<int64_t> position{p};
      cpu.append(l, view, view, position);
      gpu.append(l, view, view, position);
    }
    const std::size_t bytes = gpu.bytes();
    const std::string message = cache_checks::error_of([&] { cpu.compress(); });
    CHECK(message.find("to hold the same tokens") != std::string::npos);
    CHECK(cache_checks::error_of([&] { gpu.compress(); }) == message);
    CHECK(gpu.bytes() == bytes);
    require_same_low_rank(cpu, gpu, 1e-5, 700);
  }
  {  // CSKV latents beyond fp32: a projection of 1e38s overflows X · P
    auto huge = std::make_shared<kvpack::ChannelProjections>(*random_projections(s, 8, 8, 710));
    for (auto& p : huge->pk) std::fill(p.begin(), p.end(), 1e38f);
    const kvpack::ChannelShrink policy(huge, 16);
    kvpack::KVCache<kvpack::ChannelShrink, kvpack::backend::Cpu> cpu(s, policy);
    kvpack::KVCache<kvpack::ChannelShrink, kvpack::backend::Cuda> gpu(s, policy);
    cache_checks::feed_sequence(s, 60, 0, false, cpu, gpu);
    const std::size_t bytes = gpu.bytes();
    const std::string message = cache_checks::error_of([&] { cpu.compress(); });
    CHECK(message.find("is not finite") != std::string::npos);
    CHECK(cache_checks::error_of([&] { gpu.compress(); }) == message);
    CHECK(gpu.bytes() == bytes);
    require_same_low_rank(cpu, gpu, 1e-5, 720);
  }
}

TEST_CASE("CUDA low-rank cache: KIVI bases (Compose with Quantize) equal the CPU cache's",
          "[cuda][low_rank]") {
  KVPACK_SKIP_WITHOUT_DEVICE();
  using kvpack::Quantize;
  for (const kvpack::ModelShape& s : {kNeox, llama_shape()}) {
    INFO("head_dim " << s.head_dim);
    // CSKV: the same projection on both, so the same latents up to fp32 summation order, and
    // blocks from them as the CPU's LowRankBasis quantizes (a code may round the other way).
    // When a group's fp32 extreme differs in its last bit, its fp16 scale may round to the
    // neighbouring value, which moves every code near a rounding boundary by a whole step: with
    // Eigen summing the CPU's projections in AVX-512 order (-march=native, Zen 4) the rows
    // differed by up to 3.6e-3 at 4 bits and 1.2e-2 at 2 bits (the sanitized CI build, head_dim
    // 128), attention by 1.7e-3 (within 1e-3 with -march=x86-64, and on Zen 3 with
    // -march=native). So the two caches are compared at a tolerance that scales with the step,
    // (max − min) / 15 at 4 bits, / 3 at 2, and each side's attention over its own bases
    // exactly (1e-4).
    for (const Quantize& q : {Quantize(2, 16, 0), Quantize(4, 32, 0)}) {
      INFO(q.bits << "-bit bases, groups of " << q.group);
      const double tolerance = q.bits == 2 ? 5e-2 : 1e-2;
      using P = kvpack::Compose<kvpack::ChannelShrink, Quantize>;
      const P policy(kvpack::ChannelShrink(random_projections(s, 24, 40, 800), 32), q);
      kvpack::KVCache<P, kvpack::backend::Cpu> cpu(s, policy);
      kvpack::KVCache<P, kvpack::backend::Cuda> gpu(s, policy);
      cache_checks::feed_sequence(s, 200, 0, false, cpu, gpu);
      cpu.compress();
      gpu.compress();
      require_same_low_rank(cpu, gpu, tolerance, 810);
      cache_checks::decode_tokens(s, 200, 240, false, cpu, gpu);
      cpu.compress();
      gpu.compress();
      require_same_low_rank(cpu, gpu, tolerance, 820);
      for (int l = 0; l < s.layers; ++l) {
        const std::vector<int64_t> qpos{cache_checks::position_of(239),
                                        cache_checks::position_of(120)};
        CHECK(kvpack_test::attend_error(gpu, l, qpos, 825 + l) < 1e-4);
        CHECK(kvpack_test::attend_error(cpu, l, qpos, 825 + l) < 1e-4);
      }
    }
    // xKV + 4-bit at rank 24: each backend its own basis, quantized; the same bytes, and the
    // stacked rows as far from what was factored as the CPU's are.
    using P = kvpack::Compose<kvpack::CrossLayerSVD, Quantize>;
    const P policy(kvpack::CrossLayerSVD(2, 24, 24), Quantize(4, 32, 0));
    kvpack::KVCache<P, kvpack::backend::Cpu> cpu(s, policy);
    kvpack::KVCache<P, kvpack::backend::Cuda> gpu(s, policy);
    cache_checks::feed_sequence(s, 200, 0, false, cpu, gpu);
    const LayerRows keys = held_rows(gpu, true), values = held_rows(gpu, false);
    cpu.compress();
    gpu.compress();
    REQUIRE(gpu.bytes() == kvpack::test::device_bytes_of(cpu));
    auto error_of_rows = [&](const LayerRows& a, const LayerRows& b) {
      double e = 0;
      for (std::size_t i = 0; i < a.size(); ++i) {
        for (std::size_t j = 0; j < a[i].size(); ++j)
          e += (a[i][j] - b[i][j]) * (a[i][j] - b[i][j]);
      }
      return std::sqrt(e);
    };
    for (bool k : {true, false}) {
      const double e_gpu = error_of_rows(held_rows(gpu, k), k ? keys : values);
      const double e_cpu = error_of_rows(held_rows(cpu, k), k ? keys : values);
      INFO((k ? "keys" : "values") << ": error " << e_gpu << " (CPU " << e_cpu << ")");
      CHECK(e_gpu <= 1.02 * e_cpu);
      CHECK(e_gpu >= 0.98 * e_cpu);
    }
    for (int l = 0; l < s.layers; ++l) {  // attention over the quantized bases
      const std::vector<int64_t> qpos{cache_checks::position_of(199)};
      const auto q =
          cache_checks::random_values(static_cast<std::size_t>(s.q_heads) * s.head_dim, 830 + l);
      std::vector<float> out(q.size());
      gpu.attend(l, kvpack::ActivationView::nhd(q.data(), 1, s.q_heads, s.head_dim), qpos,
                 kvpack::OutputView::nhd(out.data(), 1, s.q_heads, s.head_dim));
      CHECK(kvpack_test::attention_error(gpu, l, q, qpos, out) < 1e-4);
    }
  }
}
