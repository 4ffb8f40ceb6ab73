// SERE re-routing: the C++ CPU kernels and the torch custom ops `sere_dist::reroute` (returns new
// ids), `sere_dist::reroute_` (in place) and `sere_dist::route` (the whole hook). The CUDA kernel lives in sere_reroute_cuda.cu and is
// registered here when the extension is built with SERE_WITH_CUDA. Semantics: sere_reroute.h.
//
// CPU kernel: primary flags from the valid tokens' top-S slots; then the table M[e], only the rows the
// secondary slots use for small batches (O(min(E, T*(k-S)) * P) for P primaries), every row for large
// ones (float32 rows with many primaries take an SSE2 masked max); then the gather. Batches with at
// least 32768 secondary slots compute rows and gather in parallel (at::parallel_for, OpenMP).
// No heap allocation besides the output: flags and table are fixed-size stack arrays (E <= 512).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <type_traits>
#include <tuple>
#include <vector>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#ifdef SERE_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#endif

#include "sere_reroute.h"

namespace {

using at::Tensor;

// Below this many secondary slots the serial kernel beats forking an OpenMP team.
constexpr int64_t kParallelSlots = 32768;

// Masked argmax of row[0:E] over the primaries (lowest id on ties), then the rho test; e when none.
// `plist` holds the P primaries ascending; `pmask` is 0xffffffff for a primary, 0 otherwise.
template <typename Sim>
int16_t best_primary(const Sim* row, int e, const int16_t* plist, int num_primary, float rho) {
  float best_v = -std::numeric_limits<float>::infinity();
  int best_p = -1;
  for (int q = 0; q < num_primary; ++q) {
    const int p = plist[q];
    const float v = static_cast<float>(row[p]);
    if (std::isnan(v)) return static_cast<int16_t>(e);  // torch's argmax picks the NaN; NaN >= rho is false
    if (v > best_v) {
      best_v = v;
      best_p = p;
    }
  }
  return static_cast<int16_t>(best_p >= 0 && best_v >= rho ? best_p : e);
}

#if defined(__SSE2__)
// Dense variant for float32 rows when most experts are primary: 4 lanes of masked max, then the first
// primary equal to the max. Same result as best_primary (NaN among primaries -> e; -0 == +0).
int16_t best_primary_sse(const float* row, int e, int num_experts, const uint32_t* pmask, const int16_t* plist,
                         int num_primary, float rho) {
  const __m128 neg_inf = _mm_set1_ps(-std::numeric_limits<float>::infinity());
  __m128 acc = neg_inf;
  __m128 nan = _mm_setzero_ps();
  int p = 0;
  for (; p + 4 <= num_experts; p += 4) {
    const __m128 m = _mm_castsi128_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(pmask + p)));
    const __m128 v = _mm_or_ps(_mm_and_ps(m, _mm_loadu_ps(row + p)), _mm_andnot_ps(m, neg_inf));
    nan = _mm_or_ps(nan, _mm_cmpunord_ps(v, v));
    acc = _mm_max_ps(acc, v);
  }
  float lanes[4];
  _mm_storeu_ps(lanes, acc);
  float best_v = std::max(std::max(lanes[0], lanes[1]), std::max(lanes[2], lanes[3]));
  if (_mm_movemask_ps(nan)) return static_cast<int16_t>(e);
  for (; p < num_experts; ++p) {
    if (!pmask[p]) continue;
    if (std::isnan(row[p])) return static_cast<int16_t>(e);
    best_v = std::max(best_v, row[p]);
  }
  if (!(best_v >= rho) || best_v == -std::numeric_limits<float>::infinity()) return static_cast<int16_t>(e);
  for (int q = 0; q < num_primary; ++q)
    if (row[plist[q]] == best_v) return plist[q];
  return static_cast<int16_t>(e);
}
#endif

// out[t, :] for tokens [t0, t1). Scalars by value: stores through `out` then cannot alias them, so they
// stay in registers (captured by reference they were reloaded after every store, 2x slower).
template <typename Id>
void gather_rows(const Id* ids, Id* out, const bool* valid, const int16_t* table, const int64_t t0,
                 const int64_t t1, const int k, const int s, const int num_experts) {
  const bool inplace = ids == out;
  const uint64_t n = static_cast<uint64_t>(num_experts);
  for (int64_t t = t0; t < t1; ++t) {
    const Id* row = ids + t * k;
    Id* dst = out + t * k;
    if (valid != nullptr && !valid[t]) {
      if (!inplace) std::memcpy(dst, row, sizeof(Id) * k);
      continue;
    }
    if (!inplace) std::memcpy(dst, row, sizeof(Id) * s);
    for (int j = s; j < k; ++j) {
      const Id e = row[j];
      dst[j] = static_cast<uint64_t>(e) < n ? static_cast<Id>(table[e]) : e;
    }
  }
}

