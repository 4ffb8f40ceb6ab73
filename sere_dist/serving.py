"""Ray Serve application: vLLM replicas with SERE behind Ray Serve LLM's OpenAI-compatible ingress.

`build_app(args)` is the Serve application builder named in `deploy/*.yaml`
(`import_path: sere_dist.serving:build_app`). Its arguments, all optional:

    model: default | <local checkpoint dir>   default = the embedded tiny MoE model (built on first use)
    model_id: name clients send as "model" (default sere-tiny)
    sere: SereConfig fields, with artifact: default | <dir>; absent or null = SERE off
    baseline: true also serves "<model_id>-base", the same weights with SERE off (A/B on one endpoint)
    engine: vLLM engine arguments, passed through `engine.engine_kwargs` (the one builder)
    env: environment variables for the replica and its vLLM processes
    accelerator: cpu | gpu (default cpu); placement: Ray placement group config (default per accelerator)
    cpus_per_worker: CPU share of each engine bundle on the CPU backend (default 0.5)
    deployment: Serve options of each LLM replica; ingress: Serve options of the ingress (queue limits)

Everything is checked before any replica starts: unknown keys, SERE settings, and the similarity
artifact against the model's Hugging Face config (fingerprint, S <= k, per-layer overrides), so a bad
artifact fails `serve run` / `sere serve` with a message naming it. The vLLM plugin checks it again
inside the replica when the model is built, so a replica never reports ready with a wrong one.

Also here: the embedded default model and its calibration artifact (`prepare_default`), readiness
probing with a real completion (`wait_ready`), and the README's main command (`run_demo`).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import fcntl
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Mapping

from .artifact import ArtifactError, SimilarityArtifact, model_fingerprint
from .config import SereConfig, SereConfigError
from .engine import engine_kwargs

ARG_KEYS = ("model", "model_id", "sere", "baseline", "engine", "env", "accelerator", "placement",
            "cpus_per_worker", "deployment", "ingress")
DEFAULT_ARGS: dict[str, Any] = {
    "model": "default",
    "model_id": "sere-tiny",
    "sere": {"artifact": "default", "select_top_k": 2, "threshold": 0.3},
    "engine": {"max_model_len": 512, "kv_cache_memory_bytes": 64 * 1024 ** 2},
    "env": {"VLLM_CPU_OMP_THREADS_BIND": "nobind"},
}


STATS_ENV = "SERE_STATS_DIR"  # where the vLLM plugin's workers write their SERE counters


class ServingConfigError(ValueError):
    """A serving argument is invalid; the message names it."""


# ---------------------------------------------------------------------------------------------
# The embedded default model and its artifact

def sere_home() -> Path:
    return Path(os.environ.get("SERE_HOME") or Path.home() / ".cache" / "sere_dist")


def prepare_default(home: Path | None = None) -> tuple[Path, Path]:
    """(checkpoint dir, artifact dir) of the embedded default model, building them once.

    Prefers the trained tiny model shipped in sere_dist/data/tiny-trained/ when present; otherwise
    writes a planted qwen3_moe checkpoint (16 experts, top-4). Calibrates in-process on stdlib text.
    A file lock makes concurrent first uses (tests, demo, several replicas) build it once.
    """
    from .tiny import DATA_DIR

    home = home or sere_home()
    trained = DATA_DIR / "tiny-trained"
    use_trained = (trained / "config.json").exists() and any(trained.glob("*.safetensors"))
    root = home / ("trained" if use_trained else "default")
    model_dir = trained if use_trained else root / "model"
    art_dir = root / "artifact"
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not use_trained and not (model_dir / "config.json").exists():
            from .tiny import TinySpec, write_checkpoint
            write_checkpoint(model_dir, TinySpec(family="qwen3_moe", num_experts=16, top_k=4), kind="planted")
        weights = max((f.stat().st_mtime for f in model_dir.glob("*.safetensors")), default=0.0)
        meta = art_dir / "metadata.json"
        if not meta.exists() or meta.stat().st_mtime < weights:  # (re)calibrate when the weights changed
            from .capture import calibrate, load_model, tokenize_texts
            from .corpus import split_corpus, stdlib_documents
            model, tok = load_model(model_dir)
            toks = tokenize_texts(tok, split_corpus(stdlib_documents())[0], seq_len=64, num_samples=32)
            calibrate(model, toks, metric="frobenius").save(art_dir, overwrite=True)
    return model_dir, art_dir


# ---------------------------------------------------------------------------------------------
# Argument checking and the Serve application

def resolve(args: Mapping[str, Any] | None) -> dict[str, Any]:
    """Validated arguments with `default` paths resolved and the artifact checked against the model.

    Raises ServingConfigError / SereConfigError / ArtifactError naming the bad field.
    """
    args = dict(args or {})
    unknown = sorted(set(args) - set(ARG_KEYS))
    if unknown:
        raise ServingConfigError(f"unknown serving argument(s) {unknown}; allowed: {', '.join(ARG_KEYS)}")
    out = {k: copy.deepcopy(args.get(k, DEFAULT_ARGS.get(k))) for k in ARG_KEYS}
    for key in ("engine", "env", "placement", "deployment", "ingress"):
        if out[key] is not None and not isinstance(out[key], Mapping):
            raise ServingConfigError(f"{key} must be a mapping, got {type(out[key]).__name__}")
        out[key] = dict(out[key] or {})
    if out["accelerator"] is None:
        out["accelerator"] = "cpu"
    if out["accelerator"] not in ("cpu", "gpu"):
        raise ServingConfigError(f"accelerator={out['accelerator']!r} is unknown; use cpu or gpu")
    out["model_id"] = str(out["model_id"] or "sere-tiny")
    out["cpus_per_worker"] = float(out["cpus_per_worker"] if out["cpus_per_worker"] is not None else 0.5)

    model = out["model"] or "default"
    default_art = None
    if model == "default":
        model_dir, default_art = prepare_default()
        model = str(model_dir)
    elif not (Path(model) / "config.json").exists():
        raise ServingConfigError(f"model={model!r} is not a local checkpoint directory (no config.json); "
                                 f"use 'default' for the embedded tiny model or a local path")
    out["model"] = str(Path(model).resolve())

    sere = out["sere"]
    if sere is not None:
        if not isinstance(sere, Mapping):
            raise SereConfigError(f"sere must be a mapping of SERE settings, got {type(sere).__name__}")
        sere = dict(sere)
        art = sere.get("artifact")
        if art == "default":
            if default_art is None:
                raise SereConfigError("sere.artifact=default only applies to model=default; give the path of the "
                                      "artifact calibrated for this model (`sere calibrate --model ...`)")
            art = str(default_art)
        if not art:
            raise SereConfigError("sere.artifact is missing; SERE needs the similarity artifact of this model "
                                  "(`sere calibrate --model ... --out DIR`), or set sere: null to serve without SERE")
        sere["artifact"] = str(Path(art).resolve())
        cfg = SereConfig.from_dict(sere)
        check_artifact(out["model"], cfg)
        out["sere"] = cfg.to_dict()
    return out


def check_artifact(model_dir: str, sere: SereConfig) -> dict[str, Any]:
    """Load the artifact and refuse it unless it was computed for this model; returns the fingerprint."""
    from transformers import AutoConfig

    fp = model_fingerprint(AutoConfig.from_pretrained(model_dir))
    sere.check_top_k(fp["top_k"], fp["moe_layers"])
    if sere.artifact is None:
        raise SereConfigError("sere.artifact is missing")
    try:
        art = SimilarityArtifact.load(sere.artifact)
    except ArtifactError as exc:
        raise ArtifactError(f"sere.artifact: {exc}") from None
    try:
        art.check_model(fp)
    except ArtifactError as exc:
        raise ArtifactError(f"sere.artifact {sere.artifact}: {exc}") from None
    return fp


def llm_config_dicts(args: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Ray Serve LLM `LLMConfig` dicts for resolved args: the SERE model, plus the baseline if asked."""
    engine = dict(args["engine"])
    tp = int(engine.get("tensor_parallel_size", 1)) * int(engine.get("pipeline_parallel_size", 1))
    model = args["model"]
    chat = Path(model) / "chat_template.jinja"
    if chat.exists() and "chat_template" not in engine:
        engine["chat_template"] = str(chat)
    if args["placement"]:
        placement = dict(args["placement"])
    elif args["accelerator"] == "cpu":
        placement = {"bundles": [{"CPU": args["cpus_per_worker"]}] * tp, "strategy": "PACK"}
    else:
        placement = {"bundles": [{"GPU": 1, "CPU": 1}] * tp, "strategy": "PACK"}
    deployment = dict(args["deployment"])
    if args["accelerator"] == "cpu":
        deployment.setdefault("ray_actor_options", {"num_cpus": args["cpus_per_worker"]})
    variants = [(args["model_id"], args["sere"])]
    if args["baseline"]:
        variants.append((f"{args['model_id']}-base", None))
    out = []
    for model_id, sere in variants:
        kw = engine_kwargs(model, sere=sere, **engine)
        kw.pop("model")
        env = {str(k): str(v) for k, v in args["env"].items()}
        if sere is None:
            env.pop(STATS_ENV, None)  # the plugin's counters belong to the SERE model only
        out.append({
            "model_loading_config": {"model_id": model_id, "model_source": model},
            "engine_kwargs": kw,
            "placement_group_config": placement,
            "runtime_env": {"env_vars": env},
            "deployment_config": copy.deepcopy(deployment),
            "log_engine_metrics": False,
            # a local checkpoint needs no per-node download tasks (see serve_callbacks)
            "callback_config": {"callback_class": "sere_dist.serve_callbacks:LocalCheckpoint"},
        })
    return out


