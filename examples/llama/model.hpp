#pragma once
// Llama forward pass on Eigen for the reference model (SmolLM2-135M-Instruct). Weights are
// dequantized to fp32 at load; activations are row-major (tokens × features); K/V go through an
// AttentionCache so that any kvpack cache can stand in for the model's own.

#include <Eigen/Core>
#include <cstdint>
#include <kvpack/shape.hpp>
#include <string>
#include <vector>

#include "attention_cache.hpp"
#include "gguf.hpp"

namespace kvpack::llama {

using RowMatrix = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

/// Hyper-parameters from the llama.* metadata.
struct LlamaConfig {
  int layers = 0;
  int hidden = 0;
  int ffn = 0;
  int q_heads = 0;
  int kv_heads = 0;
  int head_dim = 0;
  int vocab = 0;
  int64_t context_length = 0;
  double rope_theta = 10000.0;
  RopeConfig rope{};  ///< theta and frequency scaling from the GGUF metadata
  float rms_eps = 1e-5f;

  /// Reads and checks llama.*; throws GgufError naming the key that is missing or inconsistent.
  static LlamaConfig from_gguf(const GgufFile& file);
  /// The kvpack shape of this model (interleaved-pair RoPE, as GGUF llama weights expect).
  ModelShape shape() const;
};

/// fp32 weights of one transformer block. Matrices are out × in, row-major (as stored in GGUF),
/// Q/K/V and gate/up are concatenated so that each pair/triple is one GEMM.
struct LlamaLayerWeights {
  Eigen::VectorXf attn_norm;
  RowMatrix qkv;  // (q_heads + 2 kv_heads) · head_dim × hidden
  RowMatrix attn_output;
  Eigen::VectorXf ffn_norm;
  RowMatrix gate_up;  // 2 ffn × hidden: gate rows then up rows
  RowMatrix ffn_down;
};

/// Which logits forward() returns.
enum class Logits {
  kNone,  ///< none (prefill whose logits are not needed)
  kLast,  ///< only the last token's row
  kAll,   ///< one row per input token (teacher forcing, perplexity)
};

class LlamaModel {
 public:
  /// Loads and dequantizes a llama GGUF file (F32, F16, Q4_0, Q4_1, Q8_0 tensors).
  static LlamaModel load(const std::string& path);
  static LlamaModel from_gguf(const GgufFile& file);

  const LlamaConfig& config() const { return config_; }
  /// The fp32 weights of block `layer` (e.g. attn_output for KVzip+'s OutputFactors).
  const LlamaLayerWeights& layer_weights(int layer) const { return layers_.at(layer); }

  /// Runs `n` tokens at positions start_pos, start_pos + 1, ... through the model, in chunks of
  /// at most chunk_size() tokens; each layer appends its K/V to `cache` and attends through it.
  /// Returns the requested logits (rows × vocab; 0 rows for Logits::kNone).
  RowMatrix forward(AttentionCache& cache, const int32_t* tokens, int64_t n, int64_t start_pos,
                    Logits logits) const;
  RowMatrix forward(AttentionCache& cache, const std::vector<int32_t>& tokens, int64_t start_pos,
                    Logits logits) const {
    return forward(cache, tokens.data(), static_cast<int64_t>(tokens.size()), start_pos, logits);
  }
  /// Logits of the last token only (the cheap call for generation).
  Eigen::VectorXf forward_last(AttentionCache& cache, const std::vector<int32_t>& tokens,
                               int64_t start_pos) const;
  /// Logits of every token (row i predicts token i + 1).
  RowMatrix forward_all(AttentionCache& cache, const std::vector<int32_t>& tokens,
                        int64_t start_pos) const {
    return forward(cache, tokens, start_pos, Logits::kAll);
  }

  /// Tokens per prefill chunk (default 256): bounds activation memory and the attention block.
  int64_t chunk_size() const { return chunk_size_; }
  void set_chunk_size(int64_t n);

  /// A DenseAttentionCache shaped for this model.
  DenseAttentionCache make_dense_cache() const;

 private:
  LlamaModel() = default;
  void forward_chunk(AttentionCache& cache, const int32_t* tokens, int64_t n, int64_t start_pos,
                     Logits logits, RowMatrix& out, int64_t out_row) const;

  LlamaConfig config_;
  RowMatrix token_embd_;  // vocab × hidden; also the output head when output.weight is absent
  RowMatrix output_;      // vocab × hidden, empty when tied
  Eigen::VectorXf output_norm_;
  std::vector<LlamaLayerWeights> layers_;
  std::vector<double> inv_freq_;  // kvpack::Rope's frequencies (theta^(-2i/d) unscaled)
  double rope_scale_ = 1.0;       // YaRN's attention factor, 1 otherwise
  int64_t chunk_size_ = 256;
};

}  // namespace kvpack::llama
