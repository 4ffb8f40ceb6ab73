"""Fidelity vs active experts: SERE over a grid of (S, rho) against six training-free baselines.

For each model (the trained tiny Qwen3-MoE, and the planted one) and decode batch size B, every
method's knob is swept; each point reports the mean number of distinct experts a decode batch runs
per MoE layer and the fidelity against the unmodified model on held-out text (top-1 next-token
agreement, KL(ref || method) in nats per token, perplexity). Methods are compared at equal
distinct-expert count: each method's Pareto front is interpolated at common expert counts.

    python benchmarks/bench_fidelity.py                      # full grid, ~20 min on 2 busy cores
    python benchmarks/bench_fidelity.py --quick              # smaller grid for a smoke run

Writes benchmarks/results/fidelity.json and fidelity_<model>.png.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from sere_dist.eval import baselines as bl
from sere_dist.calibration.capture import load_model, moe_blocks, tokenize_texts
from sere_dist.calibration.pipeline import calibrate
from sere_dist.core.config import SereConfig
from sere_dist.calibration.corpus import split_corpus, stdlib_documents
from sere_dist.eval.fidelity import RoutingPatch, evaluate, identity_transform, record_transform, sere_transform
from sere_dist.models.tiny import DATA_DIR, TinySpec, build_model

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = ("sere", "top_s", "naee", "static_prune", "random", "oea", "xshare")
LABELS = {"sere": "SERE (S, rho)", "top_s": "naive top-S", "naee": "NAEE skip (beta)",
          "static_prune": "static pruning (#pruned)", "random": "random re-route (S)",
          "oea": "OEA piggyback (S)", "xshare": "XShare budget"}


def grid(top_k: int, num_experts: int, quick: bool) -> list[tuple[str, str, object]]:
    """(method, knob description, knob value) points."""
    s_vals = list(range(1, top_k))
    rhos = [0.0, 0.3, 0.6] if quick else [0.0, 0.2, 0.4, 0.6, 0.8]
    pts: list[tuple[str, str, object]] = [("sere", f"S={s} rho={r}", (s, r)) for s in s_vals for r in rhos]
    pts += [("top_s", f"S={s}", s) for s in s_vals]
    pts += [("naee", f"beta={b}", b) for b in ([0.3, 0.6] if quick else [0.1, 0.2, 0.3, 0.5, 0.7])]
    pts += [("static_prune", f"pruned={n}", n) for n in ([4, 8] if quick else range(2, num_experts - 1, 2))]
    pts += [("random", f"S={s}", s) for s in s_vals]
    pts += [("oea", f"S={s}", s) for s in s_vals]
    pts += [("xshare", f"budget={b}", b) for b in ([4, 8] if quick else range(2, num_experts, 2))]
    return pts


def transform_for(method: str, knob, sims, keep_sets, num_experts: int, normalize: bool):
    if method == "sere":
        s, rho = knob
        return sere_transform(sims, SereConfig(select_top_k=s, threshold=rho))
    if method == "top_s":
        return bl.naive_top_s_transform(num_experts, knob)
    if method == "naee":
        return bl.naee_transform(num_experts, knob)
    if method == "static_prune":
        return bl.static_prune_transform(num_experts, keep_sets[knob], normalize)
    if method == "random":
        return bl.random_reroute_transform(num_experts, knob, seed=0)
    if method == "oea":
        return bl.oea_transform(num_experts, knob, normalize)
    if method == "xshare":
        return bl.xshare_transform(num_experts, knob, normalize)
    raise ValueError(method)


def heldout_tokens(tok, docs: list[str], num: int, seq_len: int) -> torch.Tensor:
    """[num, seq_len] ids: the held-out documents tokenised back to back (EOS between them), cut into
    seq_len chunks, `num` of them taken evenly across the whole held-out set."""
    ids: list[int] = []
    for d in docs:
        ids += tok(d, add_special_tokens=False).input_ids + [tok.eos_token_id]
    n_chunks = len(ids) // seq_len
    if n_chunks < num:
        raise ValueError(f"held-out text has {n_chunks} chunks of {seq_len} tokens; need {num}")
    chunks = torch.tensor(ids[: n_chunks * seq_len]).reshape(n_chunks, seq_len)
    return chunks[torch.linspace(0, n_chunks - 1, num).long()]


def usage_per_layer(model, tokens: torch.Tensor, num_experts: int) -> dict[int, torch.Tensor]:
    """Expert usage counts per MoE layer on calibration tokens (for static pruning)."""
    store: dict[int, list] = {}
    with torch.no_grad(), RoutingPatch(model, record_transform(num_experts, store)):
        for s in range(0, tokens.shape[0], 16):
            model(tokens[s:s + 16])
    return {layer: sum(bl.usage_counts(ids, num_experts, valid) for ids, _, valid in calls)
            for layer, calls in store.items()}


def pareto(points: list[dict]) -> list[dict]:
    """Points not dominated in (fewer experts, higher top-1 agreement), sorted by experts."""
    pts = sorted(points, key=lambda p: (p["experts"], -p["top1_agreement"]))
    front, best = [], -1.0
    for p in pts:
        if p["top1_agreement"] > best:
            front.append(p)
            best = p["top1_agreement"]
    return front


def at_count(front: list[dict], target: float, key: str) -> float | None:
    """Linear interpolation of `key` along a Pareto front at `target` experts (None outside its range)."""
    xs = [p["experts"] for p in front]
    if not xs or target < xs[0] - 1e-9 or target > xs[-1] + 1e-9:
        return None
    return float(np.interp(target, xs, [p[key] for p in front]))


def run_model(name: str, model, tok, args) -> dict:
    blocks = moe_blocks(model)
    first = next(iter(blocks.values()))
    num_experts = first.experts.gate_up_proj.shape[0]
    top_k = first.gate.top_k
    normalize = bool(getattr(model.config, "norm_topk_prob", True))
    train_docs, held_docs = split_corpus(stdlib_documents())
    cal = tokenize_texts(tok, train_docs, args.seq_len, args.cal_samples)
    t0 = time.time()
    art = calibrate(model, cal, metric="frobenius", batch_size=8)
    cal_s = time.time() - t0
    usage = usage_per_layer(model, cal, num_experts)
    points = grid(top_k, num_experts, args.quick)
    keep_sets = {k: {layer: bl.prune_least_used(c, k) for layer, c in usage.items()}
                 for m, _, k in points if m == "static_prune"}
    ev = heldout_tokens(tok, held_docs, args.eval_samples, args.seq_len)
    rows = []
    for b in args.batch_sizes:
        ref = evaluate(model, ev, identity_transform(num_experts), batch_size=b)
        rows.append({"method": "unmodified", "knob": "-", "batch_size": b, **_slim(ref)})
        for method, desc, knob in points:
            t = time.time()
            r = evaluate(model, ev, transform_for(method, knob, art.matrices, keep_sets, num_experts, normalize),
                         batch_size=b)
            rows.append({"method": method, "knob": desc, "batch_size": b, **_slim(r), "eval_s": time.time() - t})
        print(f"  {name}: B={b} done ({len(points)} points)", flush=True)
    return {"model": name, "num_experts": num_experts, "top_k": top_k, "norm_topk_prob": normalize,
            "moe_layers": len(blocks), "calibration": {"metric": "frobenius", "tokens": int(cal.numel()),
                                                       "seconds": round(cal_s, 2)},
            "eval_tokens": int(ev.numel()), "rows": rows}


def _slim(r: dict) -> dict:
    return {k: r[k] for k in ("experts", "ref_experts", "top1_agreement", "kl", "ppl", "ref_ppl", "tokens")} | {
        "experts_per_layer": {str(k): v for k, v in r["experts_per_layer"].items()}}


def equal_count_table(res: dict, batch_size: int) -> tuple[list[float], dict[str, list]]:
    rows = [r for r in res["rows"] if r["batch_size"] == batch_size]
    ref = next(r for r in rows if r["method"] == "unmodified")
    targets = [round(ref["experts"] * f, 2) for f in (0.5, 0.625, 0.75, 0.875)]
    table = {}
    for m in METHODS:
        front = pareto([r for r in rows if r["method"] == m])
        table[m] = [(at_count(front, t, "top1_agreement"), at_count(front, t, "kl")) for t in targets]
    return targets, table


def print_tables(res: dict) -> None:
    print(f"\n== {res['model']}: {res['num_experts']} experts, top-{res['top_k']}, {res['moe_layers']} MoE layers, "
          f"{res['eval_tokens']} held-out tokens ==")
    for b in sorted({r["batch_size"] for r in res["rows"]}):
        rows = [r for r in res["rows"] if r["batch_size"] == b]
        ref = next(r for r in rows if r["method"] == "unmodified")
        print(f"\nB={b}: unmodified runs {ref['experts']:.2f} experts/layer, ppl {ref['ppl']:.2f}")
        print(f"  Pareto fronts (experts/layer -> top-1 agreement, KL):")
        for m in METHODS:
            front = pareto([r for r in rows if r["method"] == m])
            pts = "  ".join(f"{p['experts']:.2f}:{p['top1_agreement']:.3f}/{p['kl']:.3f} ({p['knob']})" for p in front)
            print(f"  {LABELS[m]:<26} {pts}")
        targets, table = equal_count_table(res, b)
        print(f"  At equal distinct-expert count (top-1 agreement | KL):")
        print("  " + f"{'method':<26}" + "".join(f"{t:>18.2f}" for t in targets))
        for m in METHODS:
            cells = "".join(f"{'-':>18}" if a is None else f"{a:>10.3f} | {k:<5.3f}" for a, k in table[m])
            print(f"  {LABELS[m]:<26}{cells}")


def plot(res: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bs = sorted({r["batch_size"] for r in res["rows"]})
    fig, axes = plt.subplots(2, len(bs), figsize=(4 * len(bs), 7), squeeze=False)
    for j, b in enumerate(bs):
        rows = [r for r in res["rows"] if r["batch_size"] == b]
        ref = next(r for r in rows if r["method"] == "unmodified")
        for m in METHODS:
            pts = sorted([r for r in rows if r["method"] == m], key=lambda r: r["experts"])
            front = pareto(pts)
            line, = axes[0][j].plot([p["experts"] for p in front], [p["top1_agreement"] for p in front], "-",
                                    label=LABELS[m])
            axes[0][j].plot([p["experts"] for p in pts], [p["top1_agreement"] for p in pts], ".",
                            color=line.get_color(), alpha=0.5)
            axes[1][j].plot([p["experts"] for p in front], [max(p["kl"], 1e-5) for p in front], "-",
                            color=line.get_color())
        for ax in (axes[0][j], axes[1][j]):
            ax.axvline(ref["experts"], color="grey", ls=":", lw=1)
        axes[0][j].set_title(f"B = {b}")
        axes[1][j].set_yscale("log")
        axes[1][j].set_xlabel("distinct experts per layer per decode batch")
    axes[0][0].set_ylabel("top-1 agreement with unmodified")
    axes[1][0].set_ylabel("KL(ref || method), nats/token")
    axes[0][-1].legend(fontsize=7, loc="lower right")
    fig.suptitle(f"{res['model']}: fidelity vs active experts (Pareto fronts; dots = all points)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["trained", "planted"], choices=["trained", "planted"])
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[8, 16, 32, 64])
    p.add_argument("--seq-len", type=int, default=48)
    p.add_argument("--eval-samples", type=int, default=64)
    p.add_argument("--cal-samples", type=int, default=32)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(RESULTS / "fidelity.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    t0 = time.time()
    out = {"benchmark": "fidelity", "command": "python " + " ".join(["benchmarks/bench_fidelity.py"] + sys.argv[1:]),
           "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads",
           "batch_sizes": args.batch_sizes, "seq_len": args.seq_len, "models": []}
    for name in args.models:
        if name == "trained":
            path = DATA_DIR / "tiny-trained"
            if not (path / "config.json").exists():
                print(f"skipping trained: {path} does not exist")
                continue
            model, tok = load_model(path)
        else:
            model, tok = build_model(TinySpec(), "planted")
        print(f"[{name}] evaluating", flush=True)
        res = run_model(name, model, tok, args)
        out["models"].append(res)
        print_tables(res)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        plot(res, Path(args.out).with_name(f"fidelity_{name}.png"))
    out["wall_s"] = round(time.time() - t0, 1)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"\nwrote {args.out} in {out['wall_s']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
