"""SERE re-routing: pure tensor functions, no host synchronisation, static shapes.

Shapes use G groups (independent batches re-routed separately; G = 1 for a vLLM forward), T tokens
per group, k routed slots per token (sorted by router weight, largest first), E experts, R ranks.

    primary = primary_mask(ids, S, E, valid)            # [G, E]  union of valid tokens' top-S ids
    table   = paper_table(sim, primary, rho)           # [G, E]  e -> e or its most similar primary
    new_ids = ids[..., :S] ++ table[ids[..., S:]]      # secondary slots gathered through the table

`reroute` is the public entry point; `expert_slot_counts` / `used_experts` answer "which experts does a
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
