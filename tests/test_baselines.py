"""Baseline expert-reduction rules on tiny hand-built batches (exact outcomes)."""

import math

import torch

import pytest

from sere_dist.calibration.capture import expert_outputs, moe_blocks
from sere_dist.eval.baselines import (drop_secondaries, drop_transform, naee_skip, naive_top_s, oea_piggyback,
                                      oea_transform, oracle_reroute, oracle_transform, prune_least_used,
                                      random_reroute, router_logit_reroute, router_logit_transform, static_prune,
                                      usage_counts, xshare_budget, xshare_select)
from sere_dist.eval.fidelity import (RoutingPatch, active_experts, evaluate, identity_transform, paired_bootstrap,
                                     reference, score)
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


# ---------------------------------------------------------------------------------------------
# Rules at SERE's active set (primaries = union of the valid tokens' top-S)

IDS = torch.tensor([[[0, 5, 6], [1, 0, 7]]])          # S = 1 -> primaries {0, 1}
W = torch.tensor([[[0.5, 0.3, 0.2], [0.6, 0.3, 0.1]]])


def test_drop_secondaries_zeroes_only_non_primary_secondaries():
    w = drop_secondaries(IDS, W, 1, 8)
    assert torch.allclose(w, torch.tensor([[[0.5, 0.0, 0.0], [0.6, 0.3, 0.0]]]))   # slot on primary 0 stays
    wr = drop_secondaries(IDS, W, 1, 8, renormalize=True)
    assert torch.allclose(wr, torch.tensor([[[1.0, 0.0, 0.0], [2 / 3, 1 / 3, 0.0]]]))
    act = active_experts(IDS, w, torch.ones(1, 2, dtype=torch.bool), 8)
    assert torch.nonzero(act[0]).flatten().tolist() == [0, 1]                        # exactly the primaries


def test_drop_secondaries_leaves_padding_alone_and_padding_adds_no_primary():
    valid = torch.tensor([[True, False]])                  # primaries {0}; token 1 is padding
    w = drop_secondaries(IDS, W, 1, 8, valid)
    assert torch.allclose(w, torch.tensor([[[0.5, 0.0, 0.0], [0.6, 0.3, 0.1]]]))


def test_router_logit_moves_to_the_best_primary_the_token_does_not_hold_in_logit_order():
    ids = torch.tensor([[[0, 5, 6], [1, 4, 7], [2, 3, 1]]])                         # primaries {0, 1, 2}
    logits = torch.full((1, 3, 8), -5.0)
    logits[0, 0, [0, 1, 2]] = torch.tensor([3.0, 1.0, 2.0])    # token 0 holds 0: best free are 2 then 1
    logits[0, 1, [0, 1, 2]] = torch.tensor([0.0, 4.0, 1.0])    # token 1 holds 1: best free 2, then 0
    logits[0, 2, [0, 1, 2]] = torch.tensor([9.0, 0.0, 5.0])    # token 2 holds 2 and 1; slot 3 -> 0
    new = router_logit_reroute(ids, logits, 1, 8)
    assert new.tolist() == [[[0, 2, 1], [1, 2, 0], [2, 0, 1]]]


def test_router_logit_falls_back_to_the_best_primary_when_the_token_holds_them_all():
    ids = torch.tensor([[[0, 1, 6], [1, 0, 7]]])                                    # primaries {0, 1}
    logits = torch.zeros(1, 2, 8)
    logits[0, 0, 1] = 2.0
    logits[0, 1, 0] = 3.0
    new = router_logit_reroute(ids, logits, 1, 8)
    assert new.tolist() == [[[0, 1, 1], [1, 0, 0]]]


def test_oracle_picks_the_primary_with_the_closest_true_output():
    # 4 experts in 2-D; token outputs: expert 3 is close to expert 1, far from expert 0.
    out = torch.tensor([[1.0, 0.0], [0.0, 1.0], [5.0, 5.0], [0.1, 0.9]])
    outputs = out.expand(1, 2, 4, 2).clone()                                       # [G=1, T=2, E, H]
    ids = torch.tensor([[[0, 3], [1, 2]]])                                          # primaries {0, 1}
    new = oracle_reroute(ids, outputs, 1)
    assert new.tolist() == [[[0, 1], [1, 0]]]      # 3 -> 1 (closest); 2 -> 0 (|(4,5)|^2 < |(5,4)|^2? tie-free)
    d0, d1 = ((out[2] - out[0]) ** 2).sum(), ((out[2] - out[1]) ** 2).sum()
    assert d0 == d1 or (new[0, 1, 1] == 0) == bool(d0 < d1)


