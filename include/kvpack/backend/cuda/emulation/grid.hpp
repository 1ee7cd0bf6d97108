/// \file backend/cuda/emulation/grid.hpp
/// \brief The emulated CUDA grid: runs a kernel's blocks on the calling CPU thread, each block's
/// threads as fibers with real barrier, warp-collective and shared-memory semantics.
///
/// Host builds that define KVPACK_CUDA_EMULATION run the kernels of backend/cuda/kernels/*.cuh
/// here, through the execution layer (kernels/exec.cuh), so CPU-only CI executes the same kernel
/// source a GPU runs. Blocks run one after another; the threads of a block are fibers switched
/// only at synchronisation points, which makes every run deterministic (contexts and switches:
/// emulation/context.hpp).
///
/// What a GPU would refuse is refused here too, with a kvpack::error naming the kernel:
/// - launch configuration: an empty grid or block, more than 1024 threads per block, a block
///   that is not whole warps, more threads than the kernel's launch bound, grid y/z > 65535;
/// - more than 48 KiB of static shared memory per block;
/// - a block barrier that some threads never reach while others wait (a deadlock on a GPU),
///   threads of one warp meeting at different warp collectives, and a full-mask warp collective
///   after some of its lanes have exited (undefined on a GPU).
/// Exited threads count as arrived at block barriers, as on current GPUs.
///
/// Not emulated: concurrency between blocks (a kernel that relies on inter-block ordering or
/// spins on another block's flag deadlocks or passes here), memory-model ordering, and the
/// distinction between host and device pointers inside a kernel.
#pragma once

#if !defined(KVPACK_CUDA_EMULATION)
#error "kvpack/backend/cuda/emulation/*.hpp are for host builds that define KVPACK_CUDA_EMULATION"
#endif

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <exception>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "../../../error.hpp"
#include "context.hpp"

#if defined(__SANITIZE_ADDRESS__)
#define KVPACK_EMULATION_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define KVPACK_EMULATION_ASAN 1
#endif
#endif
#if defined(KVPACK_EMULATION_ASAN)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif

