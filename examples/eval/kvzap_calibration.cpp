// KVzip+ and KVzap for the evaluation: the output-projection factors, and the fit of KVzap's linear
// scorer to log KVzip+ scores (arXiv 2601.07891) on documents that are not evaluated inputs.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <kvpack/linalg/ridge.hpp>
#include <stdexcept>

#include "runner.hpp"

namespace kvpack::eval {

std::shared_ptr<const OutputFactors> Runner::output_factors() {
  if (output_factors_) return output_factors_;
  const llama::LlamaConfig& c = model_.config();
  auto factors = std::make_shared<OutputFactors>(c.shape());
  for (int l = 0; l < c.layers; ++l) {
    factors->set_layer(l, model_.layer_weights(l).attn_output.data(), c.hidden);
  }
  output_factors_ = factors;
  return output_factors_;
}

std::shared_ptr<const HiddenScorer> Runner::kvzap_scorer() {
  if (!kvzap_scorer_) {
    kvzap_scorer_ =
        load_or_make<HiddenScorer>(settings_.kvzap_scorer_file, [&] { return calibrate_kvzap(); });
  }
  return kvzap_scorer_;
}

HiddenScorer Runner::calibrate_kvzap() {
  if (kvzap_documents_.size() < 2) {
    throw std::runtime_error("kvzap: calibration needs at least two documents (one held out)");
  }
  const llama::LlamaConfig& c = model_.config();
  const ModelShape shape = c.shape();
  // Per layer: rows of x (hidden) and of log KVzip+ score (one per kv head), documents in order.
  std::vector<std::vector<float>> xs(c.layers), ys(c.layers);
  // Each document in chunks of at most --context tokens (the length the rows are scored at).
  struct Chunk {
    std::size_t doc;
    std::vector<int32_t> tokens;
  };
  std::vector<Chunk> chunks;
  for (std::size_t doc = 0; doc < kvzap_documents_.size(); ++doc) {
    const auto text = tok_.encode(kvzap_documents_[doc]);
    for (std::size_t at = 0; at < text.size(); at += static_cast<std::size_t>(settings_.context)) {
      const std::size_t end =
          std::min(text.size(), at + static_cast<std::size_t>(settings_.context));
      if (end - at >= 64) chunks.push_back({doc, {text.begin() + at, text.begin() + end}});
    }
  }
  int64_t held_out = 0;  // rows of the last document's chunks
  for (std::size_t i = 0; i < chunks.size(); ++i) {
    std::vector<int32_t> ids = system_tokens();
    const int64_t begin = static_cast<int64_t>(ids.size());
    ids.insert(ids.end(), chunks[i].tokens.begin(), chunks[i].tokens.end());
    const int64_t n = static_cast<int64_t>(ids.size());
    PolicyResult untimed;
    const auto full = prefill_full(ids, untimed, true);
    PolicySpec spec;
    spec.name = settings_.kvzap_target;
    spec.sinks = begin;
    if (spec.name == "kvzip-plus") spec.output_factors = output_factors();
    auto scored = make_cache(spec, shape);
    scored->copy_prefix_from(*full, n);
    repeat_pass(*scored, ids, begin);
    for (int l = 0; l < c.layers; ++l) {
      const std::vector<float>& x = full->captured_hidden(l);
      std::vector<std::vector<float>> scores(shape.kv_heads);
      for (int h = 0; h < shape.kv_heads; ++h) scores[h] = scored->token_scores(l, h);
      for (int64_t t = begin; t < n; ++t) {
        xs[l].insert(xs[l].end(), x.begin() + t * c.hidden, x.begin() + (t + 1) * c.hidden);
        // KVzip+ scores of the context are > 0; the floor keeps an underflow finite.
        for (int h = 0; h < shape.kv_heads; ++h) {
          ys[l].push_back(std::log(std::max(scores[h][t], 1e-30f)));
        }
      }
    }
    if (chunks[i].doc + 1 == kvzap_documents_.size()) held_out += n - begin;
    std::fprintf(stderr, "kvzap calibration: chunk %zu/%zu scored (%lld tokens)\n", i + 1,
                 chunks.size(), static_cast<long long>(n - begin));
  }
  HiddenScorer scorer(c.layers, shape.kv_heads, c.hidden);
  scorer.held_out_r2.assign(c.layers, 0.0f);
  const std::vector<double> lambdas{1e-4, 1e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0};
  double mean_r2 = 0;
  for (int l = 0; l < c.layers; ++l) {
    const Eigen::Index rows = static_cast<Eigen::Index>(ys[l].size() / shape.kv_heads);
    const RowMajorMatrixXf x = Eigen::Map<const RowMajorMatrixXf>(xs[l].data(), rows, c.hidden);
    const RowMajorMatrixXf y =
        Eigen::Map<const RowMajorMatrixXf>(ys[l].data(), rows, shape.kv_heads);
    const RidgeFit fit = ridge_fit(x, y, lambdas, held_out);
    for (int i = 0; i < c.hidden; ++i) {
      for (int h = 0; h < shape.kv_heads; ++h) {
        scorer.weight[(static_cast<std::size_t>(l) * c.hidden + i) * shape.kv_heads + h] =
            static_cast<float>(fit.w(i, h));
      }
    }
    for (int h = 0; h < shape.kv_heads; ++h) {
      scorer.bias[static_cast<std::size_t>(l) * shape.kv_heads + h] = static_cast<float>(fit.b[h]);
    }
    scorer.held_out_r2[l] = static_cast<float>(fit.held_out_r2);
    scorer.ridge = std::max(scorer.ridge, fit.lambda);
    mean_r2 += fit.held_out_r2 / c.layers;
    std::fprintf(stderr, "kvzap calibration: layer %d held-out R2 %.3f (lambda %g)\n", l,
                 fit.held_out_r2, fit.lambda);
  }
  std::fprintf(stderr, "kvzap calibration: mean held-out R2 %.3f over %d layers\n", mean_r2,
               c.layers);
  return scorer;
}

}  // namespace kvpack::eval