template <typename Id, typename Sim>
void reroute_cpu_kernel(const Id* ids, Id* out, const Sim* sim, const bool* valid, const int64_t num_tokens,
                        const int k, const int s, const int num_experts, const float rho) {
  const bool inplace = ids == out;
  if (num_tokens == 0) return;
  if (s >= k) {
    if (!inplace) std::memcpy(out, ids, sizeof(Id) * num_tokens * k);
    return;
  }
  const auto in_range = [num_experts](Id e) { return static_cast<uint64_t>(e) < static_cast<uint64_t>(num_experts); };

  // 1. Primaries.
  uint8_t primary[sere::kMaxExperts] = {};
  for (int64_t t = 0; t < num_tokens; ++t) {
    if (valid != nullptr && !valid[t]) continue;
    const Id* row = ids + t * k;
    for (int j = 0; j < s; ++j)
      if (in_range(row[j])) primary[row[j]] = 1;
  }
  int16_t plist[sere::kMaxExperts];
  uint32_t pmask[sere::kMaxExperts];
  int16_t table[sere::kMaxExperts];  // -1: not computed (yet)
  int num_primary = 0;
  for (int e = 0; e < num_experts; ++e) {
    if (primary[e]) plist[num_primary++] = static_cast<int16_t>(e);
    pmask[e] = primary[e] ? 0xffffffffu : 0u;
    table[e] = primary[e] ? static_cast<int16_t>(e) : int16_t{-1};
  }
  const auto row_best = [&](int e) -> int16_t {
    const Sim* row = sim + static_cast<int64_t>(e) * num_experts;
#if defined(__SSE2__)
    if constexpr (std::is_same_v<Sim, float>) {
      if (num_primary * 4 >= num_experts) return best_primary_sse(row, e, num_experts, pmask, plist, num_primary, rho);
    }
#endif
    return best_primary(row, e, plist, num_primary, rho);
  };

  // 2. Table rows. Large batches need nearly every row: compute them all (in parallel). Small ones
  // compute only the rows their secondary slots use.
  const int64_t slots = num_tokens * (k - s);
  const bool parallel = slots >= kParallelSlots && at::get_num_threads() > 1 && !at::in_parallel_region();
  if (slots >= 4 * static_cast<int64_t>(num_experts)) {
    const auto rows = [&](int64_t e0, int64_t e1) {
      for (int64_t e = e0; e < e1; ++e)
        if (table[e] < 0) table[e] = row_best(static_cast<int>(e));
    };
    if (parallel)
      at::parallel_for(0, num_experts, 16, rows);
    else
      rows(0, num_experts);
  } else {
    for (int64_t t = 0; t < num_tokens; ++t) {
      if (valid != nullptr && !valid[t]) continue;
      const Id* row = ids + t * k;
      for (int j = s; j < k; ++j) {
        const Id e = row[j];
        if (in_range(e) && table[e] < 0) table[e] = row_best(static_cast<int>(e));
      }
    }
  }

  // 3. Gather; table entries of experts no valid secondary slot uses may stay -1 and are never read.
  const int16_t* tab = table;
  if (parallel) {
    at::parallel_for(0, num_tokens, std::max<int64_t>(1, kParallelSlots / 2 / k), [=](int64_t t0, int64_t t1) {
      gather_rows(ids, out, valid, tab, t0, t1, k, s, num_experts);
    });
  } else {
    gather_rows(ids, out, valid, tab, 0, num_tokens, k, s, num_experts);
  }
}

// ---- The whole routing hook (sere_dist::route), semantics: sere_reroute.h, spec: core/reroute.py `route`.
// Per call: (1) each token's slot order by weight (stable, largest first; a row already in order costs
// k - 1 compares), recomputed in each pass instead of stored; (2) primaries; (3) table rows on demand
// (paper rows as above; rank-aware rows: the best passing primary per rank); (4) per token: the rule,
// the error-aware weights (with `scale`: moved slots scaled, unmatched ones kept, dropped or dropped with
// renormalisation), top-S or merge on the ordered slots, written back in the router's slot order;
// (5) counters.
// Serial: a decode batch takes a few microseconds, and forking threads would cost more.

// torch.sort(descending=True, stable=True): NaN first, then larger values; ties keep slot order.
inline bool sorts_before(float a, float b) { return a > b || (std::isnan(a) && !std::isnan(b)); }

template <typename W>
inline void slot_order(const W* w, int k, uint8_t* order) {
  bool sorted = true;
  for (int j = 0; j + 1 < k; ++j)
    if (sorts_before(static_cast<float>(w[j + 1]), static_cast<float>(w[j]))) sorted = false;
  for (int j = 0; j < k; ++j) order[j] = static_cast<uint8_t>(j);
  if (sorted) return;
  for (int j = 1; j < k; ++j) {  // insertion sort: stable
    const uint8_t cur = order[j];
    const float v = static_cast<float>(w[cur]);
    int i = j;
    while (i > 0 && sorts_before(v, static_cast<float>(w[order[i - 1]]))) {
      order[i] = order[i - 1];
      --i;
    }
    order[i] = cur;
  }
}

struct Bits {  // E <= 512 experts
  uint64_t w[sere::kMaxExperts / 64] = {};
  void set(int e) { w[e >> 6] |= uint64_t{1} << (e & 63); }
  bool get(int e) const { return (w[e >> 6] >> (e & 63)) & 1; }
  int64_t count() const {
    int64_t n = 0;
    for (uint64_t x : w) n += __builtin_popcountll(x);
    return n;
  }
};

