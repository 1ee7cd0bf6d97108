/// \file quant/quant_block.hpp
/// \brief KIVI's asymmetric min/max integer block: G values, an fp16 scale and an fp16 minimum.
///
/// Format (like ggml's block_q4_1, generalised to 2/4/8 bits): `scale`, `min`, then G codes
/// packed little-end first — 8-bit one per byte, 4-bit two per byte (element 2i in the low
/// nibble, 2i+1 in the high nibble), 2-bit four per byte (element 4i + j in bits 2j..2j+1).
/// x̂ = code · scale + min. Keys use one block per channel over G tokens, values one block per
/// token over G channels.
///
/// Rounding rule (every backend must match it bit for bit): `min` is the largest fp16 ≤ the
/// group minimum, `scale` the smallest fp16 ≥ (max − min) / (2^bits − 1), and
/// code = clamp(floor(fma(x − min, 1 / scale, 0.5)), 0, 2^bits − 1), computed in fp32 (one
/// division for 1 / scale, one fused multiply-add per code: written out, so no compiler's
/// contraction choice can change a code). With those directed roundings every value satisfies
/// |x − x̂| ≤ scale / 2 (plus fp32 rounding).
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "../config.hpp"
#include "../half.hpp"

namespace kvpack {

/// \brief One quantization group of `Group` values at `Bits` bits.
/// \tparam Bits 2, 4 or 8.  \tparam Group values per block (a multiple of 8/Bits, KIVI: 32).
template <int Bits, int Group>
struct QuantBlock {
  static_assert(Bits == 2 || Bits == 4 || Bits == 8, "QuantBlock supports 2, 4 or 8 bits");
  static_assert(Group > 0 && (Group * Bits) % 8 == 0, "a block must fill whole bytes");
  static constexpr int bits = Bits;
  static constexpr int group = Group;
  static constexpr int levels = (1 << Bits) - 1;
  static constexpr int code_bytes = Group * Bits / 8;

  Half scale;
  Half min;
  uint8_t codes[code_bytes];
};

static_assert(sizeof(QuantBlock<2, 32>) == 12, "2-bit block: 4 + 8 bytes");
static_assert(sizeof(QuantBlock<4, 32>) == 20, "4-bit block: 4 + 16 bytes (as ggml q4_1)");
static_assert(sizeof(QuantBlock<8, 32>) == 36, "8-bit block: 4 + 32 bytes");

namespace detail {

/// Next fp16 towards −inf (finite inputs), used for the directed roundings above.
KVPACK_HOST_DEVICE Half half_down(float x) {
  Half h = to_half(x);
  if (to_float(h) <= x) return h;
  // One ulp towards −inf: for positive values decrement the magnitude, for negative increment.
  if (h.bits == 0x0000u) return Half{0x8001u};
  h.bits =
      (h.bits & 0x8000u) ? static_cast<uint16_t>(h.bits + 1) : static_cast<uint16_t>(h.bits - 1);
  return h;
}

KVPACK_HOST_DEVICE Half half_up(float x) {
  Half h = to_half(x);
  if (to_float(h) >= x) return h;
  if (h.bits == 0x8000u) return Half{0x0001u};
  h.bits =
      (h.bits & 0x8000u) ? static_cast<uint16_t>(h.bits - 1) : static_cast<uint16_t>(h.bits + 1);
  return h;
}

template <int Bits>
KVPACK_HOST_DEVICE uint32_t get_code(const uint8_t* codes, int i) {
  if constexpr (Bits == 8) {
    return codes[i];
  } else if constexpr (Bits == 4) {
    return (codes[i >> 1] >> ((i & 1) * 4)) & 0xFu;
  } else {
    return (codes[i >> 2] >> ((i & 3) * 2)) & 0x3u;
  }
}

template <int Bits>
KVPACK_HOST_DEVICE void set_code(uint8_t* codes, int i, uint32_t code) {
  if constexpr (Bits == 8) {
    codes[i] = static_cast<uint8_t>(code);
  } else if constexpr (Bits == 4) {
    const int shift = (i & 1) * 4;
    codes[i >> 1] = static_cast<uint8_t>((codes[i >> 1] & ~(0xFu << shift)) | (code << shift));
  } else {
    const int shift = (i & 3) * 2;
    codes[i >> 2] = static_cast<uint8_t>((codes[i >> 2] & ~(0x3u << shift)) | (code << shift));
  }
}

}  // namespace detail

/// Scalar reference quantizer: x[i * stride], i < Group, into `block`. Inputs must be finite
/// and within the fp16 range (the cache validates them on append).
template <int Bits, int Group>
KVPACK_HOST_DEVICE void quantize_block_ref(const float* x, int64_t stride,
                                           QuantBlock<Bits, Group>& block) {
  float lo = x[0], hi = x[0];
  for (int i = 1; i < Group; ++i) {
    const float v = x[i * stride];
    lo = v < lo ? v : lo;
    hi = v > hi ? v : hi;
  }
  block.min = detail::half_down(lo);
  const float min = to_float(block.min);
  block.scale = detail::half_up((hi - min) / static_cast<float>(QuantBlock<Bits, Group>::levels));
  const float scale = to_float(block.scale);
  const float inv = scale > 0.0f ? 1.0f / scale : 0.0f;
  for (int i = 0; i < QuantBlock<Bits, Group>::code_bytes; ++i) block.codes[i] = 0;
  for (int i = 0; i < Group; ++i) {
    float c = fmaf(x[i * stride] - min, inv, 0.5f);
    c = c < 0.0f ? 0.0f : c;
    uint32_t code = static_cast<uint32_t>(c);  // floor for c >= 0
    code = code > static_cast<uint32_t>(QuantBlock<Bits, Group>::levels)
               ? static_cast<uint32_t>(QuantBlock<Bits, Group>::levels)
               : code;
    detail::set_code<Bits>(block.codes, i, code);
  }
}

/// Scalar reference dequantizer of element i.
template <int Bits, int Group>
KVPACK_HOST_DEVICE float dequantize_ref(const QuantBlock<Bits, Group>& block, int i) {
  return static_cast<float>(detail::get_code<Bits>(block.codes, i)) * to_float(block.scale) +
         to_float(block.min);
}

}  // namespace kvpack

