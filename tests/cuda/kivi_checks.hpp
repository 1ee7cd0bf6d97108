// Checks of the KIVI kernels (kernels/kivi.cuh) on given K/V, shared by tests/cuda/kivi_test.cu
// (seeded random inputs) and the real-model test (the reference model's K/V and queries).
#pragma once

#include <catch2/catch.hpp>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <kvpack/backend/cuda.hpp>
#include <kvpack/backend/cuda/kernels/kivi.cuh>
#include <kvpack/kvpack.hpp>
#include <type_traits>
#include <utility>
#include <vector>

#include "attention_checks.hpp"
#include "device_test_util.hpp"

namespace kvpack {
namespace test {

/// Quantizes `rows` ([n][head_dim] fp32, n a multiple of G; with T = Half uploaded as fp16, the
/// CPU quantizing the same fp16 values) into key and value blocks on the device, and requires
/// them equal, byte for byte, to the CPU backend's quantizer.
template <int Bits, int G, class T>
void require_quantize_matches_cpu(std::vector<float> rows, int head_dim) {
  using Block = QuantBlock<Bits, G>;
  const int64_t n = static_cast<int64_t>(rows.size()) / head_dim, groups = n / G;
  std::vector<T> input(rows.size());
  for (std::size_t i = 0; i < rows.size(); ++i) {
    if constexpr (std::is_same<T, Half>::value) {
      input[i] = to_half(rows[i]);
      rows[i] = to_float(input[i]);
    } else {
      input[i] = rows[i];
    }
  }
  std::vector<Block> keys(groups * head_dim), values(n * (head_dim / G));
  for (int64_t g = 0; g < groups; ++g) {
    cpu::quantize_key_group<Bits, G>(rows.data() + g * G * head_dim, head_dim,
                                     keys.data() + g * head_dim);
  }
  cpu::quantize_value_rows<Bits, G>(rows.data(), n, head_dim, values.data());

  auto d_rows = upload(input);
  cuda::DeviceBuffer<Block> d_keys(keys.size(), 0), d_values(values.size(), 0);
  cuda::launch_quantize_rows<Bits, G, T>(d_rows.data(), d_rows.data(), groups, head_dim,
                                         d_keys.data(), d_values.data(), nullptr);
  cuda::check_cuda(cudaDeviceSynchronize(), "quantize kernels");
  const auto got_keys = download(d_keys, keys.size());
  const auto got_values = download(d_values, values.size());
  INFO("bits " << Bits << " group " << G << " head_dim " << head_dim << " tokens " << n);
  REQUIRE(std::memcmp(got_keys.data(), keys.data(), keys.size() * sizeof(Block)) == 0);
  REQUIRE(std::memcmp(got_values.data(), values.data(), values.size() * sizeof(Block)) == 0);
}

/// Attention over KIVI heads: the first (size − residual) / G · G tokens of each head quantized,
/// the rest kept as an fp16 residual.
struct KiviAttentionCase {
  int q_heads = 0, kv_heads = 0, head_dim = 0;
  int64_t size = 0, residual = 0;
  std::vector<std::vector<float>> k, v;  ///< [kv_heads][size · head_dim]
  std::vector<int32_t> positions;        ///< [size], ascending (all heads)
  std::vector<float> q;                  ///< [tokens][q_heads][head_dim]
  std::vector<int32_t> q_positions;      ///< [tokens]
};

/// ‖out − ref‖ / ‖ref‖ of the device attention (launch_attention_heads over KiviAttentionHead,
/// `splits` key splits), ref: the same attention in double over the dequantized blocks and the
/// fp16 residual.
template <int Bits, int G>
double kivi_attention_error(const KiviAttentionCase& c, int64_t splits) {
  using Block = QuantBlock<Bits, G>;
  const int d = c.head_dim;
  const int64_t size = c.size, quantized = (size - c.residual) / G * G, tail = size - quantized;
  std::vector<std::vector<double>> k_held(c.kv_heads), v_held(c.kv_heads);
  std::vector<cuda::DeviceBuffer<Block>> dkb, dvb;
  std::vector<cuda::DeviceBuffer<Half>> dkr, dvr;
  auto d_positions = upload(c.positions);
  std::vector<cuda::KiviAttentionHead> heads;
  const cuda::KiviFormat format = cuda::KiviFormat::of(Bits, G);
  for (int h = 0; h < c.kv_heads; ++h) {
    const std::vector<float>& k = c.k[h];
    const std::vector<float>& v = c.v[h];
    std::vector<Block> kb(quantized / G * d), vb(quantized * (d / G));
    for (int64_t g = 0; g < quantized / G; ++g) {
      for (int ch = 0; ch < d; ++ch) quantize_block_ref(&k[g * G * d + ch], d, kb[g * d + ch]);
    }
    for (int64_t t = 0; t < quantized; ++t) {
      for (int j = 0; j < d / G; ++j) quantize_block_ref(&v[t * d + j * G], 1, vb[t * (d / G) + j]);
    }
    std::vector<Half> kr(tail * d), vr(tail * d);
    for (int64_t i = 0; i < tail * d; ++i) {
      kr[i] = to_half(k[quantized * d + i]);
      vr[i] = to_half(v[quantized * d + i]);
    }
    k_held[h].resize(size * d);
    v_held[h].resize(size * d);
    for (int64_t t = 0; t < size; ++t) {
      for (int ch = 0; ch < d; ++ch) {
        const bool in_blocks = t < quantized;
        k_held[h][t * d + ch] = in_blocks
                                    ? dequantize_ref(kb[(t / G) * d + ch], static_cast<int>(t % G))
                                    : to_float(kr[(t - quantized) * d + ch]);
        v_held[h][t * d + ch] = in_blocks ? dequantize_ref(vb[t * (d / G) + ch / G], ch % G)
                                          : to_float(vr[(t - quantized) * d + ch]);
      }
    }
    dkb.push_back(upload(kb));
    dvb.push_back(upload(vb));
    dkr.push_back(upload(kr));
    dvr.push_back(upload(vr));
    heads.push_back({reinterpret_cast<const uint8_t*>(dkb.back().data()),
                     reinterpret_cast<const uint8_t*>(dvb.back().data()), dkr.back().data(),
                     dvr.back().data(), d_positions.data(), size, quantized, format});
  }
  HeldAttention held;
  held.q_heads = c.q_heads;
  held.head_dim = d;
  held.q = c.q;
  held.q_positions = c.q_positions;
  held.positions = c.positions;
  held.k = std::move(k_held);
  held.v = std::move(v_held);
  return head_attention_error(heads, held, splits);
}

}  // namespace test
}  // namespace kvpack
