/// \file backend/cpu/cache_factorize.hpp
/// \brief Out-of-line members of KVCache<Policy, backend::Cpu>: low-rank factoring (xKV's SVD of
/// stacked layers, CSKV's projections) into shared bases and per-head factors.
#pragma once

#include <algorithm>
#include <exception>
#include <memory>
#include <tuple>
#include <utility>
#include <vector>

#include "../../linalg/truncated_svd.hpp"
#include "cache.hpp"

namespace kvpack {

template <class Policy>
std::vector<float> KVCache<Policy, backend::Cpu>::pre_rope_rows(int layer, int head, int64_t tokens,
                                                                bool keys) const {
  // The first `tokens` rows of one head in fp32; keys pre-RoPE (factored rows are held pre-RoPE,
  // exact rows are un-rotated: an exact inverse up to fp32 rounding).
  const int d = shape_.head_dim;
  const auto rows_of = store(layer, head).rows(d);
  std::vector<float> rows(static_cast<std::size_t>(tokens) * d);
  if (keys) {
    rows_of.load_pre_rope_keys(0, tokens, rows.data());
  } else {
    rows_of.load_values(0, tokens, rows.data());
  }
  return rows;
}

template <class Policy>
void KVCache<Policy, backend::Cpu>::factorize() {
  using RowMat = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  constexpr const char* where = "KVCache::compress";
  const int d = shape_.head_dim, heads = shape_.kv_heads;
  // One job per (layers [l0, l1), side): its stacked pre-RoPE matrix becomes a shared basis and
  // one factor per (layer, head). Every job runs before anything held changes, so a refused rank,
  // heads holding different tokens or a failure inside the SVD leave the cache as it was.
  struct Job {
    int l0, l1;
    bool keys;
    int rank;
    int64_t tokens;
    std::vector<detail::LowRankFactor> factors;  // (layer − l0) · heads + head
  };
  std::vector<Job> jobs;
  auto require_same_tokens = [&](int l0, int l1, const char* what) {
    const auto& ref = store(l0, 0).positions;
    for (int l = l0; l < l1; ++l) {
      for (int h = 0; h < heads; ++h) {
        if (store(l, h).positions != ref) {
          throw error(detail::concat(where, ": ", what, " needs every head",
                                     l1 - l0 > 1 ? " and layer" : "",
                                     " it factors together to hold the same tokens; layer ", l,
                                     " head ", h, " differs from layer ", l0, " head 0"));
        }
      }
    }
  };
  // Compose<…, Quantize>: the bases are quantized, and ranks derived from a target ratio pay
  // for basis values at the quantized cost (the quantizer's share of the budget is fixed).
  const Quantize* quant = Stages::quant_knobs(policy_);
  const int basis_bits = quant ? quant->bits : 0;
  const int basis_group = quant ? quant->group : 32;
  if constexpr (kCrossLayer) {
    const CrossLayerSVD& p = selection();
    for (int l0 = 0; l0 < shape_.layers; l0 += p.group_layers) {
      const int l1 = std::min(shape_.layers, l0 + p.group_layers);
      require_same_tokens(l0, l1, "CrossLayerSVD");
      const int64_t tokens = store(l0, 0).size();
      if (tokens == 0) continue;
      const int64_t cols = static_cast<int64_t>(l1 - l0) * heads * d;
      const int64_t cap = std::min(tokens, cols);
      int rk = p.rank_k, rv = p.rank_v;
      if (rk > 0) {
        for (const auto& [name, rank] :
             {std::pair<const char*, int>{"rank_k", rk}, {"rank_v", rv}}) {
          if (rank > cap) {
            throw error(detail::concat(
                where, ": CrossLayerSVD ", name, " = ", rank, ", expected at most min(tokens, ",
                "columns) = ", cap, " for layers [", l0, ", ", l1, "), which hold ", tokens,
                " tokens x ", cols, " columns (compress once at least ", rank,
                " tokens are held, or derive the ranks from target_ratio)"));
          }
        }
      } else {
        std::tie(rk, rv) = CrossLayerSVD::ranks_for_ratio(tokens, l1 - l0, heads, d, p.target_ratio,
                                                          quant ? quant->bytes_per_value() : 2.0);
        rk = static_cast<int>(std::clamp<int64_t>(rk, 1, cap));
        rv = static_cast<int>(std::clamp<int64_t>(rv, 1, cap));
      }
      jobs.push_back({l0, l1, true, rk, tokens, {}});
      jobs.push_back({l0, l1, false, rv, tokens, {}});
    }
  } else {
    const ChannelShrink& p = selection();
    for (int l = 0; l < shape_.layers; ++l) {
      // Tokens factored by an earlier compress() stay factored even if `window` grew since.
      const int64_t tokens = std::max(store(l, 0).size() - p.window, store(l, 0).factored);
      if (tokens <= 0) continue;
      require_same_tokens(l, l + 1, "ChannelShrink");
      jobs.push_back({l, l + 1, true, p.projections->rank_k[l], tokens, {}});
      jobs.push_back({l, l + 1, false, p.projections->rank_v[l], tokens, {}});
    }
  }

  auto run = [&](Job& job) {
    const int64_t cols = static_cast<int64_t>(job.l1 - job.l0) * heads * d;
    RowMat x(job.tokens, cols);
    for (int l = job.l0; l < job.l1; ++l) {
      for (int h = 0; h < heads; ++h) {
        const auto rows = pre_rope_rows(l, h, job.tokens, job.keys);
        x.middleCols((static_cast<int64_t>(l - job.l0) * heads + h) * d, d) =
            Eigen::Map<const RowMat>(rows.data(), job.tokens, d);
      }
    }
    auto basis = std::make_shared<detail::LowRankBasis>();
    // Holds A (tokens × rank) and, from `bt` (cols × rank, rows are channels), B of each
    // (layer, head): rank × d. Columns of A beyond the storage range are scaled down by a power
    // of two and the matching rows of B (fp32) up by it, so A·B is unchanged.
    auto add_factors = [&](RowMat& a, const auto& bt) {
      const Eigen::VectorXf scale = detail::fit_basis_range(a.data(), job.tokens, job.rank, where);
      basis->assign(a.data(), job.tokens, job.rank, basis_bits, basis_group);
      for (int64_t c0 = 0; c0 < cols; c0 += d) {
        detail::LowRankFactor f{basis, std::vector<float>(static_cast<std::size_t>(job.rank) * d)};
        Eigen::Map<RowMat>(f.b.data(), job.rank, d) =
            (bt.middleRows(c0, d) * scale.asDiagonal()).transpose();
        job.factors.push_back(std::move(f));
      }
    };
    if constexpr (kCrossLayer) {
      // X ≈ U Σ Vᵀ: A = U shared by the group, B of (layer, head) = Σ V[columns of that head]ᵀ.
      SvdOptions options;
      options.route = selection().svd_route;
      options.rank = job.rank;
      const SvdFactors f =
          truncated_svd(Eigen::Map<const RowMajorMatrixXf>(x.data(), x.rows(), cols), options);
      RowMat a = f.U;
      add_factors(a, Eigen::MatrixXf(f.V * f.S.asDiagonal()));
    } else {
      // Latents Z = X P (tokens × rank) shared by the layer's heads, B of a head = P[its rows]ᵀ.
      const ChannelProjections& proj = *selection().projections;
      const Eigen::Map<const RowMat> projection((job.keys ? proj.pk : proj.pv)[job.l0].data(), cols,
                                                job.rank);
      RowMat latents = x * projection;
      add_factors(latents, projection);
    }
  };
  // Jobs are independent: two threads factor two groups at once (the SVD's double-precision
  // Gram matrix and tridiagonalisation are single-threaded; Eigen's GEMMs see the parallel
  // region and stay on their thread). Exceptions cannot leave an OpenMP region: keep the first.
  std::vector<std::exception_ptr> failures(jobs.size());
  const int64_t n_jobs = static_cast<int64_t>(jobs.size());
#if defined(_OPENMP)
#pragma omp parallel for schedule(dynamic) if (n_jobs > 1)
#endif
  for (int64_t i = 0; i < n_jobs; ++i) {
    try {
      run(jobs[i]);
    } catch (...) {
      failures[i] = std::current_exception();
    }
  }
  for (const auto& failure : failures) {
    if (failure) std::rethrow_exception(failure);
  }

  // Commit: jobs come in (keys, values) pairs of the same layers and tokens.
  for (std::size_t i = 0; i + 1 < jobs.size(); i += 2) {
    Job& k = jobs[i];
    Job& v = jobs[i + 1];
    for (int l = k.l0; l < k.l1; ++l) {
      for (int h = 0; h < heads; ++h) {
        const std::size_t f = static_cast<std::size_t>(l - k.l0) * heads + h;
        store(l, h).set_factors(std::move(k.factors[f]), std::move(v.factors[f]), k.tokens, d);
      }
    }
  }
  collect_bases();
}

template <class Policy>
void KVCache<Policy, backend::Cpu>::collect_bases() {
  // Bases held: each shared basis once, whichever heads still point to it.
  std::vector<std::shared_ptr<const detail::LowRankBasis>> bases;
  for (const auto& head : heads_) {
    for (const auto* side : {&head.key, &head.value}) {
      if (side->basis && std::find(bases.begin(), bases.end(), side->basis) == bases.end()) {
        bases.push_back(side->basis);
      }
    }
  }
  bases_ = std::move(bases);
}

}  // namespace kvpack
