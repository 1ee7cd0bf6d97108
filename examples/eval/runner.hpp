#pragma once
// The evaluation protocols: teacher-forced agreement / KL / perplexity on a long text, and
// query-agnostic retrieval (compress the context, then ask).

#include <algorithm>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "eval_cache.hpp"
#include "model.hpp"
#include "tasks.hpp"
#include "tokenizer.hpp"

namespace kvpack::eval {

struct Settings {
  int64_t context = 2048;       ///< tokens of context before compression
  int64_t continuation = 128;   ///< teacher-forced tokens scored after compression
  int64_t repeat_chunk = 2000;  ///< KVzip: context tokens re-read per repeat chunk
  int64_t lazy_queries = 1;     ///< SimLayerKV: last context tokens whose queries are observed
  int max_new_tokens = 10;      ///< greedy tokens generated per retrieval question
  bool run_text = true;
  bool run_retrieval = true;
};

/// One row of the result table.
struct PolicyResult {
  std::string label;
  double bytes_ratio = 0;     ///< dense fp16 bytes / bytes() after compression (text run)
  double agreement_top1 = 0;  ///< next-token argmax equal to the full cache's
  double kl = 0;              ///< mean KL(full || policy) over continuation tokens, nats
  double perplexity = 0;      ///< of the continuation under this policy
  double retrieval_acc = 0;   ///< share of questions whose answer was generated
  double retrieval_bytes_ratio = 0;
  double prefill_tokens_per_s = 0;
  double decode_tokens_per_s = 0;
  double score_seconds = 0;  ///< extra passes a policy needs before compress (KVzip repeat)
  double compress_seconds = 0;
  std::vector<double> layer_mass;  ///< LazyLayerDrop: observed mass per layer
  int lazy_layers = -1;
};

/// Logits of the full cache on the text, computed once and shared by every policy row.
struct TextReference {
  std::vector<float> logits;  ///< continuation × vocab
  int64_t rows = 0;
  int64_t vocab = 0;
};

/// Agreement, KL and perplexity of `logits` (continuation × vocab) against the reference.
void score_against(const TextReference& ref, const float* logits,
                   const std::vector<int32_t>& continuation, PolicyResult& result);

using Progress = std::function<void(const std::string& stage, double fraction)>;

class Runner {
 public:
  Runner(const llama::LlamaModel& model, const llama::Tokenizer& tokenizer, Settings settings)
      : model_(model), tok_(tokenizer), settings_(settings) {}

  /// Full-cache logits on text tokens [context, context + continuation).
  TextReference text_reference(const std::vector<int32_t>& text_tokens, PolicyResult& full);
  /// Tokens the ChannelShrink projections are calibrated on (kept apart from the scored text).
  void set_calibration_tokens(std::vector<int32_t> tokens) { calibration_ = std::move(tokens); }
  /// PCA projections for `ratio`, computed once per ratio from the calibration tokens.
  std::shared_ptr<const ChannelProjections> projections(double ratio);

  /// Starts a table row: resets the prefill / decode timers.
  void begin_row() { prefill_seconds_ = prefill_tokens_ = decode_seconds_ = decode_tokens_ = 0; }
  /// Writes the row's prefill and decode rates.
  void end_row(PolicyResult& result) const {
    result.prefill_tokens_per_s = prefill_tokens_ / std::max(prefill_seconds_, 1e-9);
    result.decode_tokens_per_s = decode_tokens_ / std::max(decode_seconds_, 1e-9);
  }
  /// Agreement, KL and perplexity of `spec` against `reference`.
  void run_text(const PolicySpec& spec, const std::vector<int32_t>& text_tokens,
                const TextReference& reference, PolicyResult& result, const Progress& progress);
  /// Retrieval accuracy: each task's context is compressed once, then every question is asked
  /// on its own copy of the compressed cache (tasks sharing a context share the compression).
  void run_retrieval(const PolicySpec& spec, const std::vector<RetrievalTask>& tasks,
                     PolicyResult& result, const Progress& progress);

 private:
  /// Prefills `ids` at positions [0, n) into a fresh cache for `spec`, runs what the policy needs
  /// before compress() (repeat pass, last-query observation) and compresses. `sinks` protected
  /// first tokens (the system prompt), `context_begin` first position of the compressible text.
  std::unique_ptr<EvalCache> prefill_and_compress(const PolicySpec& spec,
                                                  const std::vector<int32_t>& ids,
                                                  int64_t context_begin, PolicyResult& stats);
  void repeat_pass(EvalCache& cache, const std::vector<int32_t>& ids, int64_t context_begin);

  const llama::LlamaModel& model_;
  const llama::Tokenizer& tok_;
  Settings settings_;
  std::vector<int32_t> calibration_;
  std::vector<std::pair<double, std::shared_ptr<const ChannelProjections>>> projections_;
  double prefill_seconds_ = 0, prefill_tokens_ = 0, decode_seconds_ = 0, decode_tokens_ = 0;
};

}  // namespace kvpack::eval
