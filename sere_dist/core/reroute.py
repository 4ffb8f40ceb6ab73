"""SERE re-routing: pure tensor functions, no host synchronisation, static shapes.

Shapes use G groups (independent batches re-routed separately; G = 1 for a vLLM forward), T tokens
per group, k routed slots per token (sorted by router weight, largest first), E experts, R ranks.

    primary = primary_mask(ids, S, E, valid)            # [G, E]  union of valid tokens' top-S ids
    table   = paper_table(sim, primary, rho)           # [G, E]  e -> e or its most similar primary
    new_ids = ids[..., :S] ++ table[ids[..., S:]]      # secondary slots gathered through the table

`reroute` is the re-routing rule on weight-ordered ids; `route` is the whole per-layer hook of the vLLM
plugin on the router's raw outputs (order by weight, apply the rule, top-S or merge the weights, restore
the slot order, count) and the spec of the native op `sere_dist::route`; `expert_slot_counts` / `used_experts` answer "which experts does a
batch use" for every caller (the vLLM plugin's counters, fidelity, the baselines). The two variants (the paper's rule and our rank-aware rule)
differ only in how the secondary slots are chosen (`_choose_paper` / `_choose_rank_aware`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class RerouteStats:
    """Per-group counts, each a [G] int64 tensor (kept on device: reading them is the caller's sync).

    experts_before: distinct experts the valid tokens use before re-routing.
    experts_after: distinct experts after (primary + kept critical).
    primary: size of the primary set.
    rerouted_slots: secondary slots whose expert id changed.
    critical: distinct non-primary experts kept because no primary passed rho.
    """

    experts_before: torch.Tensor
    experts_after: torch.Tensor
    primary: torch.Tensor
    rerouted_slots: torch.Tensor
    critical: torch.Tensor

    def as_dict(self) -> dict[str, list[int]]:
        return {k: v.tolist() for k, v in self.__dict__.items()}


def expert_slot_counts(ids: torch.Tensor, num_experts: int, use: torch.Tensor | None = None) -> torch.Tensor:
    """[G, N] or [G, T, k] expert ids (+ `use`, same shape, bool or int weight per slot) -> [G, E] int32:
    how many used slots of each group chose each expert. No host synchronisation."""
    g = ids.shape[0]
    flat = ids.long().reshape(g, -1)
    w = torch.ones_like(flat, dtype=torch.int32) if use is None else use.to(torch.int32).reshape(g, -1)
    return torch.zeros(g, num_experts, dtype=torch.int32, device=ids.device).scatter_add_(1, flat, w)


def used_experts(ids: torch.Tensor, num_experts: int, use: torch.Tensor | None = None) -> torch.Tensor:
    """[G, E] bool: the experts a group's used slots run (see `expert_slot_counts`)."""
    return expert_slot_counts(ids, num_experts, use) > 0


def primary_mask(topk_ids: torch.Tensor, select_top_k: int, num_experts: int,
                 valid: torch.Tensor | None = None) -> torch.Tensor:
    """[G, T, k] ids (+ [G, T] bool valid) -> [G, E] bool: experts in some valid token's top-S."""
    g = topk_ids.shape[0]
    sel = topk_ids[..., :select_top_k].long().reshape(g, -1)
    return used_experts(sel, num_experts, _slot_weights(valid, topk_ids.shape[:2], select_top_k, topk_ids.device))


def paper_table(sim: torch.Tensor, primary: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's per-batch decision table.

    sim: [E, E] similarity; primary: [G, E] bool.
    Returns (table [G, E] int64, best_sim [G, E]): table[e] = e when e is primary or when its most
    similar primary p* (lowest id on ties) has sim[e, p*] < rho; otherwise p*.
    """
    masked = sim.unsqueeze(0).masked_fill(~primary.unsqueeze(1), float("-inf"))  # [G, E, E]
    best = masked.argmax(dim=-1)                                                   # first max on ties
    best_sim = masked.gather(-1, best.unsqueeze(-1)).squeeze(-1)
    eye = torch.arange(sim.shape[0], device=sim.device).expand_as(best)
    move = (~primary) & (best_sim >= threshold)
    return torch.where(move, best, eye), best_sim


def reroute(topk_ids: torch.Tensor, sim: torch.Tensor, select_top_k: int, threshold: float,
            valid: torch.Tensor | None = None, *, expert_ranks: torch.Tensor | None = None,
            with_stats: bool = True) -> tuple[torch.Tensor, RerouteStats | None]:
    """Re-route the secondary slots of a batch (weights are left untouched, as in the paper).

    topk_ids: [T, k] or [G, T, k] integer expert ids, ordered by routing weight.
    sim: [E, E] float similarity matrix of this layer.
    valid: optional [T] / [G, T] bool; False marks padding (or tokens not to re-route): they neither
        contribute primaries nor get re-routed.
    expert_ranks: optional [E, R] bool placement (expert e hosted on rank r). When given, the
        rank-aware rule is used: among primaries passing rho, prefer one on a rank the token already
        visits through its own top-S experts, else fall back to the paper's choice.
    Returns (new_ids with the input's shape and dtype, stats or None).
    """
    sim = sim.float()  # rho is compared in float32 whatever the stored dtype (as the native kernels do)
    squeeze = topk_ids.dim() == 2
    ids = topk_ids.unsqueeze(0) if squeeze else topk_ids
    if valid is not None and squeeze:
        valid = valid.unsqueeze(0)
    g, t, k = ids.shape
    num_experts = sim.shape[0]
    s = min(select_top_k, k)
    primary = primary_mask(ids, s, num_experts, valid)
    sec = ids[..., s:].long()                                                     # [G, T, k-S]
    if k == s:
        new_sec = sec
    elif expert_ranks is None:
        new_sec = _choose_paper(sec, sim, primary, threshold)
    else:
        new_sec = _choose_rank_aware(sec, ids[..., :s].long(), sim, primary, threshold, expert_ranks)
    if valid is not None:
        new_sec = torch.where(valid.unsqueeze(-1), new_sec, sec)
    new_ids = torch.cat([ids[..., :s], new_sec.to(ids.dtype)], dim=-1)
    stats = _stats(ids, new_ids, sec, new_sec, primary, valid, num_experts) if with_stats else None
    return (new_ids.squeeze(0) if squeeze else new_ids), stats


RULES = ("paper", "rank_aware", "top_s")
RULE_IDS = {name: i for i, name in enumerate(RULES)}      # the `rule` int of the native op
# route()'s counts, in the order of sere_dist.engine.stats.COUNTERS
COUNTS = ("distinct_experts_before", "distinct_experts_after", "rerouted_slots", "batches", "tokens")


def route(topk_ids: torch.Tensor, topk_weights: torch.Tensor, sim: torch.Tensor, select_top_k: int,
          threshold: float, valid: torch.Tensor | None = None, *, rule: str = "paper",
          expert_ranks: torch.Tensor | None = None, merge_duplicates: bool = False,
          scale: torch.Tensor | None = None, unmatched: str = "keep",
          keep_sum: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One MoE layer's routing hook for one batch, on the router's outputs in their own slot order.

    topk_ids: [T, k] int32/int64; topk_weights: [T, k] float (any slot order); sim: [E, E];
    valid: [T] bool or None (all tokens); rule: "paper" | "rank_aware" (needs expert_ranks [E, R] bool)
    | "top_s".
    1. order each token's slots by weight, largest first (stable: ties keep slot order);
    2. "paper" / "rank_aware": `reroute` the ordered ids (weights unchanged); "top_s": every valid
       token keeps its first S slots and the others get weight 0, the kept ones rescaled to the
       original sum (`top_s_weights`);
    2b. error-aware (`scale` [E, E] float32 given, with `sim` the gain matrix and `threshold` the gain
       threshold; rule "paper" or "rank_aware"): a secondary slot of a non-primary expert e moved to p
       gets weight w * scale[e, p]; one left on e (no primary passed the threshold: "unmatched") is
       kept (`unmatched` "keep"), or dropped ("drop": weight 0 and the id of the token's first ordered
       slot, a primary, so that no expert is read for it), or dropped with the token's other slots
       rescaled by sum(w) / max(sum(w of slots not dropped), 1e-12) ("renorm"; sums of the router's
       weights, slot by slot left to right, as top_s); with `keep_sum` (replaces renorm) every valid
       token's slots neither moved nor dropped ("own") get w * r instead, r = max((sum(w) - sum of the
       moved slots' scaled weights) / max(sum(own w), 1e-12), 0), sums left to right: what the token
       lost goes to its own experts and its weights keep their sum;
    3. merge_duplicates: a valid token holding one expert in several kept slots gets their weights
       summed into the first of them (`merge_duplicate_slots`);
    4. restore the slot order.
    Returns (ids [T, k] same dtype, weights [T, k] same dtype, counts [5] int64 in `COUNTS` order):
    distinct experts of the valid tokens' slots before; after, over the slots the rule keeps (a slot
    dropped by top_s or merged away does not count); valid slots whose id changed or that top_s dropped;
    1 if any token is valid; valid tokens. Weights are computed in float32 and rounded once.
    """
    if rule not in RULE_IDS:
        raise ValueError(f"unknown rule {rule!r}; use one of {', '.join(RULES)}")
    if rule == "rank_aware" and expert_ranks is None:
        raise ValueError("rule='rank_aware' needs expert_ranks")
    if unmatched not in UNMATCHED_IDS:
        raise ValueError(f"unknown unmatched {unmatched!r}; use one of {', '.join(UNMATCHED)}")
    if scale is not None and rule == "top_s":
        raise ValueError("scale (the error-aware rule) needs rule 'paper' or 'rank_aware'")
    t, k = topk_ids.shape
    num_experts = sim.shape[0]
    s = min(select_top_k, k)
    v = torch.ones(t, dtype=torch.bool, device=topk_ids.device) if valid is None else valid
    order = torch.sort(topk_weights, dim=-1, descending=True, stable=True).indices
    ids = topk_ids.gather(1, order)
    w = topk_weights.gather(1, order).float()
    kept = torch.ones(t, k, dtype=torch.bool, device=ids.device)
    if rule == "top_s":
        new_ids = ids
        w, kept = top_s_weights(w, s, v)
    else:
        new_ids = reroute(ids, sim, s, threshold, v, expert_ranks=expert_ranks if rule == "rank_aware" else None,
                          with_stats=False)[0]
        if scale is not None:
            new_ids, w, kept = _error_aware_weights(ids, new_ids, w, scale, s, v, unmatched, keep_sum)
    changed = (new_ids != ids) | ~kept
    if merge_duplicates:
        w, kept = merge_duplicate_slots(new_ids, w, v, kept)
    out_ids = torch.empty_like(topk_ids).scatter_(1, order, new_ids)
    out_w = torch.empty_like(topk_weights).scatter_(1, order, w.to(topk_weights.dtype))
    use = v.unsqueeze(-1).expand(t, k)
    before = used_experts(ids.unsqueeze(0), num_experts, use.unsqueeze(0)).sum()
    after = used_experts(new_ids.unsqueeze(0), num_experts, (use & kept).unsqueeze(0)).sum()
    n_valid = v.sum()
    counts = torch.stack([before, after, (changed & use).sum(), (n_valid > 0).long(), n_valid]).to(torch.int64)
    return out_ids, out_w, counts


UNMATCHED = ("keep", "drop", "renorm")
UNMATCHED_IDS = {name: i for i, name in enumerate(UNMATCHED)}   # the `unmatched` int of the native op
KEEP_SUM_FLAG = 4                                                # or-ed into it for keep_sum


def _error_aware_weights(ids: torch.Tensor, new_ids: torch.Tensor, w: torch.Tensor, scale: torch.Tensor,
                         select_top_k: int, valid: torch.Tensor, unmatched: str,
                         keep_sum: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Step 2b of `route` on weight-ordered [T, k] ids before / after the table, float32 weights and
    [T] valid. Returns (ids, weights, kept)."""
    k = ids.shape[-1]
    e = scale.shape[0]
    primary = primary_mask(ids.unsqueeze(0), select_top_k, e, valid.unsqueeze(0))[0]          # [E]
    sec = (torch.arange(k, device=ids.device) >= select_top_k).unsqueeze(0) & valid.unsqueeze(-1)
    inside = (ids >= 0) & (ids < e)
    safe = ids.long().clamp(0, e - 1)
    off = sec & inside & ~primary[safe]                       # secondary slots of non-primary experts
    return error_aware_slot_weights(safe, ids, new_ids, w, scale, off, valid, unmatched, keep_sum)


def error_aware_slot_weights(safe_ids: torch.Tensor, ids: torch.Tensor, new_ids: torch.Tensor, w: torch.Tensor,
                             scale: torch.Tensor, off: torch.Tensor, valid: torch.Tensor, unmatched: str,
                             keep_sum: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The weights of step 2b on [..., k] weight-ordered slots: `off` marks the valid secondary slots of
    non-primary experts, `ids` / `new_ids` the ids before / after the table (`safe_ids`: ids clamped
    into [0, E)), `w` float32, `valid` [...]. Returns (ids, weights, kept); every sum runs slot by slot,
    left to right, as the native kernels do."""
    moved = off & (new_ids != ids)
    a = scale[safe_ids, new_ids.long().clamp(0, scale.shape[0] - 1)]
    out_w = torch.where(moved, w * a, w)
    kept = torch.ones_like(off)
    drop = torch.zeros_like(off)
    if unmatched != "keep":
        drop = off & (new_ids == ids)
        new_ids = torch.where(drop, new_ids[..., :1].expand_as(new_ids), new_ids)
        out_w = torch.where(drop, torch.zeros_like(out_w), out_w)
        kept = ~drop
    if keep_sum:
        own = ~moved & ~drop
        total, part = _sum_left_to_right(w), _sum_left_to_right(w, own)
        lost = _sum_left_to_right(out_w, moved)
        r = ((total - lost) / part.clamp(min=1e-12)).clamp(min=0.0)
        return new_ids, torch.where(valid.unsqueeze(-1) & own, w * r.unsqueeze(-1), out_w), kept
    if unmatched == "renorm":
        r = _sum_left_to_right(w) / _sum_left_to_right(w, kept).clamp(min=1e-12)
        out_w = torch.where(valid.unsqueeze(-1) & kept, out_w * r.unsqueeze(-1), out_w)
    return new_ids, out_w, kept


def _sum_left_to_right(x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Sum over the last dim slot by slot (x0 + x1 + ...), masked-out slots adding 0.0: the order the
    native kernels sum in, so the results agree bit for bit."""
    zero = torch.zeros_like(x[..., 0])
    out = x[..., 0].clone() if mask is None else torch.where(mask[..., 0], x[..., 0], zero)
    for j in range(1, x.shape[-1]):
        out = out + (x[..., j] if mask is None else torch.where(mask[..., j], x[..., j], zero))
    return out


def top_s_weights(weights: torch.Tensor, select_top_k: int,
                  valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Naive top-S on [T, k] float32 weights ordered largest first: a valid token keeps slots 0..S-1,
    rescaled by sum(all) / max(sum(kept), 1e-12), and the others get 0 (as
    `sere_dist.eval.baselines.naive_top_s`). Sums run slot by slot, left to right, so the native kernels
    can reproduce them bit for bit. Returns (weights [T, k] float32, kept [T, k] bool)."""
    t, k = weights.shape
    kept = (torch.arange(k, device=weights.device) < select_top_k).expand(t, k) | ~valid.unsqueeze(-1)
    total = weights[:, 0].clone()
    for j in range(1, k):
        total = total + weights[:, j]
    part = weights[:, 0].clone()
    for j in range(1, min(select_top_k, k)):
        part = part + weights[:, j]
    scale = total / part.clamp(min=1e-12)
    out = torch.where(kept, weights * scale.unsqueeze(-1), torch.zeros_like(weights))
    return torch.where(valid.unsqueeze(-1), out, weights), kept


def merge_duplicate_slots(ids: torch.Tensor, weights: torch.Tensor, valid: torch.Tensor,
                          kept: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A valid token that holds expert e in several kept slots: the first of them (in slot order)
    gets their summed weight (added left to right), the later ones weight 0 and kept False; their
    ids stay, so any MoE backend runs them harmlessly. [T, k] ids, float32 weights, [T] valid,
    [T, k] kept -> (weights, kept)."""
    t, k = ids.shape
    w, kept = weights.clone(), kept.clone()
    rows = torch.arange(t, device=ids.device)
    for j in range(1, k):
        same = (ids[:, :j] == ids[:, j:j + 1]) & kept[:, :j]               # earlier kept copies of slot j
        dup = same.any(1) & valid & kept[:, j]
        first = same.to(torch.int8).argmax(1)                              # the first copy
        w[rows, first] = torch.where(dup, w[rows, first] + w[:, j], w[rows, first])
        w[:, j] = torch.where(dup, torch.zeros_like(w[:, j]), w[:, j])
        kept[:, j] = kept[:, j] & ~dup
    return w, kept


def error_aware_gain(c: torch.Tensor, n: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Least-squares substitution statistics of one layer from its routed-token statistics.

    c[e, p] = sum over tokens routed to e of q <f_e, f_p>; n[e, p] = the same sum of q |f_p|^2 (q = 1 or
    the router weight). Replacing w f_e(x) by w a f_p(x) with a = c / n leaves, of e's routed output
    energy c[e, e], the share 1 - g with g = c^2 / (n c[e, e]) in [0, 1]: g = 0 is no better than
    dropping the slot (a = 0), g = 1 an exact substitute. Returns (scale a [E, E], gain g [E, E]) in
    float32; entries without data (n = 0 or c[e, e] = 0) get a = 0, g = 0.
    """
    c, n = c.double(), n.double()
    own = torch.diagonal(c).unsqueeze(1)                                           # [E, 1]
    ok = (n > 0) & (own > 0)
    scale = torch.where(ok, c / n.clamp(min=1e-300), torch.zeros_like(c))
    gain = torch.where(ok, c * c / (n * own).clamp(min=1e-300), torch.zeros_like(c)).clamp(0.0, 1.0)
    return scale.float(), gain.float()


def error_aware(topk_ids: torch.Tensor, topk_weights: torch.Tensor, scale: torch.Tensor, gain: torch.Tensor,
                select_top_k: int, threshold: float, valid: torch.Tensor | None = None,
                unmatched: str = "keep", expert_ranks: torch.Tensor | None = None,
                keep_sum: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Error-aware re-routing of weight-ordered [G, T, k] ids and weights, group by group through
    `route` (step 2b; rank-aware choice of the primary when `expert_ranks` [E, R] is given): a valid
    secondary slot of a non-primary expert e moves to the primary p* (the paper's table on the gain) with its
    weight times scale[e, p*], or is kept / dropped / dropped with renormalisation (`unmatched`) when
    no primary reaches the gain threshold. Returns (new ids, new weights), input shapes and dtypes.
    """
    g, t, k = topk_ids.shape
    out_ids, out_w = torch.empty_like(topk_ids), torch.empty_like(topk_weights)
    scale32 = scale.float()
    gain32 = gain.float()
    for i in range(g):
        out_ids[i], out_w[i], _ = route(topk_ids[i], topk_weights[i], gain32, select_top_k, threshold,
                                        None if valid is None else valid[i],
                                        rule="paper" if expert_ranks is None else "rank_aware",
                                        expert_ranks=expert_ranks, scale=scale32, unmatched=unmatched,
                                        keep_sum=keep_sum)
    return out_ids, out_w


def _choose_paper(sec: torch.Tensor, sim: torch.Tensor, primary: torch.Tensor, threshold: float) -> torch.Tensor:
    """[G, T, k-S] secondary ids -> re-routed ids through the per-batch table."""
    table, _ = paper_table(sim, primary, threshold)
    g = sec.shape[0]
    return table.gather(1, sec.reshape(g, -1)).reshape(sec.shape)


def rank_table(sim: torch.Tensor, primary: torch.Tensor, threshold: float,
               expert_ranks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Best passing primary per (expert, rank).

    Returns (idx [G, E, R] int64, val [G, E, R]): for expert e and rank r, the most similar primary
    hosted on r with sim >= rho (lowest id on ties), val = -inf when there is none.
    """
    passing = primary.unsqueeze(1) & (sim.unsqueeze(0) >= threshold)           # [G, E, E]
    cand = sim.unsqueeze(0).masked_fill(~passing, float("-inf"))                # [G, E, E]
    # [G, E, R, E]: candidates restricted to each rank's experts.
    per_rank = cand.unsqueeze(2).masked_fill(~expert_ranks.t().unsqueeze(0).unsqueeze(0), float("-inf"))
    idx = per_rank.argmax(dim=-1)
    val = per_rank.gather(-1, idx.unsqueeze(-1)).squeeze(-1)
    return idx, val


def _choose_rank_aware(sec: torch.Tensor, top: torch.Tensor, sim: torch.Tensor, primary: torch.Tensor,
                       threshold: float, expert_ranks: torch.Tensor) -> torch.Tensor:
    """Rank-aware rule: prefer a passing primary on a rank the token's top-S experts already visit."""
    g, t, n_sec = sec.shape
    table, _ = paper_table(sim, primary, threshold)
    fallback = table.gather(1, sec.reshape(g, -1)).reshape(sec.shape)          # paper's choice
    idx, val = rank_table(sim, primary, threshold, expert_ranks)               # [G, E, R]
    visited = expert_ranks[top].any(dim=2)                                     # [G, T, R]
    r = expert_ranks.shape[1]
    flat = sec.reshape(g, -1)
    slot_val = val.gather(1, flat.unsqueeze(-1).expand(-1, -1, r)).reshape(g, t, n_sec, r)
    slot_idx = idx.gather(1, flat.unsqueeze(-1).expand(-1, -1, r)).reshape(g, t, n_sec, r)
    slot_val = slot_val.masked_fill(~visited.unsqueeze(2), float("-inf"))
    best_r = slot_val.argmax(dim=-1, keepdim=True)                             # lowest rank on ties
    local = slot_idx.gather(-1, best_r).squeeze(-1)
    has_local = slot_val.gather(-1, best_r).squeeze(-1) > float("-inf")
    is_primary = primary.gather(1, flat).reshape(sec.shape)
    return torch.where(has_local & ~is_primary, local, fallback)


def _slot_weights(valid: torch.Tensor | None, gt: torch.Size, slots: int, device) -> torch.Tensor:
    g, t = gt
    if valid is None:
        return torch.ones(g, t * slots, dtype=torch.int32, device=device)
    return valid.to(torch.int32).unsqueeze(-1).expand(g, t, slots).reshape(g, -1)


def _stats(ids, new_ids, sec, new_sec, primary, valid, num_experts) -> RerouteStats:
    g, t, k = ids.shape
    w = _slot_weights(valid, ids.shape[:2], k, ids.device)
    before = used_experts(ids.long().reshape(g, -1), num_experts, w).sum(1)
    after = used_experts(new_ids.long().reshape(g, -1), num_experts, w).sum(1)
    n_primary = primary.sum(1)
    changed = new_sec != sec
    if valid is not None:
        changed = changed & valid.unsqueeze(-1)
    return RerouteStats(experts_before=before.long(), experts_after=after.long(), primary=n_primary.long(),
                        rerouted_slots=changed.reshape(g, -1).sum(1).long(),
                        critical=(after - n_primary).long())


def per_slot_scan(topk_ids: torch.Tensor, sim: torch.Tensor, select_top_k: int, threshold: float,
                  valid: torch.Tensor | None = None) -> torch.Tensor:
    """The paper's kernel shape in torch: every secondary slot scans all E experts independently.

    [T, k] ids -> [T, k] ids. O(T * (k - S) * E) work and memory; kept as the benchmark baseline.
    """
    t, k = topk_ids.shape
    s = min(select_top_k, k)
    primary = primary_mask(topk_ids.unsqueeze(0), s, sim.shape[0],
                           None if valid is None else valid.unsqueeze(0))[0]
    sec = topk_ids[:, s:].long()
    rows = sim[sec]                                                             # [T, k-S, E]
    rows = rows.masked_fill(~primary, float("-inf"))
    best = rows.argmax(-1)
    best_sim = rows.gather(-1, best.unsqueeze(-1)).squeeze(-1)
    move = ~primary[sec] & (best_sim >= threshold)
    if valid is not None:
        move = move & valid.unsqueeze(-1)
    new_sec = torch.where(move, best, sec)
    return torch.cat([topk_ids[:, :s], new_sec.to(topk_ids.dtype)], dim=1)


def expert_ranks_for(num_experts: int, ep_size: int, placement: str = "linear",
                     logical_to_physical: torch.Tensor | None = None,
                     num_physical: int | None = None) -> torch.Tensor:
    """[E, R] bool placement mask for vLLM's expert placements.

    linear: rank r hosts the contiguous block [r*E/R, (r+1)*E/R) (vLLM's default, remainder on the
        first ranks); round_robin: expert e on rank e % R; eplb: `logical_to_physical` [E, max_replicas]
        (-1 = none) with `num_physical` physical slots split linearly over ranks.
    """
    out = torch.zeros(num_experts, ep_size, dtype=torch.bool)
    if placement == "eplb":
        if logical_to_physical is None or num_physical is None:
            raise ValueError("placement='eplb' needs logical_to_physical and num_physical")
        per = num_physical // ep_size
        for e in range(num_experts):
            for p in logical_to_physical[e].tolist():
                if p >= 0:
                    out[e, min(p // per, ep_size - 1)] = True
        return out
    if placement == "round_robin":
        out[torch.arange(num_experts), torch.arange(num_experts) % ep_size] = True
        return out
    if placement != "linear":
        raise ValueError(f"unknown expert placement {placement!r}; use linear, round_robin or eplb")
    base, rem = divmod(num_experts, ep_size)
    start = 0
    for r in range(ep_size):
        n = base + (1 if r < rem else 0)
        out[start:start + n, r] = True
        start += n
    return out
