/// \file detail/online_softmax.hpp
/// \brief Per-row online-softmax state shared by the CPU attention and the CUDA kernels.
///
/// Attention over key tiles keeps, per query row, the running max m, the running denominator l
/// and the unnormalised accumulator acc = Σ exp(s_i − m) v_i. Tiles and key splits are merged
/// with the same rescaling, so the result equals a single softmax over all keys.
#pragma once

// clang-format off
#include "internal.hpp"  // first, before anything defines the macro it checks
// clang-format on

#include <cmath>

#include "../config.hpp"

namespace kvpack {
namespace detail {

/// -inf as a constant usable on host and device.
KVPACK_HOST_DEVICE float neg_inf() { return -INFINITY; }

/// exp(old_max − new_max), 0 when nothing was accumulated yet (old_max = −inf).
KVPACK_HOST_DEVICE float softmax_rescale(float old_max, float new_max) {
  return old_max == -INFINITY ? 0.0f : expf(old_max - new_max);
}

/// Merges partial (m2, l2, acc2) into (m, l, acc) over d channels.
KVPACK_HOST_DEVICE void softmax_merge(float& m, float& l, float* acc, float m2, float l2,
                                      const float* acc2, int d) {
  if (m2 == -INFINITY) return;
  const float new_max = m > m2 ? m : m2;
  const float a = softmax_rescale(m, new_max);
  const float b = expf(m2 - new_max);
  for (int i = 0; i < d; ++i) acc[i] = acc[i] * a + acc2[i] * b;
  l = l * a + l2 * b;
  m = new_max;
}

}  // namespace detail
}  // namespace kvpack
