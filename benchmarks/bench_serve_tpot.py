"""Served decode TPOT, plain vs SERE, measured by the stock client (`vllm bench serve`) against Ray Serve.

    python benchmarks/bench_serve_tpot.py [--concurrency 1 16 32] [--repeats 2]

One endpoint (`sere_dist.serve.endpoint.local_endpoint`, HTTP port 8420, Ray metrics port 8492) serves
the bench_tpot.py checkpoint (default: random bf16 Qwen3-MoE shape, E = 128, k = 8, hidden 2048,
intermediate 768, 4 layers; written if missing) twice: `sere-e128` with SERE (S and rho on the
synthetic similarity of bench_tpot.py, default `--sim clusters`, rho 0.5) and `sere-e128-base` with
SERE off (`baseline: true`: the same weights in a second engine). At each concurrency the two model
ids take turns in ABBA order over --repeats rounds; every run is `vllm bench serve --dataset-name
random --ignore-eos --request-rate inf --max-concurrency C` (README "Benchmarks"), so C requests
decode together. The SERE model's distinct
experts per layer per batch come from the plugin's counters on Ray's metrics export (the deltas of
`ray_sere_distinct_experts_{before,after}_total` / `ray_sere_batches_total` over each SERE run).

Writes benchmarks/results/clients_serve_tpot.json; `uptime` before and after goes in it.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from bench_clients import stock_result  # noqa: E402
from bench_tpot import DEFAULT_BIND, abba_orders, ensure_model  # noqa: E402
from bench_tpot import parse_args as tpot_args  # noqa: E402

MODEL_ID = "sere-e128"
METRIC_RE = re.compile(r'^ray_sere_(\w+?)_total\{([^}]*)\}\s+([0-9.eE+-]+)$')


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def sere_counters(metrics_url: str, model_id: str) -> dict[str, float]:
    """Sum over layers of each SERE counter of one model on Ray's metrics export."""
    import httpx

    out: dict[str, float] = {}
    try:
        text = httpx.get(metrics_url, timeout=30).text
    except httpx.HTTPError:
        return out
    for line in text.splitlines():
        m = METRIC_RE.match(line.strip())
        if m and f'model_id="{model_id}"' in m.group(2):
            out[m.group(1)] = out.get(m.group(1), 0.0) + float(m.group(3))
    return out