template <typename Id, typename W, typename Sim>
void route_cpu_kernel(const Id* ids, const W* wts, Id* out_ids, W* out_w, const Sim* sim, const bool* valid,
                      const bool* ranks, int num_ranks, int64_t num_tokens, int k, int s, int num_experts, float rho,
                      int rule, bool merge, const float* scale, int unmatched, int64_t* counts) {
  const auto in_range = [num_experts](Id e) { return static_cast<uint64_t>(e) < static_cast<uint64_t>(num_experts); };
  const bool top_s = rule == sere::kRuleTopS;
  const bool rank_aware = rule == sere::kRuleRankAware;
  uint8_t order[sere::kMaxTopK];

  // 1. Primaries (re-routing rules only).
  uint8_t primary[sere::kMaxExperts] = {};
  if (!top_s && s < k) {
    for (int64_t t = 0; t < num_tokens; ++t) {
      if (valid != nullptr && !valid[t]) continue;
      slot_order(wts + t * k, k, order);
      for (int j = 0; j < s; ++j) {
        const Id e = ids[t * k + order[j]];
        if (in_range(e)) primary[e] = 1;
      }
    }
  }
  int16_t plist[sere::kMaxExperts];
  uint32_t pmask[sere::kMaxExperts];
  int16_t table[sere::kMaxExperts];  // paper rule, -1 = not computed yet
  int num_primary = 0;
  for (int e = 0; e < num_experts; ++e) {
    if (primary[e]) plist[num_primary++] = static_cast<int16_t>(e);
    pmask[e] = primary[e] ? 0xffffffffu : 0u;
    table[e] = primary[e] ? static_cast<int16_t>(e) : int16_t{-1};
  }
  const auto paper = [&](int e) -> int16_t {
    if (table[e] < 0) {
      const Sim* row = sim + static_cast<int64_t>(e) * num_experts;
#if defined(__SSE2__)
      if constexpr (std::is_same_v<Sim, float>) {
        if (num_primary * 4 >= num_experts) {
          table[e] = best_primary_sse(row, e, num_experts, pmask, plist, num_primary, rho);
          return table[e];
        }
      }
#endif
      table[e] = best_primary(row, e, plist, num_primary, rho);
    }
    return table[e];
  };
  // Rank-aware rows: for expert e and rank r, the most similar primary on r with sim >= rho (lowest id on
  // ties), -inf when none. Ranks of an expert as a bit mask (R <= 64).
  std::vector<uint64_t> rank_bits;
  std::vector<float> rank_val;
  std::vector<int16_t> rank_idx;
  std::vector<uint8_t> rank_done;
  if (rank_aware && s < k) {
    rank_bits.assign(num_experts, 0);
    for (int e = 0; e < num_experts; ++e)
      for (int r = 0; r < num_ranks; ++r)
        if (ranks[static_cast<int64_t>(e) * num_ranks + r]) rank_bits[e] |= uint64_t{1} << r;
    rank_val.resize(static_cast<size_t>(num_experts) * num_ranks);
    rank_idx.resize(static_cast<size_t>(num_experts) * num_ranks);
    rank_done.assign(num_experts, 0);
  }
  const auto rank_row = [&](int e) {
    float* val = rank_val.data() + static_cast<int64_t>(e) * num_ranks;
    int16_t* idx = rank_idx.data() + static_cast<int64_t>(e) * num_ranks;
    if (rank_done[e]) return;
    rank_done[e] = 1;
    for (int r = 0; r < num_ranks; ++r) {
      val[r] = -std::numeric_limits<float>::infinity();
      idx[r] = 0;
    }
    const Sim* row = sim + static_cast<int64_t>(e) * num_experts;
    for (int q = 0; q < num_primary; ++q) {
      const int p = plist[q];
      const float v = static_cast<float>(row[p]);
      if (!(v >= rho)) continue;  // NaN never passes
      for (uint64_t m = rank_bits[p]; m != 0; m &= m - 1) {
        const int r = __builtin_ctzll(m);
        if (v > val[r]) {
          val[r] = v;
          idx[r] = static_cast<int16_t>(p);
        }
      }
    }
  };

  // 2. Per token, on the ordered slots.
  Bits before, after;
  int64_t rerouted = 0, n_valid = 0;
  Id sid[sere::kMaxTopK];
  float sw[sere::kMaxTopK];
  bool kept[sere::kMaxTopK];
  for (int64_t t = 0; t < num_tokens; ++t) {
    const Id* row = ids + t * k;
    const W* wrow = wts + t * k;
    Id* orow = out_ids + t * k;
    W* owrow = out_w + t * k;
    if (valid != nullptr && !valid[t]) {
      std::memcpy(orow, row, sizeof(Id) * k);
      std::memcpy(owrow, wrow, sizeof(W) * k);
      continue;
    }
    ++n_valid;
    slot_order(wrow, k, order);
    for (int j = 0; j < k; ++j) {
      sid[j] = row[order[j]];
      sw[j] = static_cast<float>(wrow[order[j]]);
      kept[j] = true;
      if (in_range(sid[j])) before.set(static_cast<int>(sid[j]));
    }
    if (top_s) {
      float total = sw[0], part = sw[0];
      for (int j = 1; j < k; ++j) total += sw[j];
      for (int j = 1; j < s; ++j) part += sw[j];
      const float scale = total / std::max(part, 1e-12f);
      for (int j = 0; j < k; ++j) {
        kept[j] = j < s;
        sw[j] = j < s ? sw[j] * scale : 0.0f;
      }
      rerouted += k - s;
    } else {
      uint32_t off = 0, moved = 0;  // ordered slots: secondary of a non-primary expert / moved by the rule
      uint64_t visited = 0;
      if (rank_aware && s < k)
        for (int j = 0; j < s; ++j)
          if (in_range(sid[j])) visited |= rank_bits[sid[j]];
      for (int j = s; j < k; ++j) {
        const Id e = sid[j];
        if (!in_range(e) || primary[e]) continue;
        off |= 1u << j;
        int16_t to = paper(static_cast<int>(e));
        if (rank_aware) {
          rank_row(static_cast<int>(e));
          const float* val = rank_val.data() + static_cast<int64_t>(e) * num_ranks;
          float best = -std::numeric_limits<float>::infinity();
          int best_r = -1;
          for (uint64_t m = visited; m != 0; m &= m - 1) {  // ascending r: strict > keeps the lowest rank
            const int r = __builtin_ctzll(m);
            if (val[r] > best) {
              best = val[r];
              best_r = r;
            }
          }
          if (best_r >= 0) to = rank_idx[static_cast<int64_t>(e) * num_ranks + best_r];
        }
        if (static_cast<Id>(to) != e) {
          sid[j] = static_cast<Id>(to);
          moved |= 1u << j;
          ++rerouted;
        }
      }
      if (scale != nullptr) {  // the error-aware rule (sere_reroute.h): scale, drop or renormalise
        const Id first = sid[0];
        const int how = unmatched & 3;
        const bool keep_sum = (unmatched & sere::kKeepSumFlag) != 0;
        const bool renorm = how == sere::kUnmatchedRenorm && !keep_sum;
        float total = 0.0f, part = 0.0f, lost = 0.0f;
        float w_in[sere::kMaxTopK];
        uint32_t own = 0;
        for (int j = 0; j < k; ++j) {
          const float w0 = sw[j];
          w_in[j] = w0;
          const uint32_t bit = 1u << j;
          const bool drop = how != sere::kUnmatchedKeep && (off & bit) && !(moved & bit);
          if (renorm || keep_sum) {
            const float c = (drop || (keep_sum && (moved & bit))) ? 0.0f : w0;
            total = j == 0 ? w0 : total + w0;
            part = j == 0 ? c : part + c;
          }
          if (moved & bit) {
            sw[j] = w0 * scale[static_cast<int64_t>(row[order[j]]) * num_experts + static_cast<int64_t>(sid[j])];
          } else if (drop) {
            sid[j] = first;
            sw[j] = 0.0f;
            kept[j] = false;
            ++rerouted;
          } else {
            own |= bit;
          }
          if (keep_sum) {
            const float m = (moved & bit) ? sw[j] : 0.0f;
            lost = j == 0 ? m : lost + m;
          }
        }
        if (renorm) {
          const float r = total / std::max(part, 1e-12f);  // NaN stays NaN, as torch's clamp
          for (int j = 0; j < k; ++j)
            if (kept[j]) sw[j] = sw[j] * r;
        }
        if (keep_sum) {
          float r = (total - lost) / std::max(part, 1e-12f);
          r = r < 0.0f ? 0.0f : r;  // NaN stays NaN, as torch's clamp
          for (int j = 0; j < k; ++j)
            if (own & (1u << j)) sw[j] = w_in[j] * r;
        }
      }
    }
    if (merge) {
      for (int j = 1; j < k; ++j) {
        if (!kept[j]) continue;
        for (int i = 0; i < j; ++i) {
          if (kept[i] && sid[i] == sid[j]) {
            sw[i] = sw[i] + sw[j];
            sw[j] = 0.0f;
            kept[j] = false;
            break;
          }
        }
      }
    }
    for (int j = 0; j < k; ++j) {
      orow[order[j]] = sid[j];
      owrow[order[j]] = static_cast<W>(sw[j]);
      if (kept[j] && in_range(sid[j])) after.set(static_cast<int>(sid[j]));
    }
  }
  if (counts != nullptr) {
    counts[0] += before.count();
    counts[1] += after.count();
    counts[2] += rerouted;
    counts[3] += n_valid > 0 ? 1 : 0;
    counts[4] += n_valid;
  }
}

