#include "eval_cache.hpp"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <sstream>
#include <stdexcept>
#include <type_traits>

namespace kvpack::eval {

void EvalCache::copy_prefix_from(const EvalCache& source, int64_t end_position) {
  std::vector<float> k, v;
  std::vector<int64_t> positions;
  for (int l = 0; l < source.layers(); ++l) {
    const DenseLayer layer = source.materialize(l);
    const auto& pos = layer.heads.at(0).positions;
    const int64_t heads = static_cast<int64_t>(layer.heads.size());
    const int64_t d =
        static_cast<int64_t>(layer.heads[0].k.size() / std::max<std::size_t>(1, pos.size()));
    const int64_t n = std::lower_bound(pos.begin(), pos.end(), end_position) - pos.begin();
    k.resize(n * heads * d);
    v.resize(n * heads * d);
    for (int64_t h = 0; h < heads; ++h) {
      if (layer.heads[h].positions != pos) {
        throw std::runtime_error("copy_prefix_from: the source heads hold different tokens");
      }
      for (int64_t t = 0; t < n; ++t) {
        std::copy_n(layer.heads[h].k.data() + t * d, d, k.data() + (t * heads + h) * d);
        std::copy_n(layer.heads[h].v.data() + t * d, d, v.data() + (t * heads + h) * d);
      }
    }
    positions.assign(pos.begin(), pos.begin() + n);
    if (n > 0) append_rows(l, k.data(), v.data(), positions.data(), n);
    // Captured attention inputs: row t is position t (a prefill from position 0).
    const std::vector<float>& x = source.captured_hidden(l);
    if (n > 0 && !x.empty() && pos.front() == 0 &&
        pos.back() + 1 == static_cast<int64_t>(pos.size())) {
      const int hidden = static_cast<int>(x.size() / pos.size());
      const auto t0 = std::chrono::steady_clock::now();
      observe_hidden_rows(l, x.data(), positions.data(), n, hidden);
      hidden_score_seconds_ +=
          std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    }
  }
}

std::pair<int, int> cskv_ranks(const ModelShape& shape, double ratio, int64_t tokens,
                               double latent_bytes) {
  // Per layer at T tokens: dense 2 * c * 2 * T bytes; held (r_k + r_v) latents of
  // `latent_bytes` each per token (fp16: 2; cskv+quant: Quantize::bytes_per_value()), the
  // fp32 projections bytes() counts (c x (r_k + r_v) floats) and an int32 position per token and
  // kv head. r_k : r_v = 1 : 3.
  const int c = shape.kv_heads * shape.head_dim;
  const double t = static_cast<double>(tokens);
  const double total =
      (4.0 * c * t / ratio - 4.0 * shape.kv_heads * t) / (latent_bytes * t + 4.0 * c);
  const int rk = std::clamp(static_cast<int>(std::lround(0.25 * total)), 1, c);
  const int rv = std::clamp(static_cast<int>(std::lround(0.75 * total)), 1, c);
  return {rk, rv};
}

}  // namespace kvpack::eval
