"""All-to-all traffic model for expert-parallel MoE: bytes one MoE layer moves per forward step.

Inputs are routing decisions and a placement, never kernels: this module only counts. Shapes use
T tokens (all data-parallel ranks together), k routed slots per token, E logical experts, P physical
expert slots (P = E without EPLB redundancy), R expert-parallel ranks.

    topk_ids   [T, k] int   expert ids per slot, -1 = slot masked out
    weights    [T, k] float optional routing weights: a slot of weight 0 (dropped) sends nothing
    src_rank   [T]    int   data-parallel rank that holds the token (where its output must return)
    slot_rank  [E]/[P] int  rank hosting each (physical) expert; `placement_ranks` builds it

`traffic(...)` counts one backend; `compare_rerouting(...)` runs SERE on each rank's local batch
(the router runs on the token's own rank, before the dispatch) and counts before and after; given
the routing weights and an error-aware table (`ErrorAware`) it adds the error-aware rule alone and
composed with the rank-aware choice.

Bytes are the payload that crosses from one rank to another; what stays on the token's own rank is
counted separately as local. Small bookkeeping exchanges (per-rank token counts, handles, layout
metadata) are not counted. The rule each backend follows is in `traffic`'s docstring; `Wire` holds
the element sizes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

BACKENDS = ("allgather_reducescatter", "deepep_high_throughput", "deepep_low_latency")


@dataclass(frozen=True)
class Wire:
    """Element sizes on the wire (bytes).

    hidden_size: H. act_bytes: hidden-state element (2 = bf16). dispatch_fp8: DeepEP dispatches FP8
    activations (1 byte each) plus one float32 scale per `scale_block` elements (vLLM does this for
    block-quantized models and for DeepEP LL with `use_fp8_dispatch`). combine is always act_bytes.
    id_bytes / weight_bytes: top-k id and weight elements as each backend ships them (AgRs: vLLM's
    int32 ids and float32 weights; DeepEP HT: int64 `topk_idx`, float32 weights).
    ll_header_bytes: DeepEP LL per-message header (one int4 = 16 bytes with the source token index).
    """

    hidden_size: int
    act_bytes: int = 2
    dispatch_fp8: bool = False
    scale_block: int = 128
    agrs_id_bytes: int = 4
    agrs_weight_bytes: int = 4
    ht_id_bytes: int = 8
    ht_weight_bytes: int = 4
    ll_header_bytes: int = 16

    def hidden_dispatch(self) -> int:
        """Bytes of one token's hidden state as DeepEP dispatches it."""
        if self.dispatch_fp8:
            return self.hidden_size + -(-self.hidden_size // self.scale_block) * 4
        return self.hidden_size * self.act_bytes

    def hidden_combine(self) -> int:
        return self.hidden_size * self.act_bytes


@dataclass
class TrafficReport:
    """Counts for one MoE layer and one forward step (all ranks together).

    tokens: T (valid tokens). slots: valid (token, slot) pairs.
    rank_pairs: distinct (token, destination rank) pairs, own rank included.
    remote_pairs: those whose destination is not the token's own rank.
    messages / local_messages: dispatch messages crossing ranks / staying on the source rank, in the
        backend's unit (token per rank for AgRs and HT, token per slot for LL).
    dispatch_bytes, combine_bytes: payload crossing ranks; total_bytes is their sum.
    rank_slots: [R] (token, expert) rows each rank's experts compute; max_rank_slots and
        imbalance (max / mean) summarise it. rank_tokens: [R] distinct tokens each rank receives.
    """

    backend: str
    tokens: int
    slots: int
    rank_pairs: int
    remote_pairs: int
    messages: int
    local_messages: int
    dispatch_bytes: int
    combine_bytes: int
    total_bytes: int
    rank_slots: list[int]
    rank_tokens: list[int]
    max_rank_slots: int
    imbalance: float

    def as_dict(self) -> dict:
        return asdict(self)


def placement_ranks(expert_ranks: torch.Tensor) -> torch.Tensor:
    """[E, R] bool placement (from `reroute.expert_ranks_for`) -> [E] int64 hosting rank.

    Each expert must live on exactly one rank here; with EPLB replicas map logical ids to physical
    slots first (`eplb_physical_ids`) and place the physical slots.
    """
    per = expert_ranks.sum(dim=1)
    if not bool((per == 1).all()):
        bad = torch.nonzero(per != 1).flatten().tolist()
        raise ValueError(f"experts {bad} are not hosted on exactly one rank; map EPLB replicas to physical "
                         f"slots with eplb_physical_ids() and place those")
    return expert_ranks.to(torch.int64).argmax(dim=1)


def eplb_physical_ids(topk_ids: torch.Tensor, logical_to_physical: torch.Tensor,
                      replica_count: torch.Tensor) -> torch.Tensor:
    """Logical [T, k] ids -> physical slot ids the way vLLM 0.32's EPLB map picks a replica.

    logical_to_physical: [E, max_replicas] (-1 = unused); replica_count: [E]. The replica index is a
    Knuth multiplicative hash of the token position modulo the expert's replica count, so a token's
    slots of one expert always land on the same replica. -1 slots stay -1.
    """
    t, k = topk_ids.shape
    ids = topk_ids.long()
    safe = ids.clamp(min=0)
    token = torch.arange(t, dtype=torch.int64).unsqueeze(1).expand(t, k)
    hashed = (token * 2654435769) & 0xFFFFFFFF
    replica = hashed % replica_count.long()[safe].clamp(min=1)
    phys = logical_to_physical.long()[safe, replica]
    return torch.where(ids >= 0, phys, torch.full_like(phys, -1))


def linear_slot_ranks(num_physical: int, num_ranks: int) -> torch.Tensor:
    """[P] rank of each physical slot when P slots are split in equal contiguous blocks (EPLB)."""
    if num_physical % num_ranks:
        raise ValueError(f"{num_physical} physical experts do not divide over {num_ranks} ranks")
    return torch.arange(num_physical) // (num_physical // num_ranks)


def traffic(topk_ids: torch.Tensor, src_rank: torch.Tensor, slot_rank: torch.Tensor, num_ranks: int,
            backend: str, wire: Wire, valid: torch.Tensor | None = None,
            weights: torch.Tensor | None = None) -> TrafficReport:
    """Count one MoE layer's dispatch + combine for one backend.

    The rule each backend follows (vLLM 0.32 managers in `distributed/device_communicators/all2all.py`):

    allgather_reducescatter (vLLM's default; the only one on CPU): dispatch all-gathers every rank's
        hidden states, top-k weights and top-k ids, so each token goes to every other rank whatever
        its routing: (R-1) * (H*act + k*(id+weight)) bytes per token. Combine reduce-scatters the
        [T, H] partial outputs: (R-1) * H*act per token. Routing changes no byte, only expert work.
    deepep_high_throughput (DeepEP normal kernels): a token is sent once to each rank that hosts at
        least one of its experts, with its hidden state (bf16, or FP8 + scales) and its top-k ids and
        weights; combine returns one summed hidden state (act dtype) per such rank. Bytes scale with
        distinct (token, remote rank) pairs, so putting a token's experts on fewer ranks saves bytes.
    deepep_low_latency (DeepEP LL kernels): one message per (token, slot) into that expert's receive
        buffer: header + hidden (bf16, or FP8 + scales); combine sends one act-dtype hidden state back
        per (token, slot). Two slots on the same rank cost two messages; duplicate slots (two slots
        re-routed to one expert) also cost two. Bytes scale with remote slots.

    topk_ids: [T, k] (physical ids when slot_rank is physical); src_rank: [T]; slot_rank: [E or P];
    valid: optional [T] bool, False = padding (sends nothing).
    weights: optional [T, k] routing weights. A slot of weight 0 (a slot the error-aware rule dropped,
        or moved with scale 0) is not a destination under DeepEP HT / LL: the model assumes the hook
        hands DeepEP id -1 for it (DeepEP skips -1 in `topk_idx`), so it sends nothing, adds no rank
        pair and no expert row; allgather-reducescatter still ships every token (and all k ids and
        weights). Without weights every slot with id >= 0 counts.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown all-to-all backend {backend!r}; modelled: {', '.join(BACKENDS)}")
    t, k = topk_ids.shape
    ids = topk_ids.long()
    src = src_rank.long()
    if t and (int(src.min()) < 0 or int(src.max()) >= num_ranks):
        raise ValueError(f"src_rank values must be in [0, {num_ranks})")
    tok_ok = torch.ones(t, dtype=torch.bool) if valid is None else valid.bool()
    slot_ok = (ids >= 0) & tok_ok.unsqueeze(1)                                      # [T, k]
    if weights is not None:
        if weights.shape != topk_ids.shape:
            raise ValueError(f"weights {list(weights.shape)} must match topk_ids {list(topk_ids.shape)}")
        slot_ok = slot_ok & (weights != 0)                                          # dropped: no destination
    dst = slot_rank.long()[ids.clamp(min=0)]                                       # [T, k]
    ranks = torch.arange(num_ranks)
    hit = (dst.unsqueeze(-1) == ranks) & slot_ok.unsqueeze(-1)                     # [T, k, R]
    pairs = hit.any(dim=1)                                                         # [T, R]
    own = ranks.unsqueeze(0) == src.unsqueeze(1)                                   # [T, R]
    remote = pairs & ~own
    remote_slots = int((slot_ok & (dst != src.unsqueeze(1))).sum())
    n_slots = int(slot_ok.sum())
    n_tokens = int(tok_ok.sum())
    rank_slots = hit.sum(dim=(0, 1))
    rank_tokens = pairs.sum(dim=0)

    if backend == "allgather_reducescatter":
        messages = n_tokens * (num_ranks - 1)
        local = n_tokens
        dispatch = messages * (wire.hidden_size * wire.act_bytes + k * (wire.agrs_id_bytes + wire.agrs_weight_bytes))
        combine = messages * wire.hidden_combine()
    elif backend == "deepep_high_throughput":
        messages = int(remote.sum())
        local = int((pairs & own).sum())
        dispatch = messages * (wire.hidden_dispatch() + k * (wire.ht_id_bytes + wire.ht_weight_bytes))
        combine = messages * wire.hidden_combine()
    else:
        messages = remote_slots
        local = n_slots - remote_slots
        dispatch = messages * (wire.ll_header_bytes + wire.hidden_dispatch())
        combine = messages * wire.hidden_combine()
    mean = float(rank_slots.float().mean()) if num_ranks else 0.0
    return TrafficReport(backend=backend, tokens=n_tokens, slots=n_slots, rank_pairs=int(pairs.sum()),
                         remote_pairs=int(remote.sum()), messages=messages, local_messages=local,
                         dispatch_bytes=dispatch, combine_bytes=combine, total_bytes=dispatch + combine,
                         rank_slots=rank_slots.tolist(), rank_tokens=rank_tokens.tolist(),
                         max_rank_slots=int(rank_slots.max()) if num_ranks else 0,
                         imbalance=(float(rank_slots.max()) / mean) if mean > 0 else 0.0)


def reroute_per_rank(topk_ids: torch.Tensor, src_rank: torch.Tensor, num_ranks: int, sim: torch.Tensor,
                     select_top_k: int, threshold: float, expert_ranks: torch.Tensor | None = None,
                     valid: torch.Tensor | None = None) -> torch.Tensor:
    """SERE applied to each data-parallel rank's own tokens (its router's batch): [T, k] -> [T, k].

    expert_ranks: [E, R] bool placement; given, the rank-aware rule is used, else the paper's rule.
    """
    from sere_dist.core.reroute import reroute

    out = topk_ids.clone()
    for r in range(num_ranks):
        idx = torch.nonzero(src_rank == r).flatten()
        if idx.numel() == 0:
            continue
        v = None if valid is None else valid[idx]
        new, _ = reroute(topk_ids[idx], sim, select_top_k, threshold, v, expert_ranks=expert_ranks,
                         with_stats=False)
        out[idx] = new
    return out


@dataclass(frozen=True)
class ErrorAware:
    """One layer's error-aware table inputs (`core.reroute.error_aware_gain(C, N)`) and settings.

    scale, gain: [E, E] float32; threshold: gain threshold; unmatched: the `unmatched` modes to count
    (each gives an arm alone and one composed with the rank-aware choice).
    """

    scale: torch.Tensor
    gain: torch.Tensor
    threshold: float = 0.0
    unmatched: tuple[str, ...] = ("drop", "keep")


def error_aware_per_rank(topk_ids: torch.Tensor, weights: torch.Tensor, src_rank: torch.Tensor, num_ranks: int,
                         ea: ErrorAware, select_top_k: int, unmatched: str,
                         expert_ranks: torch.Tensor | None = None,
                         valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The error-aware rule (`core.reroute.error_aware`) on each data-parallel rank's own tokens:
    weight-ordered [T, k] ids and weights -> (ids, weights). expert_ranks given: rank-aware choice."""
    from sere_dist.core.reroute import error_aware

    out_ids, out_w = topk_ids.clone(), weights.clone()
    for r in range(num_ranks):
        idx = torch.nonzero(src_rank == r).flatten()
        if idx.numel() == 0:
            continue
        v = None if valid is None else valid[idx].unsqueeze(0)
        new, w = error_aware(topk_ids[idx].unsqueeze(0), weights[idx].unsqueeze(0), ea.scale, ea.gain,
                             select_top_k, ea.threshold, v, unmatched, expert_ranks)
        out_ids[idx], out_w[idx] = new[0], w[0]
    return out_ids, out_w


