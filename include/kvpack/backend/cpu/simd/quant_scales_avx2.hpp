/// \file backend/cpu/simd/quant_scales_avx2.hpp
/// \brief The fp16 scale and minimum of 8 KIVI blocks (QuantBlock) as two fp32 vectors, for the
/// AVX2 decode kernels (quantized_attention.hpp) and the AVX2 int8-query key kernel.
#pragma once

#include <cstdint>
#include <cstring>

#include "../../../isa.hpp"

#if defined(KVPACK_X86_DISPATCH)
namespace kvpack {
namespace detail {

/// The fp16 scales and minima of 8 blocks as fp32, from their first 32-bit words (a block starts
/// with its scale and minimum).
KVPACK_TARGET_AVX2 inline void avx2_scales_and_mins(const uint32_t (&w)[8], __m256& scale,
                                                    __m256& min) {
  const __m256i words =
      _mm256_setr_epi32(static_cast<int>(w[0]), static_cast<int>(w[1]), static_cast<int>(w[2]),
                        static_cast<int>(w[3]), static_cast<int>(w[4]), static_cast<int>(w[5]),
                        static_cast<int>(w[6]), static_cast<int>(w[7]));
  // [scale 0..3, min 0..3 | scale 4..7, min 4..7] → [scales | mins]
  const __m256i halves = _mm256_permute4x64_epi64(
      _mm256_packus_epi32(_mm256_and_si256(words, _mm256_set1_epi32(0xFFFF)),
                          _mm256_srli_epi32(words, 16)),
      0xD8);
  scale = _mm256_cvtph_ps(_mm256_castsi256_si128(halves));
  min = _mm256_cvtph_ps(_mm256_extracti128_si256(halves, 1));
}

/// The same of blocks[0], blocks[step], ..., the first `count` of them (the rest read as 0).
template <class Block>
KVPACK_TARGET_AVX2 inline void avx2_scales_and_mins(const Block* blocks, int64_t step, int count,
                                                    __m256& scale, __m256& min) {
  uint32_t w[8];
  for (int j = 0; j < 8; ++j) {
    w[j] = 0;
    if (j < count) std::memcpy(&w[j], blocks + j * step, sizeof(uint32_t));
  }
  avx2_scales_and_mins(w, scale, min);
}

/// The same of rows[0][g], rows[1][g], ..., the first `count` (the blocks of tokens in their
/// pages; the rest read as 0).
template <class Block>
KVPACK_TARGET_AVX2 inline void avx2_row_scales_and_mins(const Block* const* rows, int g, int count,
                                                        __m256& scale, __m256& min) {
  uint32_t w[8];
  for (int j = 0; j < 8; ++j) {
    w[j] = 0;
    if (j < count) std::memcpy(&w[j], rows[j] + g, sizeof(uint32_t));
  }
  avx2_scales_and_mins(w, scale, min);
}

}  // namespace detail
}  // namespace kvpack
#endif  // KVPACK_X86_DISPATCH
