#include "model.hpp"

#include <algorithm>
#include <cmath>
#include <kvpack/error.hpp>
#include <kvpack/rope.hpp>
#include <stdexcept>
#include <string>

#include "dequant.hpp"

namespace kvpack::llama {
namespace {

int checked_int(const GgufFile& file, const std::string& key, int64_t min_value,
                int64_t max_value) {
  const int64_t v = file.get_int(key);
  if (v < min_value || v > max_value) {
    throw GgufError(key + " = " + std::to_string(v) + ", expected a value in [" +
                    std::to_string(min_value) + ", " + std::to_string(max_value) + "]");
  }
  return static_cast<int>(v);
}

// Dequantizes a GGUF tensor of shape [cols, rows] (row length first) into `dst` rows
// [row0, row0 + rows).
void load_rows(const GgufFile& file, const std::string& name, int64_t rows, int64_t cols,
               RowMatrix& dst, int64_t row0) {
  const TensorInfo& t = file.tensor(name);
  if (t.dims.size() != 2 || t.dims[0] != cols || t.dims[1] != rows) {
    std::string got;
    for (int64_t d : t.dims) got += (got.empty() ? "" : ", ") + std::to_string(d);
    throw GgufError("tensor '" + name + "' has dims [" + got + "], expected [" +
                    std::to_string(cols) + ", " + std::to_string(rows) + "]");
  }
  if (!can_dequantize(t.type)) {
    throw GgufError("tensor '" + name + "' has type " +
                    tensor_type_traits(static_cast<uint32_t>(t.type)).name +
                    ", which the loader cannot dequantize");
  }
  const TensorTypeTraits traits = tensor_type_traits(static_cast<uint32_t>(t.type));
  const int64_t row_bytes = cols / traits.block_size * traits.block_bytes;
  const uint8_t* data = file.tensor_data(t);
#if defined(_OPENMP)
#pragma omp parallel for schedule(static)
#endif
  for (int64_t r = 0; r < rows; ++r) {
    dequantize_row(t.type, data + r * row_bytes, dst.row(row0 + r).data(), cols);
  }
}

RowMatrix load_matrix(const GgufFile& file, const std::string& name, int64_t rows, int64_t cols) {
  RowMatrix m(rows, cols);
  load_rows(file, name, rows, cols, m, 0);
  return m;
}

Eigen::VectorXf load_vector(const GgufFile& file, const std::string& name, int64_t n) {
  const TensorInfo& t = file.tensor(name);
  if (t.dims.size() != 1 || t.dims[0] != n) {
    throw GgufError("tensor '" + name + "' is not a vector of " + std::to_string(n));
  }
  if (!can_dequantize(t.type)) throw GgufError("tensor '" + name + "' has an unsupported type");
  Eigen::VectorXf v(n);
  dequantize_row(t.type, file.tensor_data(t), v.data(), n);
  return v;
}

// y = x · wᵀ. Few rows (decode) split the output features over threads, since Eigen does not
// parallelise matrix-vector products; many rows use Eigen's (threaded) GEMM.
void linear(const RowMatrix& x, const RowMatrix& w, RowMatrix& y) {
  y.resize(x.rows(), w.rows());
  if (x.rows() > 4) {
    y.noalias() = x * w.transpose();
    return;
  }
  constexpr int64_t kBlock = 256;
  const int64_t blocks = (w.rows() + kBlock - 1) / kBlock;
#if defined(_OPENMP)
#pragma omp parallel for schedule(static)
#endif
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t r0 = b * kBlock;
    const int64_t rn = std::min(kBlock, w.rows() - r0);
    y.middleCols(r0, rn).noalias() = x * w.middleRows(r0, rn).transpose();
  }
}

void rms_norm(const RowMatrix& x, const Eigen::VectorXf& weight, float eps, RowMatrix& y) {
  y.resize(x.rows(), x.cols());
  for (int64_t t = 0; t < x.rows(); ++t) {
    const float mean_square = x.row(t).squaredNorm() / static_cast<float>(x.cols());
    const float inv = 1.0f / std::sqrt(mean_square + eps);
    y.row(t) = (x.row(t).array() * inv) * weight.transpose().array();
  }
}

}  // namespace

