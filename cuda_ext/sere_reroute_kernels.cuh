// SERE re-routing on the GPU: the kernels and their launch logic, without the CUDA includes.
//
// Two translation units include this file:
//   - sere_reroute_cuda.cu (nvcc): after the CUDA runtime headers, with SERE_LAUNCH_KERNEL as `<<<...>>>`;
//   - emu/sere_reroute_emu.cpp (g++): after emu/cuda_emu.h, which runs every CUDA thread as a fiber on the
//     CPU, so tests execute this exact device code (indexing, block split, shuffles, barriers, in-place
//     aliasing) on machines without a GPU.
// Anything added here must compile in both; emu/cuda_emu.h lists the CUDA features it provides.
//
// reroute_kernel: one fused kernel, no workspace, no host synchronisation.
// Each block owns a contiguous range of tokens and, in shared memory:
//   1. marks the primary experts (top-S ids of every valid token; every block reads them all, which
//      costs T*S id loads from L2 and saves a second launch and a global workspace), and the experts
//      its own tokens use in secondary slots;
//   2. builds the table entries its tokens need: one warp per needed non-primary expert e does the
//      masked argmax of sim[e, :] over the primaries (lowest id on ties) and the rho test;
//   3. gathers its tokens' secondary slots through the table (and copies the top-S slots).
// Work is O(T*S*blocks + needed_rows*E + T*k); with <= 256 tokens (decode) it is a single block.
// `out` may alias `ids`: the top-S slots are never written in place, and a block reads only its own
// tokens' secondary slots, so blocks never race.
#pragma once

#include <cstdint>

#include "sere_reroute.h"

#ifndef SERE_LAUNCH_KERNEL
#error "define SERE_LAUNCH_KERNEL(kernel_ptr, grid, block, stream, args...) before including this file"
#endif

namespace {

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;
constexpr int kChunks = sere::kMaxExperts / 32;  // per-lane slice of one similarity row
constexpr int kMinTokensPerBlock = 256;
constexpr int kMaxBlocks = 64;  // bounds the redundant primary scan to 64 * T*S loads
constexpr unsigned kFullMask = 0xffffffffu;

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }

template <typename Id>
__device__ __forceinline__ bool in_range(Id e, int num_experts) {
  return e >= 0 && e < static_cast<Id>(num_experts);
}

// The paper table rows a block needs: one warp per needed non-primary expert e does the masked argmax of
// sim[e, :] over the primaries (lowest id on ties) and the rho test. The branch is warp-uniform (shared
// flags, e per warp). Shared by reroute_kernel and route_kernel.
template <typename Sim>
__device__ __forceinline__ void paper_rows(const Sim* __restrict__ sim, const unsigned char* primary,
                                           const unsigned char* needed, short* table, int num_experts, float rho,
                                           int tid) {
  const int warp = tid >> 5;
  const int lane = tid & 31;
  const int chunks = (num_experts + 31) >> 5;
  for (int e = warp; e < num_experts; e += kWarps) {
    if (!needed[e] || primary[e]) continue;
    const Sim* srow = sim + static_cast<int64_t>(e) * num_experts;
    float vals[kChunks];
#pragma unroll
    for (int c = 0; c < kChunks; ++c) {  // all loads issued before any compare
      const int p = c * 32 + lane;
      vals[c] = (c < chunks && p < num_experts && primary[p]) ? to_float(srow[p]) : -INFINITY;
    }
    float best = -INFINITY;
    int best_p = num_experts;  // none
    bool nan = false;
#pragma unroll
    for (int c = 0; c < kChunks; ++c) {  // ascending p per lane: strict > keeps the lowest id
      const float v = vals[c];
      nan |= (v != v);
      if (v > best) {
        best = v;
        best_p = c * 32 + lane;
      }
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
      const float ov = __shfl_xor_sync(kFullMask, best, off);
      const int op = __shfl_xor_sync(kFullMask, best_p, off);
      if (ov > best || (ov == best && op < best_p)) {
        best = ov;
        best_p = op;
      }
    }
    // torch's argmax returns a NaN when there is one, and NaN >= rho is false: e stays.
    nan = __any_sync(kFullMask, nan);
    if (lane == 0 && !nan && best_p < num_experts && best >= rho) table[e] = static_cast<short>(best_p);
  }
}

