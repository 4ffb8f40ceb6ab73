"""GPU timings for re-routing (run by benchmarks/gpu_check.sh; needs a CUDA GPU and the built extension).

    python benchmarks/bench_kernels_gpu.py [--quick] [--out benchmarks/results/kernels_gpu.json]

Part 1, kernels. For T in {1, 8, 64, 256, 1024, 4096}, E in {60, 64, 128, 256}, k in {4, 6, 8} (S = 2,
rho = 0.3, int32 ids, float32 sim) the median time per call, with CUDA events, of
  torch_ref      `sere_dist.core.reroute.reroute(..., with_stats=False)` (the per-batch table in torch)
  torch_scan     `sere_dist.core.reroute.per_slot_scan` (the paper's algorithm in torch)
  native         `torch.ops.sere_dist.reroute` (our fused kernel, new output tensor)
  copy+native_   ids copied to a scratch buffer, then `sere_dist::reroute_` in place
  copy+per_slot_ ids copied to a scratch buffer, then `sere_dist::per_slot_scan_`: the paper's CUDA kernel
                 shape (one thread per secondary slot scanning all E experts, in place)
each both eagerly (one call between two events: launch overheads included) and as CUDA-graph replay
(20 calls captured in one graph, time / 20). The copies keep in-place kernels from seeing already
re-routed ids on repeat; the copy alone is timed too.

Part 2, one Qwen3-30B-A3B-shaped MoE layer decode step (E = 128, k = 8, hidden 2048, expert intermediate
768, bf16; router matmul + softmax + top-k + [re-routing] + experts), T in {16, 32, 64, 128, 256}, without
re-routing and with it at S = 1, 2 (rho = 0.3 on a synthetic similarity), timed as CUDA-graph replay.
The experts run as two `torch._grouped_mm` calls over the slots sorted by expert: a group with no tokens
launches no tiles, so only the distinct experts' weights are read and fewer distinct experts shows up
as time. Where `_grouped_mm` is unavailable a per-expert loop (host sync, eager) is used and labelled.

Part 3, the vLLM hook op (`core.native.route_fast` -> `sere_dist::route`: order by weight, re-route,
restore the order, counters in place). Parity: random cases of every rule (tests/cuda_emu.py's
`random_route_case`, every other case the error-aware rule: `random_error_aware_case`) on the GPU against
the torch spec `core.reroute.route`, bit for bit, counters included; CUDA graph: the op captured with counters and a count gate, replayed on fresh ids, gives
the spec's ids and weights and the summed counters. Timings (E = 128, k = 8, S = 2, rho = 0.3; T in
{1, 16, 64, 256}; eager and CUDA-graph replay): the op with counters, without, and the pre-issue-13
hook (sort, gather, re-route kernel, scatter, ~25 torch ops of counting) for comparison.

`--parts kernels,moe,route` picks parts (default all); gpu_check.sh runs them as separate time-boxed steps.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sere_dist.core import native  # noqa: E402
from sere_dist.core.reroute import per_slot_scan, reroute  # noqa: E402

TS = (1, 8, 64, 256, 1024, 4096)
ES = (60, 64, 128, 256)
KS = (4, 6, 8)
S, RHO = 2, 0.3
GRAPH_INNER = 20


def make_case(t: int, e: int, k: int, seed: int, device="cuda"):
    g = torch.Generator().manual_seed(seed)
    sim = torch.rand(e, e, generator=g)
    sim = torch.maximum(sim, sim.t()).fill_diagonal_(1.0)
    logits = torch.randn(t, e, generator=g) - torch.linspace(0, 3, e)
    ids = logits.topk(k, dim=1).indices.to(torch.int32)
    return ids.to(device), sim.to(device)


def time_eager_us(fn, reps: int = 50) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return statistics.median(times)


def time_graph_us(fn, inner: int = GRAPH_INNER, reps: int = 30) -> float:
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (allocations, lazy init) outside capture
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(inner):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / inner)
    del graph
    return statistics.median(times)


def bench_kernels(ts, es, ks) -> list[dict]:
    op = torch.ops.sere_dist
    rows = []
    print(f"{'T':>5} {'E':>4} {'k':>2} | {'mode':>5} | {'torch_ref':>9} {'torch_scan':>10} {'native':>7} "
          f"{'copy+nat_':>9} {'copy+slot':>9} {'copy':>6} | {'x ref':>5} {'x slot':>6}")
    for t in ts:
        for e in es:
            for k in ks:
                ids, sim = make_case(t, e, k, seed=hash((t, e, k)) % 2**31)
                want = reroute(ids, sim, S, RHO, with_stats=False)[0]
                assert torch.equal(per_slot_scan(ids, sim, S, RHO), want), (t, e, k)
                assert torch.equal(op.reroute(ids, sim, S, RHO, None), want), (t, e, k)
                scratch = ids.clone()
                flags = torch.empty(e, dtype=torch.uint8, device="cuda")
                op.per_slot_scan_(scratch, sim, S, RHO, None, flags)
                assert torch.equal(scratch, want), (t, e, k)
                scratch.copy_(ids)
                op.reroute_(scratch, sim, S, RHO, None)
                assert torch.equal(scratch, want), (t, e, k)

                def copy_native_():
                    scratch.copy_(ids)
                    op.reroute_(scratch, sim, S, RHO, None)

                def copy_per_slot_():
                    scratch.copy_(ids)
                    op.per_slot_scan_(scratch, sim, S, RHO, None, flags)

                fns = {
                    "torch_ref": lambda: reroute(ids, sim, S, RHO, with_stats=False),
                    "torch_scan": lambda: per_slot_scan(ids, sim, S, RHO),
                    "native": lambda: op.reroute(ids, sim, S, RHO, None),
                    "copy_native_inplace": copy_native_,
                    "copy_per_slot_cuda": copy_per_slot_,
                    "copy": lambda: scratch.copy_(ids),
                }
                for mode, timer in (("eager", time_eager_us), ("graph", time_graph_us)):
                    row = {"T": t, "E": e, "k": k, "mode": mode}
                    for name, fn in fns.items():
                        row[f"{name}_us"] = timer(fn)
                    row["speedup_vs_ref"] = row["torch_ref_us"] / row["native_us"]
                    row["speedup_vs_per_slot_cuda"] = row["copy_per_slot_cuda_us"] / row["copy_native_inplace_us"]
                    rows.append(row)
                    print(f"{t:>5} {e:>4} {k:>2} | {mode:>5} | {row['torch_ref_us']:>9.1f} {row['torch_scan_us']:>10.1f} "
                          f"{row['native_us']:>7.1f} {row['copy_native_inplace_us']:>9.1f} "
                          f"{row['copy_per_slot_cuda_us']:>9.1f} {row['copy_us']:>6.1f} | "
                          f"{row['speedup_vs_ref']:>5.1f} {row['speedup_vs_per_slot_cuda']:>6.2f}", flush=True)
    return rows


class Qwen3MoELayer:
    """Router + 128 SwiGLU experts of Qwen3-30B-A3B's shape (random weights), bf16."""

    def __init__(self, num_experts=128, top_k=8, hidden=2048, inter=768, dtype=torch.bfloat16, seed=0,
                 device="cuda"):
        g = torch.Generator(device=device).manual_seed(seed)
        self.e, self.k, self.h, self.i = num_experts, top_k, hidden, inter
        self.router = torch.randn(hidden, num_experts, device=device, dtype=dtype, generator=g) * hidden**-0.5
        self.w13 = torch.randn(num_experts, 2 * inter, hidden, device=device, dtype=dtype, generator=g) * hidden**-0.5
        self.w2 = torch.randn(num_experts, hidden, inter, device=device, dtype=dtype, generator=g) * inter**-0.5
        self.expert_bytes = (self.w13[0].numel() + self.w2[0].numel()) * self.w13.element_size()

    def route(self, x):
        probs = (x @ self.router).float().softmax(-1)
        weights, ids = probs.topk(self.k, dim=-1)
        return weights / weights.sum(-1, keepdim=True), ids.to(torch.int32)  # Qwen3: norm_topk_prob

    def experts_grouped(self, x, weights, ids):
        flat = ids.reshape(-1).long()
        order = flat.argsort(stable=True)
        tok = order // self.k
        counts = torch.zeros(self.e, dtype=torch.int32, device=x.device).index_add_(
            0, flat, torch.ones_like(flat, dtype=torch.int32))
        offs = counts.cumsum(0, dtype=torch.int32)
        h = torch._grouped_mm(x[tok], self.w13.transpose(1, 2), offs=offs)
        a = F.silu(h[:, :self.i]) * h[:, self.i:]
        y = torch._grouped_mm(a, self.w2.transpose(1, 2), offs=offs)
        y = y * weights.reshape(-1)[order].unsqueeze(1).to(y.dtype)
        return torch.zeros_like(x).index_add_(0, tok, y)

    def experts_loop(self, x, weights, ids):  # fallback: host sync per step, eager only
        out = torch.zeros_like(x)
        for e in torch.unique(ids).tolist():
            tok, slot = (ids == e).nonzero(as_tuple=True)
            h = x[tok] @ self.w13[e].t()
            a = F.silu(h[:, :self.i]) * h[:, self.i:]
            out.index_add_(0, tok, (a @ self.w2[e].t()) * weights[tok, slot].unsqueeze(1).to(x.dtype))
        return out


