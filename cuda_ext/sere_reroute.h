// SERE re-routing kernels: the contract shared by the C++ CPU kernel, the CUDA kernel and the torch
// wrapper. This header has no torch and no CUDA includes, so the CUDA core compiles standalone.
//
// Operation (ARCHITECTURE.md, "Re-routing rules"), for ids [T, k] ordered by router weight:
//   primary  = { ids[t, j] : valid[t], j < S }
//   table[e] = e                      if e is primary, or no primary p has sim[e, p] >= rho
//            = argmax_p sim[e, p]     over primaries p (lowest id on ties), otherwise
//   out[t, j] = ids[t, j]             if j < S or !valid[t]
//             = table[ids[t, j]]      otherwise
// Similarities are compared in float32 (bf16/fp16 are widened exactly); rho is rounded to float32.
// A NaN similarity to any primary keeps e (as torch's argmax, which returns the NaN, does).
// Ids outside [0, E) are neither primaries nor re-routed (no device-side assert: this runs inside
// CUDA graphs).
#pragma once

#include <cstdint>

namespace sere {

constexpr int kMaxExperts = 512;  // table and primary flags live in fixed-size (shared) arrays
constexpr int kMaxTopK = 16;

enum IdType : int { kInt32 = 0, kInt64 = 1 };
enum SimType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

}  // namespace sere

// CUDA launcher (sere_reroute_cuda.cu). `out` may equal `ids` (in place). `valid` may be null.
// Enqueues one kernel on `stream`; no allocation, no host synchronisation, graph-capturable.
// Returns the cudaError_t of the launch as an int (0 = success).
extern "C" int sere_reroute_cuda_launch(int id_type, int sim_type, const void* ids, void* out,
                                         const void* sim, const bool* valid, int64_t num_tokens,
                                         int top_k, int select_top_k, int num_experts, float threshold,
                                         void* stream);

// Benchmark baseline with the paper's kernel shape (memset + flag kernel + one thread per secondary slot
// scanning all E experts), in place on `ids`; `flags` is an E-byte device workspace.
extern "C" int sere_per_slot_cuda_launch(int id_type, int sim_type, void* ids, const void* sim, const bool* valid,
                                          int64_t num_tokens, int top_k, int select_top_k, int num_experts,
                                          float threshold, void* flags, void* stream);
