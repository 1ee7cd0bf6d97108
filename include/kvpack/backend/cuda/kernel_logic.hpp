/// \file backend/cuda/kernel_logic.hpp
/// \brief The per-element and per-tile logic of the CUDA kernels, as KVPACK_HOST_DEVICE functions.
///
/// Nothing here names a CUDA type, so the header compiles with any C++17 compiler and the CPU
/// tests (tests/cpu/cuda_kernel_logic_test.cpp) exercise exactly what the kernels run. The
/// `__global__` wrappers in kernels/*.cuh only map threads to the indices these functions take.
#pragma once

#include <cmath>
#include <cstdint>
#include <type_traits>
#include <utility>

#include "../../config.hpp"
#include "../../detail/online_softmax.hpp"
#include "../../error.hpp"
#include "../../half.hpp"

namespace kvpack {
namespace cuda {

// ------------------------------------------------------------------------------------------------
// Launch boundary: runtime head_dim -> compile-time constant.

/// Head dims the CUDA attention kernels are compiled for.
inline bool supported_head_dim(int head_dim) { return head_dim == 64 || head_dim == 128; }

/// Calls `f(std::integral_constant<int, D>{})` for the runtime `head_dim`; throws kvpack::error
/// for a head_dim the kernels are not compiled for.
template <class F>
decltype(auto) dispatch_head_dim(int head_dim, F&& f) {
  switch (head_dim) {
    case 64:
      return std::forward<F>(f)(std::integral_constant<int, 64>{});
    case 128:
      return std::forward<F>(f)(std::integral_constant<int, 128>{});
    default:
      throw error(detail::concat("dispatch_head_dim: head_dim = ", head_dim,
                                 ", expected 64 or 128 (the head dims the CUDA kernels are "
                                 "compiled for)"));
  }
}

// ------------------------------------------------------------------------------------------------
// Append: strided input rows -> per-head storage rows.

/// Element offset of (token t, head h, channel i) in a view with the given element strides.
KVPACK_HOST_DEVICE int64_t strided_offset(int64_t t, int64_t h, int64_t i, int64_t token_stride,
                                          int64_t head_stride) {
  return t * token_stride + h * head_stride + i;
}

/// fp32 -> storage element, rounding as the CPU's store_row does (round to nearest even).
KVPACK_HOST_DEVICE void store_element(float x, Half* dst) { *dst = to_half(x); }
KVPACK_HOST_DEVICE void store_element(float x, float* dst) { *dst = x; }

/// The validation predicate of detail::check_values: finite and |x| <= limit (false for NaN).
KVPACK_HOST_DEVICE bool value_in_range(float x, float limit) { return fabsf(x) <= limit; }

/// Capacity (rows) after growing a head that must hold `needed` rows: geometric (doubling, at
/// least 64 rows) so one-token decode appends reallocate O(log n) times.
KVPACK_HOST_DEVICE int64_t grown_capacity(int64_t needed, int64_t capacity) {
  int64_t grown = capacity * 2;
  if (grown < 64) grown = 64;
  return grown > needed ? grown : needed;
}

// ------------------------------------------------------------------------------------------------
// Selection: the order of detail/select.hpp as one 64-bit key, and a radix select over it.

/// Same rule as detail::is_protected: sinks below `protect_below`, recent above `protect_above`.
KVPACK_HOST_DEVICE bool is_protected_position(int64_t position, int64_t protect_below,
                                              int64_t protect_above) {
  return position < protect_below || position > protect_above;
}

/// Monotone map of a float to uint32 (a < b  <=>  ordered_bits(a) < ordered_bits(b)), with
/// -0 and +0 mapped alike because the CPU comparator treats them as equal.
KVPACK_HOST_DEVICE uint32_t ordered_bits(float score) {
  if (score == 0.0f) score = 0.0f;  // -0 -> +0
  const uint32_t u = detail::float_bits(score);
  return (u & 0x80000000u) != 0 ? ~u : (u | 0x80000000u);
}

/// Selection key of candidate `index` (< 2^32): larger key = better, exactly the order of
/// detail::select_top_k (higher score first; equal scores: lower index first). Keys are unique.
KVPACK_HOST_DEVICE uint64_t selection_key(float score, int64_t index) {
  return (static_cast<uint64_t>(ordered_bits(score)) << 32) |
         static_cast<uint64_t>(0xFFFFFFFFu - static_cast<uint32_t>(index));
}

constexpr int kRadixBits = 8;
constexpr int kRadixBins = 1 << kRadixBits;
constexpr int kRadixPasses = 64 / kRadixBits;

/// Bit position of the digit examined by radix pass `pass` (most significant first).
KVPACK_HOST_DEVICE int radix_shift(int pass) { return 64 - kRadixBits * (pass + 1); }

/// The digit of `key` examined by pass `pass`.
KVPACK_HOST_DEVICE int radix_digit(uint64_t key, int pass) {
  return static_cast<int>((key >> radix_shift(pass)) & (kRadixBins - 1));
}

/// Mask of the digits fixed before pass `pass` (a key takes part in the pass when
/// (key & mask) == prefix).
KVPACK_HOST_DEVICE uint64_t radix_prefix_mask(int pass) {
  return pass == 0 ? 0ull : ~0ull << (radix_shift(pass) + kRadixBits);
}

/// One radix-select step. `hist[d]` counts the participating keys with digit d; `remaining`
/// (>= 1) is the rank, from the top, of the key sought among them. Returns the digit of that
/// key and lowers `remaining` by the keys with larger digits. Requires sum(hist) >= remaining.
KVPACK_HOST_DEVICE int select_digit(const uint32_t* hist, uint64_t& remaining) {
  uint64_t above = 0;
  for (int d = kRadixBins - 1; d > 0; --d) {
    if (above + hist[d] >= remaining) {
      remaining -= above;
      return d;
    }
    above += hist[d];
  }
  remaining -= above;
  return 0;
}

/// Tokens a head keeps: its protected tokens plus the best candidates up to the target (the
/// count detail::select_top_k returns).
KVPACK_HOST_DEVICE int64_t kept_count(int64_t protected_tokens, int64_t size, int64_t target) {
  int64_t room = target - protected_tokens;
  if (room < 0) room = 0;
  // As detail::select_top_k: a head holding tokens never empties.
  if (room == 0 && protected_tokens == 0 && size > 0) room = 1;
  const int64_t candidates = size - protected_tokens;
  return protected_tokens + (room < candidates ? room : candidates);
}

// ------------------------------------------------------------------------------------------------
// Attention: blocks of (kv head, 16 query rows, key split); 32-key tiles; online softmax.

constexpr int kAttentionWarps = 4;
constexpr int kAttentionThreads = 32 * kAttentionWarps;
constexpr int kAttentionRowsPerWarp = 4;
/// Query rows per block: rows r = t * group + j of one kv head (token t, group member j), so the
/// K/V tile in shared memory is reused by every GQA row and by several query tokens.
constexpr int kAttentionRows = kAttentionWarps * kAttentionRowsPerWarp;
/// Keys per shared-memory tile (one key per lane when scoring).
constexpr int kAttentionTile = 32;

/// Keys of a head visible to a query at `query_position`: the count of positions <= it
/// (positions ascending), i.e. std::upper_bound as in the CPU attention.
KVPACK_HOST_DEVICE int64_t visible_keys(const int32_t* positions, int64_t size,
                                        int64_t query_position) {
  int64_t lo = 0, hi = size;
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (static_cast<int64_t>(positions[mid]) <= query_position) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  return lo;
}

/// Keys [begin, end) of split `split` out of `splits` over `size` keys (the CPU's partition:
/// spans of ceil(size / splits), the last one shorter or empty).
KVPACK_HOST_DEVICE void split_range(int64_t size, int64_t splits, int64_t split, int64_t& begin,
                                    int64_t& end) {
  const int64_t span = (size + splits - 1) / splits;
  begin = split * span < size ? split * span : size;
  end = (split + 1) * span < size ? (split + 1) * span : size;
}

/// Query token and query head of local row `row` of kv head `head` (rows r = t * group + j).
KVPACK_HOST_DEVICE void attention_row(int64_t row, int group, int head, int64_t& token,
                                      int& q_head) {
  token = row / group;
  q_head = head * group + static_cast<int>(row % group);
}

/// Online-softmax step for a tile whose largest visible score is `tile_max`: raises the running
/// max `m`, rescales the running denominator `l`, and returns the factor the accumulator must be
/// multiplied by. The caller then adds the tile's sum of exp(s - m) to `l`.
KVPACK_HOST_DEVICE float softmax_advance(float& m, float& l, float tile_max) {
  const float new_max = m > tile_max ? m : tile_max;
  const float rescale = detail::softmax_rescale(m, new_max);
  l *= rescale;
  m = new_max;
  return rescale;
}

/// Key splits for a launch of `blocks` (kv heads x row blocks) blocks over heads of at most
/// `longest` keys: enough to fill the device about twice, each split at least 256 keys, at most
/// 32 splits. Prefill-sized launches use one split.
inline int64_t attention_splits(int64_t blocks, int64_t longest, int sm_count) {
  if (blocks <= 0 || blocks >= sm_count) return 1;
  int64_t splits = (2 * static_cast<int64_t>(sm_count) + blocks - 1) / blocks;
  const int64_t by_length = (longest + 255) / 256;
  if (splits > by_length) splits = by_length;
  if (splits > 32) splits = 32;
  return splits < 1 ? 1 : splits;
}

}  // namespace cuda
}  // namespace kvpack