template <typename Id>
void cpu_dispatch_sim(const Tensor& ids, Tensor& out, const Tensor& sim, const bool* valid, int64_t s,
                      float rho) {
  const int64_t T = ids.size(0);
  const int k = static_cast<int>(ids.size(1));
  const int sk = static_cast<int>(std::min<int64_t>(s, k));
  const int E = static_cast<int>(sim.size(0));
  const Id* ip = ids.const_data_ptr<Id>();
  Id* op = out.mutable_data_ptr<Id>();
  switch (sim.scalar_type()) {
    case at::kFloat:
      reroute_cpu_kernel(ip, op, sim.const_data_ptr<float>(), valid, T, k, sk, E, rho);
      break;
    case at::kBFloat16:
      reroute_cpu_kernel(ip, op, sim.const_data_ptr<c10::BFloat16>(), valid, T, k, sk, E, rho);
      break;
    case at::kHalf:
      reroute_cpu_kernel(ip, op, sim.const_data_ptr<c10::Half>(), valid, T, k, sk, E, rho);
      break;
    default:
      TORCH_CHECK(false, "unreachable");
  }
}

void check_inputs(const Tensor& ids, const Tensor& sim, int64_t s, const std::optional<Tensor>& valid) {
  TORCH_CHECK(ids.dim() == 2, "sere_dist::reroute: topk_ids must be [T, k], got ", ids.sizes());
  TORCH_CHECK(ids.scalar_type() == at::kInt || ids.scalar_type() == at::kLong,
              "sere_dist::reroute: topk_ids must be int32 or int64, got ", ids.scalar_type());
  TORCH_CHECK(ids.size(1) >= 1 && ids.size(1) <= sere::kMaxTopK, "sere_dist::reroute: k = ", ids.size(1),
              " outside [1, ", sere::kMaxTopK, "]");
  TORCH_CHECK(sim.dim() == 2 && sim.size(0) == sim.size(1), "sere_dist::reroute: sim must be [E, E], got ",
              sim.sizes());
  TORCH_CHECK(sim.size(0) >= 1 && sim.size(0) <= sere::kMaxExperts, "sere_dist::reroute: E = ", sim.size(0),
              " outside [1, ", sere::kMaxExperts, "]");
  TORCH_CHECK(sim.scalar_type() == at::kFloat || sim.scalar_type() == at::kBFloat16 ||
                  sim.scalar_type() == at::kHalf,
              "sere_dist::reroute: sim must be float32, bfloat16 or float16, got ", sim.scalar_type());
  TORCH_CHECK(s >= 0, "sere_dist::reroute: select_top_k must be >= 0, got ", s);
  TORCH_CHECK(sim.device() == ids.device(), "sere_dist::reroute: sim on ", sim.device(), ", topk_ids on ",
              ids.device());
  TORCH_CHECK(ids.numel() <= std::numeric_limits<int32_t>::max(), "sere_dist::reroute: T*k too large");
  if (valid.has_value()) {
    TORCH_CHECK(valid->scalar_type() == at::kBool, "sere_dist::reroute: valid must be bool, got ",
                valid->scalar_type());
    TORCH_CHECK(valid->dim() == 1 && valid->size(0) == ids.size(0), "sere_dist::reroute: valid must be [T] = [",
                ids.size(0), "], got ", valid->sizes());
    TORCH_CHECK(valid->device() == ids.device(), "sere_dist::reroute: valid on ", valid->device(),
                ", topk_ids on ", ids.device());
  }
}

