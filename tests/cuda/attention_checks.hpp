// The double-precision attention reference and one device launch, shared by the checks of every
// head type that attention_kernel reads (KIVI blocks in kivi_checks.hpp, low-rank factors in
// low_rank_test.cu): each check builds its heads and says what they hold, in double.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <kvpack/backend/cuda.hpp>
#include <vector>

#include "device_test_util.hpp"

namespace kvpack {
namespace test {

/// Queries [tokens][q_heads][head_dim] and their positions, and what the kv heads hold: keys and
/// values [kv_heads][size · head_dim] in double, at positions [size] (ascending, every head).
struct HeldAttention {
  int q_heads = 0, head_dim = 0;
  std::vector<float> q;
  std::vector<int32_t> q_positions;
  std::vector<int32_t> positions;
  std::vector<std::vector<double>> k, v;
};

/// Attention on the device: launch_attention_heads over `heads` (one per kv head, device
/// pointers) for queries q [tokens][q_heads][head_dim] at q_positions, `splits` key splits.
/// Returns the output [tokens][q_heads][head_dim].
template <class Head>
std::vector<float> device_attention(const std::vector<Head>& heads, int q_heads, int d,
                                    const std::vector<float>& q,
                                    const std::vector<int32_t>& q_positions, int64_t splits) {
  const int kv_heads = static_cast<int>(heads.size());
  const int64_t tokens = static_cast<int64_t>(q_positions.size());
  auto d_heads = upload(heads);
  auto d_q = upload(q);
  auto d_qpos = upload(q_positions);
  const int64_t rows = tokens * q_heads;
  cuda::DeviceBuffer<float> acc(splits * rows * d, 0), mx(splits * rows, 0), sum(splits * rows, 0),
      out(rows * d, 0);
  cuda::AttentionParams params{};
  params.q = d_q.data();
  params.q_positions = d_qpos.data();
  params.tokens = tokens;
  params.q_heads = q_heads;
  params.group = q_heads / kv_heads;
  params.scale = 1.0f / std::sqrt(static_cast<float>(d));
  params.splits = splits;
  params.partial_acc = acc.data();
  params.partial_max = mx.data();
  params.partial_sum = sum.data();
  cuda::dispatch_head_dim(d, [&](auto D) {
    cuda::launch_attention_heads<decltype(D)::value>(d_heads.data(), kv_heads, params, out.data(),
                                                     q_heads * d, d, nullptr);
  });
  cuda::check_cuda(cudaDeviceSynchronize(), "attention over device heads");
  return download(out, rows * d);
}

/// ‖out − ref‖ / ‖ref‖ where out is launch_attention_heads over `heads` (one per kv head of
/// held.k, device pointers) with `splits` key splits, and ref the causal attention in double over
/// held.k / held.v (scale 1 / sqrt(head_dim), GQA: query head j reads kv head j / group).
template <class Head>
double head_attention_error(const std::vector<Head>& heads, const HeldAttention& held,
                            int64_t splits) {
  const int d = held.head_dim, q_heads = held.q_heads;
  const int kv_heads = static_cast<int>(held.k.size()), group = q_heads / kv_heads;
  const int64_t tokens = static_cast<int64_t>(held.q_positions.size());
  const int64_t size = static_cast<int64_t>(held.positions.size());
  const double scale = 1.0 / std::sqrt(static_cast<double>(d));
  std::vector<double> expected(held.q.size());
  for (int64_t t = 0; t < tokens; ++t) {
    for (int qh = 0; qh < q_heads; ++qh) {
      const std::vector<double>& k = held.k[qh / group];
      const std::vector<double>& v = held.v[qh / group];
      const float* qr = &held.q[(t * q_heads + qh) * d];
      std::vector<double> s;
      double m = -INFINITY;
      for (int64_t j = 0; j < size && held.positions[j] <= held.q_positions[t]; ++j) {
        double dot = 0;
        for (int ch = 0; ch < d; ++ch) dot += qr[ch] * k[j * d + ch];
        s.push_back(dot * scale);
        m = std::max(m, s.back());
      }
      double den = 0;
      for (double& x : s) den += (x = std::exp(x - m));
      for (int ch = 0; ch < d; ++ch) {
        double acc = 0;
        for (std::size_t j = 0; j < s.size(); ++j) acc += s[j] * v[j * d + ch];
        expected[(t * q_heads + qh) * d + ch] = acc / den;
      }
    }
  }

  const auto got = device_attention(heads, q_heads, d, held.q, held.q_positions, splits);
  double num = 0, den = 0;
  for (std::size_t i = 0; i < got.size(); ++i) {
    num += (got[i] - expected[i]) * (got[i] - expected[i]);
    den += expected[i] * expected[i];
  }
  return std::sqrt(num / den);
}

}  // namespace test
}  // namespace kvpack
