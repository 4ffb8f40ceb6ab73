"""Baseline expert-reduction rules on tiny hand-built batches (exact outcomes)."""

import math

import torch

from sere_dist.eval.baselines import (naee_skip, naive_top_s, oea_piggyback, oea_transform, prune_least_used,
                                 random_reroute, static_prune, usage_counts, xshare_budget, xshare_select)
from sere_dist.eval.fidelity import RoutingPatch, active_experts, evaluate, identity_transform
from sere_dist.models.tiny import TinySpec, build_model


def logits_of(probs):
    """Logits whose softmax is `probs` (rows sum to 1)."""
    return torch.tensor(probs).log()


def test_naive_top_s_drops_the_tail_and_rescales_to_the_original_sum():
    ids = torch.tensor([[3, 1, 2]])
    w = torch.tensor([[0.5, 0.3, 0.2]])
    new_ids, new_w = naive_top_s(ids, w, 2)
    assert new_ids.tolist() == [[3, 1, 2]]
    assert torch.allclose(new_w, torch.tensor([[0.625, 0.375, 0.0]]))


def test_naee_skips_a_secondary_below_beta_times_the_top_weight_and_keeps_the_rest_unscaled():
    ids = torch.tensor([[0, 1, 2], [4, 5, 6]])
    w = torch.tensor([[0.6, 0.3, 0.1], [0.4, 0.35, 0.25]])
    _, new_w = naee_skip(ids, w, beta=0.5)
    # 0.3 >= 0.5*0.6 kept, 0.1 dropped; 0.35 and 0.25 >= 0.2 kept
    assert torch.allclose(new_w, torch.tensor([[0.6, 0.3, 0.0], [0.4, 0.35, 0.25]]))
    assert active_experts(ids.unsqueeze(0), new_w.unsqueeze(0), torch.ones(1, 2, dtype=torch.bool), 8)[0].sum() == 5


def test_naee_with_beta_one_keeps_only_ties_with_the_top_slot():
    _, new_w = naee_skip(torch.tensor([[0, 1]]), torch.tensor([[0.5, 0.5]]), beta=1.0)
    assert new_w.tolist() == [[0.5, 0.5]]


def test_pruning_removes_the_least_used_experts_lowest_id_first_on_ties():
    ids = torch.tensor([[[0, 1], [0, 2], [0, 1]]])          # usage: 0:3, 1:2, 2:1, 3:0
    counts = usage_counts(ids, 4)
    assert counts.tolist() == [3, 2, 1, 0]
    assert prune_least_used(counts, 2).tolist() == [True, True, False, False]
    assert prune_least_used(torch.tensor([1, 1, 1]), 1).tolist() == [False, True, True]
    assert prune_least_used(torch.tensor([1, 1]), 5).sum() == 1           # never prunes everything


def test_static_pruning_reselects_top_k_among_kept_experts_from_the_router_softmax():
    logits = logits_of([[0.4, 0.3, 0.2, 0.1]])
    keep = torch.tensor([False, True, True, True])
    ids, w = static_prune(logits, keep, top_k=2, normalize=True)
    assert ids.tolist() == [[1, 2]]
    assert torch.allclose(w, torch.tensor([[0.6, 0.4]]))
    ids, w = static_prune(logits, keep, top_k=2, normalize=False)           # softmax over the kept three
    assert torch.allclose(w, torch.tensor([[0.5, 1 / 3]]))


def test_random_reroute_sends_every_non_primary_secondary_to_a_primary_and_keeps_top_s():
    gen = torch.Generator().manual_seed(0)
    ids = torch.tensor([[[0, 5, 6], [1, 0, 7], [2, 1, 0]]])
    new = random_reroute(ids, 1, 8, generator=gen)
    assert new[..., 0].tolist() == [[0, 1, 2]]
    assert set(new.flatten().tolist()) <= {0, 1, 2}
    assert new[0, 1, 1] == 0 and new[0, 2, 1] == 1 and new[0, 2, 2] == 0    # already primary: unchanged


def test_random_reroute_leaves_padding_alone_and_padding_adds_no_primary():
    gen = torch.Generator().manual_seed(1)
    ids = torch.tensor([[[0, 5], [3, 4]]])
    valid = torch.tensor([[True, False]])
    new = random_reroute(ids, 1, 8, valid, gen)
    assert new.tolist() == [[[0, 0], [3, 4]]]


