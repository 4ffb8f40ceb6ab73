"""Traffic model: byte counts on hand-built routings, each number worked out in the comment above it."""

import pytest
import torch

from sere_dist.core.reroute import expert_ranks_for
from sere_dist.eval.traffic import (ErrorAware, Wire, compare_rerouting, eplb_physical_ids, error_aware_per_rank,
                                    linear_slot_ranks, placement_ranks, traffic)

# 2 ranks, 4 experts, linear placement: experts 0,1 on rank 0; experts 2,3 on rank 1. H = 8, bf16.
RANKS = placement_ranks(expert_ranks_for(4, 2, "linear"))
WIRE = Wire(hidden_size=8)
# t0 (rank 0) -> experts 0,2: ranks {0,1}, one remote rank, one remote slot
# t1 (rank 1) -> experts 2,3: rank {1} = its own, nothing remote
# t2 (rank 0) -> experts 2,3: rank {1}, one remote rank, two remote slots
IDS = torch.tensor([[0, 2], [2, 3], [2, 3]])
SRC = torch.tensor([0, 1, 0])


def test_deepep_high_throughput_sends_each_token_once_per_remote_rank():
    r = traffic(IDS, SRC, RANKS, 2, "deepep_high_throughput", WIRE)
    # 2 remote (token, rank) pairs; dispatch = hidden 8*2 + k=2 * (int64 id 8 + fp32 weight 4) = 40 B each
    assert (r.remote_pairs, r.messages) == (2, 2)
    assert r.dispatch_bytes == 2 * 40
    # combine = one bf16 hidden state back per pair: 16 B each
    assert r.combine_bytes == 2 * 16
    assert r.total_bytes == 112
    # local: t0 on rank 0, t1 on rank 1
    assert r.local_messages == 2
    assert r.rank_pairs == 4


def test_deepep_low_latency_sends_one_message_per_remote_slot():
    r = traffic(IDS, SRC, RANKS, 2, "deepep_low_latency", WIRE)
    # remote slots: t0 expert 2, t2 experts 2 and 3 = 3; message = 16 B header + 16 B hidden
    assert r.messages == 3
    assert r.dispatch_bytes == 3 * 32
    assert r.combine_bytes == 3 * 16
    assert r.local_messages == 6 - 3


def test_allgather_reducescatter_sends_every_token_to_every_other_rank():
    r = traffic(IDS, SRC, RANKS, 2, "allgather_reducescatter", WIRE)
    # 3 tokens x 1 other rank; dispatch = hidden 16 + k=2 * (int32 id 4 + fp32 weight 4) = 32 B
    assert r.messages == 3
    assert r.dispatch_bytes == 3 * 32
    assert r.combine_bytes == 3 * 16


def test_per_rank_load_counts_expert_rows_and_received_tokens():
    r = traffic(IDS, SRC, RANKS, 2, "deepep_high_throughput", WIRE)
    # rank 0 computes t0/expert 0; rank 1 computes t0/2, t1/2, t1/3, t2/2, t2/3
    assert r.rank_slots == [1, 5]
    assert r.max_rank_slots == 5
    assert r.imbalance == pytest.approx(5 / 3)
    assert r.rank_tokens == [1, 3]


def test_fp8_dispatch_counts_one_byte_per_element_plus_a_scale_per_128():
    wire = Wire(hidden_size=256, dispatch_fp8=True)
    r = traffic(torch.tensor([[2]]), torch.tensor([0]), RANKS, 2, "deepep_low_latency", wire)
    # one remote slot: header 16 + 256 fp8 bytes + 2 float32 scales; combine stays bf16 (512 B)
    assert r.dispatch_bytes == 16 + 256 + 8
    assert r.combine_bytes == 512


def test_padding_tokens_and_masked_slots_send_nothing():
    ids = torch.tensor([[2, -1], [3, 2]])
    src = torch.tensor([0, 0])
    r = traffic(ids, src, RANKS, 2, "deepep_low_latency", WIRE, valid=torch.tensor([True, False]))
    # only t0's expert 2 counts
    assert (r.tokens, r.slots, r.messages) == (1, 1, 1)


