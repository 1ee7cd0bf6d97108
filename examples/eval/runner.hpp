#pragma once
// The evaluation protocols: teacher-forced agreement / KL / perplexity on a long text, and
// query-agnostic retrieval (compress the context, then ask).

#include <algorithm>
#include <cstdint>
#include <fstream>
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
  int max_new_tokens = 10;      ///< greedy tokens generated per retrieval question
  bool run_text = true;
  bool run_retrieval = true;
  /// Decoding test (0: off): tokens fed after the text's context, its next token and then
  /// decode_tokens - 1 the full cache generates; every row calls compress() after each
  /// `compress_every` of them.
  int64_t decode_tokens = 0;
  int64_t compress_every = 32;
  /// Decoding test: the full cache samples at this temperature (0: greedy), seeded by
  /// decode_seed. Sampling at 1 keeps the tokens as varied as text (greedy decoding of this
  /// model falls into loops: perplexity 1.2 over 512 greedy tokens, where text has ~15).
  double decode_temperature = 1.0;
  uint32_t decode_seed = 1;
  bool verbose = false;  ///< print every retrieval answer on stderr
  /// kvzip-head: head scores file to load, or to write after scoring the sample.
  std::string head_scores_file;
  /// kvzap: scorer file to load, or to write after calibrating one (calibrate_kvzap).
  std::string kvzap_scorer_file;
  /// kvzap: the scores the scorer is fitted to: "kvzip-plus" (the paper's) or "kvzip".
  std::string kvzap_target = "kvzip-plus";
  /// Keep the full prefill's attention inputs (kvzap rows score their copy of it with them).
  bool capture_hidden = false;
};

/// A row's next-token distributions against the full cache's over the same teacher-forced
/// tokens (score_against).
struct NextTokenScores {
  double agreement_top1 = 0;  ///< next-token argmax equal to the full cache's
  /// agreement_top1 over the positions where the full cache's top-1 probability leads its
  /// runner-up by ≥ kDecisiveMargin (near-ties excluded), and how many such positions.
  double agreement_decisive = 0;
  int64_t decisive_positions = 0;
  double kl = 0;          ///< mean KL(full || policy) over the tokens, nats
  double perplexity = 0;  ///< of the tokens under this policy
};

/// One row of the result table.
struct PolicyResult {
  std::string label;
  double bytes_ratio = 0;  ///< dense fp16 bytes / bytes() after compression (text run)
  NextTokenScores text;    ///< the text run's continuation
  /// The decoding test (Runner::run_decoding): the generated tokens, with compress() every
  /// Settings::compress_every of them; bytes ratio after the last compress().
  NextTokenScores decoding;
  double decoding_bytes_ratio = 0;
  double decoding_compress_seconds = 0;
  double retrieval_acc = 0;  ///< share of questions whose answer was generated
  double retrieval_bytes_ratio = 0;
  int retrieval_correct = 0, retrieval_asked = 0;
  double retrieval_ratio_sum = 0;
  int retrieval_contexts = 0;
  /// Model throughput: prefill over the uncompressed context (measured once, in the full row:
  /// every other row starts from a copy of that prefill), decode over this row's cache.
  double prefill_seconds = 0, prefill_tokens = 0, decode_seconds = 0, decode_tokens = 0;
  double prefill_flops = 0;  ///< matmul + attention FLOPs of the timed prefills
  double score_seconds = 0;  ///< extra passes a policy needs before compress (KVzip repeat)
  double compress_seconds = 0;
  /// LazyLayerDrop: observed mass per layer, one vector per compressed context.
  std::vector<std::vector<double>> layer_mass;
  int lazy_layers = -1;  ///< LazyLayerDrop: lazy layers summed over contexts

  double prefill_tokens_per_s() const { return prefill_tokens / prefill_seconds; }
  double decode_tokens_per_s() const { return decode_tokens / decode_seconds; }
  double prefill_flops_per_s() const { return prefill_flops / prefill_seconds; }
};

