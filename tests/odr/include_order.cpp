// ODR test, the include order that once changed a kernel: <kvpack/cache.hpp> before the KIVI
// format (<kvpack/backend/cpu/kivi_rows.hpp>). attend_rows() was an overload set called
// qualified, so this unit compiled KVCache<Quantize>::attend on the generic path (int8_query
// ignored, no folded dequantization) under the symbol every other unit compiles with the KIVI
// kernels, and the linker kept whichever came first. This unit is first on the link line, so
// its copy is the program's; odr_main checks that it is the KIVI kernel's.
// The order under test: the container, then the format.
// clang-format off
#include <kvpack/cache.hpp>
#include <kvpack/backend/cpu/kivi_rows.hpp>
// clang-format on

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

namespace {

std::vector<float> attend_kivi(bool int8_query) {
  const kvpack::ModelShape shape{1, 6, 2, 64, {}};
  const int64_t n = 512;
  kvpack::Quantize policy(4, 32, 128);
  policy.int8_query = int8_query;
  kvpack::KVCache<kvpack::Quantize> cache(shape, policy);
  std::mt19937 rng(7);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  const auto random = [&](std::size_t count, float scale) {
    std::vector<float> x(count);
    for (float& value : x) value = scale * normal(rng);
    return x;
  };
  const auto k = random(n * shape.kv_heads * shape.head_dim, 1.0f);
  const auto v = random(n * shape.kv_heads * shape.head_dim, 1.0f);
  std::vector<int64_t> positions(n);
  for (int64_t t = 0; t < n; ++t) positions[t] = t;
  cache.append(0, kvpack::ActivationView::nhd(k.data(), n, shape.kv_heads, shape.head_dim),
               kvpack::ActivationView::nhd(v.data(), n, shape.kv_heads, shape.head_dim), positions);
  cache.compress();
  const auto q = random(static_cast<std::size_t>(shape.q_heads) * shape.head_dim, 2.0f);
  std::vector<float> out(q.size());
  cache.attend(0, kvpack::ActivationView::nhd(q.data(), 1, shape.q_heads, shape.head_dim),
               std::vector<int64_t>{n - 1},
               kvpack::OutputView::nhd(out.data(), 1, shape.q_heads, shape.head_dim));
  return out;
}

}  // namespace

// Largest |int8-query attend - exact attend| over the outputs, and the largest |exact output|.
void kvpack_odr_int8_query_effect(double& difference, double& scale) {
  const std::vector<float> exact = attend_kivi(false), int8 = attend_kivi(true);
  difference = 0.0;
  scale = 0.0;
  for (std::size_t i = 0; i < exact.size(); ++i) {
    difference = std::max(difference, std::fabs(double{int8[i]} - exact[i]));
    scale = std::max(scale, std::fabs(double{exact[i]}));
  }
}