LlamaConfig LlamaConfig::from_gguf(const GgufFile& file) {
  const std::string& arch = file.get_string("general.architecture");
  if (arch != "llama") {
    throw GgufError("general.architecture is '" + arch + "', expected 'llama'");
  }
  LlamaConfig c;
  c.layers = checked_int(file, "llama.block_count", 1, 1024);
  c.hidden = checked_int(file, "llama.embedding_length", 1, 1 << 16);
  c.ffn = checked_int(file, "llama.feed_forward_length", 1, 1 << 18);
  c.q_heads = checked_int(file, "llama.attention.head_count", 1, 1024);
  c.kv_heads = file.has("llama.attention.head_count_kv")
                   ? checked_int(file, "llama.attention.head_count_kv", 1, c.q_heads)
                   : c.q_heads;
  if (c.q_heads % c.kv_heads != 0) {
    throw GgufError("llama.attention.head_count " + std::to_string(c.q_heads) +
                    " is not a multiple of head_count_kv " + std::to_string(c.kv_heads));
  }
  if (c.hidden % c.q_heads != 0) {
    throw GgufError("llama.embedding_length " + std::to_string(c.hidden) +
                    " is not a multiple of the head count " + std::to_string(c.q_heads));
  }
  c.head_dim = c.hidden / c.q_heads;
  if (c.head_dim % 2 != 0) throw GgufError("head_dim " + std::to_string(c.head_dim) + " is odd");
  if (file.has("llama.rope.dimension_count") &&
      file.get_int("llama.rope.dimension_count") != c.head_dim) {
    throw GgufError("llama.rope.dimension_count " +
                    std::to_string(file.get_int("llama.rope.dimension_count")) +
                    " differs from head_dim " + std::to_string(c.head_dim) +
                    " (partial rotary embeddings are not supported)");
  }
  c.context_length = file.has("llama.context_length")
                         ? checked_int(file, "llama.context_length", 1, INT32_MAX)
                         : 2048;
  c.rope_theta = file.has("llama.rope.freq_base") ? file.get_float("llama.rope.freq_base") : 1e4;
  if (!(c.rope_theta > 1.0) || !std::isfinite(c.rope_theta)) {
    throw GgufError("llama.rope.freq_base " + std::to_string(c.rope_theta) + " is not > 1");
  }
  // Frequency scaling as llama.cpp writes it (linear, yarn). Llama 3.1's scaling comes as a
  // rope_freqs tensor of per-frequency factors, which this example does not read.
  c.rope = RopeConfig{RopeStyle::kInterleaved, c.rope_theta};
  if (file.has("llama.rope.scaling.type")) {
    const std::string& type = file.get_string("llama.rope.scaling.type");
    if (type == "linear" || type == "yarn") {
      c.rope.scaling = type == "linear" ? RopeScaling::kLinear : RopeScaling::kYarn;
      c.rope.factor = file.get_float("llama.rope.scaling.factor");
      if (file.has("llama.rope.scaling.original_context_length")) {
        c.rope.original_context = file.get_int("llama.rope.scaling.original_context_length");
      }
      if (file.has("llama.rope.scaling.attn_factor")) {
        c.rope.attention_factor = file.get_float("llama.rope.scaling.attn_factor");
      }
    } else if (type != "none") {
      throw GgufError("llama.rope.scaling.type '" + type +
                      "' is not supported (none, linear, yarn)");
    }
  }
  if (file.find_tensor("rope_freqs.weight") != nullptr) {
    throw GgufError("rope_freqs.weight (llama3-style frequency factors) is not supported");
  }
  try {
    c.rope.validate(c.head_dim);
  } catch (const kvpack::error& e) {
    throw GgufError(std::string("rope scaling metadata: ") + e.what());
  }
  c.rms_eps = static_cast<float>(file.get_float("llama.attention.layer_norm_rms_epsilon"));
  if (!(c.rms_eps > 0.0f) || !std::isfinite(c.rms_eps)) {
    throw GgufError("llama.attention.layer_norm_rms_epsilon is not a positive number");
  }
  const TensorInfo& embd = file.tensor("token_embd.weight");
  if (embd.dims.size() != 2 || embd.dims[0] != c.hidden) {
    throw GgufError("token_embd.weight is not [embedding_length, vocab]");
  }
  c.vocab = static_cast<int>(std::min<int64_t>(embd.dims[1], INT32_MAX));
  if (file.has("llama.vocab_size") && file.get_int("llama.vocab_size") != c.vocab) {
    throw GgufError("llama.vocab_size " + std::to_string(file.get_int("llama.vocab_size")) +
                    " differs from token_embd.weight's " + std::to_string(c.vocab) + " rows");
  }
  return c;
}

ModelShape LlamaConfig::shape() const {
  ModelShape s;
  s.layers = layers;
  s.q_heads = q_heads;
  s.kv_heads = kv_heads;
  s.head_dim = head_dim;
  s.rope = rope;
  return s;
}