void run_cpu(const Tensor& ids, Tensor& out, const Tensor& sim_in, int64_t s, double threshold,
             const std::optional<Tensor>& valid_in) {
  const Tensor sim = sim_in.contiguous();
  const Tensor valid = valid_in.has_value() ? valid_in->contiguous() : Tensor();
  const bool* vp = valid.defined() ? valid.const_data_ptr<bool>() : nullptr;
  const float rho = static_cast<float>(threshold);  // as torch compares a float32 tensor with a Python float
  if (ids.scalar_type() == at::kInt)
    cpu_dispatch_sim<int32_t>(ids, out, sim, vp, s, rho);
  else
    cpu_dispatch_sim<int64_t>(ids, out, sim, vp, s, rho);
}

Tensor reroute_cpu(const Tensor& topk_ids, const Tensor& sim, int64_t s, double threshold,
                   const std::optional<Tensor>& valid) {
  check_inputs(topk_ids, sim, s, valid);
  const Tensor ids = topk_ids.contiguous();
  Tensor out = at::empty_like(ids, at::MemoryFormat::Contiguous);
  run_cpu(ids, out, sim, s, threshold, valid);
  return out;
}

void reroute_cpu_(Tensor& topk_ids, const Tensor& sim, int64_t s, double threshold,
                  const std::optional<Tensor>& valid) {
  check_inputs(topk_ids, sim, s, valid);
  TORCH_CHECK(topk_ids.is_contiguous(), "sere_dist::reroute_: in-place re-routing needs contiguous topk_ids");
  run_cpu(topk_ids, topk_ids, sim, s, threshold, valid);
}

// ---- sere_dist::route: checks and dispatch

