// The CUDA kernels on the reference model's real K/V, run on the emulated grid
// (backend/cuda/emulation/): the same kernel source nvcc compiles, executed on the CPU. The CUDA
// cache against the CPU cache through a prefill, an L2, KVzip, SnapKV or KVzap eviction, lazy-layer
// trimming or KIVI quantization, and decode steps; the KIVI kernels on one layer's K/V and queries
// (tests/cuda/kivi_checks.hpp); the low-rank factorisation on an xKV group's stacked keys and
// values, and attention over an xKV cache's real factors (tests/cuda/low_rank_checks.hpp).
#define KVPACK_CUDA_EMULATION 1

#include <algorithm>
#include <catch2/catch.hpp>
#include <cmath>
#include <kvpack/backend/cuda.hpp>
#include <kvpack/kvpack.hpp>
#include <memory>
#include <vector>

#include "../cpu/test_util.hpp"
#include "../cuda/cache_checks.hpp"
#include "../cuda/kivi_checks.hpp"
#include "../cuda/low_rank_checks.hpp"
#include "attention_cache.hpp"
#include "model.hpp"
#include "model_fixture.hpp"
#include "tokenizer.hpp"

using kvpack::llama::AttentionCache;
using kvpack::llama::KvCacheAdapter;
using kvpack::llama::LlamaModel;
using kvpack::llama::RowMatrix;

namespace {

/// Feeds the same K/V and queries, the CPU forward pass's, to two caches: the pass goes on with
/// the first's attention, and each attend of the second is compared with it (normalised L2).
class TeeCache : public AttentionCache {
 public:
  TeeCache(AttentionCache& first, AttentionCache& second, int64_t row)
      : first_(first), second_(second), row_(row) {}
  void append(int layer, const float* k, const float* v, const int64_t* positions,
              int64_t n) override {
    first_.append(layer, k, v, positions, n);
    second_.append(layer, k, v, positions, n);
  }
  void attend(int layer, const float* q, const int64_t* positions, int64_t n, float* out) override {
    first_.attend(layer, q, positions, n, out);
    std::vector<float> other(static_cast<std::size_t>(n * row_));
    second_.attend(layer, q, positions, n, other.data());
    compare(out, other);
  }
  void observe(int layer, const float* q, const int64_t* positions, int64_t n,
               const float* weights) override {
    first_.observe(layer, q, positions, n, weights);
    second_.observe(layer, q, positions, n, weights);
  }
  /// Each cache's own attend_observe (the CUDA cache's single pass where its window covers every
  /// key), outputs compared as attend()'s.
  void attend_observe(int layer, const float* q, const int64_t* positions, int64_t n, float* out,
                      const float* weights) override {
    first_.attend_observe(layer, q, positions, n, out, weights);
    std::vector<float> other(static_cast<std::size_t>(n * row_));
    second_.attend_observe(layer, q, positions, n, other.data(), weights);
    compare(out, other);
  }
  double worst() const { return worst_; }

 private:
  void compare(const float* out, const std::vector<float>& other) {
    double num = 0, den = 0;
    for (std::size_t i = 0; i < other.size(); ++i) {
      num += (static_cast<double>(other[i]) - out[i]) * (static_cast<double>(other[i]) - out[i]);
      den += static_cast<double>(out[i]) * out[i];
    }
    const double error = std::sqrt(num / den);
    if (!std::isnan(worst_) && !(error <= worst_)) worst_ = error;  // a NaN sticks: it fails
  }

