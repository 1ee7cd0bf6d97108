/// \file backend/cpu/paged_attention.hpp
/// \brief Attention over caller-owned paged K/V (FlashInfer / vLLM page tables), without a
/// KVCache: for engines that keep their own KV memory and want kvpack's CPU kernels.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#include "../../config.hpp"
#include "../../detail/validate.hpp"
#include "../../error.hpp"
#include "../../executor.hpp"
#include "../../half.hpp"
#include "../../span.hpp"
#include "../../view.hpp"
#include "attention.hpp"

namespace kvpack {

/// Order of the axes inside one page (FlashInfer's names).
enum class PageLayout {
  kNHD,  ///< [page_size][kv_heads][head_dim]
  kHND,  ///< [kv_heads][page_size][head_dim]
};

/// \brief A batch of sequences' K/V in caller memory, described by a CSR page table
/// (FlashInfer's paged_kv_indptr / paged_kv_indices / paged_kv_last_page_len).
/// Sequence b owns pages indices[indptr[b]], ..., indices[indptr[b + 1] - 1], in token order;
/// all are full except the last, which holds last_page_len[b] tokens (1..page_size); key t of
/// sequence b is at position t. Keys and values: separate arrays of pages, page p at element
/// offset p × page_size × kv_heads × head_dim, axes as `layout` says. Element type T: Half or
/// float (storage fp16 / fp32).
template <class T>
struct PagedKV {
  const T* k_data = nullptr;
  const T* v_data = nullptr;
  PageLayout layout = PageLayout::kNHD;
  int page_size = 16;  ///< tokens per page, a power of two
  int kv_heads = 0;
  int head_dim = 0;
  int batch = 0;                           ///< sequences
  const int32_t* indptr = nullptr;         ///< [batch + 1], indptr[0] = 0
  const int32_t* indices = nullptr;        ///< [indptr[batch]] page ids
  const int32_t* last_page_len = nullptr;  ///< [batch]
  int64_t num_pages = 0;                   ///< pages in k_data / v_data (bounds the ids)

