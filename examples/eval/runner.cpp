#include "runner.hpp"

#include <Eigen/Dense>
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <stdexcept>

#include "inference.hpp"
#include "policy_registry.hpp"

namespace kvpack::eval {
namespace {

double now_seconds() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

/// log-softmax of one logits row, in double.
std::vector<double> log_softmax(const float* logits, int64_t n) {
  double max = logits[0];
  for (int64_t i = 1; i < n; ++i) max = std::max(max, static_cast<double>(logits[i]));
  double sum = 0;
  for (int64_t i = 0; i < n; ++i) sum += std::exp(logits[i] - max);
  const double log_z = max + std::log(sum);
  std::vector<double> out(n);
  for (int64_t i = 0; i < n; ++i) out[i] = logits[i] - log_z;
  return out;
}

std::string system_header() {
  return std::string("<|im_start|>system\n") + llama::kSmolLmDefaultSystemPrompt +
         "<|im_end|>\n<|im_start|>user\n";
}

}  // namespace

void Runner::repeat_pass(EvalCache& cache, const std::vector<int32_t>& ids, int64_t context_begin) {
  // KVzip: the model re-reads its context, chunk by chunk, after an instruction to repeat it.
  // Every query of that pass is observed with a chunk-local softmax (sinks + chunk + the repeat
  // tokens); the repeat tokens are then rolled back, so the cache holds the context again.
  const int64_t n = static_cast<int64_t>(ids.size());
  const int64_t chunk = settings_.repeat_chunk;
  for (int64_t begin = context_begin; begin < n; begin += chunk) {
    const int64_t end = std::min(n, begin + chunk);
    std::string instruction =
        "<|im_end|>\n<|im_start|>user\nRepeat the previous context exactly.<|im_end|>\n"
        "<|im_start|>assistant\n";
    if (begin > context_begin) {
      const std::vector<int32_t> cue(ids.begin() + std::max(context_begin, begin - 8),
                                     ids.begin() + begin);
      instruction =
          "<|im_end|>\n<|im_start|>user\nRepeat the part of the previous context exactly, "
          "starting with " +
          tok_.decode(cue, false) + "<|im_end|>\n<|im_start|>assistant\n";
    }
    std::vector<int32_t> input = tok_.encode(instruction, true);
    input.insert(input.end(), ids.begin() + begin, ids.begin() + end);
    cache.set_window(ScoreWindow::chunk(context_begin, begin, end, n));
    cache.set_observe(true);
    model_.forward(cache.attention(), input, n, llama::Logits::kNone);
    cache.set_observe(false);
    cache.truncate(n - 1);
  }
  cache.set_window(ScoreWindow::all());
}

std::shared_ptr<const ChannelProjections> Runner::projections(double ratio, double latent_bytes) {
  for (const auto& [key, p] : projections_) {
    if (key == std::make_pair(ratio, latent_bytes)) return p;
  }
  if (calibration_.empty()) throw std::runtime_error("cskv: no calibration tokens");
  // Run the model over the calibration tokens on an exact fp32 cache, then collect each
  // layer's pre-RoPE keys and values (tokens x kv_heads*head_dim).
  const ModelShape shape = model_.config().shape();
  KVCache<IdentityF32> cache(shape);
  llama::KvCacheAdapter<KVCache<IdentityF32>> adapter(cache, false);
  model_.forward(adapter, calibration_, 0, llama::Logits::kNone);
  const Rope rope(shape.rope, shape.head_dim);
  const int c = shape.kv_heads * shape.head_dim, d = shape.head_dim;
  std::vector<std::vector<float>> keys(shape.layers), values(shape.layers);
  for (int l = 0; l < shape.layers; ++l) {
    const DenseLayer layer = cache.materialize(l);
    const std::size_t n = layer.heads[0].positions.size();
    keys[l].resize(n * c);
    values[l].resize(n * c);
    for (int h = 0; h < shape.kv_heads; ++h) {
      for (std::size_t t = 0; t < n; ++t) {
        float* k = keys[l].data() + t * c + h * d;
        std::copy_n(layer.heads[h].k.data() + t * d, d, k);
        rope.unrotate(k, layer.heads[h].positions[t]);
        std::copy_n(layer.heads[h].v.data() + t * d, d, values[l].data() + t * c + h * d);
      }
    }
  }
  const auto [rk, rv] = cskv_ranks(shape, ratio, settings_.context, latent_bytes);
  auto p = std::make_shared<const ChannelProjections>(
      ChannelProjections::calibrate(keys, values, shape.kv_heads, shape.head_dim, rk, rv));
  projections_.push_back({{ratio, latent_bytes}, p});
  return p;
}

std::shared_ptr<const HeadScores> Runner::head_scores() {
  if (!head_scores_) {
    head_scores_ =
        load_or_make<HeadScores>(settings_.head_scores_file, [&] { return score_heads(); });
  }
  return head_scores_;
}

HeadScores Runner::score_heads() {
  if (head_sample_.empty()) throw std::runtime_error("kvzip-head: no head sample");
  std::vector<int32_t> ids = system_tokens();
  const int64_t context_begin = static_cast<int64_t>(ids.size());
  const auto context = tok_.encode(head_sample_);
  ids.insert(ids.end(), context.begin(), context.end());
  PolicyResult untimed;
  const auto full = prefill_full(ids, untimed);
  PolicySpec spec;
  spec.name = "kvzip";
  spec.sinks = context_begin;  // the system prompt: not part of any head's score
  auto cache = make_cache(spec, model_.config().shape());
  cache->copy_prefix_from(*full, static_cast<int64_t>(ids.size()));
  repeat_pass(*cache, ids, context_begin);
  return cache->head_scores();
}

const EvalCache& Runner::home(const PolicySpec& spec) {
  const std::string key = spec.label();
  auto it =
      std::find_if(homes_.begin(), homes_.end(), [&](const auto& e) { return e.first == key; });
  if (it == homes_.end()) {
    homes_.emplace_back(key, make_cache(spec, model_.config().shape()));
    it = homes_.end() - 1;
  }
  return *it->second;
}

std::vector<int32_t> Runner::system_tokens() const { return tok_.encode(system_header(), true); }

std::unique_ptr<EvalCache> Runner::prefill_full(const std::vector<int32_t>& ids,
                                                PolicyResult& stats, bool capture_hidden) {
  PolicySpec spec;
  spec.name = "full";
  auto cache = make_cache(spec, model_.config().shape(), &home(spec));
  cache->set_capture_hidden(capture_hidden || settings_.capture_hidden);
  const double t0 = now_seconds();
  model_.forward(cache->attention(), ids, 0, llama::Logits::kNone);
  stats.prefill_seconds += now_seconds() - t0;
  stats.prefill_tokens += static_cast<double>(ids.size());
  stats.prefill_flops += prefill_flops(model_.config(), static_cast<int64_t>(ids.size()));
  return cache;
}

double Runner::keep_for_ratio(const PolicySpec& spec, const EvalCache& full, int64_t n) {
  // Bytes-budget split: the storage stage alone (fp16 rows, or KIVI of every token for
  // "+quant") reaches R_store on this context; eviction supplies the rest, keep = R_store / R.
  // Exact for the kept rows; the fp16 residual of KIVI makes the composed ratio a little lower.
  PolicySpec store = spec;
  store.name = resolve_policy(spec.name).quantized ? "quant" : "full";
  auto cache = make_cache(store, model_.config().shape(), &home(store));
  cache->copy_prefix_from(full, n);
  cache->compress();
  const double r_store = static_cast<double>(cache->dense_bytes()) / cache->bytes();
  return std::clamp(r_store / spec.ratio, 1e-4, 1.0);
}

std::unique_ptr<EvalCache> Runner::derive(const PolicySpec& spec_in, const EvalCache& full,
                                          const std::vector<int32_t>& ids, int64_t context_begin,
                                          Observed& observed, PolicyResult& stats) {
  PolicySpec spec = spec_in;
  if (spec.sinks < 0) spec.sinks = std::max<int64_t>(context_begin, 4);
  const ResolvedPolicy policy = resolve_policy(spec.name);
  const DriverNeeds& needs = policy.entry->needs;
  if (needs.projections && !spec.projections) {
    // +quant: ranks priced at the quantized latents' bytes (the quantizer's share is fixed).
    spec.projections = projections(
        spec.ratio, policy.quantized ? Quantize(spec.bits, spec.group).bytes_per_value() : 2.0);
  }
  if (needs.head_scores && !spec.head_scores) spec.head_scores = head_scores();
  if (needs.output_factors && !spec.output_factors) spec.output_factors = output_factors();
  if (needs.hidden_scorer && !spec.kvzap_scorer) spec.kvzap_scorer = kvzap_scorer();
  const int64_t n = static_cast<int64_t>(ids.size());
  if (spec.keep_from_ratio) spec.keep = keep_for_ratio(spec, full, n);
  std::unique_ptr<EvalCache> cache;
  auto fresh = make_cache(spec, model_.config().shape(), &home(spec));
  if (needs.repeat_pass) {
    // One repeat pass per context and cache type: the scores do not depend on the budget, so
    // rows at other keep ratios or scopes reuse them.
    const std::string key =
        needs.shared_scores + (policy.quantized ? "+quant" + std::to_string(spec.bits) : "");
    auto it = std::find_if(observed.begin(), observed.end(),
                           [&](const auto& e) { return e.first == key; });
    if (it == observed.end()) {
      fresh->copy_prefix_from(full, n);
      const double t0 = now_seconds();
      repeat_pass(*fresh, ids, context_begin);
      const double seconds = now_seconds() - t0;
      observed.emplace_back(key, std::make_pair(std::move(fresh), seconds));
      it = observed.end() - 1;
    }
    cache = it->second.first->clone();
    cache->set_budget(spec.keep, policy.entry->scope);
    stats.score_seconds += it->second.second;
  } else if (needs.last_queries > 0) {
    // SimLayerKV / SnapKV decide from the last context tokens' queries: re-run just those.
    const int64_t last = std::min(needs.last_queries, n);
    fresh->copy_prefix_from(full, n - last);
    fresh->set_observe(true);
    model_.forward(fresh->attention(), ids.data() + n - last, last, n - last, llama::Logits::kNone);
    fresh->set_observe(false);
    cache = std::move(fresh);
  } else {
    fresh->copy_prefix_from(full, n);  // KVzap: scores the tokens from the captured prefill
    stats.score_seconds += fresh->hidden_score_seconds();
    cache = std::move(fresh);
  }
  const double t2 = now_seconds();
  cache->compress();
  stats.compress_seconds += now_seconds() - t2;
  if (!cache->lazy_layers().empty()) {
    stats.layer_mass.push_back(cache->observed_mass());
    const auto lazy = cache->lazy_layers();
    stats.lazy_layers = std::max(stats.lazy_layers, 0) +
                        static_cast<int>(std::count(lazy.begin(), lazy.end(), true));
  }
  return cache;
}

double prefill_flops(const llama::LlamaConfig& c, int64_t n) {
  const double q = static_cast<double>(c.q_heads) * c.head_dim;
  const double kv = static_cast<double>(c.kv_heads) * c.head_dim;
  const double weights = c.hidden * (2 * q + 2 * kv) + 3.0 * c.hidden * c.ffn;
  const double pairs = 0.5 * static_cast<double>(n) * static_cast<double>(n + 1);
  return c.layers * (2.0 * weights * static_cast<double>(n) + 4.0 * q * pairs);
}

double measure_gemm_flops_per_s(const llama::LlamaConfig& c, int64_t rows, double seconds) {
  using Matrix = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  const Matrix a = Matrix::Random(rows, c.hidden), b = Matrix::Random(c.hidden, c.ffn);
  Matrix out(rows, c.ffn);
  out.noalias() = a * b;  // warm-up
  int64_t reps = 0;
  const double t0 = now_seconds();
  double elapsed = 0;
  while (elapsed < seconds) {
    out.noalias() = a * b;
    ++reps;
    elapsed = now_seconds() - t0;
  }
  return 2.0 * static_cast<double>(rows) * c.hidden * c.ffn * static_cast<double>(reps) / elapsed;
}

NextTokenScores score_against(const TextReference& ref, const float* logits,
                              const std::vector<int32_t>& cont) {
  const int64_t m = ref.rows;
  int64_t agree = 0, decisive = 0, decisive_agree = 0;
  double kl = 0, nll = 0;
  for (int64_t i = 0; i < m; ++i) {
    const float* a = ref.logits.data() + i * ref.vocab;
    const float* b = logits + i * ref.vocab;
    const bool same = llama::argmax(a, ref.vocab) == llama::argmax(b, ref.vocab);
    agree += same;
    const auto la = log_softmax(a, ref.vocab), lb = log_softmax(b, ref.vocab);
    // One pass over the full cache's probabilities: KL, and its top-1 lead over the runner-up.
    double row = 0, p1 = 0, p2 = 0;
    for (int64_t v = 0; v < ref.vocab; ++v) {
      const double p = std::exp(la[v]);
      row += p * (la[v] - lb[v]);
      if (p > p1) {
        p2 = p1;
        p1 = p;
      } else if (p > p2) {
        p2 = p;
      }
    }
    kl += row;
    if (p1 - p2 >= kDecisiveMargin) {
      ++decisive;
      decisive_agree += same;
    }
    if (i + 1 < m) nll -= lb[cont[i + 1]];
  }
  NextTokenScores result;
  result.agreement_top1 = static_cast<double>(agree) / static_cast<double>(m);
  result.decisive_positions = decisive;
  result.agreement_decisive =
      decisive > 0 ? static_cast<double>(decisive_agree) / static_cast<double>(decisive) : NAN;
  result.kl = kl / static_cast<double>(m);
  result.perplexity = std::exp(nll / static_cast<double>(m - 1));
  return result;
}

void Runner::run_text(const std::vector<PolicySpec>& specs, const std::vector<int32_t>& text,
                      std::vector<PolicyResult>& results, const Progress& progress) {
  const int64_t c = settings_.context, m = settings_.continuation;
  if (static_cast<int64_t>(text.size()) < c + m) {
    throw std::runtime_error("the text has " + std::to_string(text.size()) +
                             " tokens; --context + --continuation need " + std::to_string(c + m));
  }
  const std::vector<int32_t> context(text.begin(), text.begin() + c);
  const std::vector<int32_t> cont(text.begin() + c, text.begin() + c + m);
  progress("text: prefill", 0.0);
  const auto full = prefill_full(context, results[0]);
  TextReference ref;
  Observed observed;
  for (std::size_t i = 0; i < specs.size(); ++i) {
    progress("text: " + results[i].label, static_cast<double>(i) / specs.size());
    auto cache = i == 0 ? full->clone() : derive(specs[i], *full, context, 0, observed, results[i]);
    results[i].bytes_ratio = static_cast<double>(cache->dense_bytes()) / cache->bytes();
    const llama::RowMatrix logits =
        model_.forward(cache->attention(), cont, c, llama::Logits::kAll);
    if (i == 0) {
      ref.rows = logits.rows();
      ref.vocab = logits.cols();
      ref.logits.assign(logits.data(), logits.data() + logits.size());
    }
    results[i].text = score_against(ref, logits.data(), cont);
  }
}

void Runner::run_decoding(const std::vector<PolicySpec>& specs, const std::vector<int32_t>& text,
                          std::vector<PolicyResult>& results, const Progress& progress) {
  const int64_t c = settings_.context, d = settings_.decode_tokens;
  if (static_cast<int64_t>(text.size()) < c + 1) {
    throw std::runtime_error("the text has " + std::to_string(text.size()) +
                             " tokens; --context and the decoding test need " +
                             std::to_string(c + 1));
  }
  const std::vector<int32_t> context(text.begin(), text.begin() + c);
  progress("decoding: prefill", 0.0);
  PolicyResult untimed_prefill;  // the text run times the prefill
  const auto full = prefill_full(context, untimed_prefill);
  // The tokens every row is fed: the text's next token, then what the full cache generates.
  progress("decoding: generate", 0.0);
  std::vector<int32_t> fed{text[c]};
  {
    auto generator = full->clone();
    const int n = static_cast<int>(d - 1);
    const auto gen =
        settings_.decode_temperature > 0
            ? llama::sample_generate(model_, generator->attention(), fed, c, n,
                                     settings_.decode_temperature, settings_.decode_seed)
            : llama::greedy_generate(model_, generator->attention(), fed, c, n);
    fed.insert(fed.end(), gen.tokens.begin(), gen.tokens.end());
    if (settings_.verbose) {
      std::fprintf(stderr, "\n[decoding test] %s\n", tok_.decode(fed, false).c_str());
    }
  }
  TextReference ref;
  Observed observed;
  for (std::size_t i = 0; i < specs.size(); ++i) {
    progress("decoding: " + results[i].label, static_cast<double>(i) / specs.size());
    PolicyResult& res = results[i];
    PolicyResult untimed;  // the text run reports what scoring and the first compress cost
    auto cache = i == 0 ? full->clone() : derive(specs[i], *full, context, 0, observed, untimed);
    std::vector<float> logits;
    for (int64_t begin = 0; begin < d; begin += settings_.compress_every) {
      const int64_t len = std::min(settings_.compress_every, d - begin);
      const llama::RowMatrix step = model_.forward(cache->attention(), fed.data() + begin, len,
                                                   c + begin, llama::Logits::kAll);
      logits.insert(logits.end(), step.data(), step.data() + step.size());
      if (i == 0) ref.vocab = step.cols();
      const double t0 = now_seconds();
      cache->compress();
      res.decoding_compress_seconds += now_seconds() - t0;
    }
    if (i == 0) {
      ref.rows = d;
      ref.logits = logits;
    }
    res.decoding = score_against(ref, logits.data(), fed);
    res.decoding_bytes_ratio = static_cast<double>(cache->dense_bytes()) / cache->bytes();
  }
}

void Runner::run_retrieval(const std::vector<PolicySpec>& specs,
                           const std::vector<RetrievalTask>& tasks,
                           std::vector<PolicyResult>& results, const Progress& progress,
                           const std::function<void()>& after_context) {
  const std::vector<int32_t> stops{tok_.eos_id(), tok_.find_piece("<|im_end|>")};
  for (std::size_t i = 0; i < tasks.size();) {
    // Tasks with the same context share one compressed cache (query-agnostic compression).
    std::size_t j = i;
    while (j < tasks.size() && tasks[j].context == tasks[i].context) ++j;
    const double done = static_cast<double>(i) / tasks.size();
    progress("retrieval: prefill", done);
    std::vector<int32_t> ids = system_tokens();
    const int64_t context_begin = static_cast<int64_t>(ids.size());
    const auto context = tok_.encode(tasks[i].context);
    ids.insert(ids.end(), context.begin(), context.end());
    const auto full = prefill_full(ids, results[0]);
    Observed observed;
    for (std::size_t r = 0; r < specs.size(); ++r) {
      progress("retrieval: " + results[r].label,
               done + static_cast<double>(j - i) / tasks.size() * r / specs.size());
      PolicyResult& res = results[r];
      auto compressed =
          r == 0 ? full->clone() : derive(specs[r], *full, ids, context_begin, observed, res);
      res.retrieval_ratio_sum +=
          static_cast<double>(compressed->dense_bytes()) / compressed->bytes();
      ++res.retrieval_contexts;
      for (std::size_t t = i; t < j; ++t) {
        auto cache = compressed->clone();
        std::string q = "\n\n" + tasks[t].question + "<|im_end|>\n<|im_start|>assistant\n";
        if (!tasks[t].answer_prefix.empty()) q += tasks[t].answer_prefix;
        const auto question = tok_.encode(q, true);
        const auto gen = llama::greedy_generate(model_, cache->attention(), question,
                                                static_cast<int64_t>(ids.size()),
                                                settings_.max_new_tokens, stops);
        // Greedy decode steps over the compressed cache (after the question's prefill).
        res.decode_seconds += gen.decode_seconds;
        res.decode_tokens += std::max<double>(0, static_cast<double>(gen.tokens.size()) - 1);
        const std::string answer = tok_.decode(gen.tokens, false);
        const bool correct = answer.find(tasks[t].answer) != std::string::npos;
        res.retrieval_correct += correct;
        if (settings_.verbose) {
          std::fprintf(stderr, "\n[%s] task %zu: expected %s, got \"%s\" %s\n", res.label.c_str(),
                       t, tasks[t].answer.c_str(), answer.c_str(), correct ? "ok" : "WRONG");
        }
        ++res.retrieval_asked;
      }
      res.retrieval_acc = static_cast<double>(res.retrieval_correct) / res.retrieval_asked;
      res.retrieval_bytes_ratio = res.retrieval_ratio_sum / res.retrieval_contexts;
    }
    if (after_context) after_context();
    i = j;
  }
}

}  // namespace kvpack::eval
