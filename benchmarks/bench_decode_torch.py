"""End-to-end decode TPOT, plain vs SERE, of a 4-layer Qwen3-30B-A3B-shaped model in a plain torch decode
loop: CUDA graphs on a GPU (benchmarks/gpu_check.sh runs it), eager on the CPU (the tests' small shapes).

    python benchmarks/bench_decode_torch.py                      # CUDA: -> results/tpot_gpu_torch.json
    python benchmarks/bench_decode_torch.py --device cpu --tiny --out /tmp/d.json

Why not vLLM: the lent H200's image has torch 2.11.0 and no vLLM; vLLM 0.32 pins torch 2.13.0 and its wheel
alone is over 300 MiB, past what a device call carries (64 MiB). Where vLLM is installed, gpu_check.sh also
runs `bench_tpot.py --gpu` (vLLM engines, CUDA graphs), whose rows make_results.py prefers.

The model (random bf16 weights, generated on the device): embedding; per layer RMSNorm, GQA attention of
Qwen3-30B-A3B's shape (32 query heads, 4 KV heads, head dim 128, RMSNorm on q and k, RoPE) over a static
KV cache, then the MoE block: router matmul, softmax, top-k, renormalise (norm_topk_prob), [the SERE hook
op], 128 SwiGLU experts (intermediate 768) as two `torch._grouped_mm` calls over the slots sorted by
expert (bench_kernels_gpu.Qwen3MoELayer: a group with no tokens launches no tiles, so only the distinct
experts' weights are read); final norm, LM head, greedy argmax written back as the next step's input.
One decode step is one CUDA graph per (batch, arm); the step reads and writes only static buffers.

The SERE hook is the op the vLLM plugin calls (`core.native.route_fast` -> `sere_dist::route`: order the
slots by weight, paper rule, restore the order, counters in place behind a device-side gate), with the
cluster similarity and rho of bench_tpot.py (`--sim clusters`: seeded labels, 1.0 within a cluster, 0.1
across; rho 0.5). Arms per batch size: plain, S = 1, 2, and "no MoE" (the MoE blocks skipped), which gives
the MoE share of the step: 1 - TPOT(no MoE) / TPOT(plain). Each round times every arm once, in ABBA order
(A B C D, D C B A, ...), each timing `--tokens` replays of the step between two CUDA events after a
reset to the same prompt (a `--prompt`-token prefill through the plain step); the speed-up's 95% CI is
the t-interval of the per-round log ratios. Distinct experts per layer and step, before and after the
hook, come from an untimed pass of the same replays. The bound: the whole-step speed-up if MoE time fell
exactly with distinct experts at the measured MoE share (bench_tpot.bound_speedup).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from bench_kernels_gpu import Qwen3MoELayer  # noqa: E402
from bench_tpot import (RHO_CLUSTERS, abba_orders, bound_speedup, median_or_none, paired_speedup,  # noqa: E402
                        r3, round_pairs)

from sere_dist.core import native  # noqa: E402

WHY_NOT_VLLM = ("vLLM is not importable on this machine (the lent H200's image has torch 2.11.0 and no vLLM; "
                "vLLM 0.32 pins torch 2.13.0 and its wheel is over 300 MiB, past a device call's 64 MiB)")
QWEN3_30B_A3B = dict(experts=128, top_k=8, hidden=2048, intermediate=768, heads=32, kv_heads=4, head_dim=128,
                     vocab=151936)
TINY = dict(experts=16, top_k=4, hidden=64, intermediate=32, heads=4, kv_heads=2, head_dim=32, vocab=97)  # heads x head_dim != hidden, as in Qwen3-30B-A3B


@dataclass(frozen=True)
class Arm:
    name: str
    moe: bool = True
    s: int = 0          # 0: no re-routing


def rms(x: torch.Tensor, w: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * w


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE; x [..., d], cos/sin broadcastable to [..., d/2]."""
    h = x.shape[-1] // 2
    x1, x2 = x[..., :h].float(), x[..., h:].float()
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