def test_every_rule_at_s_equal_k_leaves_routing_unchanged():
    logits = torch.randn(1, 2, 8)
    outputs = torch.randn(1, 2, 8, 4)
    assert torch.equal(drop_secondaries(IDS, W, 3, 8), W)
    assert torch.equal(router_logit_reroute(IDS, logits, 3, 8), IDS)
    assert torch.equal(oracle_reroute(IDS, outputs, 3), IDS)


def test_routing_patch_passes_every_experts_true_output_to_the_oracle():
    torch.manual_seed(0)
    model, _ = build_model(TinySpec(num_layers=1, num_experts=8, top_k=2), "random")
    blk = moe_blocks(model)[0]
    seen = {}

    def wants(layer, ids, w, valid, outputs):
        seen["outputs"] = outputs
        return ids, w, active_experts(ids, w, valid, 8)
    wants.wants_outputs = True
    inputs = {}

    def keep_input(mod, args, kwargs):
        inputs["x"] = args[0] if args else kwargs["hidden_states"]
    h = blk.register_forward_pre_hook(keep_input, with_kwargs=True)
    x = torch.randint(0, 100, (3, 5))
    with torch.no_grad(), RoutingPatch(model, wants):
        model(x)
    h.remove()
    got = seen["outputs"]                                                            # [L=5, B=3, E, H]
    want = expert_outputs(blk.experts, inputs["x"].reshape(-1, inputs["x"].shape[-1]))  # [E, 15, H]
    assert got.shape == (5, 3, 8, want.shape[-1])
    assert torch.allclose(got[2, 1], want[:, 1 * 5 + 2])                              # batch 1, position 2


def test_rules_at_s_equal_k_reproduce_the_model_and_s_1_changes_it():
    torch.manual_seed(0)
    model, _ = build_model(TinySpec(num_layers=2, num_experts=8, top_k=2), "random")
    x = torch.randint(0, 100, (8, 6))
    for make in (lambda s: drop_transform(8, s, False), lambda s: router_logit_transform(8, s),
                 lambda s: oracle_transform(8, s)):
        same = evaluate(model, x, make(2), batch_size=4)
        assert same["top1_agreement"] == 1.0 and math.isclose(same["kl"], 0.0, abs_tol=1e-6)
        cut = evaluate(model, x, make(1), batch_size=4)
        assert cut["kl"] > 1e-6 and cut["experts"] < same["experts"]


def test_score_returns_per_sequence_values_in_original_order_whatever_the_batching():
    torch.manual_seed(0)
    model, _ = build_model(TinySpec(num_layers=1, num_experts=8, top_k=2), "random")
    x = torch.randint(0, 100, (6, 7))
    ref = reference(model, x, batch_size=3)
    t = drop_transform(8, 1, False)
    a = score(model, x, t, ref, batch_size=1)                          # one sequence per batch: order-free
    b = score(model, x, t, ref, batch_size=1, order=torch.tensor([5, 4, 3, 2, 1, 0]))
    # equal up to float32 rounding (the forward runs in float32; kernels may sum in another order)
    assert torch.allclose(a["kl"], b["kl"], rtol=1e-4, atol=1e-6) and torch.equal(a["agree"], b["agree"])
    c = score(model, x, t, ref, batch_size=3, order=torch.tensor([0, 2, 4, 1, 3, 5]))
    assert not torch.allclose(a["kl"], c["kl"], rtol=1e-2)              # shared batches change the primaries
    assert torch.equal(a["tokens"], torch.full((6,), 6.0, dtype=torch.float64))


# ---------------------------------------------------------------------------------------------
# Paired bootstrap

def test_paired_bootstrap_of_a_constant_difference_is_that_difference():
    est, lo, hi = paired_bootstrap(torch.full((50,), 2.0), torch.full((50,), 4.0), n_boot=200)
    assert est == lo == hi == 0.5


def test_paired_bootstrap_interval_covers_a_known_mean_and_excludes_zero_when_clearly_positive():
    gen = torch.Generator().manual_seed(0)
    w = torch.full((400,), 10.0)
    noise = torch.randn(400, generator=gen, dtype=torch.float64)
    est, lo, hi = paired_bootstrap(noise * 10, w, n_boot=1000)              # per-token mean ~ 0, sd 1/sqrt(400)
    assert lo < 0 < hi and hi - lo < 0.4
    est, lo, hi = paired_bootstrap((noise + 3.0) * 10, w, n_boot=1000)
    assert 2.7 < lo < est < hi < 3.3
    # resampling units, not tokens: a unit with many tokens weighs more
    est, _, _ = paired_bootstrap(torch.tensor([1.0, 0.0]), torch.tensor([1.0, 3.0]), n_boot=10)
    assert est == 0.25


