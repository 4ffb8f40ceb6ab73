"""Load generation against OpenAI-compatible endpoints: arrival schedules, a streaming SSE client, Ray
actors that spread the load over every node of a cluster, and `vllm bench serve`-style metrics.

Definitions (the same as `vllm bench serve`; times in seconds inside, milliseconds in reports):
    TTFT  time from sending the request to the first streamed chunk that carries a choice
    ITL   gaps between successive chunks of one request (every gap of every request is one sample)
    TPOT  per request (e2e - TTFT) / (output_tokens - 1), for requests with more than one output token
    E2EL  time from sending the request to its last chunk
    request throughput = completed requests / duration; output throughput = output tokens / duration,
    duration = from the schedule's start to the end of the last request.
    goodput = completed requests meeting every given SLO (ttft, tpot, e2el in ms) / duration.
    Percentiles are linear-interpolated (numpy's default), as vLLM reports them.

A run is a list of `Arm`s (endpoint + model name). Request i goes to arm i % len(arms), so in A/B mode
(SERE on vs off) the two arms are interleaved in one schedule and machine noise hits both alike.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np


@dataclass(frozen=True)
class Arm:
    """One side of a comparison: an OpenAI-compatible base URL (without /v1) and a model name."""

    label: str
    base_url: str
    model: str


@dataclass(frozen=True)
class RequestSpec:
    """One scheduled request: arrival offset (s from the run's start), prompt (text or token ids)."""

    index: int
    arrival_s: float
    arm: int
    prompt: str | list[int]
    prompt_tokens: int | None
    max_tokens: int


@dataclass
class RequestRecord:
    """What one request did. Times are seconds; `start_s` is relative to the run's start."""

    index: int
    arm: str
    ok: bool
    start_s: float = 0.0
    ttft_s: float = 0.0
    e2e_s: float = 0.0
    itl_s: list[float] = field(default_factory=list)
    output_tokens: int = 0
    prompt_tokens: int = 0
    error: str = ""
    node: str = ""

    @property
    def end_s(self) -> float:
        return self.start_s + self.e2e_s


# ---------------------------------------------------------------------------------------------
# Schedules and prompts

def arrival_times(num_requests: int, qps: float, burstiness: float = 1.0, seed: int = 0) -> np.ndarray:
    """[N] arrival offsets (s) of a renewal process with rate `qps`.

    Inter-arrival gaps are gamma distributed with shape = burstiness and mean 1/qps: burstiness 1 is a
    Poisson process, < 1 burstier, > 1 more regular (as `vllm bench serve --burstiness`).
    qps = inf sends everything at t = 0 (pair it with a concurrency limit for a closed loop).
    """
    if num_requests < 0:
        raise ValueError(f"num_requests={num_requests} must be >= 0")
    if not qps > 0:
        raise ValueError(f"qps={qps} must be > 0 (use inf for all-at-once)")
    if not burstiness > 0:
        raise ValueError(f"burstiness={burstiness} must be > 0")
    if math.isinf(qps):
        return np.zeros(num_requests)
    rng = np.random.default_rng(seed)
    gaps = rng.gamma(shape=burstiness, scale=1.0 / (qps * burstiness), size=num_requests)
    return np.cumsum(gaps) - gaps[0] if num_requests else gaps  # first request at t = 0


def random_token_prompts(num: int, input_len: int, seed: int = 0, low: int = 16, high: int = 1000) -> list[list[int]]:
    """`num` prompts of exactly `input_len` token ids drawn uniformly from [low, high) (the random dataset)."""
    rng = random.Random(seed)
    return [[rng.randrange(low, high) for _ in range(input_len)] for _ in range(num)]


def load_prompts(path: str | Path, num: int) -> list[str]:
    """Prompts from a file: JSONL with a "prompt" or "text" field per line, or plain text (one per line).
    Cycles through the file when it has fewer than `num`."""
    path = Path(path)
    out: list[str] = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        if path.suffix in (".jsonl", ".json"):
            row = json.loads(line)
            text = row.get("prompt") or row.get("text")
            if not text:
                raise ValueError(f"{path}: a line has neither 'prompt' nor 'text'")
            out.append(text)
        else:
            out.append(line)
    if not out:
        raise ValueError(f"{path}: no prompts")
    return [out[i % len(out)] for i in range(num)]


def build_schedule(num_requests: int, qps: float, arms: Sequence[Arm], *, input_len: int = 32,
                   output_len: int = 16, burstiness: float = 1.0, seed: int = 0,
                   prompts: Sequence[str | list[int]] | None = None) -> list[RequestSpec]:
    """The whole run's requests: arrivals, interleaved arms, prompts (random token ids unless given)."""
    if not arms:
        raise ValueError("at least one arm (base URL + model) is needed")
    if output_len < 1:
        raise ValueError(f"output_len={output_len} must be >= 1")
    times = arrival_times(num_requests, qps, burstiness, seed)
    if prompts is None:
        prompts = random_token_prompts(num_requests, input_len, seed)
    prompts = list(prompts)
    if len(prompts) < num_requests:
        raise ValueError(f"{len(prompts)} prompts for {num_requests} requests")
    return [RequestSpec(i, float(times[i]), i % len(arms), prompts[i],
                        len(prompts[i]) if isinstance(prompts[i], list) else None, output_len)
            for i in range(num_requests)]


# ---------------------------------------------------------------------------------------------
# The streaming client

async def send_one(client, arm: Arm, spec: RequestSpec, t0: float, node: str = "") -> RequestRecord:
    """POST /v1/completions with stream=true and usage in the last chunk; times every chunk.

    t0: the run's start on the `time.time()` clock (shared by every node), so `start_s` lines up.
    """
    body = {"model": arm.model, "prompt": spec.prompt, "max_tokens": spec.max_tokens, "temperature": 0.0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    rec = RequestRecord(spec.index, arm.label, ok=False, node=node, prompt_tokens=spec.prompt_tokens or 0)
    start_wall = time.time()
    st = time.perf_counter()
    rec.start_s = start_wall - t0
    last = st
    chunks = 0
    usage_tokens = None
    try:
        async with client.stream("POST", f"{arm.base_url.rstrip('/')}/v1/completions", json=body) as r:
            if r.status_code != 200:
                rec.error = f"HTTP {r.status_code}: {(await r.aread()).decode(errors='replace')[:200]}"
                rec.e2e_s = time.perf_counter() - st
                return rec
            async for line in r.aiter_lines():
                if not line.startswith("data:"):
                    continue
                payload = line[5:].strip()
                if payload == "[DONE]":
                    continue
                data = json.loads(payload)
                if data.get("choices"):
                    now = time.perf_counter()
                    if chunks == 0:
                        rec.ttft_s = now - st
                    else:
                        rec.itl_s.append(now - last)
                    last = now
                    chunks += 1
                usage = data.get("usage")
                if usage:
                    usage_tokens = usage.get("completion_tokens")
                    rec.prompt_tokens = usage.get("prompt_tokens") or rec.prompt_tokens
        rec.e2e_s = last - st
        rec.output_tokens = int(usage_tokens) if usage_tokens is not None else chunks
        rec.ok = chunks > 0
        if not rec.ok:
            rec.error = "stream ended without a chunk"
    except Exception as exc:  # network errors, bad JSON: the request failed, the run goes on
        rec.error = f"{type(exc).__name__}: {exc}"[:300]
        rec.e2e_s = time.perf_counter() - st
    return rec


async def run_schedule(specs: Sequence[RequestSpec], arms: Sequence[Arm], t0: float,
                       max_concurrency: int | None = None, node: str = "",
                       timeout_s: float = 600.0) -> list[RequestRecord]:
    """Send `specs` at t0 + arrival_s (wall clock), at most `max_concurrency` in flight."""
    import httpx

    sem = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=timeout_s, limits=limits) as client:
        async def one(spec: RequestSpec) -> RequestRecord:
            delay = t0 + spec.arrival_s - time.time()
            if delay > 0:
                await asyncio.sleep(delay)
            if sem is None:
                return await send_one(client, arms[spec.arm], spec, t0, node)
            async with sem:
                return await send_one(client, arms[spec.arm], spec, t0, node)
        return list(await asyncio.gather(*(one(s) for s in specs)))


# ---------------------------------------------------------------------------------------------
# Ray: one load-generator actor per node

class _LoadGenerator:
    """Ray actor body: sends its share of the global schedule from its node."""

    def node(self) -> str:
        import ray
        return ray.get_runtime_context().get_node_id()

    async def run(self, specs, arms, t0, max_concurrency, timeout_s):
        import ray
        node = ray.get_runtime_context().get_node_id()
        recs = await run_schedule(specs, arms, t0, max_concurrency, node, timeout_s)
        return [asdict(r) for r in recs]


def spread_actors(nodes: Iterable[str] | None = None):
    """One load-generator actor pinned to each alive node (NodeAffinity, hard), 0 CPUs each."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    node_ids = list(nodes) if nodes is not None else [n["NodeID"] for n in ray.nodes() if n["Alive"]]
    cls = ray.remote(num_cpus=0)(_LoadGenerator)
    return [cls.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n, soft=False)).remote() for n in node_ids]


def run_on_ray(specs: Sequence[RequestSpec], arms: Sequence[Arm], actors: Sequence, *,
               max_concurrency: int | None = None, lead_s: float = 2.0,
               timeout_s: float = 600.0) -> tuple[list[RequestRecord], float]:
    """Deal the schedule round-robin over the actors (each gets a thinned copy of the same process),
    start them on a common wall-clock t0, gather every record. Returns (records, t0)."""
    import ray

    n = len(actors)
    if n == 0:
        raise ValueError("no load-generator actors")
    per_actor = None if not max_concurrency else max(1, math.ceil(max_concurrency / n))
    t0 = time.time() + lead_s
    refs = [a.run.remote([s for s in specs if s.index % n == i], list(arms), t0, per_actor, timeout_s)
            for i, a in enumerate(actors)]
    recs = [RequestRecord(**d) for part in ray.get(refs) for d in part]
    return sorted(recs, key=lambda r: r.index), t0


def run_local(specs: Sequence[RequestSpec], arms: Sequence[Arm], *, max_concurrency: int | None = None,
              timeout_s: float = 600.0) -> tuple[list[RequestRecord], float]:
    """Send the schedule from this process. Returns (records, t0)."""
    t0 = time.time() + 0.2
    recs = asyncio.run(run_schedule(specs, arms, t0, max_concurrency, "local", timeout_s))
    return recs, t0


# ---------------------------------------------------------------------------------------------
# Metrics

def _stats_ms(values: Sequence[float], percentiles: Sequence[float] = (50, 90, 99)) -> dict[str, float]:
    if len(values) == 0:
        return {"mean": float("nan"), "median": float("nan"), "std": float("nan"),
                **{f"p{p:g}": float("nan") for p in percentiles}}
    a = np.asarray(values, dtype=float) * 1e3
    out = {"mean": float(a.mean()), "median": float(np.median(a)), "std": float(a.std())}
    for p in percentiles:
        out[f"p{p:g}"] = float(np.percentile(a, p))
    return out


def tpot_s(rec: RequestRecord) -> float | None:
    """(e2e - TTFT) / (output_tokens - 1); None for one-token outputs (undefined)."""
    if rec.output_tokens <= 1:
        return None
    return (rec.e2e_s - rec.ttft_s) / (rec.output_tokens - 1)


def summarize(records: Sequence[RequestRecord], duration_s: float | None = None,
              slo_ms: Mapping[str, float] | None = None) -> dict[str, Any]:
    """`vllm bench serve` metrics for a set of records (see the module docstring).

    duration_s: the benchmark duration; default = the latest end among all records (from t = 0).
    slo_ms: e.g. {"ttft": 500, "tpot": 50, "e2el": 2000}; goodput counts requests meeting all of them.
    """
    slo_ms = dict(slo_ms or {})
    unknown = set(slo_ms) - {"ttft", "tpot", "e2el"}
    if unknown:
        raise ValueError(f"unknown SLO metric(s) {sorted(unknown)}; use ttft, tpot, e2el (milliseconds)")
    ok = [r for r in records if r.ok]
    if duration_s is None:
        duration_s = max((r.end_s for r in records), default=0.0)
    tpots = [t for t in (tpot_s(r) for r in ok) if t is not None]
    itls = [g for r in ok for g in r.itl_s]
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.prompt_tokens for r in ok)
    good = 0
    for r in ok:
        t = tpot_s(r)
        checks = {"ttft": r.ttft_s, "tpot": t if t is not None else 0.0, "e2el": r.e2e_s}
        if all(checks[m] * 1e3 <= v for m, v in slo_ms.items()):
            good += 1
    d = duration_s if duration_s > 0 else float("nan")
    res = {
        "completed": len(ok), "failed": len(records) - len(ok), "duration_s": duration_s,
        "total_input_tokens": in_tokens, "total_output_tokens": out_tokens,
        "request_throughput": len(ok) / d, "output_throughput": out_tokens / d,
        "total_token_throughput": (in_tokens + out_tokens) / d,
        "ttft_ms": _stats_ms([r.ttft_s for r in ok]), "tpot_ms": _stats_ms(tpots),
        "itl_ms": _stats_ms(itls), "e2el_ms": _stats_ms([r.e2e_s for r in ok]),
        "errors": sorted({r.error for r in records if not r.ok})[:5],
    }
    if slo_ms:
        res["slo_ms"] = slo_ms
        res["goodput"] = good / d
    return res


def summarize_arms(records: Sequence[RequestRecord], arms: Sequence[Arm],
                   slo_ms: Mapping[str, float] | None = None) -> dict[str, dict[str, Any]]:
    """Per-arm metrics over the run's common duration (arms were interleaved in one schedule)."""
    duration = max((r.end_s for r in records), default=0.0)
    out = {"all": summarize(records, duration, slo_ms)}
    for arm in arms:
        out[arm.label] = summarize([r for r in records if r.arm == arm.label], duration, slo_ms)
    return out


def parse_slo(items: Sequence[str] | None) -> dict[str, float]:
    """["ttft:500", "tpot:50"] -> {"ttft": 500.0, "tpot": 50.0} (vllm bench serve --goodput syntax)."""
    out = {}
    for it in items or []:
        key, sep, val = it.partition(":")
        if not sep:
            raise ValueError(f"--goodput {it!r} must be METRIC:MILLISECONDS (ttft, tpot or e2el)")
        if key not in ("ttft", "tpot", "e2el"):
            raise ValueError(f"--goodput metric {key!r} is unknown; use ttft, tpot or e2el")
        out[key] = float(val)
    return out


# ---------------------------------------------------------------------------------------------
# Plots

def plot_cdfs(runs: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """Latency CDFs (TTFT, TPOT, E2EL) per arm, one line style per QPS. runs: the JSON 'runs' list."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for run in runs:
        recs = [RequestRecord(**r) for r in run["records"]]
        for label in sorted({r.arm for r in recs}):
            rs = [r for r in recs if r.arm == label and r.ok]
            series = {"TTFT": [r.ttft_s * 1e3 for r in rs],
                      "TPOT": [t * 1e3 for t in (tpot_s(r) for r in rs) if t is not None],
                      "E2EL": [r.e2e_s * 1e3 for r in rs]}
            for ax, (name, vals) in zip(axes, series.items()):
                if vals:
                    v = np.sort(vals)
                    ax.step(v, np.arange(1, len(v) + 1) / len(v), where="post",
                            label=f"{label} @ {run['qps']:g} qps")
                ax.set_xlabel(f"{name} (ms)")
    axes[0].set_ylabel("fraction of requests")
    axes[-1].legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_tpot_vs_qps(runs: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """Median and p99 TPOT per arm against the offered QPS."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    labels = [k for k in runs[0]["metrics"] if k != "all"]
    for label in labels:
        qps = [r["qps"] for r in runs]
        ax.plot(qps, [r["metrics"][label]["tpot_ms"]["median"] for r in runs], "o-", label=f"{label} median")
        ax.plot(qps, [r["metrics"][label]["tpot_ms"]["p99"] for r in runs], "x--", label=f"{label} p99")
    ax.set_xlabel("offered load (requests/s)")
    ax.set_ylabel("TPOT (ms)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def print_table(runs: Sequence[Mapping[str, Any]]) -> None:
    hdr = (f"{'qps':>6} {'arm':<16} {'ok':>5} {'err':>4} {'req/s':>7} {'out tok/s':>9} {'TTFT med':>9} "
           f"{'TTFT p99':>9} {'TPOT med':>9} {'TPOT p99':>9} {'ITL med':>8} {'E2EL med':>9} {'goodput':>8}")
    print(hdr)
    for run in runs:
        for label, m in run["metrics"].items():
            if label == "all":
                continue
            print(f"{run['qps']:>6g} {label:<16} {m['completed']:>5} {m['failed']:>4} {m['request_throughput']:7.2f} "
                  f"{m['output_throughput']:9.1f} {m['ttft_ms']['median']:9.1f} {m['ttft_ms']['p99']:9.1f} "
                  f"{m['tpot_ms']['median']:9.2f} {m['tpot_ms']['p99']:9.2f} {m['itl_ms']['median']:8.2f} "
                  f"{m['e2el_ms']['median']:9.1f} {m.get('goodput', float('nan')):8.2f}")


# ---------------------------------------------------------------------------------------------
# A simulated multi-node cluster serving the sere_dist app (tests, self-hosted benchmark runs)

@contextlib.contextmanager
def cluster_endpoint(serve_args: Mapping[str, Any], *, port: int = 8300, worker_nodes: int = 2,
                     cpus_per_node: float = 2, app_name: str = "sere-load", timeout_s: float = 600):
    """Head + `worker_nodes` simulated nodes (`ray.cluster_utils.Cluster`), the sere_dist Serve app with
    its LLM replicas on the last worker node and the ingress + HTTP proxy on the head.

    Yields (base_url, node_ids). Connects this process to the cluster; everything is torn down on exit.
    """

    import ray
    from ray import serve
    from ray.cluster_utils import Cluster

    from sere_dist.serve.app import build_app, resolve
    from sere_dist.serve.endpoint import wait_ready

    resolved = resolve(serve_args)  # bad arguments fail before any node starts; resolved once
    mem = 300 * 1024 ** 2
    # Starting a head records it as this host's "current" cluster (what a bare ray.init() or the ray
    # CLI joins); put back whatever was recorded so other clusters on the host keep being found.
    current = Path("/tmp/ray/ray_current_cluster")
    previous = current.read_text() if current.exists() else None
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "resources": {"head": 1}, "object_store_memory": mem, "include_dashboard": False})
    _restore(current, previous)
    try:
        for i in range(worker_nodes):
            cluster.add_node(num_cpus=cpus_per_node, resources={f"worker{i}": 1}, object_store_memory=mem)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False)
        last = f"worker{worker_nodes - 1}"
        ingress = dict(resolved.ingress, ray_actor_options={"num_cpus": 0, "resources": {"head": 0.01}})
        args = resolved.model_copy(update={
            "placement": {"bundles": [{"CPU": resolved.cpus_per_worker, last: 0.01}], "strategy": "PACK"},
            "ingress": ingress})
        serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(args), name=app_name, route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        model = args.model_id
        wait_ready(url, model, timeout_s=timeout_s)
        if args.baseline:
            wait_ready(url, f"{model}-base", timeout_s=timeout_s)
        nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
        yield url, nodes
    finally:
        with contextlib.suppress(Exception):
            serve.shutdown()
        with contextlib.suppress(Exception):
            ray.shutdown()
        cluster.shutdown()
        _restore(current, previous)


def _restore(path: Path, text: str | None) -> None:
    with contextlib.suppress(OSError):
        if text is None:
            path.unlink(missing_ok=True)
        else:
            path.write_text(text)