  /// Tokens of sequence b.
  int64_t tokens(int b) const {
    const int64_t pages = indptr[b + 1] - indptr[b];
    return pages == 0 ? 0 : (pages - 1) * page_size + last_page_len[b];
  }
};

namespace detail {

/// The query side of a paged attention: q [tokens][q_heads][head_dim] with q_heads a multiple of
/// kv_heads, out of the same shape, one position per query token. Throws kvpack::error.
inline void check_paged_queries(const char* where, int kv_heads, int head_dim,
                                const ActivationView& q, Positions q_positions,
                                const OutputView& out) {
  require(q.heads() % kv_heads == 0 && q.head_dim() == head_dim, where, "q heads x head_dim",
          concat(q.heads(), "x", q.head_dim()),
          concat("a multiple of kv_heads ", kv_heads, " x ", head_dim));
  require(out.tokens() == q.tokens() && out.heads() == q.heads() && out.head_dim() == head_dim &&
              out.data() != nullptr,
          where, "out shape", concat(out.tokens(), "x", out.heads()),
          concat(q.tokens(), "x", q.heads(), " (q's)"));
  require(q_positions.size() == static_cast<std::size_t>(q.tokens()), where, "q_positions.size",
          q_positions.size(), concat(q.tokens(), " (q tokens)"));
  require_host_positions(where, q_positions);
}

/// The query rows of one (sequence, kv head, query block) item of a paged attention: q (rows ×
/// head_dim, scaled by 1/sqrt(head_dim)), each row's query position, and what the format's
/// attention fills: visible (keys each row sees) and the online-softmax state.
struct QueryBlock {
  int rows = 0;
  std::vector<float> q;
  std::vector<int64_t> q_pos;
  std::vector<int64_t> visible;
  cpu::PartialState state;
  std::vector<float> scratch;
};

/// Runs a paged attention's items - (sequence, kv head, block of up to 64 / group query
/// tokens), rows of sequence b being qo_indptr[b] .. qo_indptr[b + 1] − 1 - on `executor`:
/// `head(b, h, block)` sets block.visible and attends block.q over kv head h of sequence b into
/// block.state; the rows are then normalized into `out`. Inputs are checked by the caller.
template <class Head>
void attend_query_blocks(int batch, int kv_heads, const int32_t* qo_indptr, const ActivationView& q,
                         Positions q_positions, const OutputView& out, Executor& executor,
                         Head&& head) {
  const int d = static_cast<int>(q.head_dim());
  const int g = static_cast<int>(q.heads() / kv_heads);
  const int64_t block_tokens = std::max<int64_t>(1, 64 / g);
  // Items: (sequence, kv head, query block); item_first[b] indexes sequence b's first.
  std::vector<int64_t> item_first(batch + 1, 0);
  for (int b = 0; b < batch; ++b) {
    const int64_t blocks = (qo_indptr[b + 1] - qo_indptr[b] + block_tokens - 1) / block_tokens;
    item_first[b + 1] = item_first[b] + blocks * kv_heads;
  }
  const float scale = 1.0f / std::sqrt(static_cast<float>(d));
  parallel_for(executor, item_first.back(), [&](int64_t item) {
    const int b = static_cast<int>(std::upper_bound(item_first.begin(), item_first.end(), item) -
                                   item_first.begin() - 1);
    const int64_t local = item - item_first[b];
    const int h = static_cast<int>(local % kv_heads);
    const int64_t t0 = qo_indptr[b] + (local / kv_heads) * block_tokens;
    const int64_t tn = std::min<int64_t>(block_tokens, qo_indptr[b + 1] - t0);
    QueryBlock block;
    block.rows = static_cast<int>(tn * g);
    block.q.resize(static_cast<std::size_t>(block.rows) * d);
    block.q_pos.resize(block.rows);
    block.visible.resize(block.rows);
    for (int64_t t = 0; t < tn; ++t) {
      for (int j = 0; j < g; ++j) {
        float* row = block.q.data() + (t * g + j) * d;
        q.load(t0 + t, static_cast<int64_t>(h) * g + j, row);
        for (int i = 0; i < d; ++i) row[i] *= scale;
        block.q_pos[t * g + j] = q_positions[t0 + t];
      }
    }
    block.state.reset(block.rows, d);
    head(b, h, block);
    std::vector<float> o(d);
    for (int i = 0; i < block.rows; ++i) {
      const float inv = 1.0f / block.state.sum[i];
      for (int c = 0; c < d; ++c) o[c] = block.state.acc[static_cast<std::size_t>(i) * d + c] * inv;
      out.store(t0 + i / g, static_cast<int64_t>(h) * g + i % g, o.data());
    }
  });
}

}  // namespace detail

namespace cpu {

/// \brief Causal GQA attention of ragged queries over PagedKV: sequence b's query tokens are
/// rows qo_indptr[b] .. qo_indptr[b + 1] - 1 of q (total × q_heads × head_dim, post-RoPE) with
/// positions q_positions (one per row; a query sees keys at positions ≤ its own), output into
/// out (same shape). Scaled by 1/sqrt(head_dim), softmax in fp32, parallel over (sequence,
/// kv head, query block) on `executor`. Throws kvpack::error, writing nothing, on a bad table
/// (ids outside [0, num_pages), last_page_len outside [1, page_size], indptr not ascending), a
/// shape mismatch, or a query whose position sees no key.
template <class T>
void attend_paged(const PagedKV<T>& kv, const int32_t* qo_indptr, const ActivationView& q,
                  Positions q_positions, const OutputView& out,
                  Executor& executor = default_executor()) {
  constexpr const char* where = "attend_paged";
  static_assert(std::is_same_v<T, Half> || std::is_same_v<T, float>,
                "attend_paged reads fp16 (kvpack::Half) or fp32 pages");
  const int ps = kv.page_size, d = kv.head_dim;
  detail::require(kv.k_data != nullptr && kv.v_data != nullptr && kv.indptr != nullptr &&
                      qo_indptr != nullptr &&
                      (kv.batch == 0 || (kv.last_page_len != nullptr && kv.indices != nullptr)),
                  where, "page table", "a null array",
                  "k_data, v_data, indptr, indices, "
                  "last_page_len and qo_indptr set");
  detail::require(ps >= 1 && (ps & (ps - 1)) == 0, where, "page_size", ps, "a power of two");
  detail::require(kv.kv_heads > 0 && d > 0 && kv.batch >= 0, where, "kv_heads/head_dim/batch",
                  detail::concat(kv.kv_heads, "/", d, "/", kv.batch), "positive");
  detail::check_paged_queries(where, kv.kv_heads, d, q, q_positions, out);
  detail::require(kv.indptr[0] == 0 && qo_indptr[0] == 0 && qo_indptr[kv.batch] == q.tokens(),
                  where, "indptr", "a first entry or qo_indptr[batch]",
                  "indptr[0] = qo_indptr[0] = 0, qo_indptr[batch] = q tokens");
  for (int b = 0; b < kv.batch; ++b) {
    detail::require(kv.indptr[b + 1] >= kv.indptr[b] && qo_indptr[b + 1] >= qo_indptr[b], where,
                    "indptr", b, "ascending indptr and qo_indptr");
    const int32_t pages = kv.indptr[b + 1] - kv.indptr[b];
    detail::require(pages == 0 || (kv.last_page_len[b] >= 1 && kv.last_page_len[b] <= ps), where,
                    "last_page_len", kv.last_page_len[b], detail::concat("in [1, ", ps, "]"));
    for (int32_t i = kv.indptr[b]; i < kv.indptr[b + 1]; ++i) {
      detail::require(kv.indices[i] >= 0 && kv.indices[i] < kv.num_pages, where, "page id",
                      kv.indices[i], detail::concat("in [0, ", kv.num_pages, ")"));
    }
    if (qo_indptr[b + 1] > qo_indptr[b] && kv.tokens(b) == 0) {
      detail::throw_arg(where, "sequence", b, "at least one key under its queries");
    }
    for (int32_t t = qo_indptr[b]; t < qo_indptr[b + 1]; ++t) {
      detail::require(q_positions[t] >= 0, where, "q position", q_positions[t],
                      ">= 0 (a query sees the keys at positions <= its own)");
    }
  }
  detail::check_values(where, "q", q, std::numeric_limits<float>::max());

  const int shift = [&] {
    int s = 0;
    while ((1 << s) < ps) ++s;
    return s;
  }();
  const int64_t page_elems = static_cast<int64_t>(ps) * kv.kv_heads * d;
  const int64_t stride = kv.layout == PageLayout::kNHD ? static_cast<int64_t>(kv.kv_heads) * d : d;
  detail::attend_query_blocks(
      kv.batch, kv.kv_heads, qo_indptr, q, q_positions, out, executor,
      [&](int b, int h, detail::QueryBlock& block) {
        const int64_t head_offset = kv.layout == PageLayout::kNHD
                                        ? static_cast<int64_t>(h) * d
                                        : h * static_cast<int64_t>(ps) * d;
        std::vector<const T*> k_pages, v_pages;
        for (int32_t i = kv.indptr[b]; i < kv.indptr[b + 1]; ++i) {
          k_pages.push_back(kv.k_data + kv.indices[i] * page_elems + head_offset);
          v_pages.push_back(kv.v_data + kv.indices[i] * page_elems + head_offset);
        }
        const int64_t n = kv.tokens(b);
        for (int r = 0; r < block.rows; ++r) {
          block.visible[r] = std::min<int64_t>(n, block.q_pos[r] + 1);
        }
        const PagedRows<T> rows{k_pages.data(), v_pages.data(), shift, stride, nullptr, n, d};
        attend_rows(rows, d, block.q.data(), block.rows, block.visible.data(), 0, n, block.state,
                    block.scratch);
      });
}

}  // namespace cpu
}  // namespace kvpack
