// The dense linear algebra interface (backend/cuda/linalg.hpp: cuBLAS GEMM, cuSOLVER syevd; Eigen
// on the emulated grid's host build) against double-precision references on seeded random
// matrices, and its refusals.
#include <Eigen/Dense>
#include <catch2/catch.hpp>
#include <cmath>
#include <kvpack/backend/cuda/linalg.hpp>
#include <random>
#include <vector>

#include "device_test_util.hpp"

namespace kc = kvpack::cuda;
using kvpack::test::download;
using kvpack::test::upload;
using MatrixD = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

namespace {

std::vector<float> gaussian(std::size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist(0.0f, 1.0f);
  std::vector<float> x(n);
  for (auto& v : x) v = dist(rng);
  return x;
}

/// rows × cols row-major matrix of `x` with row stride ld, in double.
MatrixD to_double(const std::vector<float>& x, int rows, int cols, int ld) {
  MatrixD m(rows, cols);
  for (int r = 0; r < rows; ++r) {
    for (int c = 0; c < cols; ++c) m(r, c) = x[static_cast<std::size_t>(r) * ld + c];
  }
  return m;
}

}  // namespace

TEST_CASE("CUDA linalg: gemm equals the double product for every transpose and stride",
          "[cuda][linalg]") {
  KVPACK_SKIP_WITHOUT_DEVICE();
  kc::CudaContext context(0);
  uint32_t seed = 1;
  for (bool ta : {false, true}) {
    for (bool tb : {false, true}) {
      const int m = 37, n = 19, k = 70;
      const int a_rows = ta ? k : m, a_cols = ta ? m : k;
      const int b_rows = tb ? n : k, b_cols = tb ? k : n;
      const int lda = a_cols + 3, ldb = b_cols + 1, ldc = n + 5;
      const auto a = gaussian(static_cast<std::size_t>(a_rows) * lda, seed++);
      const auto b = gaussian(static_cast<std::size_t>(b_rows) * ldb, seed++);
      const auto c0 = gaussian(static_cast<std::size_t>(m) * ldc, seed++);
      auto da = upload(a);
      auto db = upload(b);
      auto dc = upload(c0);
      const float alpha = 0.75f, beta = -0.5f;
      kc::gemm(context, ta, tb, m, n, k, alpha, da.data(), lda, db.data(), ldb, beta, dc.data(),
               ldc);
      context.synchronize();
      const auto c = download(dc, c0.size());
      MatrixD ma = to_double(a, a_rows, a_cols, lda), mb = to_double(b, b_rows, b_cols, ldb);
      if (ta) ma.transposeInPlace();
      if (tb) mb.transposeInPlace();
      const MatrixD expected = alpha * ma * mb + beta * to_double(c0, m, n, ldc);
      const MatrixD got = to_double(c, m, n, ldc);
      INFO("transpose a " << ta << " b " << tb);
      REQUIRE((got - expected).norm() / expected.norm() < 1e-6);
      // Padding between rows is left alone.
      for (int r = 0; r < m; ++r) {
        for (int col = n; col < ldc; ++col) {
          REQUIRE(c[static_cast<std::size_t>(r) * ldc + col] ==
                  c0[static_cast<std::size_t>(r) * ldc + col]);
        }
      }
    }
  }
  // beta = 0 ignores what C held (NaN included).
  std::vector<float> nan_c(4, NAN);
  auto dc = upload(nan_c);
  auto da = upload(std::vector<float>{1, 2, 3, 4});
  kc::gemm(context, false, false, 2, 2, 2, 1.0f, da.data(), 2, da.data(), 2, 0.0f, dc.data(), 2);
  context.synchronize();
  REQUIRE(download(dc, 4) == std::vector<float>{7, 10, 15, 22});
}

