"""SERE counters on Ray's metrics export, next to the vLLM engine metrics of Ray Serve LLM.

Each SERE replica runs one exporter thread (started by the replica callback in `ray_internals`). It
sums the counter files the vLLM plugin's workers write (`sere_dist.engine.stats`) and adds what grew
since its last look to `ray.util.metrics` counters, so Prometheus scraping Ray's metrics port
(`ray start --metrics-export-port`, or `ray.init(_metrics_export_port=...)`) sees, per model and MoE
layer:

    ray_sere_distinct_experts_before_total{model_id="...", layer="0"}
    ray_sere_distinct_experts_after_total, ray_sere_rerouted_slots_total, ray_sere_batches_total,
    ray_sere_tokens_total

and, with `sere.skip_zero_slots` on, per model summed over the workers (under expert parallelism each
rank skips the slots of the experts it does not hold):

    ray_sere_kernel_slots_total, ray_sere_kernel_zero_slots_total, ray_sere_kernel_skipped_slots_total,
    ray_sere_kernel_calls_total, ray_sere_kernel_compacted_calls_total
"""

from __future__ import annotations

import os
import threading
import time

from sere_dist.engine.stats import (COUNTERS, HELP, KERNEL_COUNTERS, KERNEL_HELP, STATS_ENV, read_kernel_stats_dir,
                                    read_stats_dir)

_started: set[str] = set()
_lock = threading.Lock()


def start_exporter(model_id: str, interval_s: float = 1.0) -> bool:
    """Start the exporter for `model_id` in this process (once); False when already running."""
    with _lock:
        if model_id in _started:
            return False
        _started.add(model_id)
    th = threading.Thread(target=_loop, args=(model_id, interval_s), name=f"sere-metrics-{model_id}", daemon=True)
    th.start()
    return True


def _loop(model_id: str, interval_s: float) -> None:
    from ray.util.metrics import Counter

    counters = {c: Counter(f"sere_{c}", description=HELP[c], tag_keys=("model_id", "layer")) for c in COUNTERS}
    kernel = {c: Counter(f"sere_kernel_{c}", description=KERNEL_HELP[c], tag_keys=("model_id",))
              for c in KERNEL_COUNTERS}
    seen: dict[tuple[int, str], int] = {}
    seen_kernel: dict[str, int] = {}
    while True:
        time.sleep(interval_s)
        d = os.environ.get(STATS_ENV)     # set when the plugin registers in this process (or by the config)
        if not d or not os.path.isdir(d):
            continue
        try:
            for layer, vals in read_stats_dir(d).items():
                for c in COUNTERS:
                    total = int(vals.get(c, 0))
                    delta = total - seen.get((layer, c), 0)
                    if delta > 0:
                        counters[c].inc(delta, tags={"model_id": model_id, "layer": str(layer)})
                    seen[(layer, c)] = max(total, seen.get((layer, c), 0))
            for c, total in read_kernel_stats_dir(d).items():
                delta = total - seen_kernel.get(c, 0)
                if delta > 0:
                    kernel[c].inc(delta, tags={"model_id": model_id})
                seen_kernel[c] = max(total, seen_kernel.get(c, 0))
        except Exception:  # noqa: BLE001 - metrics must never take the replica down
            continue
