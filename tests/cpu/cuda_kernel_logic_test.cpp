// CPU tests of the per-element / per-tile logic the CUDA kernels run
// (include/kvpack/backend/cuda/kernel_logic.hpp). The kernels are thin maps of threads onto these
// functions, so each test below replays a kernel's decomposition sequentially and compares it with
// the CPU backend: append (strided conversion), selection (radix select + scan = select_top_k),
// attention (tiles, GQA rows, key splits, online softmax, merge = CPU attend).
#include <algorithm>
#include <catch2/catch.hpp>
#include <cmath>
#include <cstdint>
#include <kvpack/backend/cuda/kernel_logic.hpp>
#include <kvpack/kvpack.hpp>
#include <limits>
#include <random>
#include <vector>

#include "test_util.hpp"

using Catch::Matchers::Contains;
using kvpack::ActivationView;
using kvpack::Half;
using kvpack::ModelShape;
using kvpack::OutputView;
namespace kc = kvpack::cuda;

namespace {

/// Sequential replay of select_top_k_kernel + kept_indices_kernel for one head.
struct ReplayedSelection {
  std::vector<int64_t> kept;  // ascending
  int64_t count = 0;          // what the kernel reports
  int64_t first_position = -1;
};

ReplayedSelection replay_select(const kvpack::detail::SelectionHead& h) {
  int64_t protected_tokens = 0;
  for (int64_t i = 0; i < h.size; ++i) {
    if (kc::is_protected_position(h.positions[i], h.protect_below, h.protect_above)) {
      ++protected_tokens;
    }
  }
  const int64_t kept = kc::kept_count(protected_tokens, h.size, h.target);
  const int64_t room = kept - protected_tokens;
  const int64_t candidates = h.size - protected_tokens;
  const bool keep_all = room >= candidates;
  const bool keep_none = room == 0;
  uint64_t threshold = 0;
  if (!keep_all && !keep_none) {
    uint64_t prefix = 0, remaining = static_cast<uint64_t>(room);
    for (int pass = 0; pass < kc::kRadixPasses; ++pass) {
      std::vector<uint32_t> hist(kc::kRadixBins, 0);
      const uint64_t mask = kc::radix_prefix_mask(pass);
      for (int64_t i = 0; i < h.size; ++i) {
        if (kc::is_protected_position(h.positions[i], h.protect_below, h.protect_above)) continue;
        const uint64_t key = kc::selection_key(h.scores[i], i);
        if ((key & mask) == prefix) ++hist[kc::radix_digit(key, pass)];
      }
      const int digit = kc::select_digit(hist.data(), remaining);
      prefix |= static_cast<uint64_t>(digit) << kc::radix_shift(pass);
    }
    REQUIRE(remaining == 1);  // keys are unique: the rank resolves to exactly one key
    threshold = prefix;
  }
  std::vector<uint8_t> flags(h.size);
  for (int64_t i = 0; i < h.size; ++i) {
    bool keep = kc::is_protected_position(h.positions[i], h.protect_below, h.protect_above);
    if (!keep && !keep_none) keep = keep_all || kc::selection_key(h.scores[i], i) >= threshold;
    flags[i] = keep ? 1 : 0;
  }
  // Block-wide exclusive scan in chunks of 256, as kept_indices_kernel does.
  ReplayedSelection result;
  result.count = kept;
  result.kept.assign(static_cast<std::size_t>(kept), -1);
  int64_t base = 0;
  for (int64_t chunk = 0; chunk < h.size; chunk += 256) {
    int64_t offset = 0;
    for (int64_t i = chunk; i < std::min(h.size, chunk + 256); ++i) {
      if (flags[i]) {
        REQUIRE(base + offset < kept);
        result.kept[base + offset] = i;
      }
      offset += flags[i];
    }
    base += offset;
  }
  REQUIRE(base == kept);
  if (kept > 0) result.first_position = h.positions[result.kept[0]];
  return result;
}

/// Sequential replay of attention_kernel + merge_splits_kernel over a CPU cache's stored rows.
std::vector<float> replay_attention(const kvpack::DenseLayer& layer, const ModelShape& shape,
                                    const std::vector<float>& q, const std::vector<int64_t>& qpos,
                                    int64_t splits) {
  const int d = shape.head_dim;
  const int g = shape.group_size();
  const int64_t tokens = static_cast<int64_t>(qpos.size());
  const int64_t rows_all = tokens * shape.q_heads;
  const float scale = 1.0f / std::sqrt(static_cast<float>(d));
  std::vector<float> pacc(splits * rows_all * d), pmax(splits * rows_all), psum(splits * rows_all);
  const int64_t rows_total = tokens * g;
  const int64_t row_blocks = (rows_total + kc::kAttentionRows - 1) / kc::kAttentionRows;
  for (int h = 0; h < shape.kv_heads; ++h) {
    const kvpack::DenseHead& head = layer.heads[h];
    const std::vector<int32_t> pos32(head.positions.begin(), head.positions.end());
    const int64_t n = static_cast<int64_t>(pos32.size());
    for (int64_t block = 0; block < row_blocks; ++block) {
      for (int64_t split = 0; split < splits; ++split) {
        const int64_t row0 = block * kc::kAttentionRows;
        std::vector<float> qrows(kc::kAttentionRows * d, 0.0f);
        std::vector<int64_t> visible(kc::kAttentionRows, 0);
        for (int r = 0; r < kc::kAttentionRows; ++r) {
          const int64_t row = row0 + r;
          if (row >= rows_total) continue;
          int64_t t = 0;
          int qh = 0;
          kc::attention_row(row, g, h, t, qh);
          for (int i = 0; i < d; ++i)
            qrows[r * d + i] = q[(t * shape.q_heads + qh) * d + i] * scale;
          visible[r] = kc::visible_keys(pos32.data(), n, qpos[t]);
        }
        const int64_t most = *std::max_element(visible.begin(), visible.end());
        int64_t begin = 0, end = 0;
        kc::split_range(n, splits, split, begin, end);
        end = std::min(end, most);
        std::vector<float> m(kc::kAttentionRows, kvpack::detail::neg_inf());
        std::vector<float> l(kc::kAttentionRows, 0.0f);
        std::vector<float> acc(kc::kAttentionRows * d, 0.0f);
        for (int64_t t0 = begin; t0 < end; t0 += kc::kAttentionTile) {
          const int tn = static_cast<int>(std::min<int64_t>(kc::kAttentionTile, end - t0));
          for (int r = 0; r < kc::kAttentionRows; ++r) {
            if (row0 + r >= rows_total) continue;
            const int nv = static_cast<int>(std::clamp<int64_t>(visible[r] - t0, 0, tn));
            if (nv == 0) continue;
            std::vector<float> s(nv);
            float tile_max = kvpack::detail::neg_inf();
            for (int j = 0; j < nv; ++j) {
              float dot = 0.0f;
              for (int i = 0; i < d; ++i) dot += qrows[r * d + i] * head.k[(t0 + j) * d + i];
              s[j] = dot;
              tile_max = std::max(tile_max, dot);
            }
            const float rescale = kc::softmax_advance(m[r], l[r], tile_max);
            float sum = 0.0f;
            for (int j = 0; j < nv; ++j) {
              s[j] = std::exp(s[j] - m[r]);
              sum += s[j];
            }
            l[r] += sum;
            for (int i = 0; i < d; ++i) acc[r * d + i] *= rescale;
            for (int j = 0; j < nv; ++j) {
              for (int i = 0; i < d; ++i) acc[r * d + i] += s[j] * head.v[(t0 + j) * d + i];
            }
          }
        }
        for (int r = 0; r < kc::kAttentionRows; ++r) {
          const int64_t row = row0 + r;
          if (row >= rows_total) continue;
          int64_t t = 0;
          int qh = 0;
          kc::attention_row(row, g, h, t, qh);
          const int64_t slot = split * rows_all + t * shape.q_heads + qh;
          for (int i = 0; i < d; ++i) pacc[slot * d + i] = acc[r * d + i];
          pmax[slot] = m[r];
          psum[slot] = l[r];
        }
      }
    }
  }
  std::vector<float> out(rows_all * d);
  for (int64_t row = 0; row < rows_all; ++row) {
    for (int i = 0; i < d; ++i) {
      float m = pmax[row], l = psum[row], a = pacc[row * d + i];
      for (int64_t s = 1; s < splits; ++s) {
        const int64_t slot = s * rows_all + row;
        kvpack::detail::softmax_merge(m, l, &a, pmax[slot], psum[slot], &pacc[slot * d + i], 1);
      }
      out[row * d + i] = a * (1.0f / l);
    }
  }
  return out;
}

/// ‖a − b‖ / ‖b‖.
double normalised_error(const std::vector<float>& a, const std::vector<float>& b) {
  double num = 0, den = 0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    num += (static_cast<double>(a[i]) - b[i]) * (static_cast<double>(a[i]) - b[i]);
    den += static_cast<double>(b[i]) * b[i];
  }
  return std::sqrt(num / den);
}

}  // namespace