def test_paired_bootstrap_refuses_mismatched_or_too_small_input():
    with pytest.raises(ValueError, match="matching"):
        paired_bootstrap(torch.ones(3), torch.ones(4))
    with pytest.raises(ValueError, match="level"):
        paired_bootstrap(torch.ones(3), torch.ones(3), level=1.5)


@pytest.mark.parametrize("keep_sum", [False, True])
@pytest.mark.parametrize("unmatched", ["keep", "drop", "renorm"])
@pytest.mark.parametrize("threshold", [0.0, 0.3, 0.7])
def test_batched_error_aware_matches_the_torch_reference_bit_for_bit(unmatched, threshold, keep_sum):
    from sere_dist.core.reroute import error_aware, error_aware_gain
    from sere_dist.eval.baselines import error_aware_batched

    gen = torch.Generator().manual_seed(7)
    g, t, k, e = 5, 6, 4, 12
    x = torch.randn(e, 32, generator=gen)
    c = (x @ x.t()).abs() + torch.rand(e, e, generator=gen)
    n = c.diagonal().unsqueeze(0).expand(e, e) + torch.rand(e, e, generator=gen)
    c[3, :] = 0                                            # an expert without data: a = 0, g = 0
    scale, gain = error_aware_gain(c, n)
    ids = torch.stack([torch.randperm(e, generator=gen)[:k] for _ in range(g * t)]).reshape(g, t, k)
    w = torch.rand(g, t, k, generator=gen).sort(-1, descending=True).values
    valid = torch.rand(g, t, generator=gen) > 0.2
    for s in (1, 2, 4):
        ref_ids, ref_w = error_aware(ids, w, scale, gain, s, threshold, valid, unmatched, keep_sum=keep_sum)
        new_ids, new_w = error_aware_batched(ids, w, scale, gain, s, threshold, valid, unmatched, keep_sum)
        assert torch.equal(new_ids, ref_ids)
        assert torch.equal(new_w, ref_w)


def _planted_two_tokens():
    """Experts 0, 1 primary (top-1 of two tokens); expert 2 substitutes well by 1 (gain 0.9), 3 by none."""
    gain = torch.zeros(4, 4)
    gain[2, 1], gain[3, 0] = 0.9, 0.1
    scale = torch.zeros(4, 4)
    scale[2, 1], scale[3, 0] = 0.5, 0.2
    ids = torch.tensor([[[0, 2, 3], [1, 0, 2]]])
    w = torch.tensor([[[0.5, 0.3, 0.2], [0.6, 0.3, 0.1]]])
    return ids, w, scale, gain


def test_error_aware_renorm_drops_a_low_gain_slot_and_rescales_the_token_to_its_original_sum():
    from sere_dist.eval.baselines import error_aware_batched

    ids, w, scale, gain = _planted_two_tokens()
    new_ids, new_w = error_aware_batched(ids, w, scale, gain, 1, 0.5, None, "renorm")
    assert new_ids.tolist() == [[[0, 1, 0], [1, 0, 1]]]
    # token 0: slot 2 (expert 3, gain 0.1 < 0.5) dropped, kept weights 0.5 and 0.3*0.5 rescaled by 1/0.8
    assert torch.allclose(new_w, torch.tensor([[[0.625, 0.1875, 0.0], [0.6, 0.3, 0.05]]]))


def test_error_aware_keep_sum_gives_the_lost_weight_to_the_tokens_own_slots():
    from sere_dist.eval.baselines import error_aware_batched

    ids, w, scale, gain = _planted_two_tokens()
    new_ids, new_w = error_aware_batched(ids, w, scale, gain, 1, 0.5, None, "renorm", keep_sum=True)
    assert new_ids.tolist() == [[[0, 1, 0], [1, 0, 1]]]
    # token 0: moved slot 0.3*0.5 = 0.15, dropped 0.2: slot 0 gets 1 - 0.15 = 0.85
    # token 1: moved slot 0.1*0.5 = 0.05: the unmoved slots (0.6, 0.3) share 0.95
    assert torch.allclose(new_w, torch.tensor([[[0.85, 0.15, 0.0], [0.6 * 0.95 / 0.9, 0.3 * 0.95 / 0.9, 0.05]]]))
    assert torch.allclose(new_w.sum(-1), w.sum(-1))
