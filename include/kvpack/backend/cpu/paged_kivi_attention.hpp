/// \file backend/cpu/paged_kivi_attention.hpp
/// \brief Attention over caller-owned KIVI pages (docs/page_formats.md, "KIVI blocks"), without
/// a KVCache: for engines that quantize into their own KV memory, or copy kvpack's pages out
/// (KVCache::kivi_pages), and want kvpack's fused-dequantization kernels.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <vector>

#include "../../config.hpp"
#include "../../detail/validate.hpp"
#include "../../error.hpp"
#include "../../executor.hpp"
#include "../../half.hpp"
#include "../../span.hpp"
#include "../../view.hpp"
#include "page_sizes.hpp"
#include "paged_attention.hpp"
#include "quantized_attention.hpp"

namespace kvpack {

/// \brief KIVI pages of a batch of sequences in caller memory, one page list per (sequence,
/// kv head): list i = b × kv_heads + h. List i holds tokens [0, quantized[i]) in blocks, in
/// pages indices[indptr[i]], ..., indices[indptr[i + 1] − 1] (token order; page p at byte offset
/// p × page_bytes of data, laid out as docs/page_formats.md "KIVI blocks" says for page_tokens
/// tokens per page), then tokens [quantized[i], quantized[i] + residual_tokens[i]) as fp16 rows
/// residual_k[i] and residual_v[i] ([residual_tokens[i]][head_dim] each). Key t of list i is at
/// position positions[i][t] (ascending int32) or, when `positions` is null, at position t.
struct PagedKivi {
  const void* data = nullptr;  ///< the pages (any alignment)
  std::size_t page_bytes = 0;  ///< stride of the pages: at least format_page_bytes()
  int64_t num_pages = 0;       ///< pages in data (bounds the ids)
  int bits = 4;                ///< 2, 4 or 8
  int group = 32;              ///< 16, 32, 64 or 128 (tokens per key block, channels per value)
  int page_tokens = 32;        ///< tokens per page: a multiple of group
  int kv_heads = 0;
  int head_dim = 0;                           ///< a multiple of group
  int batch = 0;                              ///< sequences
  const int32_t* indptr = nullptr;            ///< [batch × kv_heads + 1], indptr[0] = 0
  const int32_t* indices = nullptr;           ///< [indptr[batch × kv_heads]] page ids
  const int64_t* quantized = nullptr;         ///< [batch × kv_heads] tokens in blocks
  const int64_t* residual_tokens = nullptr;   ///< [batch × kv_heads]
  const Half* const* residual_k = nullptr;    ///< [batch × kv_heads] (null where 0 tokens)
  const Half* const* residual_v = nullptr;    ///< [batch × kv_heads] (null where 0 tokens)
  const int32_t* const* positions = nullptr;  ///< [batch × kv_heads] or null (key t at t)
  bool int8_query = false;  ///< decode rows score keys from an int8 query (Quantize::int8_query)

  /// Tokens of list i (sequence i / kv_heads, kv head i % kv_heads).
  int64_t tokens(int64_t i) const { return quantized[i] + residual_tokens[i]; }
  /// Bytes the format needs per page (detail::kivi_page_bytes).
  std::size_t format_page_bytes() const {
    return detail::kivi_page_bytes(page_tokens, head_dim, bits, group);
  }
};

namespace detail {

/// One list of a PagedKivi as the KIVI kernels read a head (KiviRows' Store).
struct KiviPageView {
  int bits, group, page_tokens, head_dim;
  bool int8_query;
  int64_t quantized;
  const uint8_t* data;
  std::size_t page_bytes;
  const int32_t* page_ids;
  const Half* tail_k;
  const Half* tail_v;