def cluster_similarity(experts: int, layers: int, seed: int = 0) -> list[torch.Tensor]:
    """bench_tpot's `--sim clusters` on a random checkpoint: seeded labels, 1.0 within a cluster, 0.1 across."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(layers):
        lab = torch.randperm(experts, generator=g) % max(2, experts // 8)
        out.append(torch.where(lab[:, None] == lab[None, :], 1.0, 0.1))
    return out


class State:
    """The static buffers of one batch size: next input token, position, KV cache, hook inputs, id records."""

    def __init__(self, model: "DecodeModel", batch: int, keep_logits: bool = False):
        m, dev = model, model.device
        self.batch = batch
        self.tok = torch.zeros(batch, dtype=torch.long, device=dev)
        self.pos = torch.zeros(1, dtype=torch.long, device=dev)
        shape = (batch, m.kv_heads, m.max_len, m.head_dim)
        self.k = [torch.zeros(shape, dtype=m.dtype, device=dev) for _ in range(m.layers)]
        self.v = [torch.zeros(shape, dtype=m.dtype, device=dev) for _ in range(m.layers)]
        self.valid = torch.ones(batch, dtype=torch.bool, device=dev)       # every token is a decode token
        self.counts = [torch.zeros(5, dtype=torch.int64, device=dev) for _ in range(m.layers)]
        self.gate = torch.ones(1, dtype=torch.bool, device=dev)            # counters on (the plugin's default)
        self.before = [torch.zeros(batch, m.top_k, dtype=torch.int32, device=dev) for _ in range(m.layers)]
        self.after = [torch.zeros(batch, m.top_k, dtype=torch.int32, device=dev) for _ in range(m.layers)]
        self.logits = torch.zeros(batch, m.vocab, dtype=torch.float32, device=dev) if keep_logits else None
        self.tok0 = torch.zeros_like(self.tok)
        self.pos0 = 0

    def reset(self) -> None:
        self.tok.copy_(self.tok0)
        self.pos.fill_(self.pos0)


class DecodeModel:
    """A Qwen3-MoE-shaped decoder over static buffers (see the module docstring)."""

    def __init__(self, *, experts, top_k, hidden, intermediate, heads, kv_heads, head_dim, vocab, layers,
                 max_len, rho, device, dtype=torch.bfloat16, seed=0):
        if heads % kv_heads:
            raise ValueError(f"heads ({heads}) must be a multiple of kv_heads ({kv_heads})")
        self.experts, self.top_k, self.hidden, self.inter = experts, top_k, hidden, intermediate
        self.heads, self.kv_heads, self.head_dim, self.vocab = heads, kv_heads, head_dim, vocab
        self.layers, self.max_len, self.rho, self.device, self.dtype = layers, max_len, rho, device, dtype
        g = torch.Generator(device=device).manual_seed(seed)

        def rand(*shape):   # the checkpoints' init: N(0, 1 / fan_in)
            return (torch.randn(*shape, device=device, generator=g) * shape[0] ** -0.5).to(dtype)

        self.embed = torch.randn(vocab, hidden, device=device, generator=g).to(dtype)
        self.lm_head = rand(hidden, vocab)
        self.norm = torch.ones(hidden, device=device, dtype=dtype)
        qkv = (heads + 2 * kv_heads) * head_dim
        self.attn = [dict(ln1=torch.ones(hidden, device=device, dtype=dtype),
                          ln2=torch.ones(hidden, device=device, dtype=dtype),
                          wqkv=rand(hidden, qkv), wo=rand(heads * head_dim, hidden),
                          qn=torch.ones(head_dim, device=device, dtype=dtype),
                          kn=torch.ones(head_dim, device=device, dtype=dtype)) for _ in range(layers)]
        self.moe = []
        for i in range(layers):
            layer = Qwen3MoELayer(num_experts=experts, top_k=top_k, hidden=hidden, inter=intermediate, dtype=dtype,
                                  seed=seed + 1 + i, device=device)
            layer.router.mul_(4.0)     # tiny.build_model's router_scale: confident, diverse routing
            self.moe.append(layer)
        self.sim = [s.to(device) for s in cluster_similarity(experts, layers, seed)]
        inv = 1.0 / (1e6 ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
        ang = torch.arange(max_len, device=device, dtype=torch.float32)[:, None] * inv[None, :]
        self.cos, self.sin = ang.cos(), ang.sin()
        self.positions = torch.arange(max_len, device=device)
        self.expert_bytes = self.moe[0].expert_bytes
        self.grouped = True

    def experts_fn(self, layer: Qwen3MoELayer):
        return layer.experts_grouped if self.grouped else layer.experts_loop

    def attention(self, st: State, i: int, x: torch.Tensor) -> torch.Tensor:
        a, b = self.attn[i], x.shape[0]
        h, kv, d = self.heads, self.kv_heads, self.head_dim
        qkv = rms(x, a["ln1"]) @ a["wqkv"]
        q = qkv[:, :h * d].view(b, h, d)
        k = qkv[:, h * d:(h + kv) * d].view(b, kv, d)
        v = qkv[:, (h + kv) * d:].view(b, kv, d)
        cos, sin = self.cos[st.pos], self.sin[st.pos]          # [1, d/2]: every row is at the same position
        q, k = rope(rms(q, a["qn"]), cos, sin), rope(rms(k, a["kn"]), cos, sin)
        st.k[i].index_copy_(2, st.pos, k.unsqueeze(2))
        st.v[i].index_copy_(2, st.pos, v.unsqueeze(2))
        qg = q.view(b, kv, h // kv, d).float()                 # GQA: each KV head serves h / kv query heads
        scores = qg @ st.k[i].float().transpose(-1, -2) * d ** -0.5      # [b, kv, g, max_len]
        scores = scores.masked_fill(self.positions > st.pos, float("-inf"))
        out = (scores.softmax(-1) @ st.v[i].float()).to(x.dtype).reshape(b, h * d)
        return out @ a["wo"]

    def moe_block(self, st: State, i: int, x: torch.Tensor, arm: Arm) -> torch.Tensor:
        layer = self.moe[i]
        hx = rms(x, self.attn[i]["ln2"])
        w, ids = layer.route(hx)
        st.before[i].copy_(ids)
        if arm.s:
            ids, w = native.route_fast(ids, w, self.sim[i], arm.s, self.rho, st.valid, counts=st.counts[i],
                                       count_gate=st.gate)
        st.after[i].copy_(ids)
        return self.experts_fn(layer)(hx, w, ids)

    def step(self, st: State, arm: Arm) -> None:
        """One decode step on the static buffers: st.tok at st.pos -> next token in st.tok, st.pos + 1."""
        x = self.embed[st.tok]
        for i in range(self.layers):
            x = x + self.attention(st, i, x)
            if arm.moe:
                x = x + self.moe_block(st, i, x, arm)
        logits = rms(x, self.norm) @ self.lm_head
        if st.logits is not None:
            st.logits.copy_(logits.float())
        st.tok.copy_(logits.argmax(-1))
        st.pos.add_(1)

    def forward_full(self, tokens: torch.Tensor) -> torch.Tensor:
        """Reference without a cache: logits [B, T, V] of a causal forward over tokens [B, T] (plain MoE)."""
        b, t = tokens.shape
        h, kv, d = self.heads, self.kv_heads, self.head_dim
        x = self.embed[tokens]
        cos, sin = self.cos[:t, None, :], self.sin[:t, None, :]
        causal = torch.ones(t, t, dtype=torch.bool, device=tokens.device).tril()
        for i in range(self.layers):
            a = self.attn[i]
            qkv = rms(x, a["ln1"]) @ a["wqkv"]
            q = rope(rms(qkv[..., :h * d].view(b, t, h, d), a["qn"]), cos, sin)
            k = rope(rms(qkv[..., h * d:(h + kv) * d].view(b, t, kv, d), a["kn"]), cos, sin)
            v = qkv[..., (h + kv) * d:].view(b, t, kv, d)
            k, v = (z.repeat_interleave(h // kv, dim=2) for z in (k, v))
            s = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) * d ** -0.5
            s = s.masked_fill(~causal, float("-inf")).softmax(-1)
            x = x + torch.einsum("bhqk,bkhd->bqhd", s, v.float()).to(x.dtype).reshape(b, t, h * d) @ a["wo"]
            layer = self.moe[i]
            hx = rms(x, a["ln2"]).reshape(b * t, -1)
            w, ids = layer.route(hx)
            x = x + layer.experts_loop(hx, w, ids).view(b, t, -1)
        return (rms(x, self.norm) @ self.lm_head).float()

    def prefill(self, st: State, prompt: torch.Tensor) -> None:
        """Feed prompt [B, P] one token per step through the plain step (teacher forcing); the first
        generated token and position become the state's reset point."""
        st.pos.fill_(0)
        plain = Arm("plain")
        for j in range(prompt.shape[1]):
            st.tok.copy_(prompt[:, j])
            self.step(st, plain)
        st.tok0.copy_(st.tok)
        st.pos0 = prompt.shape[1]