TEST_CASE("cuda logic: dispatch_head_dim turns 64/128 into constants and refuses others",
          "[cuda-logic]") {
  REQUIRE(kc::dispatch_head_dim(64, [](auto d) { return decltype(d)::value; }) == 64);
  REQUIRE(kc::dispatch_head_dim(128, [](auto d) { return decltype(d)::value; }) == 128);
  REQUIRE_THROWS_AS(kc::dispatch_head_dim(96, [](auto d) { return decltype(d)::value; }),
                    kvpack::error);
  REQUIRE_THROWS_WITH(kc::dispatch_head_dim(96, [](auto d) { return decltype(d)::value; }),
                      Contains("head_dim = 96") && Contains("64 or 128"));
  REQUIRE(kc::supported_head_dim(64));
  REQUIRE_FALSE(kc::supported_head_dim(32));
}

TEST_CASE("cuda logic: strided conversion reproduces the CPU cache's stored rows", "[cuda-logic]") {
  const ModelShape shape{1, 6, 3, 64, {}};
  const int64_t n = 37, heads = 3, d = 64;
  // Heads-first, padded: token stride d + 8, head stride n * (d + 8); bf16 and fp32 inputs.
  const int64_t ts = d + 8, hs = n * ts;
  const auto values = kvpack_test::random_values(static_cast<std::size_t>(heads * hs), 11, 3.0f);
  std::vector<kvpack::BFloat16> k(values.size());
  for (std::size_t i = 0; i < values.size(); ++i) k[i] = kvpack::to_bfloat16(values[i]);
  const ActivationView kv(k.data(), n, heads, d, ts, hs);
  const ActivationView vv(values.data(), n, heads, d, ts, hs);
  kvpack::KVCache<kvpack::Identity> cache(shape);
  cache.append(0, kv, vv, kvpack_test::iota_positions(n, 4));
  const auto dense = cache.materialize(0);
  for (int64_t h = 0; h < heads; ++h) {
    std::vector<Half> rows_k(n * d), rows_v(n * d);  // what convert_rows_kernel writes
    for (int64_t e = 0; e < n * d; ++e) {
      const int64_t t = e / d, i = e % d;
      kc::store_element(kvpack::to_float(k[kc::strided_offset(t, h, i, ts, hs)]),
                        &rows_k[t * d + i]);
      kc::store_element(kvpack::to_float(values[kc::strided_offset(t, h, i, ts, hs)]),
                        &rows_v[t * d + i]);
    }
    for (int64_t e = 0; e < n * d; ++e) {
      REQUIRE(kvpack::to_float(rows_k[e]) == dense.heads[h].k[e]);
      REQUIRE(kvpack::to_float(rows_v[e]) == dense.heads[h].v[e]);
    }
  }
}