/// Logits of the full cache on the text, computed once and shared by every policy row.
struct TextReference {
  std::vector<float> logits;  ///< continuation × vocab
  int64_t rows = 0;
  int64_t vocab = 0;
};

/// FLOPs of a prefill of `n` tokens at positions [0, n) without the output head: 2 per weight
/// of every projection per token, plus 4·d per (query head, query, visible key) for QKᵀ and PV.
double prefill_flops(const llama::LlamaConfig& c, int64_t n);

/// Rate of Eigen's fp32 GEMM at the model's MLP shape, (chunk × hidden)·(hidden × ffn), with the
/// current OpenMP threads: the baseline the prefill rate is compared with, measured in the same
/// run. Runs for about `seconds`.
double measure_gemm_flops_per_s(const llama::LlamaConfig& c, int64_t rows, double seconds);

/// Lead of the full cache's top-1 probability over its runner-up that makes a position count
/// for agreement_decisive.
constexpr double kDecisiveMargin = 0.1;

/// Agreement, KL and perplexity of `logits` (continuation × vocab) against the reference.
NextTokenScores score_against(const TextReference& ref, const float* logits,
                              const std::vector<int32_t>& continuation);

/// (row, stage, fraction of the whole run) for a progress display.
using Progress = std::function<void(const std::string& stage, double fraction)>;

/// \brief Runs every policy row on the same inputs. Each context is prefilled once, on the full
/// cache; each row's cache starts from a copy of that prefill (exactly what its own prefill would
/// have appended), runs what its policy needs before compress() and is compressed.
class Runner {
 public:
  Runner(const llama::LlamaModel& model, const llama::Tokenizer& tokenizer, Settings settings)
      : model_(model), tok_(tokenizer), settings_(settings) {}

  /// Tokens the ChannelShrink projections are calibrated on (kept apart from the scored text).
  void set_calibration_tokens(std::vector<int32_t> tokens) { calibration_ = std::move(tokens); }
  /// PCA projections for `ratio` with latents of `latent_bytes` each (fp16: 2), computed once
  /// per (ratio, latent_bytes) from the calibration tokens.
  std::shared_ptr<const ChannelProjections> projections(double ratio, double latent_bytes);
  /// The input kvzip-head's scores come from (one sample, not an evaluated input).
  void set_head_sample(std::string context) { head_sample_ = std::move(context); }
  /// KVzip head scores: loaded from Settings::head_scores_file when it exists, else from one
  /// repeat pass over the head sample (then written to that file when one is named).
  std::shared_ptr<const HeadScores> head_scores();

  /// KVzip+'s output-projection factors of the model (built once from its attn_output weights).
  std::shared_ptr<const OutputFactors> output_factors();
  /// Documents KVzap's scorer is fitted on (none of them an evaluated input); the last one is
  /// held out to choose the ridge λ and report R².
  void set_kvzap_documents(std::vector<std::string> documents) {
    kvzap_documents_ = std::move(documents);
  }
  /// KVzap's scorer: loaded from Settings::kvzap_scorer_file when it exists, else fitted by
  /// calibrate_kvzap() (then written to that file when one is named).
  std::shared_ptr<const HiddenScorer> kvzap_scorer();
  /// Fits KVzap's linear scorer: each document (system prompt + up to --context tokens) is
  /// prefilled with its attention inputs captured and scored by a KVzip+ repeat pass; per layer,
  /// ridge regression from x to log KVzip+ score per kv head (tokens after the system prompt),
  /// λ chosen on the last document. Prints R² per layer to stderr.
  HiddenScorer calibrate_kvzap();

