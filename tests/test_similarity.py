import pytest
import torch

from sere_dist.core.similarity import (GramAccumulator, SampleAccumulator, make_accumulator, offdiag_stats,
                                  similarity)

METRICS = ["frobenius", "cosine", "cka_linear", "cka_rbf"]


def outputs(seed, e=6, n=40, h=8):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(e, n, h, generator=g)


@pytest.mark.parametrize("metric", ["frobenius", "cosine"])
def test_streaming_equals_one_pass_over_all_tokens(metric):
    y = outputs(0, n=300)
    acc = make_accumulator(metric, 6)
    for s in range(0, 300, 37):  # uneven batches
        acc.update(y[:, s:s + 37])
    assert torch.allclose(acc.result(metric), similarity(y, metric), atol=1e-6)


def test_merging_accumulators_equals_one_accumulator():
    y = outputs(1, n=100)
    a, b, whole = GramAccumulator(6), GramAccumulator(6), GramAccumulator(6)
    a.update(y[:, :30]); b.update(y[:, 30:]); whole.update(y)
    a.merge(b)
    assert torch.allclose(a.gram, whole.gram) and a.tokens == 100


@pytest.mark.parametrize("metric", METRICS)
def test_matrix_is_symmetric_unit_diagonal_in_unit_interval(metric):
    sim = similarity(outputs(2), metric)
    assert torch.allclose(sim, sim.t())
    assert torch.all(sim.diagonal() == 1)
    assert sim.min() >= 0 and sim.max() <= 1


@pytest.mark.parametrize("metric", METRICS)
def test_constant_and_zero_outputs_give_no_nan(metric):
    y = outputs(3)
    y[0] = 0.0          # a dead expert
    y[1] = 0.0          # another dead expert: identical to the first
    y[2] = 5.0          # a constant expert
    sim = similarity(y, metric)
    assert torch.isfinite(sim).all()
    assert sim.min() >= 0 and sim.max() <= 1
    assert sim[0, 1] == pytest.approx(1.0)


def test_frobenius_is_one_minus_distance_over_max_distance():
    y = torch.zeros(3, 1, 1)
    y[1, 0, 0] = 1.0
    y[2, 0, 0] = 4.0   # d01 = 1, d02 = 4, d12 = 3, max 4
    sim = similarity(y, "frobenius")
    assert sim[0, 1].item() == pytest.approx(0.75)
    assert sim[0, 2].item() == pytest.approx(0.0)
    assert sim[1, 2].item() == pytest.approx(0.25)


def test_cosine_maps_opposite_to_zero_and_equal_direction_to_one():
    y = torch.tensor([[[1.0, 0.0]], [[-2.0, 0.0]], [[3.0, 0.0]], [[0.0, 1.0]]])
    sim = similarity(y, "cosine")
    assert sim[0, 1].item() == pytest.approx(0.0)
    assert sim[0, 2].item() == pytest.approx(1.0)
    assert sim[0, 3].item() == pytest.approx(0.5)


def test_linear_cka_is_invariant_to_scale_and_rotation():
    y = outputs(4, e=2, n=50)
    q, _ = torch.linalg.qr(torch.randn(8, 8, generator=torch.Generator().manual_seed(5)))
    y[1] = 3.0 * y[0] @ q
    assert similarity(y, "cka_linear")[0, 1].item() == pytest.approx(1.0, abs=1e-5)


def test_reservoir_keeps_a_bounded_seeded_sample():
    y = outputs(6, n=1000)
    a, b = SampleAccumulator(6, max_tokens=64, seed=1), SampleAccumulator(6, max_tokens=64, seed=1)
    for s in range(0, 1000, 100):
        a.update(y[:, s:s + 100])
    b.update(y)  # same tokens in one batch: same draw sequence
    assert a.sample.shape == (6, 64, 8) and a.tokens == 1000
    assert torch.equal(a.sample, b.sample)
    assert torch.isfinite(a.result("cka_rbf")).all()


def test_offdiag_stats():
    sim = torch.tensor([[1.0, 0.2], [0.2, 1.0]])
    assert offdiag_stats(sim) == pytest.approx({"mean": 0.2, "std": 0.0, "min": 0.2, "max": 0.2})


def test_unknown_metric_is_refused():
    with pytest.raises(ValueError, match="unknown similarity metric"):
        make_accumulator("euclid", 4)
