/// \file linalg/truncated_svd.hpp
/// \brief Rank-r truncated SVD X ≈ U·diag(S)·Vᵀ of a tall-skinny fp32 matrix (tokens × channels),
/// the factorisation behind the low-rank policies (CrossLayerSVD, ChannelShrink).
///
/// Three routes, one result type:
///  - kBdc: Eigen::BDCSVD, truncated, screened and checked (bdc_svd). The exact reference;
///    slowest, never taken by kAuto.
///  - kGram: Gram matrix of the short side in double, its top r eigenpairs, the other factor by
///    one GEMM. Optimal error to fp32 precision for singular values down to ~1e-6·σ₁ (see
///    gram_svd below for the precision limit).
///  - kRandomized: Halko–Martinsson–Tropp range finder with power iterations. Within a few
///    percent of the optimal error; its cost grows with r, not with min(rows, cols)³.
/// kAuto picks one by shape (choose_svd_route).
///
/// Instantiation: every function here that touches an Eigen decomposition is a template (the
/// entry points through an unused `int` parameter with a default), so BDCSVD, JacobiSVD,
/// SelfAdjointEigenSolver and HouseholderQR are instantiated only in translation units that
/// call them. As plain inline functions they cost ~80 s of compile time in every file that
/// included <kvpack/kvpack.hpp> (GCC 12, measured), whether it used an SVD or not.
#pragma once

#include <Eigen/Core>
#include <Eigen/Eigenvalues>
#include <Eigen/QR>
#include <Eigen/SVD>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "../config.hpp"
#include "../error.hpp"
#include "matrix.hpp"

