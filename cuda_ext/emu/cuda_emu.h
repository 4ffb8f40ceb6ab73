// A small CPU emulation of the CUDA features that sere_reroute_kernels.cuh uses, so that tests run the
// kernels' exact device code on machines without a GPU (g++ only, no CUDA toolkit needed).
//
// Execution model: a launch runs its blocks one after another; inside a block every CUDA thread is a
// fiber (its own stack) on the calling OS thread, switched cooperatively at barriers. Provided:
//   __global__/__device__/__host__/__forceinline__/__launch_bounds__/__shared__ (static storage, one
//   block at a time), threadIdx/blockIdx/blockDim/gridDim (x only), dim3, __syncthreads,
//   __shfl_xor_sync, __any_sync, atomicOr/atomicAdd (unsigned), __threadfence, __popc, min,
//   __nv_bfloat16/__half with their float conversions (both ways, round to nearest even), __fmul_rn,
//   cudaError_t/cudaStream_t/cudaMemsetAsync/cudaGetLastError.
// Checked strictly, where a GPU would hang or give undefined results:
//   - a barrier (__syncthreads: the whole block; warp intrinsics: the 32 lanes) must be reached by
//     every thread that shares it: a thread that exits or waits elsewhere is reported as divergence;
//   - warp intrinsics must use the full mask and width 32, and blockDim must be a multiple of 32.
// Launch errors are sticky and reported by cudaGetLastError() with emu::last_error() giving the text.
// Not modelled: memory ordering between threads outside barriers (fibers see each other's stores at
// once), timing, and anything about performance.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

// x86-64 switches stacks with the few instructions below; elsewhere (or with -DSERE_EMU_UCONTEXT, which
// the tests use to cover this path) with ucontext (a system call per switch: the
// parity tests ran about 7x slower with it on this project's x86-64 CI machine).
#if defined(__x86_64__) && !defined(SERE_EMU_UCONTEXT)
#define SERE_EMU_ASM_SWITCH 1
#else
#define SERE_EMU_ASM_SWITCH 0
#include <ucontext.h>
#endif

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __launch_bounds__(...)
#define __shared__ static

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
};

enum cudaError_t : int { cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorLaunchFailure = 719 };
using cudaStream_t = void*;

inline int min(int a, int b) { return a < b ? a : b; }

