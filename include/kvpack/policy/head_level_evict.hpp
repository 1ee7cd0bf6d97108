/// \file policy/head_level_evict.hpp
/// \brief KVzip's head-level variant (arXiv 2505.23416, §4.3): heads scored once on a sample
/// keep their whole context or none of it, with no scoring pass on the input itself.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <numeric>
#include <string>
#include <vector>

#include "../config.hpp"
#include "../detail/checked_file.hpp"
#include "../error.hpp"
#include "policy_base.hpp"

namespace kvpack {

/// \brief Importance of each (layer, kv head): the largest KVzip reconstruction score any token
/// of that head received during a repeat pass over one sample (a head that never needs its
/// context to reconstruct it scores low). Made by KVCache<ReconstructionEvict>::head_scores(),
/// saved once, reused on other inputs.
///
/// File format (little-endian): "KVPKHEAD", u32 version (1), u32 layers, u32 kv_heads,
/// u32 sample tokens, f32 scores (layers × kv_heads, layer-major), u64 FNV-1a checksum of every
/// preceding byte.
struct HeadScores {
  int layers = 0, kv_heads = 0;
  int64_t sample_tokens = 0;  ///< tokens of the sample the scores came from (for the record)
  std::vector<float> score;   ///< layer-major, in [0, 1]

  float at(int layer, int head) const {
    return score[static_cast<std::size_t>(layer) * kv_heads + head];
  }

  /// Scores made for `shape`'s layers and kv heads, each finite and in [0, 1].
  void validate(const ModelShape& shape, const char* where) const {
    detail::require(layers == shape.layers && kv_heads == shape.kv_heads, where,
                    "head scores layers x kv_heads", detail::concat(layers, " x ", kv_heads),
                    detail::concat(shape.layers, " x ", shape.kv_heads, " (the model's)"));
    detail::require(score.size() == static_cast<std::size_t>(layers) * kv_heads, where,
                    "head scores size", score.size(), "layers x kv_heads");
    for (std::size_t i = 0; i < score.size(); ++i) {
      detail::require(std::isfinite(score[i]) && score[i] >= 0.0f && score[i] <= 1.0f, where,
                      "head score", score[i],
                      detail::concat("a probability in [0, 1] (layer ", i / kv_heads, " head ",
                                     i % kv_heads, ")"));
    }
  }

  void save(const std::string& path) const {
    detail::CheckedFileWriter out("KVPKHEAD");
    out.put_u32(kVersion);
    out.put_u32(static_cast<uint32_t>(layers));
    out.put_u32(static_cast<uint32_t>(kv_heads));
    out.put_u32(static_cast<uint32_t>(sample_tokens));
    out.put_floats(score);
    out.write(path, "HeadScores::save");
  }

  /// Reads a file written by save(); a truncated, corrupted or foreign file is an error.
  static HeadScores load(const std::string& path) {
    detail::CheckedFileReader in(path, "KVPKHEAD", "HeadScores::load", "head score");
    in.expect_version(kVersion);
    HeadScores s;
    s.layers = static_cast<int>(in.get_u32());
    s.kv_heads = static_cast<int>(in.get_u32());
    s.sample_tokens = in.get_u32();
    if (s.layers <= 0 || s.layers > 4096 || s.kv_heads <= 0 || s.kv_heads > 4096) {
      throw error(detail::concat(in.where(), ": implausible shape in header (", s.layers,
                                 " layers x ", s.kv_heads, " kv heads)"));
    }
    s.score = in.get_floats(static_cast<std::size_t>(s.layers) * s.kv_heads, "scores");
    in.finish();
    return s;
  }

 private:
  static constexpr uint32_t kVersion = 1;
};

/// \brief KVzip head-level eviction: the top share of kv heads by HeadScores keep every token;
/// the others keep only the protected ones (sinks, the recent window).
///
/// `budget.keep_ratio` is the share of heads kept whole: over all compressed heads at once
/// (BudgetScope::kGlobal, the paper's ragged choice) or the same share in every layer
/// (kPerHead). Ties go to the lower (layer, head). A fixed token count means nothing here and
/// is refused. No observe() on the input: the scores come from a sample, so compress() costs
/// nothing but the copy of what is kept.
struct HeadLevelEvict : EvictionPolicy {
  static constexpr const char* name = "HeadLevelEvict";
  static constexpr ScoreSource score_source = ScoreSource::kHeadScores;
  std::shared_ptr<const HeadScores> scores;

  HeadLevelEvict() { budget = Budget::ratio(0.5, BudgetScope::kGlobal); }
  HeadLevelEvict(std::shared_ptr<const HeadScores> s, Budget b) : scores(std::move(s)) {
    budget = b;
  }

  void validate(const ModelShape& shape) const {
    EvictionPolicy::validate(shape);
    detail::require(budget.keep_tokens == 0, "HeadLevelEvict", "budget.keep_tokens",
                    budget.keep_tokens, "0 (the budget is a share of heads: keep_ratio)");
    detail::require(scores != nullptr, "HeadLevelEvict", "scores", "null",
                    "head scores (HeadScores::load, or KVCache::head_scores() on a sample)");
    scores->validate(shape, "HeadLevelEvict");
  }

  /// For each (layer, head) of `heads` (pairs layer · kv_heads + head), whether it keeps its
  /// context under the budget's share and scope.
  std::vector<char> heads_kept(const std::vector<int>& heads) const {
    const int h_per_layer = scores->kv_heads;
    std::vector<char> kept(heads.size(), 0);
    auto keep_top = [&](const std::vector<std::size_t>& among) {
      // The budget's own rounding, over heads instead of tokens (keep_tokens is refused).
      const auto k = static_cast<std::size_t>(budget.target(static_cast<int64_t>(among.size())));
      std::vector<std::size_t> order = among;
      std::stable_sort(order.begin(), order.end(), [&](std::size_t a, std::size_t b) {
        return scores->score[heads[a]] > scores->score[heads[b]];
      });
      for (std::size_t i = 0; i < k; ++i) kept[order[i]] = 1;
    };
    if (budget.scope == BudgetScope::kGlobal) {
      std::vector<std::size_t> all(heads.size());
      std::iota(all.begin(), all.end(), std::size_t{0});
      keep_top(all);
    } else {
      for (std::size_t i = 0; i < heads.size();) {
        std::vector<std::size_t> layer;
        const int l = heads[i] / h_per_layer;
        for (; i < heads.size() && heads[i] / h_per_layer == l; ++i) layer.push_back(i);
        keep_top(layer);
      }
    }
    return kept;
  }
};

}  // namespace kvpack