namespace kvpack {

/// \brief Which algorithm truncated_svd() runs.
enum class SvdRoute {
  kAuto,        ///< choose_svd_route(rows, cols, rank)
  kBdc,         ///< Eigen::BDCSVD (divide and conquer), truncated: the reference
  kGram,        ///< eigenpairs of the double-precision Gram matrix of the short side
  kRandomized,  ///< randomized range finder + SVD of the small projected matrix
};

/// \brief Knobs of truncated_svd(). `rank` has no default: the caller always says it.
struct SvdOptions {
  SvdRoute route = SvdRoute::kAuto;
  Eigen::Index rank = 0;         ///< r, in [1, min(rows, cols)]
  int power_iterations = 2;      ///< kRandomized: q, passes of (X Xᵀ) applied to the range sample
  int oversampling = 8;          ///< kRandomized: p, extra sample columns (sample width r + p)
  uint64_t seed = 0x6b7670616b;  ///< kRandomized: seed of the Gaussian test matrix Ω
};

/// \brief Rank-r factors X ≈ U·diag(S)·Vᵀ: U rows × r and V cols × r with orthonormal columns,
/// S the r largest singular values in descending order (≥ 0).
struct SvdFactors {
  Eigen::MatrixXf U;
  Eigen::VectorXf S;
  Eigen::MatrixXf V;
  SvdRoute route = SvdRoute::kAuto;  ///< the route that ran (never kAuto)
};

namespace detail {

// ---- Tunables (measured on the 2-vCPU Zen 3 machine kind; see choose_svd_route) ----------------

/// Below this short side, SelfAdjointEigenSolver computes every eigenvector faster than
/// tridiagonalisation + inverse iteration computes the top r.
constexpr Eigen::Index kFullEigenMaxSize = 96;
/// Eigenvalues closer than this (relative to ‖T‖) share a cluster whose inverse-iteration
/// vectors are re-orthogonalised against each other. Vectors of different clusters are
/// orthogonal to ~2·ε_double/kClusterGap ≈ 4e-9, far below fp32 resolution, so a wider (LAPACK:
/// 1e-3) gap would only add O(n·r²) re-orthogonalisation work.
constexpr double kClusterGap = 1e-7;
/// Inverse-iteration solves per eigenvector. With a shift accurate to ε·‖T‖ one solve leaves
/// components ~ε·‖T‖/gap ≤ 2e-9 along other eigenvectors outside the cluster; two leave none.
constexpr int kInverseIterations = 2;
/// Singular values below this fraction of σ₁ make U = X·V·S⁻¹ lose orthogonality in fp32 (the
/// columns of X·V carry rounding ~ε·‖X‖: measured max|UᵀU − I| ≈ 3e-9·σ₁/σ_r, 2.6e-4 at
/// σ_r = 1e-5·σ₁): U is then the orthonormal factor of a QR of X·V instead, which costs about
/// as much as the X·V product itself.
constexpr double kGuardRelative = 1e-3;
/// A BDCSVD triplet whose residual ‖X·v_i − σ_i·u_i‖ exceeds this fraction of σ₁ is wrong, not
/// inaccurate: fp32 rounding leaves ~1e-6.
constexpr double kTripletTolerance = 1e-3;
/// bdc_unsafe(): singular values at or below this fraction of σ₁ count as zeros (fp32 rounding of
/// an exactly rank-deficient X leaves ~1e-7·σ₁), and gaps at or below kBdcTie·σ₁ between non-zero
/// ones as ties (exact ties come out ~1e-7·σ₁ apart; a false alarm only costs Jacobi's time).
constexpr double kBdcZero = 1e-5;
constexpr double kBdcTie = 1e-6;
/// Rows of X converted to double at a time while accumulating the Gram matrix.
constexpr Eigen::Index kGramRowBlock = 256;

template <class Derived>
void check_svd_input(const Eigen::MatrixBase<Derived>& x, const SvdOptions& options) {
  constexpr const char* where = "truncated_svd";
  if (x.rows() == 0 || x.cols() == 0) {
    throw_arg(where, "x", concat(x.rows(), " x ", x.cols(), " matrix"),
              "at least one row and one column");
  }
  const Eigen::Index short_side = std::min(x.rows(), x.cols());
  require(options.rank >= 1 && options.rank <= short_side, where, "rank", options.rank,
          concat("in [1, min(rows, cols)] = [1, ", short_side, "]"));
  require(options.power_iterations >= 0, where, "power_iterations", options.power_iterations,
          ">= 0");
  require(options.oversampling >= 0, where, "oversampling", options.oversampling, ">= 0");
  const int route = static_cast<int>(options.route);
  require(route >= 0 && route <= static_cast<int>(SvdRoute::kRandomized), where, "route", route,
          "one of SvdRoute::kAuto, kBdc, kGram, kRandomized");
  if (!x.allFinite()) {
    // Locate the first bad entry only on failure: the check itself is one vectorised pass.
    for (Eigen::Index j = 0; j < x.cols(); ++j) {
      for (Eigen::Index i = 0; i < x.rows(); ++i) {
        if (!std::isfinite(x(i, j))) {
          throw_arg(where, "x", concat("non-finite value ", x(i, j), " at (", i, ", ", j, ")"),
                    "finite entries");
        }
      }
    }
  }
}

/// Replaces `y` (m × k, m ≥ k) by the thin Q of its Householder QR. Robust to rank deficiency: a
/// zero column gets an orthonormal completion instead of a division by zero.
template <int = 0>  // deferred: see "Instantiation" above
void orthonormalize_columns(Eigen::MatrixXf& y) {
  // Householder vectors come from squared norms, which over/underflow in fp32 for entries beyond
  // ~1e19 or below ~1e-19 (X of scale 1e30 gave NaN factors); Q does not depend on the scale.
  const float largest = y.cwiseAbs().maxCoeff();
  if (largest > 0.0f) y /= largest;
  const Eigen::HouseholderQR<Eigen::MatrixXf> qr(y);
  y.setIdentity();
  qr.householderQ().applyThisOnTheLeft(y);
}

/// U from M = X·V (columns σ_i·u_i) and S. The division is exact in theory, but a column of M
/// carries fp32 rounding ~ε·‖X‖, so U = M·S⁻¹ drifts from orthonormal as σ_i/σ₁ shrinks; then
/// the QR of M gives an orthonormal U spanning the same columns (signs matched to M).
template <int = 0>
Eigen::MatrixXf left_factor(Eigen::MatrixXf m, const Eigen::VectorXf& s) {
  const float s0 = s.size() > 0 ? s(0) : 0.0f;
  const bool guarded = s0 > 0.0f && s.minCoeff() >= static_cast<float>(kGuardRelative) * s0;
  if (guarded) {
    for (Eigen::Index i = 0; i < m.cols(); ++i) m.col(i) /= s(i);
    return m;
  }
  Eigen::MatrixXf q = m;
  orthonormalize_columns(q);
  for (Eigen::Index i = 0; i < q.cols(); ++i) {
    if (q.col(i).dot(m.col(i)) < 0.0f) q.col(i) = -q.col(i);
  }
  return q;
}

/// LU with partial pivoting of the tridiagonal T − λI (LAPACK dgttrf), for inverse iteration.
/// Pivots smaller than `tiny` are replaced by ±tiny: T − λI is singular to working precision by
/// design, and the huge solution that results *is* the eigenvector direction.
struct TridiagonalLu {
  std::vector<double> dl, d, du, du2;
  std::vector<char> swapped;