  const uint8_t* key_group(int64_t g) const {
    const PageOffset at = kivi_key_group_at(g, page_tokens, group, head_dim, bits);
    return data + page_ids[at.page] * page_bytes + at.offset;
  }
  const uint8_t* value_token(int64_t t) const {
    const PageOffset at = kivi_value_token_at(t, page_tokens, group, head_dim, bits);
    return data + page_ids[at.page] * page_bytes + at.offset;
  }
  const Half* tail_keys() const { return tail_k; }
  const Half* tail_values() const { return tail_v; }
};

}  // namespace detail

namespace cpu {

/// \brief Causal GQA attention of ragged queries over PagedKivi: sequence b's query tokens are
/// rows qo_indptr[b] .. qo_indptr[b + 1] − 1 of q (total × q_heads × head_dim, post-RoPE) with
/// positions q_positions (a query sees the keys at positions ≤ its own), output into out (same
/// shape). Scaled by 1/sqrt(head_dim), softmax in fp32; decode rows take the kernels that fold
/// dequantization into the dot products (KVCache::attend's, so results match it up to the
/// order of fp32 sums). Parallel over (sequence, kv head, query block) on `executor`. Throws
/// kvpack::error, writing nothing, on an unsupported bits/group, a page stride below the format's
/// page size, a bad table (ids outside [0, num_pages), a list with more blocks than its pages
/// hold, quantized not a multiple of group, indptr not ascending), a null residual under
/// residual tokens, a shape mismatch, or a query whose position sees no key.
inline void attend_paged(const PagedKivi& kv, const int32_t* qo_indptr, const ActivationView& q,
                         Positions q_positions, const OutputView& out,
                         Executor& executor = default_executor()) {
  constexpr const char* where = "attend_paged (KIVI)";
  const int d = kv.head_dim;
  detail::require(kv.data != nullptr && kv.indptr != nullptr && qo_indptr != nullptr &&
                      (kv.batch == 0 || (kv.indices != nullptr && kv.quantized != nullptr &&
                                         kv.residual_tokens != nullptr &&
                                         kv.residual_k != nullptr && kv.residual_v != nullptr)),
                  where, "page table", "a null array",
                  "data, indptr, indices, quantized, residual_tokens, residual_k, residual_v and "
                  "qo_indptr set");
  detail::require(dispatch_quant(kv.bits, kv.group, [](auto, auto) {}), where, "bits/group",
                  detail::concat(kv.bits, "/", kv.group),
                  "bits 2, 4 or 8 and group 16, 32, 64 or 128");
  detail::require(kv.kv_heads > 0 && d > 0 && d % kv.group == 0 && kv.batch >= 0, where,
                  "kv_heads/head_dim/batch", detail::concat(kv.kv_heads, "/", d, "/", kv.batch),
                  "positive, head_dim a multiple of group");
  detail::require(kv.page_tokens > 0 && kv.page_tokens % kv.group == 0, where, "page_tokens",
                  kv.page_tokens, detail::concat("a positive multiple of group ", kv.group));
  detail::require(kv.page_bytes >= kv.format_page_bytes(), where, "page_bytes", kv.page_bytes,
                  detail::concat(">= ", kv.format_page_bytes(), " (one page of this format)"));
  detail::check_paged_queries(where, kv.kv_heads, d, q, q_positions, out);
  const int64_t lists = static_cast<int64_t>(kv.batch) * kv.kv_heads;
  detail::require(kv.indptr[0] == 0 && qo_indptr[0] == 0 && qo_indptr[kv.batch] == q.tokens(),
                  where, "indptr", "a first entry or qo_indptr[batch]",
                  "indptr[0] = qo_indptr[0] = 0, qo_indptr[batch] = q tokens");
  for (int64_t i = 0; i < lists; ++i) {
    detail::require(kv.indptr[i + 1] >= kv.indptr[i], where, "indptr", i, "ascending");
    const int64_t pages = kv.indptr[i + 1] - kv.indptr[i];
    detail::require(
        kv.quantized[i] >= 0 && kv.quantized[i] % kv.group == 0 &&
            kv.quantized[i] <= pages * kv.page_tokens,
        where, "quantized", kv.quantized[i],
        detail::concat("a multiple of group ", kv.group, " held by the list's ", pages, " pages"));
    detail::require(kv.residual_tokens[i] >= 0 &&
                        (kv.residual_tokens[i] == 0 ||
                         (kv.residual_k[i] != nullptr && kv.residual_v[i] != nullptr)),
                    where, "residual", i, "residual_tokens >= 0, with residual rows when > 0");
    for (int32_t j = kv.indptr[i]; j < kv.indptr[i + 1]; ++j) {
      detail::require(kv.indices[j] >= 0 && kv.indices[j] < kv.num_pages, where, "page id",
                      kv.indices[j], detail::concat("in [0, ", kv.num_pages, ")"));
    }
    if (kv.positions != nullptr) {
      const int32_t* p = kv.positions[i];
      detail::require(kv.tokens(i) == 0 || p != nullptr, where, "positions", i,
                      "set for every list with tokens");
      for (int64_t t = 1; t < kv.tokens(i); ++t) {
        detail::require(p[t] > p[t - 1], where, "positions", i, "ascending");
      }
    }
  }
  for (int b = 0; b < kv.batch; ++b) {
    detail::require(qo_indptr[b + 1] >= qo_indptr[b], where, "qo_indptr", b, "ascending");
    for (int32_t t = qo_indptr[b]; t < qo_indptr[b + 1]; ++t) {
      for (int h = 0; h < kv.kv_heads; ++h) {
        const int64_t i = static_cast<int64_t>(b) * kv.kv_heads + h;
        const int64_t first =
            kv.tokens(i) == 0 ? -1 : (kv.positions != nullptr ? kv.positions[i][0] : 0);
        detail::require(first >= 0 && q_positions[t] >= first, where, "q position", q_positions[t],
                        detail::concat("at or after the first key of sequence ", b, " head ", h));
      }
    }
  }
  detail::check_values(where, "q", q, std::numeric_limits<float>::max());

  detail::attend_query_blocks(
      kv.batch, kv.kv_heads, qo_indptr, q, q_positions, out, executor,
      [&](int b, int h, detail::QueryBlock& block) {
        const int64_t i = static_cast<int64_t>(b) * kv.kv_heads + h;
        detail::KiviPageView view;
        view.bits = kv.bits;
        view.group = kv.group;
        view.int8_query = kv.int8_query;
        view.page_tokens = kv.page_tokens;
        view.head_dim = d;
        view.quantized = kv.quantized[i];
        view.data = static_cast<const uint8_t*>(kv.data);
        view.page_bytes = kv.page_bytes;
        view.page_ids = kv.indices + kv.indptr[i];
        view.tail_k = kv.residual_k[i];
        view.tail_v = kv.residual_v[i];
        const int32_t* pos = kv.positions != nullptr ? kv.positions[i] : nullptr;
        const int64_t n = kv.tokens(i);
        for (int r = 0; r < block.rows; ++r) {
          block.visible[r] = pos == nullptr ? std::min<int64_t>(n, block.q_pos[r] + 1)
                                            : std::upper_bound(pos, pos + n, block.q_pos[r]) - pos;
        }
        attend_rows(detail::KiviRows<detail::KiviPageView>{&view, pos, n, d}, d, block.q.data(),
                    block.rows, block.visible.data(), 0, n, block.state, block.scratch);
      });
}

}  // namespace cpu
}  // namespace kvpack