def test_oea_keeps_each_tokens_top_s_and_fills_its_other_slots_from_the_batchs_active_set():
    # Token 0 prefers 0 > 3 > 1 > 2; token 1 prefers 1 > 2 > 3 > 0. S = 1 -> active {0, 1}.
    probs = [[[0.5, 0.15, 0.05, 0.3], [0.05, 0.5, 0.3, 0.15]]]
    ids, w = oea_piggyback(logits_of(probs), top_k=2, select_top_k=1, normalize=False)
    assert ids.tolist() == [[[0, 1], [1, 0]]]                               # 3 and 2 are not active
    assert torch.allclose(w, torch.tensor([[[0.5, 0.15], [0.5, 0.05]]]))
    _, wn = oea_piggyback(logits_of(probs), top_k=2, select_top_k=1, normalize=True)
    assert torch.allclose(wn[0, 0], torch.tensor([0.5 / 0.65, 0.15 / 0.65]))


def test_oea_zero_weights_a_slot_when_the_batch_has_no_other_active_expert():
    probs = [[[0.7, 0.1, 0.1, 0.1]]]                                         # one token: active = {0}
    ids, w = oea_piggyback(logits_of(probs), top_k=2, select_top_k=1, normalize=True)
    assert ids[0, 0, 0] == 0 and w.tolist() == [[[1.0, 0.0]]]


def test_xshare_greedy_maximises_total_gating_score_under_the_budget():
    # Expert 2 is everyone's second choice: with budget 1 the greedy gain picks it over the top-1s.
    probs = torch.tensor([[[0.5, 0.0, 0.4, 0.1], [0.0, 0.5, 0.4, 0.1], [0.3, 0.3, 0.4, 0.0]]])
    assert xshare_select(probs, 1, top_k=2).tolist() == [[False, False, True, False]]
    assert xshare_select(probs, 2, top_k=2).tolist() == [[True, False, True, False]]


def test_xshare_gain_counts_only_a_tokens_top_k_inside_the_set():
    # top_k = 1: after choosing {0}, adding 1 helps only the tokens that prefer 1 to 0.
    probs = torch.tensor([[[0.6, 0.4, 0.0], [0.6, 0.4, 0.0], [0.1, 0.0, 0.9]]])
    assert xshare_select(probs, 2, top_k=1).tolist() == [[True, False, True]]


def test_xshare_routes_each_token_inside_the_chosen_set_with_renormalised_scores():
    probs = [[[0.5, 0.0, 0.4, 0.1], [0.0, 0.5, 0.4, 0.1]]]
    ids, w, chosen = xshare_budget(logits_of(probs).nan_to_num(neginf=-1e9), 2, top_k=2, normalize=True)
    assert chosen.sum() == 2
    a, b = sorted(torch.nonzero(chosen[0]).flatten().tolist())
    assert set(ids.flatten().tolist()) <= {a, b}
    assert torch.allclose(w.sum(-1), torch.ones(1, 2))


def test_routing_patch_hands_router_logits_only_to_transforms_that_ask_for_them():
    torch.manual_seed(0)
    model, _ = build_model(TinySpec(num_layers=1, num_experts=8, top_k=2), "random")
    seen = {}

    def wants(layer, ids, w, valid, logits):
        seen["logits"] = logits.shape
        return ids, w, active_experts(ids, w, valid, 8)
    wants.wants_logits = True
    x = torch.randint(0, 100, (3, 5))
    with RoutingPatch(model, wants):
        model(x)
    assert seen["logits"] == (5, 3, 8)                                      # [L groups, B tokens, E]
    with RoutingPatch(model, identity_transform(8)):                         # old 4-argument transforms still work
        model(x)


def test_oea_with_s_equal_k_reproduces_the_unmodified_model_exactly():
    torch.manual_seed(0)
    model, _ = build_model(TinySpec(num_layers=1, num_experts=8, top_k=2), "random")
    x = torch.randint(0, 100, (4, 6))
    r = evaluate(model, x, oea_transform(8, 2, normalize=True), batch_size=4)
    assert r["top1_agreement"] == 1.0 and math.isclose(r["kl"], 0.0, abs_tol=1e-6)
