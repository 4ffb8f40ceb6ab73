"""Cost of the vLLM plugin's per-layer routing hook on CPU: the previous torch hook vs the one native op.

    python benchmarks/bench_hook.py [--repeats 5] [--calls 400] [--out benchmarks/results/hook.json]

Shape: E = 128 experts, k = 8, S = 2, rho = 0.3, int32 ids and float32 weights as vLLM's CPU router
returns them (top-k of a softmax, already in weight order), float32 similarity, every token valid; T in
{1, 16, 64}. Arms, per T:
  old_counters:    the hook as landed before issue 13: torch.sort, gather, `reroute_fast` (C++ re-routing
                   kernel), scatter, then the ~25 small torch ops of counting
  old_no_counters: the same without the counting
  op_counters:     `core.native.route_fast` (one `sere_dist::route` call incl. its Python dispatch) with
                   the int64 counters updated in place
  op_no_counters:  the same with counters off (`count_every: 0`)
  op_ea_drop:      the error-aware rule in the same op (`scale` [E, E] float32, the similarity as the gain
                   matrix and rho as the gain threshold, `unmatched: drop`), with counters
Each measurement is the mean over `calls` back-to-back calls; arms run interleaved A B C D E E D C B A per
repeat (so drift from the other jobs on the machine hits every arm alike), and the table gives the
median over repeats. One torch thread, as vLLM-CPU's worker on a 2-core machine. `uptime` before and
after goes into the JSON.
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sere_dist.core import native  # noqa: E402
from sere_dist.core.reroute import route, used_experts  # noqa: E402

E, K, S, RHO = 128, 8, 2, 0.3
TOKENS = (1, 16, 64)
ARMS = ("old_counters", "old_no_counters", "op_counters", "op_no_counters", "op_ea_drop")


def old_hook(ids, weights, sim, valid, counts):
    """The hook before issue 13 (engine/plugin.py `_sere` + `_count` at commit 9184ba7), for comparison."""
    order = torch.sort(weights, dim=-1, descending=True, stable=True).indices
    sorted_ids = ids.gather(1, order)
    new_sorted = native.reroute_fast(sorted_ids, sim, S, RHO, valid)
    new_ids = torch.empty_like(ids).scatter_(1, order, new_sorted)
    if counts is not None:
        use = valid.unsqueeze(-1).expand(ids.shape).unsqueeze(0)
        before = used_experts(ids.unsqueeze(0), E, use)
        after = used_experts(new_ids.unsqueeze(0), E, use)
        n_valid = valid.sum()
        counts += torch.stack([before.sum(), after.sum(), ((new_ids != ids) & valid.unsqueeze(-1)).sum(),
                               (n_valid > 0).long(), n_valid]).to(torch.int64)
    return new_ids, weights


def new_hook(ids, weights, sim, valid, counts):
    return native.route_fast(ids, weights, sim, S, RHO, valid, counts=counts)


_SCALE = {}


def error_aware_hook(ids, weights, sim, valid, counts):
    """The error-aware arm: `sim` stands in for the gain matrix, a fixed random float32 scale."""
    scale = _SCALE.get(sim.shape[0])
    if scale is None:
        scale = _SCALE[sim.shape[0]] = torch.rand(sim.shape, generator=torch.Generator().manual_seed(1)) + 0.5
    return native.route_fast(ids, weights, sim, S, RHO, valid, counts=counts, scale=scale, unmatched="drop")


def batch(t: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(t, E, generator=g) - torch.linspace(0, 4, E)   # skewed: tokens share experts
    w, ids = torch.softmax(logits, -1).topk(K, dim=-1)
    sim = torch.rand(E, E, generator=g)
    sim = (sim + sim.t()) / 2
    sim.fill_diagonal_(1.0)
    return ids.to(torch.int32), w.contiguous(), sim, torch.ones(t, dtype=torch.bool)


def time_arm(arm: str, args, calls: int) -> float:
    fn = old_hook if arm.startswith("old") else error_aware_hook if arm.startswith("op_ea") else new_hook
    counts = None if "no_" in arm else torch.zeros(5, dtype=torch.int64)
    for _ in range(20):
        fn(*args, counts)
    t0 = time.perf_counter()
    for _ in range(calls):
        fn(*args, counts)
    return (time.perf_counter() - t0) / calls * 1e6


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--calls", type=int, default=400)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "hook.json"))
    a = ap.parse_args()
    torch.set_num_threads(1)
    if not native.load_extension():
        print(f"native extension unavailable: {native.extension_error()}", file=sys.stderr)
        return 1
    up_before = uptime()
    rows = []
    for t in TOKENS:
        args = batch(t, seed=t)
        # both hooks give the same ids and counters on this batch (the new op also returns the weights)
        c_old, c_new = torch.zeros(5, dtype=torch.int64), torch.zeros(5, dtype=torch.int64)
        ids_old, _ = old_hook(*args, c_old)
        ids_new, w_new = new_hook(*args, c_new)
        ref_ids, ref_w, ref_c = route(args[0], args[1], args[2], S, RHO, args[3])
        assert torch.equal(ids_old, ids_new) and torch.equal(ids_new, ref_ids) and torch.equal(w_new, ref_w)
        assert torch.equal(c_old, c_new) and torch.equal(c_new, ref_c)
        c_ea = torch.zeros(5, dtype=torch.int64)
        ea_ids, ea_w = error_aware_hook(*args, c_ea)
        want_ea = route(args[0], args[1], args[2], S, RHO, args[3], scale=_SCALE[E], unmatched="drop")
        assert torch.equal(ea_ids, want_ea[0]) and torch.equal(ea_w, want_ea[1]) and torch.equal(c_ea, want_ea[2])
        assert native._route_path(args[0], args[1], args[2], args[3], None, c_ea, None, _SCALE[E], "paper",
                                  "drop") == "cpp"
        samples: dict[str, list[float]] = {arm: [] for arm in ARMS}
        for _ in range(a.repeats):
            for arm in ARMS + ARMS[::-1]:
                samples[arm].append(time_arm(arm, args, a.calls))
        med = {arm: statistics.median(v) for arm, v in samples.items()}
        rows.append({"T": t, "E": E, "k": K, "S": S, "rho": RHO,
                     **{f"{arm}_us": round(med[arm], 2) for arm in ARMS},
                     "speedup_counters": round(med["old_counters"] / med["op_counters"], 2),
                     "speedup_no_counters": round(med["old_no_counters"] / med["op_no_counters"], 2),
                     "ea_drop_over_op_counters": round(med["op_ea_drop"] / med["op_counters"], 2),
                     "ea_distinct_after": int(want_ea[2][1]), "ea_changed_slots": int(want_ea[2][2]),
                     "samples_us": {arm: [round(x, 2) for x in v] for arm, v in samples.items()},
                     "distinct_before": int(ref_c[0]), "distinct_after": int(ref_c[1])})
    up_after = uptime()
    print(f"hook cost per MoE layer call, us (median of {2 * a.repeats} interleaved runs x {a.calls} calls, "
          f"1 thread; E={E} k={K} S={S} rho={RHO})")
    print(f"{'T':>4} {'old+count':>10} {'old':>8} {'op+count':>9} {'op':>8} {'x (count)':>10} {'x (none)':>9} "
          f"{'ea drop+count':>14}")
    for r in rows:
        print(f"{r['T']:>4} {r['old_counters_us']:>10.1f} {r['old_no_counters_us']:>8.1f} {r['op_counters_us']:>9.1f} "
              f"{r['op_no_counters_us']:>8.1f} {r['speedup_counters']:>10.1f} {r['speedup_no_counters']:>9.1f} "
              f"{r['op_ea_drop_us']:>14.1f}")
    print(f"uptime before: {up_before}\nuptime after:  {up_after}")
    out = {"benchmark": "hook", "date": dt.datetime.now().isoformat(timespec="seconds"),
           "machine": {"platform": platform.platform(), "processor": platform.processor(),
                       "torch": torch.__version__, "threads": 1},
           "uptime_before": up_before, "uptime_after": up_after,
           "repeats": a.repeats, "calls": a.calls, "order": "A B C D E E D C B A per repeat", "rows": rows}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
