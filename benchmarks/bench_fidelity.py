"""Fidelity at equal active experts: what to do with a token's secondary slots, with intervals.

SERE keeps each token's top-S experts; the union over the batch is the primary set. Every rule here
runs exactly that set (SERE at rho = 0 and all baselines below), so they differ only in what happens
to a secondary slot whose expert is not primary:

    sere          the paper's rule: move it to the most similar primary (calibrated similarity)
    error_aware   move it to the primary p that best reproduces it after scaling, weight times the
                  least-squares scale a(e, p) (calibrated routed-token statistics C, N; gain threshold 0)
    random        move it to a uniformly random primary (the paper's ablation)
    router_logit  move it to the primary with the highest router logit the token does not hold yet
    oracle        move it to the primary whose true output on this token is closest (upper bound of
                  any re-routing rule that keeps the weight; looks at the outputs)
    drop          drop it, kept weights unchanged
    drop_renorm   drop it, kept weights rescaled to the original sum
    top_s         naive top-S: drop every secondary (also those on primaries), rescale

Models: the shipped trained model (16 experts top-4), one trained from scratch with 64 experts top-8
(fine-grained, like Qwen3-30B-A3B / OLMoE) and one upcycled from a dense model (like Qwen1.5-MoE).
Held-out text: Python stdlib documents never used in training or calibration, teacher-forced; the
tokens at one position of B sequences form one simulated decode batch. Each seed draws which
sequences share a batch (and random's choices); each seed owns 32 held-out sequences of 64 tokens
(2016 scored positions; 64 sequences at B = 64), so 10 seeds score 20160 tokens (40320 at B = 64), each
once. Active-expert fractions (of the unmodified model's
distinct experts per layer per batch) are reached by mixing the two neighbouring S values (a convex
combination of their per-token losses, which is what alternating S between batches would give).
Intervals: paired bootstrap over sequences of
KL(best other deployable method) - KL(method): positive = this method is better.

    python benchmarks/bench_fidelity.py              # all three models, 10 seeds, >= 20160 tokens per batch size
    python benchmarks/bench_fidelity.py --quick      # smoke run

Writes benchmarks/results/fidelity.json and fidelity_<model>.png (for --out X.json: X_<model>.png).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

from sere_dist.calibration.capture import load_model, moe_blocks, tokenize_texts
from sere_dist.calibration.corpus import split_corpus, stdlib_documents
from sere_dist.calibration.diagnostics import diagnostics
from sere_dist.calibration.pipeline import calibrate_in_process
from sere_dist.core.config import SereConfig
from sere_dist.eval import baselines as bl
from sere_dist.eval.fidelity import (RoutingPatch, paired_bootstrap, record_transform, reference, score,
                                     sere_transform)
from sere_dist.models.tiny import DATA_DIR

RESULTS = Path(__file__).resolve().parent / "results"
MODELS = {"shipped": DATA_DIR / "tiny-trained", "scratch64": DATA_DIR / "tiny-scratch64",
          "upcycled": DATA_DIR / "tiny-upcycled"}
METHODS = ("sere", "error_aware", "random", "router_logit", "oracle", "drop", "drop_renorm", "top_s")
DEPLOYABLE = tuple(m for m in METHODS if m != "oracle")
LABELS = {"sere": "SERE (paper rule, rho=0)", "error_aware": "error-aware (LS scale)", "random": "random primary", "router_logit": "router-logit primary",
          "oracle": "oracle primary (bound)", "drop": "drop, no renorm", "drop_renorm": "drop + renorm",
          "top_s": "naive top-S"}
FRACTIONS = (0.5, 0.625, 0.75, 0.875)

# The error-aware rule's settings: routed-token weighting of C, N (RoutedAccumulator.stats), what an
# unmatched slot does (no primary reaches the gain threshold: keep / drop / renorm, core.reroute.route)
# and the gain threshold. `error_aware` runs the defaults below (or --ea-*); variants run side by side
# as methods named error_aware_<weighting>_<unmatched>_t<threshold>, e.g. error_aware_router_renorm_t0.3.
EA_WEIGHTINGS = ("count", "router")
EA_UNMATCHED = ("keep", "drop", "renorm")
EA_DEFAULT = {"weighting": "router", "unmatched": "keep", "threshold": 0.0, "keep_sum": False}
EA_VARIANT = re.compile(r"error_aware_(count|router)_(keep|drop|renorm)_t([0-9]*\.?[0-9]+)(_sum)?")


def ea_name(weighting: str, unmatched: str, threshold: float, keep_sum: bool = False) -> str:
    return f"error_aware_{weighting}_{unmatched}_t{threshold:g}" + ("_sum" if keep_sum else "")


def ea_settings(method: str, default: dict | None = None) -> dict | None:
    """The error-aware settings a method name stands for (None: not an error-aware method)."""
    if method == "error_aware":
        return dict(default or EA_DEFAULT)
    m = EA_VARIANT.fullmatch(method)
    if m is None:
        return None
    return {"weighting": m.group(1), "unmatched": m.group(2), "threshold": float(m.group(3)),
            "keep_sum": m.group(4) is not None}


def is_error_aware(method: str) -> bool:
    return method == "error_aware" or EA_VARIANT.fullmatch(method) is not None


def is_deployable(method: str) -> bool:
    """Servable by the plugin: the baselines but the oracle, and every error-aware setting (SereConfig's
    gain_weighting, unmatched, gain_threshold, keep_sum)."""
    return method in DEPLOYABLE or is_error_aware(method)


def label(method: str) -> str:
    if method in LABELS:
        return LABELS[method]
    st = ea_settings(method)
    return (f"error-aware {st['weighting']}, {st['unmatched']}, g>={st['threshold']:g}"
            + (", keep_sum" if st["keep_sum"] else ""))


def method_arg(value: str) -> str:
    if value in METHODS or EA_VARIANT.fullmatch(value):
        return value
    raise argparse.ArgumentTypeError(f"unknown method {value!r}: use one of {', '.join(METHODS)} or "
                                     "error_aware_<count|router>_<keep|drop|renorm>_t<threshold>[_sum]")


def ea_grid(thresholds) -> list[str]:
    """Every (weighting, unmatched, threshold) variant; at threshold 0 every primary passes (gains are
    >= 0), so no slot is unmatched and keep / drop / renorm coincide: only keep is listed there."""
    return [ea_name(w, u, t) for w in EA_WEIGHTINGS for t in thresholds for u in EA_UNMATCHED
            if t > 0 or u == "keep"]


def transform_for(method: str, s: int, sims, num_experts: int, seed: int, routed=None, ea: dict | None = None):
    """routed: weighting -> layer -> (C, N); ea: the default settings of `error_aware` (EA_DEFAULT)."""
    if method == "sere":
        return sere_transform(sims, SereConfig(select_top_k=s, threshold=0.0))
    st = ea_settings(method, ea)
    if st is not None:
        return bl.error_aware_transform(routed[st["weighting"]], s, threshold=st["threshold"],
                                        unmatched=st["unmatched"], keep_sum=st.get("keep_sum", False))
    if method == "random":
        return bl.random_reroute_transform(num_experts, s, seed=seed)
    if method == "router_logit":
        return bl.router_logit_transform(num_experts, s)
    if method == "oracle":
        return bl.oracle_transform(num_experts, s)
    if method == "drop":
        return bl.drop_transform(num_experts, s, renormalize=False)
    if method == "drop_renorm":
        return bl.drop_transform(num_experts, s, renormalize=True)
    if method == "top_s":
        return bl.naive_top_s_transform(num_experts, s)
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


def unmodified_routing(model, tokens: torch.Tensor, num_experts: int) -> dict[int, torch.Tensor]:
    """layer -> [N, L, k] expert ids of the unmodified model (sorted by weight)."""
    store: dict[int, list] = {}
    with torch.no_grad(), RoutingPatch(model, record_transform(num_experts, store)):
        for s in range(0, tokens.shape[0], 64):
            model(tokens[s:s + 64])
    return {layer: torch.cat([ids.transpose(0, 1) for ids, _, _ in calls]) for layer, calls in store.items()}


def distinct_by_s(routing: dict[int, torch.Tensor], batch: int, order: torch.Tensor, num_experts: int) -> list[float]:
    """Mean distinct experts per layer per decode batch when only each token's top-S run, S = 1..k
    (unmodified routing; the k entry is the unmodified count)."""
    k = next(iter(routing.values())).shape[-1]
    out = []
    for s in range(1, k + 1):
        vals = []
        for ids in routing.values():
            x = ids[order].reshape(-1, batch, ids.shape[1], k)[..., :s]            # [nb, B, L, S]
            x = x.permute(0, 2, 1, 3).reshape(-1, batch * s)                         # [nb*L, B*S]
            hit = torch.zeros(x.shape[0], num_experts, dtype=torch.bool).scatter_(1, x.long(), True)
            vals.append(hit.sum(1).float().mean())
        out.append(float(torch.stack(vals).mean()))
    return out


def s_values_for(fracs_by_s: list[float], targets, tolerance: float = 0.0) -> list[int]:
    """The S values whose active fractions bracket each reachable target (S in 1..k-1; k = unmodified);
    a target at most `tolerance` below S = 1's fraction is taken at S = 1."""
    k = len(fracs_by_s)
    need = set()
    for f in targets:
        if fracs_by_s[0] - tolerance <= f < fracs_by_s[0] and k > 1:
            need.add(1)
            continue
        for s in range(1, k):
            lo, hi = fracs_by_s[s - 1], fracs_by_s[s]
            if lo <= f <= hi:
                need.update({s, s + 1} - {k})
                break
    return sorted(need)


