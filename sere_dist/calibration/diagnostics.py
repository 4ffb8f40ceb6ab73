"""Redundancy diagnostics of a calibration: would re-routing help this model, or hurt it?

SERE substitutes a secondary expert e by a similar primary p with e's weight. That helps when f_p is
close to f_e on the tokens routed to e, and hurts (more than dropping the slot) when it is not. From
per-layer statistics the calibration pipeline streams anyway (the Gram matrix G over all tokens and the
routed-token statistics C, N of `core.similarity.RoutedAccumulator`) and the similarity matrix, per MoE
layer and over the experts e with routed tokens ("rows"):

    median_cosine        median over expert pairs of cos(f_i, f_j) (over all calibration tokens, from G)
    spearman             mean over rows of Spearman's rank correlation of sim[e, p] and -R[e, p], p != e:
                         does the similarity rank substitutes by their actual error?
    lowest_norm_share    share of rows whose best match b(e) = argmax_{p != e} sim[e, p] (lowest id on
                         ties) is simply the lowest-norm other expert (norm from diag G); chance is 1/(E-1)
    r_min_median         median over rows of min_p R[e, p]  (the best possible plain substitution)
    r_best_median        median over rows of R[e, b(e)]     (the substitution the similarity chooses)
    beats_drop_share     share of rows with R[e, b(e)] < 1  (dropping the slot has error 1)
    ls_min_median        median over rows of min_p L[e, p]  (least-squares scaled substitution: what the
                         error-aware rule reaches with every expert available as a primary)

R and L are relative squared errors on e's routed tokens (`core.similarity.substitution_error`,
`scaled_substitution_error`). The minima over p assume every other expert is available as the
substitute; at serving time only the batch's primaries are, so they are lower bounds of what a batch
reaches.

The verdict pools the rows of all layers (thresholds in `THRESHOLDS`):
    helps    if median R[e, b(e)] <= 0.5 and at least 75% of rows beat dropping: the chosen substitute
             recovers at least half of e's routed output for the median expert
    hurts    if median R[e, b(e)] >= 1: for the median expert the similarity's substitute is worse than
             dropping the slot; prefer dropping secondaries (or the error-aware rule when ls_min_median
             <= 0.9, i.e. a scaled substitute recovers at least 10% of the energy)
    mixed    otherwise: the layers that pass the `helps` test are named
"""

from __future__ import annotations

import json
import math
from typing import Any, Mapping

import torch

from sere_dist.core.similarity import RoutedAccumulator, scaled_substitution_error, substitution_error

DIAGNOSTICS_JSON = "diagnostics.json"
ROUTED_STATS = "routed_stats.safetensors"
ROUTED_FORMAT = "sere-routed-stats/1"

THRESHOLDS = {
    "helps_max_r_best": 0.5,        # median R at the similarity's best match, at most
    "helps_min_beats_drop": 0.75,   # share of rows whose best match beats dropping, at least
    "hurts_min_r_best": 1.0,        # median R at the best match, at least: worse than dropping
    "error_aware_max_ls": 0.9,      # median least-squares error, at most, to point at the error-aware rule
}

COLUMNS = [  # (key, Markdown header, format)
    ("routed_experts", "experts routed", "{:d}"),
    ("median_cosine", "median cosine", "{:.3f}"),
    ("spearman", "Spearman(sim, -R)", "{:.3f}"),
    ("lowest_norm_share", "best match = lowest norm", "{:.0%}"),
    ("r_min_median", "min_p R", "{:.3f}"),
    ("r_best_median", "R at best match", "{:.3f}"),
    ("beats_drop_share", "best match beats drop", "{:.0%}"),
    ("ls_min_median", "LS-scaled min_p L", "{:.3f}"),
]


def _median(x: torch.Tensor) -> float:
    x = x[torch.isfinite(x)]
    return float(x.double().quantile(0.5)) if x.numel() else math.nan


