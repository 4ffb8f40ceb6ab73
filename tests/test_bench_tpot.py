"""The pure helpers of benchmarks/bench_tpot.py: the speed-up bound, the ABBA order, TPOT from step stamps."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from bench_tpot import (abba_orders, bound_speedup, decode_steps, distinct_per_batch,  # noqa: E402
                        fit_kernel_model, paired_speedup, round_pairs, slot_bound_speedup,
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


def test_paired_speedup_is_the_geometric_mean_of_the_round_ratios():
    pairs = [(20.0, 10.0), (30.0, 30.0)]          # 2x and 1x: geometric mean sqrt(2)
    r = paired_speedup(pairs)
    assert r["speedup"] == pytest.approx(2 ** 0.5)
    assert r["rounds"] == 2
    assert r["lo"] < r["speedup"] < r["hi"]


def test_paired_speedup_interval_narrows_with_more_rounds_and_is_a_point_without_spread():
    few = paired_speedup([(10.0, 9.0), (10.0, 10.0), (10.0, 11.0)])
    many = paired_speedup([(10.0, 9.0), (10.0, 10.0), (10.0, 11.0)] * 8)
    assert many["hi"] - many["lo"] < few["hi"] - few["lo"]
    exact = paired_speedup([(12.0, 10.0)] * 4)
    assert exact["lo"] == pytest.approx(1.2) and exact["hi"] == pytest.approx(1.2)


def test_paired_speedup_interval_covers_one_for_noise_and_excludes_it_for_a_steady_gain():
    noise = paired_speedup([(10.0, 9.8), (10.0, 10.2), (10.1, 10.0), (9.9, 10.0)])
    assert noise["lo"] < 1.0 < noise["hi"]
    gain = paired_speedup([(10.0, 8.0), (10.2, 8.1), (9.9, 8.0), (10.1, 7.9)])
    assert gain["lo"] > 1.2


@pytest.mark.parametrize("pairs", [[], [(10.0, 9.0)], [(10.0, 0.0), (10.0, 9.0)], [(None, 9.0), (10.0, 9.0)]])
def test_paired_speedup_needs_two_usable_rounds(pairs):
    assert paired_speedup(pairs) is None


def test_round_pairs_match_the_arms_of_the_same_round_batch_and_rule():
    samples = [{"batch": 1, "rule": "paper", "arm": "plain", "round": 0, "tpot_ms": 10.0},
               {"batch": 1, "rule": "paper", "arm": "S=1", "round": 0, "tpot_ms": 9.0},
               {"batch": 1, "rule": "paper", "arm": "S=1", "round": 1, "tpot_ms": 8.0},
               {"batch": 1, "rule": "paper", "arm": "plain", "round": 1, "tpot_ms": 11.0},
               {"batch": 1, "rule": "paper", "arm": "plain", "round": 2, "tpot_ms": 12.0},   # no S=1 in round 2
               {"batch": 4, "rule": "paper", "arm": "S=1", "round": 2, "tpot_ms": 1.0},
               {"batch": 1, "rule": "error_aware", "arm": "S=1", "round": 2, "tpot_ms": 1.0}]
    assert round_pairs(samples, 1, "S=1", "paper") == [(10.0, 9.0), (11.0, 8.0)]


def test_kernel_model_recovers_the_per_expert_and_per_slot_costs():
    alpha, beta, gamma = 0.2, 0.017, 0.5
    pts = [(d, n, alpha * d + beta * n + gamma) for d, n in [(8, 8), (28, 32), (80, 128), (40, 128), (110, 256),
                                                            (45, 256), (120, 512), (60, 512)]]
    m = fit_kernel_model(pts)
    assert m["alpha_ms_per_expert"] == pytest.approx(alpha)
    assert m["beta_ms_per_slot"] == pytest.approx(beta)
    assert m["gamma_ms"] == pytest.approx(gamma)
    assert m["max_rel_resid"] < 1e-9 and m["points"] == 8


def test_kernel_model_refuses_points_that_cannot_separate_the_terms():
    few = [(8, 8, 1.0), (28, 32, 2.0), (80, 128, 3.0), (40, 128, 2.5), (110, 256, 4.0)]
    assert fit_kernel_model(few) is None                                                    # < 6 points
    assert fit_kernel_model(few + [(50, 256, 3.0)]) is not None
    assert fit_kernel_model([(d, 128, 0.1 * d) for d in (40, 50, 60, 70, 80, 90)]) is None  # one slot count
    assert fit_kernel_model([(d, 8 * d, 0.1 * d) for d in (1, 2, 4, 8, 16, 32)]) is None   # slots = 8 x experts


def test_slot_aware_bound_is_the_plain_bound_when_all_kernel_time_is_expert_reads():
    assert slot_bound_speedup(0.8, 1.0, 80.0, 40.0) == pytest.approx(bound_speedup(0.8, 80.0, 40.0))
    assert slot_bound_speedup(0.8, 0.0, 80.0, 40.0) == 1.0


def test_slot_aware_bound_keeps_the_per_slot_share_of_the_moe_time():
    # MoE 80% of the step, 75% of it expert reads that halve: 1 / (0.2 + 0.8 * (0.25 + 0.75 * 0.5))
    assert slot_bound_speedup(0.8, 0.75, 80.0, 40.0) == pytest.approx(1 / (0.2 + 0.8 * 0.625))
    with pytest.raises(ValueError):
        slot_bound_speedup(0.8, 1.5, 80.0, 40.0)


# --- make_results.py: the batch-1 goal read off the paired intervals (headline.json `tpot_cpu_batch1`) ----------

from make_results import batch1_headline, batch1_verdict  # noqa: E402


@pytest.mark.parametrize("lo, hi, verdict", [
    (0.98, 1.02, "no slowdown beyond 2% shown"),
    (0.95, 0.979, "a slowdown beyond 2% shown"),
    (0.96, 0.99, "a slowdown shown, its size against 2% not resolved"),
    (0.97, 1.01, "2% not resolved"),
])
def test_batch1_verdict_reads_the_interval_against_2_percent(lo, hi, verdict):
    assert batch1_verdict(lo, hi) == verdict


def test_batch1_headline_keeps_only_paired_batch1_rows_of_cpu_tpot_runs():
    row = {"experts": 128, "hidden": 2048, "rule": "paper", "S": 2, "batch": 1, "speedup_paired": 1.01,
           "speedup_ci95": [0.99, 1.03], "runs_plain_ms": [1.0] * 12}
    results = {
        "tpot_cpu_batch1": {"cpu": {"model": "X", "avx512f": False}, "label": "gated",
                            "rows": [row, {**row, "batch": 16},                          # not batch 1
                                     {**row, "speedup_ci95": None},                      # no paired estimate
                                     {**row, "rule": "paper+skip", "speedup_ci95": [0.95, 0.97]}]},
        "tpot_gpu": {"rows": [row]},                                                    # not a CPU run
    }
    out = batch1_headline(results)
    assert [(r["rule"], r["verdict"]) for r in out] == [("paper", "no slowdown beyond 2% shown"),
                                                         ("paper+skip", "a slowdown beyond 2% shown")]
    assert out[0]["rounds"] == 12 and out[0]["file"] == "tpot_cpu_batch1.json" and out[0]["avx512"] is False
    assert "label" not in out[0] and out[1]["label"] == "gated"


# --- the code a run measured (results `code`, shown on RESULTS.md's command line) -------------------------------

def _git(root: Path, *cmd: str) -> str:
    import subprocess
    return subprocess.run(["git", "-C", str(root), *cmd], check=True, capture_output=True, text=True).stdout.strip()


def test_code_version_names_the_commit_and_only_code_changes_make_it_dirty(tmp_path):
    from bench_tpot import code_version

    (tmp_path / "benchmarks" / "results").mkdir(parents=True)
    (tmp_path / "plugin.py").write_text("a = 1\n")
    (tmp_path / "benchmarks" / "results" / "tpot_cpu.json").write_text("{}\n")
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "add", "-A")
    _git(tmp_path, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "x")
    head = _git(tmp_path, "rev-parse", "--short=12", "HEAD")
    assert code_version(tmp_path) == {"commit": head, "dirty": False}
    (tmp_path / "benchmarks" / "results" / "tpot_cpu.json").write_text('{"rows": []}\n')   # a rerun's output
    (tmp_path / "notes.txt").write_text("untracked\n")
    assert code_version(tmp_path) == {"commit": head, "dirty": False}
    (tmp_path / "plugin.py").write_text("a = 2\n")
    assert code_version(tmp_path) == {"commit": head, "dirty": True}


def test_code_version_is_none_outside_a_checkout(tmp_path):
    from bench_tpot import code_version

    assert code_version(tmp_path) is None


def test_results_command_line_names_the_commit_when_the_run_recorded_it():
    from make_results import cmd_line

    assert cmd_line({"command": "python b.py"}, "fb") == "Command: `python b.py`"
    assert cmd_line({}, "fb") == "Command: `fb`"
    assert cmd_line({"command": "c", "code": {"commit": "abc", "dirty": False}}, "fb") == "Command: `c` at abc"
    assert (cmd_line({"command": "c", "code": {"commit": "abc", "dirty": True}}, "fb")
            == "Command: `c` at abc with local changes")


# --- --engines: a rule's rounds pooled over several engines -----------------------------------------------------

def _sample(engine, rnd, arm, tpot, batch=16, rule="paper"):
    return {"engine": engine, "round": rnd, "arm": arm, "tpot_ms": tpot, "batch": batch, "rule": rule}


def test_engine_passes_alternate_the_rule_order():
    from bench_tpot import engine_rule_order

    assert [engine_rule_order(["paper", "error_aware"], e) for e in range(3)] == [
        ["paper", "error_aware"], ["error_aware", "paper"], ["paper", "error_aware"]]


def test_rounds_of_several_engines_pool_and_each_engine_keeps_its_own_figures():
    from bench_tpot import per_engine, round_pairs

    # engine 0: plain 90, SERE 60 (1.5x); engine 1 (slower memory): plain 120, SERE 60 (2x); rounds 0-2 and 3-5
    samples = [_sample(0, r, "plain", 90.0 + r) for r in range(3)] + [_sample(0, r, "S=2", 60.0) for r in range(3)]
    samples += [_sample(1, r, "plain", 120.0) for r in range(3, 6)] + [_sample(1, r, "S=2", 60.0) for r in range(3, 6)]
    samples += [_sample(0, 0, "plain", 10.0, rule="error_aware")]          # another rule: ignored
    assert len(round_pairs(samples, 16, "S=2", "paper")) == 6
    pe = per_engine(samples, 16, "S=2", "paper")
    assert pe["plain_ms"] == [91.0, 120.0]
    assert pe["speedup"][0] == pytest.approx(math.exp(sum(math.log((90 + r) / 60) for r in range(3)) / 3))
    assert pe["speedup"][1] == pytest.approx(2.0)


def test_per_engine_is_none_for_one_engine_and_for_samples_without_engine():
    from bench_tpot import per_engine

    one = [_sample(0, r, a, t) for r in range(3) for a, t in (("plain", 90.0), ("S=2", 60.0))]
    assert per_engine(one, 16, "S=2", "paper") is None
    assert per_engine([{k: v for k, v in s.items() if k != "engine"} for s in one], 16, "S=2", "paper") is None


@pytest.mark.parametrize("argv, msg", [(["--engines", "0"], "--engines must be at least 1"),
                                       (["--engines", "2", "--gpu"], "--engines applies to the CPU benchmark")])
def test_engines_argument_is_checked_in_one_line(argv, msg, capsys):
    from bench_tpot import parse_args

    with pytest.raises(SystemExit) as e:
        parse_args(argv)
    assert e.value.code == 2 and msg in capsys.readouterr().err


def test_results_section_gives_each_engines_figures():
    from make_results import tpot_section

    row = {"experts": 128, "hidden": 2048, "batch": 16, "rule": "paper", "S": 2, "plain_ms": 100.0, "sere_ms": 60.0,
           "speedup": 1.667, "moe_share": 0.8, "distinct_before": 80.0, "distinct_after": 40.0, "bound_speedup": 1.667,
           "engines": 2, "plain_ms_by_engine": [91.0, 120.0], "speedup_by_engine": [1.5, 2.0]}
    d = {"benchmark": "tpot_cpu", "model": {"kind": "random", "experts": 128, "top_k": 8, "hidden": 2048,
                                            "intermediate": 768, "layers": 4},
         "engine": {"vllm": "0.32.0", "bind": "0-1", "worker": {}}, "rho": 0.5, "tokens": 12, "repeats": 3,
         "rows": [row]}
    text, _ = tpot_section(d)
    assert "2 engines per rule" in text
    assert "batch 16 paper S=2: 91.0 / 1.500, 120.0 / 2.000" in text
    text1, _ = tpot_section({**d, "rows": [{k: v for k, v in row.items() if "engine" not in k}]})
    assert "one engine" in text1 and "Engine by engine" not in text1


def test_git_state_lists_changed_files_under_the_paths_with_untracked_ones_on_request(tmp_path):
    from bench_tpot import git_state

    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "a.py").write_text("a = 1\n")
    (tmp_path / "other.py").write_text("b = 1\n")
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "add", "-A")
    _git(tmp_path, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "x")
    (tmp_path / "pkg" / "a.py").write_text("a = 2\n")
    (tmp_path / "pkg" / "new.py").write_text("c = 1\n")
    (tmp_path / "other.py").write_text("b = 2\n")
    commit, changed = git_state(tmp_path, paths=("pkg",), untracked=True)
    assert commit == _git(tmp_path, "rev-parse", "HEAD") and sorted(changed) == ["pkg/a.py", "pkg/new.py"]
    assert git_state(tmp_path, paths=("pkg",))[1] == ["pkg/a.py"]
    assert git_state(tmp_path / "pkg" / ".." / "missing") is None
