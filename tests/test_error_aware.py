"""The error-aware rule's torch reference (issue 15, first part): least-squares scale and gain in closed
form, the per-batch table against a naive per-slot loop, and its relation to the paper's rule."""

import torch

from sere_dist.core.reroute import error_aware, error_aware_gain, reroute
from sere_dist.core.similarity import RoutedAccumulator


def test_scale_and_gain_in_closed_form():
    # Tokens routed to expert 0 only. f1 = 0.5 f0 exactly; f2 is orthogonal to f0.
    h = torch.tensor([[1.0, 2.0, 0.0], [0.5, -1.0, 0.0]])                 # f0 on two tokens, [n, H]
    f0, f1 = h, 0.5 * h
    f2 = torch.tensor([[0.0, 0.0, 3.0], [0.0, 0.0, 1.0]])
    acc = RoutedAccumulator(3)
    acc.update(torch.stack([f0, f1, f2]), torch.tensor([[0], [0]]))
    scale, gain = error_aware_gain(*acc.stats("count"))
    assert torch.isclose(scale[0, 1], torch.tensor(2.0))                   # 2 * f1 = f0
    assert torch.isclose(gain[0, 1], torch.tensor(1.0))                    # an exact substitute
    assert gain[0, 2] == 0 and scale[0, 2] == 0                            # orthogonal: no better than dropping
    assert gain[1].abs().sum() == 0 and scale[1].abs().sum() == 0          # expert 1 got no routed tokens


def _naive(ids, w, scale, gain, s, rho, valid, unmatched):
    """One slot at a time, in plain Python floats rounded to float32 where the rule rounds."""
    import numpy as np

    g, t, k = ids.shape
    e = gain.shape[0]
    f32 = np.float32
    out_ids, out_w = ids.clone(), w.clone()
    for gi in range(g):
        prim = set()
        for ti in range(t):
            if valid[gi, ti]:
                prim.update(ids[gi, ti, :s].tolist())
        for ti in range(t):
            if not valid[gi, ti]:
                continue
            dropped = []
            for j in range(s, k):
                ex = int(ids[gi, ti, j])
                if ex in prim:
                    continue
                best, bg = None, float("-inf")
                for p in range(e):                                         # lowest id wins ties
                    if p in prim and float(gain[ex, p]) > bg:
                        best, bg = p, float(gain[ex, p])
                if best is not None and bg >= f32(rho):
                    out_ids[gi, ti, j] = best
                    out_w[gi, ti, j] = float(f32(w[gi, ti, j]) * f32(scale[ex, best]))
                elif unmatched != "keep":
                    out_ids[gi, ti, j] = ids[gi, ti, 0]                    # onto a primary: nothing is read
                    out_w[gi, ti, j] = 0.0
                    dropped.append(j)
            if unmatched == "renorm":
                total, part = f32(0), f32(0)
                for j in range(k):
                    total = f32(total + f32(w[gi, ti, j]))
                    part = f32(part + (f32(0) if j in dropped else f32(w[gi, ti, j])))
                r = f32(total / max(part, f32(1e-12)))
                for j in range(k):
                    if j not in dropped:
                        out_w[gi, ti, j] = float(f32(out_w[gi, ti, j]) * r)
    return out_ids, out_w


def test_matches_a_naive_per_slot_loop_on_random_cases():
    gen = torch.Generator().manual_seed(0)
    for case in range(2000):
        e = int(torch.randint(2, 12, (1,), generator=gen))
        k = int(torch.randint(1, min(e, 5) + 1, (1,), generator=gen))
        g, t = int(torch.randint(1, 3, (1,), generator=gen)), int(torch.randint(1, 6, (1,), generator=gen))
        s = int(torch.randint(1, k + 1, (1,), generator=gen))
        ids = torch.stack([torch.randperm(e, generator=gen)[:k] for _ in range(g * t)]).reshape(g, t, k)
        w = torch.rand(g, t, k, generator=gen).sort(-1, descending=True).values
        scale = torch.randn(e, e, generator=gen)
        gain = torch.rand(e, e, generator=gen)
        gain[torch.rand(e, e, generator=gen) < 0.2] = 0.5                  # ties
        valid = torch.rand(g, t, generator=gen) < 0.8
        rho = float(torch.rand(1, generator=gen)) * 0.8
        unmatched = ("keep", "drop", "renorm")[case % 3]
        got = error_aware(ids, w, scale, gain, s, rho, valid, unmatched)
        want = _naive(ids, w, scale, gain, s, rho, valid, unmatched)
        assert torch.equal(got[0], want[0]), case
        assert torch.equal(got[1], want[1]), case                          # bit for bit