template <typename Id, typename Sim>
__global__ void __launch_bounds__(kThreads)
reroute_kernel(const Id* ids, Id* out, const Sim* __restrict__ sim, const bool* __restrict__ valid,
               int num_tokens, int k, int s, int num_experts, float rho, int tokens_per_block) {
  __shared__ unsigned char primary[sere::kMaxExperts];
  __shared__ unsigned char needed[sere::kMaxExperts];
  __shared__ short table[sere::kMaxExperts];

  const int tid = threadIdx.x;
  const int t0 = blockIdx.x * tokens_per_block;
  const int t1 = min(num_tokens, t0 + tokens_per_block);
  const bool inplace = static_cast<const void*>(ids) == static_cast<const void*>(out);

  for (int e = tid; e < num_experts; e += kThreads) {
    primary[e] = 0;
    needed[e] = 0;
    table[e] = static_cast<short>(e);
  }
  __syncthreads();

  // 1. Flags. Concurrent stores of the same byte value need no atomics.
  if (s < k) {
    for (int t = tid; t < num_tokens; t += kThreads) {
      if (valid != nullptr && !valid[t]) continue;
      const Id* row = ids + static_cast<int64_t>(t) * k;
      for (int j = 0; j < s; ++j) {
        const Id e = row[j];
        if (in_range(e, num_experts)) primary[e] = 1;
      }
    }
    for (int t = t0 + tid; t < t1; t += kThreads) {
      if (valid != nullptr && !valid[t]) continue;
      const Id* row = ids + static_cast<int64_t>(t) * k;
      for (int j = s; j < k; ++j) {
        const Id e = row[j];
        if (in_range(e, num_experts)) needed[e] = 1;
      }
    }
  }
  __syncthreads();

  // 2. Table rows this block needs.
  if (s < k) paper_rows(sim, primary, needed, table, num_experts, rho, tid);
  __syncthreads();

  // 3. Gather, coalesced over the block's slots.
  const int i0 = t0 * k;
  const int i1 = t1 * k;
  for (int i = i0 + tid; i < i1; i += kThreads) {
    const int t = i / k;
    const int j = i - t * k;
    const Id e = ids[i];
    Id v = e;
    if (j >= s && (valid == nullptr || valid[t]) && in_range(e, num_experts)) v = static_cast<Id>(table[e]);
    if (!inplace || v != e) out[i] = v;
  }
}

template <typename Id, typename Sim>
cudaError_t launch(const void* ids, void* out, const void* sim, const bool* valid, int64_t num_tokens,
                   int k, int s, int num_experts, float rho, cudaStream_t stream) {
  if (num_tokens <= 0) return cudaSuccess;
  if (num_experts < 1 || num_experts > sere::kMaxExperts || k < 1 || k > sere::kMaxTopK || s < 0 ||
      num_tokens * k > INT32_MAX) {
    return cudaErrorInvalidValue;
  }
  if (s > k) s = k;
  int64_t blocks = (num_tokens + kMinTokensPerBlock - 1) / kMinTokensPerBlock;
  if (blocks > kMaxBlocks) blocks = kMaxBlocks;
  const int64_t per_block = (num_tokens + blocks - 1) / blocks;
  auto* kernel = &reroute_kernel<Id, Sim>;
  SERE_LAUNCH_KERNEL(kernel, static_cast<unsigned>(blocks), kThreads, stream, static_cast<const Id*>(ids),
                     static_cast<Id*>(out), static_cast<const Sim*>(sim), valid, static_cast<int>(num_tokens), k, s,
                     num_experts, rho, static_cast<int>(per_block));
  return cudaGetLastError();
}

// ---- Baseline with the paper's kernel shape (benchmarks only) -------------------------------------
// A flag pass over the valid tokens' top-S slots into a global byte array (zeroed by a memset), then one
// thread per secondary slot scans all E similarities of its expert and writes the slot in place:
// O(T*(k-S)*E) reads, three graph nodes. Same answers as reroute_kernel.
template <typename Id>
__global__ void primary_flags_kernel(const Id* ids, const bool* valid, int num_tokens, int k, int s,
                                     int num_experts, unsigned char* flags) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= num_tokens * s) return;
  const int t = i / s;
  if (valid != nullptr && !valid[t]) return;
  const Id e = ids[static_cast<int64_t>(t) * k + (i - t * s)];
  if (in_range(e, num_experts)) flags[e] = 1;
}

