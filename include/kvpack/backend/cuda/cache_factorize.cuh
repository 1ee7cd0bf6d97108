/// \file backend/cuda/cache_factorize.cuh
/// \brief Out-of-line members of KVCache<Policy, backend::Cuda> for the low-rank policies
/// (CrossLayerSVD, ChannelShrink): compress() runs the policy's jobs on the device and stores
/// the token bases and per-head factors, as the CPU cache does (backend/cpu/cache_factorize.hpp).
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <utility>
#include <vector>

#include "../cpu/low_rank_head_store.hpp"
#include "cache.cuh"
#include "kernels/low_rank_rows.cuh"
#include "low_rank.hpp"

namespace kvpack {

template <class Policy>
cuda::LowRankAttentionHead KVCache<Policy, backend::Cuda>::low_rank_head(
    int layer, int head, const cuda::RopeParams& rope) const {
  const DeviceHead& s = store(layer, head);
  auto basis = [](const std::shared_ptr<const cuda::DeviceLowRankBasis>& b) {
    cuda::LowRankBasisView view;
    if (b != nullptr) {
      view.blocks = {b->blocks.data(), nullptr, b->quantized, b->format};
      view.rows = b->rows.data();
      view.rank = b->rank;
    }
    return view;
  };
  return {basis(s.key_basis),  basis(s.value_basis),
          s.key_factor.data(), s.value_factor.data(),
          s.k.data(),          s.v.data(),
          s.positions.data(),  s.size,
          s.factored,          rope};
}

template <class Policy>
template <class P>
void KVCache<Policy, backend::Cuda>::factorize() {
  constexpr const char* where = "KVCache::compress";
  using T = storage_type;
  const int d = shape_.head_dim, heads = shape_.kv_heads;
  const int device = context_->device();
  const cudaStream_t stream = context_->stream();
  std::vector<LowRankLayer> held(shape_.layers);
  for (int l = 0; l < shape_.layers; ++l) held[l] = {store(l, 0).size, store(l, 0).factored};
  // Compose<…, Quantize>: KIVI bases, and ranks derived from a target ratio pay for basis values
  // at the quantized cost (as on the CPU).
  const Quantize* quant = Stages::quant_knobs(policy_);
  const cuda::KiviFormat format =
      quant ? cuda::KiviFormat::of(quant->bits, quant->group) : cuda::KiviFormat{};
  const std::vector<LowRankJob> plans =
      selection().plan(shape_, held, quant ? quant->bytes_per_value() : 2.0, where);

  // Before any work: every head a job covers holds its tokens (factored ones included), and
  // the layers a job stacks hold the same tokens (the heads of a layer do: they are appended
  // together and never evicted from), checked on positions downloaded in one wait, as the CPU
  // compares its own.
  std::vector<std::vector<int32_t>> positions(shape_.layers);
  for (const LowRankJob& plan : plans) {
    for (int l = plan.l0; l < plan.l1; ++l) {
      for (int h = 0; h < heads; ++h) {
        detail::require(plan.tokens >= store(l, h).factored && plan.tokens <= store(l, h).size,
                        where, "job tokens", plan.tokens,
                        "between the factored and the held tokens");
      }
      if (plan.l1 - plan.l0 > 1 && positions[l].empty()) {
        download(store(l, 0).positions.data(), store(l, 0).size, positions[l], where);
      }
    }
  }
  context_->synchronize(where);
  for (const LowRankJob& plan : plans) {
    for (int l = plan.l0 + 1; l < plan.l1; ++l) {
      if (positions[l] != positions[plan.l0]) {
        throw error(detail::concat(where, ": ", Selection::name,
                                   " needs every head and layer it factors together to hold the "
                                   "same tokens; layer ",
                                   l, " head 0 differs from layer ", plan.l0, " head 0"));
      }
    }
  }

  // Every job runs before anything held changes: a refused rank, a failed eigen-decomposition
  // or a basis column out of range (non-finite products) leave the cache as it was.
  struct Job {
    LowRankJob plan;
    std::shared_ptr<cuda::DeviceLowRankBasis> basis;
    std::vector<cuda::DeviceBuffer<float>> factors;  // (layer − l0) · heads + head
  };
  std::vector<Job> jobs;
  const cuda::RopeParams pre_rope{rope_.inv_freq, 0, rope_.style, 1.0};  // factored keys as held
  for (const LowRankJob& plan : plans) {
    const int64_t tokens = plan.tokens;
    const int rank = plan.rank;
    const int64_t cols = static_cast<int64_t>(plan.l1 - plan.l0) * heads * d;
    const std::size_t un = static_cast<std::size_t>(tokens);
    const std::size_t ur = static_cast<std::size_t>(rank);
    cuda::DeviceBuffer<float> x(un * cols, device), a(un * ur, device);
    cuda::DeviceBuffer<float> right(ur * cols, device), peaks(ur, device), scale(ur, device);
    // X [tokens][cols]: the stacked heads' pre-RoPE keys (or values), head by head.
    for (int l = plan.l0; l < plan.l1; ++l) {
      for (int h = 0; h < heads; ++h) {
        float* block = x.data() + (static_cast<int64_t>(l - plan.l0) * heads + h) * d;
        cuda::launch_low_rank_rows(
            d, low_rank_head(l, h, pre_rope), tokens, plan.keys ? rope_ : cuda::RopeParams{},
            plan.keys ? block : nullptr, plan.keys ? nullptr : block, cols, stream);
      }
    }
    // X ≈ A · R: A [tokens][rank] the token basis, R the right factor whose columns of a head
    // are its factor B. SVD: R = Vᵀ [rank][cols] (A = U Σ); projection: R = Pᵀ, held as P.
    int64_t row_stride = 0, col_stride = 0;
    if constexpr (Selection::factorization == LowRankFactorization::kTruncatedSvd) {
      std::vector<float> singular;
      cuda::gram_factorize(*context_, x.data(), static_cast<int>(tokens), static_cast<int>(cols),
                           rank, right.data(), a.data(), singular);
      row_stride = cols;
      col_stride = 1;
    } else {
      cuda::check_cuda(cudaMemcpyAsync(right.data(), selection().projection(plan), right.bytes(),
                                       cudaMemcpyHostToDevice, stream),
                       "KVCache::compress: upload of the projection");
      cuda::gemm(*context_, false, false, static_cast<int>(tokens), rank, static_cast<int>(cols),
                 1.0f, x.data(), static_cast<int>(cols), right.data(), rank, 0.0f, a.data(), rank);
      row_stride = 1;
      col_stride = rank;
    }
    // Range: the CPU's rule per basis column (detail::basis_column_scale) on its device peak.
    cuda::launch_column_peaks(a.data(), tokens, rank, peaks.data(), stream);
    std::vector<float> host_scale;
    download(peaks.data(), rank, host_scale, where);
    context_->synchronize(where);
    for (int j = 0; j < rank; ++j)
      host_scale[j] = detail::basis_column_scale(host_scale[j], j, where);
    cuda::check_cuda(cudaMemcpyAsync(scale.data(), host_scale.data(), scale.bytes(),
                                     cudaMemcpyHostToDevice, stream),
                     "KVCache::compress: upload of the basis scales");
    // The basis: whole groups of rows in KIVI blocks per column (Compose<…, Quantize>), quantized
    // from the scaled fp32 values as the CPU's LowRankBasis::assign does, the rest fp16.
    Job job{plan, std::make_shared<cuda::DeviceLowRankBasis>(), {}};
    cuda::DeviceLowRankBasis& basis = *job.basis;
    basis.tokens = tokens;
    basis.rank = rank;
    basis.format = format;
    basis.quantized = quant ? tokens / format.group * format.group : 0;
    const std::size_t uq = static_cast<std::size_t>(basis.quantized);
    basis.blocks = cuda::DeviceBuffer<uint8_t>(uq / format.group * ur * format.block_bytes, device);
    basis.rows = cuda::DeviceBuffer<Half>((un - uq) * ur, device);
    cuda::launch_scale_columns(a.data(), tokens, rank, scale.data(), stream);
    cuda::launch_quantize_keys(format, a.data(), basis.quantized / format.group, rank,
                               basis.blocks.data(), stream);
    cuda::launch_store_basis(a.data() + uq * ur, (tokens - basis.quantized) * rank,
                             basis.rows.data(), stream);
    for (int64_t c0 = 0; c0 < cols; c0 += d) {
      job.factors.emplace_back(ur * d, device);
      cuda::launch_store_factor(right.data(), row_stride, col_stride, c0, rank, d, scale.data(),
                                job.factors.back().data(), stream);
    }
    context_->synchronize(where);  // the job's temporaries are freed next
    jobs.push_back(std::move(job));
  }

  // The exact tail that stays: rows [tokens − factored, rows) of each head, into buffers of
  // their size (allocated before anything is committed).
  struct Tail {
    int layer, head;
    int64_t tokens;
    cuda::DeviceBuffer<T> k, v;
  };
  std::vector<Tail> tails;
  for (std::size_t i = 0; i < jobs.size(); i += 2) {
    const LowRankJob& plan = jobs[i].plan;
    for (int l = plan.l0; l < plan.l1; ++l) {
      for (int h = 0; h < heads; ++h) {
        const DeviceHead& head = store(l, h);
        const std::size_t rows = static_cast<std::size_t>(head.size - plan.tokens) * d;
        const std::size_t skip = static_cast<std::size_t>(plan.tokens - head.factored) * d;
        Tail tail{l, h, plan.tokens, cuda::DeviceBuffer<T>(rows, device),
                  cuda::DeviceBuffer<T>(rows, device)};
        if (rows > 0) {
          cuda::check_cuda(cudaMemcpyAsync(tail.k.data(), head.k.data() + skip, rows * sizeof(T),
                                           cudaMemcpyDeviceToDevice, stream),
                           "KVCache::compress: copy of the tail keys");
          cuda::check_cuda(cudaMemcpyAsync(tail.v.data(), head.v.data() + skip, rows * sizeof(T),
                                           cudaMemcpyDeviceToDevice, stream),
                           "KVCache::compress: copy of the tail values");
        }
        tails.push_back(std::move(tail));
      }
    }
  }
  context_->synchronize(where);

  // Commit: jobs come in (keys, values) pairs of the same layers and tokens.
  std::size_t next_tail = 0;
  for (std::size_t i = 0; i + 1 < jobs.size(); i += 2) {
    Job& k = jobs[i];
    Job& v = jobs[i + 1];
    for (int l = k.plan.l0; l < k.plan.l1; ++l) {
      for (int h = 0; h < heads; ++h) {
        const std::size_t f = static_cast<std::size_t>(l - k.plan.l0) * heads + h;
        DeviceHead& head = store(l, h);
        Tail& tail = tails[next_tail++];
        head.key_basis = k.basis;
        head.value_basis = v.basis;
        head.key_factor.swap(k.factors[f]);
        head.value_factor.swap(v.factors[f]);
        head.k.swap(tail.k);
        head.v.swap(tail.v);
        head.factored = tail.tokens;
      }
    }
  }
}

}  // namespace kvpack
