// Build-time check: a translation unit that uses only L2NormEvict on the CPU pays for rows and
// eviction, not for the SVD / eigen-solvers (CrossLayerSVD, ChannelShrink calibration) or the
// KIVI kernels (Quantize). It fails to compile when a header starts pulling them in.
#include <kvpack/cache.hpp>
#include <kvpack/policy/l2_norm_evict.hpp>

#if defined(EIGEN_SVD_MODULE_H) || defined(EIGEN_EIGENVALUES_MODULE_H) || \
    defined(EIGEN_QR_MODULE_H) || defined(EIGEN_CHOLESKY_MODULE_H) || defined(EIGEN_LU_MODULE_H)
#error "an L2NormEvict-only translation unit includes Eigen's decompositions"
#endif

// Redefinitions fail to compile if the KIVI or low-rank stores were included. This object is
// never linked into a program, so the stand-ins below cannot break the one-definition rule.
namespace kvpack {
namespace detail {
struct QuantizedHeadStore {};
struct LowRankHeadStore {};
}  // namespace detail
}  // namespace kvpack

int kvpack_l2_only_check() {
  kvpack::ModelShape shape;
  shape.layers = 1;
  shape.q_heads = 2;
  shape.kv_heads = 1;
  shape.head_dim = 8;
  kvpack::KVCache<kvpack::L2NormEvict> cache(shape);
  cache.compress();
  return static_cast<int>(cache.bytes());
}
