/// \file detail/validate.hpp
/// \brief Argument checks shared by every backend's KVCache: all run before any state changes.
#pragma once

// clang-format off
#include "internal.hpp"  // first, before anything defines the macro it checks
// clang-format on

#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "../error.hpp"
#include "../shape.hpp"
#include "../span.hpp"
#include "../view.hpp"

namespace kvpack {
namespace detail {

/// What the container remembers of a layer's appended sequence.
struct LayerState {
  int64_t appended = 0;         ///< tokens ever appended (the logical sequence length)
  int64_t first_position = -1;  ///< position of the first appended token, -1 when empty
  int64_t last_position = -1;   ///< position of the last appended token, -1 when empty
};

/// Per-layer statistic of SimLayerKV's lazy-layer test (LazyLayerDrop), the same on every
/// backend: the attention mass observed queries put on the layer's kept set, summed over the
/// observed rows (tokens × query heads), and the decision the first compress() after it takes.
struct LayerObservation {
  double mass = 0.0;
  int64_t rows = 0;
  int lazy = -1;  ///< -1 undecided, 0 no, 1 yes

  /// Mean mass per observed row; NaN before any row was observed.
  double mean() const {
    return rows == 0 ? std::numeric_limits<double>::quiet_NaN() : mass / static_cast<double>(rows);
  }
  /// Decides once, when rows were observed: lazy when the mean mass exceeds `threshold`.
  void decide(double threshold) {
    if (lazy < 0 && rows > 0) lazy = mean() > threshold;
  }
};

inline void check_layer(const char* where, const ModelShape& shape, int layer) {
  require(layer >= 0 && layer < shape.layers, where, "layer", layer,
          [&] { return concat("in [0, ", shape.layers, ")"); });
}

inline void check_view(const char* where, const char* name, const ActivationView& x, int64_t heads,
                       int64_t head_dim) {
  require(x.data() != nullptr || x.tokens() == 0, where, name, "null data", "a non-null pointer");
  require(
      x.tokens() > 0, where, [&] { return concat(name, ".tokens"); }, x.tokens(), ">= 1");
  require(
      x.heads() == heads, where, [&] { return concat(name, ".heads"); }, x.heads(),
      [&] { return concat(heads, " (the model's head count)"); });
  require(
      x.head_dim() == head_dim, where, [&] { return concat(name, ".head_dim"); }, x.head_dim(),
      [&] { return concat(head_dim, " (the model's head_dim)"); });
}

/// Every element finite and, for 16-bit storage, inside the storage range.
inline void check_values(const char* where, const char* name, const ActivationView& x,
                         float limit) {
  std::vector<float> buffer;  // only for rows that need a conversion (no allocation for fp32)
  const int64_t d = x.head_dim();
  for (int64_t t = 0; t < x.tokens(); ++t) {
    for (int64_t h = 0; h < x.heads(); ++h) {
      const float* row = x.f32_row(t, h);  // fp32 rows are read in place
      if (row == nullptr) {
        buffer.resize(static_cast<std::size_t>(d));
        x.load(t, h, buffer.data());
        row = buffer.data();
      }
      // A branch-free pass (vectorised) finds whether the row is bad; only then where.
      int ok = 1;
      for (int64_t i = 0; i < d; ++i) ok &= std::fabs(row[i]) <= limit;  // false for NaN too
      if (ok) continue;
      int64_t i = 0;
      while (std::fabs(row[i]) <= limit) ++i;
      throw error(concat(where, ": ", name, "[token ", t, ", head ", h, ", channel ", i,
                         "] = ", row[i], ", expected a finite value with |x| <= ", limit));
    }
  }
}

/// Positions in host memory (Positions::device views are read only by the CUDA cache's
/// attention and query scoring).
inline void require_host_positions(const char* where, Positions positions) {
  require(!positions.on_device(), where, "positions", "in device memory",
          "host memory (device positions: the CUDA cache's attend, observe, attend_observe)");
}

/// Positions of a new block: one per token, >= 0, fit in int32, strictly increasing, and after
/// everything already appended to the layer.
inline void check_append_positions(const char* where, Positions positions, int64_t tokens,
                                   const LayerState& layer) {
  require(static_cast<int64_t>(positions.size()) == tokens, where, "positions.size()",
          positions.size(), [&] { return concat(tokens, " (one per token)"); });
  require_host_positions(where, positions);
  int64_t previous = layer.last_position;
  for (std::size_t i = 0; i < positions.size(); ++i) {
    const int64_t p = positions[i];
    if (p < 0 || p > std::numeric_limits<int32_t>::max() || p <= previous) {
      throw error(concat(where, ": positions[", i, "] = ", p, ", expected a value in (", previous,
                         ", 2^31) — positions must be non-negative and strictly increasing ",
                         "after the layer's last position"));
    }
    previous = p;
  }
}

/// Query positions: one per query token, inside what the layer has seen.
inline void check_query_positions(const char* where, Positions positions, int64_t tokens,
                                  const LayerState& layer) {
  require(layer.appended > 0, where, "layer", "empty", "a layer with appended tokens");
  require(static_cast<int64_t>(positions.size()) == tokens, where, "positions.size()",
          positions.size(), [&] { return concat(tokens, " (one per query token)"); });
  require_host_positions(where, positions);
  for (std::size_t i = 0; i < positions.size(); ++i) {
    const int64_t p = positions[i];
    if (p < layer.first_position || p > layer.last_position) {
      throw error(concat(where, ": positions[", i, "] = ", p, ", expected a position in [",
                         layer.first_position, ", ", layer.last_position,
                         "] (queries cannot lie beyond the cached sequence)"));
    }
  }
}

/// observe()'s query weights: one per query token, each
/// finite and > 0.
inline void check_query_weights(const char* where, Span<const float> weights, int64_t tokens) {
  require(static_cast<int64_t>(weights.size()) == tokens, where, "query_weights.size()",
          weights.size(), [&] { return concat(tokens, " (one per query token)"); });
  for (std::size_t i = 0; i < weights.size(); ++i) {
    if (!(std::isfinite(weights[i]) && weights[i] > 0.0f)) {
      throw error(concat(where, ": query_weights[", i, "] = ", weights[i],
                         ", expected a finite value > 0"));
    }
  }
}

}  // namespace detail
}  // namespace kvpack