void check_route_inputs(const Tensor& ids, const Tensor& w, const Tensor& sim, int64_t s,
                        const std::optional<Tensor>& valid, const std::optional<Tensor>& ranks,
                        const std::optional<Tensor>& counts, const std::optional<Tensor>& gate, int64_t rule,
                        const std::optional<Tensor>& scale, int64_t unmatched) {
  check_inputs(ids, sim, s, valid);
  TORCH_CHECK(w.sizes() == ids.sizes(), "sere_dist::route: topk_weights must be ", ids.sizes(), ", got ", w.sizes());
  TORCH_CHECK(w.scalar_type() == at::kFloat || w.scalar_type() == at::kBFloat16 || w.scalar_type() == at::kHalf,
              "sere_dist::route: topk_weights must be float32, bfloat16 or float16, got ", w.scalar_type());
  TORCH_CHECK(w.device() == ids.device(), "sere_dist::route: topk_weights on ", w.device(), ", topk_ids on ",
              ids.device());
  TORCH_CHECK(rule == sere::kRulePaper || rule == sere::kRuleRankAware || rule == sere::kRuleTopS,
              "sere_dist::route: rule must be 0 (paper), 1 (rank_aware) or 2 (top_s), got ", rule);
  if (rule == sere::kRuleRankAware) {
    TORCH_CHECK(ranks.has_value(), "sere_dist::route: rule rank_aware needs expert_ranks");
    TORCH_CHECK(ranks->scalar_type() == at::kBool && ranks->dim() == 2 && ranks->size(0) == sim.size(0) &&
                    ranks->size(1) >= 1 && ranks->size(1) <= sere::kMaxRanks,
                "sere_dist::route: expert_ranks must be bool [E, R] with E = ", sim.size(0), " and 1 <= R <= ",
                sere::kMaxRanks, ", got ", ranks->scalar_type(), " ", ranks->sizes());
    TORCH_CHECK(ranks->device() == ids.device(), "sere_dist::route: expert_ranks on ", ranks->device());
  }
  if (counts.has_value()) {
    TORCH_CHECK(counts->scalar_type() == at::kLong && counts->dim() == 1 && counts->size(0) == 5 &&
                    counts->is_contiguous(),
                "sere_dist::route: counts must be a contiguous int64 [5], got ", counts->scalar_type(), " ",
                counts->sizes());
    TORCH_CHECK(counts->device() == ids.device(), "sere_dist::route: counts on ", counts->device());
  }
  if (gate.has_value()) {
    TORCH_CHECK(gate->scalar_type() == at::kBool && gate->numel() == 1,
                "sere_dist::route: count_gate must be bool with one element, got ", gate->scalar_type(), " ",
                gate->sizes());
    TORCH_CHECK(gate->device() == ids.device(), "sere_dist::route: count_gate on ", gate->device());
  }
  TORCH_CHECK(unmatched >= 0 && unmatched <= 7 && sere::valid_unmatched(static_cast<int>(unmatched)),
              "sere_dist::route: unmatched must be 0 (keep), 1 (drop) or 2 (renorm), plus 4 for keep_sum, got ",
              unmatched);
  if (scale.has_value()) {
    TORCH_CHECK(rule != sere::kRuleTopS,
                "sere_dist::route: scale (the error-aware rule) needs rule 0 (paper) or 1 (rank_aware), got rule 2 "
                "(top_s)");
    TORCH_CHECK(scale->scalar_type() == at::kFloat && scale->dim() == 2 && scale->size(0) == sim.size(0) &&
                    scale->size(1) == sim.size(0),
                "sere_dist::route: scale must be float32 [E, E] with E = ", sim.size(0), ", got ",
                scale->scalar_type(), " ", scale->sizes());
    TORCH_CHECK(scale->device() == ids.device(), "sere_dist::route: scale on ", scale->device(), ", topk_ids on ",
                ids.device());
  }
}

template <typename F>
void with_weight_type(at::ScalarType t, F&& f) {
  switch (t) {
    case at::kFloat: return f(float{});
    case at::kBFloat16: return f(c10::BFloat16{});
    case at::kHalf: return f(c10::Half{});
    default: TORCH_CHECK(false, "unreachable");
  }
}

std::tuple<Tensor, Tensor> route_cpu(const Tensor& topk_ids, const Tensor& topk_weights, const Tensor& sim_in,
                                     const std::optional<Tensor>& valid_in, const std::optional<Tensor>& ranks_in,
                                     const std::optional<Tensor>& counts, const std::optional<Tensor>& gate,
                                     int64_t s, double threshold, int64_t rule, bool merge,
                                     const std::optional<Tensor>& scale_in, int64_t unmatched) {
  check_route_inputs(topk_ids, topk_weights, sim_in, s, valid_in, ranks_in, counts, gate, rule, scale_in, unmatched);
  const Tensor ids = topk_ids.contiguous();
  const Tensor w = topk_weights.contiguous();
  const Tensor sim = sim_in.contiguous();
  const Tensor valid = valid_in.has_value() ? valid_in->contiguous() : Tensor();
  const Tensor ranks = rule == sere::kRuleRankAware ? ranks_in->contiguous() : Tensor();
  const Tensor scale = scale_in.has_value() ? scale_in->contiguous() : Tensor();
  Tensor out_ids = at::empty_like(ids, at::MemoryFormat::Contiguous);
  Tensor out_w = at::empty_like(w, at::MemoryFormat::Contiguous);
  const int k = static_cast<int>(ids.size(1));
  const int sk = static_cast<int>(std::min<int64_t>(s, k));
  const int E = static_cast<int>(sim.size(0));
  const bool count = counts.has_value() && (!gate.has_value() || gate->item<bool>());
  int64_t* cp = count ? counts->mutable_data_ptr<int64_t>() : nullptr;
  const bool* vp = valid.defined() ? valid.const_data_ptr<bool>() : nullptr;
  const bool* rp = ranks.defined() ? ranks.const_data_ptr<bool>() : nullptr;
  const int R = ranks.defined() ? static_cast<int>(ranks.size(1)) : 0;
  const float rho = static_cast<float>(threshold);
  const auto run = [&](auto id_v, auto w_v, auto sim_v) {
    using Id = decltype(id_v);
    using Wt = decltype(w_v);
    using Sm = decltype(sim_v);
    route_cpu_kernel<Id, Wt, Sm>(ids.const_data_ptr<Id>(), w.const_data_ptr<Wt>(), out_ids.mutable_data_ptr<Id>(),
                                 out_w.mutable_data_ptr<Wt>(), sim.const_data_ptr<Sm>(), vp, rp, R, ids.size(0), k, sk,
                                 E, rho, static_cast<int>(rule), merge,
                                 scale.defined() ? scale.const_data_ptr<float>() : nullptr, static_cast<int>(unmatched),
                                 cp);
  };
  const auto with_ids = [&](auto w_v, auto sim_v) {
    if (ids.scalar_type() == at::kInt)
      run(int32_t{}, w_v, sim_v);
    else
      run(int64_t{}, w_v, sim_v);
  };
  with_weight_type(w.scalar_type(), [&](auto w_v) {
    with_weight_type(sim.scalar_type(), [&](auto sim_v) { with_ids(w_v, sim_v); });
  });
  return {out_ids, out_w};
}