def bench_moe_step(ts) -> dict:
    layer = Qwen3MoELayer()
    g = torch.Generator().manual_seed(1)
    sim = torch.rand(layer.e, layer.e, generator=g)
    sim = torch.maximum(sim, sim.t()).fill_diagonal_(1.0).cuda()
    x0 = torch.randn(max(ts), layer.h, generator=g).to("cuda", torch.bfloat16)

    experts, mode = layer.experts_grouped, "graph"
    try:
        w, i = layer.route(x0[:16])
        ref = layer.experts_loop(x0[:16], w, i)
        got = layer.experts_grouped(x0[:16], w, i)
        err = ((got.float() - ref.float()).norm() / ref.float().norm()).item()
        if not err < 2e-2:
            raise AssertionError(f"grouped experts differ from the per-expert loop: relative error {err:.3g}")
    except Exception as exc:  # noqa: BLE001
        print(f"torch._grouped_mm unavailable or wrong here ({type(exc).__name__}: {exc}); "
              "using the per-expert loop, eager", flush=True)
        experts, mode = layer.experts_loop, "eager"

    variants = {
        "no_reroute": None,
        "native_S1": lambda ids: native.reroute_fast(ids, sim, 1, RHO),
        "native_S2": lambda ids: native.reroute_fast(ids, sim, 2, RHO),
        "torch_ref_S2": lambda ids: reroute(ids, sim, 2, RHO, with_stats=False)[0],
    }
    rows = []
    print(f"\nQwen3-30B-A3B-shaped MoE layer decode step (E={layer.e}, k={layer.k}, hidden={layer.h}, "
          f"inter={layer.i}, bf16, rho={RHO}); experts: {experts.__name__} ({mode}); expert = "
          f"{layer.expert_bytes / 2**20:.1f} MiB")
    print(f"{'T':>4} | {'variant':>13} | {'distinct':>8} | {'step_us':>8} | {'x vs none':>9} | {'GB/s (experts)':>14}")
    for t in ts:
        x = x0[:t].contiguous()
        base = None
        for name, fn in variants.items():
            def step(fn=fn):
                w, ids = layer.route(x)
                if fn is not None:
                    ids = fn(ids)
                return experts(x, w, ids)

            _, ids = layer.route(x)
            if fn is not None:
                ids = fn(ids)
            distinct = int(torch.unique(ids).numel())
            if mode == "graph":
                try:
                    us = time_graph_us(step, inner=1, reps=50)
                except Exception as exc:  # noqa: BLE001  e.g. a grouped GEMM that syncs under capture
                    print(f"graph capture of the MoE step failed ({type(exc).__name__}: {exc}); timing eagerly",
                          flush=True)
                    mode = "eager"
            if mode == "eager":
                us = time_eager_us(step, reps=20)
            base = us if name == "no_reroute" else base
            row = {"T": t, "variant": name, "timing": mode, "distinct_experts": distinct, "step_us": us,
                   "speedup_vs_no_reroute": base / us,
                   "expert_weight_bytes": distinct * layer.expert_bytes,
                   "effective_GBps": distinct * layer.expert_bytes / (us * 1e-6) / 1e9}
            rows.append(row)
            print(f"{t:>4} | {name:>13} | {distinct:>8} | {us:>8.1f} | {row['speedup_vs_no_reroute']:>9.2f} | "
                  f"{row['effective_GBps']:>14.0f}", flush=True)
    return {"experts_impl": experts.__name__, "timing": mode, "expert_bytes": layer.expert_bytes, "rows": rows}