template <typename Id, typename Sim>
__global__ void per_slot_kernel(Id* ids, const Sim* __restrict__ sim, const bool* __restrict__ valid,
                                int num_tokens, int k, int s, int num_experts, float rho,
                                const unsigned char* __restrict__ flags) {
  const int n_sec = k - s;
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= num_tokens * n_sec) return;
  const int t = i / n_sec;
  if (valid != nullptr && !valid[t]) return;
  Id* slot = ids + static_cast<int64_t>(t) * k + s + (i - t * n_sec);
  const Id e = *slot;
  if (!in_range(e, num_experts) || flags[e]) return;
  const Sim* row = sim + static_cast<int64_t>(e) * num_experts;
  float best = -INFINITY;
  int best_p = -1;
  for (int p = 0; p < num_experts; ++p) {
    if (!flags[p]) continue;
    const float v = to_float(row[p]);
    if (v != v) return;  // NaN: as torch's argmax
    if (v > best) {
      best = v;
      best_p = p;
    }
  }
  if (best_p >= 0 && best >= rho) *slot = static_cast<Id>(best_p);
}

template <typename Id, typename Sim>
cudaError_t launch_per_slot(void* ids, const void* sim, const bool* valid, int64_t num_tokens, int k, int s,
                            int num_experts, float rho, unsigned char* flags, cudaStream_t stream) {
  if (num_tokens <= 0 || s >= k) return cudaSuccess;
  if (num_experts < 1 || k < 1 || s < 0 || num_tokens * k > INT32_MAX) return cudaErrorInvalidValue;
  cudaError_t err = cudaMemsetAsync(flags, 0, num_experts, stream);
  if (err != cudaSuccess) return err;
  constexpr int kBlock = 256;
  const int64_t n_top = num_tokens * s;
  const int64_t n_sec = num_tokens * (k - s);
  if (n_top > 0) {
    auto* flag_kernel = &primary_flags_kernel<Id>;
    SERE_LAUNCH_KERNEL(flag_kernel, static_cast<unsigned>((n_top + kBlock - 1) / kBlock), kBlock, stream,
                       static_cast<const Id*>(ids), valid, static_cast<int>(num_tokens), k, s, num_experts, flags);
  }
  auto* scan_kernel = &per_slot_kernel<Id, Sim>;
  SERE_LAUNCH_KERNEL(scan_kernel, static_cast<unsigned>((n_sec + kBlock - 1) / kBlock), kBlock, stream,
                     static_cast<Id*>(ids), static_cast<const Sim*>(sim), valid, static_cast<int>(num_tokens), k, s,
                     num_experts, rho, flags);
  return cudaGetLastError();
}

// ---- The whole routing hook (sere_dist::route; semantics in sere_reroute.h) -----------------------
// route_kernel: one launch; blocks own token ranges as in reroute_kernel. Each thread handles whole
// tokens (k <= 16 slots in registers): it orders the slots by weight (insertion sort, stable), and
//   1. every block marks the primaries from every valid token's ordered top-S (and the experts its own
//      tokens use in secondary slots);
//   2. builds the paper table rows it needs (one warp per row, as reroute_kernel), the primary list and,
//      for rank_aware, each primary's rank mask;
//   3. applies the rule per token (rank_aware scans the primary list per secondary slot: the best
//      passing value among primaries on visited ranks, then the lowest such rank, then the lowest id),
//      the error-aware weights when `scale` is given (moved slots times scale[e, p]; unmatched ones kept,
//      dropped or dropped with renormalisation), top-S or merge, and writes ids and weights back in the
//      token's slot order. Products go through __fmul_rn so that nvcc never fuses one with the merge's
//      add into an FMA (the torch spec rounds each operation);
//   4. counts (when `counts` is given and `gate` is null or true): per block in shared memory; a single
//      block adds to `counts` directly, several blocks OR/add into `workspace` (zeroed by the launcher)
//      and the last block to finish (an atomic ticket) adds the totals.
constexpr int kWorkspaceWords = sere::kRouteWorkspaceWords;  // before bits, after bits, rerouted, valid, ticket

__device__ __forceinline__ float weight_to_float(float x) { return x; }
__device__ __forceinline__ float weight_to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float weight_to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ void store_weight(float* p, float v) { *p = v; }
__device__ __forceinline__ void store_weight(__nv_bfloat16* p, float v) { *p = __float2bfloat16(v); }
__device__ __forceinline__ void store_weight(__half* p, float v) { *p = __float2half(v); }

