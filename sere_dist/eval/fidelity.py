"""Fidelity of a routing transform on a `transformers` model, with decode batches simulated.

A decode step batches one token from each of B sequences. Under teacher forcing, the tokens at the
same position of B sequences form exactly such a batch, so `RoutingPatch` re-routes each position
as its own group (G = L groups of T = B tokens) while the model runs whole sequences.

A transform maps (layer, ids [G, T, k], weights [G, T, k], valid [G, T]) to (ids, weights,
active [G, E] bool): the experts the batch really runs. Slots are sorted by weight, largest first.
A transform with the attribute `wants_logits = True` is also called with `logits=[G, T, E]`, the
router's raw logits over all experts (baselines that score experts outside a token's top-k need them).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Mapping

import torch
import torch.nn.functional as F

from sere_dist.calibration.capture import moe_blocks
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
    """Context manager: applies `transform` to every MoE router's output, grouped by position."""

    model: torch.nn.Module
    transform: Transform
    active: dict[int, list[torch.Tensor]] = field(default_factory=dict)   # layer -> [G] counts per call

    def __post_init__(self):
        self.valid: torch.Tensor | None = None                            # [B, L] bool for the next call
        self._shape: dict[int, tuple[int, int]] = {}
        self._handles = []

    def __enter__(self):
        for idx, blk in moe_blocks(self.model).items():
            self._handles.append(blk.register_forward_pre_hook(self._pre(idx), with_kwargs=True))
            self._handles.append(blk.gate.register_forward_hook(self._post(idx)))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _pre(self, idx):
        def hook(mod, args, kwargs):
            hs = args[0] if args else kwargs["hidden_states"]
            self._shape[idx] = (hs.shape[0], hs.shape[1]) if hs.dim() == 3 else (1, hs.shape[0])
        return hook

    def _post(self, idx):
        def hook(mod, args, out):
            logits, w, ids = out
            b, l = self._shape[idx]
            w_sorted, order = w.float().sort(dim=-1, descending=True, stable=True)
            ids_sorted = ids.gather(-1, order)
            k = ids.shape[-1]
            g_ids = ids_sorted.reshape(b, l, k).transpose(0, 1)           # [L, B, k]: one group per position
            g_w = w_sorted.reshape(b, l, k).transpose(0, 1)
            valid = self.valid if self.valid is not None else torch.ones(b, l, dtype=torch.bool)
            if getattr(self.transform, "wants_logits", False):
                g_logits = logits.float().reshape(b, l, -1).transpose(0, 1)  # [L, B, E]
                new_ids, new_w, act = self.transform(idx, g_ids, g_w, valid.t(), logits=g_logits)
            else:
                new_ids, new_w, act = self.transform(idx, g_ids, g_w, valid.t())
            self.active.setdefault(idx, []).append(act.sum(-1)[valid.any(0)])
            new_ids = new_ids.transpose(0, 1).reshape(b * l, k).to(ids.dtype)
            new_w = new_w.transpose(0, 1).reshape(b * l, k).to(w.dtype)
            return logits, new_w, new_ids
        return hook


@torch.no_grad()
def evaluate(model, tokens: torch.Tensor, transform: Transform, batch_size: int = 16,
             pad_id: int | None = None) -> dict:
    """Fidelity of `transform` against the unmodified model on [N, L] token ids.

    Returns top-1 next-token agreement, mean KL(ref || patched) in nats, perplexity of both, and the
    mean number of active experts per decode batch (per layer and overall), for batches of
    `batch_size` sequences.
    """
    num_experts = next(iter(moe_blocks(model).values())).experts.gate_up_proj.shape[0]
    agree = kl = nll = ref_nll = 0.0
    n = 0
    base = RoutingPatch(model, identity_transform(num_experts))
    patch = RoutingPatch(model, transform)
    for s in range(0, tokens.shape[0], batch_size):
        x = tokens[s:s + batch_size]
        valid = torch.ones_like(x, dtype=torch.bool) if pad_id is None else x != pad_id
        with base:
            base.valid = valid
            ref = model(x).logits.float()
        with patch:
            patch.valid = valid
            out = model(x).logits.float()
        m = valid[:, 1:] & valid[:, :-1]
        ref_lp, out_lp = F.log_softmax(ref[:, :-1], -1), F.log_softmax(out[:, :-1], -1)
        tgt = x[:, 1:]
        agree += float(((ref_lp.argmax(-1) == out_lp.argmax(-1)) & m).sum())
        kl += float(((ref_lp.exp() * (ref_lp - out_lp)).sum(-1) * m).sum())
        nll += float((-out_lp.gather(-1, tgt.unsqueeze(-1)).squeeze(-1) * m).sum())
        ref_nll += float((-ref_lp.gather(-1, tgt.unsqueeze(-1)).squeeze(-1) * m).sum())
        n += int(m.sum())
    per_layer = {i: float(torch.cat(v).float().mean()) for i, v in sorted(patch.active.items())}
    base_layer = {i: float(torch.cat(v).float().mean()) for i, v in sorted(base.active.items())}
    return {"top1_agreement": agree / n, "kl": kl / n, "ppl": math.exp(nll / n), "ref_ppl": math.exp(ref_nll / n),
            "experts_per_layer": per_layer, "experts": sum(per_layer.values()) / len(per_layer),
            "ref_experts": sum(base_layer.values()) / len(base_layer), "tokens": n, "batch_size": batch_size}
