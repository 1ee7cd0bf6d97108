/// \file backend/cpu/cache_factorize.hpp
/// \brief Out-of-line members of KVCache<Policy, backend::Cpu>: runs a low-rank policy's jobs
/// (its plan() and factor() hooks) and stores shared bases and per-head factors.
#pragma once

#include <algorithm>
#include <memory>
#include <utility>
#include <vector>

#include "../../linalg/matrix.hpp"
#include "cache.hpp"
#include "low_rank_head_store.hpp"

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
  constexpr const char* where = "KVCache::compress";
  const int d = shape_.head_dim, heads = shape_.kv_heads;
  // The policy plans jobs (layers, side, rank, tokens) and factors each one's stacked pre-RoPE
  // matrix into a shared basis and one factor per (layer, head). Every job runs before anything
  // held changes, so a refused rank, heads holding different tokens or a failure inside the
  // factoring leave the cache as it was.
  struct Job {
    LowRankJob plan;
    std::vector<detail::LowRankFactor> factors;  // (layer − l0) · heads + head
  };
  std::vector<LowRankLayer> held(shape_.layers);
  for (int l = 0; l < shape_.layers; ++l) held[l] = {store(l, 0).size(), store(l, 0).factored};
  // Compose<…, Quantize>: the bases are quantized, and ranks derived from a target ratio pay
  // for basis values at the quantized cost (the quantizer's share of the budget is fixed).
  const Quantize* quant = Stages::quant_knobs(policy_);
  const int basis_bits = quant ? quant->bits : 0;
  const int basis_group = quant ? quant->group : 32;
  std::vector<Job> jobs;
  for (const LowRankJob& plan :
       selection().plan(shape_, held, quant ? quant->bytes_per_value() : 2.0, where)) {
    const auto& ref = store(plan.l0, 0).positions;
    for (int l = plan.l0; l < plan.l1; ++l) {
      for (int h = 0; h < heads; ++h) {
        if (store(l, h).positions != ref) {
          throw error(detail::concat(where, ": ", Selection::name, " needs every head",
                                     plan.l1 - plan.l0 > 1 ? " and layer" : "",
                                     " it factors together to hold the same tokens; layer ", l,
                                     " head ", h, " differs from layer ", plan.l0, " head 0"));
        }
      }
    }
    jobs.push_back({plan, {}});
  }

  auto run = [&](Job& job_state) {
    const LowRankJob& job = job_state.plan;
    const int64_t cols = static_cast<int64_t>(job.l1 - job.l0) * heads * d;
    RowMajorMatrixXf x(job.tokens, cols);
    for (int l = job.l0; l < job.l1; ++l) {
      for (int h = 0; h < heads; ++h) {
        const auto rows = pre_rope_rows(l, h, job.tokens, job.keys);
        x.middleCols((static_cast<int64_t>(l - job.l0) * heads + h) * d, d) =
            Eigen::Map<const RowMajorMatrixXf>(rows.data(), job.tokens, d);
      }
    }
    RowMajorMatrixXf a;
    Eigen::MatrixXf bt;
    selection().factor(job, x, a, bt);
    // Holds A (tokens × rank) and, from Bt (cols × rank, rows are channels), B of each
    // (layer, head): rank × d. Columns of A beyond the storage range are scaled down by a power
    // of two and the matching rows of B (fp32) up by it, so A·B is unchanged.
    auto basis = std::make_shared<detail::LowRankBasis>();
    const Eigen::VectorXf scale = detail::fit_basis_range(a.data(), job.tokens, job.rank, where);
    basis->assign(a.data(), job.tokens, job.rank, basis_bits, basis_group, pool_);
    for (int64_t c0 = 0; c0 < cols; c0 += d) {
      detail::LowRankFactor f{basis, std::vector<float>(static_cast<std::size_t>(job.rank) * d)};
      Eigen::Map<RowMajorMatrixXf>(f.b.data(), job.rank, d) =
          (bt.middleRows(c0, d) * scale.asDiagonal()).transpose();
      job_state.factors.push_back(std::move(f));
    }
  };
  // Jobs are independent: two threads factor two groups at once (the SVD's double-precision
  // Gram matrix and tridiagonalisation are single-threaded; a single job runs on the calling
  // thread, where Eigen's GEMMs may use OpenMP). The first failure is rethrown after all jobs.
  detail::parallel_for(executor(), static_cast<int64_t>(jobs.size()),
                       [&](int64_t i) { run(jobs[i]); });

  // Commit: jobs come in (keys, values) pairs of the same layers and tokens.
  for (std::size_t i = 0; i + 1 < jobs.size(); i += 2) {
    Job& k = jobs[i];
    Job& v = jobs[i + 1];
    for (int l = k.plan.l0; l < k.plan.l1; ++l) {
      for (int h = 0; h < heads; ++h) {
        const std::size_t f = static_cast<std::size_t>(l - k.plan.l0) * heads + h;
        store(l, h).set_factors(std::move(k.factors[f]), std::move(v.factors[f]), k.plan.tokens, d);
      }
    }
  }
}

}  // namespace kvpack
