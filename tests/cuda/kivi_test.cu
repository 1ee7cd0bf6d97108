// The KIVI kernels launched directly: block quantization against the CPU backend's quantizer
// (bit for bit, every bits/group pair the cache offers, fp32 and fp16 inputs), and attention over
// KIVI blocks plus an fp16 residual against double-precision attention over the dequantized
// values, with forced key splits and GQA.
#include <catch2/catch.hpp>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <kvpack/backend/cuda.hpp>
#include <kvpack/backend/cuda/kernels/kivi.cuh>
#include <kvpack/backend/cuda/runtime.hpp>
#include <kvpack/kvpack.hpp>
#include <random>
#include <vector>

#include "device_test_util.hpp"

using kvpack::Half;
using kvpack::QuantBlock;
namespace kc = kvpack::cuda;
using kvpack::test::download;
using kvpack::test::upload;

namespace {

template <int Bits, int G, class T>
void check_quantize(int head_dim, int64_t groups, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> gauss(0.0f, 2.0f);
  const int64_t n = groups * G;
  std::vector<float> rows(n * head_dim);
  for (auto& x : rows) x = gauss(rng);
  for (int64_t t = 0; t < n; t += 5) rows[t * head_dim + t % head_dim] = 40.0f;  // outliers
  for (int c = 0; c < head_dim; c += 7) rows[c] = -0.0f;  // signed zeros: the reference's order
  std::vector<T> input(rows.size());
  for (std::size_t i = 0; i < rows.size(); ++i) {
    if constexpr (std::is_same<T, Half>::value) {
      input[i] = kvpack::to_half(rows[i]);
      rows[i] = kvpack::to_float(input[i]);
    } else {
      input[i] = rows[i];
    }
  }
  using Block = QuantBlock<Bits, G>;
  std::vector<Block> keys(groups * head_dim), values(n * (head_dim / G));
  for (int64_t g = 0; g < groups; ++g) {
    kvpack::cpu::quantize_key_group<Bits, G>(rows.data() + g * G * head_dim, head_dim,
                                             keys.data() + g * head_dim);
  }
  kvpack::cpu::quantize_value_rows<Bits, G>(rows.data(), n, head_dim, values.data());

  auto d_rows = upload(input);
  kc::DeviceBuffer<Block> d_keys(keys.size(), 0), d_values(values.size(), 0);
  kc::launch_quantize_rows<Bits, G, T>(d_rows.data(), groups, head_dim, d_keys.data(),
                                       d_values.data(), nullptr);
  kc::check_cuda(cudaDeviceSynchronize(), "quantize kernels");
  const auto got_keys = download(d_keys, keys.size());
  const auto got_values = download(d_values, values.size());
  INFO("bits " << Bits << " group " << G << " head_dim " << head_dim);
  REQUIRE(std::memcmp(got_keys.data(), keys.data(), keys.size() * sizeof(Block)) == 0);
  REQUIRE(std::memcmp(got_values.data(), values.data(), values.size() * sizeof(Block)) == 0);
}

/// Attention of `q` rows over one KIVI head (blocks + residual) in double precision.
struct KiviHeadHost {
  int64_t size = 0, quantized = 0;
  std::vector<double> k, v;  // dequantized / residual rows, [size][d]
  std::vector<int32_t> positions;
};

template <int Bits, int G>
void check_attention(int q_heads, int kv_heads, int head_dim, int64_t size, int64_t residual,
                     uint32_t seed) {
  using Block = QuantBlock<Bits, G>;
  std::mt19937 rng(seed);
  std::normal_distribution<float> gauss(0.0f, 1.0f);
  const int d = head_dim, group = q_heads / kv_heads;
  const int64_t quantized = (size - residual) / G * G, tail = size - quantized, tokens = 3;
  std::vector<KiviHeadHost> host(kv_heads);
  std::vector<kc::DeviceBuffer<Block>> dkb, dvb;
  std::vector<kc::DeviceBuffer<Half>> dkr, dvr;
  std::vector<kc::DeviceBuffer<int32_t>> dpos;
  std::vector<kc::KiviAttentionHead<Bits, G>> heads;
  for (int h = 0; h < kv_heads; ++h) {
    KiviHeadHost& hh = host[h];
    hh.size = size;
    hh.quantized = quantized;
    std::vector<float> k(size * d), v(size * d);
    for (auto& x : k) x = gauss(rng) * 2.0f + 0.5f;
    for (auto& x : v) x = gauss(rng);
    std::vector<Block> kb(quantized / G * d), vb(quantized * (d / G));
    for (int64_t g = 0; g < quantized / G; ++g) {
      for (int c = 0; c < d; ++c) kvpack::quantize_block_ref(&k[g * G * d + c], d, kb[g * d + c]);
    }
    for (int64_t t = 0; t < quantized; ++t) {
      for (int j = 0; j < d / G; ++j)
        kvpack::quantize_block_ref(&v[t * d + j * G], 1, vb[t * (d / G) + j]);
    }
    std::vector<Half> kr(tail * d), vr(tail * d);
    for (int64_t i = 0; i < tail * d; ++i) {
      kr[i] = kvpack::to_half(k[quantized * d + i]);
      vr[i] = kvpack::to_half(v[quantized * d + i]);
    }
    hh.k.resize(size * d);
    hh.v.resize(size * d);
    for (int64_t t = 0; t < size; ++t) {
      for (int c = 0; c < d; ++c) {
        if (t < quantized) {
          hh.k[t * d + c] = kvpack::dequantize_ref(kb[(t / G) * d + c], static_cast<int>(t % G));
          hh.v[t * d + c] = kvpack::dequantize_ref(vb[t * (d / G) + c / G], c % G);
        } else {
          hh.k[t * d + c] = kvpack::to_float(kr[(t - quantized) * d + c]);
          hh.v[t * d + c] = kvpack::to_float(vr[(t - quantized) * d + c]);
        }
      }
    }
    hh.positions.resize(size);
    for (int64_t t = 0; t < size; ++t) hh.positions[t] = static_cast<int32_t>(2 * t + 1);
    dkb.push_back(upload(kb));
    dvb.push_back(upload(vb));
    dkr.push_back(upload(kr));
    dvr.push_back(upload(vr));
    dpos.push_back(upload(hh.positions));
    heads.push_back({dkb.back().data(), dvb.back().data(), dkr.back().data(), dvr.back().data(),
                     dpos.back().data(), size, quantized});
  }
  std::vector<float> q(tokens * q_heads * d);
  for (auto& x : q) x = gauss(rng);
  // The newest token sees every key; the others stop inside the blocks and inside the residual.
  const std::vector<int32_t> q_positions{static_cast<int32_t>(2 * size - 1),
                                         static_cast<int32_t>(2 * (quantized / 2) + 1),
                                         static_cast<int32_t>(2 * (size - 2) + 1)};
  auto d_heads = kvpack::test::upload(heads);
  auto d_q = upload(q);
  auto d_qpos = upload(q_positions);
  const double scale = 1.0 / std::sqrt(static_cast<double>(d));
  std::vector<double> expected(q.size());
  for (int64_t t = 0; t < tokens; ++t) {
    for (int qh = 0; qh < q_heads; ++qh) {
      const KiviHeadHost& hh = host[qh / group];
      const float* qr = &q[(t * q_heads + qh) * d];
      std::vector<double> s;
      double m = -INFINITY;
      for (int64_t j = 0; j < size && hh.positions[j] <= q_positions[t]; ++j) {
        double dot = 0;
        for (int c = 0; c < d; ++c) dot += qr[c] * hh.k[j * d + c];
        s.push_back(dot * scale);
        m = std::max(m, s.back());
      }
      double den = 0;
      for (double& x : s) den += (x = std::exp(x - m));
      for (int c = 0; c < d; ++c) {
        double acc = 0;
        for (std::size_t j = 0; j < s.size(); ++j) acc += s[j] * hh.v[j * d + c];
        expected[(t * q_heads + qh) * d + c] = acc / den;
      }
    }
  }
  for (int64_t splits : {1, 3, 16}) {
    const int64_t rows = tokens * q_heads;
    kc::DeviceBuffer<float> acc(splits * rows * d, 0), mx(splits * rows, 0), sum(splits * rows, 0),
        out(rows * d, 0);
    kc::AttentionParams params{};
    params.q = d_q.data();
    params.q_positions = d_qpos.data();
    params.tokens = tokens;
    params.q_heads = q_heads;
    params.group = group;
    params.scale = static_cast<float>(scale);
    params.splits = splits;
    params.partial_acc = acc.data();
    params.partial_max = mx.data();
    params.partial_sum = sum.data();
    kc::dispatch_head_dim(d, [&](auto D) {
      kc::launch_attention_heads<decltype(D)::value>(d_heads.data(), kv_heads, params, out.data(),
                                                     q_heads * d, d, nullptr);
    });
    kc::check_cuda(cudaDeviceSynchronize(), "KIVI attention");
    const auto got = download(out, rows * d);
    double num = 0, den = 0;
    for (std::size_t i = 0; i < got.size(); ++i) {
      num += (got[i] - expected[i]) * (got[i] - expected[i]);
      den += expected[i] * expected[i];
    }
    INFO("bits " << Bits << " group " << G << " q_heads " << q_heads << " kv_heads " << kv_heads
                 << " head_dim " << d << " size " << size << " splits " << splits);
    REQUIRE(std::sqrt(num / den) < 1e-5);
  }
}

}  // namespace

