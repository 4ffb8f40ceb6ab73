"""The plugin's eager hook with the caches cold, as in a decode step: `route_fast` vs the bound `RoutePlan`.

    python benchmarks/bench_eager_hook.py [--repeats 20] [--calls 50] [--out benchmarks/results/eager_hook_cpu.json]

In an eager vLLM-CPU engine (the benchmarks' engines; `sere_control` needs one) the hook runs between
experts kernels that stream tens of MB of weights, so the Python around the op runs from cold caches:
a warm loop (`bench_hook.py`) sees about 12 µs per call where the engine's timers see 60-70. This
benchmark streams a 48 MB buffer before every timed call and times, per call, the layer's hook as
`engine.plugin._sere` runs it (on a torch module set up with the attributes `_configure` gives a MoE
runner), in two arms interleaved ABBA per repeat:
  route_fast: the path of every call before `RoutePlan` (per-call input checks, a [:T] slice of the mask)
  plan:       the layer's `core.native.RoutePlan`, bound on the first call
Both arms must return the same ids, weights and counters (checked per case). Also timed, alone: the
token-mask fill that runs once per forward (`_fill_token_mask`, a pure-decode batch). Batches and shape
as bench_hook.py (E = 128, k = 8, S = 2, rho = 0.3, T in {1, 16, 64}; its skewed router and symmetric
similarity), with bf16 weights and int32 ids as vLLM-CPU's router gives them; rules paper
and error_aware (unmatched drop). Two torch threads, as the benchmarks' worker. Medians of per-repeat
medians; the ratio column is the median of the per-repeat route_fast / plan ratios.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import statistics
import sys
import time
import types
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_hook import RHO, TOKENS, S  # noqa: E402
from bench_hook import batch as router_batch  # noqa: E402
from bench_tpot import cpu_info, uptime  # noqa: E402

from sere_dist.core import native  # noqa: E402

FLUSH_MB = 48


def layer(rule: str, sim: torch.Tensor, mask: torch.Tensor) -> torch.nn.Module:
    """A module with the attributes and buffers `engine.plugin._configure` gives a MoE runner."""
    r = torch.nn.Module()
    r._sere_s, r._sere_rho, r._sere_rule, r._sere_merge = S, RHO, "paper", True
    r._sere_unmatched = "drop" if rule == "error_aware" else "keep"
    r._sere_keep_sum, r._sere_count_on, r._sere_count_gate, r._sere_expert_ranks = False, True, None, None
    r.register_buffer("_sere_sim", sim * sim if rule == "error_aware" else sim)   # the gain matrix, in [0, 1]
    r._sere_scale = sim.clone() if rule == "error_aware" else None
    r.register_buffer("_sere_counts", torch.zeros(5, dtype=torch.int64))
    r.register_buffer("_sere_token_mask", mask)
    return r


def cold_median(fn, flush: torch.Tensor, calls: int) -> float:
    ts = []
    for _ in range(calls):
        flush.add_(1.0)                      # evict the caches, as an experts kernel does
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e6


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--calls", type=int, default=50)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "eager_hook_cpu.json"))
    a = ap.parse_args()
    for name in ("repeats", "calls"):
        if getattr(a, name) < 1:
            ap.error(f"--{name} must be >= 1")
    torch.set_num_threads(2)
    if not native.load_extension():
        print(f"native extension unavailable: {native.extension_error()}", file=sys.stderr)
        return 1
    from sere_dist.engine import plugin

    vcfg = types.SimpleNamespace(scheduler_config=types.SimpleNamespace(max_num_batched_tokens=8192),
                                 device_config=types.SimpleNamespace(device="cpu"))
    mask = plugin._token_mask(vcfg, "decode")
    mask.fill_(True)
    flush = torch.ones(FLUSH_MB * 1024 * 1024 // 4)
    up_before = uptime()
    rows = []
    for rule in ("paper", "error_aware"):
        for t in TOKENS:
            ids, w, sim, _ = router_batch(t, seed=t)         # bench_hook's batch, bf16 weights as vLLM-CPU's
            w = w.to(torch.bfloat16)
            r = layer(rule, sim, mask)
            want = plugin._sere(r, w, ids)                   # the first call binds the plan
            plan = r.__dict__.get("_sere_plan")
            if plan is None:
                print(f"{rule} T={t}: no plan bound (the op does not take these inputs)", file=sys.stderr)
                return 1
            counts = {}
            arms = {"route_fast": None, "plan": plan}
            samples: dict[str, list[float]] = {arm: [] for arm in arms}
            for rep in range(a.repeats):
                for arm in (("route_fast", "plan") if rep % 2 == 0 else ("plan", "route_fast")):
                    r._sere_plan = arms[arm]
                    r._sere_counts.zero_()
                    samples[arm].append(cold_median(lambda: plugin._sere(r, w, ids), flush, a.calls))
                    got = plugin._sere(r, w, ids)
                    if not (torch.equal(got[0], want[0]) and torch.equal(got[1].view(torch.int16),
                                                                         want[1].view(torch.int16))):
                        print(f"{rule} T={t} {arm}: a different answer", file=sys.stderr)
                        return 1
                    counts[arm] = r._sere_counts.tolist()
            if counts["route_fast"] != counts["plan"]:
                print(f"{rule} T={t}: counters differ {counts}", file=sys.stderr)
                return 1
            ratios = [x / y for x, y in zip(samples["route_fast"], samples["plan"])]
            rows.append({"rule": rule, "T": t, "E": sim.shape[0], "k": ids.shape[1], "S": S, "rho": RHO,
                         "route_fast_us": round(statistics.median(samples["route_fast"]), 1),
                         "plan_us": round(statistics.median(samples["plan"]), 1),
                         "ratio": round(statistics.median(ratios), 2),
                         "samples_us": {k: [round(x, 1) for x in v] for k, v in samples.items()}})
    # the token-mask fill, once per forward, on a pure-decode batch of B requests; from the state the
    # plugin keeps (only its fill writes the mask: all False past the rows the last fill set)
    mask.fill_(False)
    plugin._state["mask_used"] = 0
    fills = []
    for b in TOKENS:
        batch = types.SimpleNamespace(num_reqs=b, num_computed_tokens_cpu=np.full(64, 20, dtype=np.int32),
                                      num_prompt_tokens=np.full(64, 8, dtype=np.int32))
        runner = types.SimpleNamespace(input_batch=batch,
                                       query_start_loc=types.SimpleNamespace(np=np.arange(65, dtype=np.int32)))
        med = [cold_median(lambda: plugin._fill_token_mask(runner, None, None), flush, a.calls)
               for _ in range(a.repeats)]
        if not (bool(mask[:b].all()) and not bool(mask[b:].any())):
            print(f"token mask wrong after a decode batch of {b}", file=sys.stderr)
            return 1
        fills.append({"batch": b, "fill_us": round(statistics.median(med), 1)})
    up_after = uptime()
    print(f"eager hook per MoE layer call with cold caches, us (median of {a.repeats} ABBA repeats x {a.calls} "
          f"calls, 2 threads; E={rows[0]['E']} k={rows[0]['k']} S={S} rho={RHO})")
    print(f"{'rule':>12} {'T':>4} {'route_fast':>11} {'plan':>8} {'ratio':>6}")
    for r in rows:
        print(f"{r['rule']:>12} {r['T']:>4} {r['route_fast_us']:>11.1f} {r['plan_us']:>8.1f} {r['ratio']:>6.2f}")
    print("token-mask fill per forward, us: " + ", ".join(f"B={f['batch']} {f['fill_us']:.1f}" for f in fills))
    print(f"uptime before: {up_before}\nuptime after:  {up_after}")
    out = {"benchmark": "eager_hook_cpu", "command": "python benchmarks/bench_eager_hook.py " + " ".join(sys.argv[1:]),
           "date": dt.datetime.now().isoformat(timespec="seconds"), "cpu": cpu_info(),
           "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": 2},
           "uptime_before": up_before, "uptime_after": up_after, "flush_mb": FLUSH_MB, "repeats": a.repeats,
           "calls": a.calls, "order": "ABBA (route_fast, plan) per repeat", "rows": rows, "mask_fill": fills}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