#ifdef SERE_WITH_CUDA
void run_cuda(const Tensor& ids, Tensor& out, const Tensor& sim_in, int64_t s, double threshold,
              const std::optional<Tensor>& valid_in) {
  const c10::cuda::CUDAGuard guard(ids.device());
  const Tensor sim = sim_in.contiguous();
  const Tensor valid = valid_in.has_value() ? valid_in->contiguous() : Tensor();
  const int sim_type = sim.scalar_type() == at::kFloat      ? sere::kFloat32
                       : sim.scalar_type() == at::kBFloat16 ? sere::kBFloat16
                                                            : sere::kFloat16;
  const int err = sere_reroute_cuda_launch(
      ids.scalar_type() == at::kInt ? sere::kInt32 : sere::kInt64, sim_type, ids.const_data_ptr(),
      out.mutable_data_ptr(), sim.const_data_ptr(), valid.defined() ? valid.const_data_ptr<bool>() : nullptr,
      ids.size(0), static_cast<int>(ids.size(1)), static_cast<int>(std::min<int64_t>(s, ids.size(1))),
      static_cast<int>(sim.size(0)), static_cast<float>(threshold), c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == 0, "sere_dist::reroute: CUDA launch failed: ", cudaGetErrorString(static_cast<cudaError_t>(err)));
}

Tensor reroute_cuda(const Tensor& topk_ids, const Tensor& sim, int64_t s, double threshold,
                    const std::optional<Tensor>& valid) {
  check_inputs(topk_ids, sim, s, valid);
  const Tensor ids = topk_ids.contiguous();
  Tensor out = at::empty_like(ids, at::MemoryFormat::Contiguous);
  run_cuda(ids, out, sim, s, threshold, valid);
  return out;
}

void reroute_cuda_(Tensor& topk_ids, const Tensor& sim, int64_t s, double threshold,
                   const std::optional<Tensor>& valid) {
  check_inputs(topk_ids, sim, s, valid);
  TORCH_CHECK(topk_ids.is_contiguous(), "sere_dist::reroute_: in-place re-routing needs contiguous topk_ids");
  run_cuda(topk_ids, topk_ids, sim, s, threshold, valid);
}
// Benchmark baseline (the paper's kernel shape), CUDA only.
void per_slot_scan_cuda_(Tensor& topk_ids, const Tensor& sim, int64_t s, double threshold,
                         const std::optional<Tensor>& valid, Tensor& workspace) {
  check_inputs(topk_ids, sim, s, valid);
  TORCH_CHECK(topk_ids.is_contiguous(), "sere_dist::per_slot_scan_: needs contiguous topk_ids");
  TORCH_CHECK(workspace.device() == topk_ids.device() && workspace.scalar_type() == at::kByte &&
                  workspace.is_contiguous() && workspace.numel() >= sim.size(0),
              "sere_dist::per_slot_scan_: workspace must be a contiguous uint8 tensor of >= E elements on ",
              topk_ids.device());
  const c10::cuda::CUDAGuard guard(topk_ids.device());
  const Tensor simc = sim.contiguous();
  const Tensor validc = valid.has_value() ? valid->contiguous() : Tensor();
  const int sim_type = simc.scalar_type() == at::kFloat      ? sere::kFloat32
                       : simc.scalar_type() == at::kBFloat16 ? sere::kBFloat16
                                                             : sere::kFloat16;
  const int err = sere_per_slot_cuda_launch(
      topk_ids.scalar_type() == at::kInt ? sere::kInt32 : sere::kInt64, sim_type, topk_ids.mutable_data_ptr(),
      simc.const_data_ptr(), validc.defined() ? validc.const_data_ptr<bool>() : nullptr, topk_ids.size(0),
      static_cast<int>(topk_ids.size(1)), static_cast<int>(s), static_cast<int>(simc.size(0)),
      static_cast<float>(threshold), workspace.mutable_data_ptr(), c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == 0, "sere_dist::per_slot_scan_: CUDA launch failed: ",
              cudaGetErrorString(static_cast<cudaError_t>(err)));
}