// torch.sort(descending=True, stable=True) order: NaN first, then larger values.
__device__ __forceinline__ bool sorts_before(float a, float b) { return a > b || (a != a && b == b); }

template <typename W>
__device__ __forceinline__ void order_slots(const W* w, int k, float* wv, unsigned char* order) {
  for (int j = 0; j < k; ++j) {
    const float v = weight_to_float(w[j]);
    int i = j;
    while (i > 0 && sorts_before(v, wv[i - 1])) {  // stable insertion sort
      wv[i] = wv[i - 1];
      order[i] = order[i - 1];
      --i;
    }
    wv[i] = v;
    order[i] = static_cast<unsigned char>(j);
  }
}

template <typename Id, typename W, typename Sim>
__global__ void __launch_bounds__(kThreads)
route_kernel(const Id* ids, const W* wts, Id* out_ids, W* out_w, const Sim* __restrict__ sim,
             const bool* __restrict__ valid, const bool* __restrict__ ranks, int num_ranks, int num_tokens, int k,
             int s, int num_experts, float rho, int rule, bool merge, const float* __restrict__ scale,
             int unmatched, long long* counts, const bool* gate, unsigned* workspace, int tokens_per_block) {
  __shared__ unsigned char primary[sere::kMaxExperts];
  __shared__ unsigned char needed[sere::kMaxExperts];
  __shared__ short table[sere::kMaxExperts];
  __shared__ short plist[sere::kMaxExperts];
  __shared__ unsigned long long rank_bits[sere::kMaxExperts];
  __shared__ unsigned bits_before[sere::kMaxExperts / 32];
  __shared__ unsigned bits_after[sere::kMaxExperts / 32];
  __shared__ unsigned n_rerouted;
  __shared__ unsigned n_valid;
  __shared__ int num_primary;
  __shared__ bool last_block;

  const int tid = threadIdx.x;
  const int t0 = blockIdx.x * tokens_per_block;
  const int t1 = min(num_tokens, t0 + tokens_per_block);
  const bool top_s = rule == sere::kRuleTopS;
  const bool rank_aware = rule == sere::kRuleRankAware;
  const bool reroute = !top_s && s < k;
  const bool count = counts != nullptr && (gate == nullptr || *gate);

  for (int e = tid; e < num_experts; e += kThreads) {
    primary[e] = 0;
    needed[e] = 0;
    table[e] = static_cast<short>(e);
    unsigned long long m = 0;
    if (rank_aware)
      for (int r = 0; r < num_ranks; ++r)
        if (ranks[static_cast<int64_t>(e) * num_ranks + r]) m |= 1ull << r;
    rank_bits[e] = m;
  }
  for (int i = tid; i < sere::kMaxExperts / 32; i += kThreads) {
    bits_before[i] = 0;
    bits_after[i] = 0;
  }
  if (tid == 0) {
    n_rerouted = 0;
    n_valid = 0;
    num_primary = 0;
  }
  __syncthreads();

  float wv[sere::kMaxTopK];
  unsigned char order[sere::kMaxTopK];
  // 1. Flags.
  if (reroute) {
    for (int t = tid; t < num_tokens; t += kThreads) {
      if (valid != nullptr && !valid[t]) continue;
      const Id* row = ids + static_cast<int64_t>(t) * k;
      order_slots(wts + static_cast<int64_t>(t) * k, k, wv, order);
      for (int j = 0; j < k; ++j) {
        const Id e = row[order[j]];
        if (!in_range(e, num_experts)) continue;
        if (j < s)
          primary[e] = 1;
        else if (t >= t0 && t < t1)
          needed[e] = 1;
      }
    }
  }
  __syncthreads();

  // 2. Primary list (ascending), paper table rows this block needs.
  if (reroute) {
    if (tid == 0) {
      int n = 0;
      for (int e = 0; e < num_experts; ++e)
        if (primary[e]) plist[n++] = static_cast<short>(e);
      num_primary = n;
    }
  }
  if (reroute) paper_rows(sim, primary, needed, table, num_experts, rho, tid);
  __syncthreads();

  // 3. Per token: rule, top-S / merge, write back in slot order.
  unsigned my_rerouted = 0, my_valid = 0;
  for (int t = t0 + tid; t < t1; t += kThreads) {
    const int64_t base = static_cast<int64_t>(t) * k;
    if (valid != nullptr && !valid[t]) {
      for (int j = 0; j < k; ++j) {
        out_ids[base + j] = ids[base + j];
        out_w[base + j] = wts[base + j];
      }
      continue;
    }
    ++my_valid;
    order_slots(wts + base, k, wv, order);
    Id sid[sere::kMaxTopK];
    bool kept[sere::kMaxTopK];
    for (int j = 0; j < k; ++j) {
      sid[j] = ids[base + order[j]];
      kept[j] = true;
      if (count && in_range(sid[j], num_experts)) atomicOr(&bits_before[sid[j] >> 5], 1u << (sid[j] & 31));
    }
    if (top_s) {
      float total = wv[0], part = wv[0];
      for (int j = 1; j < k; ++j) total += wv[j];
      for (int j = 1; j < s; ++j) part += wv[j];
      const float r = total / (part < 1e-12f ? 1e-12f : part);  // NaN stays NaN, as torch's clamp
      for (int j = 0; j < k; ++j) {
        kept[j] = j < s;
        wv[j] = j < s ? __fmul_rn(wv[j], r) : 0.0f;
      }
      my_rerouted += k - s;
    } else {
      unsigned off = 0, moved = 0;  // ordered slots: secondary of a non-primary expert / moved by the rule
      unsigned long long visited = 0;
      if (rank_aware)
        for (int j = 0; j < s; ++j)
          if (in_range(sid[j], num_experts)) visited |= rank_bits[sid[j]];
      for (int j = s; reroute && j < k; ++j) {
        const Id e = sid[j];
        if (!in_range(e, num_experts) || primary[e]) continue;
        off |= 1u << j;
        int to = table[e];
        if (rank_aware && visited != 0) {
          const Sim* srow = sim + static_cast<int64_t>(e) * num_experts;
          float best = -INFINITY;
          for (int q = 0; q < num_primary; ++q) {  // best passing value on a visited rank
            const int p = plist[q];
            const float v = to_float(srow[p]);
            if (v >= rho && (rank_bits[p] & visited) && v > best) best = v;
          }
          if (best > -INFINITY) {
            unsigned long long at_best = 0;  // visited ranks holding that value: the lowest wins
            for (int q = 0; q < num_primary; ++q) {
              const int p = plist[q];
              if (to_float(srow[p]) == best) at_best |= rank_bits[p] & visited;
            }
            const unsigned long long r_bit = at_best & (~at_best + 1);
            for (int q = 0; q < num_primary; ++q) {  // the lowest id on that rank
              const int p = plist[q];
              if ((rank_bits[p] & r_bit) && to_float(srow[p]) == best) {
                to = p;
                break;
              }
            }
          }
        }
        if (static_cast<Id>(to) != e) {
          sid[j] = static_cast<Id>(to);
          moved |= 1u << j;
          ++my_rerouted;
        }
      }
      if (scale != nullptr) {  // the error-aware rule (sere_reroute.h): scale, drop or renormalise
        const Id first = sid[0];
        const int how = unmatched & 3;
        const bool keep_sum = (unmatched & sere::kKeepSumFlag) != 0;
        const bool renorm = how == sere::kUnmatchedRenorm && !keep_sum;
        float total = 0.0f, part = 0.0f, lost = 0.0f;
        float w_in[sere::kMaxTopK];
        unsigned own = 0;
        for (int j = 0; j < k; ++j) {
          const float w0 = wv[j];
          w_in[j] = w0;
          const unsigned bit = 1u << j;
          const bool drop = how != sere::kUnmatchedKeep && (off & bit) && !(moved & bit);
          if (renorm || keep_sum) {
            const float c = (drop || (keep_sum && (moved & bit))) ? 0.0f : w0;
            total = j == 0 ? w0 : total + w0;
            part = j == 0 ? c : part + c;
          }
          if (moved & bit) {
            const Id e = ids[base + order[j]];
            wv[j] = __fmul_rn(w0, scale[static_cast<int64_t>(e) * num_experts + static_cast<int64_t>(sid[j])]);
          } else if (drop) {
            sid[j] = first;
            wv[j] = 0.0f;
            kept[j] = false;
            ++my_rerouted;
          } else {
            own |= bit;
          }
          if (keep_sum) {
            const float m = (moved & bit) ? wv[j] : 0.0f;
            lost = j == 0 ? m : lost + m;
          }
        }
        if (renorm) {
          const float r = total / (part < 1e-12f ? 1e-12f : part);  // NaN stays NaN, as torch's clamp
          for (int j = 0; j < k; ++j)
            if (kept[j]) wv[j] = __fmul_rn(wv[j], r);
        }
        if (keep_sum) {
          float r = (total - lost) / (part < 1e-12f ? 1e-12f : part);
          r = r < 0.0f ? 0.0f : r;  // NaN stays NaN, as torch's clamp
          for (int j = 0; j < k; ++j)
            if (own & (1u << j)) wv[j] = __fmul_rn(w_in[j], r);
        }
      }
    }
    if (merge) {
      for (int j = 1; j < k; ++j) {
        if (!kept[j]) continue;
        for (int i = 0; i < j; ++i) {
          if (kept[i] && sid[i] == sid[j]) {
            wv[i] = wv[i] + wv[j];
            wv[j] = 0.0f;
            kept[j] = false;
            break;
          }
        }
      }
    }
    for (int j = 0; j < k; ++j) {
      out_ids[base + order[j]] = sid[j];
      store_weight(out_w + base + order[j], wv[j]);
      if (count && kept[j] && in_range(sid[j], num_experts)) atomicOr(&bits_after[sid[j] >> 5], 1u << (sid[j] & 31));
    }
  }

  // 4. Counters.
  if (!count) return;  // block-uniform
  if (my_rerouted) atomicAdd(&n_rerouted, my_rerouted);
  if (my_valid) atomicAdd(&n_valid, my_valid);
  __syncthreads();
  constexpr int kWords = sere::kMaxExperts / 32;
  if (gridDim.x > 1) {
    if (tid < kWords) {
      atomicOr(&workspace[tid], bits_before[tid]);
      atomicOr(&workspace[kWords + tid], bits_after[tid]);
    }
    if (tid == 0) {
      atomicAdd(&workspace[2 * kWords], n_rerouted);
      atomicAdd(&workspace[2 * kWords + 1], n_valid);
    }
    __threadfence();
    __syncthreads();
    if (tid == 0) last_block = atomicAdd(&workspace[2 * kWords + 2], 1u) == gridDim.x - 1;
    __syncthreads();
    if (!last_block) return;
    __threadfence();
    if (tid < kWords) {  // totals into this block's shared copies (atomics read the global values)
      bits_before[tid] = atomicOr(&workspace[tid], 0u);
      bits_after[tid] = atomicOr(&workspace[kWords + tid], 0u);
    }
    if (tid == 0) {
      n_rerouted = atomicAdd(&workspace[2 * kWords], 0u);
      n_valid = atomicAdd(&workspace[2 * kWords + 1], 0u);
    }
    __syncthreads();
  }
  if (tid == 0) {
    long long before = 0, after = 0;
    for (int i = 0; i < kWords; ++i) {
      before += __popc(bits_before[i]);
      after += __popc(bits_after[i]);
    }
    counts[0] += before;
    counts[1] += after;
    counts[2] += n_rerouted;
    counts[3] += n_valid > 0 ? 1 : 0;
    counts[4] += n_valid;
  }
}

