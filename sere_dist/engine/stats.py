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


KERNEL_COUNTERS = ("slots", "zero_slots", "skipped_slots", "calls", "compacted_calls")
KERNEL_HELP = {"slots": "Top-k slots the MoE experts kernel was given (sere.skip_zero_slots on), summed over ranks",
               "zero_slots": "Of those, slots with weight 0 (computed anyway in calls where skipping them "
                             "would not pay), summed over ranks",
               "skipped_slots": "Weight-0 slots the MoE experts kernel did not compute (sere.skip_zero_slots), "
                                "summed over ranks",
               "calls": "MoE experts kernel calls under sere.skip_zero_slots, summed over ranks",
               "compacted_calls": "Of those, calls that skipped at least one weight-0 slot"}


def read_kernel_stats_dir(d: str | os.PathLike) -> dict[str, int]:
    """Sum the `skip_zero_slots` kernel counters over every rank's stats file ({} when the skip is off)."""
    total: dict[str, int] = {}
    for f in sorted(Path(d).glob("*.json")):
        try:
            kern = json.loads(f.read_text()).get("kernel") or {}
        except (OSError, ValueError, AttributeError):
            continue
        for c in KERNEL_COUNTERS:
            if c in kern:
                total[c] = total.get(c, 0) + int(kern[c])
    return total


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


def register_prometheus(d: str, registry=None) -> None:
    """Expose the counters in stats directory `d` on `registry` (prometheus_client's default one, which
    `vllm serve` serves on /metrics)."""
    try:
        from prometheus_client import REGISTRY
        from prometheus_client.core import CounterMetricFamily
    except ImportError:
        return
    registry = REGISTRY if registry is None else registry

    class SereCollector:
        def collect(self):
            stats = read_stats_dir(d)
            for c in COUNTERS:
                fam = CounterMetricFamily(f"sere_{c}", HELP[c], labels=["layer"])
                for layer, vals in sorted(stats.items()):
                    fam.add_metric([str(layer)], vals[c])
                yield fam
            kern = read_kernel_stats_dir(d)
            for c in KERNEL_COUNTERS if kern else ():
                yield CounterMetricFamily(f"sere_kernel_{c}", KERNEL_HELP[c], value=kern.get(c, 0))

    try:
        registry.register(SereCollector())
    except ValueError:  # already registered in this process
        pass


def _writer_rank() -> tuple[str, bool]:
    """(file name for this worker's stats, whether it reports the per-layer counters): TP rank 0 of each
    DP rank reports them (the ranks of a TP group route alike); every rank reports its own kernel counters
    (under expert parallelism each rank skips different slots)."""
    try:
        from vllm.distributed.parallel_state import get_dp_group, get_tensor_model_parallel_rank
        tp, dp = get_tensor_model_parallel_rank(), get_dp_group().rank_in_group
        return (f"dp{dp}", True) if tp == 0 else (f"dp{dp}-tp{tp}", False)
    except Exception:  # noqa: BLE001 - not initialised (single process): one writer
        return "dp0", True


_writer: dict[str, threading.Thread] = {}


def start_writer(local_stats: Callable[[], dict[str, dict[str, int]]],
                 kernel_stats: Callable[[], dict[str, int]] = dict) -> None:
    """Start (once per process) the daemon thread that copies this worker's counters to the stats dir."""
    if _writer or not os.environ.get(STATS_ENV):
        return

    def loop(d: str) -> None:
        who = None
        while True:
            time.sleep(1.0)
            try:
                who = who or _writer_rank()
                name, layers = who
                kern = kernel_stats()
                if not layers and not kern:
                    continue
                data = json.dumps({"pid": os.getpid(), "layers": local_stats() if layers else {}, "kernel": kern})
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
                 threshold: float | None = None, reset: bool = False, merge_duplicates: bool | None = None,
                 skip_zero_slots: bool | None = None) -> None:
    """Change SERE settings of a running eager offline engine (benchmarks and tests: pairwise runs
    in one engine). `threshold` is rho, or the gain threshold in the error-aware modes. S outside 1..k or a
    threshold outside [0, 1] raises SereConfigError and changes nothing. `skip_zero_slots` switches the
    skip only in an engine started with `sere.skip_zero_slots: true` (which installs it)."""
    for name, v in (("merge_duplicates", merge_duplicates), ("skip_zero_slots", skip_zero_slots)):
        if v is not None and not isinstance(v, bool):
            raise SereConfigError(f"{name} must be true or false, got {v!r}")
    if threshold is not None:
        check_value(Threshold, threshold, "threshold")
    if select_top_k is not None:
        from sere_dist.core.model import model_fingerprint
        check_value(SelectTopK, select_top_k, "select_top_k")
        k = model_fingerprint(llm.llm_engine.model_config.hf_config).top_k
        if select_top_k > k:
            raise SereConfigError(f"select_top_k={select_top_k} exceeds the model's top-k ({k})")
    llm.collective_rpc("sere_control", kwargs=dict(enabled=enabled, select_top_k=select_top_k,
                                                  threshold=threshold, reset=reset,
                                                  merge_duplicates=merge_duplicates,
                                                  skip_zero_slots=skip_zero_slots))


def sere_stats(llm) -> dict[int, dict[str, int]]:
    """Offline accessor: {layer: {distinct_experts_before, distinct_experts_after, rerouted_slots,
    batches, tokens}} summed since start, from the first worker (TP ranks see the same routing)."""
    res = llm.collective_rpc("sere_stats")
    first = res[0] if res else {}
    return {int(k): v for k, v in first.items()}


def sere_kernel_stats(llm) -> list[dict[str, int]]:
    """Offline accessor (`sere.skip_zero_slots`): per worker, the experts-kernel calls, those that skipped
    weight-0 slots, and the slots seen and skipped, summed since start ({} per worker when the skip is off).
    One entry per worker: under expert parallelism each rank skips its own non-local slots."""
    return list(llm.collective_rpc("sere_kernel_stats"))


def sere_records(llm) -> dict[int, list]:
    """Debug (sere.record > 0): the first recorded batches per layer, as router gave them (sorted by
    weight) with the valid mask and the re-routed ids, from the first worker."""
    res = llm.collective_rpc("sere_records")
    first = res[0] if res else {}
    return {int(k): v for k, v in first.items()}
