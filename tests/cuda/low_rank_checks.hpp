// Checks of the low-rank CUDA pieces, shared by tests/cuda/low_rank_test.cu (seeded random
// inputs) and the real-model test: cuda::gram_factorize (backend/cuda/low_rank.hpp) on a given
// matrix, and attention_kernel over LowRankAttentionHead on a CPU low-rank cache's own storage,
// read through KVCache::low_rank_factors.
#pragma once

#include <Eigen/Dense>
#include <algorithm>
#include <catch2/catch.hpp>
#include <cmath>
#include <cstddef>
#include <cstring>
#include <kvpack/backend/cuda/kernels/low_rank_attention.cuh>
#include <kvpack/backend/cuda/low_rank.hpp>
#include <kvpack/kvpack.hpp>
#include <vector>

#include "attention_checks.hpp"
#include "device_test_util.hpp"

namespace kvpack {
namespace test {

/// Factorises x ([rows][cols], fp32) at `rank` on the device and requires the Eckart–Young
/// optimum: ‖X − T·B‖²_F equal to the sum of the discarded σ² (double SVD) within
/// `tolerance` · ‖X‖²_F, singular values within the same relative bound, orthonormal basis rows.
/// Returns the relative excess error (‖X − T·B‖² − optimum) / ‖X‖².
inline double require_gram_factorize_optimal(const std::vector<float>& x, int rows, int cols,
                                             int rank, double tolerance) {
  using MatrixD = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  cuda::CudaContext context(0);
  auto dx = upload(x);
  cuda::DeviceBuffer<float> basis(static_cast<std::size_t>(rank) * cols, 0),
      factors(static_cast<std::size_t>(rows) * rank, 0);
  std::vector<float> singular;
  cuda::gram_factorize(context, dx.data(), rows, cols, rank, basis.data(), factors.data(),
                       singular);
  const auto b = download(basis, basis.size());
  const auto t = download(factors, factors.size());
  MatrixD mx(rows, cols), mb(rank, cols), mt(rows, rank);
  for (int i = 0; i < rows * cols; ++i) mx.data()[i] = x[static_cast<std::size_t>(i)];
  for (int i = 0; i < rank * cols; ++i) mb.data()[i] = b[static_cast<std::size_t>(i)];
  for (int i = 0; i < rows * rank; ++i) mt.data()[i] = t[static_cast<std::size_t>(i)];
  const Eigen::VectorXd sigma = Eigen::BDCSVD<MatrixD>(mx).singularValues();
  const double total = mx.squaredNorm();
  const double optimum = sigma.tail(sigma.size() - rank).squaredNorm();
  const double error = (mx - mt * mb).squaredNorm();
  INFO("rows " << rows << " cols " << cols << " rank " << rank << ": error " << error << " optimum "
               << optimum << " total " << total);
  REQUIRE(error >= optimum - 1e-9 * total);  // nothing beats Eckart–Young
  REQUIRE(error - optimum <= tolerance * total);
  REQUIRE((mb * mb.transpose() - MatrixD::Identity(rank, rank)).norm() < 1e-4);
  REQUIRE(static_cast<int>(singular.size()) == rank);
  for (int i = 0; i < rank; ++i) {
    REQUIRE(std::abs(singular[static_cast<std::size_t>(i)] - sigma(i)) <=
            std::sqrt(tolerance) * sigma(0));
  }
  return (error - optimum) / total;
}

/// A CPU cache's basis (low_rank_factors()) read from its pages by the documented layout
/// (docs/page_formats.md, "Low-rank bases in pages") into the unpaged arrays the device holds:
/// blocks [quantized / group][rank] and fp16 rows [tokens − quantized][rank].
inline void contiguous_basis(const LowRankBasisData& b, const PagePool& pool,
                             std::vector<uint8_t>& blocks, std::vector<Half>& rows) {
  const std::size_t block_bytes =
      b.bits == 0 ? 0 : 4 + static_cast<std::size_t>(b.group) * b.bits / 8;
  const int64_t count = b.bits == 0 ? 0 : b.quantized / b.group * b.rank;
  blocks.resize(static_cast<std::size_t>(count) * block_bytes);
  for (int64_t i = 0; i < count; ++i) {
    const int64_t per_page = static_cast<int64_t>(b.page_bytes / block_bytes);
    std::memcpy(blocks.data() + i * block_bytes,
                pool.data(b.page_ids[i / per_page]) + (i % per_page) * block_bytes, block_bytes);
  }
  rows.resize(static_cast<std::size_t>(b.tokens - b.quantized) * b.rank);
  const int64_t per_page = static_cast<int64_t>(b.page_bytes / 2);
  for (std::size_t e = 0; e < rows.size(); ++e) {
    const auto* page = reinterpret_cast<const Half*>(
        pool.data(b.page_ids[b.block_pages + static_cast<int64_t>(e) / per_page]));
    rows[e] = page[static_cast<int64_t>(e) % per_page];
  }
}

/// What a CUDA low-rank cache holds in the CPU cache's state: the CPU's bytes() with each
/// distinct basis in two exact-size device buffers and a cuda::DeviceLowRankBasis instead of
/// whole pages, their page-table entries and a detail::LowRankBasis.
template <class CpuCache>
std::size_t device_bytes_of(const CpuCache& cpu) {
  std::size_t total = cpu.bytes();
  std::vector<const int32_t*> seen;
  for (int l = 0; l < cpu.shape().layers; ++l) {
    for (int h = 0; h < cpu.shape().kv_heads; ++h) {
      const LowRankHeadFactors f = cpu.low_rank_factors(l, h);
      for (const LowRankBasisData& b : {f.key_basis, f.value_basis}) {
        if (b.rank == 0 || std::find(seen.begin(), seen.end(), b.page_ids) != seen.end()) continue;
        seen.push_back(b.page_ids);
        const std::size_t block_bytes =
            b.bits == 0 ? 0 : 4 + static_cast<std::size_t>(b.group) * b.bits / 8;
        const std::size_t exact =
            static_cast<std::size_t>(b.quantized / b.group) * b.rank * block_bytes * (b.bits != 0) +
            static_cast<std::size_t>(b.tokens - b.quantized) * b.rank * 2;
        total = total + exact + sizeof(cuda::DeviceLowRankBasis) -
                static_cast<std::size_t>(b.pages) *
                    (b.page_bytes + sizeof(int32_t) + sizeof(std::byte*)) -
                sizeof(detail::LowRankBasis);
      }
    }
  }
  return total;
}

/// attend() of a CPU low-rank cache (CrossLayerSVD, ChannelShrink, their Compose) computed by
/// attention_kernel over LowRankAttentionHead: each call copies the layer's bases, factors, tail
/// and RoPE table, read through low_rank_factors() alone, to the device. Has the attend()
/// signature that cache_checks::require_same_attention calls.
template <class CpuCache>
class LowRankKernelAttention {
 public:
  LowRankKernelAttention(const CpuCache& cpu, int64_t splits) : cpu_(cpu), splits_(splits) {}