def interpolate(points: dict[int, dict], target: float, unmodified: dict,
                tolerance: float = 0.0) -> tuple[dict, dict] | None:
    """Mix the two S points (or S = k-1 and the unmodified model) whose experts bracket `target`
    experts: per-sequence kl/agree and experts as the convex combination. A target at most `tolerance`
    experts below the lowest point is that point (`at_lowest`: the fraction it stands for is a little
    above the target). None when unreachable."""
    pts = sorted(points.items(), key=lambda kv: kv[1]["experts"]) + [(None, unmodified)]
    s0, low = pts[0]
    if s0 is not None and low["experts"] - tolerance <= target < low["experts"] - 1e-9:
        return {key: low[key] for key in ("kl", "agree")}, {"S_low": s0, "S_high": s0, "mix": 0.0,
                                                             "at_lowest": True, "experts_actual": low["experts"]}
    for (s_a, a), (s_b, b) in zip(pts, pts[1:]):
        if a["experts"] - 1e-9 <= target <= b["experts"] + 1e-9:
            lam = 0.0 if b["experts"] == a["experts"] else (target - a["experts"]) / (b["experts"] - a["experts"])
            mix = {key: (1 - lam) * a[key] + lam * b[key] for key in ("kl", "agree")}
            return mix, {"S_low": s_a, "S_high": s_b, "mix": round(lam, 4)}
    return None


