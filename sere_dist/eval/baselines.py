"""Training-free baselines that cut the number of distinct experts a decode batch runs.

Each rule is written from its paper's description (no code copied). Shapes: G groups (decode
batches), T tokens per group, k routed slots per token sorted by weight (largest first), E experts.
Every pure function maps routing tensors to routing tensors; the `*_transform` factories wrap them
in the `sere_dist.eval.fidelity` transform interface (layer, ids, weights, valid[, logits]) -> (ids,
weights, active [G, E]). A dropped slot keeps its id with weight 0 (it costs no expert: `active`
counts only nonzero-weight slots).

    naive_top_s        keep each token's top-S slots, renormalise (top-k reduction, llama.cpp style)
    naee_skip          NAEE dynamic skipping (arXiv 2402.14800): drop slot j when w_j < beta * w_0
    static_prune       frequency-based expert pruning: the least-used experts are removed from the router
    random_reroute     SERE's ablation: secondary slots go to a uniformly random primary (no similarity)
    oea_piggyback      Opportunistic Expert Activation (arXiv 2511.02237): top-S per token, remaining
                       slots filled with the token's best-scoring experts already active in the batch
    xshare_budget      XShare-style selection (arXiv 2602.07265): greedily pick the batch's expert set
                       under a budget to maximise total gating score; tokens route inside that set
    drop_secondaries   SERE's active set (primaries = union of top-S) without re-routing: a secondary
                       slot whose expert is not primary is dropped, with or without rescaling the kept
                       weights to the original sum (secondaries that are already primary stay)
    router_logit       SERE's active set; a non-primary secondary moves to the primary with the highest
                       router logit for this token among those it does not already hold (weight unchanged)
    oracle             SERE's active set; a non-primary secondary moves to the primary whose true output
                       on this token is closest to the expert's own (an upper bound: it looks at outputs)

The last three, random_reroute and SERE at rho = 0 all run exactly the same experts per batch, so they
compare what to do with a secondary slot at an equal active set.

Weights: `normalize=True` means the model renormalises its top-k weights to sum to one
(`norm_topk_prob`, Mixtral); rules that re-select experts from router scores follow the same
convention, and rules that drop slots rescale the kept ones to the original sum when `renormalize`.
"""

from __future__ import annotations

from typing import Mapping

import torch

from sere_dist.eval.fidelity import Transform, active_experts


# ---------------------------------------------------------------------------------------------
# Pure rules