def error_aware_arms(ea: ErrorAware) -> tuple[str, ...]:
    """Routing names `compare_rerouting` adds for `ea`: error_aware_<unmatched>[_rank_aware]."""
    return tuple(f"error_aware_{u}{suffix}" for u in ea.unmatched for suffix in ("", "_rank_aware"))


def compare_rerouting(topk_ids: torch.Tensor, src_rank: torch.Tensor, sim: torch.Tensor, select_top_k: int,
                      threshold: float, expert_ranks: torch.Tensor, wire: Wire,
                      backends: tuple[str, ...] = BACKENDS,
                      valid: torch.Tensor | None = None, weights: torch.Tensor | None = None,
                      error_aware: ErrorAware | None = None) -> dict[str, dict[str, TrafficReport]]:
    """Traffic before re-routing, after the paper's rule and after the rank-aware rule; with
    `weights` ([T, k], ordered like the ids, largest first) and `error_aware`, also after the
    error-aware rule for each of its `unmatched` modes, alone and with the rank-aware choice.

    expert_ranks: [E, R] bool with one rank per expert. Returns {routing: {backend: report}} with
    routing in ("none", "paper", "rank_aware") + `error_aware_arms(error_aware)`. Weights are passed to
    `traffic` (a weight-0 slot sends nothing); the paper and rank-aware rules leave them unchanged.
    """
    r = expert_ranks.shape[1]
    slot_rank = placement_ranks(expert_ranks)
    routings = {
        "none": (topk_ids, weights),
        "paper": (reroute_per_rank(topk_ids, src_rank, r, sim, select_top_k, threshold, None, valid), weights),
        "rank_aware": (reroute_per_rank(topk_ids, src_rank, r, sim, select_top_k, threshold, expert_ranks, valid),
                       weights),
    }
    if error_aware is not None:
        if weights is None:
            raise ValueError("the error-aware rule needs the routing weights")
        for u in error_aware.unmatched:
            for suffix, place in (("", None), ("_rank_aware", expert_ranks)):
                routings[f"error_aware_{u}{suffix}"] = error_aware_per_rank(
                    topk_ids, weights, src_rank, r, error_aware, select_top_k, u, place, valid)
    return {name: {b: traffic(ids, src_rank, slot_rank, r, b, wire, valid, w) for b in backends}
            for name, (ids, w) in routings.items()}
