// The CUDA re-routing kernels (../sere_reroute_kernels.cuh), compiled with g++ against the CPU
// emulation in cuda_emu.h, behind C entry points that mirror sere_reroute_cuda.cu. Tests load this as a
// shared library (tests/cuda_emu.py) and compare it with the torch reference on machines without a GPU.
//
// Every buffer the kernels get is a copy placed against an inaccessible guard page, after its end
// (guard = 1) or before its start (guard = 2), so an out-of-bounds access to any of them stops the
// launch with the buffer's name and offset instead of reading a neighbour's memory.
//
// Entry points return the cudaError_t value (0 on success) and, on failure, a message in `msg`.
// Single-threaded: one launch at a time per process.
#include "cuda_emu.h"

#include <csetjmp>
#include <csignal>
#include <cstdio>

#include <sys/mman.h>
#include <unistd.h>

#include "../sere_reroute_kernels.cuh"

namespace {

struct Guarded {
  const char* name = nullptr;
  char* map = nullptr;
  size_t map_bytes = 0;
  char* data = nullptr;
  size_t bytes = 0;
  char* guard = nullptr;  // the PROT_NONE page
};

constexpr int kMaxBuffers = 12;
Guarded g_buffers[kMaxBuffers];
int g_num_buffers = 0;
sigjmp_buf g_jump;
volatile sig_atomic_t g_armed = 0;
char g_fault[256];
struct sigaction g_previous;

size_t page_size() { return static_cast<size_t>(sysconf(_SC_PAGESIZE)); }

// Copies `bytes` from `src` (null: a workspace filled with garbage) into a fresh mapping next to a guard page.
void* guarded_copy(const char* name, const void* src, size_t bytes, int mode) {
  const size_t page = page_size();
  const size_t rounded = (bytes + page - 1) / page * page;
  Guarded g;
  g.name = name;
  g.bytes = bytes;
  g.map_bytes = rounded + page;
  void* m = mmap(nullptr, g.map_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (m == MAP_FAILED) return nullptr;
  g.map = static_cast<char*>(m);
  if (mode == 2) {
    g.guard = g.map;
    g.data = g.map + page;
  } else {
    g.guard = g.map + rounded;
    g.data = g.guard - bytes;
  }
  mprotect(g.guard, page, PROT_NONE);
  if (bytes > 0 && src != nullptr) {
    std::memcpy(g.data, src, bytes);
  } else if (bytes > 0) {  // a workspace: garbage, as fresh device memory, so a missing memset shows
    std::memset(g.data, 0xa5, bytes);
  }
  g_buffers[g_num_buffers++] = g;
  return g.data;
}

void release_all() {
  for (int i = 0; i < g_num_buffers; ++i) munmap(g_buffers[i].map, g_buffers[i].map_bytes);
  g_num_buffers = 0;
}

void on_segv(int sig, siginfo_t* info, void* ucontext) {
  const char* addr = static_cast<const char*>(info->si_addr);
  if (g_armed) {
    const size_t page = page_size();
    for (int i = 0; i < g_num_buffers; ++i) {
      const Guarded& g = g_buffers[i];
      if (addr >= g.guard && addr < g.guard + page) {
        const long offset = static_cast<long>(addr - g.data);
        std::snprintf(g_fault, sizeof g_fault, "out-of-bounds access to `%s` at byte offset %ld (buffer is %zu bytes)",
                      g.name, offset, g.bytes);
        g_armed = 0;
        siglongjmp(g_jump, 1);
      }
    }
  }
  // not ours: put the previous handler back and let the fault happen again under it
  sigaction(SIGSEGV, &g_previous, nullptr);
  (void)sig;
  (void)ucontext;
}

void write_message(char* msg, int msg_len, const std::string& text) {
  if (msg != nullptr && msg_len > 0) std::snprintf(msg, static_cast<size_t>(msg_len), "%s", text.c_str());
}

// False when a guard page was hit (on_segv jumped back here); nothing is used after the jump.
template <typename Call>
__attribute__((noinline)) bool call_catching_faults(Call& call, const void* ids, void* out, const void* sim,
                                                    const bool* valid, unsigned char* flags) {
  if (sigsetjmp(g_jump, 1) != 0) return false;
  g_armed = 1;
  call(ids, out, sim, valid, flags);
  g_armed = 0;
  return true;
}

// Arms the guard-page handler, runs the emulated launch, disarms it. Returns the cudaError_t value
// (launch failure with the faulting block's message when a guard page was hit).
template <typename Call>
int launch_catching_faults(Call& call, const void* ids, void* out, const void* sim, const bool* valid,
                           unsigned char* flags, char* msg, int msg_len) {
  struct sigaction action {};
  action.sa_sigaction = &on_segv;
  action.sa_flags = SA_SIGINFO;
  sigemptyset(&action.sa_mask);
  sigaction(SIGSEGV, &action, &g_previous);
  int err;
  if (call_catching_faults(call, ids, out, sim, valid, flags)) {
    err = static_cast<int>(cudaGetLastError());
    if (err != 0) write_message(msg, msg_len, emu::last_error());
  } else {  // came back from on_segv: the emulated launch is abandoned
    err = static_cast<int>(cudaErrorLaunchFailure);
    write_message(msg, msg_len, std::string("block ") + std::to_string(emu::state().block_idx.x) + ": " + g_fault);
    emu::state().current = nullptr;
  }
  sigaction(SIGSEGV, &g_previous, nullptr);
  return err;
}

size_t id_bytes(int id_type) { return id_type == sere::kInt64 ? 8 : 4; }
size_t sim_bytes(int sim_type) { return sim_type == sere::kFloat32 ? 4 : 2; }

// Runs `call(ids, out, sim, valid, flags)` on guarded copies, then copies the written buffer back into
// `result` (ids for in place). Out-of-contract shapes get empty buffers: the launcher must refuse them
// before any access, and an access would hit a guard page. Returns the cudaError_t value.
template <typename Call>
int run_guarded(int id_type, int sim_type, const void* ids, void* result, bool inplace, const void* sim,
                const bool* valid, int64_t num_tokens, int top_k, int num_experts, bool with_flags, int guard,
                char* msg, int msg_len, Call&& call) {
  emu::reset();
  if (guard != 1 && guard != 2) {
    write_message(msg, msg_len, "guard must be 1 (after each buffer) or 2 (before it)");
    return static_cast<int>(cudaErrorInvalidValue);
  }
  const bool shapes_ok = num_tokens >= 0 && num_tokens <= (int64_t{1} << 31) && top_k >= 0 && top_k <= 1024 &&
                         num_experts >= 0 && num_experts <= 4096;
  const size_t n_tokens = shapes_ok ? static_cast<size_t>(num_tokens) : 0;
  const size_t n_ids = n_tokens * (shapes_ok ? static_cast<size_t>(top_k) : 0);
  const size_t n_experts = shapes_ok ? static_cast<size_t>(num_experts) : 0;
  void* g_ids = guarded_copy("ids", ids, n_ids * id_bytes(id_type), guard);
  void* g_out = inplace ? g_ids : guarded_copy("out", result, n_ids * id_bytes(id_type), guard);
  void* g_sim = guarded_copy("sim", sim, n_experts * n_experts * sim_bytes(sim_type), guard);
  void* g_valid = valid == nullptr ? nullptr : guarded_copy("valid", valid, n_tokens, guard);
  void* g_flags = with_flags ? guarded_copy("flags", nullptr, n_experts, guard) : nullptr;
  if (g_ids == nullptr || g_out == nullptr || g_sim == nullptr || (valid != nullptr && g_valid == nullptr) ||
      (with_flags && g_flags == nullptr)) {
    release_all();
    write_message(msg, msg_len, "mmap failed");
    return static_cast<int>(cudaErrorLaunchFailure);
  }
  const int err = launch_catching_faults(call, g_ids, g_out, g_sim, static_cast<const bool*>(g_valid),
                                         static_cast<unsigned char*>(g_flags), msg, msg_len);
  if (err == 0 && n_ids > 0) std::memcpy(result, g_out, n_ids * id_bytes(id_type));
  release_all();
  return err;
}

// When the launcher itself refuses (before any kernel runs), say so; a failed kernel has its own message.
void note_refusal(cudaError_t err) {
  if (err != cudaSuccess && emu::state().error == cudaSuccess) {
    emu::state().error = err;
    emu::state().message = "the launcher refused its arguments (cudaErrorInvalidValue)";
  }
}

}  // namespace

extern "C" __attribute__((visibility("default"))) int sere_reroute_emu_launch(
    int id_type, int sim_type, const void* ids, void* out, const void* sim, const bool* valid, int64_t num_tokens,
    int top_k, int select_top_k, int num_experts, float threshold, int guard, char* msg, int msg_len) {
  return run_guarded(id_type, sim_type, ids, out, ids == out, sim, valid, num_tokens, top_k, num_experts, false, guard,
                     msg, msg_len, [&](const void* i, void* o, const void* sm, const bool* v, unsigned char*) {
                       note_refusal(reroute_entry(id_type, sim_type, i, o, sm, v, num_tokens, top_k, select_top_k,
                                                  num_experts, threshold, nullptr));
                     });
}

extern "C" __attribute__((visibility("default"))) int sere_per_slot_emu_launch(
    int id_type, int sim_type, void* ids, const void* sim, const bool* valid, int64_t num_tokens, int top_k,
    int select_top_k, int num_experts, float threshold, int guard, char* msg, int msg_len) {
  return run_guarded(id_type, sim_type, ids, ids, true, sim, valid, num_tokens, top_k, num_experts, true, guard, msg,
                     msg_len, [&](const void* i, void*, const void* sm, const bool* v, unsigned char* flags) {
                       note_refusal(per_slot_entry(id_type, sim_type, const_cast<void*>(i), sm, v, num_tokens, top_k,
                                                   select_top_k, num_experts, threshold, flags, nullptr));
                     });
}

// The whole hook (sere_route_cuda_launch's emulated twin). Inputs are guarded copies; out_ids, out_w and
// counts are copied back; the workspace starts as garbage (the launcher must zero it when it uses it).
extern "C" __attribute__((visibility("default"))) int sere_route_emu_launch(
    int id_type, int weight_type, int sim_type, const void* ids, const void* w, void* out_ids, void* out_w,
    const void* sim, const bool* valid, const bool* ranks, int num_ranks, int64_t num_tokens, int top_k,
    int select_top_k, int num_experts, float threshold, int rule, int merge, const float* scale, int unmatched,
    long long* counts, const bool* gate, int guard, char* msg, int msg_len) {
  emu::reset();
  if (guard != 1 && guard != 2) {
    write_message(msg, msg_len, "guard must be 1 (after each buffer) or 2 (before it)");
    return static_cast<int>(cudaErrorInvalidValue);
  }
  const bool shapes_ok = num_tokens >= 0 && num_tokens <= (int64_t{1} << 31) && top_k >= 0 && top_k <= 1024 &&
                         num_experts >= 0 && num_experts <= 4096 && num_ranks >= 0 && num_ranks <= 4096;
  const size_t nt = shapes_ok ? static_cast<size_t>(num_tokens) : 0;
  const size_t ni = nt * (shapes_ok ? static_cast<size_t>(top_k) : 0);
  const size_t ne = shapes_ok ? static_cast<size_t>(num_experts) : 0;
  const size_t ib = id_bytes(id_type), wb = sim_bytes(weight_type);
  void* g_ids = guarded_copy("ids", ids, ni * ib, guard);
  void* g_w = guarded_copy("weights", w, ni * wb, guard);
  void* g_oi = guarded_copy("out_ids", nullptr, ni * ib, guard);
  void* g_ow = guarded_copy("out_weights", nullptr, ni * wb, guard);
  void* g_sim = guarded_copy("sim", sim, ne * ne * sim_bytes(sim_type), guard);
  void* g_valid = valid == nullptr ? nullptr : guarded_copy("valid", valid, nt, guard);
  void* g_ranks = ranks == nullptr ? nullptr : guarded_copy("ranks", ranks, ne * static_cast<size_t>(num_ranks), guard);
  void* g_scale = scale == nullptr ? nullptr : guarded_copy("scale", scale, ne * ne * sizeof(float), guard);
  void* g_counts = counts == nullptr ? nullptr : guarded_copy("counts", counts, 5 * sizeof(long long), guard);
  void* g_gate = gate == nullptr ? nullptr : guarded_copy("gate", gate, 1, guard);
  void* g_ws = guarded_copy("workspace", nullptr, sere::kRouteWorkspaceWords * sizeof(unsigned), guard);
  if (!g_ids || !g_w || !g_oi || !g_ow || !g_sim || (valid && !g_valid) || (ranks && !g_ranks) || (scale && !g_scale) ||
      (counts && !g_counts) || (gate && !g_gate) || !g_ws) {
    release_all();
    write_message(msg, msg_len, "mmap failed");
    return static_cast<int>(cudaErrorLaunchFailure);
  }
  auto call = [&](const void*, void*, const void*, const bool*, unsigned char*) {
    note_refusal(route_entry(id_type, weight_type, sim_type, g_ids, g_w, g_oi, g_ow, g_sim,
                             static_cast<const bool*>(g_valid), static_cast<const bool*>(g_ranks), num_ranks,
                             num_tokens, top_k, select_top_k, num_experts, threshold, rule, merge != 0,
                             static_cast<const float*>(g_scale), unmatched, static_cast<long long*>(g_counts), static_cast<const bool*>(g_gate),
                             static_cast<unsigned*>(g_ws), nullptr));
  };
  const int err = launch_catching_faults(call, nullptr, nullptr, nullptr, nullptr, nullptr, msg, msg_len);
  if (err == 0) {
    if (ni > 0) {
      std::memcpy(out_ids, g_oi, ni * ib);
      std::memcpy(out_w, g_ow, ni * wb);
    }
    if (counts != nullptr) std::memcpy(counts, g_counts, 5 * sizeof(long long));
  }
  release_all();
  return err;
}