  void factor(const Eigen::VectorXd& diag, const Eigen::VectorXd& sub, double lambda, double tiny) {
    const Eigen::Index n = diag.size();
    dl.assign(sub.data(), sub.data() + sub.size());
    du = dl;
    du2.assign(static_cast<std::size_t>(std::max<Eigen::Index>(n - 2, 0)), 0.0);
    d.resize(n);
    for (Eigen::Index i = 0; i < n; ++i) d[i] = diag(i) - lambda;
    swapped.assign(static_cast<std::size_t>(std::max<Eigen::Index>(n - 1, 0)), 0);
    for (Eigen::Index i = 0; i + 1 < n; ++i) {
      if (std::abs(d[i]) >= std::abs(dl[i])) {
        if (d[i] != 0.0) {
          const double f = dl[i] / d[i];
          dl[i] = f;
          d[i + 1] -= f * du[i];
        }
      } else {
        const double f = d[i] / dl[i];
        d[i] = dl[i];
        dl[i] = f;
        const double t = du[i];
        du[i] = d[i + 1];
        d[i + 1] = t - f * d[i + 1];
        if (i + 2 < n) {
          du2[i] = du[i + 1];
          du[i + 1] = -f * du[i + 1];
        }
        swapped[i] = 1;
      }
    }
    for (double& p : d) {
      if (std::abs(p) < tiny) p = p < 0.0 ? -tiny : tiny;
    }
  }