template <typename Id, typename W, typename Sim>
cudaError_t launch_route(const void* ids, const void* w, void* out_ids, void* out_w, const void* sim,
                         const bool* valid, const bool* ranks, int num_ranks, int64_t num_tokens, int k, int s,
                         int num_experts, float rho, int rule, bool merge, const float* scale, int unmatched,
                         long long* counts, const bool* gate, unsigned* workspace, cudaStream_t stream) {
  if (num_experts < 1 || num_experts > sere::kMaxExperts || k < 1 || k > sere::kMaxTopK || s < 0 ||
      num_tokens < 0 || num_tokens * k > INT32_MAX || rule < sere::kRulePaper || rule > sere::kRuleTopS ||
      (rule == sere::kRuleRankAware && (ranks == nullptr || num_ranks < 1 || num_ranks > sere::kMaxRanks)) ||
      unmatched < 0 || unmatched > 7 || !sere::valid_unmatched(unmatched) ||
      (scale != nullptr && rule == sere::kRuleTopS)) {
    return cudaErrorInvalidValue;
  }
  if (s > k) s = k;
  int64_t blocks = (num_tokens + kMinTokensPerBlock - 1) / kMinTokensPerBlock;
  if (blocks > kMaxBlocks) blocks = kMaxBlocks;
  if (blocks < 1) blocks = 1;  // T = 0 still counts (nothing) and honours the gate
  const int64_t per_block = (num_tokens + blocks - 1) / blocks;
  if (counts != nullptr && blocks > 1) {
    if (workspace == nullptr) return cudaErrorInvalidValue;
    const cudaError_t err = cudaMemsetAsync(workspace, 0, kWorkspaceWords * sizeof(unsigned), stream);
    if (err != cudaSuccess) return err;
  }
  auto* kernel = &route_kernel<Id, W, Sim>;
  SERE_LAUNCH_KERNEL(kernel, static_cast<unsigned>(blocks), kThreads, stream, static_cast<const Id*>(ids),
                     static_cast<const W*>(w), static_cast<Id*>(out_ids), static_cast<W*>(out_w),
                     static_cast<const Sim*>(sim), valid, ranks, num_ranks, static_cast<int>(num_tokens), k, s,
                     num_experts, rho, rule, merge, scale, unmatched, counts, gate, workspace,
                     static_cast<int>(per_block));
  return cudaGetLastError();
}

