/// \file policy/quantize.hpp
/// \brief Quantize (KIVI, arXiv 2402.02750): asymmetric 2/4/8-bit min/max quantization, keys
/// per channel over groups of tokens, values per token over groups of channels.
#pragma once

#include <cstdint>

#include "../quant/quant_block.hpp"
#include "policy_base.hpp"

namespace kvpack {

/// \brief KIVI quantization of everything but the newest `residual` tokens.
///
/// compress() quantizes, in whole groups of `group` tokens, every token older than the newest
/// `residual` ones: keys per channel over the group's tokens, values per token over groups of
/// `group` channels (QuantBlock format). The newest tokens stay fp16, so at least `residual`
/// and fewer than `residual + group` tokens are full precision after each compress(). Call
/// compress() again during decoding to quantize what has aged out of the window.
/// Knobs (paper): bits 2 (also 4, 8); group 32; residual 128 (32 in the paper's examples).
/// int8_query (not in the paper; llama.cpp's CPU flash attention does the same for its quantized
/// K) trades exact key scores for integer dot products: see its comment.
struct Quantize : PolicyBase {
  static constexpr const char* name = "Quantize";
  int bits = 4;
  int group = 32;
  int64_t residual = 128;
  /// Decode attention scores quantized keys from an int8 copy of the query, scaled per (query
  /// row, key group), with integer dot products on the codes: AVX-512 VNNI, or AVX2 (vpmaddubsw /
  /// vpmaddwd) on a CPU without VNNI + VBMI, same results as the scalar reference
  /// (quant/int8_query.hpp). Bits 4 or 8 and group ≥ 32 only (the formats with those kernels;
  /// others are refused). On AVX2 the key scoring is no faster than exact (per-group query
  /// rounding costs what the integer dots save: decode attend at 32 K runs at 1.0x the exact
  /// path's speed at 4 bits, 0.9x at 8 bits, Zen 3). Each score moves by at most α/2 · Σ codes (α =
  /// max_c |q_c · scale_c| / 127): small beside the keys' own error at 4 bits, not at 8. Values
  /// stay fp32. Applies to decode rows on AVX2 or better with head_dim % 16 == 0 (KVPACK_ISA=scalar
  /// and prefill chunks score exactly). Storage is unchanged.
  bool int8_query = false;

  Quantize() = default;
  Quantize(int bits_, int group_ = 32, int64_t residual_ = 128)
      : bits(bits_), group(group_), residual(residual_) {}

  /// Bytes one quantized value costs: its code plus its share of the block's fp16 scale and
  /// minimum (QuantBlock: 4 bytes per `group` values). What budgets split by bytes price it at.
  double bytes_per_value() const { return bits / 8.0 + 4.0 / group; }

  /// Knobs of the block format alone: what quantizing a low-rank basis needs (its groups run
  /// along tokens, per basis column, so head_dim and residual do not constrain it).
  void validate_basis() const {
    constexpr const char* where = "Quantize";
    detail::require(bits == 2 || bits == 4 || bits == 8, where, "bits", bits, "2, 4 or 8");
    detail::require(group == 16 || group == 32 || group == 64 || group == 128, where, "group",
                    group, "16, 32, 64 or 128");
  }

  /// Knobs of row quantization: values are grouped along channels, so `group` must divide
  /// head_dim, and whole groups of tokens leave the residual window.
  void validate(const ModelShape& shape) const {
    constexpr const char* where = "Quantize";
    validate_basis();
    detail::require(shape.head_dim % group == 0, where, "group", group,
                    detail::concat("a divisor of head_dim (", shape.head_dim, ")"));
    detail::require(residual >= 0 && residual % group == 0, where, "residual", residual,
                    detail::concat("a non-negative multiple of group (", group, ")"));
    detail::require(
        !int8_query || ((bits == 4 || bits == 8) && group >= 32), where, "int8_query", "true",
        detail::concat("bits 4 or 8 and group >= 32 with it (bits ", bits, ", group ", group, ")"));
  }
};

}  // namespace kvpack