TEST_CASE("cuda logic: value check and its linear index agree with detail::check_values",
          "[cuda-logic]") {
  REQUIRE(kc::value_in_range(65504.0f, 65504.0f));
  REQUIRE(kc::value_in_range(-65504.0f, 65504.0f));
  REQUIRE_FALSE(kc::value_in_range(65505.0f, 65504.0f));
  REQUIRE_FALSE(kc::value_in_range(NAN, 65504.0f));
  REQUIRE_FALSE(kc::value_in_range(INFINITY, std::numeric_limits<float>::max()));
  REQUIRE(kc::value_in_range(std::numeric_limits<float>::max(), std::numeric_limits<float>::max()));
  // find_first_invalid_kernel reports the lowest (t * heads + h) * d + i; the cache decodes it.
  const int64_t heads = 3, d = 64;
  for (int64_t t = 0; t < 4; ++t) {
    for (int64_t h = 0; h < heads; ++h) {
      for (int64_t i = 0; i < d; i += 13) {
        const int64_t e = (t * heads + h) * d + i;
        REQUIRE(e % d == i);
        REQUIRE((e / d) % heads == h);
        REQUIRE(e / (d * heads) == t);
      }
    }
  }
}

TEST_CASE("cuda logic: growth is geometric and always fits", "[cuda-logic]") {
  int64_t capacity = 0, reallocations = 0;
  for (int64_t size = 0; size < 100000; ++size) {
    if (size + 1 > capacity) {
      const int64_t grown = kc::grown_capacity(size + 1, capacity);
      REQUIRE(grown >= size + 1);
      REQUIRE(grown >= 2 * capacity);
      capacity = grown;
      ++reallocations;
    }
  }
  REQUIRE(reallocations <= 12);
  REQUIRE(kc::grown_capacity(5000, 64) == 5000);  // a large prefill chunk: exact
}