LlamaModel LlamaModel::load(const std::string& path) { return from_gguf(GgufFile::open(path)); }

LlamaModel LlamaModel::from_gguf(const GgufFile& file) {
  LlamaModel m;
  m.config_ = LlamaConfig::from_gguf(file);
  const LlamaConfig& c = m.config_;
  const int64_t q_dim = static_cast<int64_t>(c.q_heads) * c.head_dim;
  const int64_t kv_dim = static_cast<int64_t>(c.kv_heads) * c.head_dim;

  m.token_embd_ = load_matrix(file, "token_embd.weight", c.vocab, c.hidden);
  if (file.find_tensor("output.weight")) {
    m.output_ = load_matrix(file, "output.weight", c.vocab, c.hidden);
  }
  m.output_norm_ = load_vector(file, "output_norm.weight", c.hidden);
  m.layers_.resize(c.layers);
  for (int l = 0; l < c.layers; ++l) {
    const std::string p = "blk." + std::to_string(l) + ".";
    LlamaLayerWeights& w = m.layers_[l];
    w.attn_norm = load_vector(file, p + "attn_norm.weight", c.hidden);
    // GGUF stores attn_q / attn_k rows permuted for interleaved-pair RoPE; used as they are.
    w.qkv.resize(q_dim + 2 * kv_dim, c.hidden);
    load_rows(file, p + "attn_q.weight", q_dim, c.hidden, w.qkv, 0);
    load_rows(file, p + "attn_k.weight", kv_dim, c.hidden, w.qkv, q_dim);
    load_rows(file, p + "attn_v.weight", kv_dim, c.hidden, w.qkv, q_dim + kv_dim);
    w.attn_output = load_matrix(file, p + "attn_output.weight", c.hidden, q_dim);
    w.ffn_norm = load_vector(file, p + "ffn_norm.weight", c.hidden);
    w.gate_up.resize(2 * static_cast<int64_t>(c.ffn), c.hidden);
    load_rows(file, p + "ffn_gate.weight", c.ffn, c.hidden, w.gate_up, 0);
    load_rows(file, p + "ffn_up.weight", c.ffn, c.hidden, w.gate_up, c.ffn);
    w.ffn_down = load_matrix(file, p + "ffn_down.weight", c.hidden, c.ffn);
  }
  const kvpack::Rope rope(c.rope, c.head_dim);  // the frequencies the cache un-rotates with
  m.inv_freq_ = rope.inv_freq();
  m.rope_scale_ = rope.attention_factor();
  return m;
}

void LlamaModel::set_chunk_size(int64_t n) {
  if (n < 1) throw std::invalid_argument("LlamaModel::set_chunk_size: chunk size must be >= 1");
  chunk_size_ = n;
}

DenseAttentionCache LlamaModel::make_dense_cache() const {
  return DenseAttentionCache(config_.layers, config_.q_heads, config_.kv_heads, config_.head_dim);
}

RowMatrix LlamaModel::forward(AttentionCache& cache, const int32_t* tokens, int64_t n,
                              int64_t start_pos, Logits logits) const {
  if (n < 1) throw std::invalid_argument("LlamaModel::forward: no tokens");
  if (start_pos < 0) {
    throw std::invalid_argument("LlamaModel::forward: start_pos " + std::to_string(start_pos) +
                                " is negative");
  }
  for (int64_t i = 0; i < n; ++i) {
    if (tokens[i] < 0 || tokens[i] >= config_.vocab) {
      throw std::invalid_argument("LlamaModel::forward: token " + std::to_string(tokens[i]) +
                                  " at index " + std::to_string(i) + " is outside [0, " +
                                  std::to_string(config_.vocab) + ")");
    }
  }
  const int64_t rows = logits == Logits::kAll ? n : logits == Logits::kLast ? 1 : 0;
  RowMatrix out(rows, logits == Logits::kNone ? 0 : config_.vocab);
  for (int64_t begin = 0; begin < n; begin += chunk_size_) {
    const int64_t len = std::min(chunk_size_, n - begin);
    const bool last_chunk = begin + len == n;
    Logits chunk_logits = Logits::kNone;
    if (logits == Logits::kAll) chunk_logits = Logits::kAll;
    if (logits == Logits::kLast && last_chunk) chunk_logits = Logits::kLast;
    forward_chunk(cache, tokens + begin, len, start_pos + begin, chunk_logits, out,
                  logits == Logits::kAll ? begin : 0);
  }
  return out;
}