def prompt_tokens(batch: int, length: int, vocab: int, device) -> torch.Tensor:
    """Short distinct prompts (bench_tpot's rule)."""
    i = torch.arange(batch, device=device)[:, None]
    j = torch.arange(length, device=device)[None, :]
    return (7 * i + 13 * j) % (vocab - 4) + 4


class Runner:
    """Replays one arm's step: a captured CUDA graph, or the eager step (CPU, or a failed capture)."""

    def __init__(self, model: DecodeModel, st: State, arm: Arm, graphs: bool):
        self.model, self.st, self.arm, self.graph = model, st, arm, None
        if graphs:
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                for _ in range(2):
                    model.step(st, arm)
            torch.cuda.current_stream().wait_stream(s)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                model.step(st, arm)
            st.reset()

    def __call__(self) -> None:
        if self.graph is not None:
            self.graph.replay()
        else:
            self.model.step(self.st, self.arm)

    def time_ms(self, steps: int) -> float:
        """Mean ms per decode step over `steps` steps from the reset point."""
        self.st.reset()
        if self.model.device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            for _ in range(steps):
                self()
            b.record()
            b.synchronize()
            return a.elapsed_time(b) / steps
        t = time.perf_counter()
        for _ in range(steps):
            self()
        return (time.perf_counter() - t) * 1e3 / steps

    def distinct(self, steps: int) -> tuple[float, float]:
        """Mean distinct experts per layer and step, before and after the hook (untimed)."""
        self.st.reset()
        before, after = [], []
        for _ in range(steps):
            self()
            before += [int(torch.unique(t).numel()) for t in self.st.before]
            after += [int(torch.unique(t).numel()) for t in self.st.after]
        return statistics.fmean(before), statistics.fmean(after)