int type_code(at::ScalarType t) {
  return t == at::kFloat ? sere::kFloat32 : t == at::kBFloat16 ? sere::kBFloat16 : sere::kFloat16;
}

std::tuple<Tensor, Tensor> route_cuda(const Tensor& topk_ids, const Tensor& topk_weights, const Tensor& sim_in,
                                      const std::optional<Tensor>& valid_in, const std::optional<Tensor>& ranks_in,
                                      const std::optional<Tensor>& counts, const std::optional<Tensor>& gate_in,
                                      int64_t s, double threshold, int64_t rule, bool merge,
                                      const std::optional<Tensor>& scale_in, int64_t unmatched) {
  check_route_inputs(topk_ids, topk_weights, sim_in, s, valid_in, ranks_in, counts, gate_in, rule, scale_in,
                     unmatched);
  const c10::cuda::CUDAGuard guard(topk_ids.device());
  const Tensor ids = topk_ids.contiguous();
  const Tensor w = topk_weights.contiguous();
  const Tensor sim = sim_in.contiguous();
  const Tensor valid = valid_in.has_value() ? valid_in->contiguous() : Tensor();
  const Tensor ranks = rule == sere::kRuleRankAware ? ranks_in->contiguous() : Tensor();
  const Tensor gate = gate_in.has_value() ? gate_in->contiguous() : Tensor();
  const Tensor scale = scale_in.has_value() ? scale_in->contiguous() : Tensor();
  Tensor out_ids = at::empty_like(ids, at::MemoryFormat::Contiguous);
  Tensor out_w = at::empty_like(w, at::MemoryFormat::Contiguous);
  // the caching allocator makes this free; the launcher zeroes it only when several blocks count
  Tensor workspace = at::empty({sere::kRouteWorkspaceWords}, ids.options().dtype(at::kInt));
  const int err = sere_route_cuda_launch(
      ids.scalar_type() == at::kInt ? sere::kInt32 : sere::kInt64, type_code(w.scalar_type()),
      type_code(sim.scalar_type()), ids.const_data_ptr(), w.const_data_ptr(), out_ids.mutable_data_ptr(),
      out_w.mutable_data_ptr(), sim.const_data_ptr(), valid.defined() ? valid.const_data_ptr<bool>() : nullptr,
      ranks.defined() ? ranks.const_data_ptr<bool>() : nullptr, ranks.defined() ? static_cast<int>(ranks.size(1)) : 0,
      ids.size(0), static_cast<int>(ids.size(1)), static_cast<int>(std::min<int64_t>(s, ids.size(1))),
      static_cast<int>(sim.size(0)), static_cast<float>(threshold), static_cast<int>(rule), merge ? 1 : 0,
      scale.defined() ? scale.const_data_ptr<float>() : nullptr, static_cast<int>(unmatched),
      counts.has_value() ? reinterpret_cast<long long*>(counts->mutable_data_ptr<int64_t>()) : nullptr,
      gate.defined() ? gate.const_data_ptr<bool>() : nullptr, static_cast<unsigned*>(workspace.mutable_data_ptr()),
      c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == 0, "sere_dist::route: CUDA launch failed: ", cudaGetErrorString(static_cast<cudaError_t>(err)));
  return {out_ids, out_w};
}
#endif

bool built_with_cuda() {
#ifdef SERE_WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace

TORCH_LIBRARY(sere_dist, m) {
  m.def("reroute(Tensor topk_ids, Tensor sim, int select_top_k, float threshold, Tensor? valid=None) -> Tensor");
  m.def("reroute_(Tensor(a!) topk_ids, Tensor sim, int select_top_k, float threshold, Tensor? valid=None) -> ()");
  m.def("built_with_cuda() -> bool", &built_with_cuda);
  m.def("route(Tensor topk_ids, Tensor topk_weights, Tensor sim, Tensor? valid, Tensor? expert_ranks, "
        "Tensor(a!)? counts, Tensor? count_gate, int select_top_k, float threshold, int rule, bool merge_duplicates, "
        "Tensor? scale=None, int unmatched=0) -> (Tensor, Tensor)");
  m.def("per_slot_scan_(Tensor(a!) topk_ids, Tensor sim, int select_top_k, float threshold, Tensor? valid, "
        "Tensor(b!) workspace) -> ()");
}

TORCH_LIBRARY_IMPL(sere_dist, CPU, m) {
  m.impl("reroute", &reroute_cpu);
  m.impl("reroute_", &reroute_cpu_);
  m.impl("route", &route_cpu);
}

#ifdef SERE_WITH_CUDA
TORCH_LIBRARY_IMPL(sere_dist, CUDA, m) {
  m.impl("reroute", &reroute_cuda);
  m.impl("reroute_", &reroute_cuda_);
  m.impl("per_slot_scan_", &per_slot_scan_cuda_);
  m.impl("route", &route_cuda);
}
#endif
