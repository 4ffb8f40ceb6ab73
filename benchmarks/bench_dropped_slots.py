"""What a slot the error-aware rule drops costs in vLLM-CPU's MoE kernel, against a kernel that skipped it.

    python benchmarks/bench_dropped_slots.py [--hidden 1024 2048] [--batch 1 16 64] [--drops 2 4] [--repeats 7]

A dropped slot leaves the op with weight 0 and the id of the token's top expert (a primary), so no
expert is read for it; whether it still costs compute depends on the MoE backend. This calls vLLM-CPU
0.32's experts kernel (`torch.ops._C.cpu_fused_moe`, isa "vec", bf16 weights prepacked as vLLM does)
directly on the E = 128, k = 8, intermediate 768 shape, one thread, with a synthetic decode batch in
which every token keeps its 2 primaries (S = 2) and has exactly `d` of its 6 secondary slots dropped:

  dropped_w0:  k = 8 slots; the d dropped ones carry the token's top expert with weight 0 (what the op emits)
  moved:       k = 8 slots; the d slots moved onto other primaries with their weight (the paper's rule
               at the same distinct experts)
  skipped:     k = 8 - d slots: the dropped ones removed (what a kernel that skips weight-0 slots does)
  skip_zero:   dropped_w0's batch through `sere.skip_zero_slots` (sere_dist.engine.plugin.skip_zero_slots_moe:
               the kept (token, slot) pairs as one-slot tokens through the same kernel, summed per token)

All arms read the same experts (the batch's primaries). Each measurement is the median of
`--calls` back-to-back calls; arms run interleaved A B C C B A per repeat and the table gives the median
over repeats. Writes benchmarks/results/dropped_slots.json (with `uptime` before and after).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from vllm_cpu_moe import abba_medians, kernel_ops, prepacked_experts  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
ARMS = ("dropped_w0", "moved", "skipped", "skip_zero")


def _uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "?"


def batch_routing(t: int, e: int, k: int, s: int, d: int, gen: torch.Generator):
    """(ids [t, k], weights [t, k]) per arm: every token holds 2 primaries, d dropped and k - s - d moved
    secondary slots; the primaries of the batch are the union of the tokens' top-S."""
    ids = torch.empty(t, k, dtype=torch.int32)
    w = torch.rand(t, k, generator=gen).sort(-1, descending=True).values
    w = w / w.sum(-1, keepdim=True)
    for i in range(t):
        ids[i, :s] = torch.randperm(e, generator=gen)[:s]                      # each token's top-S
    pool = torch.unique(ids[:, :s])                                             # the batch's primaries
    for i in range(t):
        ids[i, s:] = pool[torch.randint(0, len(pool), (k - s,), generator=gen)]  # moved: onto primaries
    dropped = torch.zeros(t, k, dtype=torch.bool)
    dropped[:, k - d:] = True                                                   # the lowest-weight d slots
    out = {}
    ids_w0 = torch.where(dropped, ids[:, :1].expand(t, k), ids)
    out["dropped_w0"] = (ids_w0.contiguous(), torch.where(dropped, torch.zeros_like(w), w).contiguous())
    out["moved"] = (ids.contiguous(), w.contiguous())
    out["skipped"] = (ids[:, :k - d].contiguous(), w[:, :k - d].contiguous())
    out["skip_zero"] = out["dropped_w0"]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hidden", type=int, nargs="+", default=[1024, 2048])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--drops", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--experts", type=int, default=128)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--intermediate", type=int, default=768)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--calls", type=int, default=9)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=RESULTS / "dropped_slots.json")
    args = ap.parse_args()
    for name in ("hidden", "batch", "drops"):
        if any(v < 1 for v in getattr(args, name)):
            ap.error(f"--{name} values must be >= 1")
    if any(d > args.top_k - 2 for d in args.drops):
        ap.error(f"--drops must be <= top-k - 2 = {args.top_k - 2} (S = 2 primaries per token)")
    try:
        cpu_fused_moe, cpu_prepack_moe_weight = kernel_ops()

        from sere_dist.engine.plugin import skip_zero_slots_moe
    except Exception as exc:  # noqa: BLE001
        print(f"vLLM's CPU kernels are not importable here: {exc}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    up_before = _uptime()
    gen = torch.Generator().manual_seed(0)
    e, k, inter = args.experts, args.top_k, args.intermediate
    rows = []
    t_start = time.time()
    for h in args.hidden:
        w13, w2 = prepacked_experts(cpu_prepack_moe_weight, e, inter, h)
        for t in args.batch:
            x = (torch.randn(t, h) * 0.5).to(torch.bfloat16)
            out = torch.empty_like(x)
            for d in args.drops:
                arms = batch_routing(t, e, k, 2, d, gen)

                def call(arm):
                    ids, w = arms[arm]
                    times = []
                    for _ in range(args.calls):
                        t0 = time.perf_counter()
                        if arm == "skip_zero":
                            skip_zero_slots_moe(cpu_fused_moe, out, x, w13, w2, None, None, w, ids, "silu", "vec",
                                                False)
                        else:
                            cpu_fused_moe(out, x, w13, w2, None, None, w, ids, "silu", "vec")
                        times.append(time.perf_counter() - t0)
                    return statistics.median(times) * 1e6

                med = abba_medians(call, ARMS, args.repeats)
                distinct = len(torch.unique(arms["moved"][0]))
                row = {"hidden": h, "batch": t, "dropped_per_token": d, "distinct_experts": distinct,
                       **{f"{a}_us": round(med[a], 1) for a in ARMS},
                       "dropped_over_skipped": round(med["dropped_w0"] / med["skipped"], 3),
                       "dropped_over_moved": round(med["dropped_w0"] / med["moved"], 3),
                       "skip_zero_over_dropped": round(med["skip_zero"] / med["dropped_w0"], 3),
                       "skip_zero_over_skipped": round(med["skip_zero"] / med["skipped"], 3)}
                rows.append(row)
                print(f"H={h:5d} T={t:3d} d={d}: experts {distinct:3d}  dropped(w=0) {med['dropped_w0']:8.0f} us  "
                      f"moved {med['moved']:8.0f} us  skipped {med['skipped']:8.0f} us  "
                      f"dropped/skipped {row['dropped_over_skipped']:.3f}  skip_zero {med['skip_zero']:8.0f} us "
                      f"(/dropped {row['skip_zero_over_dropped']:.3f}, /skipped {row['skip_zero_over_skipped']:.3f})",
                      flush=True)
    up_after = _uptime()
    doc = {"benchmark": "dropped_slots", "command": "python " + " ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:]),
           "kernel": "torch.ops._C.cpu_fused_moe (vLLM-CPU 0.32, isa vec)", "experts": e, "top_k": k,
           "intermediate": inter, "threads": args.threads, "repeats": args.repeats, "calls": args.calls,
           "rows": rows, "wall_s": round(time.time() - t_start, 1), "uptime_before": up_before,
           "uptime_after": up_after, "machine": platform.processor() or platform.machine(),
           "time": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