def test_with_unit_scale_and_similarity_as_gain_it_is_the_papers_rule():
    gen = torch.Generator().manual_seed(1)
    e = 16
    sim = torch.rand(e, e, generator=gen)
    ids = torch.stack([torch.randperm(e, generator=gen)[:4] for _ in range(2 * 8)]).reshape(2, 8, 4)
    w = torch.rand(2, 8, 4, generator=gen).sort(-1, descending=True).values
    for s, rho in ((1, 0.0), (2, 0.3), (3, 0.7)):
        new_ids, new_w = error_aware(ids, w, torch.ones(e, e), sim, s, rho)
        assert torch.equal(new_ids, reroute(ids, sim, s, rho, with_stats=False)[0])
        assert torch.equal(new_w, w)                                       # bit for bit: weights untouched


def test_s_equal_k_leaves_routing_unchanged():
    ids = torch.tensor([[[0, 5, 6], [1, 0, 7]]])
    w = torch.tensor([[[0.5, 0.3, 0.2], [0.6, 0.3, 0.1]]])
    new_ids, new_w = error_aware(ids, w, torch.randn(8, 8), torch.rand(8, 8), 3, 0.0)
    assert torch.equal(new_ids, ids) and torch.equal(new_w, w)


def test_unmatched_secondaries_are_kept_dropped_or_renormalised_as_configured():
    ids = torch.tensor([[[0, 3, 5]]])                                       # S=1: primary {0}; 3, 5 secondary
    w = torch.tensor([[[0.5, 0.3, 0.2]]])
    gain = torch.zeros(8, 8)
    gain[5, 0], gain[3, 0] = 0.2, 0.9
    scale = torch.full((8, 8), 0.5)
    kept = error_aware(ids, w, scale, gain, 1, 0.5)                        # 5: 0.2 < threshold
    assert kept[0].tolist() == [[[0, 0, 5]]] and torch.allclose(kept[1], torch.tensor([[[0.5, 0.15, 0.2]]]))
    dropped = error_aware(ids, w, scale, gain, 1, 0.5, unmatched="drop")  # onto slot 0's expert, weight 0
    assert dropped[0].tolist() == [[[0, 0, 0]]] and torch.allclose(dropped[1], torch.tensor([[[0.5, 0.15, 0.0]]]))
    renorm = error_aware(ids, w, scale, gain, 1, 0.5, unmatched="renorm")  # the rest scaled by 1 / 0.8
    assert renorm[0].tolist() == [[[0, 0, 0]]]
    assert torch.allclose(renorm[1], torch.tensor([[[0.625, 0.1875, 0.0]]]))
    moved = error_aware(ids, w, scale, gain, 1, 0.1)
    assert moved[0].tolist() == [[[0, 0, 0]]] and torch.allclose(moved[1], torch.tensor([[[0.5, 0.15, 0.1]]]))


def test_route_with_scale_counts_dropped_slots_and_reads_no_expert_for_them():
    from sere_dist.core.reroute import route

    ids = torch.tensor([[3, 0, 5], [1, 6, 0]])                             # router slot order, not sorted
    w = torch.tensor([[0.3, 0.5, 0.2], [0.6, 0.1, 0.3]])
    gain = torch.zeros(8, 8)
    gain[6, 0] = 0.9
    scale = torch.full((8, 8), 2.0)
    new_ids, new_w, counts = route(ids, w, gain, 1, 0.5, scale=scale, unmatched="drop")
    # primaries {0, 1}; 3 and 5 match nothing (dropped onto the token's top expert 0), 6 -> 0 at 2x, 0 stays
    assert new_ids.tolist() == [[0, 0, 0], [1, 0, 0]]
    assert torch.allclose(new_w, torch.tensor([[0.0, 0.5, 0.0], [0.6, 0.2, 0.3]]))
    before, after, changed, batches, tokens = counts.tolist()
    assert (before, after, changed, batches, tokens) == (5, 2, 3, 1, 2)


def test_the_fidelity_transform_reproduces_the_model_at_s_equal_k_and_cuts_experts_below():
    import math

    from sere_dist.calibration.pipeline import calibrate_in_process
    from sere_dist.eval.baselines import error_aware_transform
    from sere_dist.eval.fidelity import evaluate
    from sere_dist.models.tiny import TinySpec, build_model

    torch.manual_seed(0)
    model, _ = build_model(TinySpec(num_layers=2, num_experts=8, top_k=2), "planted")
    x = torch.randint(4, 200, (8, 12))
    red = calibrate_in_process(model, x[:4], batch_size=4)
    stats = {layer: acc.stats("count") for layer, acc in red.routed.items()}
    same = evaluate(model, x, error_aware_transform(stats, 2), batch_size=4)
    assert same["top1_agreement"] == 1.0 and math.isclose(same["kl"], 0.0, abs_tol=1e-6)
    cut = evaluate(model, x, error_aware_transform(stats, 1), batch_size=4)
    assert cut["experts"] < same["experts"] and cut["kl"] > 0
