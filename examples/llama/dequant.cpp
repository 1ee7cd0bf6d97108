#include "dequant.hpp"

#include <cstring>
#include <string>

namespace kvpack::llama {

float fp16_to_fp32(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exponent = (h >> 10) & 0x1Fu;
  uint32_t mantissa = h & 0x3FFu;
  uint32_t bits;
  if (exponent == 0x1F) {
    bits = sign | 0x7F800000u | (mantissa << 13);  // inf / NaN (payload kept)
  } else if (exponent != 0) {
    bits = sign | ((exponent + 112) << 23) | (mantissa << 13);  // rebias 15 -> 127
  } else if (mantissa == 0) {
    bits = sign;  // signed zero
  } else {
    // Subnormal half: shift the mantissa up until its leading one becomes the implicit bit.
    exponent = 113;
    while ((mantissa & 0x400u) == 0) {
      mantissa <<= 1;
      --exponent;
    }
    bits = sign | (exponent << 23) | ((mantissa & 0x3FFu) << 13);
  }
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

uint16_t fp32_to_fp16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof(bits));
  const uint16_t sign = static_cast<uint16_t>((bits >> 16) & 0x8000u);
  const uint32_t abs = bits & 0x7FFFFFFFu;
  if (abs >= 0x7F800000u) {  // inf or NaN
    return sign | (abs > 0x7F800000u ? 0x7E00u : 0x7C00u);
  }
  if (abs >= 0x477FF000u) return sign | 0x7C00u;  // rounds to >= 65520: overflow to inf
  if (abs < 0x38800000u) {
    // Result is subnormal (or zero): value = mant * 2^-24; round the shifted mantissa to even.
    if (abs < 0x33000000u) return sign;  // below half of the smallest subnormal
    const uint32_t exponent = abs >> 23;
    const uint32_t mantissa = (abs & 0x7FFFFFu) | 0x800000u;
    const uint32_t shift = 126 - exponent;  // in [14, 24]
    uint32_t result = mantissa >> shift;
    const uint32_t rest = mantissa & ((1u << shift) - 1);
    const uint32_t half = 1u << (shift - 1);
    if (rest > half || (rest == half && (result & 1u))) ++result;
    return sign | static_cast<uint16_t>(result);
  }
  // Normal: rebias the exponent, then round the 13 dropped mantissa bits to even. A carry out of
  // the mantissa correctly bumps the exponent.
  uint32_t result = ((abs >> 13) - (112u << 10));
  const uint32_t rest = abs & 0x1FFFu;
  if (rest > 0x1000u || (rest == 0x1000u && (result & 1u))) ++result;
  return sign | static_cast<uint16_t>(result);
}

bool can_dequantize(TensorType type) {
  switch (type) {
    case TensorType::kF32:
    case TensorType::kF16:
    case TensorType::kQ4_0:
    case TensorType::kQ4_1:
    case TensorType::kQ8_0:
      return true;
    default:
      return false;
  }
}

namespace {

void dequantize_q4_0(const uint8_t* src, float* dst, int64_t blocks) {
  for (int64_t b = 0; b < blocks; ++b, src += sizeof(BlockQ4_0), dst += 32) {
    BlockQ4_0 block;
    std::memcpy(&block, src, sizeof(block));
    const float d = fp16_to_fp32(block.d);
    for (int j = 0; j < 16; ++j) {
      dst[j] = static_cast<float>((block.qs[j] & 0x0F) - 8) * d;
      dst[j + 16] = static_cast<float>((block.qs[j] >> 4) - 8) * d;
    }
  }
}

void dequantize_q4_1(const uint8_t* src, float* dst, int64_t blocks) {
  for (int64_t b = 0; b < blocks; ++b, src += sizeof(BlockQ4_1), dst += 32) {
    BlockQ4_1 block;
    std::memcpy(&block, src, sizeof(block));
    const float d = fp16_to_fp32(block.d);
    const float m = fp16_to_fp32(block.m);
    for (int j = 0; j < 16; ++j) {
      dst[j] = static_cast<float>(block.qs[j] & 0x0F) * d + m;
      dst[j + 16] = static_cast<float>(block.qs[j] >> 4) * d + m;
    }
  }
}

void dequantize_q8_0(const uint8_t* src, float* dst, int64_t blocks) {
  for (int64_t b = 0; b < blocks; ++b, src += sizeof(BlockQ8_0), dst += 32) {
    BlockQ8_0 block;
    std::memcpy(&block, src, sizeof(block));
    const float d = fp16_to_fp32(block.d);
    for (int j = 0; j < 32; ++j) dst[j] = static_cast<float>(block.qs[j]) * d;
  }
}

}  // namespace

void dequantize_row(TensorType type, const uint8_t* src, float* dst, int64_t n) {
  const TensorTypeTraits traits = tensor_type_traits(static_cast<uint32_t>(type));
  if (n < 0 || n % traits.block_size != 0) {
    throw GgufError("dequantize_row: " + std::to_string(n) + " values is not a multiple of the " +
                    traits.name + " block size " + std::to_string(traits.block_size));
  }
  const int64_t blocks = n / traits.block_size;
  switch (type) {
    case TensorType::kF32:
      std::memcpy(dst, src, static_cast<size_t>(n) * sizeof(float));
      return;
    case TensorType::kF16:
      for (int64_t i = 0; i < n; ++i) {
        uint16_t h;
        std::memcpy(&h, src + 2 * i, sizeof(h));
        dst[i] = fp16_to_fp32(h);
      }
      return;
    case TensorType::kQ4_0:
      dequantize_q4_0(src, dst, blocks);
      return;
    case TensorType::kQ4_1:
      dequantize_q4_1(src, dst, blocks);
      return;
    case TensorType::kQ8_0:
      dequantize_q8_0(src, dst, blocks);
      return;
    default:
      throw GgufError(std::string("dequantize_row: tensor type ") + traits.name +
                      " is not supported (F32, F16, Q4_0, Q4_1 and Q8_0 are)");
  }
}

}  // namespace kvpack::llama