def run_model(name: str, path: Path, args) -> dict:
    model, tok = load_model(path)
    blocks = moe_blocks(model)
    first = next(iter(blocks.values()))
    num_experts, top_k = first.experts.gate_up_proj.shape[0], first.gate.top_k
    train_docs, held_docs = split_corpus(stdlib_documents())
    cal = tokenize_texts(tok, train_docs, args.cal_seq_len, args.cal_samples)
    t0 = time.time()
    red = calibrate_in_process(model, cal, metric="frobenius", batch_size=8)
    routed = {wt: {layer: acc.stats(wt) for layer, acc in red.routed.items()} for wt in EA_WEIGHTINGS}
    cal_s = time.time() - t0
    diag = diagnostics(red.grams, red.matrices, red.routed, metric="frobenius")   # the report's redundancy part
    ev = heldout_tokens(tok, held_docs, args.eval_samples, args.seq_len)
    ref = reference(model, ev, batch_size=64)
    routing = unmodified_routing(model, ev, num_experts)
    training = {}
    if (path / "training.json").exists():
        t = json.loads((path / "training.json").read_text())
        training = {k: t[k] for k in ("heldout_ppl", "dense_heldout_ppl", "upcycled_init_heldout_ppl") if k in t}
    res = {"model": name, "path": str(path.relative_to(DATA_DIR.parents[1])), "num_experts": num_experts,
           "top_k": top_k, "moe_layers": len(blocks), "training": training,
           "calibration": {"metric": "frobenius", "tokens": int(cal.numel()), "seconds": round(cal_s, 2)},
           "diagnostics": diag, "eval_tokens": int(ref.mask[:args.seeds * args.per_seed].sum()),
           "eval_sequences": int(ev.shape[0]), "per_seed": args.per_seed,
           "methods": list(args.methods), "fractions": list(args.fractions), "batches": [], "rows": []}
    # Seeds: each seed owns its own slice of the held-out sequences (args.per_seed of them, every token
    # scored once) and draws which of them share a decode batch, and random's choices.
    # A batch of B needs at least B sequences per seed: seeds own max(per_seed, B) sequences.
    owner = torch.randperm(ev.shape[0], generator=torch.Generator().manual_seed(999))
    for b in args.batch_sizes:
        tb = time.time()
        per = max(args.per_seed, b)
        slices = [owner[sd * per:(sd + 1) * per] for sd in range(args.seeds)]
        order = torch.cat([sl[torch.randperm(sl.numel(), generator=torch.Generator().manual_seed(1000 + 37 * b + sd))]
                           for sd, sl in enumerate(slices)])
        used = torch.zeros(ev.shape[0], dtype=torch.bool)
        used[order] = True
        tokens_per_seq = ref.mask.sum(-1).double() * used
        per_s = distinct_by_s(routing, b, order, num_experts)
        ref_experts = per_s[-1]
        fracs = [v / ref_experts for v in per_s]
        s_set = s_values_for(fracs, args.fractions, args.fraction_tolerance)
        acc: dict[str, dict[int, dict]] = {m: {} for m in args.methods}
        for m in args.methods:
            for s in s_set:
                r = score(model, ev, transform_for(m, s, red.matrices, num_experts, seed=b, routed=routed,
                                                   ea=args.ea_default), ref, batch_size=b, order=order)
                acc[m][s] = {"kl": r["kl"], "agree": r["agree"], "experts": r["experts"]}
        unmod = {"kl": torch.zeros_like(tokens_per_seq), "agree": tokens_per_seq, "experts": ref_experts}
        points = []
        for m in args.methods:
            for s, a in sorted(acc[m].items()):
                points.append({"method": m, "S": s, "experts": a["experts"], "experts_frac": a["experts"] / ref_experts,
                               "kl": float(a["kl"].sum() / tokens_per_seq.sum()),
                               "top1": float(a["agree"].sum() / tokens_per_seq.sum())})
        res["batches"].append({"batch": b, "tokens": int(tokens_per_seq.sum()), "sequences": int(used.sum()),
                               "unmodified_experts": ref_experts, "topS_fracs_unmodified": fracs,
                               "S_evaluated": s_set, "points": points, "seconds": round(time.time() - tb, 1)})
        for f in args.fractions:
            mixed = {m: interpolate(acc[m], f * ref_experts, unmod, args.fraction_tolerance * ref_experts)
                     for m in args.methods}
            gone = [m for m, v in mixed.items() if v is None]     # e.g. a keep variant above the target
            if gone:
                res.setdefault("unreachable", []).append({"batch": b, "experts_frac": f, "methods": gone})
            mixed = {m: v for m, v in mixed.items() if v is not None}
            if not any(o in DEPLOYABLE and not is_error_aware(o) for o in mixed):
                continue
            mean_kl = {m: float(v[0]["kl"].sum() / tokens_per_seq.sum()) for m, v in mixed.items()}
            for m, (vals, how) in mixed.items():
                # An error-aware method is compared with the best deployable method that is not
                # error-aware (the baselines and the paper's rule); the others with the best deployable
                # method among the standard ones (variants error_aware_* left out).
                if is_error_aware(m):
                    others = [o for o in args.methods if is_deployable(o) and not is_error_aware(o)]
                else:
                    others = [o for o in args.methods if o != m and o in DEPLOYABLE]
                best = min(others, key=lambda o: mean_kl[o])
                est, lo, hi = paired_bootstrap((mixed[best][0]["kl"] - vals["kl"])[used], tokens_per_seq[used],
                                               n_boot=args.boot, seed=b)
                res["rows"].append({"model": name, "batch": b, "experts_frac": f, "method": m,
                                    "kl": mean_kl[m], "top1": float(vals["agree"].sum() / tokens_per_seq.sum()),
                                    "seeds": args.seeds, "tokens": int(tokens_per_seq.sum()), "best_other": best,
                                    "kl_gain": est, "kl_gain_ci95": [lo, hi], **how,
                                    **({"experts_frac_actual": how["experts_actual"] / ref_experts}
                                       if "experts_actual" in how else {}),
                                    **({"error_aware": ea_settings(m, args.ea_default)} if is_error_aware(m) else {})})
            if "random" in mixed and "oracle" in mixed:
                est, lo, hi = paired_bootstrap((mixed["random"][0]["kl"] - mixed["oracle"][0]["kl"])[used],
                                               tokens_per_seq[used], n_boot=args.boot, seed=b + 1)
                res.setdefault("headroom", []).append({"batch": b, "experts_frac": f, "random_minus_oracle_kl": est,
                                                       "ci95": [lo, hi], "random_kl": mean_kl["random"],
                                                       "oracle_kl": mean_kl["oracle"]})
        print(f"  {name}: B={b} done (S {s_set}, {time.time() - tb:.0f} s)", flush=True)
    return res


