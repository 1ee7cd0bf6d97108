/// \file backend/cuda/low_rank.hpp
/// \brief The factorisation behind the low-rank policies on the device: a rank-r truncated SVD of
/// a tall matrix through its Gram matrix (linalg.hpp: cuBLAS GEMM + cuSOLVER syevd; Eigen on
/// the emulated grid). For xKV (CrossLayerSVD) X is a layer group's stacked pre-RoPE keys or
/// values, tokens × G·kv_heads·head_dim; for CSKV (ChannelShrink) one layer's rows.
///
/// Route: G = Xᵀ X (fp32 GEMM), its eigenpairs, the basis = the r leading eigenvectors and the
/// token factors X · basisᵀ (= U Σ). This is the CPU's SvdRoute::kGram with the Gram matrix in
/// fp32 instead of double: singular values below ~3e-4 · σ₁ lose their relative accuracy
/// (σ² meets fp32's epsilon · σ₁²), which moves the reconstruction error by at most that much
/// of ‖X‖ (tested against the Eckart–Young optimum). Host API only (no nvcc needed).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <vector>

#include "../../error.hpp"
#include "context.hpp"
#include "linalg.hpp"

namespace kvpack {
namespace cuda {

/// \brief X [rows][cols] (device, row-major, contiguous) ≈ token_factors · basis, rank r.
/// \param basis          [rank][cols] device output: row i is the right singular vector of the
///                       i-th largest singular value (orthonormal rows).
/// \param token_factors  [rows][rank] device output: X · basisᵀ (left factors scaled by the
///                       singular values).
/// \param singular       [rank] host output: the singular values, descending.
/// Throws kvpack::error (nothing written) when rank is not in [1, min(rows, cols)] or the
/// eigen-decomposition fails (non-finite X). Synchronises the context's stream. A template for
/// the reason symmetric_eigen is one.
template <int = 0>
void gram_factorize(CudaContext& context, const float* x, int rows, int cols, int rank,
                    float* basis, float* token_factors, std::vector<float>& singular) {
  constexpr const char* where = "cuda::gram_factorize";
  detail::require(rows > 0 && cols > 0, where, "rows, cols", detail::concat(rows, ", ", cols),
                  "both > 0");
  detail::require(rank >= 1 && rank <= std::min(rows, cols), where, "rank", rank,
                  detail::concat("in [1, min(rows, cols) = ", std::min(rows, cols), "]"));
  const std::size_t c = static_cast<std::size_t>(cols);
  DeviceBuffer<float> gram(c * c, context.device()), values(c, context.device());
  gemm(context, /*transpose_a=*/true, /*transpose_b=*/false, cols, cols, rows, 1.0f, x, cols, x,
       cols, 0.0f, gram.data(), cols);
  symmetric_eigen(context, cols, gram.data(), cols, values.data());  // ascending; synchronises
  std::vector<float> eigenvalues(c);
  check_cuda(
      cudaMemcpy(eigenvalues.data(), values.data(), c * sizeof(float), cudaMemcpyDeviceToHost),
      "cuda::gram_factorize: download of the eigenvalues");
  // The leading eigenvectors are the last rows: copy them in descending order.
  for (int i = 0; i < rank; ++i) {
    check_cuda(cudaMemcpyAsync(basis + static_cast<std::size_t>(i) * c,
                               gram.data() + static_cast<std::size_t>(cols - 1 - i) * c,
                               c * sizeof(float), cudaMemcpyDeviceToDevice, context.stream()),
               "cuda::gram_factorize: copy of the basis");
  }
  gemm(context, /*transpose_a=*/false, /*transpose_b=*/true, rows, rank, cols, 1.0f, x, cols, basis,
       cols, 0.0f, token_factors, rank);
  singular.resize(static_cast<std::size_t>(rank));
  for (int i = 0; i < rank; ++i) {
    singular[static_cast<std::size_t>(i)] =
        std::sqrt(std::max(0.0f, eigenvalues[static_cast<std::size_t>(cols - 1 - i)]));
  }
  context.synchronize(where);  // `gram` is freed on return
}

}  // namespace cuda
}  // namespace kvpack