// Storage formats as on the GPU; conversions are exact widenings.
struct __nv_bfloat16 {
  uint16_t bits;
};
struct __half {
  _Float16 value;
};
inline float __bfloat162float(__nv_bfloat16 x) {
  const uint32_t u = static_cast<uint32_t>(x.bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
inline float __half2float(__half x) { return static_cast<float>(x.value); }
inline __nv_bfloat16 __float2bfloat16(float f) {  // round to nearest even, NaN stays a quiet NaN
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  if (std::isnan(f)) return __nv_bfloat16{static_cast<uint16_t>((u >> 16) | 0x40)};
  u += 0x7fff + ((u >> 16) & 1);
  return __nv_bfloat16{static_cast<uint16_t>(u >> 16)};
}
inline __half __float2half(float f) { return __half{static_cast<_Float16>(f)}; }
// A float32 product rounded to nearest even (never contracted into an FMA, as on the GPU).
__attribute__((optimize("fp-contract=off"))) inline float __fmul_rn(float a, float b) { return a * b; }

// Internal linkage throughout: g++ would otherwise emit the inline functions' statics (the emulator's
// state) as process-wide unique symbols, and two emulation libraries in one process (a variant build,
// a mutated kernel in a test) would share one State.
namespace emu {
namespace {

constexpr size_t kStackBytes = 64 * 1024;

#if SERE_EMU_ASM_SWITCH
// switch_stack(save, load): push the callee-saved registers and the SSE/x87 control words, store the
// stack pointer in *save, load `load`, pop the same from it, return into the other context.
extern "C" void sere_emu_switch_stack(void** save, void* load);
asm(R"(
  .text
  .globl sere_emu_switch_stack
  .hidden sere_emu_switch_stack
  .type sere_emu_switch_stack,@function
sere_emu_switch_stack:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size sere_emu_switch_stack, .-sere_emu_switch_stack
  .section .note.GNU-stack,"",@progbits
  .text
)");
#endif

struct Barrier {
  int expected = 0;
  int arrived = 0;
  uint64_t generation = 0;
};

struct Fiber {
  dim3 tid;
  int linear = 0;
  bool done = false;
  Barrier* waiting = nullptr;  // blocked until waiting->generation != wait_generation
  uint64_t wait_generation = 0;
  const char* wait_what = nullptr;
#if SERE_EMU_ASM_SWITCH
  void* sp = nullptr;
#else
  ucontext_t ctx;
#endif
};

struct State {
  dim3 grid, block, block_idx;
  std::vector<Fiber> fibers;
  std::vector<char> stacks;
  Barrier block_barrier;
  std::vector<Barrier> warp_barriers;
  std::vector<uint64_t> exchange;  // one word per thread for shuffles and votes
  Fiber* current = nullptr;
  void (*body)(void*) = nullptr;
  void* body_arg = nullptr;
  bool aborting = false;  // a fiber hit an error: the block stops, no fiber is resumed
#if SERE_EMU_ASM_SWITCH
  void* scheduler_sp = nullptr;
#else
  ucontext_t scheduler_ctx;
#endif
  cudaError_t error = cudaSuccess;  // sticky, as a CUDA context after a launch failure
  std::string message;
};

inline State& state() {
  static State s;
  return s;
}

inline const std::string& last_error() { return state().message; }
inline void reset() {
  state().error = cudaSuccess;
  state().message.clear();
}

inline void to_scheduler() {
  State& s = state();
  Fiber* f = s.current;
#if SERE_EMU_ASM_SWITCH
  sere_emu_switch_stack(&f->sp, s.scheduler_sp);
#else
  swapcontext(&f->ctx, &s.scheduler_ctx);
#endif
}

// Records the first error and parks the calling fiber for good; its block is abandoned.
[[noreturn]] inline void fail(const std::string& what) {
  State& s = state();
  if (s.error == cudaSuccess) {
    s.error = cudaErrorLaunchFailure;
    s.message = "block " + std::to_string(s.block_idx.x) + " thread " + std::to_string(s.current->linear) + ": " + what;
  }
  s.aborting = true;
  to_scheduler();
  std::abort();  // never resumed
}

inline void arrive_and_wait(Barrier& b, const char* what) {
  if (++b.arrived == b.expected) {  // the last thread in releases the others and runs on
    b.arrived = 0;
    ++b.generation;
    return;
  }
  Fiber* f = state().current;
  f->waiting = &b;
  f->wait_generation = b.generation;
  f->wait_what = what;
  to_scheduler();
}

inline void fiber_main() {
  State& s = state();
  s.body(s.body_arg);
  s.current->done = true;
  to_scheduler();
  std::abort();  // never resumed
}

#if !SERE_EMU_ASM_SWITCH
inline void fiber_entry_ucontext() { fiber_main(); }
#endif

// Runs `body(arg)` as every thread of one block; returns false (with state().message) on divergence.
inline bool run_block(void (*body)(void*), void* arg) {
  State& s = state();
  const int n = static_cast<int>(s.block.x);
  s.body = body;
  s.body_arg = arg;
  s.aborting = false;
  s.block_barrier = Barrier{n, 0, 0};
  s.warp_barriers.assign(n / 32, Barrier{32, 0, 0});
  s.exchange.assign(n, 0);
  s.fibers.assign(n, Fiber{});
  if (s.stacks.size() < static_cast<size_t>(n) * kStackBytes) s.stacks.resize(static_cast<size_t>(n) * kStackBytes);
  for (int i = 0; i < n; ++i) {
    Fiber& f = s.fibers[i];
    f.tid.x = static_cast<unsigned>(i);
    f.linear = i;
    char* base = s.stacks.data() + static_cast<size_t>(i) * kStackBytes;
#if SERE_EMU_ASM_SWITCH
    // The frame sere_emu_switch_stack pops: control words, six registers, then the return address
    // (fiber_main), above which sits a dummy return address so fiber_main starts with the stack
    // aligned as after a call.
    auto top = reinterpret_cast<uintptr_t>(base + kStackBytes) & ~uintptr_t{15};
    auto* sp = reinterpret_cast<uint64_t*>(top);
    *--sp = 0;
    *--sp = reinterpret_cast<uint64_t>(&fiber_main);
    for (int r = 0; r < 6; ++r) *--sp = 0;
    uint32_t words[2] = {0, 0};
    asm volatile("stmxcsr %0" : "=m"(words[0]));
    asm volatile("fnstcw %0" : "=m"(words[1]));
    *--sp = static_cast<uint64_t>(words[0]) | (static_cast<uint64_t>(words[1] & 0xffff) << 32);
    f.sp = sp;
#else
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = base;
    f.ctx.uc_stack.ss_size = kStackBytes;
    f.ctx.uc_link = nullptr;
    makecontext(&f.ctx, &fiber_entry_ucontext, 0);
#endif
  }
  int remaining = n;
  while (remaining > 0) {
    bool progressed = false;
    for (Fiber& f : s.fibers) {
      if (f.done) continue;
      if (f.waiting != nullptr && f.waiting->generation == f.wait_generation) continue;
      f.waiting = nullptr;
      s.current = &f;
#if SERE_EMU_ASM_SWITCH
      sere_emu_switch_stack(&s.scheduler_sp, f.sp);
#else
      swapcontext(&s.scheduler_ctx, &f.ctx);
#endif
      s.current = nullptr;
      progressed = true;
      if (s.aborting) return false;
      if (f.done) --remaining;
    }
    if (!progressed) {  // everyone left is waiting at a barrier that can no longer complete
      int exited = 0;
      std::vector<std::pair<std::string, int>> sites;  // wait site -> threads, in order of first thread
      for (const Fiber& f : s.fibers) {
        if (f.done) {
          ++exited;
          continue;
        }
        const std::string site = std::string(f.wait_what) + (f.waiting == &s.block_barrier ? "" : " (warp " +
                                 std::to_string(f.linear / 32) + ")");
        bool found = false;
        for (auto& [name, count] : sites) {
          if (name == site) {
            ++count;
            found = true;
          }
        }
        if (!found) sites.emplace_back(site, 1);
      }
      std::string where;
      for (size_t i = 0; i < sites.size() && i < 4; ++i) {
        where += (i ? ", " : "") + std::to_string(sites[i].second) + " in " + sites[i].first;
      }
      if (sites.size() > 4) where += ", ...";
      s.error = cudaErrorLaunchFailure;
      s.message = "block " + std::to_string(s.block_idx.x) + ": divergent barrier: threads wait at different " +
                  "barriers (" + where + "), " + std::to_string(exited) + " of " + std::to_string(n) + " exited";
      return false;
    }
  }
  return true;
}

template <typename Fn>
void launch(unsigned grid, unsigned block, Fn&& fn) {
  State& s = state();
  if (s.error != cudaSuccess) return;  // sticky: later launches in a failed context do nothing
  if (grid == 0 || block == 0 || block % 32 != 0 || block > 1024) {
    s.error = cudaErrorInvalidValue;
    s.message = "bad launch configuration: grid " + std::to_string(grid) + ", block " + std::to_string(block);
    return;
  }
  s.grid = dim3{grid, 1, 1};
  s.block = dim3{block, 1, 1};
  auto trampoline = [](void* p) { (*static_cast<std::remove_reference_t<Fn>*>(p))(); };
  for (unsigned b = 0; b < grid; ++b) {
    s.block_idx = dim3{b, 1, 1};
    if (!run_block(trampoline, &fn)) return;
  }
}

inline Fiber& self() { return *state().current; }

inline void check_warp_call(unsigned mask, int width, const char* what) {
  if (mask != 0xffffffffu) fail(std::string(what) + " with a partial mask is not emulated");
  if (width != 32) fail(std::string(what) + " with width != 32 is not emulated");
}

}  // namespace
}  // namespace emu

#define threadIdx (::emu::self().tid)
#define blockIdx (::emu::state().block_idx)
#define blockDim (::emu::state().block)
#define gridDim (::emu::state().grid)

inline void __syncthreads() { emu::arrive_and_wait(emu::state().block_barrier, "__syncthreads"); }

template <typename T>
T __shfl_xor_sync(unsigned mask, T value, int lane_mask, int width = 32) {
  static_assert(sizeof(T) <= sizeof(uint64_t), "emulated shuffles move up to 8 bytes");
  emu::check_warp_call(mask, width, "__shfl_xor_sync");
  emu::State& s = emu::state();
  const int me = emu::self().linear;
  const int warp = me / 32;
  uint64_t word = 0;
  std::memcpy(&word, &value, sizeof(T));
  s.exchange[me] = word;
  emu::arrive_and_wait(s.warp_barriers[warp], "__shfl_xor_sync");  // all lanes have written
  const int src = warp * 32 + ((me % 32) ^ (lane_mask & 31));
  T out;
  std::memcpy(&out, &s.exchange[src], sizeof(T));
  emu::arrive_and_wait(s.warp_barriers[warp], "__shfl_xor_sync");  // all lanes have read
  return out;
}

inline int __any_sync(unsigned mask, int predicate) {
  emu::check_warp_call(mask, 32, "__any_sync");
  emu::State& s = emu::state();
  const int me = emu::self().linear;
  const int warp = me / 32;
  s.exchange[me] = predicate != 0;
  emu::arrive_and_wait(s.warp_barriers[warp], "__any_sync");
  int any = 0;
  for (int lane = 0; lane < 32; ++lane) any |= static_cast<int>(s.exchange[warp * 32 + lane]);
  emu::arrive_and_wait(s.warp_barriers[warp], "__any_sync");
  return any;
}

// Atomics: fibers switch only at barriers, so a plain read-modify-write is atomic here.
inline unsigned atomicOr(unsigned* a, unsigned v) {
  const unsigned old = *a;
  *a = old | v;
  return old;
}
inline unsigned atomicAdd(unsigned* a, unsigned v) {
  const unsigned old = *a;
  *a = old + v;
  return old;
}
inline void __threadfence() {}  // blocks run one after another: every store is visible to later blocks
inline int __popc(unsigned x) { return __builtin_popcount(x); }

inline cudaError_t cudaMemsetAsync(void* ptr, int value, size_t bytes, cudaStream_t) {
  std::memset(ptr, value, bytes);
  return cudaSuccess;
}

inline cudaError_t cudaGetLastError() {
  const cudaError_t e = emu::state().error;
  return e;
}

// Runs the whole grid before returning (the stream is accepted and ignored: everything is synchronous).
#define SERE_LAUNCH_KERNEL(kernel, grid, block, stream, ...) \
  ((void)(stream), ::emu::launch((grid), (block), [&] { kernel(__VA_ARGS__); }))