def print_tables(res: dict) -> None:
    tr = res.get("training") or {}
    print(f"\n== {res['model']}: {res['num_experts']} experts, top-{res['top_k']}, {res['moe_layers']} MoE layers; "
          f"held-out ppl {tr.get('heldout_ppl', float('nan')):.2f}"
          + (f" (dense parent {tr['dense_heldout_ppl']:.2f})" if "dense_heldout_ppl" in tr else "")
          + f"; {res['eval_tokens']} tokens ==")
    if res.get("diagnostics") and res["diagnostics"].get("verdict"):
        print(f"  calibration diagnostics: {res['diagnostics']['verdict']}")
    rows = res["rows"]
    for b in sorted({r["batch"] for r in rows}):
        print(f"\nB={b}: KL(ref||method) x1e3 [95% CI of gain vs best other]  (top-1)")
        fr = sorted({r["experts_frac"] for r in rows if r["batch"] == b})
        print("  " + f"{'method':<26}" + "".join(f"{f'{f:.0%} active':>34}" for f in fr))
        for m in res.get("methods", METHODS):
            cells = []
            for f in fr:
                r = next((r for r in rows if r["batch"] == b and r["experts_frac"] == f and r["method"] == m), None)
                if r is None:
                    cells.append(f"{'-':>34}")
                    continue
                lo, hi = r["kl_gain_ci95"]
                mark = "+" if lo > 0 else ("-" if hi < 0 else "~")
                cells.append(f"{r['kl'] * 1e3:>8.2f} [{lo * 1e3:+6.2f},{hi * 1e3:+6.2f}]{mark} ({r['top1']:.3f})")
            print(f"  {label(m):<26}" + "".join(f"{c:>34}" for c in cells))
    for h in res.get("headroom", []):
        print(f"  headroom B={h['batch']} {h['experts_frac']:.0%}: random - oracle KL = {h['random_minus_oracle_kl'] * 1e3:.2f}e-3 "
              f"[{h['ci95'][0] * 1e3:.2f}, {h['ci95'][1] * 1e3:.2f}]")


