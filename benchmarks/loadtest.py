"""Load test of OpenAI-compatible endpoints with `vllm bench serve` metrics, A/B interleaved.

Three ways to run it:

  # 1. local: requests from this process against any endpoint(s)
  python benchmarks/loadtest.py --driver local \
      --arm sere=http://127.0.0.1:8000,sere-tiny --arm base=http://127.0.0.1:8000,sere-tiny-base \
      --qps 2 4 --num-requests 40 --input-len 32 --output-len 16

  # 2. as a Ray job: one load-generator actor on every node of the cluster; --deploy also deploys
  #    the sere_dist app (SERE on and off) on that cluster first and deletes it afterwards
  RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 --working-dir . \
      --runtime-env-json '{"excludes": [".venv", ".git"]}' -- \
      python benchmarks/loadtest.py --driver ray --deploy --qps 1 2 --num-requests 20

  # 3. self-hosted: a simulated head + 2 worker nodes (ray.cluster_utils.Cluster) serving the
  #    sere_dist app with SERE on ("sere") and off ("base") in one app, actors on every node
  python benchmarks/loadtest.py --self-hosted --qps 1 2 4 --num-requests 40

Prints a table, writes JSON (every request's timings plus the summary) and two plots: latency CDFs
and TPOT vs QPS. Arrivals are Poisson (gamma with --burstiness); --max-concurrency caps requests in
flight (with --qps inf: a closed loop at fixed concurrency). Metric definitions: sere_dist/loadgen.py.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from dataclasses import asdict
from pathlib import Path

from sere_dist.eval.loadgen import (Arm, build_schedule, cluster_endpoint, load_prompts, parse_slo, plot_cdfs,
                               plot_tpot_vs_qps, print_table, run_local, run_on_ray, spread_actors,
                               summarize_arms)

RESULTS = Path(__file__).resolve().parent / "results"


def parse_arm(text: str) -> Arm:
    label, sep, rest = text.partition("=")
    url, sep2, model = rest.rpartition(",")
    if not sep or not sep2 or not label or not url or not model:
        raise argparse.ArgumentTypeError(f"--arm {text!r} must be LABEL=BASE_URL,MODEL")
    return Arm(label, url, model)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arm", type=parse_arm, action="append", default=[],
                   help="LABEL=BASE_URL,MODEL; repeat for A/B (requests alternate between arms)")
    p.add_argument("--driver", choices=["local", "ray"], default=None,
                   help="local: this process; ray: actors on every node (default: ray when RAY_ADDRESS is set)")
    p.add_argument("--ray-address", default=None, help="cluster to join (default: $RAY_ADDRESS)")
    p.add_argument("--self-hosted", action="store_true",
                   help="start a 2-worker-node Cluster with the sere_dist app (SERE on and off) and test it")
    p.add_argument("--deploy", action="store_true",
                   help="with --driver ray: deploy the sere_dist app (SERE on and off) on the joined cluster first, "
                        "test it, then delete it (the `ray job submit` all-in-one)")
    p.add_argument("--serve-config", default=None,
                   help="with --self-hosted/--deploy: JSON file of sere_dist.serve.app arguments (default: embedded "
                        "tiny model)")
    p.add_argument("--port", type=int, default=8302, help="with --self-hosted: HTTP port")
    p.add_argument("--qps", nargs="+", type=float, default=[2.0], help="offered loads to sweep (inf = all at once)")
    p.add_argument("--num-requests", type=int, default=40, help="requests per QPS point (all arms together)")
    p.add_argument("--input-len", type=int, default=32, help="random prompt length in tokens")
    p.add_argument("--output-len", type=int, default=16, help="output tokens per request (ignore_eos)")
    p.add_argument("--dataset", default=None, help="prompts file (.jsonl with prompt/text, or one per line)")
    p.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of inter-arrivals (1 = Poisson)")
    p.add_argument("--max-concurrency", type=int, default=None)
    p.add_argument("--goodput", nargs="*", default=None, help="SLOs, e.g. ttft:500 tpot:100 e2el:3000 (ms)")
    p.add_argument("--warmup", type=int, default=4, help="unmeasured requests per arm before the sweep")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(RESULTS / "loadtest.json"))
    args = p.parse_args(argv)
    slo = parse_slo(args.goodput)

    serve_args = model = None
    if args.self_hosted or args.deploy:
        from sere_dist.serve.config import DEFAULT_ARGS
        serve_args = json.loads(Path(args.serve_config).read_text()) if args.serve_config else dict(DEFAULT_ARGS)
        serve_args["baseline"] = True
        serve_args.setdefault("engine", {}).setdefault("max_model_len", 256)
        model = serve_args.get("model_id") or DEFAULT_ARGS["model_id"]
    if args.self_hosted:
        t = time.time()
        with cluster_endpoint(serve_args, port=args.port, app_name="loadtest") as (url, nodes):
            print(f"self-hosted endpoint {url} ready in {time.time() - t:.0f} s on {len(nodes)} nodes", flush=True)
            arms = args.arm or [Arm("sere", url, model), Arm("base", url, f"{model}-base")]
            actors = spread_actors(nodes)
            result = sweep(args, arms, slo, lambda s, a: run_on_ray(s, a, actors, max_concurrency=args.max_concurrency),
                           driver=f"ray actors on {len(nodes)} nodes (Cluster: head + 2 workers)")
            result["serve_args"] = serve_args
    else:
        if not args.arm and not args.deploy:
            p.error("give --arm LABEL=BASE_URL,MODEL (repeat for A/B), or --self-hosted, or --driver ray --deploy")
        arms = args.arm
        driver = args.driver or ("ray" if (args.ray_address or os.environ.get("RAY_ADDRESS")) else "local")
        if args.deploy and driver != "ray":
            p.error("--deploy needs --driver ray (it deploys on the joined cluster)")
        if driver == "ray":
            import ray
            address = args.ray_address or os.environ.get("RAY_ADDRESS")
            if not address:
                p.error("--driver ray needs --ray-address or RAY_ADDRESS (set by `ray job submit`)")
            ray.init(address=address, log_to_driver=False)
            try:
                if args.deploy:
                    arms = deploy(serve_args, model, args.port)
                actors = spread_actors()
                result = sweep(args, arms, slo,
                               lambda s, a: run_on_ray(s, a, actors, max_concurrency=args.max_concurrency),
                               driver=f"ray actors on {len(actors)} nodes")
                if args.deploy:
                    result["serve_args"] = serve_args
            finally:
                if args.deploy:
                    from ray import serve
                    serve.delete("loadtest")
                ray.shutdown()
        else:
            result = sweep(args, arms, slo, lambda s, a: run_local(s, a, max_concurrency=args.max_concurrency),
                           driver="local")
    write(result, Path(args.out))
    return 0


def deploy(serve_args: dict, model: str, port: int) -> list[Arm]:
    """Deploy the sere_dist app on the joined cluster (HTTP on this node) and wait for both models."""
    from ray import serve

    from sere_dist.serve import build_app
    from sere_dist.serve.endpoint import wait_ready

    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(serve_args), name="loadtest", route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    for m in (model, f"{model}-base"):
        wait_ready(url, m)
    return [Arm("sere", url, model), Arm("base", url, f"{model}-base")]


def sweep(args, arms, slo, runner, driver: str) -> dict:
    """Warm up each arm, then one interleaved schedule per QPS point."""
    if args.warmup:
        warm = build_schedule(args.warmup * len(arms), math.inf, arms, input_len=args.input_len,
                              output_len=args.output_len, seed=args.seed + 999)
        runner(warm, arms)
    prompts = load_prompts(args.dataset, args.num_requests) if args.dataset else None
    runs = []
    for i, qps in enumerate(args.qps):
        specs = build_schedule(args.num_requests, qps, arms, input_len=args.input_len, output_len=args.output_len,
                               burstiness=args.burstiness, seed=args.seed + i, prompts=prompts)
        recs, _ = runner(specs, arms)
        metrics = summarize_arms(recs, arms, slo)
        runs.append({"qps": qps, "metrics": metrics, "records": [asdict(r) for r in recs]})
        print_table([runs[-1]])
    return {"benchmark": "loadtest", "command": "python " + " ".join(["benchmarks/loadtest.py"] + sys.argv[1:]),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "driver": driver,
            "arms": [asdict(a) for a in arms], "num_requests": args.num_requests, "input_len": args.input_len,
            "output_len": args.output_len, "burstiness": args.burstiness, "max_concurrency": args.max_concurrency,
            "dataset": args.dataset, "slo_ms": slo, "runs": runs,
            "time": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}


def write(result: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    runs = result["runs"]
    print("\nsummary")
    print_table(runs)
    plot_cdfs(runs, out.with_name(out.stem + "_cdf.png"))
    if len(runs) > 1:
        plot_tpot_vs_qps(runs, out.with_name(out.stem + "_tpot_vs_qps.png"))
    print(f"wrote {out} and plots next to it")


if __name__ == "__main__":
    sys.exit(main())
