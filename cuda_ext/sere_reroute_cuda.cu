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
