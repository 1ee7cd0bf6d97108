#include "inference.hpp"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

namespace kvpack::llama {
namespace {
double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}
}  // namespace

int32_t argmax(const float* logits, int64_t n) {
  int64_t best = 0;
  for (int64_t i = 1; i < n; ++i) {
    if (logits[i] > logits[best]) best = i;
  }
  return static_cast<int32_t>(best);
}

double log_probability(const float* logits, int64_t n, int32_t target) {
  if (target < 0 || target >= n) {
    throw std::out_of_range("log_probability: target " + std::to_string(target) +
                            " outside the vocabulary");
  }
  const float max_logit = *std::max_element(logits, logits + n);
  double sum = 0.0;
  for (int64_t i = 0; i < n; ++i) sum += std::exp(static_cast<double>(logits[i] - max_logit));
  return static_cast<double>(logits[target] - max_logit) - std::log(sum);
}

double LikelihoodResult::perplexity() const { return std::exp(mean_nll()); }

namespace {
/// The decode loop of greedy_generate and sample_generate: `pick` chooses each next token from
/// the last position's logits.
template <class Pick>
GenerationResult generate(const LlamaModel& model, AttentionCache& cache,
                          const std::vector<int32_t>& prompt, int64_t start_pos, int max_new_tokens,
                          const std::vector<int32_t>& stop_ids, Pick&& pick) {
  if (prompt.empty()) throw std::invalid_argument("generate: empty prompt");
  GenerationResult result;
  if (max_new_tokens <= 0) return result;
  const int64_t vocab = model.config().vocab;
  auto t0 = std::chrono::steady_clock::now();
  Eigen::VectorXf logits = model.forward_last(cache, prompt, start_pos);
  result.prefill_seconds = seconds_since(t0);
  int64_t pos = start_pos + static_cast<int64_t>(prompt.size());
  t0 = std::chrono::steady_clock::now();
  for (int step = 0; step < max_new_tokens; ++step) {
    const int32_t next = pick(logits.data(), vocab);
    result.tokens.push_back(next);
    if (std::find(stop_ids.begin(), stop_ids.end(), next) != stop_ids.end()) break;
    if (step + 1 == max_new_tokens) break;
    logits = model.forward_last(cache, {next}, pos++);
  }
  result.decode_seconds = seconds_since(t0);
  return result;
}
}  // namespace

GenerationResult greedy_generate(const LlamaModel& model, AttentionCache& cache,
                                 const std::vector<int32_t>& prompt, int64_t start_pos,
                                 int max_new_tokens, const std::vector<int32_t>& stop_ids) {
  return generate(model, cache, prompt, start_pos, max_new_tokens, stop_ids, argmax);
}

GenerationResult sample_generate(const LlamaModel& model, AttentionCache& cache,
                                 const std::vector<int32_t>& prompt, int64_t start_pos,
                                 int max_new_tokens, double temperature, uint32_t seed,
                                 const std::vector<int32_t>& stop_ids) {
  if (!(temperature > 0.0) || !std::isfinite(temperature)) {
    throw std::invalid_argument("sample_generate: temperature " + std::to_string(temperature) +
                                ", expected a finite value > 0");
  }
  std::mt19937 rng(seed);
  std::vector<double> weights;
  auto pick = [&](const float* logits, int64_t n) {
    // softmax(logits / T), shifted by the largest logit so that exp cannot overflow.
    const double top = *std::max_element(logits, logits + n);
    weights.resize(static_cast<std::size_t>(n));
    for (int64_t i = 0; i < n; ++i) weights[i] = std::exp((logits[i] - top) / temperature);
    std::discrete_distribution<int32_t> dist(weights.begin(), weights.end());
    return dist(rng);
  };
  return generate(model, cache, prompt, start_pos, max_new_tokens, stop_ids, pick);
}

LikelihoodResult teacher_forced_nll(const LlamaModel& model, AttentionCache& cache,
                                    const std::vector<int32_t>& tokens, int64_t start_pos,
                                    int64_t score_from) {
  LikelihoodResult result;
  const int64_t n = static_cast<int64_t>(tokens.size());
  if (n == 0) return result;
  score_from = std::max<int64_t>(score_from, 1);
  const int64_t vocab = model.config().vocab;
  for (int64_t begin = 0; begin < n; begin += model.chunk_size()) {
    const int64_t len = std::min(model.chunk_size(), n - begin);
    // Logits are only needed where the next token is scored.
    const bool needs_logits = begin + len >= score_from && begin < n - 1;
    const RowMatrix logits = model.forward(cache, tokens.data() + begin, len, start_pos + begin,
                                           needs_logits ? Logits::kAll : Logits::kNone);
    if (!needs_logits) continue;
    for (int64_t r = 0; r < len; ++r) {
      const int64_t target = begin + r + 1;  // row r predicts the next token
      if (target >= n || target < score_from) continue;
      result.total_nll -= log_probability(logits.row(r).data(), vocab, tokens[target]);
      ++result.count;
    }
  }
  return result;
}

}  // namespace kvpack::llama
