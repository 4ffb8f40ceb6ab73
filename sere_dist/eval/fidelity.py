"""Fidelity of a routing transform on a `transformers` model, with decode batches simulated.

A decode step batches one token from each of B sequences. Under teacher forcing, the tokens at the
same position of B sequences form exactly such a batch, so `RoutingPatch` re-routes each position
as its own group (G = L groups of T = B tokens) while the model runs whole sequences.

A transform maps (layer, ids [G, T, k], weights [G, T, k], valid [G, T]) to (ids, weights,
active [G, E] bool): the experts the batch really runs. Slots are sorted by weight, largest first.
A transform with the attribute `wants_logits = True` is also called with `logits=[G, T, E]`, the
router's raw logits over all experts (baselines that score experts outside a token's top-k need them);
one with `wants_outputs = True` is called with `outputs=[G, T, E, H]`, every expert's output on each
token (the per-slot oracle).

For benchmarks that compare many rules on the same text, `reference` runs the unmodified model once
and `score` returns per-sequence sums (KL, top-1 agreement, NLL, token counts) so that paired
intervals can be computed (`paired_bootstrap`); `evaluate` is both in one call.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Mapping

import torch
import torch.nn.functional as F

from sere_dist.calibration.capture import expert_outputs, moe_blocks
from sere_dist.core.config import SereConfig
from sere_dist.core.reroute import reroute, used_experts

Transform = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def active_experts(ids: torch.Tensor, weights: torch.Tensor, valid: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[G, T, k] ids/weights, [G, T] valid -> [G, E] bool: experts with a nonzero-weight valid slot."""
    return used_experts(ids, num_experts, (weights != 0) & valid.unsqueeze(-1))


def sere_transform(sims: Mapping[int, torch.Tensor], cfg: SereConfig) -> Transform:
    """The SERE rule (weights untouched) as a transform."""
    def fn(layer, ids, w, valid):
        s, rho = cfg.for_layer(layer)
        new, _ = reroute(ids, sims[layer], s, rho, valid, with_stats=False)
        return new, w, active_experts(new, w, valid, sims[layer].shape[0])
    return fn


def identity_transform(num_experts: int) -> Transform:
    def fn(layer, ids, w, valid):
        return ids, w, active_experts(ids, w, valid, num_experts)
    return fn


def record_transform(num_experts: int, store: dict[int, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]
                     ) -> Transform:
    """Routing left unchanged; appends (ids [G, T, k], weights [G, T, k], valid [G, T]) per call to
    store[layer]. Each group is one simulated decode step (routing traces for the traffic benchmark)."""
    def fn(layer, ids, w, valid):
        store.setdefault(layer, []).append((ids.clone(), w.clone(), valid.clone()))
        return ids, w, active_experts(ids, w, valid, num_experts)
    return fn


