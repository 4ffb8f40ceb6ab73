// SERE re-routing: the C++ CPU kernel and the torch custom ops `sere_dist::reroute` (returns new
// ids) and `sere_dist::reroute_` (in place). The CUDA kernel lives in sere_reroute_cuda.cu and is
// registered here when the extension is built with SERE_WITH_CUDA. Semantics: sere_reroute.h.
//
// CPU kernel: primary flags from the valid tokens' top-S slots; then the table M[e], only the rows the
// secondary slots use for small batches (O(min(E, T*(k-S)) * P) for P primaries), every row for large
// ones (float32 rows with many primaries take an SSE2 masked max); then the gather. Batches with at
// least 32768 secondary slots compute rows and gather in parallel (at::parallel_for, OpenMP).
// No heap allocation besides the output: flags and table are fixed-size stack arrays (E <= 512).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
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
  m.def("per_slot_scan_(Tensor(a!) topk_ids, Tensor sim, int select_top_k, float threshold, Tensor? valid, "
        "Tensor(b!) workspace) -> ()");
}

TORCH_LIBRARY_IMPL(sere_dist, CPU, m) {
  m.impl("reroute", &reroute_cpu);
  m.impl("reroute_", &reroute_cpu_);
}

#ifdef SERE_WITH_CUDA
TORCH_LIBRARY_IMPL(sere_dist, CUDA, m) {
  m.impl("reroute", &reroute_cuda);
  m.impl("reroute_", &reroute_cuda_);
  m.impl("per_slot_scan_", &per_slot_scan_cuda_);
}
#endif