  AttentionCache& first_;
  AttentionCache& second_;
  int64_t row_;
  double worst_ = 0;
};

/// The CUDA cache against the CPU cache on the model's K/V and queries: every attention output
/// of the prefill and of decode steps after compress(), and the rows each holds after it: bit
/// for bit when `tolerance` is 0, else (low-rank policies: each backend factors on its own)
/// within `tolerance`, normalised, as the decode steps' attention. Returns the layers compress()
/// marked lazy (LazyLayerDrop; 0 for other policies).
template <class Policy>
int check_against_cpu(const LlamaModel& model, const std::vector<int32_t>& ids,
                      const Policy& policy, double tolerance = 0) {
  namespace backend = kvpack::backend;
  const kvpack::ModelShape shape = model.config().shape();
  kvpack::KVCache<Policy, backend::Cpu> cpu_cache(shape, policy);
  kvpack::KVCache<Policy, backend::Cuda> gpu_cache(shape, policy);
  KvCacheAdapter<decltype(cpu_cache)> cpu(cpu_cache);
  KvCacheAdapter<decltype(gpu_cache)> gpu(gpu_cache);
  TeeCache both(cpu, gpu, static_cast<int64_t>(shape.q_heads) * shape.head_dim);
  const RowMatrix logits = model.forward_all(both, ids, 0);
  CHECK(both.worst() < 1e-5);

  cpu_cache.compress();
  gpu_cache.compress();
  CHECK(gpu_cache.dense_bytes() == cpu_cache.dense_bytes());
  if constexpr (kvpack::cuda::is_low_rank_policy<Policy>::value) {
    // The CPU's bases in whole pages, the device's in exact buffers: the same state otherwise.
    CHECK(gpu_cache.bytes() == kvpack::test::device_bytes_of(cpu_cache));
  }
  double worst_rows = 0;
  int lazy = 0;
  for (int layer = 0; layer < shape.layers; ++layer) {
    REQUIRE(gpu_cache.is_lazy(layer) == cpu_cache.is_lazy(layer));
    lazy += gpu_cache.is_lazy(layer);
    const auto x = cpu_cache.materialize(layer);
    const auto y = gpu_cache.materialize(layer);
    for (std::size_t h = 0; h < x.heads.size(); ++h) {
      INFO("layer " << layer << " head " << h);
      REQUIRE(x.heads[h].positions == y.heads[h].positions);  // the same kept set
      if (tolerance == 0) {
        REQUIRE(x.heads[h].k == y.heads[h].k);  // the same stored fp16 rows
        REQUIRE(x.heads[h].v == y.heads[h].v);
      } else {
        worst_rows =
            std::max({worst_rows, cache_checks::normalised_error(y.heads[h].k, x.heads[h].k),
                      cache_checks::normalised_error(y.heads[h].v, x.heads[h].v)});
      }
    }
  }
  CHECK(worst_rows <= tolerance);
  int64_t position = static_cast<int64_t>(ids.size());
  Eigen::Index next;
  logits.row(logits.rows() - 1).maxCoeff(&next);
  for (int step = 0; step < 4; ++step, ++position) {
    const std::vector<int32_t> token{static_cast<int32_t>(next)};
    model.forward_last(both, token, position).maxCoeff(&next);
  }
  CHECK(both.worst() < std::max(tolerance, 1e-5));
  if (tolerance > 0) {
    WARN(kvpack::detail::PolicyStages<Policy>::selection::name
         << " on real K/V, CUDA against CPU: rows " << worst_rows << ", decode attention "
         << both.worst() << " (normalised)");
  }
  return lazy;
}

/// The first `n` tokens of the prose test text (the reference tokenizer must be present).
std::vector<int32_t> prose_ids(std::size_t n) {
  std::vector<int32_t> ids =
      kvpack::test::reference_tokenizer()->encode(kvpack::test::read_test_data("prose.txt"));
  ids.resize(n);
  return ids;
}

/// Forwards to another AttentionCache and keeps the queries one layer attends with.
class QueryRecorder : public AttentionCache {
 public:
  QueryRecorder(AttentionCache& inner, int layer) : inner_(inner), layer_(layer) {}
  void append(int layer, const float* k, const float* v, const int64_t* positions,
              int64_t n) override {
    inner_.append(layer, k, v, positions, n);
  }
  void attend(int layer, const float* q, const int64_t* positions, int64_t n, float* out) override {
    if (layer == layer_) {
      q_.insert(q_.end(), q, q + n * row_);
      positions_.insert(positions_.end(), positions, positions + n);
    }
    inner_.attend(layer, q, positions, n, out);
  }
  void set_row(int64_t row) { row_ = row; }
  const std::vector<float>& q() const { return q_; }
  const std::vector<int64_t>& positions() const { return positions_; }

 private:
  AttentionCache& inner_;
  int layer_;
  int64_t row_ = 0;
  std::vector<float> q_;
  std::vector<int64_t> positions_;
};

}  // namespace