@dataclass
class RoutingPatch:
    """Context manager: applies `transform` to every MoE router's output, grouped by position.

    group_size: sequences per simulated decode batch. None: the whole forward batch is one decode batch
    per position; else the forward batch (a multiple of group_size sequences) holds several, so one
    forward scores many small decode batches.
    """

    model: torch.nn.Module
    transform: Transform
    active: dict[int, list[torch.Tensor]] = field(default_factory=dict)   # layer -> [G] counts per call
    group_size: int | None = None

    def __post_init__(self):
        self.valid: torch.Tensor | None = None                            # [B, L] bool for the next call
        self._shape: dict[int, tuple[int, int]] = {}
        self._inputs: dict[int, torch.Tensor] = {}
        self._handles = []
        self._blocks = moe_blocks(self.model)

    def __enter__(self):
        for idx, blk in self._blocks.items():
            self._handles.append(blk.register_forward_pre_hook(self._pre(idx), with_kwargs=True))
            self._handles.append(blk.gate.register_forward_hook(self._post(idx)))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _pre(self, idx):
        wants_outputs = getattr(self.transform, "wants_outputs", False)

        def hook(mod, args, kwargs):
            hs = args[0] if args else kwargs["hidden_states"]
            self._shape[idx] = (hs.shape[0], hs.shape[1]) if hs.dim() == 3 else (1, hs.shape[0])
            if wants_outputs:
                self._inputs[idx] = hs.reshape(-1, hs.shape[-1])
        return hook

    def _post(self, idx):
        def hook(mod, args, out):
            logits, w, ids = out
            b, l = self._shape[idx]
            t = self.group_size or b
            if b % t:
                raise ValueError(f"forward batch of {b} sequences is not a multiple of group_size={t}")
            w_sorted, order = w.float().sort(dim=-1, descending=True, stable=True)
            ids_sorted = ids.gather(-1, order)

            def group(x):                          # [b*l, ...] -> [b/t * l, t, ...]: one group per (batch, position)
                rest = x.shape[1:]
                x = x.reshape(b // t, t, l, *rest).transpose(1, 2)
                return x.reshape(b // t * l, t, *rest)

            def ungroup(x):
                rest = x.shape[2:]
                return x.reshape(b // t, l, t, *rest).transpose(1, 2).reshape(b * l, *rest)

            valid = self.valid if self.valid is not None else torch.ones(b, l, dtype=torch.bool)
            g_valid = group(valid.reshape(b * l))
            extra = {}
            if getattr(self.transform, "wants_logits", False):
                extra["logits"] = group(logits.float())                          # [G, T, E]
            if getattr(self.transform, "wants_outputs", False):
                y = expert_outputs(self._blocks[idx].experts, self._inputs.pop(idx))  # [E, b*l, H]
                extra["outputs"] = group(y.permute(1, 0, 2))                      # [G, T, E, H]
            new_ids, new_w, act = self.transform(idx, group(ids_sorted), group(w_sorted), g_valid, **extra)
            self.active.setdefault(idx, []).append(act.sum(-1)[g_valid.any(1)])
            return logits, ungroup(new_w).to(w.dtype), ungroup(new_ids).to(ids.dtype)
        return hook


@dataclass
class Reference:
    """The unmodified model's next-token log-probabilities on [N, L] tokens (computed once)."""

    logprobs: torch.Tensor          # [N, L-1, V] float32
    mask: torch.Tensor              # [N, L-1] bool: positions that count (both tokens real)
    nll: torch.Tensor               # [N] summed NLL of the true next token
    experts: float                  # mean distinct experts per layer per decode batch (batch_size used)


@torch.no_grad()
def reference(model, tokens: torch.Tensor, batch_size: int = 16, pad_id: int | None = None) -> Reference:
    num_experts = next(iter(moe_blocks(model).values())).experts.gate_up_proj.shape[0]
    base = RoutingPatch(model, identity_transform(num_experts))
    lps, masks, nlls = [], [], []
    for s in range(0, tokens.shape[0], batch_size):
        x = tokens[s:s + batch_size]
        valid = torch.ones_like(x, dtype=torch.bool) if pad_id is None else x != pad_id
        with base:
            base.valid = valid
            lp = F.log_softmax(model(x).logits.float()[:, :-1], -1)
        m = valid[:, 1:] & valid[:, :-1]
        lps.append(lp)
        masks.append(m)
        nlls.append((-lp.gather(-1, x[:, 1:].unsqueeze(-1)).squeeze(-1) * m).sum(-1))
    per_layer = [float(torch.cat(v).float().mean()) for v in base.active.values()]
    return Reference(torch.cat(lps), torch.cat(masks), torch.cat(nlls), sum(per_layer) / len(per_layer))


@torch.no_grad()
def score(model, tokens: torch.Tensor, transform: Transform, ref: Reference, batch_size: int = 16,
          order: torch.Tensor | None = None, pad_id: int | None = None, forward_batch: int = 64) -> dict:
    """Per-sequence fidelity sums of `transform` against `ref` (same tokens).

    order: a permutation of the N sequences (or of a subset: the others are not scored and get zeros,
    `tokens` 0); consecutive runs of `batch_size` in that order form the
    decode batches (so a seed can change which sequences share a batch); one forward runs
    `forward_batch` sequences (several decode batches). Returned arrays are indexed by
    the original sequence index: kl [N] (sum of KL(ref || patched) over the sequence's positions),
    agree [N] (positions whose argmax matches), nll [N], tokens [N]; plus experts (mean distinct
    experts per layer per decode batch) and experts_per_layer.
    """
    n = tokens.shape[0]
    order = torch.arange(n) if order is None else order
    kl, agree, nll = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64), torch.zeros(
        n, dtype=torch.float64)
    scored = torch.zeros(n, dtype=torch.bool)
    scored[order] = True
    patch = RoutingPatch(model, transform, group_size=batch_size)
    step = batch_size * max(1, forward_batch // batch_size)
    m_total = order.numel()
    full = m_total - m_total % batch_size
    spans = [(s, min(s + step, full), batch_size) for s in range(0, full, step)]
    if full < m_total:                                # a last, smaller decode batch
        spans.append((full, m_total, m_total - full))
    for s, e, group in spans:
        idx = order[s:e]
        patch.group_size = group
        x = tokens[idx]
        valid = torch.ones_like(x, dtype=torch.bool) if pad_id is None else x != pad_id
        with patch:
            patch.valid = valid
            out_lp = F.log_softmax(model(x).logits.float()[:, :-1], -1)
        ref_lp, m = ref.logprobs[idx], ref.mask[idx]
        kl[idx] = ((ref_lp.exp() * (ref_lp - out_lp)).sum(-1) * m).sum(-1).double()
        agree[idx] = ((ref_lp.argmax(-1) == out_lp.argmax(-1)) & m).sum(-1).double()
        nll[idx] = (-out_lp.gather(-1, x[:, 1:].unsqueeze(-1)).squeeze(-1) * m).sum(-1).double()
    per_layer = {i: float(torch.cat(v).float().mean()) for i, v in sorted(patch.active.items())}
    return {"kl": kl, "agree": agree, "nll": nll, "tokens": ref.mask.sum(-1).double() * scored,
            "experts_per_layer": per_layer, "experts": sum(per_layer.values()) / len(per_layer)}


@torch.no_grad()
def evaluate(model, tokens: torch.Tensor, transform: Transform, batch_size: int = 16,
             pad_id: int | None = None) -> dict:
    """Fidelity of `transform` against the unmodified model on [N, L] token ids.

    Returns top-1 next-token agreement, mean KL(ref || patched) in nats, perplexity of both, and the
    mean number of active experts per decode batch (per layer and overall), for batches of
    `batch_size` sequences.
    """
    ref = reference(model, tokens, batch_size, pad_id)
    r = score(model, tokens, transform, ref, batch_size, pad_id=pad_id)
    n = float(r["tokens"].sum())
    return {"top1_agreement": float(r["agree"].sum()) / n, "kl": float(r["kl"].sum()) / n,
            "ppl": math.exp(float(r["nll"].sum()) / n), "ref_ppl": math.exp(float(ref.nll.sum()) / n),
            "experts_per_layer": r["experts_per_layer"], "experts": r["experts"], "ref_experts": ref.experts,
            "tokens": int(n), "batch_size": batch_size}


def paired_bootstrap(diff: torch.Tensor, weight: torch.Tensor, n_boot: int = 2000, level: float = 0.95,
                     seed: int = 0) -> tuple[float, float, float]:
    """Bootstrap interval of a per-token mean difference, resampling whole units (sequences).

    diff: [N] per-unit sums of a paired difference (e.g. KL of method A minus KL of method B on the
    same tokens); weight: [N] tokens per unit. The statistic is sum(diff) / sum(weight), recomputed
    on `n_boot` resamples of the N units with replacement (percentile interval).
    Returns (estimate, low, high).
    """
    diff, weight = diff.double().flatten(), weight.double().flatten()
    if diff.shape != weight.shape or diff.numel() < 2:
        raise ValueError(f"paired_bootstrap needs matching 1-D diff and weight with >= 2 units, got "
                         f"{tuple(diff.shape)} and {tuple(weight.shape)}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, diff.numel(), (n_boot, diff.numel()), generator=gen)
    stats = diff[idx].sum(-1) / weight[idx].sum(-1)
    lo, hi = torch.quantile(stats, torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)).tolist()
    return float(diff.sum() / weight.sum()), lo, hi