namespace kvpack {

/// Decodes all Group values of `block` into out[i * stride].
template <int Bits, int Group>
KVPACK_HOST_DEVICE void dequantize_block_ref(const QuantBlock<Bits, Group>& block, float* out,
                                             int64_t stride) {
  const float scale = to_float(block.scale);
  const float min = to_float(block.min);
  for (int i = 0; i < Group; ++i) {
    out[i * stride] = static_cast<float>(detail::get_code<Bits>(block.codes, i)) * scale + min;
  }
}

/// \brief Decodes rows [begin, end) of a channel-blocked matrix into `out` (row-major,
/// (end − begin) × d): block (t / Group) · d + c holds channel c of the Group rows from
/// (t / Group) · Group (KIVI's key layout). Whole groups decode block by block, partial ones
/// value by value; either way the values are dequantize_ref's.
template <int Bits, int Group>
inline void dequantize_channel_rows_ref(const QuantBlock<Bits, Group>* blocks, int d, int64_t begin,
                                        int64_t end, float* out) {
  for (int64_t t = begin; t < end;) {
    float* row = out + (t - begin) * d;
    const QuantBlock<Bits, Group>* group = blocks + (t / Group) * d;
    if (t % Group == 0 && t + Group <= end) {
      for (int c = 0; c < d; ++c) dequantize_block_ref(group[c], row + c, d);
      t += Group;
    } else {
      for (int c = 0; c < d; ++c) row[c] = dequantize_ref(group[c], static_cast<int>(t % Group));
      ++t;
    }
  }
}

namespace detail {
using QuantBlock4x32 = QuantBlock<4, 32>;  // offsetof is a macro: no comma in its argument
static_assert(offsetof(QuantBlock4x32, codes) == 4, "codes follow the fp16 scale and min");
}  // namespace detail

/// dequantize_ref of element i of a block given by its address and its runtime bit width (the
/// group size only sets where the next block starts): the same bytes read the same way, for
/// kernels that serve every (bits, group) with one instantiation.
KVPACK_HOST_DEVICE float dequantize_packed(const uint8_t* block, int bits, int i) {
  const Half scale{static_cast<uint16_t>(block[0] | (block[1] << 8))};
  const Half min{static_cast<uint16_t>(block[2] | (block[3] << 8))};
  const int bit = i * bits;
  const uint32_t code =
      (static_cast<uint32_t>(block[4 + (bit >> 3)]) >> (bit & 7)) & ((1u << bits) - 1u);
  return static_cast<float>(code) * to_float(scale) + to_float(min);
}

/// Turns runtime (bits, group) into compile-time constants for `f(bits_c, group_c)`; returns
/// false for an unsupported pair. Supported: bits 2/4/8 × group 16/32/64/128.
template <class F>
bool dispatch_quant(int bits, int group, F&& f) {
  auto with_group = [&](auto b) {
    switch (group) {
      case 16:
        f(b, std::integral_constant<int, 16>{});
        return true;
      case 32:
        f(b, std::integral_constant<int, 32>{});
        return true;
      case 64:
        f(b, std::integral_constant<int, 64>{});
        return true;
      case 128:
        f(b, std::integral_constant<int, 128>{});
        return true;
      default:
        return false;
    }
  };
  switch (bits) {
    case 2:
      return with_group(std::integral_constant<int, 2>{});
    case 4:
      return with_group(std::integral_constant<int, 4>{});
    case 8:
      return with_group(std::integral_constant<int, 8>{});
    default:
      return false;
  }
}

}  // namespace kvpack