def naive_top_s(ids: torch.Tensor, weights: torch.Tensor, select_top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the top-S slots of every token, drop the rest, rescale the kept weights to the original sum.

    ids, weights: [..., k] sorted by weight. Returns (ids unchanged, weights [..., k]).
    """
    keep = torch.arange(ids.shape[-1], device=ids.device) < select_top_k
    return ids, _drop(weights, keep.expand_as(weights), renormalize=True)


def naee_skip(ids: torch.Tensor, weights: torch.Tensor, beta: float,
              renormalize: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """NAEE dynamic skipping: a slot j >= 1 is skipped when its weight is below beta times the top
    weight (w_j < beta * w_0). The paper states it for top-2 (Mixtral); here every secondary slot is
    tested against the top one. The paper leaves the kept weight as it is (renormalize=False).

    ids, weights: [..., k] sorted by weight. Returns (ids, weights).
    """
    keep = weights >= beta * weights[..., :1]
    keep[..., 0] = True
    return ids, _drop(weights, keep, renormalize)


def usage_counts(ids: torch.Tensor, num_experts: int, valid: torch.Tensor | None = None) -> torch.Tensor:
    """[..., T, k] ids (+ [..., T] valid) -> [E] int64: how many valid slots chose each expert."""
    from sere_dist.core.reroute import expert_slot_counts

    flat = ids.reshape(1, -1, ids.shape[-1])
    use = None if valid is None else valid.reshape(1, -1, 1).expand_as(flat)
    return expert_slot_counts(flat, num_experts, use)[0].long()


def prune_least_used(counts: torch.Tensor, num_pruned: int) -> torch.Tensor:
    """[E] usage counts -> [E] bool kept experts: the num_pruned least used are removed (lowest id first
    on ties). At least one expert is always kept."""
    e = counts.shape[0]
    num_pruned = max(0, min(num_pruned, e - 1))
    order = torch.argsort(counts, stable=True)        # ascending; stable keeps lower ids first on ties
    keep = torch.ones(e, dtype=torch.bool)
    keep[order[:num_pruned]] = False
    return keep


def static_prune(logits: torch.Tensor, keep: torch.Tensor, top_k: int,
                 normalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Static expert pruning: the router no longer has the removed experts, so every token takes its
    top-k among the kept ones (softmax over the kept experts' logits).

    logits: [..., E]; keep: [E] bool. Returns (ids [..., k'], weights [..., k']) with k' = min(k, #kept).
    """
    probs = torch.softmax(logits.float().masked_fill(~keep, float("-inf")), dim=-1)
    return _top_k(probs, min(top_k, int(keep.sum())), normalize)


def random_reroute(ids: torch.Tensor, select_top_k: int, num_experts: int, valid: torch.Tensor | None = None,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """SERE's 'random' ablation: primaries as in SERE (union of valid tokens' top-S); every secondary
    slot whose expert is not primary goes to a primary drawn uniformly at random. Weights unchanged.

    ids: [G, T, k]; valid: [G, T]. Returns new ids [G, T, k].
    """
    from sere_dist.core.reroute import primary_mask

    g, t, k = ids.shape
    e = num_experts
    primary = primary_mask(ids, select_top_k, e, valid)                          # [G, E]
    sec = ids[..., select_top_k:].long()
    u = torch.rand(g, t, k - select_top_k, e, generator=generator)
    u = u.masked_fill(~primary[:, None, None, :], -1.0)
    pick = u.argmax(-1)                                                          # a uniform primary
    is_primary = primary.gather(1, sec.reshape(g, -1)).reshape(sec.shape)
    new_sec = torch.where(is_primary, sec, pick)
    if valid is not None:
        new_sec = torch.where(valid.unsqueeze(-1), new_sec, sec)
    return torch.cat([ids[..., :select_top_k], new_sec.to(ids.dtype)], dim=-1)


def oea_piggyback(logits: torch.Tensor, top_k: int, select_top_k: int, normalize: bool,
                  valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Opportunistic Expert Activation: each token keeps its own top-S experts; the batch's active set
    is the union of those; each token's remaining k - S slots go to its highest-scoring experts that
    are already active (and not already its own). Slots with no such expert get weight 0.

    logits: [G, T, E]; valid: [G, T]. Returns (ids [G, T, k], weights [G, T, k]); weights are the
    router probabilities of the chosen experts (normalised to one when `normalize`).
    """
    probs = torch.softmax(logits.float(), dim=-1)                                # [G, T, E]
    g, t, e = probs.shape
    own = probs.topk(select_top_k, dim=-1).indices                               # [G, T, S]
    mine = torch.zeros(g, t, e, dtype=torch.bool).scatter_(-1, own, True)
    tok_ok = torch.ones(g, t, dtype=torch.bool) if valid is None else valid
    active = (mine & tok_ok.unsqueeze(-1)).any(dim=1)                            # [G, E]
    extra_scores = probs.masked_fill(~(active.unsqueeze(1) & ~mine), -1.0)
    extra = extra_scores.topk(top_k - select_top_k, dim=-1)
    ids = torch.cat([own, extra.indices], dim=-1)
    w = probs.gather(-1, ids)
    w = torch.cat([w[..., :select_top_k], torch.where(extra.values >= 0, w[..., select_top_k:],
                                                      torch.zeros_like(extra.values))], dim=-1)
    if normalize:
        w = w / w.sum(-1, keepdim=True)
    if valid is not None:  # padding keeps a plain top-k so it never widens the batch
        plain_ids, plain_w = _top_k(probs, top_k, normalize)
        ids = torch.where(valid.unsqueeze(-1), ids, plain_ids)
        w = torch.where(valid.unsqueeze(-1), w, torch.zeros_like(w))
    return ids, w


def xshare_select(probs: torch.Tensor, budget: int, top_k: int, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Budgeted greedy expert selection for one batch.

    probs: [G, T, E] gating scores; budget: the most experts the batch may run.
    Objective: f(A) = sum over valid tokens of the sum of the token's top-min(k, |A|) scores inside A.
    Greedy: add, `budget` times, the expert with the largest marginal gain in f (lowest id on ties).
    Returns [G, E] bool: the chosen set A.
    """
    g, t, e = probs.shape
    p = probs.float() * (1.0 if valid is None else valid.unsqueeze(-1).float())
    chosen = torch.zeros(g, e, dtype=torch.bool)
    budget = max(1, min(budget, e))
    for step in range(budget):
        # Current k-th best score inside A per token (0 while fewer than k are chosen).
        inside = p.masked_fill(~chosen.unsqueeze(1), 0.0)
        if step >= top_k:
            kth = inside.topk(top_k, dim=-1).values[..., -1:]                     # [G, T, 1]
        else:
            kth = torch.zeros(g, t, 1)
        gain = (p - kth).clamp(min=0).sum(dim=1)                                 # [G, E]
        gain = gain.masked_fill(chosen, -1.0)
        chosen.scatter_(1, gain.argmax(dim=1, keepdim=True), True)
    return chosen


def xshare_budget(logits: torch.Tensor, budget: int, top_k: int, normalize: bool,
                  valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """XShare-style routing: choose the batch's set under `budget` (`xshare_select`), then each token
    routes to its top-k inside the set (top-min(k, budget)); softmax scores, normalised when asked.

    logits: [G, T, E]. Returns (ids [G, T, k], weights [G, T, k], chosen [G, E] bool).
    Slots beyond the budget (budget < k) get weight 0.
    """
    probs = torch.softmax(logits.float(), dim=-1)
    chosen = xshare_select(probs, budget, top_k, valid)
    inside = probs.masked_fill(~chosen.unsqueeze(1), -1.0)
    top = inside.topk(top_k, dim=-1)
    w = torch.where(top.values >= 0, top.values, torch.zeros_like(top.values))
    if normalize:
        w = w / w.sum(-1, keepdim=True).clamp(min=1e-12)
    return top.indices, w, chosen


def _non_primary(ids: torch.Tensor, select_top_k: int, num_experts: int,
                 valid: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(primary [G, E] bool, move [G, T, k] bool: valid secondary slots whose expert is not primary)."""
    from sere_dist.core.reroute import primary_mask

    g, t, k = ids.shape
    primary = primary_mask(ids, select_top_k, num_experts, valid)
    is_primary = primary.gather(1, ids.long().reshape(g, -1)).reshape(g, t, k)
    move = ~is_primary
    move[..., :select_top_k] = False
    if valid is not None:
        move &= valid.unsqueeze(-1)
    return primary, move


def drop_secondaries(ids: torch.Tensor, weights: torch.Tensor, select_top_k: int, num_experts: int,
                     valid: torch.Tensor | None = None, renormalize: bool = False) -> torch.Tensor:
    """Drop every valid secondary slot whose expert is not primary (weight 0); the batch then runs
    exactly SERE's primaries at rho = 0. With `renormalize` the token's kept weights are rescaled to
    its original sum.

    ids, weights: [G, T, k] sorted by weight; valid: [G, T]. Returns new weights [G, T, k].
    """
    _, move = _non_primary(ids, select_top_k, num_experts, valid)
    return _drop(weights, ~move, renormalize)


def router_logit_reroute(ids: torch.Tensor, logits: torch.Tensor, select_top_k: int, num_experts: int,
                         valid: torch.Tensor | None = None) -> torch.Tensor:
    """Every valid non-primary secondary slot moves to the primary with the highest router logit for
    this token, among the primaries the token does not already hold (when it holds them all: the
    highest-logit primary overall). Weights unchanged; a token's moved slots take its best such primaries
    in order (the first moved slot the best one), so two moved slots of one token do not collapse.

    ids: [G, T, k]; logits: [G, T, E]; valid: [G, T]. Returns new ids [G, T, k].
    """
    g, t, k = ids.shape
    primary, move = _non_primary(ids, select_top_k, num_experts, valid)
    held = torch.zeros(g, t, num_experts, dtype=torch.bool).scatter_(-1, ids.long(), True)
    score = logits.float().masked_fill(~primary.unsqueeze(1), float("-inf"))
    fresh = score.masked_fill(held, float("-inf"))
    n_fresh = (primary.unsqueeze(1) & ~held).sum(-1, keepdim=True)                 # [G, T, 1]
    order_fresh = fresh.sort(dim=-1, descending=True, stable=True).indices       # fresh primaries first
    best_any = score.argmax(-1, keepdim=True)                                     # [G, T, 1]
    rank = move.long().cumsum(-1) - 1                                             # j-th moved slot of a token
    pick = order_fresh.gather(-1, rank.clamp(min=0))
    pick = torch.where(rank < n_fresh, pick, best_any.expand_as(pick))
    return torch.where(move, pick.to(ids.dtype), ids)


def oracle_reroute(ids: torch.Tensor, outputs: torch.Tensor, select_top_k: int,
                   valid: torch.Tensor | None = None) -> torch.Tensor:
    """Per-slot oracle: every valid non-primary secondary slot (expert e) moves to the primary p whose
    output on this token is closest to e's, argmin_p |f_e(x) - f_p(x)|^2 (lowest id on ties). Weights
    unchanged. It reads the true expert outputs, so no deployable rule that re-routes with the weight
    unchanged can do better slot by slot.

    ids: [G, T, k]; outputs: [G, T, E, H] every expert's output on each token. Returns new ids.
    """
    g, t, k = ids.shape
    num_experts = outputs.shape[2]
    primary, move = _non_primary(ids, select_top_k, num_experts, valid)
    sq = outputs.pow(2).sum(-1)                                                  # [G, T, E]
    own = outputs.gather(2, ids.long().unsqueeze(-1).expand(g, t, k, outputs.shape[-1]))   # [G, T, k, H]
    cross = torch.einsum("gtkh,gteh->gtke", own, outputs)                         # [G, T, k, E]
    dist = sq.gather(2, ids.long()).unsqueeze(-1) + sq.unsqueeze(2) - 2 * cross  # [G, T, k, E]
    dist = dist.masked_fill(~primary[:, None, None, :], float("inf"))
    pick = dist.argmin(-1)
    return torch.where(move, pick.to(ids.dtype), ids)


# ---------------------------------------------------------------------------------------------
# Transforms for sere_dist.eval.fidelity.evaluate

def naive_top_s_transform(num_experts: int, select_top_k: int) -> Transform:
    def fn(layer, ids, w, valid):
        ids, w = naive_top_s(ids, w, select_top_k)
        return ids, w, active_experts(ids, w, valid, num_experts)
    return fn


def naee_transform(num_experts: int, beta: float, renormalize: bool = False) -> Transform:
    def fn(layer, ids, w, valid):
        ids, w = naee_skip(ids, w, beta, renormalize)
        return ids, w, active_experts(ids, w, valid, num_experts)
    return fn


def static_prune_transform(num_experts: int, keep: Mapping[int, torch.Tensor], normalize: bool) -> Transform:
    """keep: layer -> [E] bool kept experts (from `prune_least_used` on calibration usage)."""
    def fn(layer, ids, w, valid, logits):
        k = ids.shape[-1]
        new_ids, new_w = static_prune(logits, keep[layer], k, normalize)
        if new_ids.shape[-1] < k:  # fewer kept experts than k: pad with zero-weight slots
            pad = k - new_ids.shape[-1]
            new_ids = torch.cat([new_ids, new_ids[..., :1].expand(*new_ids.shape[:-1], pad)], -1)
            new_w = torch.cat([new_w, torch.zeros(*new_w.shape[:-1], pad)], -1)
        return new_ids, new_w, active_experts(new_ids, new_w, valid, num_experts)
    fn.wants_logits = True
    return fn


def random_reroute_transform(num_experts: int, select_top_k: int, seed: int = 0) -> Transform:
    gen = torch.Generator().manual_seed(seed)

    def fn(layer, ids, w, valid):
        new = random_reroute(ids, select_top_k, num_experts, valid, gen)
        return new, w, active_experts(new, w, valid, num_experts)
    return fn


def oea_transform(num_experts: int, select_top_k: int, normalize: bool) -> Transform:
    def fn(layer, ids, w, valid, logits):
        new_ids, new_w = oea_piggyback(logits, ids.shape[-1], select_top_k, normalize, valid)
        return new_ids, new_w, active_experts(new_ids, new_w, valid, num_experts)
    fn.wants_logits = True
    return fn


def xshare_transform(num_experts: int, budget: int, normalize: bool) -> Transform:
    def fn(layer, ids, w, valid, logits):
        new_ids, new_w, _ = xshare_budget(logits, budget, ids.shape[-1], normalize, valid)
        return new_ids, new_w, active_experts(new_ids, new_w, valid, num_experts)
    fn.wants_logits = True
    return fn


def drop_transform(num_experts: int, select_top_k: int, renormalize: bool) -> Transform:
    def fn(layer, ids, w, valid):
        w = drop_secondaries(ids, w, select_top_k, num_experts, valid, renormalize)
        return ids, w, active_experts(ids, w, valid, num_experts)
    return fn


def router_logit_transform(num_experts: int, select_top_k: int) -> Transform:
    def fn(layer, ids, w, valid, logits):
        new = router_logit_reroute(ids, logits, select_top_k, num_experts, valid)
        return new, w, active_experts(new, w, valid, num_experts)
    fn.wants_logits = True
    return fn


def error_aware_batched(ids: torch.Tensor, weights: torch.Tensor, scale: torch.Tensor, gain: torch.Tensor,
                        select_top_k: int, threshold: float, valid: torch.Tensor | None = None,
                        unmatched: str = "keep", keep_sum: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """`core.reroute.error_aware` (paper-style choice, no expert_ranks) for all G groups at once: the
    same ids and float32 weights bit for bit, without the per-group loop through `route` (the fidelity
    benchmark calls it on ~64 groups per layer per forward). Input slots must already be ordered by
    weight, largest first (stable), as RoutingPatch hands them over.

    keep_sum (`route`'s keep_sum, SereConfig.keep_sum): the weight a token loses, w (1 - a) of every
    moved slot and w of every dropped one ("drop" and "renorm" coincide here), goes to its kept slots that
    were not moved, rescaled so the token's weights keep their original sum (the substitute carries the
    least-squares share a, the token's own experts the rest).

    ids, weights: [G, T, k]; scale, gain: [E, E]; valid: [G, T]. Returns (new ids, new weights).
    """
    from sere_dist.core.reroute import UNMATCHED, error_aware_slot_weights, paper_table, primary_mask

    if unmatched not in UNMATCHED:
        raise ValueError(f"unknown unmatched {unmatched!r}; use one of {', '.join(UNMATCHED)}")
    g, t, k = ids.shape
    e = gain.shape[0]
    s = min(select_top_k, k)
    v = torch.ones(g, t, dtype=torch.bool, device=ids.device) if valid is None else valid
    w = weights.float()
    if k == s:
        return ids.clone(), w.to(weights.dtype)
    primary = primary_mask(ids, s, e, v)                                                  # [G, E]
    table = paper_table(gain.float(), primary, threshold)[0]                              # [G, E]
    lid = ids.long()
    sec = lid[..., s:]
    new_sec = table.gather(1, sec.reshape(g, -1)).reshape(sec.shape)
    new_sec = torch.where(v.unsqueeze(-1), new_sec, sec)
    new_ids = torch.cat([lid[..., :s], new_sec], dim=-1)                                  # [G, T, k]
    is_sec = (torch.arange(k, device=ids.device) >= s).view(1, 1, k) & v.unsqueeze(-1)
    off = is_sec & ~primary.gather(1, lid.reshape(g, -1)).reshape(g, t, k)
    new_ids, out_w, _ = error_aware_slot_weights(lid, lid, new_ids, w, scale.float(), off, v, unmatched, keep_sum)
    return new_ids.to(ids.dtype), out_w.to(weights.dtype)


def error_aware_transform(stats: Mapping[int, tuple[torch.Tensor, torch.Tensor]], select_top_k: int,
                          threshold: float = 0.0, unmatched: str = "keep",
                          expert_ranks: torch.Tensor | None = None, batched: bool = True,
                          keep_sum: bool = False) -> Transform:
    """The error-aware rule (torch reference, `core.reroute.error_aware`); stats: layer -> (C, N).
    `batched` (no expert_ranks): the same result through `error_aware_batched` (all groups at once);
    `keep_sum`: SereConfig.keep_sum (batched; the per-group path with expert_ranks takes it too)."""
    from sere_dist.core.reroute import error_aware, error_aware_gain

    tables = {layer: error_aware_gain(c, n) for layer, (c, n) in stats.items()}

    def fn(layer, ids, w, valid):
        scale, gain = tables[layer]
        if batched and expert_ranks is None:
            new_ids, new_w = error_aware_batched(ids, w, scale, gain, select_top_k, threshold, valid, unmatched,
                                                 keep_sum)
        else:
            new_ids, new_w = error_aware(ids, w, scale, gain, select_top_k, threshold, valid, unmatched, expert_ranks,
                                         keep_sum)
        return new_ids, new_w, active_experts(new_ids, new_w, valid, gain.shape[0])
    return fn


def oracle_transform(num_experts: int, select_top_k: int) -> Transform:
    """Needs every expert's output: RoutingPatch passes `outputs=[G, T, E, H]` (attribute wants_outputs)."""
    def fn(layer, ids, w, valid, outputs):
        new = oracle_reroute(ids, outputs, select_top_k, valid)
        return new, w, active_experts(new, w, valid, num_experts)
    fn.wants_outputs = True
    return fn


# ---------------------------------------------------------------------------------------------
# Helpers

def _drop(weights: torch.Tensor, keep: torch.Tensor, renormalize: bool) -> torch.Tensor:
    kept = torch.where(keep, weights, torch.zeros_like(weights))
    if not renormalize:
        return kept
    scale = weights.sum(-1, keepdim=True) / kept.sum(-1, keepdim=True).clamp(min=1e-12)
    return kept * scale


def _top_k(probs: torch.Tensor, k: int, normalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    top = probs.topk(k, dim=-1)
    w = top.values
    if normalize:
        w = w / w.sum(-1, keepdim=True).clamp(min=1e-12)
    return top.indices, w
