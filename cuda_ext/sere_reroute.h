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
//
// The whole hook (sere_dist::route; spec: sere_dist/core/reroute.py `route`), on ids and weights [T, k]
// in the router's slot order:
//   order[t]  = slots by weight, largest first, stable (torch.sort(descending=True, stable=True))
//   rule      = paper (above), rank_aware (among primaries with sim >= rho, the best on each rank the
//               token's own top-S experts visit; the best rank wins, lowest rank and id on ties; else
//               paper) or top_s (a valid token keeps its first S ordered slots, rescaled by
//               sum(w) / max(sum(kept w), 1e-12) summed left to right in float32; the rest get 0)
//   error-aware (scale [E, E] float32 given, rule paper or rank_aware; sim is then the gain matrix and rho
//               the gain threshold): on each valid token's ordered slots, a secondary slot j >= S whose
//               expert e is in [0, E) and not primary ("off") and was moved to p gets weight w * scale[e, p]
//               (one float32 multiply); an off slot left on e ("unmatched") is, by `unmatched`:
//                 0 keep:   kept as it is;
//                 1 drop:   id := the token's ordered slot-0 id (after the rule), weight 0, not kept;
//                 2 renorm: dropped as 1, then every kept slot's (already scaled) weight times
//                           r = total / max(part, 1e-12), total = sum of the token's ordered original
//                           weights left to right, part = the same with dropped slots adding 0.0
//                           (applied to every valid token, also when nothing was dropped);
//               plus the flag 4 (keep_sum, replaces renorm): every valid token's slots that were neither
//               moved nor dropped ("own") get weight w * r, r = max((total - moved) / max(own, 1e-12), 0),
//               total and own as above (own: the own slots' original weights), moved = the sum of the
//               moved slots' scaled weights, all left to right in float32: the weight the token lost goes
//               to its own experts and its weights keep their sum.
//               Dropped slots count as changed and are not "kept" (not merged, not in "distinct after").
//   merge     = a valid token's later kept copy of an expert adds its weight to the first copy, gets 0
//   counts   += [distinct experts before, distinct after (kept slots), changed or dropped slots,
//               any valid token, valid tokens] over valid tokens, when counts is given and gate holds
// Weights are computed in float32 and rounded once to their dtype; outputs are in the input slot order.
#pragma once

#include <cstdint>

namespace sere {

constexpr int kMaxExperts = 512;  // table and primary flags live in fixed-size (shared) arrays
constexpr int kMaxTopK = 16;
constexpr int kMaxRanks = 64;  // rank-aware rule: the ranks of an expert fit a 64-bit mask

enum Rule : int { kRulePaper = 0, kRuleRankAware = 1, kRuleTopS = 2 };
enum Unmatched : int { kUnmatchedKeep = 0, kUnmatchedDrop = 1, kUnmatchedRenorm = 2 };  // reroute.UNMATCHED_IDS
constexpr int kKeepSumFlag = 4;  // or-ed into `unmatched` (reroute.KEEP_SUM_FLAG)
inline bool valid_unmatched(int code) {
  return (code & ~(kKeepSumFlag | 3)) == 0 && (code & 3) <= kUnmatchedRenorm;
}

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

// The whole hook (sere_dist::route) on the GPU; weight_type uses the SimType codes. counts: int64 [5] or
// null; gate: one bool or null; ranks: [E, num_ranks] bool (rank_aware only); scale: [E, E] float32 or
// null (the error-aware rule; refused with rule top_s), unmatched: an Unmatched code; workspace: at least
// kRouteWorkspaceWords 32-bit words (used, and zeroed on `stream`, only when counting over several blocks).
// One memset and one kernel at most; no allocation, no host synchronisation, graph-capturable.
namespace sere {
constexpr int kRouteWorkspaceWords = kMaxExperts / 32 * 2 + 3;
}
extern "C" int sere_route_cuda_launch(int id_type, int weight_type, int sim_type, const void* ids, const void* weights,
                                       void* out_ids, void* out_weights, const void* sim, const bool* valid,
                                       const bool* ranks, int num_ranks, int64_t num_tokens, int top_k,
                                       int select_top_k, int num_experts, float threshold, int rule, int merge,
                                       const float* scale, int unmatched, long long* counts, const bool* gate,
                                       unsigned* workspace, void* stream);
