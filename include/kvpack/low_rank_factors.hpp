/// \file low_rank_factors.hpp
/// \brief Read-only views of a low-rank cache's storage (CrossLayerSVD, ChannelShrink and their
/// Compose<…, Quantize>), what KVCache::low_rank_factors returns: enough for a foreign attention
/// kernel to rebuild every key and value (docs/page_formats.md, "Low-rank factors").
#pragma once

#include <cstddef>
#include <cstdint>

#include "half.hpp"
#include "rope.hpp"

namespace kvpack {

/// \brief One token basis A [tokens][rank], shared by the kv heads of a layer (ChannelShrink) or
/// of an xKV layer group (CrossLayerSVD), in pages of the cache's page_pool()
/// (docs/page_formats.md, "Low-rank bases in pages"). Rows [0, quantized) are KIVI blocks
/// QuantBlock<bits, group> ordered [row group][column] (one block per basis column over each
/// whole group of rows, as KIVI stores keys; none when bits is 0): block b = g · rank + c lies in
/// page page_ids[b / (page_bytes / block_bytes)] at byte (b mod (page_bytes / block_bytes)) ·
/// block_bytes, with block_bytes = 4 + group · bits / 8. Rows [quantized, tokens) are fp16,
/// row-major: element e = (t − quantized) · rank + j lies in page
/// page_ids[block_pages + e / (page_bytes / 2)] at byte 2 · (e mod (page_bytes / 2)).
struct LowRankBasisData {
  int64_t tokens = 0;
  int rank = 0;
  int bits = 0;   ///< 0 (fp16 rows only), 2, 4 or 8
  int group = 0;  ///< rows per block
  int64_t quantized = 0;
  std::size_t page_bytes = 0;         ///< the pool's page size
  int64_t block_pages = 0;            ///< pages [0, block_pages) hold the blocks
  int64_t pages = 0;                  ///< pages held
  const int32_t* page_ids = nullptr;  ///< [pages]: ids in the cache's page_pool()
};

/// \brief One (layer, kv head) of a low-rank cache. Token t < factored is row t of the bases
/// times this head's factors: key = RoPE(key_basis[t] · key_factor, positions[t]) (keys are
/// factored before RoPE: rotate with `rope` at the token's position), value = value_basis[t] ·
/// value_factor; tokens [factored, tokens) are exact fp16 tail rows (post-RoPE keys). Pointers
/// stay valid until the next call that changes the cache.
struct LowRankHeadFactors {
  int head_dim = 0;
  int64_t tokens = 0;    ///< tokens held
  int64_t factored = 0;  ///< tokens in the bases (rows [0, factored) of each basis)
  LowRankBasisData key_basis, value_basis;
  const float* key_factor = nullptr;    ///< [key_basis.rank][head_dim], row-major
  const float* value_factor = nullptr;  ///< [value_basis.rank][head_dim], row-major
  const Half* tail_k = nullptr;         ///< [tokens − factored][head_dim]
  const Half* tail_v = nullptr;         ///< [tokens − factored][head_dim]
  const int32_t* positions = nullptr;   ///< [tokens], ascending
  const Rope* rope = nullptr;           ///< the model's RoPE (the cache's shape)
};

}  // namespace kvpack