def build_app(args: Mapping[str, Any] | None = None):
    """Serve application builder (`import_path: sere_dist.serving:build_app`)."""
    from ray.serve.llm import build_dp_openai_app, build_openai_app

    r = resolve(args)
    configs = llm_config_dicts(r)
    ingress = dict(r["ingress"])
    if r["accelerator"] == "cpu":
        ingress.setdefault("ray_actor_options", {"num_cpus": 0})
    if int(r["engine"].get("data_parallel_size", 1)) > 1:
        if len(configs) > 1:
            raise ServingConfigError("baseline: true is not supported with data_parallel_size > 1")
        return build_dp_openai_app({"llm_config": configs[0], "ingress_deployment_config": ingress})
    return build_openai_app({"llm_configs": configs, "ingress_deployment_config": ingress})


def load_yaml_args(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any]]:
    """(builder args, http_options) of the first application in a Serve YAML config."""
    import yaml

    doc = yaml.safe_load(Path(path).read_text())
    apps = (doc or {}).get("applications") or []
    if not apps:
        raise ServingConfigError(f"{path}: no applications")
    return dict(apps[0].get("args") or {}), dict(doc.get("http_options") or {})


# ---------------------------------------------------------------------------------------------
# Running an endpoint from Python (tests, `sere serve`, the demo)

