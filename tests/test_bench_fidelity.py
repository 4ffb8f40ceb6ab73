"""The fidelity benchmark's equal-active-experts machinery: which S values a target needs, and how a
target is reached (mixing two S points, or the lowest point when the target sits just below it)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from bench_fidelity import interpolate, is_deployable, s_values_for  # noqa: E402


def _points():
    kl = {1: torch.tensor([4.0, 2.0]), 2: torch.tensor([1.0, 1.0])}
    return {s: {"kl": kl[s], "agree": torch.tensor([1.0, 1.0]), "experts": e} for s, e in ((1, 5.0), (2, 8.0))}


def test_a_bracketed_target_mixes_the_two_neighbouring_s_values():
    mix, how = interpolate(_points(), 6.5, {"kl": torch.zeros(2), "agree": torch.ones(2), "experts": 10.0})
    assert how == {"S_low": 1, "S_high": 2, "mix": 0.5}
    assert torch.allclose(mix["kl"], torch.tensor([2.5, 1.5]))


def test_a_target_just_below_s1_is_s1_within_the_tolerance_and_unreachable_beyond_it():
    unmod = {"kl": torch.zeros(2), "agree": torch.ones(2), "experts": 10.0}
    assert interpolate(_points(), 4.95, unmod) is None
    mix, how = interpolate(_points(), 4.95, unmod, tolerance=0.1)
    assert how["at_lowest"] and how["S_low"] == how["S_high"] == 1 and how["experts_actual"] == 5.0
    assert torch.equal(mix["kl"], torch.tensor([4.0, 2.0]))
    assert interpolate(_points(), 4.8, unmod, tolerance=0.1) is None


def test_s_values_follow_the_targets_and_the_tolerance():
    fracs = [0.501, 0.74, 0.90, 1.0]
    assert s_values_for(fracs, [0.5]) == []
    assert s_values_for(fracs, [0.5], tolerance=0.01) == [1]
    assert s_values_for(fracs, [0.625]) == [1, 2]
    assert s_values_for(fracs, [0.95]) == [3]          # between S = 3 and the unmodified model


def test_every_error_aware_setting_is_deployable_and_the_oracle_is_not():
    assert is_deployable("error_aware") and is_deployable("error_aware_count_drop_t0.3")
    assert is_deployable("error_aware_router_keep_t0_sum") and not is_deployable("oracle")


@pytest.mark.parametrize("argv, field", [
    (["--fraction-tolerance", "-1"], "--fraction-tolerance"),
    (["--fraction-tolerance", "nan"], "--fraction-tolerance"),
    (["--ea-threshold", "2"], "gain thresholds"),
    (["--ea-variants", "error_aware_router_keep_t2"], "error_aware_router_keep_t2"),
    (["--fractions", "0", "0.5"], "--fractions"),
])
def test_bad_arguments_stop_with_one_named_line_before_any_work(argv, field, capsys):
    from bench_fidelity import main

    with pytest.raises(SystemExit) as e:
        main(["--models", "upcycled", *argv])
    assert e.value.code == 2
    assert field in capsys.readouterr().err.strip().splitlines()[-1]
