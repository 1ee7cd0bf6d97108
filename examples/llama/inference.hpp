#pragma once
// Drives a LlamaModel over a cache: greedy generation and teacher-forced likelihood.

#include <cstdint>
#include <vector>

#include "attention_cache.hpp"
#include "model.hpp"

namespace kvpack::llama {

/// Index of the largest logit (the first one on ties).
int32_t argmax(const float* logits, int64_t n);

struct GenerationResult {
  std::vector<int32_t> tokens;  ///< generated ids (a stop id, when hit, is included)
  double prefill_seconds = 0.0;
  double decode_seconds = 0.0;  ///< all decode steps after the first token
};

/// Prefills `prompt` at positions start_pos.. (the cache must hold exactly the tokens before
/// start_pos) and then decodes greedily until `max_new_tokens` or a token in `stop_ids`.
GenerationResult greedy_generate(const LlamaModel& model, AttentionCache& cache,
                                 const std::vector<int32_t>& prompt, int64_t start_pos,
                                 int max_new_tokens, const std::vector<int32_t>& stop_ids = {});

/// As greedy_generate, but each token is drawn from softmax(logits / temperature) with a
/// std::mt19937 seeded by `seed` (the same inputs give the same tokens). Throws
/// std::invalid_argument unless temperature is finite and > 0.
GenerationResult sample_generate(const LlamaModel& model, AttentionCache& cache,
                                 const std::vector<int32_t>& prompt, int64_t start_pos,
                                 int max_new_tokens, double temperature, uint32_t seed,
                                 const std::vector<int32_t>& stop_ids = {});

/// Sum of -log p(tokens[i] | tokens[< i]) over the scored tokens.
struct LikelihoodResult {
  double total_nll = 0.0;  ///< nats
  int64_t count = 0;       ///< predictions scored
  double mean_nll() const { return count > 0 ? total_nll / static_cast<double>(count) : 0.0; }
  double perplexity() const;
};

/// Teacher-forced likelihood of tokens[1..] given their prefixes: runs the whole sequence
/// through the model (at positions start_pos..) chunk by chunk, so memory stays at one chunk of
/// logits. Tokens before `score_from` are context only.
LikelihoodResult teacher_forced_nll(const LlamaModel& model, AttentionCache& cache,
                                    const std::vector<int32_t>& tokens, int64_t start_pos = 0,
                                    int64_t score_from = 1);

/// log p(target) under softmax(logits), computed stably.
double log_probability(const float* logits, int64_t n, int32_t target);

}  // namespace kvpack::llama
