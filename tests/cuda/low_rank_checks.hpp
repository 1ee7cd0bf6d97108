// Check of cuda::gram_factorize (backend/cuda/low_rank.hpp) on a given matrix, shared by
// tests/cuda/low_rank_test.cu (seeded random matrices) and the real-model test (stacked K/V).
#pragma once

#include <Eigen/Dense>
#include <catch2/catch.hpp>
#include <cmath>
#include <kvpack/backend/cuda/low_rank.hpp>
#include <vector>

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

}  // namespace test
}  // namespace kvpack