def check_grouped(model: DecodeModel) -> str | None:
    """None when the grouped experts agree with the per-expert loop here, else why not."""
    layer = model.moe[0]
    x = torch.randn(16, model.hidden, device=model.device).to(model.dtype)
    try:
        w, ids = layer.route(x)
        ref, got = layer.experts_loop(x, w, ids).float(), layer.experts_grouped(x, w, ids).float()
        err = ((got - ref).norm() / ref.norm()).item()
    except Exception as exc:  # noqa: BLE001  an older torch, or a dtype the grouped GEMM lacks here
        return f"{type(exc).__name__}: {exc}"
    return None if err < 2e-2 else f"relative error {err:.3g} against the per-expert loop"


def measure(model: DecodeModel, args) -> tuple[list[dict], dict, dict]:
    """(samples, distinct experts per (batch, arm), timing mode per batch)."""
    cuda = model.device.type == "cuda"
    arms = [Arm("plain")] + [Arm(f"S={s}", s=s) for s in args.s_values] + [Arm("no_moe", moe=False)]
    samples, distinct, modes = [], {}, {}
    for b in args.batches:
        t0 = time.time()
        st = State(model, b)
        model.prefill(st, prompt_tokens(b, args.prompt, model.vocab, model.device))
        runners, mode = {}, "graph" if cuda else "eager"
        try:
            runners = {a.name: Runner(model, st, a, graphs=cuda) for a in arms}
        except Exception as exc:  # noqa: BLE001  e.g. an op that syncs under capture: time every arm eagerly
            print(f"  batch {b}: CUDA-graph capture failed ({type(exc).__name__}: {exc}); timing eagerly", flush=True)
            torch.cuda.synchronize()
            mode = "eager"
            runners = {a.name: Runner(model, st, a, graphs=False) for a in arms}
        modes[b] = mode
        for r in runners.values():      # warm-up
            r.time_ms(2)
        for rnd, order in enumerate(abba_orders([a.name for a in arms], args.repeats)):
            for name in order:
                samples.append({"batch": b, "arm": name, "rule": "paper", "round": rnd,
                                "tpot_ms": runners[name].time_ms(args.tokens)})
        for a in arms:
            if a.moe:
                distinct[(b, a.name)] = runners[a.name].distinct(args.tokens)
        med = {a.name: median_or_none([s["tpot_ms"] for s in samples if s["batch"] == b and s["arm"] == a.name])
               for a in arms}
        print(f"  batch {b:>3} ({mode}, {time.time() - t0:.1f} s): "
              + ", ".join(f"{k} {v:.3f} ms" for k, v in med.items()), flush=True)
        del runners, st
    return samples, distinct, modes