TEST_CASE("model: the CUDA backend on the emulated grid matches the CPU on real K/V",
          "[model][real-model][cuda]") {
  const LlamaModel* model = kvpack::test::reference_model();
  if (!model || !kvpack::test::reference_tokenizer()) return;
  const std::vector<int32_t> ids = prose_ids(96);
  // Both backends hold the same fp16 rows and attend in fp32 with different summation orders.
  SECTION("Identity") { check_against_cpu(*model, ids, kvpack::Identity{}); }
  SECTION("L2NormEvict, keep half, per head") {
    kvpack::L2NormEvict policy(kvpack::Budget::ratio(0.5), 0);
    check_against_cpu(*model, ids, policy);
  }
  // KIVI blocks bit for bit the CPU's (materialize equal), then decode over blocks + residual.
  SECTION("Quantize 4-bit, group 32, residual 32") {
    check_against_cpu(*model, ids, kvpack::Quantize(4, 32, 32));
  }
  SECTION("Quantize 2-bit, group 16, residual 0") {
    check_against_cpu(*model, ids, kvpack::Quantize(2, 16, 0));
  }
  // KVzip scored by the prefill's own queries (observed on both), one global threshold.
  SECTION("ReconstructionEvict, keep half, global") {
    kvpack::ReconstructionEvict policy(kvpack::Budget::ratio(0.5, kvpack::BudgetScope::kGlobal));
    check_against_cpu(*model, ids, policy);
  }
  // SimLayerKV: layers whose prefill queries put > 0.9 of their attention on 4 sinks and the
  // last 32 tokens keep only those (the same layers and tokens on both).
  SECTION("LazyLayerDrop, threshold 0.9, 4 sinks, 32 recent") {
    const int lazy = check_against_cpu(*model, ids, kvpack::LazyLayerDrop(0.9, 4, 32));
    CHECK(lazy > 0);
    CHECK(lazy < model->config().shape().layers);
  }
  // KVzap: a seeded random linear scorer of the model's real attention inputs (576 wide), the
  // GEMM in the emulated cuBLAS; a global keep budget.
  SECTION("KVzap, random scorer, keep half, global") {
    const kvpack::ModelShape shape = model->config().shape();
    const int hidden = model->config().hidden;
    auto scorer = std::make_shared<kvpack::HiddenScorer>(shape.layers, shape.kv_heads, hidden);
    scorer->weight = kvpack_test::random_values(scorer->weight.size(), 41, 0.05f);
    scorer->bias = kvpack_test::random_values(scorer->bias.size(), 42);
    check_against_cpu(
        *model, ids,
        kvpack::KVzap(scorer, kvpack::Budget::ratio(0.5, kvpack::BudgetScope::kGlobal)));
  }
  // The demo's kvzip + quant4 row: KVzip's global selection, then KIVI of the kept rows.
  SECTION("Compose<ReconstructionEvict, Quantize>, keep half, 4-bit") {
    using P = kvpack::Compose<kvpack::ReconstructionEvict, kvpack::Quantize>;
    check_against_cpu(
        *model, ids,
        P(kvpack::ReconstructionEvict(kvpack::Budget::ratio(0.5, kvpack::BudgetScope::kGlobal)),
          kvpack::Quantize(4, 32, 32)));
  }
  // SnapKV: the prefill's probabilities summed per key, max-pooled over 7 tokens, per head.
  SECTION("SnapKV, keep half, per head") {
    check_against_cpu(*model, ids, kvpack::SnapKV(kvpack::Budget::ratio(0.5)));
  }
  // Low rank: each backend factors on its own (xKV: Eigen's SVD against the Gram matrix's
  // eigenvectors in fp32; CSKV: the same projection, products summed in other orders), each
  // rounding its basis to fp16; decode steps then attend over the factors and the exact tail.
  // xKV's two factorisations pick different directions where singular values at the rank cut
  // nearly tie (each at the optimum: see the gram_factorize test below): rows 1.2e-2 apart,
  // decode attention 1.7e-2 (Zen 3); CSKV's 3e-5 and 5e-6.
  SECTION("CrossLayerSVD, groups of 4 layers, 4x") {
    check_against_cpu(*model, ids, kvpack::CrossLayerSVD::with_ratio(4, 4.0), 5e-2);
  }
  SECTION("ChannelShrink, ranks 48 / 96, residual 16") {
    const kvpack::ModelShape shape = model->config().shape();
    const int c = shape.kv_heads * shape.head_dim;
    std::vector<std::vector<float>> samples;
    for (int l = 0; l < shape.layers; ++l) {
      samples.push_back(kvpack_test::random_values(static_cast<std::size_t>(4 * c) * c, 50 + l));
    }
    auto projections =
        std::make_shared<const kvpack::ChannelProjections>(kvpack::ChannelProjections::calibrate(
            samples, samples, shape.kv_heads, shape.head_dim, 48, 96));
    check_against_cpu(*model, ids, kvpack::ChannelShrink(projections, 16), 1e-3);
  }
}