def plot(res: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bs = sorted({r["batch"] for r in res["rows"]}) or [bb["batch"] for bb in res["batches"]]
    fig, axes = plt.subplots(1, len(bs), figsize=(4 * len(bs), 3.6), squeeze=False)
    for j, b in enumerate(bs):
        ax = axes[0][j]
        pts = next(bb["points"] for bb in res["batches"] if bb["batch"] == b)
        for m in res.get("methods", METHODS):
            mp = sorted([p for p in pts if p["method"] == m], key=lambda p: p["experts_frac"])
            if mp:
                ax.plot([p["experts_frac"] for p in mp], [max(p["kl"], 1e-6) for p in mp], marker="o", ms=3,
                        label=label(m), ls="--" if m == "oracle" else ("-" if m in METHODS else ":"))
        for f in res.get("fractions", FRACTIONS):
            ax.axvline(f, color="grey", lw=0.5, ls=":")
        ax.set_yscale("log")
        ax.set_title(f"B = {b}")
        ax.set_xlabel("active experts / unmodified")
    axes[0][0].set_ylabel("KL(unmodified || method), nats/token")
    axes[0][-1].legend(fontsize=7)
    fig.suptitle(f"{res['model']}: {res['num_experts']} experts top-{res['top_k']}, "
                 f"{res['eval_tokens']} tokens, {next(iter(res['rows']), {}).get('seeds', '?')} seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return ""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--methods", nargs="+", default=list(METHODS), type=method_arg,
                   help="methods to run; error-aware variants as error_aware_<count|router>_<keep|drop|renorm>_t<g>")
    p.add_argument("--fractions", nargs="+", type=float, default=list(FRACTIONS),
                   help="active-expert fractions to report (e.g. 0.5 0.625); only the S values they need run")
    p.add_argument("--fraction-tolerance", type=float, default=0.01,
                   help="a fraction at most this far below S = 1's is reported at S = 1 (rows say at_lowest, "
                        "with the fraction actually active); 0 = only fractions reached by mixing")
    p.add_argument("--ea-weighting", choices=EA_WEIGHTINGS, default=EA_DEFAULT["weighting"],
                   help="routed-token weighting of the `error_aware` method's C, N")
    p.add_argument("--ea-unmatched", choices=EA_UNMATCHED, default=EA_DEFAULT["unmatched"],
                   help="what the `error_aware` method does with a slot no primary reaches the threshold for")
    p.add_argument("--ea-threshold", type=float, default=EA_DEFAULT["threshold"],
                   help="gain threshold of the `error_aware` method")
    p.add_argument("--ea-keep-sum", action="store_true",
                   help="`error_aware`: the weight a token loses (w(1-a) of moved slots, dropped slots) goes to its "
                        "own kept slots, so its weights keep their sum (prototype, eval.baselines only)")
    p.add_argument("--ea-variants", nargs="+", type=method_arg, default=[],
                   help="error-aware variants to add to --methods (error_aware_<weighting>_<unmatched>_t<g>)")
    p.add_argument("--ea-grid", nargs="*", type=float, default=None, metavar="THRESHOLD",
                   help="add every weighting x unmatched variant at these gain thresholds (default 0 0.1 0.3 0.5)")
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[8, 16, 32, 64])
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--per-seed", type=int, default=32, help="held-out sequences per seed, at least B (each scored once)")
    p.add_argument("--cal-samples", type=int, default=64)
    p.add_argument("--cal-seq-len", type=int, default=64)
    p.add_argument("--seeds", type=int, default=10)
    p.add_argument("--boot", type=int, default=2000)
    p.add_argument("--quick", action="store_true", help="2 seeds, 64 sequences, B = 16 only")
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--out", default=str(RESULTS / "fidelity.json"))
    args = p.parse_args(argv)
    if args.quick:
        args.seeds, args.per_seed, args.batch_sizes, args.boot = 2, 32, [16], 500
    bad = [b for b in args.batch_sizes if b < 1 or max(args.per_seed, b) % b]
    if bad:
        p.error(f"--batch-sizes {bad} must divide --per-seed ({args.per_seed}) or exceed it")
    if not 0.0 <= args.fraction_tolerance < 1.0:                     # also refuses nan
        p.error(f"--fraction-tolerance must be in [0, 1), got {args.fraction_tolerance}")
    if not all(0.0 < f <= 1.0 for f in args.fractions):
        p.error(f"--fractions must be in (0, 1], got {args.fractions}")
    bad_t = [m for m in ["error_aware", *args.ea_variants]
             if not 0.0 <= (ea_settings(m, {"threshold": args.ea_threshold})["threshold"]) <= 1.0]
    if bad_t:
        p.error(f"gain thresholds must be in [0, 1] (--ea-threshold, or the _t of {bad_t})")
    args.eval_samples = args.seeds * max([args.per_seed] + args.batch_sizes)
    args.ea_default = {"weighting": args.ea_weighting, "unmatched": args.ea_unmatched, "threshold": args.ea_threshold,
                       "keep_sum": args.ea_keep_sum}
    extra = list(args.ea_variants) + (ea_grid(args.ea_grid or [0.0, 0.1, 0.3, 0.5]) if args.ea_grid is not None else [])
    args.methods = list(dict.fromkeys(list(args.methods) + extra))
    args.fractions = sorted(set(args.fractions))
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    t0 = time.time()
    out = {"benchmark": "fidelity", "command": "python " + " ".join(["benchmarks/bench_fidelity.py"] + sys.argv[1:]),
           "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads",
           "uptime_before": _uptime(), "batch_sizes": args.batch_sizes, "seq_len": args.seq_len, "seeds": args.seeds,
           "fractions": list(args.fractions), "methods": list(args.methods),
           "error_aware_default": args.ea_default,
           "error_aware_settings": {m: ea_settings(m, args.ea_default) for m in args.methods if is_error_aware(m)},
           "models": []}
    for name in args.models:
        path = MODELS[name]
        if not (path / "config.json").exists():
            print(f"skipping {name}: {path} does not exist (train it: see sere_dist/models/train.py)")
            continue
        print(f"[{name}] evaluating {path}", flush=True)
        res = run_model(name, path, args)
        out["models"].append(res)
        print_tables(res)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        plot(res, Path(args.out).with_name(f"{Path(args.out).stem}_{name}.png"))
    out["wall_s"] = round(time.time() - t0, 1)
    out["uptime_after"] = _uptime()
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"\nwrote {args.out} in {out['wall_s']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
