// SERE re-routing on the GPU: the nvcc translation unit. The kernels and their launch logic live in
// sere_reroute_kernels.cuh (shared with the CPU emulation in emu/); this file adds the CUDA runtime and
// the C entry points declared in sere_reroute.h.
//
// This file includes no torch header on purpose: the torch wrapper lives in sere_reroute.cpp, and
// CI compiles this core with nvcc on machines whose torch is a CPU build.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "sere_reroute.h"

#define SERE_LAUNCH_KERNEL(kernel, grid, block, stream, ...) kernel<<<(grid), (block), 0, (stream)>>>(__VA_ARGS__)
#include "sere_reroute_kernels.cuh"

extern "C" int sere_reroute_cuda_launch(int id_type, int sim_type, const void* ids, void* out,
                                         const void* sim, const bool* valid, int64_t num_tokens,
                                         int top_k, int select_top_k, int num_experts, float threshold,
                                         void* stream) {
  return static_cast<int>(reroute_entry(id_type, sim_type, ids, out, sim, valid, num_tokens, top_k, select_top_k,
                                        num_experts, threshold, static_cast<cudaStream_t>(stream)));
}

extern "C" int sere_per_slot_cuda_launch(int id_type, int sim_type, void* ids, const void* sim, const bool* valid,
                                          int64_t num_tokens, int top_k, int select_top_k, int num_experts,
                                          float threshold, void* flags, void* stream) {
  return static_cast<int>(per_slot_entry(id_type, sim_type, ids, sim, valid, num_tokens, top_k, select_top_k,
                                         num_experts, threshold, static_cast<unsigned char*>(flags),
                                         static_cast<cudaStream_t>(stream)));
}

extern "C" int sere_route_cuda_launch(int id_type, int weight_type, int sim_type, const void* ids, const void* weights,
                                       void* out_ids, void* out_weights, const void* sim, const bool* valid,
                                       const bool* ranks, int num_ranks, int64_t num_tokens, int top_k,
                                       int select_top_k, int num_experts, float threshold, int rule, int merge,
                                       const float* scale, int unmatched, long long* counts, const bool* gate,
                                       unsigned* workspace, void* stream) {
  return static_cast<int>(route_entry(id_type, weight_type, sim_type, ids, weights, out_ids, out_weights, sim, valid,
                                      ranks, num_ranks, num_tokens, top_k, select_top_k, num_experts, threshold, rule,
                                      merge != 0, scale, unmatched, counts, gate, workspace,
                                      static_cast<cudaStream_t>(stream)));
}