@contextlib.contextmanager
def local_endpoint(args: Mapping[str, Any] | None = None, *, port: int = 8000, num_cpus: float = 4,
                   name: str = "sere", timeout_s: float = 600, ready_model: str | None = None,
                   quiet: bool = False):
    """Start a private local Ray instance, deploy the app, wait for a real completion, yield the URL.

    Everything started here (Serve app, Ray instance, vLLM processes) is shut down on exit.
    """
    import ray
    from ray import serve

    resolve(args)  # raises on bad args/artifact before Ray starts
    r_id = ready_model or (dict(args or {}).get("model_id") or DEFAULT_ARGS["model_id"])
    # Private instance first: building the app touches Ray, and a bare auto-init could attach to
    # another cluster on this host.
    ray.init(address="local", num_cpus=num_cpus, object_store_memory=300 * 1024 ** 2,
             include_dashboard=False, log_to_driver=False)
    try:
        if quiet:
            _quiet()
        app = build_app(args)
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        if quiet:
            _quiet()  # Serve (re)configures its loggers when it starts
        serve.run(app, name=name, route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        wait_ready(url, r_id, timeout_s=timeout_s)
        yield url
    finally:
        with contextlib.suppress(Exception):
            serve.shutdown()
        ray.shutdown()


def wait_ready(url: str, model: str, timeout_s: float = 600, interval_s: float = 1.0) -> float:
    """Poll until a real 1-token completion succeeds (/v1/models answers earlier than the engine)."""
    import httpx

    t0 = time.time()
    last = None
    while time.time() - t0 < timeout_s:
        try:
            r = httpx.post(f"{url}/v1/completions", json={"model": model, "prompt": "def", "max_tokens": 1},
                           timeout=30)
            if r.status_code == 200:
                return time.time() - t0
            last = f"HTTP {r.status_code}: {r.text[:200]}"
        except httpx.HTTPError as exc:
            last = repr(exc)
        time.sleep(interval_s)
    raise TimeoutError(f"{url} did not complete a request within {timeout_s:.0f} s (last: {last})")


def serve_forever(args: Mapping[str, Any], port: int) -> None:
    """`sere serve`: start the endpoint and block until interrupted."""
    with local_endpoint(args, port=port) as url:
        model = dict(args).get("model_id") or DEFAULT_ARGS["model_id"]
        print(f"serving {model} at {url}/v1 (OpenAI-compatible); Ctrl-C stops", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            while True:
                time.sleep(3600)


# ---------------------------------------------------------------------------------------------
# The README's main command

DEMO_PROMPTS = [
    "def fibonacci(n):", "import os\nimport sys\n", "class Queue:\n    def __init__(self", "# Parse the command line",
    "for i in range(10):", "with open(path) as f:", "def main():\n    args =", "try:\n    import json\nexcept",
]


def sere_counters(stats_dir: str | os.PathLike) -> dict[int, dict[str, int]]:
    """{MoE layer: counters} the vLLM plugin's workers wrote under `stats_dir` (summed over DP ranks)."""
    from .vllm_plugin import read_stats_dir

    return read_stats_dir(stats_dir)


def _diff(after: dict[int, dict[str, int]], before: dict[int, dict[str, int]]) -> dict[int, dict[str, int]]:
    return {layer: {k: v - before.get(layer, {}).get(k, 0) for k, v in c.items()} for layer, c in after.items()}


def _quiet() -> None:
    """Keep the demo's output to what it measured: Ray/Serve/vLLM info logs off (warnings stay)."""
    import logging

    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("RAY_SERVE_LOG_TO_STDERR", "0")
    for name in ("ray", "ray.serve", "ray.llm", "ray.data", "vllm", "httpx", "sere_dist"):
        logging.getLogger(name).setLevel(logging.WARNING)
    for name in list(logging.root.manager.loggerDict):  # Serve's and Ray LLM's own named loggers
        if name.startswith(("ray.", "vllm")):
            logging.getLogger(name).setLevel(logging.WARNING)


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
    model_id = args.get("model_id") or DEFAULT_ARGS["model_id"]
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
                before = sere_counters(stats_dir)
            for m in rows:
                rows[m].append(asyncio.run(measure(url, m, prompts, max_tokens)))
        time.sleep(2.5)
        counters = _diff(sere_counters(stats_dir), before)
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