def _route_case_to(case: dict, device: str) -> dict:
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in case.items()}


def check_route_parity(cases: int = 300, seed: int = 13) -> dict:
    """The hook op on the GPU gives the torch spec's ids, weights and counters bit for bit (every rule; every
    other case is an error-aware one: scale, keep / drop / renorm)."""
    import random

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.cuda_emu import random_error_aware_case, random_route_case, route_reference, same_bits

    rng = random.Random(seed)
    bad, paths = [], {}
    for i in range(cases):
        case = random_error_aware_case(rng, max_t=2048) if i % 2 else random_route_case(rng, max_t=2048)
        want_ids, want_w, want_c = route_reference(case)
        g = _route_case_to(case, "cuda")
        counts = torch.zeros(5, dtype=torch.int64, device="cuda")
        path = native._route_path(g["ids"], g["weights"], g["sim"], g["valid"], g["expert_ranks"], counts, None,
                                  g.get("scale"), g["rule"], g.get("unmatched", "keep"))
        paths[path] = paths.get(path, 0) + 1
        ids, w = native.route_fast(g["ids"], g["weights"], g["sim"], g["s"], g["rho"], g["valid"], rule=g["rule"],
                                   expert_ranks=g["expert_ranks"], merge_duplicates=g["merge_duplicates"],
                                   counts=counts, scale=g.get("scale"), unmatched=g.get("unmatched", "keep"))
        ok = same_bits(ids.cpu(), want_ids) and same_bits(w.cpu(), want_w) and torch.equal(counts.cpu(), want_c)
        if not ok:
            bad.append({"case": i, "rule": case["rule"], "T": int(case["ids"].shape[0]), "E": int(case["sim"].shape[0]),
                        "k": int(case["ids"].shape[1]), "merge": case["merge_duplicates"], "path": path,
                        "unmatched": case.get("unmatched")})
    print(f"route parity on the GPU: {cases - len(bad)}/{cases} cases bit-identical to the torch spec; paths {paths}",
          flush=True)
    for b in bad[:10]:
        print(f"  MISMATCH {b}", flush=True)
    return {"cases": cases, "mismatches": bad, "paths": paths}