def summarize(samples: list[dict], distinct: dict, modes: dict, args, model: DecodeModel) -> list[dict]:
    rows = []
    for b in args.batches:
        def med(arm, b=b):
            return median_or_none([s["tpot_ms"] for s in samples if s["batch"] == b and s["arm"] == arm])
        plain, no_moe = med("plain"), med("no_moe")
        share = min(max(1.0 - no_moe / plain, 0.0), 1.0) if (plain and no_moe is not None) else None
        for s in args.s_values:
            arm = f"S={s}"
            sere = med(arm)
            before, after = distinct[(b, arm)]
            paired = paired_speedup(round_pairs(samples, b, arm, "paper"))
            bound = bound_speedup(share, before, after) if share is not None else None
            speed = plain / sere if (plain and sere) else None
            rows.append({"experts": model.experts, "hidden": model.hidden, "batch": b, "rule": "paper", "S": s,
                         "rho": model.rho, "plain_ms": r3(plain, 4), "sere_ms": r3(sere, 4), "speedup": r3(speed),
                         "moe_share": r3(share), "distinct_before": r3(before), "distinct_after": r3(after),
                         "bound_speedup": r3(bound),
                         "speedup_ci95": [r3(paired["lo"]), r3(paired["hi"])] if paired else None,
                         "speedup_paired": r3(paired["speedup"]) if paired else None,
                         "of_bound": r3((speed - 1) / (bound - 1)) if (speed and bound and bound > 1) else None,
                         "no_moe_ms": r3(no_moe, 4), "distinct_plain": r3(distinct[(b, "plain")][0]),
                         "timing": modes[b], "engine": "torch decode loop"})
    return rows


HEADLINE_KEYS = ("experts", "hidden", "batch", "rule", "S", "rho", "plain_ms", "sere_ms", "speedup", "moe_share",
                 "distinct_before", "distinct_after", "bound_speedup", "speedup_ci95", "engine")


def headline_rows(rows: list[dict]) -> list[dict]:
    """The `tpot_gpu` rows of headline.json (the issue's fields, the CI and which engine measured them)."""
    return [{k: r.get(k) for k in HEADLINE_KEYS} for r in rows]


def print_table(rows: list[dict]) -> None:
    print("\n| batch | S | TPOT plain ms | TPOT SERE ms | speed-up [95% CI] | MoE share | distinct before -> after "
          "| bound | of bound | timing |")
    print("|---:|---:|---:|---:|---|---:|---|---:|---:|---|")
    for r in rows:
        ci = r["speedup_ci95"]
        ci_s = f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""
        print(f"| {r['batch']} | {r['S']} | {r['plain_ms']:.3f} | {r['sere_ms']:.3f} | {r['speedup']:.3f}{ci_s} | "
              f"{r['moe_share']} | {r['distinct_before']:.1f} -> {r['distinct_after']:.1f} | {r['bound_speedup']} | "
              f"{r['of_bound']} | {r['timing']} |")


