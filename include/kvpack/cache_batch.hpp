/// \file cache_batch.hpp
/// \brief KVCacheBatch<Policy, Backend>: many sequences (by id), attended in one call. This header
/// declares it and brings in the CPU implementation (the CUDA one comes with
/// <kvpack/backend/cuda.hpp>).
#pragma once

#include <cstdint>

#include "backend/tags.hpp"
#include "cache.hpp"
#include "span.hpp"
#include "view.hpp"

namespace kvpack {

/// \brief One entry of a batched attend: query rows of one sequence (decode: one token; chunked
/// prefill: several). q: tokens × q_heads × head_dim (post-RoPE); out: the same shape (CUDA:
/// fp32); q and out in the memory space of the call; positions: one per query token, host memory
/// or (CUDA) Positions::device.
struct BatchQuery {
  int64_t sequence = 0;
  ActivationView q;
  Positions positions;
  OutputView out;
};

/// \brief The sequences of an engine's batch, each a KVCache<Policy, Backend>: add / remove by
/// id, fork(), and one attend() over a batch of (sequence, query rows). CPU
/// (backend/cpu/cache_batch.hpp): one PagePool shared by the sequences. CUDA
/// (backend/cuda/cache_batch.cuh, with <kvpack/backend/cuda.hpp>): one context, each sequence's
/// own device buffers, one attention launch per attend().
template <class Policy, class Backend = backend::Cpu>
class KVCacheBatch {
  static_assert(detail::dependent_false<Policy, Backend>,
                "no KVCacheBatch implementation for this Backend: use backend::Cpu, or "
                "backend::Cuda with <kvpack/backend/cuda.hpp>");
};

}  // namespace kvpack

#include "backend/cpu/cache_batch.hpp"
