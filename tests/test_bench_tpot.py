"""The pure helpers of benchmarks/bench_tpot.py: the speed-up bound, the ABBA order, TPOT from step stamps."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from bench_tpot import (abba_orders, bound_speedup, decode_steps, distinct_per_batch,  # noqa: E402
                        tpot_from_steps)


def test_bound_is_one_without_moe_time_or_without_fewer_experts():
    assert bound_speedup(0.0, 50.0, 25.0) == 1.0
    assert bound_speedup(0.8, 50.0, 50.0) == 1.0


def test_bound_all_moe_is_the_distinct_expert_ratio():
    assert bound_speedup(1.0, 60.0, 30.0) == pytest.approx(2.0)


def test_bound_at_a_partial_share():
    # 80% of the step is MoE and it halves: 1 / (0.2 + 0.4)
    assert bound_speedup(0.8, 52.0, 26.0) == pytest.approx(1 / 0.6)


@pytest.mark.parametrize("share, before", [(-0.1, 10.0), (1.1, 10.0), (0.5, 0.0)])
def test_bound_refuses_a_share_outside_0_1_or_no_experts(share, before):
    with pytest.raises(ValueError):
        bound_speedup(share, before, 1.0)


def test_abba_alternates_the_arm_order_per_round():
    assert abba_orders(["plain", "S=1", "S=2"], 4) == [["plain", "S=1", "S=2"], ["S=2", "S=1", "plain"],
                                                       ["plain", "S=1", "S=2"], ["S=2", "S=1", "plain"]]


def test_abba_gives_every_arm_the_same_mean_position_over_an_even_number_of_rounds():
    arms = ["a", "b", "c", "d"]
    orders = abba_orders(arms, 6)
    mean_pos = {a: sum(o.index(a) for o in orders) / len(orders) for a in arms}
    assert set(mean_pos.values()) == {1.5}


def test_decode_steps_are_the_forwards_of_exactly_batch_tokens():
    steps = [{"t0": 0.0, "tokens": 64}, {"t0": 0.5, "tokens": 4}, {"t0": 0.6, "tokens": 4}, {"t0": 0.65, "tokens": 3}]
    assert decode_steps(steps, 4) == steps[1:3]


def test_a_prefill_step_with_as_many_tokens_as_the_batch_is_not_a_decode_step():
    steps = [{"t0": 0.0, "tokens": 16, "decode_reqs": 0}, {"t0": 3.0, "tokens": 16, "decode_reqs": 16},
             {"t0": 3.5, "tokens": 16, "decode_reqs": None}]
    assert decode_steps(steps, 16) == steps[1:]


def test_tpot_is_the_mean_interval_between_decode_step_starts():
    steps = [{"t0": 1.0}, {"t0": 1.010}, {"t0": 1.030}]
    assert tpot_from_steps(steps) == pytest.approx(15.0)
    assert tpot_from_steps(steps[:1]) is None


def test_distinct_experts_per_batch_average_over_layers_with_batches():
    stats = {0: {"distinct_experts_before": 100, "distinct_experts_after": 50, "batches": 10},
             1: {"distinct_experts_before": 60, "distinct_experts_after": 40, "batches": 10},
             2: {"distinct_experts_before": 0, "distinct_experts_after": 0, "batches": 0}}
    assert distinct_per_batch(stats) == pytest.approx((8.0, 4.5))
    assert distinct_per_batch({}) == (None, None)
