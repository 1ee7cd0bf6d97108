/// \file policy/channel_shrink.hpp
/// \brief ChannelShrink (CSKV, arXiv 2409.10593): per-layer low-rank channel projections of
/// pre-RoPE keys and of values, calibrated offline, with an exact residual of recent tokens.
#pragma once

#include <Eigen/Core>
#include <Eigen/Eigenvalues>
#include <algorithm>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "../config.hpp"
#include "../detail/checked_file.hpp"
#include "../error.hpp"
#include "../linalg/matrix.hpp"
#include "policy_base.hpp"

namespace kvpack {

/// \brief Per-layer projections P_k (channels × r_k) and P_v (channels × r_v) with orthonormal
/// columns, channels = kv_heads · head_dim. K ≈ (K P_k) P_kᵀ minimises the layer-wise
/// reconstruction error over the calibration data (PCA without centring).
///
/// File format (little-endian): "KVPKPROJ", u32 version (1), u32 layers, u32 kv_heads,
/// u32 head_dim, then per layer u32 r_k, u32 r_v, f32 P_k (channels × r_k, row-major),
/// f32 P_v; then a u64 FNV-1a checksum of every preceding byte.
struct ChannelProjections {
  int layers = 0, kv_heads = 0, head_dim = 0;
  std::vector<int> rank_k, rank_v;
  std::vector<std::vector<float>> pk, pv;

  int channels() const { return kv_heads * head_dim; }

  /// PCA of calibration rows: `keys[l]` and `values[l]` are row-major tokens × channels
  /// (pre-RoPE keys). Ranks per layer (the same for every layer here).
  /// (A template only so that the eigensolver is instantiated where calibration is called.)
  template <int = 0>
  static ChannelProjections calibrate(const std::vector<std::vector<float>>& keys,
                                      const std::vector<std::vector<float>>& values, int kv_heads,
                                      int head_dim, int rk, int rv) {
    ChannelProjections p;
    p.layers = static_cast<int>(keys.size());
    p.kv_heads = kv_heads;
    p.head_dim = head_dim;
    const int c = kv_heads * head_dim;
    detail::require(!keys.empty() && keys.size() == values.size(), "ChannelProjections::calibrate",
                    "layers", keys.size(), "the same non-zero count of key and value samples");
    detail::require(rk >= 1 && rk <= c, "ChannelProjections::calibrate", "rank_k", rk,
                    detail::concat("in [1, ", c, "]"));
    detail::require(rv >= 1 && rv <= c, "ChannelProjections::calibrate", "rank_v", rv,
                    detail::concat("in [1, ", c, "]"));
    for (int l = 0; l < p.layers; ++l) {
      p.rank_k.push_back(rk);
      p.rank_v.push_back(rv);
      p.pk.push_back(principal_directions(keys[l], c, rk));
      p.pv.push_back(principal_directions(values[l], c, rv));
    }
    return p;
  }

  void save(const std::string& path) const {
    detail::CheckedFileWriter out("KVPKPROJ");
    out.put_u32(kVersion);
    out.put_u32(layers);
    out.put_u32(kv_heads);
    out.put_u32(head_dim);
    for (int l = 0; l < layers; ++l) {
      out.put_u32(rank_k[l]);
      out.put_u32(rank_v[l]);
      out.put_floats(pk[l]);
      out.put_floats(pv[l]);
    }
    out.write(path, "ChannelProjections::save");
  }

  /// Reads a file written by save(); a truncated, corrupted or foreign file is an error.
  static ChannelProjections load(const std::string& path) {
    detail::CheckedFileReader in(path, "KVPKPROJ", "ChannelProjections::load", "projection");
    in.expect_version(kVersion);
    ChannelProjections p;
    p.layers = static_cast<int>(in.get_u32());
    p.kv_heads = static_cast<int>(in.get_u32());
    p.head_dim = static_cast<int>(in.get_u32());
    if (p.layers <= 0 || p.layers > 4096 || p.kv_heads <= 0 || p.head_dim <= 0 ||
        static_cast<int64_t>(p.kv_heads) * p.head_dim > (1 << 20)) {
      throw error(in.where() + ": implausible shape in header");
    }
    const std::size_t c = static_cast<std::size_t>(p.channels());
    auto get_matrix = [&](uint32_t rank) {
      if (rank == 0 || rank > c) {
        throw error(detail::concat(in.where(), ": rank ", rank, " out of range"));
      }
      return in.get_floats(c * rank, detail::concat("a rank-", rank, " projection"));
    };
    for (int l = 0; l < p.layers; ++l) {
      const uint32_t rk = in.get_u32(), rv = in.get_u32();
      p.rank_k.push_back(static_cast<int>(rk));
      p.rank_v.push_back(static_cast<int>(rv));
      p.pk.push_back(get_matrix(rk));
      p.pv.push_back(get_matrix(rv));
    }
    in.finish();
    return p;
  }

 private:
  static constexpr uint32_t kVersion = 1;

