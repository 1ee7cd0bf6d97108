#pragma once
// Scalar reference dequantizers for the GGUF block formats the reference model uses.

#include <cstdint>

#include "gguf.hpp"

namespace kvpack::llama {

/// IEEE half -> float by bit manipulation (subnormals, infinities and NaN included).
float fp16_to_fp32(uint16_t h);
/// float -> IEEE half, round to nearest even; overflow gives infinity, NaN stays NaN.
uint16_t fp32_to_fp16(float f);

// Block layouts exactly as stored in the file (ggml's block_q4_0 / block_q4_1 / block_q8_0).
struct BlockQ4_0 {
  uint16_t d;
  uint8_t qs[16];
};
struct BlockQ4_1 {
  uint16_t d;
  uint16_t m;
  uint8_t qs[16];
};
struct BlockQ8_0 {
  uint16_t d;
  int8_t qs[32];
};
static_assert(sizeof(BlockQ4_0) == 18, "Q4_0 block must be 18 bytes");
static_assert(sizeof(BlockQ4_1) == 20, "Q4_1 block must be 20 bytes");
static_assert(sizeof(BlockQ8_0) == 34, "Q8_0 block must be 34 bytes");

/// True for the types dequantize_row() implements: F32, F16, Q4_0, Q4_1, Q8_0.
bool can_dequantize(TensorType type);

/// Converts `n` values (a multiple of the type's block size) starting at `src` to fp32.
/// `src` needs no alignment. Throws GgufError for a type it does not implement or a bad `n`.
void dequantize_row(TensorType type, const uint8_t* src, float* dst, int64_t n);

}  // namespace kvpack::llama