def test_slots_of_weight_zero_send_nothing_under_deepep():
    # same tokens as IDS, but t0's expert 2 and t2's expert 3 were dropped (weight 0)
    w = torch.tensor([[0.6, 0.0], [0.5, 0.5], [0.7, 0.0]])
    ht = traffic(IDS, SRC, RANKS, 2, "deepep_high_throughput", WIRE, weights=w)
    # t0 -> {0}: its own rank, nothing remote; t1 -> {2, 3}: own rank 1; t2 -> {2}: rank 1, one remote pair
    assert (ht.remote_pairs, ht.messages, ht.local_messages, ht.rank_pairs) == (1, 1, 2, 3)
    assert (ht.dispatch_bytes, ht.combine_bytes) == (40, 16)
    # rows computed: rank 0 t0/0; rank 1 t1/2, t1/3, t2/2 (the dropped slots are no expert's rows)
    assert (ht.slots, ht.rank_slots, ht.rank_tokens) == (4, [1, 3], [1, 2])
    ll = traffic(IDS, SRC, RANKS, 2, "deepep_low_latency", WIRE, weights=w)
    # remote slots left: t2's expert 2 only; local: t0/0, t1/2, t1/3
    assert (ll.messages, ll.local_messages, ll.dispatch_bytes, ll.combine_bytes) == (1, 3, 32, 16)
    # allgather-reducescatter still ships every token with all k ids and weights
    assert traffic(IDS, SRC, RANKS, 2, "allgather_reducescatter", WIRE, weights=w).dispatch_bytes == 3 * 32
    # without weights (or all nonzero) the counts are the old ones
    assert traffic(IDS, SRC, RANKS, 2, "deepep_high_throughput", WIRE,
                   weights=torch.ones(3, 2)).as_dict() == traffic(IDS, SRC, RANKS, 2, "deepep_high_throughput",
                                                                  WIRE).as_dict()


def _ea(entries: dict, threshold: float) -> ErrorAware:
    """4 experts; entries {(e, p): (gain, scale)}, every other pair gain 0 / scale 0."""
    gain, scale = torch.eye(4), torch.eye(4)
    for (e, p), (g, a) in entries.items():
        gain[e, p], scale[e, p] = g, a
    return ErrorAware(scale=scale, gain=gain, threshold=threshold)


def test_error_aware_drop_sends_nothing_where_keep_still_sends_the_slot():
    # S=1, both tokens on rank 0, primaries {0, 1} (rank 0). Expert 3 reproduces 0 well (gain 0.9, scale 0.5);
    # expert 2 reproduces no primary (gains 0.3, 0.4 < threshold 0.5): unmatched.
    ea = _ea({(3, 0): (0.9, 0.5), (2, 0): (0.3, 1.0), (2, 1): (0.4, 1.0)}, 0.5)
    ids = torch.tensor([[0, 3], [1, 2]])
    w = torch.tensor([[0.6, 0.4], [0.7, 0.3]])
    src = torch.tensor([0, 0])
    out = compare_rerouting(ids, src, torch.eye(4), 1, 0.5, expert_ranks_for(4, 2, "linear"), WIRE, weights=w,
                            error_aware=ea)
    # none:  t0 -> {0, 3}: remote rank 1; t1 -> {1, 2}: remote rank 1                     -> 2 pairs
    # keep:  t0 -> {0, 0} (weight 0.4 * 0.5): local; t1 keeps {1, 2}: remote rank 1        -> 1 pair
    # drop:  t1's slot 2 -> id 1 (its top expert), weight 0: sends nothing                 -> 0 pairs
    ht = {name: rep["deepep_high_throughput"].remote_pairs for name, rep in out.items()}
    assert ht == {"none": 2, "paper": 2, "rank_aware": 2, "error_aware_drop": 0, "error_aware_drop_rank_aware": 0,
                  "error_aware_keep": 1, "error_aware_keep_rank_aware": 1}
    ll = {name: rep["deepep_low_latency"].messages for name, rep in out.items()}
    assert (ll["none"], ll["error_aware_keep"], ll["error_aware_drop"]) == (2, 1, 0)
    assert out["error_aware_drop"]["deepep_high_throughput"].dispatch_bytes == 0
    assert out["error_aware_keep"]["deepep_high_throughput"].dispatch_bytes == 40
    new_ids, new_w = error_aware_per_rank(ids, w, src, 2, ea, 1, "drop")
    assert new_ids.tolist() == [[0, 0], [1, 1]]
    assert new_w.tolist() == [pytest.approx([0.6, 0.2]), [pytest.approx(0.7), 0.0]]


def test_error_aware_with_the_rank_aware_choice_halves_deepep_ht_pairs():
    # the rank-aware example above with gains: S=1, tokens on rank 0, primaries {0, 2}; threshold 0.5.
    # expert 3: gain 0.9 to 2 (scale 1), 0.6 to 0 (scale 0.5); expert 1: 0.9 to 0 (scale 1), 0.6 to 2 (scale 0.5)
    ea = _ea({(3, 2): (0.9, 1.0), (3, 0): (0.6, 0.5), (1, 0): (0.9, 1.0), (1, 2): (0.6, 0.5)}, 0.5)
    ids = torch.tensor([[0, 3], [2, 1]])
    w = torch.tensor([[0.6, 0.4], [0.7, 0.3]])
    src = torch.tensor([0, 0])
    out = compare_rerouting(ids, src, torch.eye(4), 1, 0.5, expert_ranks_for(4, 2, "linear"), WIRE,
                            backends=("deepep_high_throughput",), weights=w, error_aware=ea)
    # error-aware:            t0 -> {0, 2}: rank 1 remote; t1 -> {2, 0}: rank 1 remote       -> 2 pairs
    # error-aware rank-aware: t0 -> {0, 0}: local;         t1 -> {2, 2}: rank 1 remote       -> 1 pair
    ht = {name: rep["deepep_high_throughput"].remote_pairs for name, rep in out.items()}
    assert (ht["none"], ht["error_aware_drop"], ht["error_aware_keep"]) == (2, 2, 2)
    assert (ht["error_aware_drop_rank_aware"], ht["error_aware_keep_rank_aware"]) == (1, 1)
    ra_ids, ra_w = error_aware_per_rank(ids, w, src, 2, ea, 1, "keep", expert_ranks_for(4, 2, "linear"))
    assert ra_ids.tolist() == [[0, 0], [2, 2]]
    assert ra_w.tolist() == [pytest.approx([0.6, 0.2]), pytest.approx([0.7, 0.15])]