  void attend(int layer, const ActivationView& q, Positions positions,
              const OutputView& out) const {
    const ModelShape& s = cpu_.shape();
    const int d = s.head_dim;
    std::vector<float> queries(static_cast<std::size_t>(q.tokens()) * s.q_heads * d);
    std::vector<int32_t> q_positions;
    for (int64_t t = 0; t < q.tokens(); ++t) {
      for (int h = 0; h < s.q_heads; ++h) q.load(t, h, &queries[(t * s.q_heads + h) * d]);
      q_positions.push_back(static_cast<int32_t>(positions[t]));
    }
    Uploads up;
    std::vector<cuda::LowRankAttentionHead> heads;
    for (int h = 0; h < s.kv_heads; ++h) {
      const LowRankHeadFactors f = cpu_.low_rank_factors(layer, h);
      const int64_t tail = f.tokens - f.factored;
      if (h == 0) up.inv_freq = upload(f.rope->inv_freq());
      heads.push_back({up.basis(f.key_basis, *cpu_.page_pool()),
                       up.basis(f.value_basis, *cpu_.page_pool()),
                       up.floats(f.key_factor, static_cast<std::size_t>(f.key_basis.rank) * d),
                       up.floats(f.value_factor, static_cast<std::size_t>(f.value_basis.rank) * d),
                       up.halves(f.tail_k, tail * d), up.halves(f.tail_v, tail * d),
                       up.ints(f.positions, f.tokens), f.tokens, f.factored,
                       cuda::RopeParams{up.inv_freq.data(), f.rope->rotary_dim(),
                                        f.rope->config().style, f.rope->attention_factor()}});
    }
    const auto got = device_attention(heads, s.q_heads, d, queries, q_positions, splits_);
    for (int64_t t = 0; t < q.tokens(); ++t) {
      for (int h = 0; h < s.q_heads; ++h) out.store(t, h, &got[(t * s.q_heads + h) * d]);
    }
  }

 private:
  /// Device copies that live as long as one attend().
  struct Uploads {
    std::vector<cuda::DeviceBuffer<uint8_t>> bytes;
    std::vector<cuda::DeviceBuffer<Half>> halves_held;
    std::vector<cuda::DeviceBuffer<float>> floats_held;
    std::vector<cuda::DeviceBuffer<int32_t>> ints_held;
    cuda::DeviceBuffer<double> inv_freq;

    template <class T, class Held>
    const T* keep(Held& held, const T* data, std::size_t n) {
      held.push_back(upload(std::vector<T>(data, data + n)));
      return held.back().data();
    }
    const Half* halves(const Half* p, int64_t n) {
      return keep(halves_held, p, static_cast<std::size_t>(n));
    }
    const float* floats(const float* p, std::size_t n) { return keep(floats_held, p, n); }
    const int32_t* ints(const int32_t* p, int64_t n) {
      return keep(ints_held, p, static_cast<std::size_t>(n));
    }
    cuda::LowRankBasisView basis(const LowRankBasisData& b, const PagePool& pool) {
      const cuda::KiviFormat format =
          b.bits == 0 ? cuda::KiviFormat{} : cuda::KiviFormat::of(b.bits, b.group);
      std::vector<uint8_t> blocks;
      std::vector<Half> rows;
      if (b.rank > 0) contiguous_basis(b, pool, blocks, rows);
      return {{keep(bytes, blocks.data(), blocks.size()), nullptr, b.quantized, format},
              halves(rows.data(), static_cast<int64_t>(rows.size())),
              b.rank};
    }
  };

  const CpuCache& cpu_;
  int64_t splits_;
};

}  // namespace test
}  // namespace kvpack
