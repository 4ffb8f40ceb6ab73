"""Load-test harness: `vllm bench serve` metric definitions, arrival schedules, and one real run from
load-generator actors on every node of a two-worker-node Ray cluster against a real Serve LLM app."""

import math

import numpy as np
import pytest

from sere_dist.eval.loadgen import (Arm, RequestRecord, arrival_times, build_schedule, cluster_endpoint, parse_slo,
                               random_token_prompts, run_on_ray, spread_actors, summarize, summarize_arms, tpot_s)


def rec(i, start, ttft, e2e, out, arm="a", itl=None, ok=True, prompt=4):
    return RequestRecord(index=i, arm=arm, ok=ok, start_s=start, ttft_s=ttft, e2e_s=e2e,
                         itl_s=list(itl or []), output_tokens=out, prompt_tokens=prompt)


# --- metric definitions on hand-made timings -----------------------------------------------------

def test_tpot_is_decode_time_over_output_tokens_minus_one():
    assert tpot_s(rec(0, 0, ttft=0.2, e2e=1.0, out=5)) == pytest.approx(0.2)
    assert tpot_s(rec(0, 0, ttft=0.2, e2e=0.2, out=1)) is None                     # undefined for one token


def test_summary_reports_throughput_over_the_run_duration_and_ms_percentiles():
    recs = [rec(0, 0.0, 0.1, 0.5, 5, itl=[0.1] * 4),
            rec(1, 1.0, 0.3, 1.0, 8, itl=[0.1] * 7),
            rec(2, 1.5, 0.0, 0.0, 0, ok=False)]
    m = summarize(recs)
    assert m["duration_s"] == pytest.approx(2.0)                                     # last end: 1.0 + 1.0
    assert (m["completed"], m["failed"]) == (2, 1)
    assert m["request_throughput"] == pytest.approx(1.0)
    assert m["output_throughput"] == pytest.approx(13 / 2.0)
    assert m["total_token_throughput"] == pytest.approx((13 + 8) / 2.0)
    assert m["ttft_ms"]["mean"] == pytest.approx(200.0)
    assert m["ttft_ms"]["median"] == pytest.approx(200.0)
    assert m["ttft_ms"]["p90"] == pytest.approx(100 + 0.9 * 200)                      # linear interpolation
    assert m["tpot_ms"]["mean"] == pytest.approx((100.0 + 100.0) / 2)                 # 0.4/4 and 0.7/7
    assert m["itl_ms"]["median"] == pytest.approx(100.0)
    assert m["e2el_ms"]["p99"] == pytest.approx(500 + 0.99 * 500)


def test_goodput_counts_requests_meeting_every_slo():
    recs = [rec(0, 0.0, 0.1, 0.5, 5), rec(1, 0.0, 0.4, 0.8, 5), rec(2, 0.0, 0.1, 1.9, 5)]
    m = summarize(recs, duration_s=2.0, slo_ms={"ttft": 200, "tpot": 200})
    # request 1 misses TTFT; request 2 misses TPOT ((1.9-0.1)/4 = 450 ms)
    assert m["goodput"] == pytest.approx(0.5)
    assert parse_slo(["ttft:200", "tpot:50.5"]) == {"ttft": 200.0, "tpot": 50.5}
    with pytest.raises(ValueError, match="metric 'latency' is unknown"):
        parse_slo(["latency:5"])


def test_arms_are_summarised_separately_over_the_common_duration():
    recs = [rec(0, 0.0, 0.1, 0.5, 5, arm="on"), rec(1, 0.0, 0.1, 4.0, 5, arm="off")]
    m = summarize_arms(recs, [Arm("on", "u", "m"), Arm("off", "u", "m-base")])
    assert m["on"]["duration_s"] == m["off"]["duration_s"] == 4.0
    assert m["on"]["completed"] == m["off"]["completed"] == 1 and m["all"]["completed"] == 2


# --- schedules ------------------------------------------------------------------------------------

def test_poisson_arrivals_have_the_requested_rate_and_unit_coefficient_of_variation():
    t = arrival_times(20000, qps=10.0, burstiness=1.0, seed=0)
    gaps = np.diff(t)
    assert t[0] == 0.0 and np.all(gaps >= 0)
    assert abs(gaps.mean() - 0.1) < 0.002
    assert abs(gaps.std() / gaps.mean() - 1.0) < 0.03


def test_burstiness_below_one_keeps_the_rate_but_clusters_arrivals():
    gaps = np.diff(arrival_times(20000, qps=10.0, burstiness=0.25, seed=1))
    assert abs(gaps.mean() - 0.1) < 0.005
    assert abs(gaps.std() / gaps.mean() - 2.0) < 0.1                                 # CV = 1/sqrt(shape)


def test_infinite_qps_sends_everything_at_once_and_bad_rates_are_refused():
    assert arrival_times(3, math.inf).tolist() == [0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="qps=0"):
        arrival_times(3, 0)


def test_schedule_interleaves_arms_and_prompts_have_the_exact_input_length():
    arms = [Arm("on", "u", "a"), Arm("off", "u", "b")]
    sched = build_schedule(5, 2.0, arms, input_len=7, output_len=3, seed=3)
    assert [s.arm for s in sched] == [0, 1, 0, 1, 0]
    assert all(len(s.prompt) == 7 and s.prompt_tokens == 7 and s.max_tokens == 3 for s in sched)
    assert random_token_prompts(2, 4, seed=9) == random_token_prompts(2, 4, seed=9)


# --- a real run on a two-node cluster -------------------------------------------------------------

SERVE_ARGS = {"model": "default", "model_id": "sere-tiny",
              "sere": {"artifact": "default", "select_top_k": 2, "threshold": 0.3},
              "engine": {"max_model_len": 256, "kv_cache_memory_bytes": 64 * 1024 ** 2},
              "env": {"VLLM_CPU_OMP_THREADS_BIND": "nobind"}}


@pytest.fixture(scope="module")
def endpoint():
    with cluster_endpoint(SERVE_ARGS, port=8301, app_name="loadgen-test") as (url, nodes):
        yield url, nodes


@pytest.mark.vllm
@pytest.mark.ray
def test_actors_on_every_node_stream_interleaved_requests_and_time_every_token(endpoint):
    import ray

    url, nodes = endpoint
    assert len(nodes) == 3                                                            # head + 2 worker nodes
    actors = spread_actors(nodes)
    assert sorted(ray.get([a.node.remote() for a in actors])) == sorted(nodes)
    arms = [Arm("a", url, "sere-tiny"), Arm("b", url, "sere-tiny")]
    sched = build_schedule(12, 6.0, arms, input_len=16, output_len=8, seed=0)
    recs, _ = run_on_ray(sched, arms, actors)
    assert [r.error for r in recs if not r.ok] == []
    assert {r.node for r in recs} == set(nodes)                                       # load came from every node
    assert [r.arm for r in recs] == ["a", "b"] * 6
    assert all(r.output_tokens == 8 and r.prompt_tokens == 16 for r in recs)         # usage from the stream
    assert all(0 < r.ttft_s <= r.e2e_s for r in recs)
    assert all(len(r.itl_s) >= 1 and r.ttft_s + sum(r.itl_s) == pytest.approx(r.e2e_s, abs=1e-6) for r in recs)
    m = summarize_arms(recs, arms)
    assert m["a"]["completed"] == m["b"]["completed"] == 6
    assert m["all"]["total_output_tokens"] == 96 and m["all"]["tpot_ms"]["median"] > 0