namespace kvpack {
namespace cuda {
namespace emulation {

/// Grid / block extents and indices (CUDA's dim3 / uint3).
struct Dim3 {
  unsigned x = 1, y = 1, z = 1;
};

constexpr int kWarpSize = 32;
constexpr int kMaxBlockThreads = 1024;
constexpr std::size_t kStaticSharedBytes = 48 * 1024;  // the static __shared__ limit
constexpr std::size_t kFiberStackBytes = 256 * 1024;   // room for -O0 and sanitizer frames

/// The warp collectives a lane can wait at; lanes of one warp must meet at the same one.
enum class WarpOp { kNone, kSync, kShuffleXor, kShuffle, kBallot };

inline const char* warp_op_name(WarpOp op) {
  switch (op) {
    case WarpOp::kSync:
      return "sync_warp";
    case WarpOp::kShuffleXor:
      return "shfl_xor";
    case WarpOp::kShuffle:
      return "shfl";
    case WarpOp::kBallot:
      return "ballot";
    default:
      return "none";
  }
}

/// One emulated thread.
struct Fiber {
  enum class State { kReady, kAtBarrier, kAtWarpOp, kDone };
  Context context;       ///< where it continues at its next switch
  bool started = false;  ///< has run since its last make_context (its stack holds frames)
  std::unique_ptr<char[]> stack;
  Dim3 thread_idx;
  int linear = 0;  ///< thread index within the block (x fastest)
  State state = State::kReady;
  WarpOp op = WarpOp::kNone;
  uint64_t value = 0;   ///< what the lane contributes to the collective
  int argument = 0;     ///< xor mask or source lane
  uint64_t result = 0;  ///< what the collective hands back
#if defined(KVPACK_EMULATION_ASAN)
  void* fake_stack = nullptr;
#endif
};

/// One shared-memory declaration site of the running kernel and its place in the block's arena.
struct SharedSlot {
  const void* site;
  std::size_t offset;
  std::size_t bytes;
};

/// The block being run: its fibers, its shared memory and the scheduler's context.
struct BlockRun {
  const char* kernel = "";
  Dim3 grid_dim, block_dim, block_idx;
  std::vector<std::unique_ptr<Fiber>> fibers;  ///< the pool; the first `threads` run this launch
  int threads = 0;
  std::vector<SharedSlot> slots;
  std::size_t shared_used = 0;
  alignas(16) unsigned char shared[kStaticSharedBytes];
  Context scheduler;
  const std::function<void()>* body = nullptr;
  std::exception_ptr failure;
#if defined(KVPACK_EMULATION_ASAN)
  const void* scheduler_stack_bottom = nullptr;
  std::size_t scheduler_stack_size = 0;
#endif
};

/// The block and fiber running now (one grid at a time per host thread).
inline BlockRun*& current_block() {
  thread_local BlockRun* block = nullptr;
  return block;
}
inline Fiber*& current_fiber() {
  thread_local Fiber* fiber = nullptr;
  return fiber;
}

inline Fiber& self() {
  Fiber* fiber = current_fiber();
  if (fiber == nullptr) {
    throw error("kvpack CUDA emulation: a device function ran outside a kernel launch");
  }
  return *fiber;
}

// --- fiber switches (with AddressSanitizer's fiber annotations when it is on) ------------------

/// Fiber -> scheduler: the fiber stops at a synchronisation point or at the end of its block.
inline void yield_to_scheduler() {
  BlockRun& block = *current_block();
  Fiber& fiber = self();
#if defined(KVPACK_EMULATION_ASAN)
  __sanitizer_start_switch_fiber(&fiber.fake_stack, block.scheduler_stack_bottom,
                                 block.scheduler_stack_size);
#endif
  switch_context(fiber.context, block.scheduler);
#if defined(KVPACK_EMULATION_ASAN)
  __sanitizer_finish_switch_fiber(fiber.fake_stack, nullptr, nullptr);
#endif
}

/// Scheduler -> fiber: runs `fiber` until its next synchronisation point or its end.
inline void resume(BlockRun& block, Fiber& fiber) {
  current_fiber() = &fiber;
#if defined(KVPACK_EMULATION_ASAN)
  void* scheduler_fake_stack = nullptr;
  __sanitizer_start_switch_fiber(&scheduler_fake_stack, fiber.stack.get(), kFiberStackBytes);
#endif
  fiber.started = true;
  switch_context(block.scheduler, fiber.context);
#if defined(KVPACK_EMULATION_ASAN)
  __sanitizer_finish_switch_fiber(scheduler_fake_stack, nullptr, nullptr);
#endif
  current_fiber() = nullptr;
}

/// A fiber's whole life: run the kernel body for the block being run, park, repeat. Fibers are
/// kept from block to block and launch to launch (a new context per block cost a system call
/// per thread), so only the first launch on a host thread pays for starting them.
inline void fiber_entry() {
#if defined(KVPACK_EMULATION_ASAN)
  BlockRun& first = *current_block();
  __sanitizer_finish_switch_fiber(nullptr, &first.scheduler_stack_bottom,
                                  &first.scheduler_stack_size);
#endif
  for (;;) {
    BlockRun& block = *current_block();
    try {
      (*block.body)();
    } catch (...) {
      if (!block.failure) block.failure = std::current_exception();
    }
    self().state = Fiber::State::kDone;
    yield_to_scheduler();
  }
}

// --- what kernels call (through kernels/exec.cuh) ----------------------------------------------

inline void sync_block() {
  self().state = Fiber::State::kAtBarrier;
  yield_to_scheduler();
}

/// Waits until every lane of the warp arrives at the same collective; returns its result.
inline uint64_t warp_collective(WarpOp op, uint64_t value, int argument) {
  Fiber& fiber = self();
  fiber.state = Fiber::State::kAtWarpOp;
  fiber.op = op;
  fiber.value = value;
  fiber.argument = argument;
  yield_to_scheduler();
  return fiber.result;
}

/// Storage of the shared-memory declaration at `site` (one per kernel instantiation and
/// declaration): every thread of the block gets the same `bytes`, aligned to `alignment`.
inline void* shared_storage(const void* site, std::size_t bytes, std::size_t alignment) {
  BlockRun& block = *current_block();
  (void)self();
  for (const SharedSlot& slot : block.slots) {
    if (slot.site == site) return block.shared + slot.offset;
  }
  const std::size_t offset = (block.shared_used + alignment - 1) / alignment * alignment;
  if (offset + bytes > kStaticSharedBytes) {
    throw error(detail::concat("kvpack CUDA emulation: kernel ", block.kernel, " declares ",
                               offset + bytes, " bytes of static shared memory, over the ",
                               kStaticSharedBytes, "-byte limit"));
  }
  block.slots.push_back({site, offset, bytes});
  block.shared_used = offset + bytes;
  return block.shared + offset;
}

// --- the scheduler -----------------------------------------------------------------------------

inline std::string describe(const BlockRun& block) {
  std::string states;
  for (int t = 0; t < block.threads; ++t) {
    const Fiber& f = *block.fibers[static_cast<std::size_t>(t)];
    if (f.state == Fiber::State::kDone) continue;
    if (!states.empty()) states += ", ";
    states +=
        detail::concat("thread ", f.linear, " at ",
                       f.state == Fiber::State::kAtBarrier ? "sync_block" : warp_op_name(f.op));
    if (states.size() > 400) {
      states += ", ...";
      break;
    }
  }
  return detail::concat("kernel ", block.kernel, ", block (", block.block_idx.x, ", ",
                        block.block_idx.y, ", ", block.block_idx.z, "): ", states);
}

/// Releases the warps whose live lanes all wait at one collective; throws on divergence.
inline bool release_warps(BlockRun& block) {
  bool released = false;
  for (int w0 = 0; w0 < block.threads; w0 += kWarpSize) {
    Fiber* lanes[kWarpSize];
    for (int l = 0; l < kWarpSize; ++l)
      lanes[l] = block.fibers[static_cast<std::size_t>(w0 + l)].get();
    int waiting = 0, exited = 0, other = 0;
    WarpOp op = WarpOp::kNone;
    for (int l = 0; l < kWarpSize; ++l) {
      const Fiber& f = *lanes[l];
      if (f.state == Fiber::State::kAtWarpOp) {
        if (waiting > 0 && f.op != op) {
          throw error(detail::concat(
              "kvpack CUDA emulation: lanes of one warp at different warp "
              "collectives (",
              warp_op_name(op), " and ", warp_op_name(f.op), "); ", describe(block)));
        }
        op = f.op;
        ++waiting;
      } else if (f.state == Fiber::State::kDone) {
        ++exited;
      } else {
        ++other;
      }
    }
    if (waiting == 0 || other > 0) continue;
    if (exited > 0) {
      throw error(detail::concat("kvpack CUDA emulation: full-mask ", warp_op_name(op), " after ",
                                 exited, " lanes of the warp exited; ", describe(block)));
    }
    for (int l = 0; l < kWarpSize; ++l) {
      Fiber& f = *lanes[l];
      switch (op) {
        case WarpOp::kShuffleXor:
          f.result = lanes[(l ^ f.argument) & (kWarpSize - 1)]->value;
          break;
        case WarpOp::kShuffle:
          f.result = lanes[f.argument & (kWarpSize - 1)]->value;
          break;
        case WarpOp::kBallot: {
          uint64_t bits = 0;
          for (int m = 0; m < kWarpSize; ++m) bits |= (lanes[m]->value != 0 ? 1ull : 0ull) << m;
          f.result = bits;
          break;
        }
        default:
          f.result = 0;
      }
    }
    for (int l = 0; l < kWarpSize; ++l) lanes[l]->state = Fiber::State::kReady;
    released = true;
  }
  return released;
}

/// Runs one block to completion.
inline void run_block(BlockRun& block) {
  const int threads = block.threads;
  for (int t = 0; t < threads; ++t) {
    Fiber& f = *block.fibers[static_cast<std::size_t>(t)];
    f.state = Fiber::State::kReady;
    f.op = WarpOp::kNone;
  }
  block.slots.clear();
  block.shared_used = 0;
  // Shared memory starts as garbage on a GPU: all-ones bytes (NaN floats, -1 integers) make a
  // kernel that reads before it writes visibly wrong.
  std::memset(block.shared, 0xFF, sizeof(block.shared));
  for (;;) {
    for (int t = 0; t < threads; ++t) {
      Fiber& f = *block.fibers[static_cast<std::size_t>(t)];
      if (f.state == Fiber::State::kReady) resume(block, f);
    }
    if (block.failure) std::rethrow_exception(block.failure);
    int done = 0, at_barrier = 0;
    for (int t = 0; t < threads; ++t) {
      const Fiber& f = *block.fibers[static_cast<std::size_t>(t)];
      done += f.state == Fiber::State::kDone;
      at_barrier += f.state == Fiber::State::kAtBarrier;
    }
    if (done == threads) return;
    if (release_warps(block)) continue;
    if (at_barrier + done == threads) {
      for (int t = 0; t < threads; ++t) {
        Fiber& f = *block.fibers[static_cast<std::size_t>(t)];
        if (f.state == Fiber::State::kAtBarrier) f.state = Fiber::State::kReady;
      }
      continue;
    }
    throw error(
        detail::concat("kvpack CUDA emulation: deadlock (threads wait at different "
                       "barriers or collectives); ",
                       describe(block)));
  }
}

/// The host thread's fiber pool and block state (fibers persist between launches).
inline BlockRun& block_pool() {
  thread_local std::unique_ptr<BlockRun> pool(new BlockRun);
  return *pool;
}

/// Sets up fiber `f` to start from fiber_entry on its next resume (frames of an aborted launch
/// are dropped).
inline void restart(Fiber& f) {
  if (!f.stack) f.stack.reset(new char[kFiberStackBytes]);
#if defined(KVPACK_EMULATION_ASAN)
  if (f.started) __asan_unpoison_memory_region(f.stack.get(), kFiberStackBytes);
#endif
  f.started = false;
  make_context(f.context, f.stack.get(), kFiberStackBytes, fiber_entry);
}

/// Runs `body` as a kernel over `grid` x `block` threads. Throws kvpack::error for a launch
/// configuration a GPU refuses and for the faults listed in the file comment.
inline void launch(const char* kernel, Dim3 grid, Dim3 block_dim, int launch_bound,
                   const std::function<void()>& body) {
  const long long threads = 1ll * block_dim.x * block_dim.y * block_dim.z;
  const char* problem = nullptr;
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || threads == 0) {
    problem = "an empty grid or block";
  } else if (threads > kMaxBlockThreads) {
    problem = "more than 1024 threads per block";
  } else if (threads > launch_bound) {
    problem = "more threads per block than the kernel's launch bound";
  } else if (threads % kWarpSize != 0) {
    problem = "a block that is not whole warps (the kernels' warp collectives use full masks)";
  } else if (grid.y > 65535 || grid.z > 65535 || grid.x > 0x7FFFFFFFu) {
    problem = "a grid extent over the device limits";
  }
  if (problem != nullptr) {
    throw error(detail::concat("kvpack CUDA emulation: launch of ", kernel, " with grid (", grid.x,
                               ", ", grid.y, ", ", grid.z, ") and block (", block_dim.x, ", ",
                               block_dim.y, ", ", block_dim.z, "), launch bound ", launch_bound,
                               ": ", problem));
  }
  if (current_block() != nullptr) {
    throw error("kvpack CUDA emulation: a kernel launched from inside a kernel");
  }
  BlockRun& run = block_pool();
  run.kernel = kernel;
  run.grid_dim = grid;
  run.block_dim = block_dim;
  run.body = &body;
  run.failure = nullptr;
  run.threads = static_cast<int>(threads);
  while (run.fibers.size() < static_cast<std::size_t>(threads)) {
    run.fibers.push_back(std::make_unique<Fiber>());
    restart(*run.fibers.back());
  }
  int linear = 0;
  for (unsigned z = 0; z < block_dim.z; ++z) {
    for (unsigned y = 0; y < block_dim.y; ++y) {
      for (unsigned x = 0; x < block_dim.x; ++x, ++linear) {
        Fiber& f = *run.fibers[static_cast<std::size_t>(linear)];
        f.thread_idx = {x, y, z};
        f.linear = linear;
      }
    }
  }
  current_block() = &run;
  try {
    for (unsigned z = 0; z < grid.z; ++z) {
      for (unsigned y = 0; y < grid.y; ++y) {
        for (unsigned x = 0; x < grid.x; ++x) {
          run.block_idx = {x, y, z};
          run_block(run);
        }
      }
    }
  } catch (...) {
    // The block's fibers stopped mid-kernel: start them afresh next time.
    for (int t = 0; t < run.threads; ++t) {
      Fiber& f = *run.fibers[static_cast<std::size_t>(t)];
      if (f.state != Fiber::State::kDone) restart(f);
    }
    current_block() = nullptr;
    throw;
  }
  current_block() = nullptr;
}

}  // namespace emulation
}  // namespace cuda
}  // namespace kvpack