def _ranks(x: torch.Tensor) -> torch.Tensor:
    """Average ranks (ties share the mean of their positions).  [n] -> [n] float64."""
    order = torch.argsort(x, stable=True)
    r = torch.empty(x.shape[0], dtype=torch.float64)
    r[order] = torch.arange(x.shape[0], dtype=torch.float64)
    _, inv = torch.unique(x, return_inverse=True)
    sums = torch.zeros(int(inv.max()) + 1, dtype=torch.float64).index_add_(0, inv, r)
    cnt = torch.zeros_like(sums).index_add_(0, inv, torch.ones_like(r))
    return (sums / cnt)[inv]


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman's rank correlation of two [n] vectors (ties: average ranks); NaN if either is constant."""
    if a.numel() < 2:
        return math.nan
    ra, rb = _ranks(a.double()), _ranks(b.double())
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = float(ra.norm() * rb.norm())
    return float(ra @ rb) / den if den > 0 else math.nan


def _offdiag_min(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, ids) of each row's minimum over p != e (lowest id on ties).  [E, E] -> [E], [E]."""
    v, i = m.double().masked_fill(torch.eye(m.shape[0], dtype=torch.bool), math.inf).min(1)
    return v, i


def row_values(gram: torch.Tensor, sim: torch.Tensor, c: torch.Tensor, n: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-row and per-pair values of one layer, before any summary.  gram, sim, c, n: [E, E] ->
    cos [pairs] (cosine of each pair i < j of non-zero experts), and over routed rows e (in id order):
    expert, best (b(e)), rho, lowest (b(e) is the lowest-norm expert), r_min, r_best, ls_min."""
    e = gram.shape[0]
    g = gram.double()
    norm = g.diagonal().clamp_min(0).sqrt()
    iu = torch.triu_indices(e, e, offset=1)
    live = (norm[iu[0]] > 0) & (norm[iu[1]] > 0)
    cos = g[iu[0], iu[1]][live] / (norm[iu[0]] * norm[iu[1]])[live]
    r = substitution_error(c, n)
    eye = torch.eye(e, dtype=torch.bool)
    best = sim.double().masked_fill(eye, -math.inf).argmax(1)       # first maximum: the lowest id on ties
    lowest = _offdiag_min(g.diagonal()[None, :].expand(e, e))[1]     # the lowest-norm other expert
    rows = torch.nonzero(torch.isfinite(r.diagonal())).flatten() if e > 1 else torch.zeros(0, dtype=torch.long)
    rho = torch.tensor([spearman(sim[i][~eye[i]], -r[i][~eye[i]]) for i in rows.tolist()], dtype=torch.float64)
    return {"cos": cos, "expert": rows, "best": best[rows], "rho": rho,
            "lowest": (best == lowest)[rows], "r_min": _offdiag_min(r)[0][rows], "r_best": r[rows, best[rows]],
            "ls_min": _offdiag_min(scaled_substitution_error(c, n))[0][rows]}


def summarise(values: list[dict[str, torch.Tensor]]) -> dict[str, Any]:
    """The diagnostics (module docstring) of the rows of one or several layers (`row_values`)."""
    cat = {k: torch.cat([v[k] for v in values]) for k in ("cos", "rho", "lowest", "r_min", "r_best", "ls_min")}
    rows = cat["r_best"].numel()
    rho = cat["rho"][torch.isfinite(cat["rho"])]
    share = (lambda m: float(m.sum()) / rows) if rows else (lambda m: math.nan)
    return {"routed_experts": rows,
            "median_cosine": _median(cat["cos"]),
            "spearman": float(rho.mean()) if rho.numel() else math.nan,
            "lowest_norm_share": share(cat["lowest"]),
            "r_min_median": _median(cat["r_min"]),
            "r_best_median": _median(cat["r_best"]),
            "beats_drop_share": share(cat["r_best"] < 1),
            "ls_min_median": _median(cat["ls_min"])}


def _passes(d: dict[str, Any]) -> bool:
    t = THRESHOLDS
    return (math.isfinite(d["r_best_median"]) and d["r_best_median"] <= t["helps_max_r_best"]
            and d["beats_drop_share"] >= t["helps_min_beats_drop"])


def verdict(pooled: dict[str, Any], layers: list[dict[str, Any]]) -> tuple[str, str]:
    """(label 'helps' | 'hurts' | 'mixed' | 'unknown', one line a user can act on) from the pooled
    diagnostics and the per-layer rows (each with its "layer")."""
    t = THRESHOLDS
    rb, share, ls = pooled["r_best_median"], pooled["beats_drop_share"], pooled["ls_min_median"]
    cos, rho, low = pooled["median_cosine"], pooled["spearman"], pooled["lowest_norm_share"]
    if not math.isfinite(rb):
        return "unknown", "re-routing cannot be judged: no expert received routed calibration tokens"
    facts = (f"substituting the most similar expert leaves a median relative error of {rb:.2f} vs 1 for "
             f"dropping the slot, {share:.0%} of experts beat dropping")
    if _passes(pooled):
        return "helps", (f"re-routing should help: experts are redundant ({facts}; median cosine {cos:.2f}; "
                         f"similarity vs substitution error Spearman {rho:.2f})")
    if rb >= t["hurts_min_r_best"]:
        why = [f"median cosine {cos:.2f}"]
        if math.isfinite(rho) and rho < 0.3:
            why.append(f"the similarity does not predict substitution error, Spearman {rho:.2f}")
        if math.isfinite(low) and low >= 0.5:
            why.append(f"the best match is just the lowest-norm expert in {low:.0%} of rows")
        alt = (f"; a least-squares scaled substitute (error-aware rule) would reach {ls:.2f}"
               if math.isfinite(ls) and ls <= t["error_aware_max_ls"] else "")
        return "hurts", (f"re-routing is unlikely to help: experts are not redundant ({facts}; {', '.join(why)}); "
                         f"prefer dropping secondaries{alt}")
    good = [str(r["layer"]) for r in layers if _passes(r)]
    where = f"it should help in layer(s) {', '.join(good)}" if good else "no layer passes on its own"
    return "mixed", (f"re-routing may help a little: {facts}; {where}; use a high rho and check fidelity "
                     f"before serving")


def diagnostics(grams: Mapping[int, torch.Tensor], mats: Mapping[int, torch.Tensor],
                routed: Mapping[int, RoutedAccumulator], weighting: str = "count", metric: str = "") -> dict[str, Any]:
    """The whole report: {"verdict", "label", "layers": [per-layer diagnostics, "best_match" and "r_best"
    per expert (None: no routed tokens)], "pooled", "thresholds", "weighting", "metric", "tokens"}.
    grams: {layer: [E, E] Gram over all tokens}; mats: {layer: [E, E] similarity}; routed: the layers'
    routed-token statistics. Plain JSON types (NaN where nothing qualifies)."""
    missing = sorted(set(mats) ^ set(grams) | set(mats) ^ set(routed))
    if not mats:
        raise ValueError("diagnostics need at least one MoE layer")
    if missing:
        raise ValueError(f"diagnostics need the Gram, the similarity and routed statistics of every layer; "
                         f"layers {missing} lack one")
    layers, values = [], []
    for i in sorted(mats):
        c, n = routed[i].stats(weighting)
        v = row_values(grams[i], mats[i], c, n)
        e = mats[i].shape[0]
        best, r_best = [None] * e, [None] * e
        for k, ex in enumerate(v["expert"].tolist()):
            best[ex], r_best[ex] = int(v["best"][k]), float(v["r_best"][k])
        layers.append({"layer": i, **summarise([v]), "lowest_norm_chance": 1.0 / (e - 1) if e > 1 else math.nan,
                       "best_match": best, "r_best": r_best})
        values.append(v)
    pooled = summarise(values)
    label, line = verdict(pooled, layers)
    tokens = max((routed[i].tokens for i in routed), default=0)
    return {"verdict": line, "label": label, "layers": layers, "pooled": pooled, "thresholds": dict(THRESHOLDS),
            "weighting": weighting, "metric": metric, "tokens": tokens}


def _cell(v: Any, fmt: str) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return fmt.format(v)


def diagnostics_table(doc: Mapping[str, Any]) -> str:
    """The Markdown table of `diagnostics` (one row per layer, then all layers pooled) and the verdict."""
    head = "| layer | " + " | ".join(h for _, h, _ in COLUMNS) + " |"
    lines = [head, "| ---: |" + " ---: |" * len(COLUMNS)]
    for row in [*doc["layers"], {"layer": "all", **doc["pooled"]}]:
        lines.append(f"| {row['layer']} | " + " | ".join(_cell(row[k], f) for k, _, f in COLUMNS) + " |")
    return "\n".join(lines) + f"\n\nverdict: {doc['verdict']}\n"


def diagnostics_markdown(doc: Mapping[str, Any]) -> str:
    """The diagnostics section of stats.md: the table, the verdict and what the columns mean."""
    t = doc["thresholds"]
    return (f"\n## Redundancy diagnostics ({doc['weighting']}-weighted routed tokens)\n\n" + diagnostics_table(doc) +
            "\nR[e, p]: relative squared error of substituting p for e on the tokens routed to e (dropping: 1); "
            "best match: argmax_p sim[e, p]; L: the same with p's output scaled by least squares (the "
            "error-aware rule); medians over the routed experts of each layer. Verdict: helps when the median R "
            f"at the best match is <= {t['helps_max_r_best']} and >= {t['helps_min_beats_drop']:.0%} of experts "
            f"beat dropping; hurts when the median R at the best match is >= {t['hurts_min_r_best']}.\n")


def _json_safe(x: Any) -> Any:
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


def diagnostics_json(doc: Mapping[str, Any]) -> bytes:
    """diagnostics.json: the report with NaN written as null."""
    return (json.dumps(_json_safe(dict(doc)), indent=1) + "\n").encode()


# ---------------------------------------------------------------- routed statistics file (for the error-aware rule)

def routed_stats_bytes(routed: Mapping[int, RoutedAccumulator]) -> bytes:
    """routed_stats.safetensors: per layer i the tensors `layers.{i}.{name}` of `RoutedAccumulator.tensors`
    (c.count, n.count, c.router, n.router [E, E] float64; count, weight [E]; tokens [1])."""
    from safetensors.torch import save

    tensors = {f"layers.{i}.{k}": v.contiguous() for i, acc in routed.items() for k, v in acc.tensors().items()}
    return save(tensors, metadata={"format": ROUTED_FORMAT, "layers": json.dumps(sorted(routed))})


def load_routed_stats(path) -> dict[int, RoutedAccumulator]:
    """Read routed_stats.safetensors (a file, or the artifact directory holding it) -> {layer: accumulator}.
    A missing or malformed file is a ValueError naming it."""
    from pathlib import Path

    from safetensors import safe_open

    f = Path(path)
    f = f / ROUTED_STATS if f.is_dir() else f
    if not f.exists():
        raise ValueError(f"routed statistics not found: {f} (recalibrate with this sere-dist to write them)")
    try:
        with safe_open(str(f), framework="pt") as h:
            fmt = (h.metadata() or {}).get("format")
            per: dict[int, dict[str, torch.Tensor]] = {}
            for k in h.keys():
                _, layer, name = k.split(".", 2)
                per.setdefault(int(layer), {})[name] = h.get_tensor(k)
    except Exception as exc:  # noqa: BLE001 - any read failure is a malformed file
        raise ValueError(f"cannot read routed statistics {f}: {exc}") from None
    if fmt != ROUTED_FORMAT:
        raise ValueError(f"{f}: format {fmt!r}, expected {ROUTED_FORMAT!r}; recalibrate")
    try:
        return {i: RoutedAccumulator.from_tensors(t) for i, t in sorted(per.items())}
    except ValueError as exc:
        raise ValueError(f"{f}: {exc}; recalibrate") from None


# ---------------------------------------------------------------- in-process entry

@torch.no_grad()
def diagnose(model: torch.nn.Module, tokens: torch.Tensor, metric: str = "frobenius", weighting: str = "count",
             batch_size: int = 8, token_chunk: int = 1024, cka_tokens: int = 512, seed: int = 0) -> dict[str, Any]:
    """The calibration diagnostics of a model already in memory on [N, L] token ids, through the same
    pipeline stages and reduction as `sere calibrate` -> the `diagnostics` dict (per-layer rows, pooled,
    verdict)."""
    from sere_dist.calibration.pipeline import calibrate_in_process

    if weighting not in RoutedAccumulator.WEIGHTINGS:
        raise ValueError(f"unknown routed-token weighting {weighting!r}; use one of "
                         f"{', '.join(RoutedAccumulator.WEIGHTINGS)}")
    red = calibrate_in_process(model, tokens, metric=metric, batch_size=batch_size, token_chunk=token_chunk,
                               cka_tokens=cka_tokens, seed=seed)
    return diagnostics(red.grams, red.matrices, red.routed, weighting=weighting, metric=metric)