TEST_CASE("cuda logic: selection keys order candidates exactly as select_top_k", "[cuda-logic]") {
  std::mt19937 rng(7);
  std::uniform_int_distribution<int> small(-4, 4);
  std::normal_distribution<float> gauss(0.0f, 100.0f);
  const std::vector<float> specials{0.0f, -0.0f, 1e-40f, -1e-40f, -INFINITY, INFINITY, 65504.0f};
  for (int trial = 0; trial < 20000; ++trial) {
    float a = trial % 3 == 0 ? static_cast<float>(small(rng)) : gauss(rng);
    float b = trial % 3 == 0 ? static_cast<float>(small(rng)) : gauss(rng);
    if (trial % 7 == 0) a = specials[trial % specials.size()];
    if (trial % 11 == 0) b = specials[(trial / 11) % specials.size()];
    const int64_t ia = rng() % 100000, ib = rng() % 100000;
    if (ia == ib) continue;
    const bool better = a > b || (a == b && ia < ib);  // select_top_k's comparator
    REQUIRE((kc::selection_key(a, ia) > kc::selection_key(b, ib)) == better);
    REQUIRE((kc::ordered_bits(a) < kc::ordered_bits(b)) == (a < b));
  }
  REQUIRE(kc::ordered_bits(0.0f) == kc::ordered_bits(-0.0f));
}

TEST_CASE("cuda logic: radix select + scan keeps select_top_k's set", "[cuda-logic]") {
  std::mt19937 rng(42);
  for (int trial = 0; trial < 400; ++trial) {
    const int64_t size = std::vector<int64_t>{0, 1, 2, 5, 33, 255, 256, 257, 1000}[trial % 9];
    std::vector<float> scores(size);
    std::vector<int32_t> positions(size);
    int32_t p = static_cast<int32_t>(rng() % 5);
    for (int64_t i = 0; i < size; ++i) {
      p += 1 + static_cast<int32_t>(rng() % 3);
      positions[i] = p;
      switch (trial % 4) {
        case 0:  // heavy ties: integer scores from a small set (and -0 / +0)
          scores[i] = static_cast<float>(static_cast<int>(rng() % 5) - 2);
          if (scores[i] == 0.0f && (rng() & 1)) scores[i] = -0.0f;
          break;
        case 1:  // L2-like: negative squared norms
          scores[i] = -std::pow(static_cast<float>(rng() % 1000) / 37.0f, 2.0f);
          break;
        case 2:  // all equal
          scores[i] = -1.5f;
          break;
        default:
          scores[i] = std::normal_distribution<float>(0.0f, 10.0f)(rng);
      }
    }
    const int64_t target = size == 0 ? 0 : static_cast<int64_t>(rng() % (size + 3));
    const int64_t first = size == 0 ? 0 : positions[0];
    const int64_t last = size == 0 ? 0 : positions[size - 1];
    const int64_t sinks = trial % 5 == 0 ? 0 : static_cast<int64_t>(rng() % 6);
    const int64_t recent = trial % 3 == 0 ? 0 : static_cast<int64_t>(rng() % 10);
    const kvpack::detail::SelectionHead head{scores.data(), positions.data(), size,
                                             target,        first + sinks,    last - recent};
    const auto expected = kvpack::detail::select_top_k(head);
    const ReplayedSelection got = replay_select(head);
    INFO("trial " << trial << " size " << size << " target " << target);
    REQUIRE(got.kept == expected);
    REQUIRE(got.count == static_cast<int64_t>(expected.size()));
    REQUIRE(got.first_position == (expected.empty() ? -1 : positions[expected[0]]));
    for (int64_t i = 0; i < size; ++i) {
      REQUIRE(kc::is_protected_position(positions[i], head.protect_below, head.protect_above) ==
              kvpack::detail::is_protected(head, i));
    }
  }
}