// ---- Entry points (the C functions in sere_reroute_cuda.cu and emu/sere_reroute_emu.cpp call these) ----

// f(Id{}) for the id type code, f(Sim{}) for the similarity type code; anything else is refused.
template <typename F>
cudaError_t with_id_type(int id_type, F&& f) {
  switch (id_type) {
    case sere::kInt32:
      return f(int32_t{});
    case sere::kInt64:
      return f(int64_t{});
    default:
      return cudaErrorInvalidValue;
  }
}

template <typename F>
cudaError_t with_sim_type(int sim_type, F&& f) {
  switch (sim_type) {
    case sere::kFloat32:
      return f(float{});
    case sere::kBFloat16:
      return f(__nv_bfloat16{});
    case sere::kFloat16:
      return f(__half{});
    default:
      return cudaErrorInvalidValue;
  }
}

inline cudaError_t reroute_entry(int id_type, int sim_type, const void* ids, void* out, const void* sim,
                                 const bool* valid, int64_t num_tokens, int top_k, int select_top_k, int num_experts,
                                 float threshold, cudaStream_t stream) {
  return with_id_type(id_type, [&](auto id) {
    return with_sim_type(sim_type, [&](auto sim_value) {
      return launch<decltype(id), decltype(sim_value)>(ids, out, sim, valid, num_tokens, top_k, select_top_k,
                                                       num_experts, threshold, stream);
    });
  });
}

