"""Do our load generator and the stock client agree? `vllm bench serve` against the Ray Serve endpoint.

Starts the endpoint (embedded tiny model, SERE on), then at each concurrency runs the same traffic
(random prompts of --input-len tokens, --output-len tokens each with ignore_eos, all requests offered at
once under a concurrency cap) through `sere_dist.eval.loadgen` (what `benchmarks/loadtest.py` uses) and
through `vllm bench serve`, alternating which goes first (ABBA) over --repeats rounds. Both compute
TPOT per request as (E2E - TTFT) / (output tokens - 1); the table gives both medians and their ratio.

    python benchmarks/bench_clients.py --concurrency 1 4 16 --num-requests 32 --repeats 2

`vllm bench serve` needs `--tokenizer <checkpoint dir>` here: the served model id (`sere-tiny`) is not a
path and there is no model hub; this script passes the embedded model's directory. Writes
benchmarks/results/clients.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from sere_dist.eval.loadgen import Arm, build_schedule, run_local, summarize_arms
from sere_dist.serve.defaults import prepare_default
from sere_dist.serve.endpoint import local_endpoint

RESULTS = Path(__file__).resolve().parent / "results"
MODEL = "sere-tiny"


def ours(url: str, n: int, conc: int, input_len: int, output_len: int, seed: int) -> float:
    arm = Arm("sere", url, MODEL)
    specs = build_schedule(n, math.inf, [arm], input_len=input_len, output_len=output_len, seed=seed)
    recs, _ = run_local(specs, [arm], max_concurrency=conc)
    return summarize_arms(recs, [arm], {})["sere"]["tpot_ms"]["median"]


def stock_result(url: str, model: str, tokenizer: str, n: int, conc: int, input_len: int, output_len: int,
                 seed: int, timeout_s: float = 900) -> dict:
    """One `vllm bench serve` run (the stock client) against `url`; its saved result JSON."""
    vllm = Path(sys.executable).with_name("vllm")
    with tempfile.TemporaryDirectory() as d:
        cmd = [str(vllm), "bench", "serve", "--backend", "openai", "--base-url", url, "--endpoint", "/v1/completions",
               "--model", model, "--tokenizer", tokenizer, "--dataset-name", "random",
               "--random-input-len", str(input_len), "--random-output-len", str(output_len), "--ignore-eos",
               "--num-prompts", str(n), "--max-concurrency", str(conc), "--request-rate", "inf",
               "--seed", str(seed), "--save-result", "--result-dir", d, "--result-filename", "r.json"]
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
        if p.returncode != 0:
            raise RuntimeError(f"vllm bench serve failed ({p.returncode}): {p.stderr[-2000:]}")
        return json.loads((Path(d) / "r.json").read_text())


def stock(url: str, tokenizer: str, n: int, conc: int, input_len: int, output_len: int, seed: int) -> float:
    return float(stock_result(url, MODEL, tokenizer, n, conc, input_len, output_len, seed)["median_tpot_ms"])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--num-requests", type=int, default=32)
    ap.add_argument("--input-len", type=int, default=32)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--port", type=int, default=8310)
    ap.add_argument("--out", type=Path, default=RESULTS / "clients.json")
    args = ap.parse_args()
    model_dir, _ = prepare_default()
    serve_args = {"model": "default", "model_id": MODEL, "sere": {"artifact": "default"},
                  "engine": {"max_model_len": 512, "kv_cache_memory_bytes": 128 * 1024 ** 2},
                  "ingress": {"max_ongoing_requests": 64}}
    load_before = os.getloadavg()
    rows = []
    with local_endpoint(serve_args, port=args.port, quiet=True) as url:
        ours(url, 8, 4, args.input_len, 8, seed=99)                       # warm-up
        for conc in args.concurrency:
            a, b = [], []
            for rep in range(args.repeats):
                order = ("ours", "stock") if rep % 2 == 0 else ("stock", "ours")
                for which in order:
                    if which == "ours":
                        a.append(ours(url, args.num_requests, conc, args.input_len, args.output_len, seed=rep))
                    else:
                        b.append(stock(url, str(model_dir), args.num_requests, conc, args.input_len,
                                       args.output_len, seed=rep))
            row = {"concurrency": conc, "loadtest_tpot_ms": statistics.median(a), "vllm_bench_tpot_ms": statistics.median(b),
                   "loadtest_runs": a, "vllm_bench_runs": b}
            row["ratio"] = row["loadtest_tpot_ms"] / row["vllm_bench_tpot_ms"]
            rows.append(row)
            print(f"concurrency {conc:>3}: median TPOT loadtest {row['loadtest_tpot_ms']:.2f} ms, "
                  f"vllm bench serve {row['vllm_bench_tpot_ms']:.2f} ms, ratio {row['ratio']:.3f}", flush=True)
    out = {"benchmark": "clients", "command": "python " + " ".join(["benchmarks/bench_clients.py"] + sys.argv[1:]),
           "num_requests": args.num_requests, "input_len": args.input_len, "output_len": args.output_len,
           "repeats": args.repeats, "rows": rows, "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
           "time": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    print("\n| concurrency | loadtest TPOT ms | vllm bench serve TPOT ms | ratio |\n| ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['concurrency']} | {r['loadtest_tpot_ms']:.2f} | {r['vllm_bench_tpot_ms']:.2f} | {r['ratio']:.3f} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