def test_error_aware_arms_need_the_weights():
    with pytest.raises(ValueError, match="needs the routing weights"):
        compare_rerouting(IDS, SRC, torch.eye(4), 1, 0.5, expert_ranks_for(4, 2, "linear"), WIRE,
                          error_aware=_ea({}, 0.0))


def test_eplb_picks_a_replica_by_hashed_token_position():
    l2p = torch.tensor([[0, 2], [1, -1]])   # expert 0 has replicas in slots 0 and 2
    count = torch.tensor([2, 1])
    phys = eplb_physical_ids(torch.tensor([[0], [0], [1]]), l2p, count)
    # token 0: hash 0 -> replica 0 (slot 0); token 1: hash 2654435769 is odd -> replica 1 (slot 2)
    assert phys.tolist() == [[0], [2], [1]]
    # 4 physical slots over 2 ranks: slots 0,1 on rank 0, slots 2,3 on rank 1
    assert linear_slot_ranks(4, 2).tolist() == [0, 0, 1, 1]


def test_placement_with_an_expert_on_two_ranks_is_refused():
    mask = expert_ranks_for(2, 2, "round_robin")
    mask[0, 1] = True
    with pytest.raises(ValueError, match=r"experts \[0\] are not hosted on exactly one rank"):
        placement_ranks(mask)


def test_rank_aware_rerouting_halves_deepep_ht_pairs_where_the_paper_rule_saves_none():
    # S=1, both tokens on rank 0. Primaries {0, 2}. Expert 3 is most like 2 (0.9) but also like 0 (0.6);
    # expert 1 is most like 0 (0.9) but also like 2 (0.6); rho = 0.5.
    sim = torch.eye(4)
    sim[3, 2], sim[3, 0], sim[1, 0], sim[1, 2] = 0.9, 0.6, 0.9, 0.6
    ids = torch.tensor([[0, 3], [2, 1]])
    src = torch.tensor([0, 0])
    out = compare_rerouting(ids, src, sim, 1, 0.5, expert_ranks_for(4, 2, "linear"), WIRE)
    # none:       t0 -> {0, 3}: ranks {0,1};  t1 -> {2, 1}: ranks {1,0}   -> 2 remote pairs
    # paper:      t0 -> {0, 2}: ranks {0,1};  t1 -> {2, 0}: ranks {1,0}   -> 2 remote pairs
    # rank-aware: t0 -> {0, 0}: rank {0};     t1 -> {2, 2}: rank {1}      -> 1 remote pair
    ht = {name: rep["deepep_high_throughput"].remote_pairs for name, rep in out.items()}
    assert ht == {"none": 2, "paper": 2, "rank_aware": 1}
    # LL pays per slot: rank-aware's t1 sends expert 2 twice -> 2 remote slots, same as before
    ll = {name: rep["deepep_low_latency"].messages for name, rep in out.items()}
    assert ll == {"none": 2, "paper": 2, "rank_aware": 2}
    # allgather-reducescatter moves the same bytes whatever the routing
    agrs = {rep["allgather_reducescatter"].total_bytes for rep in out.values()}
    assert agrs == {2 * (32 + 16)}


def test_rerouting_is_decided_per_source_rank_batch():
    # S=1: rank 0's token makes 0 primary, rank 1's token makes 2 primary. Expert 1 is like 0 (0.9).
    sim = torch.eye(4)
    sim[1, 0] = 0.9
    ids = torch.tensor([[0, 1], [2, 1]])
    out = compare_rerouting(ids, torch.tensor([0, 1]), sim, 1, 0.5, expert_ranks_for(4, 2, "linear"), WIRE,
                            backends=("deepep_low_latency",))
    # rank 0 re-routes 1 -> 0 (local); on rank 1, 0 is not primary, so expert 1 is kept (critical)
    rep = out["paper"]["deepep_low_latency"]
    # remaining remote slots: t1's expert 1 (rank 0) only
    assert rep.messages == 1
    assert rep.rank_slots == [3, 1]


def test_unknown_backend_is_named_in_the_error():
    with pytest.raises(ValueError, match="unknown all-to-all backend 'pplx'"):
        traffic(IDS, SRC, RANKS, 2, "pplx", WIRE)