TEST_CASE("model: the CUDA KIVI kernels on real K/V match the CPU quantizer and double attention",
          "[model][real-model][cuda]") {
  const LlamaModel* model = kvpack::test::reference_model();
  if (!model || !kvpack::test::reference_tokenizer()) return;
  const std::vector<int32_t> ids = prose_ids(160);
  const kvpack::ModelShape shape = model->config().shape();
  for (int layer : {2, 17}) {
    // fp32 storage: the K/V the kernels see are the model's post-RoPE values themselves.
    kvpack::KVCache<kvpack::IdentityF32> cache(shape);
    KvCacheAdapter<decltype(cache)> adapter(cache);
    QueryRecorder recorder(adapter, layer);
    recorder.set_row(static_cast<int64_t>(shape.q_heads) * shape.head_dim);
    model->forward_all(recorder, ids, 0);
    const kvpack::DenseLayer held = cache.materialize(layer);
    INFO("layer " << layer);

    std::vector<float> rows = held.heads[0].k;
    rows.resize(128 * shape.head_dim);  // whole groups of every size tested
    kvpack::test::require_quantize_matches_cpu<4, 32, float>(rows, shape.head_dim);
    kvpack::test::require_quantize_matches_cpu<2, 32, kvpack::Half>(rows, shape.head_dim);
    kvpack::test::require_quantize_matches_cpu<8, 64, float>(rows, shape.head_dim);
    rows.assign(held.heads[1].v.begin(), held.heads[1].v.begin() + 128 * shape.head_dim);
    kvpack::test::require_quantize_matches_cpu<4, 32, float>(rows, shape.head_dim);
    kvpack::test::require_quantize_matches_cpu<2, 16, kvpack::Half>(rows, shape.head_dim);

    kvpack::test::KiviAttentionCase c;
    c.q_heads = shape.q_heads;
    c.kv_heads = shape.kv_heads;
    c.head_dim = shape.head_dim;
    c.size = static_cast<int64_t>(ids.size());
    c.residual = 40;
    for (const kvpack::DenseHead& h : held.heads) {
      c.k.push_back(h.k);
      c.v.push_back(h.v);
    }
    c.positions.assign(held.heads[0].positions.begin(), held.heads[0].positions.end());
    // The last 8 queries (decode-like) and one early one that stops inside the blocks.
    const int64_t row = static_cast<int64_t>(shape.q_heads) * shape.head_dim;
    for (int64_t t : {int64_t{50}, c.size - 8, c.size - 7, c.size - 6, c.size - 5, c.size - 4,
                      c.size - 3, c.size - 2, c.size - 1}) {
      c.q.insert(c.q.end(), recorder.q().begin() + t * row, recorder.q().begin() + (t + 1) * row);
      c.q_positions.push_back(static_cast<int32_t>(recorder.positions()[t]));
    }
    for (int64_t splits : {1, 4}) {
      INFO("splits " << splits);
      CHECK(kvpack::test::kivi_attention_error<4, 32>(c, splits) < 1e-5);
      CHECK(kvpack::test::kivi_attention_error<2, 32>(c, splits) < 1e-5);
    }
  }
}

