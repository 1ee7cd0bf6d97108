/// \file backend/cuda.hpp
/// \brief KVCache<Policy, backend::Cuda>: ragged device storage per (layer, kv head), CUDA
/// kernels for append / scoring / selection / compaction / attention. Compile with nvcc.
///
/// Same API and same answers as KVCache<Policy, backend::Cpu> for BasicIdentity and the
/// score-based eviction policies (L2NormEvict): identical validation and error messages (the
/// checks of detail/validate.hpp run on the host before any device work, so a failed call
/// changes nothing), bit-identical fp16 storage, the kept set of detail/select.hpp, identical
/// bytes(), and attention within fp32 rounding of the CPU's.
///
/// Design notes
/// - Inputs are host views by default (copied to the device: one packed upload per call); pass
///   MemorySpace::kDevice to read device-resident views in place (the device value check then
///   runs on the device and reports the same element and message as the host check). Positions
///   are host arrays, but for the query positions of attend(), observe(), attend_observe() and
///   KVCacheBatch::attend(), which may be Positions::device views (checked on the host from a
///   copy while the device value checks are on). attend() writes the output view in the same
///   memory space as q.
/// - Storage: per (layer, kv head) device buffers of capacity rows (geometric growth on
///   append); eviction compacts into exact-size new buffers, so evicted rows free their memory.
///   bytes() counts held rows, positions and bookkeeping exactly as the CPU cache does (the
///   bookkeeping with the CPU's per-head / per-layer sizes, so both backends report the same
///   numbers for the same content); reserved_bytes() adds the growth slack, workspace_bytes()
///   is the reusable scratch of append / attend / compress.
/// - Selection: per-head budgets are selected on the device (radix select on a 64-bit key that
///   encodes select_top_k's order, see kernels/select.cuh). The global-threshold scope copies
///   the scores and positions to the host and reuses detail::select_global, so its ragged
///   result is the CPU's by construction; compaction then runs on the device for both scopes.
/// - A call waits for the device where the host needs a result, and at its end while the
///   context's device value checks are on (the default), so a CUDA fault is reported by the call
///   that caused it. With them off, attend(), observe(), attend_observe() and
///   KVCacheBatch::attend() on device views, and append() into allocated capacity, return with
///   their work enqueued (docs/cuda.md, "Streams and waits"). Calls on one
///   cache are serialised.
#pragma once

#if !defined(__CUDACC__) && !defined(KVPACK_CUDA_EMULATION)
#error \
    "kvpack/backend/cuda.hpp needs nvcc: compile this translation unit as CUDA (.cu)." \
    " Host-only code can include kvpack/backend/cuda/context.hpp; host builds that define" \
    " KVPACK_CUDA_EMULATION run the backend on the emulated grid (tests)."
#endif

#include "cuda/cache.cuh"
#include "cuda/cache_append.cuh"
#include "cuda/cache_attend.cuh"
#include "cuda/cache_batch.cuh"
#include "cuda/cache_checks.cuh"
#include "cuda/cache_evict.cuh"
#include "cuda/cache_factorize.cuh"
#include "cuda/cache_materialize.cuh"
#include "cuda/cache_memory.cuh"
#include "cuda/cache_observe.cuh"
#include "cuda/cache_quantize.cuh"
#include "cuda/cache_transfer.cuh"
#include "cuda/cache_truncate.cuh"
