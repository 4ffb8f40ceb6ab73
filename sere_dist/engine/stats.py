"""SERE counters and controls outside the hot path: the stats files the plugin's workers write,
their Prometheus collector, and the offline accessors (`sere_stats`, `sere_records`, `sere_control`).

Counters per MoE layer (summed since start): distinct experts before and after re-routing, re-routed
slots, batches with a re-routable token, re-routable tokens. Each worker (TP rank 0 of each DP rank)
copies its counters every second to `$SERE_STATS_DIR/dp<rank>.json`; readers sum the files.
Importing this module does not import vLLM.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Callable

from sere_dist.core.config import SelectTopK, SereConfigError, Threshold, check_value

STATS_ENV = "SERE_STATS_DIR"
COUNTERS = ("distinct_experts_before", "distinct_experts_after", "rerouted_slots", "batches", "tokens")
HELP = {"distinct_experts_before": "Distinct experts used per MoE layer before SERE, summed over batches",
        "distinct_experts_after": "Distinct experts used per MoE layer after SERE, summed over batches",
        "rerouted_slots": "Top-k slots SERE moved to another expert",
        "batches": "Forward batches with at least one re-routable token",
        "tokens": "Tokens eligible for re-routing"}


def read_stats_dir(d: str | os.PathLike) -> dict[int, dict[str, int]]:
    """Sum the per-rank stats files in a stats directory: {layer: {counter: value}}."""
    total: dict[int, dict[str, int]] = {}
    for f in sorted(Path(d).glob("*.json")):
        try:
            layers = json.loads(f.read_text())["layers"]
        except (OSError, ValueError, KeyError):
            continue
        for layer, vals in layers.items():
            acc = total.setdefault(int(layer), dict.fromkeys(COUNTERS, 0))
            for c in COUNTERS:
                acc[c] += int(vals.get(c, 0))
    return total


def register_prometheus(d: str) -> None:
    try:
        from prometheus_client import REGISTRY
        from prometheus_client.core import CounterMetricFamily
    except ImportError:
        return

    class SereCollector:
        def collect(self):
            stats = read_stats_dir(d)
            for c in COUNTERS:
                fam = CounterMetricFamily(f"sere_{c}", HELP[c], labels=["layer"])
                for layer, vals in sorted(stats.items()):
                    fam.add_metric([str(layer)], vals[c])
                yield fam

    try:
        REGISTRY.register(SereCollector())
    except ValueError:  # already registered in this process
        pass


def _writer_rank() -> str | None:
    """File name for this worker's stats, or None when another rank of its TP group reports them."""
    try:
        from vllm.distributed.parallel_state import get_dp_group, get_tensor_model_parallel_rank
        if get_tensor_model_parallel_rank() != 0:
            return None
        return f"dp{get_dp_group().rank_in_group}"
    except Exception:  # noqa: BLE001 - not initialised (single process): one writer
        return "dp0"


_writer: dict[str, threading.Thread] = {}


def start_writer(local_stats: Callable[[], dict[str, dict[str, int]]]) -> None:
    """Start (once per process) the daemon thread that copies this worker's counters to the stats dir."""
    if _writer or not os.environ.get(STATS_ENV):
        return

    def loop(d: str) -> None:
        name = None
        while True:
            time.sleep(1.0)
            try:
                name = name or _writer_rank()
                if name is None:
                    return
                data = json.dumps({"pid": os.getpid(), "layers": local_stats()})
                tmp = Path(d) / f".{name}.{os.getpid()}.tmp"
                tmp.write_text(data)
                os.replace(tmp, Path(d) / f"{name}.json")
            except Exception:  # noqa: BLE001 - stats export must never take the engine down
                if not os.path.isdir(d):
                    return

    th = threading.Thread(target=loop, args=(os.environ[STATS_ENV],), name="sere-stats", daemon=True)
    _writer["thread"] = th
    th.start()


def sere_control(llm, enabled: bool | None = None, select_top_k: int | None = None,
                 threshold: float | None = None, reset: bool = False) -> None:
    """Change SERE settings of a running eager offline engine (benchmarks and tests: pairwise runs
    in one engine). `threshold` is rho, or the gain threshold in the error-aware modes. S outside 1..k or a
    threshold outside [0, 1] raises SereConfigError and changes nothing."""
    if threshold is not None:
        check_value(Threshold, threshold, "threshold")
    if select_top_k is not None:
        from sere_dist.core.model import model_fingerprint
        check_value(SelectTopK, select_top_k, "select_top_k")
        k = model_fingerprint(llm.llm_engine.model_config.hf_config).top_k
        if select_top_k > k:
            raise SereConfigError(f"select_top_k={select_top_k} exceeds the model's top-k ({k})")
    llm.collective_rpc("sere_control", kwargs=dict(enabled=enabled, select_top_k=select_top_k,
                                                  threshold=threshold, reset=reset))


def sere_stats(llm) -> dict[int, dict[str, int]]:
    """Offline accessor: {layer: {distinct_experts_before, distinct_experts_after, rerouted_slots,
    batches, tokens}} summed since start, from the first worker (TP ranks see the same routing)."""
    res = llm.collective_rpc("sere_stats")
    first = res[0] if res else {}
    return {int(k): v for k, v in first.items()}


def sere_records(llm) -> dict[int, list]:
    """Debug (sere.record > 0): the first recorded batches per layer, as router gave them (sorted by
    weight) with the valid mask and the re-routed ids, from the first worker."""
    res = llm.collective_rpc("sere_records")
    first = res[0] if res else {}
    return {int(k): v for k, v in first.items()}