def positive_int(v: str) -> int:
    try:
        n = int(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {v!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


def int_list(v: str) -> list[int]:
    try:
        out = [int(x) for x in v.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {v!r}") from None
    if not out or min(out) < 1:
        raise argparse.ArgumentTypeError(f"expected integers >= 1, got {v!r}")
    return out


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--tiny", action="store_true", help="a small shape (E=16, k=4, hidden 64; for the CPU tests)")
    ap.add_argument("--layers", type=positive_int, default=4)
    ap.add_argument("--batch-sizes", dest="batches", type=int_list, default=[1, 16, 32, 64])
    ap.add_argument("--s-values", type=int_list, default=[1, 2])
    ap.add_argument("--rho", type=float, default=RHO_CLUSTERS)
    ap.add_argument("--repeats", type=positive_int, default=6, help="ABBA rounds")
    ap.add_argument("--tokens", type=positive_int, default=32, help="decode steps per timing")
    ap.add_argument("--prompt", type=positive_int, default=16, help="prompt tokens (prefilled one step at a time)")
    ap.add_argument("--vocab", type=positive_int, default=None, help="default: Qwen3's 151936 (97 with --tiny)")
    ap.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    ap.add_argument("--out", default=None, help="default: results/tpot_gpu_torch.json on CUDA")
    ap.add_argument("--no-plot", dest="plot", action="store_false")
    args = ap.parse_args(argv)
    shape = dict(TINY if args.tiny else QWEN3_30B_A3B)
    if args.vocab is not None:
        if args.vocab < 8:
            ap.error(f"--vocab: must be at least 8, got {args.vocab}")
        shape["vocab"] = args.vocab
    if max(args.s_values) > shape["top_k"]:
        ap.error(f"--s-values: S must be at most top_k = {shape['top_k']}, got {max(args.s_values)}")
    if not 0.0 <= args.rho <= 1.0:
        ap.error(f"--rho: must be in [0, 1], got {args.rho}")
    args.shape = shape
    return args


def build(args) -> DecodeModel:
    return DecodeModel(**args.shape, layers=args.layers, max_len=args.prompt + args.tokens + 4, rho=args.rho,
                       device=torch.device(args.device), dtype=getattr(torch, args.dtype))


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench_decode_torch: skipped, no CUDA device (use --device cpu for the small CPU run)", flush=True)
        return 0
    if args.out is None and args.device != "cuda":
        print("bench_decode_torch: a CPU run needs --out (results/ holds the GPU run)", file=sys.stderr)
        return 2
    cuda = args.device == "cuda"
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = False
    t_start = time.time()
    up_before = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    model = build(args)
    why = check_grouped(model)
    if why:
        print(f"torch._grouped_mm unavailable or wrong here ({why}); the per-expert loop runs, eagerly", flush=True)
        model.grouped = False
    dev_name = torch.cuda.get_device_name(0) if cuda else "cpu"
    sh = args.shape
    print(f"decode loop on {dev_name}: E={sh['experts']} k={sh['top_k']} hidden {sh['hidden']} inter "
          f"{sh['intermediate']} heads {sh['heads']}/{sh['kv_heads']}x{sh['head_dim']} vocab {sh['vocab']}, "
          f"{args.layers} layers, {args.dtype}; rho {args.rho}; {args.repeats} ABBA rounds x {args.tokens} steps; "
          f"native route op on {args.device}: {native.backend(args.device)}", flush=True)
    samples, distinct, modes = measure(model, args)
    rows = summarize(samples, distinct, modes, args, model)
    up_after = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    print_table(rows)
    res = {"benchmark": "tpot_gpu_torch" if cuda else "tpot_torch_cpu",
           "command": "python benchmarks/bench_decode_torch.py " + " ".join(sys.argv[1:] if argv is None else argv),
           "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
           "wall_s": round(time.time() - t_start, 1), "uptime_before": up_before, "uptime_after": up_after,
           "device": dev_name, "torch": torch.__version__,
           "model": {**sh, "layers": args.layers, "kind": "random", "dtype": args.dtype,
                     "expert_bytes": model.expert_bytes},
           "engine": {"kind": "torch decode loop", "cuda_graphs": cuda and all(m == "graph" for m in modes.values()),
                      "experts_impl": "torch._grouped_mm" if model.grouped else "per-expert loop",
                      "route_op": native.backend(args.device), "counters": "on, every step",
                      "why_not_vllm": WHY_NOT_VLLM},
           "rho": args.rho, "similarity": "clusters (seeded labels, 1.0 within, 0.1 across)", "tokens": args.tokens,
           "prompt": args.prompt, "repeats": args.repeats, "order": "ABBA rounds (A B C D, D C B A, ...)",
           "tpot": "CUDA events around --tokens graph replays (perf_counter on the CPU); median over rounds",
           "rows": rows, "samples": samples}
    if cuda:    # make_results.py copies "headline" into headline.json (a vLLM tpot_gpu.json comes first)
        res["headline"] = {"tpot_gpu": headline_rows(rows)}
    out = Path(args.out) if args.out else HERE / "results" / "tpot_gpu_torch.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1) + "\n")
    print(f"wrote {out}")
    if args.plot:
        from bench_tpot import plot
        plot(rows, out.with_suffix(".png"),
             f"torch decode loop, {dev_name}{', CUDA graphs' if res['engine']['cuda_graphs'] else ''}: "
             f"E={sh['experts']} k={sh['top_k']}, inter {sh['intermediate']}, {args.layers} layers\n"
             f"cluster similarity, rho={args.rho}; dashed: the bound at the measured MoE share")
    return 0


if __name__ == "__main__":
    sys.exit(main())
