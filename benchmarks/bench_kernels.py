"""Re-routing kernel times on CPU: torch reference vs the paper's per-slot scan vs the native C++ kernel.

    python benchmarks/bench_kernels.py [--threads 1] [--quick] [--out benchmarks/results/kernels_cpu.json]

For every T in {1, 8, 64, 256, 1024, 4096}, E in {60, 64, 128, 256}, k in {4, 6, 8} (S = 2, rho = 0.3,
int32 ids as vLLM's router returns them, float32 similarity, every token valid) it times
  torch_ref: `sere_dist.core.reroute.reroute(..., with_stats=False)`  (per-batch table, O(E^2 + T*k))
  scan:      `sere_dist.core.reroute.per_slot_scan`                   (paper's kernel shape, O(T*(k-S)*E))
  native:    `sere_dist.core.native.reroute_fast`, C++ kernel incl. the Python dispatch
  native_op: `torch.ops.sere_dist.reroute` called directly
as the median of repeated wall-clock calls, checks that all three give the same ids, prints a table
and writes JSON. Routing ids are skewed toward low expert ids, so a batch shares experts as real ones do.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sere_dist.core import native  # noqa: E402
from sere_dist.core.reroute import per_slot_scan, reroute  # noqa: E402

TS = (1, 8, 64, 256, 1024, 4096)
ES = (60, 64, 128, 256)
KS = (4, 6, 8)
S, RHO = 2, 0.3


def make_case(t: int, e: int, k: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    sim = torch.rand(e, e, generator=g)
    sim = torch.maximum(sim, sim.t()).fill_diagonal_(1.0)
    logits = torch.randn(t, e, generator=g) - torch.linspace(0, 3, e)
    ids = logits.topk(k, dim=1).indices.to(torch.int32)
    return ids, sim


def median_us(fn, budget_s: float, min_reps: int = 5, max_reps: int = 2000) -> float:
    fn()  # warm-up
    times = []
    deadline = time.perf_counter() + budget_s
    while len(times) < max_reps and (len(times) < min_reps or time.perf_counter() < deadline):
        t0 = time.perf_counter_ns()
        fn()
        times.append(time.perf_counter_ns() - t0)
    return statistics.median(times) / 1e3


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads (default 1: the cores here are shared; OpenMP teams under "
                         "contention make small ops 10x slower)")
    ap.add_argument("--budget", type=float, default=0.04, help="seconds of repeats per measurement")
    ap.add_argument("--quick", action="store_true", help="T in {1, 256}, E in {128}: a smoke run")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "kernels_cpu.json")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    if native.backend("cpu") != "cpp":
        raise SystemExit(f"native CPU kernel unavailable: {native.extension_error()}")
    op = torch.ops.sere_dist.reroute
    ts, es = ((1, 256), (128,)) if args.quick else (TS, ES)

    rows = []
    header = (f"{'T':>5} {'E':>4} {'k':>2} | {'torch_ref':>10} {'scan':>10} {'native':>9} {'native_op':>9} |"
              f" {'x ref':>6} {'x scan':>6}")
    print(f"CPU: {cpu_name()}; torch {torch.__version__}; threads {args.threads}; S={S} rho={RHO}; "
          f"times are medians in microseconds; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print(header)
    print("-" * len(header))
    t_start = time.perf_counter()
    load_start = os.getloadavg()
    for t in ts:
        for e in es:
            for k in KS:
                ids, sim = make_case(t, e, k, seed=hash((t, e, k)) % 2**31)
                want = reroute(ids, sim, S, RHO, with_stats=False)[0]
                assert torch.equal(per_slot_scan(ids, sim, S, RHO), want)
                assert torch.equal(native.reroute_fast(ids, sim, S, RHO), want)
                budget = args.budget if t <= 1024 else args.budget * 2
                row = {
                    "T": t, "E": e, "k": k,
                    "torch_ref_us": median_us(lambda: reroute(ids, sim, S, RHO, with_stats=False), budget),
                    "scan_us": median_us(lambda: per_slot_scan(ids, sim, S, RHO), budget),
                    "native_us": median_us(lambda: native.reroute_fast(ids, sim, S, RHO), budget),
                    "native_op_us": median_us(lambda: op(ids, sim, S, RHO, None), budget),
                    "distinct_before": int(torch.unique(ids).numel()),
                    "distinct_after": int(torch.unique(want).numel()),
                }
                row["speedup_vs_ref"] = row["torch_ref_us"] / row["native_us"]
                row["speedup_vs_scan"] = row["scan_us"] / row["native_us"]
                rows.append(row)
                print(f"{t:>5} {e:>4} {k:>2} | {row['torch_ref_us']:>10.1f} {row['scan_us']:>10.1f} "
                      f"{row['native_us']:>9.1f} {row['native_op_us']:>9.1f} | {row['speedup_vs_ref']:>6.1f} "
                      f"{row['speedup_vs_scan']:>6.1f}")
    elapsed = time.perf_counter() - t_start
    geo = lambda xs: statistics.geometric_mean(xs)  # noqa: E731
    summary = {"geomean_speedup_vs_ref": geo([r["speedup_vs_ref"] for r in rows]),
               "geomean_speedup_vs_scan": geo([r["speedup_vs_scan"] for r in rows]),
               "min_speedup_vs_ref": min(r["speedup_vs_ref"] for r in rows),
               "min_speedup_vs_scan": min(r["speedup_vs_scan"] for r in rows)}
    print(f"geomean speed-up: {summary['geomean_speedup_vs_ref']:.1f}x vs torch reference, "
          f"{summary['geomean_speedup_vs_scan']:.1f}x vs per-slot scan; minimum "
          f"{summary['min_speedup_vs_ref']:.1f}x / {summary['min_speedup_vs_scan']:.1f}x ({elapsed:.0f} s)")
    result = {
        "benchmark": "reroute kernels, CPU",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu_name(), "torch": torch.__version__, "threads": args.threads, "python": platform.python_version(),
        "select_top_k": S, "threshold": RHO, "ids_dtype": "int32", "sim_dtype": "float32",
        "loadavg_1_5_15_start": load_start, "loadavg_1_5_15_end": os.getloadavg(), "cores": os.cpu_count(),
        "timing": f"median of repeated wall-clock calls, {args.budget} s budget per measurement (2x for T > 1024)",
        "library": native._state["library"], "summary": summary, "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
