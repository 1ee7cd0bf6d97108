/// \file backend/cuda/emulation/context.hpp
/// \brief Execution contexts of the emulated grid's fibers: prepare one on a stack, switch
/// between two. Part of the CUDA emulation (emulation/grid.hpp).
///
/// On x86-64 (System V) a switch is a plain call that saves the callee-saved registers, MXCSR
/// and the x87 control word on the old stack and restores them from the new one: no system call
/// and no noreturn jump. Both matter: swapcontext's sigprocmask call, and the stack unpoisoning
/// AddressSanitizer does before every longjmp (a sigaltstack call plus a memset of the stack's
/// shadow), made each cost most of the emulated run time. Elsewhere, ucontext's swapcontext.
/// Not compatible with a hardware shadow stack (CET SHSTK, opt-in on Linux): the first switch
/// into a fiber returns to an address no call pushed.
#pragma once

#if !defined(KVPACK_CUDA_EMULATION)
#error "kvpack/backend/cuda/emulation/*.hpp are for host builds that define KVPACK_CUDA_EMULATION"
#endif

#include <cstddef>
#include <cstdint>

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

namespace kvpack {
namespace cuda {
namespace emulation {

#if defined(__x86_64__)

/// A suspended execution context: its stack pointer (the registers are on that stack).
struct Context {
  void* sp = nullptr;
};

/// Saves the running context in `*from_sp` and continues the one whose stack pointer is `to_sp`.
/// Returns when something switches back to `*from_sp`.
__attribute__((naked, noinline)) inline void switch_stacks(void** /*from_sp*/, void* /*to_sp*/) {
  asm volatile(
      "pushq %rbp\n\t"
      "pushq %rbx\n\t"
      "pushq %r12\n\t"
      "pushq %r13\n\t"
      "pushq %r14\n\t"
      "pushq %r15\n\t"
      "subq $8, %rsp\n\t"
      "stmxcsr (%rsp)\n\t"
      "fnstcw 4(%rsp)\n\t"
      "movq %rsp, (%rdi)\n\t"
      "movq %rsi, %rsp\n\t"
      "ldmxcsr (%rsp)\n\t"
      "fldcw 4(%rsp)\n\t"
      "addq $8, %rsp\n\t"
      "popq %r15\n\t"
      "popq %r14\n\t"
      "popq %r13\n\t"
      "popq %r12\n\t"
      "popq %rbx\n\t"
      "popq %rbp\n\t"
      "ret\n\t");
}

inline void switch_context(Context& from, Context& to) { switch_stacks(&from.sp, to.sp); }

/// Prepares `context` to run `entry` (which must never return) on `stack` [bytes] at its first
/// switch. The frame mirrors what switch_stacks pops: control words, six registers, return
/// address.
inline void make_context(Context& context, char* stack, std::size_t bytes, void (*entry)()) {
  auto top = reinterpret_cast<std::uintptr_t>(stack + bytes) & ~std::uintptr_t{15};
  auto* slot = reinterpret_cast<std::uint64_t*>(top);
  *--slot = 0;  // a null return address above entry's frame: unwinders stop there
  // `entry` starts as if called: its return address slot at a 16-byte boundary + 8.
  *--slot = reinterpret_cast<std::uint64_t>(entry);
  for (int r = 0; r < 6; ++r) *--slot = 0;  // rbp, rbx, r12-r15
  std::uint32_t mxcsr = 0;
  std::uint16_t fpu_control = 0;
  asm volatile("stmxcsr %0" : "=m"(mxcsr));
  asm volatile("fnstcw %0" : "=m"(fpu_control));
  *--slot = std::uint64_t{mxcsr} | (std::uint64_t{fpu_control} << 32);
  context.sp = slot;
}

#else

/// A suspended execution context (ucontext).
struct Context {
  ucontext_t uc{};
};

inline void switch_context(Context& from, Context& to) { swapcontext(&from.uc, &to.uc); }

inline void make_context(Context& context, char* stack, std::size_t bytes, void (*entry)()) {
  getcontext(&context.uc);
  context.uc.uc_stack.ss_sp = stack;
  context.uc.uc_stack.ss_size = bytes;
  context.uc.uc_link = nullptr;
  makecontext(&context.uc, entry, 0);
}

#endif

}  // namespace emulation
}  // namespace cuda
}  // namespace kvpack