TEST_CASE("cuda logic: visible_keys and split_range match the CPU attention's", "[cuda-logic]") {
  std::vector<int32_t> pos{2, 3, 5, 8, 13, 21, 34};
  for (int64_t q = -1; q < 40; ++q) {
    const int64_t expected = std::upper_bound(pos.begin(), pos.end(), q) - pos.begin();
    REQUIRE(kc::visible_keys(pos.data(), static_cast<int64_t>(pos.size()), q) == expected);
  }
  REQUIRE(kc::visible_keys(pos.data(), 0, 100) == 0);
  for (int64_t size : {0, 1, 5, 31, 32, 33, 1000, 4097}) {
    for (int64_t splits : {1, 2, 3, 7, 32}) {
      int64_t covered = 0, previous_end = 0;
      for (int64_t s = 0; s < splits; ++s) {
        int64_t b = 0, e = 0;
        kc::split_range(size, splits, s, b, e);
        const int64_t span = (size + splits - 1) / splits;  // the CPU's partition
        REQUIRE(b == std::min(size, s * span));
        REQUIRE(e == std::min(size, (s + 1) * span));
        REQUIRE(b == previous_end);
        covered += e - b;
        previous_end = e;
      }
      REQUIRE(covered == size);
    }
  }
  REQUIRE(kc::attention_splits(1000, 100000, 132) == 1);
  REQUIRE(kc::attention_splits(2, 100000, 132) == 32);
  REQUIRE(kc::attention_splits(2, 1000, 132) == 4);
  REQUIRE(kc::attention_splits(8, 100, 132) == 1);
}

TEST_CASE("cuda logic: tiled split-K attention replay equals the CPU attend", "[cuda-logic]") {
  struct Case {
    ModelShape shape;
    int64_t tokens;
    int64_t queries;
  };
  const std::vector<Case> cases{{{1, 4, 4, 64, {}}, 300, 1},
                                {{1, 6, 2, 128, {}}, 257, 7},
                                {{1, 16, 2, 64, {}}, 1100, 3},
                                {{1, 24, 3, 128, {}}, 70, 40}};
  uint32_t seed = 100;
  for (const Case& c : cases) {
    const ModelShape& s = c.shape;
    kvpack::KVCache<kvpack::Identity> cache(s);
    kvpack_test::fill_layer(cache, 0, c.tokens, seed++, 100);
    const auto dense = cache.materialize(0);
    const auto q = kvpack_test::random_values(c.queries * s.q_heads * s.head_dim, seed++);
    std::vector<int64_t> qpos(c.queries);
    std::mt19937 rng(seed++);
    for (auto& p : qpos) p = static_cast<int64_t>(rng() % c.tokens);
    qpos.back() = c.tokens - 1;
    std::vector<float> expected(q.size());
    cache.attend(0, ActivationView::nhd(q.data(), c.queries, s.q_heads, s.head_dim), qpos,
                 OutputView::nhd(expected.data(), c.queries, s.q_heads, s.head_dim));
    for (int64_t splits : {1, 3, 11}) {
      const auto got = replay_attention(dense, s, q, qpos, splits);
      INFO("q_heads " << s.q_heads << " kv_heads " << s.kv_heads << " splits " << splits);
      REQUIRE(normalised_error(got, expected) < 1e-5);
    }
  }
}

TEST_CASE("cuda logic: softmax_advance is the CPU's online-softmax step", "[cuda-logic]") {
  float m = kvpack::detail::neg_inf(), l = 0.0f;
  REQUIRE(kc::softmax_advance(m, l, 2.0f) == 0.0f);  // nothing accumulated yet
  REQUIRE(m == 2.0f);
  l = 3.0f;
  const float r = kc::softmax_advance(m, l, 5.0f);
  REQUIRE(r == kvpack::detail::softmax_rescale(2.0f, 5.0f));
  REQUIRE(l == 3.0f * r);
  REQUIRE(m == 5.0f);
  REQUIRE(kc::softmax_advance(m, l, 1.0f) == 1.0f);  // max unchanged: no rescale
  REQUIRE(m == 5.0f);
}
