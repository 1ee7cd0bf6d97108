/// \file cache.hpp
/// \brief KVCache<Policy, Backend>: the container engines hold. This header declares it and
/// brings in the CPU implementation; include <kvpack/backend/cuda.hpp> (nvcc) for backend::Cuda.
#pragma once

#include <cstdint>
#include <vector>

#include "backend/tags.hpp"

namespace kvpack {

/// \brief Dense fp32 copy of one (layer, kv-head) as returned by KVCache::materialize().
struct DenseHead {
  std::vector<float> k, v;         ///< tokens × head_dim, row-major
  std::vector<int64_t> positions;  ///< ascending
};

/// \brief Dense copy of one layer: one entry per kv head (heads may hold different counts).
struct DenseLayer {
  std::vector<DenseHead> heads;
};

/// \brief A compressed KV cache for a whole model.
/// \tparam Policy what is kept and how (Identity, L2NormEvict, ...).
/// \tparam Backend backend::Cpu or backend::Cuda; each backend specialises this template.
///
/// Life cycle: append() per layer (prefill chunks, then decode tokens) → observe() (queries, for
/// scoring policies) → compress() → attend() / materialize(). Storage is ragged per
/// (layer, kv-head); bytes() counts every byte held and dense_bytes() what an fp16 cache of the
/// appended tokens would hold.
template <class Policy, class Backend = backend::Cpu>
class KVCache {
  static_assert(detail::dependent_false<Policy, Backend>,
                "no KVCache implementation for this Backend: use backend::Cpu, or include "
                "<kvpack/backend/cuda.hpp> (compiled by nvcc) for backend::Cuda");
};

}  // namespace kvpack

#include "backend/cpu/cache.hpp"