TEST_CASE("CUDA KIVI: quantize kernels equal the CPU quantizer bit for bit", "[cuda]") {
  KVPACK_SKIP_WITHOUT_DEVICE();
  check_quantize<4, 32, float>(128, 3, 1);
  check_quantize<4, 32, Half>(64, 2, 2);
  check_quantize<2, 32, float>(64, 2, 3);
  check_quantize<8, 32, Half>(128, 1, 4);
  check_quantize<2, 16, float>(64, 2, 5);
  check_quantize<4, 64, float>(128, 1, 6);
  check_quantize<8, 128, Half>(128, 1, 7);
}

TEST_CASE("CUDA KIVI: attention over blocks and residual equals double-precision attention",
          "[cuda]") {
  KVPACK_SKIP_WITHOUT_DEVICE();
  check_attention<4, 32>(4, 2, 64, 200, 40, 11);
  check_attention<2, 32>(6, 2, 128, 150, 20, 12);
  check_attention<8, 16>(3, 3, 64, 97, 0, 13);
  check_attention<4, 128>(8, 1, 128, 300, 64, 14);
}

TEST_CASE("CUDA KIVI: a head_dim that is not whole groups is refused", "[cuda]") {
  KVPACK_SKIP_WITHOUT_DEVICE();
  kc::DeviceBuffer<float> rows(64 * 64, 0);
  kc::DeviceBuffer<QuantBlock<4, 128>> keys(64, 0), values(64, 0);
  REQUIRE_THROWS_WITH((kc::launch_quantize_rows<4, 128, float>(rows.data(), 1, 64, keys.data(),
                                                               values.data(), nullptr)),
                      Catch::Contains("not a multiple of the KIVI group 128"));
}