inline cudaError_t per_slot_entry(int id_type, int sim_type, void* ids, const void* sim, const bool* valid,
                                  int64_t num_tokens, int top_k, int select_top_k, int num_experts, float threshold,
                                  unsigned char* flags, cudaStream_t stream) {
  const int s = select_top_k > top_k ? top_k : select_top_k;
  return with_id_type(id_type, [&](auto id) {
    return with_sim_type(sim_type, [&](auto sim_value) {
      return launch_per_slot<decltype(id), decltype(sim_value)>(ids, sim, valid, num_tokens, top_k, s, num_experts,
                                                                threshold, flags, stream);
    });
  });
}

inline cudaError_t route_entry(int id_type, int weight_type, int sim_type, const void* ids, const void* w,
                               void* out_ids, void* out_w, const void* sim, const bool* valid, const bool* ranks,
                               int num_ranks, int64_t num_tokens, int top_k, int select_top_k, int num_experts,
                               float threshold, int rule, bool merge, const float* scale, int unmatched,
                               long long* counts, const bool* gate, unsigned* workspace, cudaStream_t stream) {
  return with_id_type(id_type, [&](auto id) {
    return with_sim_type(weight_type, [&](auto weight) {
      return with_sim_type(sim_type, [&](auto sim_value) {
        return launch_route<decltype(id), decltype(weight), decltype(sim_value)>(
            ids, w, out_ids, out_w, sim, valid, ranks, num_ranks, num_tokens, top_k, select_top_k, num_experts,
            threshold, rule, merge, scale, unmatched, counts, gate, workspace, stream);
      });
    });
  });
}

}  // namespace
