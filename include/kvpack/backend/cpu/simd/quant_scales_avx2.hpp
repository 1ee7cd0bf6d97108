/// \file backend/cpu/simd/quant_scales_avx2.hpp
/// \brief The fp16 scale and minimum of KIVI blocks (QuantBlock) as fp32 vectors, loaded without
/// gathers: for the AVX2 decode kernels (quantized_attention.hpp) and the AVX2 and AVX-512
/// int8-query key kernels.
#pragma once

#include <cstdint>
#include <cstring>

#include "../../../isa.hpp"

#if defined(KVPACK_X86_DISPATCH)
namespace kvpack {
namespace detail {

/// The first 32-bit words of blocks at(0), .., at(3) (a block starts with its fp16 scale and
/// minimum), as four scalar loads. Compilers targeting AVX-512 turn such loads into a gather
/// (vpgatherdd, microcoded on Zen 4, where perf put 40 % of the AVX2 key kernel's samples on it,
/// much of that the wait on memory its first load also pays: see the key group prefetch in
/// quantized_attention.hpp), so each word passes through an empty asm statement, which no
/// vectorizer merges.
template <class At>
KVPACK_TARGET_AVX2 inline __m128i first_words4(At at) {
  uint32_t w[4];
  for (int j = 0; j < 4; ++j) {
    std::memcpy(&w[j], at(j), sizeof(uint32_t));
    __asm__("" : "+r"(w[j]));
  }
  return _mm_setr_epi32(static_cast<int>(w[0]), static_cast<int>(w[1]), static_cast<int>(w[2]),
                        static_cast<int>(w[3]));
}

/// The fp16 scales and minima of 8 blocks as fp32, from their first 32-bit words.
KVPACK_TARGET_AVX2 inline void avx2_scales_and_mins(__m256i words, __m256& scale, __m256& min) {
  // [scale 0..3, min 0..3 | scale 4..7, min 4..7] → [scales | mins]
  const __m256i halves = _mm256_permute4x64_epi64(
      _mm256_packus_epi32(_mm256_and_si256(words, _mm256_set1_epi32(0xFFFF)),
                          _mm256_srli_epi32(words, 16)),
      0xD8);
  scale = _mm256_cvtph_ps(_mm256_castsi256_si128(halves));
  min = _mm256_cvtph_ps(_mm256_extracti128_si256(halves, 1));
}

/// first_words8 of fewer than 8 blocks (a tile's last tokens): kept out of line, so that the
/// common case inlines into the kernels' loops.
template <class At>
KVPACK_TARGET_AVX2 __attribute__((noinline)) __m256i first_words_partial(At at, int count) {
  alignas(32) uint32_t w[8];
  for (int j = 0; j < 8; ++j) {
    w[j] = 0;
    if (j < count) std::memcpy(&w[j], at(j), sizeof(uint32_t));
  }
  return _mm256_load_si256(reinterpret_cast<const __m256i*>(w));
}

/// The first words of blocks at(0), .., at(7), those from `count` on read as 0.
template <class At>
KVPACK_TARGET_AVX2 inline __m256i first_words8(At at, int count) {
  if (count < 8) return first_words_partial(at, count);
  return _mm256_setr_m128i(first_words4(at), first_words4([&](int j) { return at(4 + j); }));
}

/// The same of blocks[0, 8) (a key group's channels).
template <class Block>
KVPACK_TARGET_AVX2 inline void avx2_scales_and_mins(const Block* blocks, __m256& scale,
                                                    __m256& min) {
  avx2_scales_and_mins(first_words8([&](int j) { return blocks + j; }, 8), scale, min);
}

/// The same of rows[0][g], rows[1][g], ..., the first `count` (the blocks of tokens in their
/// pages; the rest read as 0).
template <class Block>
KVPACK_TARGET_AVX2 inline void avx2_row_scales_and_mins(const Block* const* rows, int g, int count,
                                                        __m256& scale, __m256& min) {
  avx2_scales_and_mins(first_words8([&](int j) { return rows[j] + g; }, count), scale, min);
}

}  // namespace detail
}  // namespace kvpack
#endif  // KVPACK_X86_DISPATCH
