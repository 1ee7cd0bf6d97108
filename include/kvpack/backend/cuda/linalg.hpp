/// \file backend/cuda/linalg.hpp
/// \brief The dense linear algebra the CUDA backend needs, behind one small interface: GEMM
/// (cuBLAS) and the eigen-decomposition of a symmetric matrix (cuSOLVER syevd). A host build with
/// KVPACK_CUDA_EMULATION runs the same calls with Eigen on the emulated device's memory, so the
/// code above it (xKV's Gram matrix and its eigenvectors, CSKV's projections) runs in CPU-only CI.
///
/// Conventions: fp32, row-major, device pointers, work enqueued on the context's stream. Host
/// API only (no nvcc needed). Throws kvpack::error on bad dimensions (nothing is enqueued then),
/// on a library failure, and when syevd does not converge or returns non-finite eigenvalues.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <vector>

#include "../../error.hpp"
#include "context.hpp"

#if defined(KVPACK_CUDA_EMULATION)
#include <Eigen/Core>
#include <Eigen/Eigenvalues>
#endif

namespace kvpack {
namespace cuda {

namespace detail_linalg {

inline void check_gemm(bool transpose_a, bool transpose_b, int m, int n, int k, int lda, int ldb,
                       int ldc) {
  constexpr const char* where = "cuda::gemm";
  detail::require(m > 0 && n > 0 && k > 0, where, "m, n, k", detail::concat(m, ", ", n, ", ", k),
                  "all > 0");
  detail::require(lda >= (transpose_a ? m : k), where, "lda", lda,
                  detail::concat(">= ", transpose_a ? m : k, " (the columns of row-major A)"));
  detail::require(ldb >= (transpose_b ? k : n), where, "ldb", ldb,
                  detail::concat(">= ", transpose_b ? k : n, " (the columns of row-major B)"));
  detail::require(ldc >= n, where, "ldc", ldc, detail::concat(">= ", n, " (n)"));
}

}  // namespace detail_linalg

/// \brief C = alpha · op(A) · op(B) + beta · C, all row-major fp32 on the device.
/// op(A) is m × k (A is m × k, or k × m when transpose_a), op(B) is k × n, C is m × n; lda, ldb,
/// ldc are row strides in elements. Asynchronous on context.stream().
inline void gemm(CudaContext& context, bool transpose_a, bool transpose_b, int m, int n, int k,
                 float alpha, const float* a, int lda, const float* b, int ldb, float beta,
                 float* c, int ldc) {
  detail_linalg::check_gemm(transpose_a, transpose_b, m, n, k, lda, ldb, ldc);
#if defined(KVPACK_CUDA_EMULATION)
  using Stride = Eigen::OuterStride<>;
  using Matrix = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  const Eigen::Map<const Matrix, 0, Stride> ma(a, transpose_a ? k : m, transpose_a ? m : k,
                                               Stride(lda));
  const Eigen::Map<const Matrix, 0, Stride> mb(b, transpose_b ? n : k, transpose_b ? k : n,
                                               Stride(ldb));
  Eigen::Map<Matrix, 0, Stride> mc(c, m, n, Stride(ldc));
  Matrix product(m, n);
  if (transpose_a && transpose_b) {
    product.noalias() = ma.transpose() * mb.transpose();
  } else if (transpose_a) {
    product.noalias() = ma.transpose() * mb;
  } else if (transpose_b) {
    product.noalias() = ma * mb.transpose();
  } else {
    product.noalias() = ma * mb;
  }
  // beta == 0 ignores C (it may hold NaN), as BLAS does.
  if (beta == 0.0f) {
    mc = alpha * product;
  } else {
    mc = alpha * product + beta * mc;
  }
#else
  // Row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T: swap the operands.
  check_cublas(cublasSgemm(context.cublas(), transpose_b ? CUBLAS_OP_T : CUBLAS_OP_N,
                           transpose_a ? CUBLAS_OP_T : CUBLAS_OP_N, n, m, k, &alpha, b, ldb, a, lda,
                           &beta, c, ldc),
               "cuda::gemm: cublasSgemm");
#endif
  (void)context;
}

/// \brief Eigen-decomposition of the symmetric n × n matrix `a` (device, row stride lda; only
/// its values matter, not which triangle): eigenvalues ascending into w[n] (device), and row j
/// of `a` overwritten with the unit eigenvector of w[j] (sign unspecified). Works on a copy, so
/// a failure (no convergence, a non-finite eigenvalue from NaN or infinite input) leaves `a` and
/// `w` as they were. Synchronises the stream (the status and eigenvalues are read back). A
/// template only so that the emulated build's Eigen solver is instantiated where it is called.
template <int = 0>
void symmetric_eigen(CudaContext& context, int n, float* a, int lda, float* w) {
  constexpr const char* where = "cuda::symmetric_eigen";
  detail::require(n > 0, where, "n", n, "> 0");
  detail::require(lda >= n, where, "lda", lda, detail::concat(">= ", n, " (n)"));
  const std::size_t un = static_cast<std::size_t>(n);
  std::vector<float> host_w(un);
#if defined(KVPACK_CUDA_EMULATION)
  using Matrix = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  Eigen::Map<Matrix, 0, Eigen::OuterStride<>> ma(a, n, n, Eigen::OuterStride<>(lda));
  const Eigen::MatrixXf input = ma;
  Eigen::SelfAdjointEigenSolver<Eigen::MatrixXf> solver(input);
  const int host_info = solver.info() == Eigen::Success ? 0 : 1;
  if (host_info == 0) Eigen::Map<Eigen::VectorXf>(host_w.data(), n) = solver.eigenvalues();
#else
  // Column-major syevd of a symmetric matrix: the row-major storage is its transpose, i.e. the
  // same matrix; the eigenvectors come back as columns, which row-major storage reads as rows.
  DeviceBuffer<float> vectors(un * un, context.device()), values(un, context.device());
  check_cuda(cudaMemcpy2DAsync(vectors.data(), un * sizeof(float), a, lda * sizeof(float),
                               un * sizeof(float), un, cudaMemcpyDeviceToDevice, context.stream()),
             "cuda::symmetric_eigen: copy of the input");
  cusolverDnHandle_t handle = context.cusolver();
  int work_size = 0;
  check_cusolver(
      cusolverDnSsyevd_bufferSize(handle, CUSOLVER_EIG_MODE_VECTOR, CUBLAS_FILL_MODE_LOWER, n,
                                  vectors.data(), n, values.data(), &work_size),
      "cuda::symmetric_eigen: cusolverDnSsyevd_bufferSize");
  DeviceBuffer<float> work(static_cast<std::size_t>(work_size), context.device());
  DeviceBuffer<int> info(1, context.device());
  check_cusolver(
      cusolverDnSsyevd(handle, CUSOLVER_EIG_MODE_VECTOR, CUBLAS_FILL_MODE_LOWER, n, vectors.data(),
                       n, values.data(), work.data(), work_size, info.data()),
      "cuda::symmetric_eigen: cusolverDnSsyevd");
  int host_info = 0;
  check_cuda(cudaMemcpyAsync(&host_info, info.data(), sizeof(int), cudaMemcpyDeviceToHost,
                             context.stream()),
             "cuda::symmetric_eigen: download of the status");
  check_cuda(cudaMemcpyAsync(host_w.data(), values.data(), un * sizeof(float),
                             cudaMemcpyDeviceToHost, context.stream()),
             "cuda::symmetric_eigen: download of the eigenvalues");
  context.synchronize(where);
#endif
  if (host_info != 0) {
    throw error(detail::concat(where, ": the eigensolver did not converge (status ", host_info,
                               ", n ", n, ")"));
  }
  for (int j = 0; j < n; ++j) {
    const float value = host_w[static_cast<std::size_t>(j)];
    if (!std::isfinite(value)) {
      throw error(detail::concat(where, ": eigenvalue ", j, " is not finite (", value,
                                 "): the input holds NaN or infinity"));
    }
  }
#if defined(KVPACK_CUDA_EMULATION)
  ma = solver.eigenvectors().transpose();  // row j = eigenvector j
  std::copy(host_w.begin(), host_w.end(), w);
  (void)context;
#else
  check_cuda(cudaMemcpy2DAsync(a, lda * sizeof(float), vectors.data(), un * sizeof(float),
                               un * sizeof(float), un, cudaMemcpyDeviceToDevice, context.stream()),
             "cuda::symmetric_eigen: copy of the eigenvectors");
  check_cuda(cudaMemcpyAsync(w, values.data(), un * sizeof(float), cudaMemcpyDeviceToDevice,
                             context.stream()),
             "cuda::symmetric_eigen: copy of the eigenvalues");
  context.synchronize(where);  // the scratch buffers are freed on return
#endif
}

}  // namespace cuda
}  // namespace kvpack
