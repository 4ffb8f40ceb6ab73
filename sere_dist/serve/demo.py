"""The README's main command (`sere serve-demo`): the endpoint with SERE on and off, measured."""

from __future__ import annotations

import asyncio
import copy
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Mapping

from sere_dist.engine.stats import STATS_ENV, read_stats_dir
from sere_dist.serve.config import DEFAULT_ARGS, DEFAULT_MODEL_ID
from sere_dist.serve.defaults import prepare_default
from sere_dist.serve.endpoint import _quiet, local_endpoint, wait_ready


DEMO_PROMPTS = [
    "def fibonacci(n):", "import os\nimport sys\n", "class Queue:\n    def __init__(self", "# Parse the command line",
    "for i in range(10):", "with open(path) as f:", "def main():\n    args =", "try:\n    import json\nexcept",
]


def _diff(after: dict[int, dict[str, int]], before: dict[int, dict[str, int]]) -> dict[int, dict[str, int]]:
    return {layer: {k: v - before.get(layer, {}).get(k, 0) for k, v in c.items()} for layer, c in after.items()}


async def _one(client, url: str, model: str, prompt: str, max_tokens: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    first = None
    text = []
    n = 0
    async with client.stream("POST", f"{url}/v1/completions",
                             json={"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                                   "ignore_eos": True, "stream": True}) as r:
        if r.status_code != 200:
            return {"status": r.status_code, "error": (await r.aread()).decode()[:200]}
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            piece = chunk["choices"][0].get("text", "")
            if piece and first is None:
                first = time.perf_counter() - t0
            text.append(piece)
            n += 1
    total = time.perf_counter() - t0
    return {"status": 200, "ttft_s": first or total, "latency_s": total, "chunks": n, "text": "".join(text)}


async def measure(url: str, model: str, prompts: list[str], max_tokens: int) -> dict[str, Any]:
    """Send all prompts at once (one decode batch) as streaming completions; latency statistics."""
    import httpx

    async with httpx.AsyncClient(timeout=300) as client:
        t0 = time.perf_counter()
        res = await asyncio.gather(*[_one(client, url, model, p, max_tokens) for p in prompts])
        wall = time.perf_counter() - t0
    ok = [r for r in res if r["status"] == 200]
    tokens = len(ok) * max_tokens
    return {"model": model, "requests": len(prompts), "ok": len(ok), "max_tokens": max_tokens,
            "wall_s": wall, "output_tok_per_s": tokens / wall if wall else 0.0,
            "ttft_median_s": statistics.median(r["ttft_s"] for r in ok) if ok else None,
            "latency_median_s": statistics.median(r["latency_s"] for r in ok) if ok else None,
            "tpot_median_ms": statistics.median((r["latency_s"] - r["ttft_s"]) / max(max_tokens - 1, 1) * 1e3
                                                for r in ok) if ok else None,
            "texts": [r.get("text") for r in res]}


def run_demo(port: int = 8000, requests: int = 8, max_tokens: int = 32, rounds: int = 2,
             json_out: str | None = None, config: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Start the endpoint on the embedded default (SERE model + SERE-off baseline), wait until a real
    completion succeeds, send the same batch to both, print and return what was measured."""
    import httpx

    t0 = time.time()
    _quiet()
    print("[1/4] preparing the embedded tiny MoE model and its calibration artifact", flush=True)
    model_dir, art_dir = prepare_default()
    meta = json.loads((Path(art_dir) / "metadata.json").read_text())
    fp = meta["fingerprint"]
    print(f"      model {model_dir} ({fp['architecture']}, {len(fp['moe_layers'])} MoE layers, "
          f"{fp['num_experts']} experts, top-{fp['top_k']}); artifact {art_dir} ({meta['metric']}, "
          f"{meta['tokens']} tokens)", flush=True)
    args = copy.deepcopy(dict(config or DEFAULT_ARGS))
    args["baseline"] = True
    stats_dir = tempfile.mkdtemp(prefix="sere-stats-")
    args["env"] = dict(args.get("env") or {}, **{STATS_ENV: stats_dir})
    model_id = args.get("model_id") or DEFAULT_MODEL_ID
    sere = args.get("sere") or {}
    print(f"[2/4] starting Ray Serve + vLLM at http://127.0.0.1:{port} (models {model_id} with SERE "
          f"S={sere.get('select_top_k')} rho={sere.get('threshold')}, and {model_id}-base without)", flush=True)
    t_start = time.time()
    with local_endpoint(args, port=port, quiet=True) as url:
        wait_ready(url, f"{model_id}-base", timeout_s=600)
        ready = time.time() - t_start
        print(f"      ready in {ready:.1f} s (a real completion answered on both models)", flush=True)
        prompts = (DEMO_PROMPTS * (requests // len(DEMO_PROMPTS) + 1))[:requests]
        print(f"[3/4] {rounds} rounds of {requests} concurrent streaming completions x {max_tokens} tokens "
              f"per model (greedy)", flush=True)
        rows: dict[str, list[dict[str, Any]]] = {model_id: [], f"{model_id}-base": []}
        for i in range(rounds):
            if i == rounds - 1:
                time.sleep(1.5)  # the plugin's workers flush their counters every second
                before = read_stats_dir(stats_dir)
            for m in rows:
                rows[m].append(asyncio.run(measure(url, m, prompts, max_tokens)))
        time.sleep(2.5)
        counters = _diff(read_stats_dir(stats_dir), before)
        models_list = httpx.get(f"{url}/v1/models", timeout=30).json()
    summary = []
    for m, runs in rows.items():
        last = runs[-1]
        summary.append({k: v for k, v in last.items() if k != "texts"} |
                       {"wall_s_rounds": [round(r["wall_s"], 3) for r in runs]})
    base = rows[f"{model_id}-base"]
    same = sum(a == b for a, b in zip(rows[model_id][-1]["texts"], base[-1]["texts"]))
    # bf16 decode is not batch-invariant: the base model against itself across rounds is the noise floor
    floor = sum(a == b for a, b in zip(base[0]["texts"], base[-1]["texts"])) if len(base) > 1 else None
    print("[4/4] measured (last round; earlier rounds warm up):")
    print(f"{'model':<18} {'SERE':>5} {'ok':>5} {'wall s':>8} {'tok/s':>8} {'TTFT ms':>8} {'TPOT ms':>8}")
    for s in summary:
        on = "off" if s["model"].endswith("-base") else "on"
        print(f"{s['model']:<18} {on:>5} {s['ok']:>2}/{s['requests']:<2} {s['wall_s']:8.3f} "
              f"{s['output_tok_per_s']:8.1f} {s['ttft_median_s'] * 1e3:8.1f} {s['tpot_median_ms']:8.2f}")
    print(f"identical greedy completions, SERE on vs off: {same}/{requests}"
          + (f" (SERE off vs itself, earlier round: {floor}/{requests})" if floor is not None else ""))
    print(f"/v1/models lists: {[d['id'] for d in models_list.get('data', [])]}")
    if counters:
        print("SERE inside the replica (vLLM plugin counters, last round), per MoE layer and forward batch:")
        print(f"{'layer':>6} {'batches':>8} {'experts before':>15} {'after':>7} {'re-routed slots/token':>22}")
        for layer, c in sorted(counters.items()):
            b = max(c["batches"], 1)
            print(f"{layer:>6} {c['batches']:>8} {c['distinct_experts_before'] / b:15.2f} "
                  f"{c['distinct_experts_after'] / b:7.2f} {c['rerouted_slots'] / max(c['tokens'], 1):22.2f}")
    else:
        print("SERE counters: none reported (is the sere-dist vLLM plugin installed in this environment?)")
    shutil.rmtree(stats_dir, ignore_errors=True)
    result = {"endpoint_ready_s": round(ready, 1), "total_s": round(time.time() - t0, 1), "runs": summary,
              "sere_counters": {str(k): v for k, v in counters.items()}, "identical_completions": same,
              "identical_base_vs_base": floor, "requests": requests, "sere": sere, "artifact": str(art_dir)}
    print(f"demo finished in {result['total_s']} s")
    if json_out:
        Path(json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(json_out).write_text(json.dumps(result, indent=1))
    return result