Eigen::VectorXf LlamaModel::forward_last(AttentionCache& cache, const std::vector<int32_t>& tokens,
                                         int64_t start_pos) const {
  RowMatrix out = forward(cache, tokens, start_pos, Logits::kLast);
  return out.row(0).transpose();
}

void LlamaModel::forward_chunk(AttentionCache& cache, const int32_t* tokens, int64_t n,
                               int64_t start_pos, Logits logits, RowMatrix& out,
                               int64_t out_row) const {
  const LlamaConfig& c = config_;
  const int d = c.head_dim;
  const int64_t q_dim = static_cast<int64_t>(c.q_heads) * d;
  const int64_t kv_dim = static_cast<int64_t>(c.kv_heads) * d;

  std::vector<int64_t> positions(n);
  for (int64_t t = 0; t < n; ++t) positions[t] = start_pos + t;
  // cos/sin per (token, frequency), formed in double so that long positions stay exact.
  const int half = d / 2;
  std::vector<float> cos_table(n * half), sin_table(n * half);
  for (int64_t t = 0; t < n; ++t) {
    for (int i = 0; i < half; ++i) {
      const double angle = static_cast<double>(positions[t]) * inv_freq_[i];
      cos_table[t * half + i] = static_cast<float>(rope_scale_ * std::cos(angle));
      sin_table[t * half + i] = static_cast<float>(rope_scale_ * std::sin(angle));
    }
  }
  // Rotates pairs (x[2i], x[2i+1]) of every head of a token row by pos · theta^(-2i/d).
  auto rope = [&](float* row, int heads, int64_t t) {
    const float* cs = cos_table.data() + t * half;
    const float* sn = sin_table.data() + t * half;
    for (int h = 0; h < heads; ++h) {
      float* x = row + static_cast<int64_t>(h) * d;
      for (int i = 0; i < half; ++i) {
        const float a = x[2 * i], b = x[2 * i + 1];
        x[2 * i] = a * cs[i] - b * sn[i];
        x[2 * i + 1] = a * sn[i] + b * cs[i];
      }
    }
  };

  RowMatrix x(n, c.hidden);
  for (int64_t t = 0; t < n; ++t) x.row(t) = token_embd_.row(tokens[t]);

  std::vector<float> inv_norm(n);  // 1 / ‖attention input‖ per token (KVzip+'s query weights)
  RowMatrix h, qkv, q(n, q_dim), k(n, kv_dim), v(n, kv_dim), attn(n, q_dim), proj, gate_up, act;
  for (int l = 0; l < c.layers; ++l) {
    const LlamaLayerWeights& w = layers_[l];
    rms_norm(x, w.attn_norm, c.rms_eps, h);
    for (int64_t t = 0; t < n; ++t) inv_norm[t] = 1.0f / h.row(t).norm();
    linear(h, w.qkv, qkv);
    for (int64_t t = 0; t < n; ++t) {
      q.row(t) = qkv.row(t).segment(0, q_dim);
      k.row(t) = qkv.row(t).segment(q_dim, kv_dim);
      v.row(t) = qkv.row(t).segment(q_dim + kv_dim, kv_dim);
      rope(q.row(t).data(), c.q_heads, t);
      rope(k.row(t).data(), c.kv_heads, t);
    }
    cache.append(l, k.data(), v.data(), positions.data(), n);
    cache.observe_hidden(l, h.data(), positions.data(), n, c.hidden);
    cache.attend_observe(l, q.data(), positions.data(), n, attn.data(), inv_norm.data());
    linear(attn, w.attn_output, proj);
    x += proj;

    rms_norm(x, w.ffn_norm, c.rms_eps, h);
    linear(h, w.gate_up, gate_up);
    act.resize(n, c.ffn);
    for (int64_t t = 0; t < n; ++t) {
      const auto g = gate_up.row(t).segment(0, c.ffn).array();
      const auto u = gate_up.row(t).segment(c.ffn, c.ffn).array();
      act.row(t) = (g / (1.0f + (-g).exp())) * u;  // SiLU(gate) · up
    }
    linear(act, w.ffn_down, proj);
    x += proj;
  }

  if (logits == Logits::kNone) return;
  const RowMatrix& head = output_.size() > 0 ? output_ : token_embd_;
  RowMatrix final_rows = logits == Logits::kLast ? RowMatrix(x.bottomRows(1)) : x;
  rms_norm(final_rows, output_norm_, c.rms_eps, h);
  RowMatrix chunk_logits;
  linear(h, head, chunk_logits);
  out.middleRows(out_row, chunk_logits.rows()) = chunk_logits;
}

}  // namespace kvpack::llama