  /// Top-r eigenvectors of XᵀX (in double), as a channels × r row-major matrix.
  template <int = 0>
  static std::vector<float> principal_directions(const std::vector<float>& x, int c, int r) {
    detail::require(!x.empty() && x.size() % c == 0, "ChannelProjections::calibrate", "samples",
                    x.size(), detail::concat("a non-empty multiple of ", c));
    using RowMat = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
    const Eigen::Map<const RowMat> m(x.data(), static_cast<Eigen::Index>(x.size() / c), c);
    const Eigen::MatrixXd gram = (m.transpose() * m).cast<double>();
    Eigen::SelfAdjointEigenSolver<Eigen::MatrixXd> eig(gram);
    std::vector<float> p(static_cast<std::size_t>(c) * r);
    for (int j = 0; j < r; ++j) {  // eigenvalues ascend: take the last r, largest first
      const auto v = eig.eigenvectors().col(c - 1 - j);
      for (int i = 0; i < c; ++i) p[static_cast<std::size_t>(i) * r + j] = static_cast<float>(v(i));
    }
    return p;
  }
};

/// \brief CSKV's bi-branch cache: the newest `residual` tokens exact (CSKV's "window"; the same
/// idea as KIVI's fp16 residual, hence one name), older ones as latents
/// z = K_pre P_k (r_k per token, fp16) and z_v = V P_v; keys are rebuilt as z P_kᵀ and
/// re-rotated tile by tile inside attention. Knobs (paper): window (residual) 32; keys compressed
/// harder than values (choose r_k < r_v at calibration).
struct ChannelShrink : LowRankPolicy {
  static constexpr const char* name = "ChannelShrink";
  int64_t residual = 32;
  std::shared_ptr<const ChannelProjections> projections;

  ChannelShrink() = default;
  explicit ChannelShrink(std::shared_ptr<const ChannelProjections> p, int64_t r = 32)
      : residual(r), projections(std::move(p)) {}

  /// Low-rank hook (LowRankPolicy): per layer and side, one job over the tokens older than the
  /// exact residual (tokens factored by an earlier compress() stay factored even if `residual`
  /// grew since), at the calibrated ranks.
  std::vector<LowRankJob> plan(const ModelShape& shape, const std::vector<LowRankLayer>& held,
                               double /*basis_bytes*/, const char* /*where*/) const {
    std::vector<LowRankJob> jobs;
    for (int l = 0; l < shape.layers; ++l) {
      const int64_t tokens = std::max(held[l].tokens - residual, held[l].factored);
      if (tokens <= 0) continue;
      jobs.push_back({l, l + 1, true, projections->rank_k[l], tokens});
      jobs.push_back({l, l + 1, false, projections->rank_v[l], tokens});
    }
    return jobs;
  }

  /// Low-rank hook: latents A = X P (shared by the layer's heads), Bt = P (a head's factor B is
  /// P[its channels]ᵀ).
  void factor(const LowRankJob& job, const RowMajorMatrixXf& x, RowMajorMatrixXf& a,
              Eigen::MatrixXf& bt) const {
    const Eigen::Map<const RowMajorMatrixXf> p(projection(job), x.cols(), job.rank);
    a = x * p;
    bt = p;
  }

  /// factor() is X times a calibrated projection (for backends that factor on their device).
  static constexpr LowRankFactorization factorization = LowRankFactorization::kProjection;
  /// P of a job's layer and side: channels × rank, row-major (kv_heads · head_dim channels).
  const float* projection(const LowRankJob& job) const {
    return (job.keys ? projections->pk : projections->pv)[job.l0].data();
  }

  void validate(const ModelShape& shape) const {
    constexpr const char* where = "ChannelShrink";
    detail::require(residual >= 0, where, "residual", residual, ">= 0");
    detail::require(projections != nullptr, where, "projections", "null",
                    "calibrated projections (ChannelProjections::calibrate or ::load)");
    detail::require(
        projections->layers == shape.layers && projections->kv_heads == shape.kv_heads &&
            projections->head_dim == shape.head_dim,
        where, "projections shape",
        detail::concat(projections->layers, "x", projections->kv_heads, "x", projections->head_dim),
        detail::concat(shape.layers, "x", shape.kv_heads, "x", shape.head_dim,
                       " (layers x kv_heads x head_dim of the model)"));
    // Projections built by hand (not by calibrate or load) may be inconsistent; compress()
    // reads channels × rank floats per layer and side.
    const ChannelProjections& p = *projections;
    const std::size_t layers = static_cast<std::size_t>(p.layers);
    detail::require(
        p.rank_k.size() == layers && p.rank_v.size() == layers && p.pk.size() == layers &&
            p.pv.size() == layers,
        where, "projections rank_k/rank_v/pk/pv sizes",
        detail::concat(p.rank_k.size(), "/", p.rank_v.size(), "/", p.pk.size(), "/", p.pv.size()),
        detail::concat(p.layers, " (one per layer) each"));
    const int c = p.channels();
    for (int l = 0; l < p.layers; ++l) {
      for (bool keys : {true, false}) {
        const int rank = keys ? p.rank_k[l] : p.rank_v[l];
        const std::size_t size = (keys ? p.pk : p.pv)[l].size();
        detail::require(
            rank >= 1 && rank <= c, where, keys ? "projections rank_k" : "projections rank_v",
            detail::concat(rank, " (layer ", l, ")"), detail::concat("in [1, ", c, "]"));
        detail::require(size == static_cast<std::size_t>(c) * rank, where,
                        keys ? "projections pk size" : "projections pv size",
                        detail::concat(size, " (layer ", l, ")"),
                        detail::concat(c, " channels x rank ", rank));
      }
    }
  }
};

}  // namespace kvpack
