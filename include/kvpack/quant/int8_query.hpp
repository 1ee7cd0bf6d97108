/// \file quant/int8_query.hpp
/// \brief Scores of a KIVI key group from an int8 query (Quantize::int8_query): the scalar
/// reference that every kernel matches.
///
/// A key group holds, per channel c, G codes with an fp16 scale s_c and minimum m_c, so
/// q · k̂_t = Σ_c (q_c · s_c) · code_ct + Σ_c q_c · m_c. With an int8 query the scaled query
/// w_c = q_c · s_c is quantized symmetrically per (query row, key group), as llama.cpp's CPU flash
/// attention converts Q to q8 before its integer dot products (ggml-cpu ops.cpp):
///   α = max_c |w_c| / 127,   w8_c = nearbyint(w_c · (127 / max_c |w_c|))   (in [−127, 127]),
/// the code sum D_t = Σ_c w8_c · code_ct is exact in int32, and
///   score_t = fma(float(D_t), α, bias),   bias = Σ_c q_c · m_c (fp32, channel order).
/// Error against the exact score: |score_t − q · k̂_t| ≤ α/2 · Σ_c code_ct, plus the fp32
/// rounding of bias and fma. Only the keys' side is quantized; values are accumulated in fp32.
#pragma once

#include <cmath>
#include <cstdint>

#include "quant_block.hpp"

namespace kvpack {
namespace detail {

/// The step α = max|w| / 127 of an int8 query row and the factor 127 / max|w| its elements are
/// multiplied by before rounding; both 0 when max|w| is 0. Shared by the reference and the SIMD
/// kernels, so all round alike.
struct Int8QueryStep {
  float alpha;
  float inverse;
};
inline Int8QueryStep int8_query_step(float amax) {
  if (amax == 0.0f) return {0.0f, 0.0f};
  return {amax / 127.0f, 127.0f / amax};
}

/// Symmetric int8 quantization of w[0, n) (finite): writes w8[0, n) and returns α, the step
/// (0 when every w_c is 0, and then w8 is all 0). Rounds in the current rounding mode (default:
/// to nearest even), as the SIMD conversion instructions do.
inline float quantize_query_int8(const float* w, int n, int8_t* w8) {
  float amax = 0.0f;
  for (int c = 0; c < n; ++c) amax = std::fmax(amax, std::fabs(w[c]));
  const Int8QueryStep step = int8_query_step(amax);
  for (int c = 0; c < n; ++c) {
    const float x = std::nearbyint(w[c] * step.inverse);
    w8[c] = static_cast<int8_t>(x > 127.0f ? 127.0f : x < -127.0f ? -127.0f : x);
  }
  return step.alpha;
}

/// Floats of scratch the int8-query key kernels (backend/cpu/simd/int8_key_scores.hpp) take for
/// `rows` rows of head_dim d: the scales (d floats), the int8 rows (rows · d bytes) and the AVX2
/// kernel's query pairs (rows · d / 4 vectors of 32 bytes, 32-byte aligned).
constexpr int64_t int8_key_scratch_floats(int rows, int d) {
  return d + (rows * d + 3) / 4 + 2 * rows * d + 8;
}

/// Reference scores of `rows` query rows (q, row stride d) against the G tokens of key group kb
/// (d blocks, one per channel): s[r · s_stride + t] for t < G, as the file comment defines them.
/// Scratch: w (d floats), w8 (d bytes).
template <int Bits, int G>
void int8_query_group_scores(const QuantBlock<Bits, G>* kb, int d, const float* q, int rows,
                             float* s, int64_t s_stride, float* w, int8_t* w8) {
  for (int r = 0; r < rows; ++r) {
    const float* qr = q + static_cast<int64_t>(r) * d;
    float bias = 0.0f;
    for (int c = 0; c < d; ++c) {
      w[c] = qr[c] * to_float(kb[c].scale);
      bias = std::fma(qr[c], to_float(kb[c].min), bias);
    }
    const float alpha = quantize_query_int8(w, d, w8);
    for (int t = 0; t < G; ++t) {
      int32_t dot = 0;
      for (int c = 0; c < d; ++c)
        dot += w8[c] * static_cast<int32_t>(get_code<Bits>(kb[c].codes, t));
      s[r * s_stride + t] = std::fma(static_cast<float>(dot), alpha, bias);
    }
  }
}

}  // namespace detail
}  // namespace kvpack