def settled_counters(metrics_url: str, model_id: str, timeout_s: float = 40.0) -> dict[str, float]:
    """Counters once two looks 4 s apart agree (the plugin writes every 1 s, the exporter adds every 1 s,
    Ray exports on its own period)."""
    last = sere_counters(metrics_url, model_id)
    t0 = time.time()
    while time.time() - t0 < timeout_s:
        time.sleep(4)
        now = sere_counters(metrics_url, model_id)
        if now == last and now:
            return now
        last = now
    return last


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 32])
    ap.add_argument("--prompts-per-concurrency", type=float, default=2.0,
                    help="num-prompts = max(--min-prompts, this x concurrency)")
    ap.add_argument("--min-prompts", type=int, default=6)
    ap.add_argument("--input-len", type=int, default=16)
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--select-top-k", type=int, default=2)
    ap.add_argument("--rho", type=float, default=None, help="default: bench_tpot.py's for its --sim")
    ap.add_argument("--bind", default=DEFAULT_BIND, help="VLLM_CPU_OMP_THREADS_BIND of each replica's worker")
    ap.add_argument("--port", type=int, default=8420)
    ap.add_argument("--metrics-port", type=int, default=8492)
    ap.add_argument("--model-args", default="", help="bench_tpot.py model options, e.g. '--hidden 1024'")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "clients_serve_tpot.json")
    args = ap.parse_args()
    margs = tpot_args(args.model_args.split())
    ckpt, art = ensure_model(margs)
    rho = margs.rho if args.rho is None else args.rho

    from sere_dist.serve.endpoint import local_endpoint

    serve_args = {"model": str(ckpt), "model_id": MODEL_ID, "baseline": True,
                  "sere": {"artifact": str(art), "select_top_k": args.select_top_k, "threshold": rho},
                  "engine": {"max_model_len": 256, "kv_cache_memory_bytes": 512 * 1024 ** 2,
                             "max_num_seqs": max(args.concurrency)},
                  "env": {"VLLM_CPU_OMP_THREADS_BIND": args.bind},
                  "ingress": {"max_ongoing_requests": 4 * max(args.concurrency)}}
    metrics_url = f"http://127.0.0.1:{args.metrics_port}/metrics"
    arms = {"plain": f"{MODEL_ID}-base", "sere": MODEL_ID}
    up_before = uptime()
    print(f"uptime before: {up_before}", flush=True)
    t_start = time.time()
    rows, runs = [], []
    with local_endpoint(serve_args, port=args.port, metrics_port=args.metrics_port, quiet=True,
                        ready_model=MODEL_ID, timeout_s=900) as url:
        from sere_dist.serve.endpoint import wait_ready
        wait_ready(url, arms["plain"], timeout_s=900)
        for model in arms.values():                                     # warm-up both engines
            stock_result(url, model, str(ckpt), 4, 4, args.input_len, 8, seed=99)
        for conc in args.concurrency:
            n = max(args.min_prompts, int(round(args.prompts_per_concurrency * conc)))
            per = {a: [] for a in arms}
            experts = []
            for rnd, order in enumerate(abba_orders(list(arms), args.repeats)):
                for arm in order:
                    c0 = settled_counters(metrics_url, MODEL_ID) if arm == "sere" else None
                    up = uptime()
                    r = stock_result(url, arms[arm], str(ckpt), n, conc, args.input_len, args.output_len, seed=rnd)
                    keep = {k: r.get(k) for k in ("completed", "failed", "duration", "request_throughput",
                                                  "output_throughput", "mean_ttft_ms", "median_ttft_ms",
                                                  "p99_ttft_ms", "mean_tpot_ms", "median_tpot_ms", "p99_tpot_ms",
                                                  "median_itl_ms", "median_e2el_ms")}
                    run = {"concurrency": conc, "arm": arm, "model": arms[arm], "round": rnd, "num_prompts": n,
                           "uptime": up, **keep}
                    if arm == "sere":
                        c1 = settled_counters(metrics_url, MODEL_ID)
                        db = c1.get("batches", 0) - c0.get("batches", 0)
                        if db > 0:
                            d = {c: c1[c] - c0.get(c, 0) for c in ("distinct_experts_before", "distinct_experts_after")}
                            run["distinct_before"] = d["distinct_experts_before"] / db
                            run["distinct_after"] = d["distinct_experts_after"] / db
                            run["counter_batches"] = db
                            experts.append((run["distinct_before"], run["distinct_after"]))
                    per[arm].append(run)
                    runs.append(run)
                    print(f"c={conc:3d} round {rnd} {arm:5s}: median TPOT {r['median_tpot_ms']:.2f} ms, mean "
                          f"{r['mean_tpot_ms']:.2f}, TTFT med {r['median_ttft_ms']:.0f} ms, out "
                          f"{r['output_throughput']:.1f} tok/s, {r['completed']}/{n} ok"
                          + (f"; experts/layer/batch {run['distinct_before']:.1f} -> {run['distinct_after']:.1f} "
                             f"(over {db:.0f} layer-batches)" if "distinct_before" in run else ""), flush=True)

            def med(arm, key):
                vals = [x[key] for x in per[arm] if x.get(key) is not None]
                return statistics.median(vals) if vals else None

            row = {"concurrency": conc, "num_prompts": n}
            for arm in arms:
                for key in ("median_tpot_ms", "mean_tpot_ms", "median_ttft_ms", "output_throughput"):
                    row[f"{arm}_{key}"] = med(arm, key)
            row["tpot_speedup"] = (row["plain_median_tpot_ms"] / row["sere_median_tpot_ms"]
                                   if row["sere_median_tpot_ms"] else None)
            row["throughput_ratio"] = (row["sere_output_throughput"] / row["plain_output_throughput"]
                                       if row["plain_output_throughput"] else None)
            row["distinct_before"] = statistics.fmean(e[0] for e in experts) if experts else None
            row["distinct_after"] = statistics.fmean(e[1] for e in experts) if experts else None
            rows.append(row)
    up_after = uptime()
    print(f"uptime after:  {up_after}", flush=True)
    print("\n| concurrency | prompts | TPOT median plain ms | TPOT median SERE ms | speed-up | out tok/s plain | "
          "SERE | experts before -> after |\n|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        ex = (f"{r['distinct_before']:.1f} -> {r['distinct_after']:.1f}" if r["distinct_before"] is not None else "-")
        print(f"| {r['concurrency']} | {r['num_prompts']} | {r['plain_median_tpot_ms']:.2f} | "
              f"{r['sere_median_tpot_ms']:.2f} | {r['tpot_speedup']:.3f} | {r['plain_output_throughput']:.1f} | "
              f"{r['sere_output_throughput']:.1f} | {ex} |")
    out = {"benchmark": "serve_tpot",
           "command": "python " + " ".join(["benchmarks/bench_serve_tpot.py"] + sys.argv[1:]),
           "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
           "wall_s": round(time.time() - t_start),
           "client": "vllm bench serve (stock), --dataset-name random --ignore-eos --request-rate inf",
           "model": {"path": str(ckpt), "experts": margs.experts, "top_k": margs.top_k, "hidden": margs.hidden,
                     "intermediate": margs.intermediate, "layers": margs.layers, "kind": margs.kind,
                     "similarity": margs.sim},
           "sere": serve_args["sere"], "bind": args.bind, "input_len": args.input_len, "output_len": args.output_len,
           "repeats": args.repeats, "order": "ABBA over model ids per concurrency", "uptime_before": up_before,
           "uptime_after": up_after, "rows": rows, "runs": runs}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