  /// b ← (T − λI)⁻¹ b.
  void solve(double* b) const {
    const std::size_t n = d.size();
    for (std::size_t i = 0; i + 1 < n; ++i) {
      if (!swapped[i]) {
        b[i + 1] -= dl[i] * b[i];
      } else {
        const double t = b[i];
        b[i] = b[i + 1];
        b[i + 1] = t - dl[i] * b[i];
      }
    }
    b[n - 1] /= d[n - 1];
    if (n > 1) b[n - 2] = (b[n - 2] - du[n - 2] * b[n - 1]) / d[n - 2];
    for (std::size_t k = n - 2; k-- > 0;) {
      b[k] = (b[k] - du[k] * b[k + 1] - du2[k] * b[k + 2]) / d[k];
    }
  }
};

/// \brief Top `r` eigenpairs of the symmetric matrix `g` (lower triangle read), eigenvalues
/// descending. Eigen's SelfAdjointEigenSolver spends ~90 % of its time accumulating every
/// eigenvector (O(n³) Givens rotations); for r ≪ n this tridiagonalises, takes the eigenvalues
/// alone, finds the r wanted eigenvectors of the tridiagonal by inverse iteration (LAPACK
/// dstein, O(n) per solve) and back-transforms them with the Householder reflectors (O(n²r)).
/// Falls back to the full solver for small n or if inverse iteration ever produces a
/// non-finite vector.
template <int = 0>
void top_eigenpairs(Eigen::MatrixXd& g, Eigen::Index r, Eigen::VectorXd& values,
                    Eigen::MatrixXd& vectors) {
  const Eigen::Index n = g.rows();
  auto full_solver = [&] {
    const Eigen::SelfAdjointEigenSolver<Eigen::MatrixXd> es(g);
    values = es.eigenvalues().reverse().head(r);
    vectors = es.eigenvectors().rightCols(r).rowwise().reverse();
  };
  if (n <= kFullEigenMaxSize) return full_solver();

  // Scale to unit magnitude as SelfAdjointEigenSolver does, so the tolerances below are relative.
  double scale = 0.0;
  for (Eigen::Index j = 0; j < n; ++j)
    scale = std::max(scale, g.col(j).tail(n - j).cwiseAbs().maxCoeff());
  if (scale == 0.0) {
    values.setZero(r);
    vectors = Eigen::MatrixXd::Identity(n, r);
    return;
  }
  g.triangularView<Eigen::Lower>() /= scale;
  const Eigen::Tridiagonalization<Eigen::MatrixXd> tri(g);
  const Eigen::VectorXd diag = tri.diagonal();
  const Eigen::VectorXd sub = tri.subDiagonal();
  Eigen::SelfAdjointEigenSolver<Eigen::MatrixXd> es;
  es.computeFromTridiagonal(diag, sub, Eigen::EigenvaluesOnly);
  const Eigen::VectorXd lambda = es.eigenvalues().reverse().head(r);  // descending

  double t_norm = 0.0;
  for (Eigen::Index i = 0; i < n; ++i) {
    const double off = (i > 0 ? std::abs(sub(i - 1)) : 0.0) + (i + 1 < n ? std::abs(sub(i)) : 0.0);
    t_norm = std::max(t_norm, std::abs(diag(i)) + off);
  }
  const double eps = std::numeric_limits<double>::epsilon();
  const double tiny = eps * t_norm;
  const double separation = 10.0 * eps * t_norm;  // dstein's PERTOL: split equal eigenvalues

  Eigen::MatrixXd z(n, r);
  Eigen::VectorXd b(n);
  TridiagonalLu lu;
  std::mt19937_64 rng(0x7d1a6);
  std::uniform_real_distribution<double> uniform(-1.0, 1.0);
  Eigen::Index cluster_begin = 0;
  double shift_prev = 0.0;
  bool ok = true;
  for (Eigen::Index k = 0; k < r && ok; ++k) {
    double shift = lambda(k);
    if (k > 0) {
      if (lambda(k - 1) - lambda(k) > kClusterGap * t_norm) cluster_begin = k;
      // Equal shifts would give the same vector twice; nudge apart so each solve differs.
      if (shift_prev - shift < separation) shift = shift_prev - separation;
    }
    shift_prev = shift;
    lu.factor(diag, sub, shift, tiny);
    for (Eigen::Index i = 0; i < n; ++i) b(i) = uniform(rng);
    for (int it = 0; it < kInverseIterations && ok; ++it) {
      b /= b.cwiseAbs().maxCoeff();  // keep the growth of the solve inside double range
      lu.solve(b.data());
      const double norm = b.norm();
      ok = norm > 0.0 && std::isfinite(norm);
      b /= norm;
    }
    if (ok && k > cluster_begin) {
      // Classical Gram-Schmidt, twice ("twice is enough"), against this cluster's vectors, once
      // after the solves (LAPACK's dstein does it inside every iteration). Inside a cluster the
      // solves amplify the whole cluster subspace alike, so a random start keeps a component
      // orthogonal to the vectors found so far that is at worst a few orders of magnitude below
      // the rest: double has the digits to spare, and this costs a third of the per-iteration
      // version, which dominated for r ≳ n/4 on spectra with a flat tail.
      const auto previous = z.middleCols(cluster_begin, k - cluster_begin);
      for (int pass = 0; pass < 2; ++pass) b -= previous * (previous.transpose() * b);
      const double norm = b.norm();
      ok = norm > 0.0 && std::isfinite(norm);
      b /= norm;
    }
    z.col(k) = b;
  }
  if (!ok) {
    g.triangularView<Eigen::Lower>() *= scale;
    return full_solver();
  }
  values = lambda * scale;
  vectors = tri.matrixQ() * z;
}

// ---- Routes ------------------------------------------------------------------------------------

/// Largest residual ‖X·v_i − σ_i·u_i‖ over the returned triplets, relative to σ₁.
template <class Derived>
double triplet_residual(const Eigen::MatrixBase<Derived>& x, const SvdFactors& f) {
  if (f.S.size() == 0 || f.S(0) == 0.0f) return 0.0;
  const Eigen::MatrixXf r = x * f.V - f.U * f.S.asDiagonal();
  return r.colwise().norm().maxCoeff() / f.S(0);
}

/// G = XᵀX of a tall X (rows ≥ cols) in double, lower triangle, accumulated from fp32 row blocks:
/// each product of two fp32 numbers is exact in double, so G carries only ~ε_double·‖X‖² error.
template <class Derived>
Eigen::MatrixXd gram_matrix(const Eigen::MatrixBase<Derived>& x) {
  const Eigen::Index m = x.rows(), n = x.cols();
  Eigen::MatrixXd g = Eigen::MatrixXd::Zero(n, n);
  Eigen::MatrixXd block;
  for (Eigen::Index r0 = 0; r0 < m; r0 += kGramRowBlock) {
    const Eigen::Index rows = std::min(kGramRowBlock, m - r0);
    block = x.middleRows(r0, rows).template cast<double>();
    g.selfadjointView<Eigen::Lower>().rankUpdate(block.transpose());
  }
  return g;
}

/// Whether Eigen's BDCSVD must not see `x`: its singular values (from the double Gram matrix of
/// the short side) include numerical zeros (≤ kBdcZero·σ₁) and ties among the others (gaps
/// ≤ kBdcTie·σ₁), or X is zero. On such inputs (e.g. stacked copies of one layer whose spectrum is
/// flat) Eigen 3.4.0's deflation pairs singular vectors wrongly (caught afterwards by the triplet
/// check) and reads out of bounds (perturbCol0 indexes perm(-1), tensorflow/tensorflow#9234),
/// which no check afterwards can undo: measured on 512 × 256 stacks of 4 copies of a rank-8 or
/// rank-64 layer with equal singular values, an assertion failure with assertions on and a
/// segfault or wrong triplets in 1–2 of 8 seeds with -O3 -DNDEBUG. Zeros alone (duplicated or zero
/// columns of a random matrix) and ties alone (orthonormal columns) ran correctly. Costs the Gram
/// matrix and its eigenvalues, a fraction of BDC's time.
template <class Derived>
bool bdc_unsafe(const Eigen::MatrixBase<Derived>& x) {
  const Eigen::MatrixXd g = x.rows() >= x.cols() ? gram_matrix(x) : gram_matrix(x.transpose());
  const Eigen::SelfAdjointEigenSolver<Eigen::MatrixXd> es(g, Eigen::EigenvaluesOnly);
  const Eigen::VectorXd sigma = es.eigenvalues().reverse().cwiseMax(0.0).cwiseSqrt();
  const double s1 = sigma(0);
  if (!(s1 > 0.0)) return true;
  Eigen::Index nonzero = 0;
  while (nonzero < sigma.size() && sigma(nonzero) > kBdcZero * s1) ++nonzero;
  if (nonzero == sigma.size()) return false;
  for (Eigen::Index i = 0; i + 1 < nonzero; ++i) {
    if (sigma(i) - sigma(i + 1) <= kBdcTie * s1) return true;
  }
  return false;
}

/// The exact reference: Eigen's BDCSVD, screened by bdc_unsafe() and checked afterwards (Eigen
/// 3.4's BDCSVD can pair singular vectors wrongly when singular values repeat to working precision
/// next to exact zeros: ‖X − USVᵀ‖ reaches ‖X‖/3 although U and V are each orthonormal; seen in
/// fp32 and fp64). One GEMM checks every returned triplet. Inputs screened out, and triplets that
/// fail the check, go to JacobiSVD with a QR preconditioner (correct, ~20× slower).
template <class Derived>
SvdFactors bdc_svd(const Eigen::MatrixBase<Derived>& x, Eigen::Index r) {
  SvdFactors f;
  f.route = SvdRoute::kBdc;
  if (!bdc_unsafe(x)) {
    const Eigen::BDCSVD<Eigen::MatrixXf> svd(x, Eigen::ComputeThinU | Eigen::ComputeThinV);
    f.U = svd.matrixU().leftCols(r);
    f.S = svd.singularValues().head(r);
    f.V = svd.matrixV().leftCols(r);
    if (triplet_residual(x, f) <= kTripletTolerance) return f;
  }
  const Eigen::JacobiSVD<Eigen::MatrixXf, Eigen::ColPivHouseholderQRPreconditioner> svd(
      x, Eigen::ComputeThinU | Eigen::ComputeThinV);
  f.U = svd.matrixU().leftCols(r);
  f.S = svd.singularValues().head(r);
  f.V = svd.matrixV().leftCols(r);
  return f;
}

/// Gram route for rows ≥ cols. G = XᵀX is accumulated in double from fp32 blocks: each product
/// of two fp32 numbers is exact in double, so G carries only ~ε_double·‖X‖² error and its
/// eigenvalues resolve σ_i down to ~1e-8·σ₁ (an fp32 G stops at ~3e-4·σ₁ because it squares
/// the condition number: σ_i² below ε_float·σ₁² drowns). The remaining limit is U = X·V·S⁻¹ in
/// fp32, whose columns carry error ~ε_float·‖X‖/σ_i; left_factor() switches to a QR below
/// kGuardRelative·σ₁.
template <class Derived>
SvdFactors gram_svd_tall(const Eigen::MatrixBase<Derived>& x, Eigen::Index r) {
  Eigen::MatrixXd g = gram_matrix(x);
  Eigen::VectorXd lambda;
  Eigen::MatrixXd v;
  top_eigenpairs(g, r, lambda, v);
  SvdFactors f;
  f.S = lambda.cwiseMax(0.0).cwiseSqrt().cast<float>();
  f.V = v.cast<float>();
  Eigen::MatrixXf xv = x * f.V;
  f.U = left_factor(std::move(xv), f.S);
  f.route = SvdRoute::kGram;
  return f;
}

template <class Derived>
SvdFactors gram_svd(const Eigen::MatrixBase<Derived>& x, Eigen::Index r) {
  if (x.rows() >= x.cols()) return gram_svd_tall(x, r);
  // Wide: the Gram matrix of the short side is XXᵀ, i.e. the tall route on Xᵀ with U, V swapped.
  SvdFactors f = gram_svd_tall(x.transpose(), r);
  f.U.swap(f.V);
  return f;
}

/// Halko, Martinsson & Tropp (2011), algorithms 4.4 + 5.1: Q = orth((XXᵀ)^q X Ω) with
/// re-orthonormalisation between every multiply (plain powers lose the small directions to fp32
/// rounding), B = QᵀX (l × cols), SVD of B, U = Q·U_B.
template <class Derived>
SvdFactors randomized_svd(const Eigen::MatrixBase<Derived>& x, const SvdOptions& options) {
  const Eigen::Index m = x.rows(), n = x.cols(), r = options.rank;
  const Eigen::Index l = std::min<Eigen::Index>(r + options.oversampling, std::min(m, n));
  Eigen::MatrixXf omega(n, l);
  std::mt19937_64 rng(options.seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (Eigen::Index j = 0; j < l; ++j) {
    for (Eigen::Index i = 0; i < n; ++i) omega(i, j) = normal(rng);
  }
  Eigen::MatrixXf q = x * omega;  // m × l
  orthonormalize_columns(q);
  Eigen::MatrixXf w(n, l);
  for (int it = 0; it < options.power_iterations; ++it) {
    w.noalias() = x.transpose() * q;
    orthonormalize_columns(w);
    q.noalias() = x * w;
    orthonormalize_columns(q);
  }
  // B = QᵀX is small (l × cols) and its condition number is X's. Its SVD goes through the Gram
  // route (double Gram matrix of the l-side), which is accurate far below the randomized
  // route's own error and sidesteps BDCSVD's repeated-singular-value failure (see bdc_svd).
  const Eigen::MatrixXf b = q.transpose() * x;
  SvdFactors small = gram_svd(b, r);
  SvdFactors f;
  f.U.noalias() = q * small.U;
  f.S = std::move(small.S);
  f.V = std::move(small.V);
  f.route = SvdRoute::kRandomized;
  return f;
}

}  // namespace detail

/// \brief The route kAuto takes for a rows × cols matrix at rank r (orientation does not matter).
///
/// A cost model fitted to 56 timings (1 thread, 2-vCPU Zen 3, shapes 256…8192 × 64…2048, ranks
/// n/16…n/2; m = long side, n = short side, l = min(r + p, n), q power iterations), seconds:
///   Gram        5.2e-11·m·n² (double Gram matrix) + 4.0e-10·n³ (tridiagonalisation)
///             + 2.0e-10·m·n·r (X·V, the guard's QR, eigenvector back-transform)
///   randomized  8.5e-11·(2q + 2)·m·n·l (GEMMs) + 2.7e-10·(q + 1)·m·l² (Householder QRs)
///             + 2.1e-9·l³ (SVD of the small B)
/// Randomized gives away 0.1–4 % of Frobenius error on spectra with a flat tail, so it is taken
/// only when predicted at least 25 % faster than Gram. The rule picks the faster route in 45 of
/// the 56 cases; the misses cost ≤ 1.5× (sub-millisecond matrices aside), the worst being
/// n = 2048 at r = n/2, where the memory-bound tridiagonalisation outgrows its n³ term. BDC is
/// never chosen: it was the slowest route on every shape measured (3–10× Gram) and Gram's double
/// Gram matrix matches its accuracy. Examples: 8192 × 768, r = 192 → Gram; 8192 × 960, r = 120 →
/// randomized; 32768 × 4096, r = 384 → randomized.
inline SvdRoute choose_svd_route(Eigen::Index rows, Eigen::Index cols, Eigen::Index rank,
                                 const SvdOptions& options = {}) {
  const double m = static_cast<double>(std::max(rows, cols));
  const double n = static_cast<double>(std::min(rows, cols));
  const double r = static_cast<double>(rank);
  const double l = std::min(static_cast<double>(rank) + options.oversampling, n);
  const double q = options.power_iterations;
  const double gram = 5.2e-11 * m * n * n + 4.0e-10 * n * n * n + 2.0e-10 * m * n * r;
  const double randomized =
      8.5e-11 * (2.0 * q + 2.0) * m * n * l + 2.7e-10 * (q + 1.0) * m * l * l + 2.1e-9 * l * l * l;
  return randomized < 0.75 * gram ? SvdRoute::kRandomized : SvdRoute::kGram;
}

namespace detail {

template <class Derived>
SvdFactors truncated_svd_impl(const Eigen::MatrixBase<Derived>& x, const SvdOptions& options) {
  check_svd_input(x, options);
  SvdRoute route = options.route;
  if (route == SvdRoute::kAuto) route = choose_svd_route(x.rows(), x.cols(), options.rank, options);
  switch (route) {
    case SvdRoute::kBdc:
      return bdc_svd(x, options.rank);
    case SvdRoute::kGram:
      return gram_svd(x, options.rank);
    default:
      return randomized_svd(x, options);
  }
}

template <class Derived>
double frobenius_error_impl(const Eigen::MatrixBase<Derived>& x, const Eigen::MatrixXf& u,
                            const Eigen::VectorXf& s, const Eigen::MatrixXf& v) {
  constexpr const char* where = "frobenius_error";
  require(s.size() == u.cols() && s.size() == v.cols(), where, "S.size()", s.size(),
          concat("U.cols() = ", u.cols(), " = V.cols() = ", v.cols()));
  require(u.rows() == x.rows(), where, "U.rows()", u.rows(), concat("X.rows() = ", x.rows()));
  require(v.rows() == x.cols(), where, "V.rows()", v.rows(), concat("X.cols() = ", x.cols()));
  // In double, by row blocks: the error of a near-optimal factorisation is a small difference of
  // large numbers, and fp32 rounding (~1e-7·‖X‖) would blur a 1.0001× comparison.
  const Eigen::MatrixXd vs = v.cast<double>() * s.cast<double>().asDiagonal();
  double sum = 0.0;
  for (Eigen::Index r0 = 0; r0 < x.rows(); r0 += kGramRowBlock) {
    const Eigen::Index rows = std::min(kGramRowBlock, x.rows() - r0);
    const Eigen::MatrixXd diff = x.middleRows(r0, rows).template cast<double>() -
                                 u.middleRows(r0, rows).cast<double>() * vs.transpose();
    sum += diff.squaredNorm();
  }
  return std::sqrt(sum);
}

}  // namespace detail

/// \brief Rank-`options.rank` truncated SVD of `x` (column-major or any strided view).
/// \throws kvpack::error on an empty or non-finite `x` or a rank outside [1, min(rows, cols)].
template <int = 0>
SvdFactors truncated_svd(const Eigen::Ref<const Eigen::MatrixXf>& x, const SvdOptions& options) {
  return detail::truncated_svd_impl(x, options);
}

/// \brief Rank-`options.rank` truncated SVD of row-major token × channel data as the caches hold
/// it, without a copy.
template <int = 0>
SvdFactors truncated_svd(const Eigen::Map<const RowMajorMatrixXf>& x, const SvdOptions& options) {
  return detail::truncated_svd_impl(x, options);
}

/// \brief Eckart–Young optimum of a rank-r approximation: sqrt(Σ_{i ≥ r} σ_i²) over the full
/// spectrum `singular_values` (0-based i, any order of the tail does not matter).
inline double optimal_truncation_error(const Eigen::Ref<const Eigen::VectorXf>& singular_values,
                                       Eigen::Index r) {
  detail::require(r >= 0 && r <= singular_values.size(), "optimal_truncation_error", "r", r,
                  detail::concat("in [0, ", singular_values.size(), "]"));
  return std::sqrt(singular_values.tail(singular_values.size() - r).cast<double>().squaredNorm());
}

/// \brief ‖X − U·diag(S)·Vᵀ‖_F, accumulated in double.
template <int = 0>
double frobenius_error(const Eigen::Ref<const Eigen::MatrixXf>& x, const Eigen::MatrixXf& u,
                       const Eigen::VectorXf& s, const Eigen::MatrixXf& v) {
  return detail::frobenius_error_impl(x, u, s, v);
}

/// \brief ‖X − U·diag(S)·Vᵀ‖_F of row-major X, accumulated in double.
template <int = 0>
double frobenius_error(const Eigen::Map<const RowMajorMatrixXf>& x, const Eigen::MatrixXf& u,
                       const Eigen::VectorXf& s, const Eigen::MatrixXf& v) {
  return detail::frobenius_error_impl(x, u, s, v);
}

/// \brief ‖X − U·diag(S)·Vᵀ‖_F of a factorisation returned by truncated_svd().
template <int = 0>
double frobenius_error(const Eigen::Ref<const Eigen::MatrixXf>& x, const SvdFactors& f) {
  return detail::frobenius_error_impl(x, f.U, f.S, f.V);
}

/// \brief ‖X − U·diag(S)·Vᵀ‖_F of row-major X and a factorisation returned by truncated_svd().
template <int = 0>
double frobenius_error(const Eigen::Map<const RowMajorMatrixXf>& x, const SvdFactors& f) {
  return detail::frobenius_error_impl(x, f.U, f.S, f.V);
}

}  // namespace kvpack