TEST_CASE("CUDA linalg: symmetric_eigen gives the eigenpairs of a Gram matrix", "[cuda][linalg]") {
  KVPACK_SKIP_WITHOUT_DEVICE();
  kc::CudaContext context(0);
  for (int n : {1, 8, 64, 130}) {
    const int rows = 3 * n + 5, lda = n + 2;
    const auto x = gaussian(static_cast<std::size_t>(rows) * n, 50 + n);
    const MatrixD gram = to_double(x, rows, n, n).transpose() * to_double(x, rows, n, n);
    std::vector<float> a(static_cast<std::size_t>(n) * lda, 123.0f);
    for (int r = 0; r < n; ++r) {
      for (int c = 0; c < n; ++c) a[static_cast<std::size_t>(r) * lda + c] = gram(r, c);
    }
    auto da = upload(a);
    kc::DeviceBuffer<float> dw(n, 0);
    kc::symmetric_eigen(context, n, da.data(), lda, dw.data());
    const auto vectors = download(da, a.size());
    const auto values = download(dw, n);
    const Eigen::SelfAdjointEigenSolver<Eigen::MatrixXd> reference(
        Eigen::MatrixXd(to_double(a, n, n, lda)));
    const MatrixD v = to_double(vectors, n, n, lda);  // row j: eigenvector j
    // fp32 solvers are backward stable: errors of a few n · eps · ||A||.
    const double tolerance = 4.0 * n * 1.2e-7 * reference.eigenvalues()(n - 1) + 1e-6;
    INFO("n " << n);
    for (int j = 0; j < n; ++j) {
      if (j > 0) REQUIRE(values[j] >= values[j - 1]);
      REQUIRE(std::abs(values[j] - reference.eigenvalues()(j)) <= tolerance);
      const Eigen::VectorXd vj = v.row(j).transpose();
      REQUIRE(std::abs(vj.norm() - 1.0) < 1e-5);
      REQUIRE((gram * vj - values[j] * vj).norm() <= tolerance);
    }
    REQUIRE((v * v.transpose() - MatrixD::Identity(n, n)).norm() < 1e-4);
    for (int r = 0; r < n; ++r) {
      for (int c = n; c < lda; ++c)
        REQUIRE(vectors[static_cast<std::size_t>(r) * lda + c] == 123.0f);
    }
  }
}

TEST_CASE("CUDA linalg: bad dimensions and non-finite input throw and change nothing",
          "[cuda][linalg]") {
  KVPACK_SKIP_WITHOUT_DEVICE();
  kc::CudaContext context(0);
  const std::vector<float> init{1, 2, 2, 5};
  auto da = upload(init);
  auto dc = upload(init);
  kc::DeviceBuffer<float> dw(2, 0);
  REQUIRE_THROWS_WITH(kc::gemm(context, false, false, 2, 2, 0, 1.0f, da.data(), 2, da.data(), 2,
                               0.0f, dc.data(), 2),
                      Catch::Contains("m, n, k") && Catch::Contains("all > 0"));
  REQUIRE_THROWS_WITH(
      kc::gemm(context, true, false, 2, 3, 2, 1.0f, da.data(), 1, da.data(), 3, 0.0f, dc.data(), 3),
      Catch::Contains("lda"));
  REQUIRE_THROWS_WITH(kc::gemm(context, false, false, 2, 2, 2, 1.0f, da.data(), 2, da.data(), 2,
                               0.0f, dc.data(), 1),
                      Catch::Contains("ldc"));
  REQUIRE_THROWS_WITH(kc::symmetric_eigen(context, 2, da.data(), 1, dw.data()),
                      Catch::Contains("lda"));
  REQUIRE(download(dc, 4) == init);
  auto bad = upload(std::vector<float>{1, NAN, NAN, 5});
  REQUIRE_THROWS_WITH(kc::symmetric_eigen(context, 2, bad.data(), 2, dw.data()),
                      Catch::Contains("NaN or infinity") || Catch::Contains("did not converge"));
  const auto after = download(bad, 4);
  REQUIRE(after[0] == 1.0f);
  REQUIRE(std::isnan(after[1]));
  REQUIRE(after[3] == 5.0f);
}