  /// Agreement, KL and perplexity of every row against row 0 (the full cache) on
  /// text[0, context + continuation).
  void run_text(const std::vector<PolicySpec>& specs, const std::vector<int32_t>& text_tokens,
                std::vector<PolicyResult>& results, const Progress& progress);
  /// The decoding test (KVzap paper: eviction while generating): after text[0, context), the
  /// text's next token and Settings::decode_tokens - 1 tokens the full cache generates (sampled
  /// at Settings::decode_temperature) are fed to every row, compressed once after the context as
  /// in run_text, Settings::compress_every at a time, with compress() after each step. The
  /// budget is relative to the appended tokens: policies that score new tokens hold it as the
  /// sequence grows, those scored by observed queries keep the unscored new tokens outside it.
  /// Next-token distributions are compared with the full cache's, fed the same way.
  void run_decoding(const std::vector<PolicySpec>& specs, const std::vector<int32_t>& text_tokens,
                    std::vector<PolicyResult>& results, const Progress& progress);
  /// Retrieval accuracy: each task's context is compressed once per row, then every question
  /// on that context is asked on its own copy of the compressed cache.
  /// `after_context` runs after each context (e.g. to save partial results).
  void run_retrieval(const std::vector<PolicySpec>& specs, const std::vector<RetrievalTask>& tasks,
                     std::vector<PolicyResult>& results, const Progress& progress,
                     const std::function<void()>& after_context = {});

 private:
  /// Caches observed by a repeat pass, per policy name, for the context being evaluated.
  using Observed =
      std::vector<std::pair<std::string, std::pair<std::unique_ptr<EvalCache>, double>>>;

  /// Prefills ids[0, n) into a full (fp16) cache; timing goes to `stats`.
  std::unique_ptr<EvalCache> prefill_full(const std::vector<int32_t>& ids, PolicyResult& stats,
                                          bool capture_hidden = false);
  /// The empty first sequence of the KVCacheBatch that every cache of `spec`'s row joins
  /// (contexts as sequences, questions as forks, removed when answered), made on first use:
  /// the row's caches share one page pool as an engine's requests do.
  const EvalCache& home(const PolicySpec& spec);
  /// The system prompt's tokens (with BOS): every context starts with them.
  std::vector<int32_t> system_tokens() const;
  /// One repeat pass over the head sample: KVzip head scores (head_scores()).
  HeadScores score_heads();
  /// T::load(file) when `file` names an existing file; else make(), saved to `file` if named.
  template <class T, class Make>
  static std::shared_ptr<const T> load_or_make(const std::string& file, Make&& make) {
    if (!file.empty() && std::ifstream(file).good())
      return std::make_shared<const T>(T::load(file));
    auto made = std::make_shared<const T>(make());
    if (!file.empty()) made->save(file);
    return made;
  }
  /// The row's compressed cache for context `ids`, built from the full cache's prefill.
  /// `context_begin`: first position of the compressible text (after the system prompt).
  std::unique_ptr<EvalCache> derive(const PolicySpec& spec, const EvalCache& full,
                                    const std::vector<int32_t>& ids, int64_t context_begin,
                                    Observed& observed, PolicyResult& stats);
  /// Keep ratio that brings an eviction row to its target bytes ratio `spec.ratio` on `full`.
  double keep_for_ratio(const PolicySpec& spec, const EvalCache& full, int64_t n);
  void repeat_pass(EvalCache& cache, const std::vector<int32_t>& ids, int64_t context_begin);

  const llama::LlamaModel& model_;
  const llama::Tokenizer& tok_;
  Settings settings_;
  std::vector<int32_t> calibration_;
  std::string head_sample_;
  std::shared_ptr<const HeadScores> head_scores_;
  std::shared_ptr<const OutputFactors> output_factors_;
  std::shared_ptr<const HiddenScorer> kvzap_scorer_;
  std::vector<std::string> kvzap_documents_;
  /// home() per row label.
  std::vector<std::pair<std::string, std::unique_ptr<EvalCache>>> homes_;
  /// Keyed by (bytes ratio, bytes per latent value).
  std::vector<std::pair<std::pair<double, double>, std::shared_ptr<const ChannelProjections>>>
      projections_;
};

}  // namespace kvpack::eval