def check_route_graph(t: int = 64, e: int = 128, k: int = 8, replays: int = 5) -> dict:
    """The hook op inside a CUDA graph, counters and count gate included, replayed on fresh inputs."""
    from sere_dist.core.reroute import route

    g = torch.Generator().manual_seed(5)
    sim = torch.rand(e, e, generator=g)
    sim = torch.maximum(sim, sim.t()).fill_diagonal_(1.0).cuda()
    s_ids = torch.zeros(t, k, dtype=torch.int32, device="cuda")
    s_w = torch.zeros(t, k, dtype=torch.float32, device="cuda")
    s_valid = torch.ones(t, dtype=torch.bool, device="cuda")
    gate = torch.ones(1, dtype=torch.bool, device="cuda")
    counts = torch.zeros(5, dtype=torch.int64, device="cuda")

    def fresh():
        logits = torch.randn(t, e, generator=g) - torch.linspace(0, 3, e)
        w, ids = torch.softmax(logits, -1).topk(k, dim=-1)
        perm = torch.argsort(torch.rand(t, k, generator=g), dim=1)       # router slot order != weight order
        return ids.gather(1, perm).to(torch.int32), w.gather(1, perm)

    ids0, w0 = fresh()
    s_ids.copy_(ids0)
    s_w.copy_(w0)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        native.route_fast(s_ids, s_w, sim, S, RHO, s_valid, counts=counts, count_gate=gate)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    counts.zero_()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out_ids, out_w = native.route_fast(s_ids, s_w, sim, S, RHO, s_valid, counts=counts, count_gate=gate)
    ok, want_total = True, torch.zeros(5, dtype=torch.int64)
    for r in range(replays):
        ids, w = fresh()
        s_ids.copy_(ids)
        s_w.copy_(w)
        gate.fill_(r % 2 == 0)                                             # odd replays must not count
        graph.replay()
        torch.cuda.synchronize()
        want_ids, want_w, want_c = route(ids, w, sim.cpu(), S, RHO, torch.ones(t, dtype=torch.bool))
        ok &= torch.equal(out_ids.cpu(), want_ids) and torch.equal(out_w.cpu(), want_w)
        if r % 2 == 0:
            want_total += want_c
    ok &= torch.equal(counts.cpu(), want_total)
    print(f"route op in a CUDA graph ({replays} replays, gate alternating): {'OK' if ok else 'MISMATCH'}", flush=True)
    return {"ok": bool(ok), "T": t, "E": e, "k": k, "replays": replays}


