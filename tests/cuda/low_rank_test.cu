// cuda::gram_factorize (the xKV / CSKV factorisation on the device) on seeded random matrices
// with decaying spectra: the Eckart–Young optimum, against a double-precision SVD; refusals.
#include <catch2/catch.hpp>
#include <random>
#include <vector>

#include "low_rank_checks.hpp"

namespace kc = kvpack::cuda;

namespace {

/// rows × cols with singular values decaying as decay^i, plus a little noise.
std::vector<float> decaying(int rows, int cols, double decay, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<double> gauss(0.0, 1.0);
  Eigen::MatrixXd u = Eigen::MatrixXd::NullaryExpr(rows, cols, [&] { return gauss(rng); });
  Eigen::MatrixXd v = Eigen::MatrixXd::NullaryExpr(cols, cols, [&] { return gauss(rng); });
  const Eigen::MatrixXd qu = Eigen::HouseholderQR<Eigen::MatrixXd>(u).householderQ() *
                             Eigen::MatrixXd::Identity(rows, cols);
  const Eigen::MatrixXd qv = Eigen::HouseholderQR<Eigen::MatrixXd>(v).householderQ();
  Eigen::VectorXd s(cols);
  for (int i = 0; i < cols; ++i) s(i) = 10.0 * std::pow(decay, i);
  const Eigen::MatrixXd x = qu * s.asDiagonal() * qv.transpose();
  std::vector<float> out(static_cast<std::size_t>(rows) * cols);
  for (int r = 0; r < rows; ++r) {
    for (int c = 0; c < cols; ++c) {
      out[static_cast<std::size_t>(r) * cols + c] = static_cast<float>(x(r, c) + 1e-3 * gauss(rng));
    }
  }
  return out;
}

}  // namespace

TEST_CASE("CUDA low rank: gram_factorize reaches the Eckart-Young optimum", "[cuda][low_rank]") {
  KVPACK_SKIP_WITHOUT_DEVICE();
  kvpack::test::require_gram_factorize_optimal(decaying(300, 96, 0.9, 1), 300, 96, 8, 1e-7);
  kvpack::test::require_gram_factorize_optimal(decaying(300, 96, 0.95, 2), 300, 96, 40, 1e-7);
  kvpack::test::require_gram_factorize_optimal(decaying(64, 64, 0.8, 3), 64, 64, 64, 1e-7);
  kvpack::test::require_gram_factorize_optimal(decaying(500, 192, 0.97, 4), 500, 192, 1, 1e-7);
}

TEST_CASE("CUDA low rank: bad rank or non-finite input throws and writes nothing",
          "[cuda][low_rank]") {
  KVPACK_SKIP_WITHOUT_DEVICE();
  kc::CudaContext context(0);
  std::vector<float> x(40 * 8, 1.0f);
  auto dx = kvpack::test::upload(x);
  std::vector<float> fill(40 * 8, 7.0f);
  auto basis = kvpack::test::upload(fill);
  auto factors = kvpack::test::upload(fill);
  std::vector<float> singular;
  REQUIRE_THROWS_WITH(
      kc::gram_factorize(context, dx.data(), 40, 8, 9, basis.data(), factors.data(), singular),
      Catch::Contains("rank") && Catch::Contains("min(rows, cols) = 8"));
  REQUIRE_THROWS_WITH(
      kc::gram_factorize(context, dx.data(), 40, 8, 0, basis.data(), factors.data(), singular),
      Catch::Contains("rank"));
  x[17] = NAN;
  auto bad = kvpack::test::upload(x);
  REQUIRE_THROWS(
      kc::gram_factorize(context, bad.data(), 40, 8, 2, basis.data(), factors.data(), singular));
  REQUIRE(kvpack::test::download(basis, fill.size()) == fill);
  REQUIRE(kvpack::test::download(factors, fill.size()) == fill);
  REQUIRE(singular.empty());
}