namespace {

/// attention_kernel over a CPU low-rank cache's own factors of the reference model (prefill,
/// compress), for the recorded queries of `layer` (the last 8 and an early one), against the
/// CPU cache's attend(): normalised error.
template <class Policy>
double low_rank_kernel_error(const LlamaModel& model, const std::vector<int32_t>& ids,
                             const Policy& policy, int layer) {
  const kvpack::ModelShape shape = model.config().shape();
  kvpack::KVCache<Policy> cache(shape, policy);
  KvCacheAdapter<decltype(cache)> adapter(cache);
  QueryRecorder recorder(adapter, layer);
  const int64_t row = static_cast<int64_t>(shape.q_heads) * shape.head_dim;
  recorder.set_row(row);
  model.forward_all(recorder, ids, 0);
  cache.compress();
  REQUIRE(cache.low_rank_factors(layer, 0).factored > 0);
  const int64_t n = static_cast<int64_t>(ids.size());
  std::vector<float> q;
  std::vector<int64_t> positions;
  for (int64_t t : {int64_t{40}, n - 8, n - 7, n - 6, n - 5, n - 4, n - 3, n - 2, n - 1}) {
    q.insert(q.end(), recorder.q().begin() + t * row, recorder.q().begin() + (t + 1) * row);
    positions.push_back(recorder.positions()[t]);
  }
  const int64_t tokens = static_cast<int64_t>(positions.size());
  const auto qv = kvpack::ActivationView::nhd(q.data(), tokens, shape.q_heads, shape.head_dim);
  std::vector<float> cpu_out(q.size()), kernel_out(q.size());
  cache.attend(layer, qv, positions,
               kvpack::OutputView::nhd(cpu_out.data(), tokens, shape.q_heads, shape.head_dim));
  kvpack::test::LowRankKernelAttention<decltype(cache)>(cache, 3).attend(
      layer, qv, positions,
      kvpack::OutputView::nhd(kernel_out.data(), tokens, shape.q_heads, shape.head_dim));
  double num = 0, den = 0;
  for (std::size_t i = 0; i < q.size(); ++i) {
    num += (static_cast<double>(kernel_out[i]) - cpu_out[i]) *
           (static_cast<double>(kernel_out[i]) - cpu_out[i]);
    den += static_cast<double>(cpu_out[i]) * cpu_out[i];
  }
  return std::sqrt(num / den);
}

}  // namespace

TEST_CASE("model: the CUDA low-rank attention kernel on real factors matches the CPU's attend",
          "[model][real-model][cuda]") {
  const LlamaModel* model = kvpack::test::reference_model();
  if (!model || !kvpack::test::reference_tokenizer()) return;
  const std::vector<int32_t> ids = prose_ids(160);
  using kvpack::Quantize;
  for (int layer : {3, 20}) {
    INFO("layer " << layer);
    // xKV at 4x over groups of 4 layers, fp16 and 4-bit bases (the demo's shapes, prefill only).
    CHECK(low_rank_kernel_error(*model, ids, kvpack::CrossLayerSVD::with_ratio(4, 4.0), layer) <
          1e-5);
    CHECK(low_rank_kernel_error(*model, ids,
                                kvpack::Compose<kvpack::CrossLayerSVD, Quantize>(
                                    kvpack::CrossLayerSVD(4, 32, 48), Quantize(4, 32, 0)),
                                layer) < 1e-5);
  }
}

TEST_CASE("model: the CUDA low-rank factorisation of an xKV group's real K/V is optimal",
          "[model][real-model][cuda]") {
  const LlamaModel* model = kvpack::test::reference_model();
  if (!model || !kvpack::test::reference_tokenizer()) return;
  const std::vector<int32_t> ids = prose_ids(160);
  const kvpack::ModelShape shape = model->config().shape();
  kvpack::KVCache<kvpack::IdentityF32> cache(shape);
  KvCacheAdapter<decltype(cache)> adapter(cache);
  model->forward_all(adapter, ids, 0);
  // Layers 4-7 side by side, as CrossLayerSVD stacks a group: tokens x 4 * kv_heads * head_dim.
  const int rows = static_cast<int>(ids.size()), d = shape.head_dim;
  const int cols = 4 * shape.kv_heads * d;
  for (bool keys : {true, false}) {
    std::vector<float> x(static_cast<std::size_t>(rows) * cols);
    for (int l = 0; l < 4; ++l) {
      const kvpack::DenseLayer held = cache.materialize(4 + l);
      for (int h = 0; h < shape.kv_heads; ++h) {
        const std::vector<float>& rows_of = keys ? held.heads[h].k : held.heads[h].v;
        for (int t = 0; t < rows; ++t) {
          std::copy(
              rows_of.begin() + static_cast<std::ptrdiff_t>(t) * d,
              rows_of.begin() + static_cast<std::ptrdiff_t>(t + 1) * d,
              x.begin() + static_cast<std::ptrdiff_t>(t) * cols + (l * shape.kv_heads + h) * d);
        }
      }
    }
    INFO((keys ? "keys" : "values"));
    for (int rank : {16, 64})
      kvpack::test::require_gram_factorize_optimal(x, rows, cols, rank, 1e-6);
  }
}
