"""The plugin under the plain `vllm serve` CLI: SERE settings through `--additional-config`, its
counters on the server's own Prometheus `/metrics`, and a bad setting stopping start-up.

Each test starts `vllm serve` as its own process group and ends that group (by its id) afterwards.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from sere_dist.serve.defaults import prepare_default

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

VLLM = Path(sys.executable).with_name("vllm")
PORT = 8211


def _serve(sere: dict, log: Path) -> subprocess.Popen:
    model, art = prepare_default()
    cfg = dict(sere)
    if cfg.get("artifact") == "default":
        cfg["artifact"] = str(art)
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind"}
    env.pop("SERE_STATS_DIR", None)   # the server owns its stats directory
    cmd = [str(VLLM), "serve", str(model), "--served-model-name", "tiny", "--port", str(PORT),
           "--host", "127.0.0.1", "--max-model-len", "256", "--enforce-eager", "--dtype", "bfloat16",
           "--kv-cache-memory-bytes", str(64 * 1024 ** 2), "--additional-config", json.dumps({"sere": cfg})]
    return subprocess.Popen(cmd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


def _metric(text: str, name: str) -> float:
    return sum(float(v) for v in re.findall(rf"^{name}\{{[^}}]*\}} ([0-9.e+]+)$", text, flags=re.M))


def test_vllm_serve_exports_sere_counters_on_metrics(tmp_path):
    log = tmp_path / "serve.log"
    proc = _serve({"artifact": "default", "select_top_k": 1, "threshold": 0.0}, log)
    url = f"http://127.0.0.1:{PORT}"
    try:
        deadline = time.time() + 420
        while True:
            assert proc.poll() is None, "vllm serve exited:\n" + log.read_text()[-4000:]
            try:
                if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.time() < deadline, "vllm serve not healthy in 420 s:\n" + log.read_text()[-4000:]
            time.sleep(2)
        r = httpx.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": ["def f(", "import os"],
                                                      "max_tokens": 8, "ignore_eos": True}, timeout=120)
        assert r.status_code == 200, r.text
        for _ in range(30):                     # worker counters reach the API process within ~1 s
            text = httpx.get(f"{url}/metrics", timeout=10).text
            if _metric(text, "sere_tokens_total") > 0:
                break
            time.sleep(1)
        assert "# TYPE sere_rerouted_slots counter" in text or "# TYPE sere_rerouted_slots_total counter" in text
        layers = set(re.findall(r'^sere_tokens_total\{layer="(\d+)"\}', text, flags=re.M))
        assert layers == {"0", "1", "2", "3"}
        assert _metric(text, "sere_tokens_total") >= 4 * 2 * 7     # 4 layers x 2 requests x 7 decode steps
        assert _metric(text, "sere_rerouted_slots_total") > 0
        assert _metric(text, "sere_distinct_experts_after_total") < _metric(text, "sere_distinct_experts_before_total")
    finally:
        _stop(proc)


def test_vllm_serve_refuses_select_top_k_above_k_at_start_up(tmp_path):
    log = tmp_path / "serve.log"
    proc = _serve({"artifact": "default", "select_top_k": 9}, log)
    try:
        rc = proc.wait(timeout=300)
    finally:
        _stop(proc)
    out = log.read_text()
    assert rc != 0
    assert "sere.select_top_k=9 exceeds the model's top-k (4)" in out, out[-3000:]