def old_hook(ids, weights, sim, valid, counts):
    """The hook before issue 13 (sort, gather, re-route kernel, scatter, counting in torch ops)."""
    from sere_dist.core.reroute import used_experts

    order = torch.sort(weights, dim=-1, descending=True, stable=True).indices
    new_sorted = native.reroute_fast(ids.gather(1, order), sim, S, RHO, valid)
    new_ids = torch.empty_like(ids).scatter_(1, order, new_sorted)
    if counts is not None:
        e = sim.shape[0]
        use = valid.unsqueeze(-1).expand(ids.shape).unsqueeze(0)
        before = used_experts(ids.unsqueeze(0), e, use)
        after = used_experts(new_ids.unsqueeze(0), e, use)
        n_valid = valid.sum()
        counts += torch.stack([before.sum(), after.sum(), ((new_ids != ids) & valid.unsqueeze(-1)).sum(),
                               (n_valid > 0).long(), n_valid]).to(torch.int64)
    return new_ids, weights


def bench_route(ts=(1, 16, 64, 256), e: int = 128, k: int = 8) -> list[dict]:
    rows = []
    print(f"\nhook op (E={e}, k={k}, S={S}, rho={RHO}), us per call")
    print(f"{'T':>4} | {'mode':>5} | {'op+count':>8} {'op':>8} {'old+count':>9} {'old':>8}")
    for t in ts:
        g = torch.Generator().manual_seed(t)
        logits = torch.randn(t, e, generator=g) - torch.linspace(0, 4, e)
        w, ids = torch.softmax(logits, -1).topk(k, dim=-1)
        ids, w = ids.to(torch.int32).cuda(), w.cuda()
        sim = torch.rand(e, e, generator=g)
        sim = torch.maximum(sim, sim.t()).fill_diagonal_(1.0).cuda()
        valid = torch.ones(t, dtype=torch.bool, device="cuda")
        counts = torch.zeros(5, dtype=torch.int64, device="cuda")
        fns = {"op_counters": lambda: native.route_fast(ids, w, sim, S, RHO, valid, counts=counts),
               "op_no_counters": lambda: native.route_fast(ids, w, sim, S, RHO, valid),
               "old_counters": lambda: old_hook(ids, w, sim, valid, counts),
               "old_no_counters": lambda: old_hook(ids, w, sim, valid, None)}
        for mode, timer in (("eager", time_eager_us), ("graph", time_graph_us)):
            row = {"T": t, "E": e, "k": k, "mode": mode}
            for name, fn in fns.items():
                try:
                    row[f"{name}_us"] = timer(fn)
                except Exception as exc:  # noqa: BLE001  e.g. a host sync in the old counting under capture
                    row[f"{name}_us"] = None
                    row[f"{name}_error"] = f"{type(exc).__name__}: {exc}"[:200]
            rows.append(row)
            f = lambda v: f"{v:8.1f}" if v is not None else f"{'-':>8}"  # noqa: E731
            print(f"{t:>4} | {mode:>5} | {f(row['op_counters_us'])} {f(row['op_no_counters_us'])} "
                  f"{f(row['old_counters_us']):>9} {f(row['old_no_counters_us'])}", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a subset: T in {1, 256, 4096}, E = 128, k = 8")
    ap.add_argument("--parts", default="kernels,moe,route", help="comma list of kernels, moe, route")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "kernels_gpu.json")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_kernels_gpu: no CUDA device")
    if native.backend("cuda") != "cuda":
        raise SystemExit(f"bench_kernels_gpu: the CUDA kernel is not available: {native.extension_error()}")
    torch.backends.cuda.matmul.allow_tf32 = False
    props = torch.cuda.get_device_properties(0)
    print(f"GPU: {props.name} (sm_{props.major}{props.minor}, {props.multi_processor_count} SMs, "
          f"{props.total_memory / 2**30:.0f} GiB); torch {torch.__version__}, CUDA {torch.version.cuda}")
    t0 = time.perf_counter()
    parts = set(args.parts.split(","))
    ts, es, ks = ((1, 256, 4096), (128,), (8,)) if args.quick else (TS, ES, KS)
    kernel_rows = bench_kernels(ts, es, ks) if "kernels" in parts else []
    moe = bench_moe_step((1, 16, 64, 256) if args.quick else (1, 16, 32, 64, 128, 256)) if "moe" in parts else None
    route_res = None
    failed = []
    if "route" in parts:
        route_res = {"parity": check_route_parity(100 if args.quick else 300), "graph": check_route_graph(),
                     "timings": bench_route()}
        if route_res["parity"]["mismatches"]:
            failed.append("route parity")
        if not route_res["graph"]["ok"]:
            failed.append("route CUDA graph")
    graph_rows = [r for r in kernel_rows if r["mode"] == "graph"]
    summary = {"seconds": time.perf_counter() - t0, "failed": failed}
    if graph_rows:
        summary.update({
            "graph_geomean_speedup_vs_ref": statistics.geometric_mean(r["speedup_vs_ref"] for r in graph_rows),
            "graph_geomean_speedup_vs_per_slot_cuda": statistics.geometric_mean(
                r["speedup_vs_per_slot_cuda"] for r in graph_rows),
            "graph_min_speedup_vs_per_slot_cuda": min(r["speedup_vs_per_slot_cuda"] for r in graph_rows)})
    print(f"\nsummary: {json.dumps(summary)}")
    result = {
        "benchmark": "reroute kernels + MoE decode step, GPU",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "gpu": props.name, "capability": f"{props.major}.{props.minor}", "sms": props.multi_processor_count,
        "torch": torch.__version__, "cuda": torch.version.cuda, "select_top_k": S, "threshold": RHO,
        "graph_inner_calls": GRAPH_INNER, "library": native._state["library"], "summary": summary,
        "parts": sorted(parts), "kernels": kernel_rows, "moe_step": moe, "route": route_res,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")
    if failed:
        raise SystemExit(f"bench_kernels_gpu: FAILED: {', '.join(failed)}")


if __name__ == "__main__":
    main()
