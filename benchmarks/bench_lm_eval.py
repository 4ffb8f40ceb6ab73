"""Accuracy through the served endpoint, measured by a client nobody here wrote: EleutherAI's lm_eval.

Starts one local Ray Serve endpoint (the OpenAI-compatible ingress of `sere_dist.serve`) serving the
shipped trained model (`sere_dist/data/tiny-trained`, 16 experts, top-4) with its default similarity
artifact (`serve.defaults.prepare_default`: calibrated on the training split of the stdlib corpus)
under several model ids, one vLLM engine each:

    tiny-off        SERE off
    tiny-sere-s1    the paper's rule, S = 1, rho = 0
    tiny-sere-s2    the paper's rule, S = 2, rho = 0
    tiny-top-s1/s2  naive top-S (mode top_s), when this checkout's SereConfig has it

Then runs the real `lm_eval` CLI (model `local-completions`, greedy) on the task `sere_heldout`
(benchmarks/lm_eval_tasks: continue a held-out stdlib line; exact match, character similarity, chrF)
at each concurrency, for each model id, and reads the SERE counters the vLLM plugin wrote during each
run (distinct experts per MoE layer and decode batch, before and after re-routing). Concurrency 32
with max_num_seqs 32 puts up to 32 requests in one decode batch, so SERE's primary set is shared.

    python benchmarks/bench_lm_eval.py --rows 200 --concurrency 1 32

Writes benchmarks/results/lm_eval.json (commands, per-run metrics, counters, load average, wall time);
`results_section(d)` renders it for benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
TASKS = "benchmarks/lm_eval_tasks"          # --include_path, relative to the repo root (the CLI's cwd)
TASK = "sere_heldout"
METRICS = ("exact_match", "char_sim", "chrf")
ENGINE = {"max_model_len": 512, "kv_cache_memory_bytes": 64 * 1024 ** 2, "max_num_seqs": 32}
INGRESS = {"max_ongoing_requests": 128, "max_queued_requests": 256}
SERE_BASE = {"artifact": "default", "threshold": 0.0}


def variants(with_top_s: bool) -> dict[str, dict[str, Any] | None]:
    """model id -> SERE settings (None = SERE off)."""
    out: dict[str, dict[str, Any] | None] = {
        "tiny-off": None,
        "tiny-sere-s1": dict(SERE_BASE, select_top_k=1, mode="paper"),
        "tiny-sere-s2": dict(SERE_BASE, select_top_k=2, mode="paper"),
    }
    if with_top_s:
        out["tiny-top-s1"] = dict(SERE_BASE, select_top_k=1, mode="top_s")
        out["tiny-top-s2"] = dict(SERE_BASE, select_top_k=2, mode="top_s")
    # the error-aware rule with its defaults (gain threshold, unmatched, weighting: SereConfig's), written out
    from sere_dist.core.config import SereConfig
    d = SereConfig()
    ea = {"artifact": "default", "mode": "error_aware", "gain_threshold": d.gain_threshold, "unmatched": d.unmatched,
          "gain_weighting": d.gain_weighting}
    out["tiny-ea-s1"] = dict(ea, select_top_k=1)
    out["tiny-ea-s2"] = dict(ea, select_top_k=2)
    return out


def top_s_available() -> bool:
    from sere_dist.core.config import SereConfig

    try:
        SereConfig(mode="top_s")
    except Exception:  # noqa: BLE001 - this checkout has no naive top-S rule yet
        return False
    return True


# --- the endpoint -------------------------------------------------------------------------------

@contextlib.contextmanager
def endpoint(models: dict[str, dict[str, Any] | None], stats_root: Path, *, port: int, metrics_port: int,
             timeout_s: float = 900) -> Iterator[str]:
    """One Ray Serve app: every model id is its own LLMServer (own vLLM engine, own SERE counter dir)
    behind the guarded OpenAI ingress. Ray, Serve and the engines are shut down on exit."""
    from sere_dist.engine.stats import STATS_ENV
    from sere_dist.serve.app import llm_config_dicts, resolve
    from sere_dist.serve.config import DEFAULT_ENV, ServeArgs
    from sere_dist.serve.endpoint import serve_app
    from sere_dist.serve.ray_internals import build_openai_app_guarded

    configs, first = [], None
    for model_id, sere in models.items():
        env = dict(DEFAULT_ENV)
        if sere is not None:
            (stats_root / model_id).mkdir(parents=True, exist_ok=True)   # the plugin writes into an existing dir
            env[STATS_ENV] = str(stats_root / model_id)
        args = resolve(ServeArgs.from_dict({"model": "default", "model_id": model_id, "sere": sere,
                                            "engine": dict(ENGINE), "env": env, "ingress": dict(INGRESS)}))
        first = first or args
        configs += llm_config_dicts(args)
    make = lambda: build_openai_app_guarded(configs, dict(INGRESS), max_n=first.limits.max_n,  # noqa: E731
                                            max_body_bytes=first.limits.max_body_bytes)
    with serve_app(make, list(models), port=port, num_cpus=2 * len(models) + 2, name="sere-lm-eval",
                   timeout_s=timeout_s, quiet=True, metrics_port=metrics_port) as url:
        yield url


def scrape_sere_metrics(metrics_port: int) -> dict[str, dict[str, float]]:
    """Ray's Prometheus export: {model_id: {counter: total over layers}} of the `ray_sere_*_total` series."""
    import httpx

    out: dict[str, dict[str, float]] = {}
    try:
        text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text
    except httpx.HTTPError:
        return out
    for line in text.splitlines():
        if not line.startswith("ray_sere_") or "{" not in line:
            continue
        name, rest = line.split("{", 1)
        labels, value = rest.rsplit("}", 1)
        tags = dict(kv.split("=", 1) for kv in labels.split(",") if "=" in kv)
        model = tags.get("model_id", "").strip('"')
        counter = name.removeprefix("ray_sere_").removesuffix("_total")
        out.setdefault(model, {}).setdefault(counter, 0.0)
        out[model][counter] += float(value)
    return out


# --- one lm_eval run ----------------------------------------------------------------------------

def lm_eval_command(url: str, model_id: str, concurrency: int, rows: int, out_dir: str, tokenizer: str) -> list[str]:
    model_args = ",".join([f"model={model_id}", f"base_url={url}/v1/completions", f"num_concurrent={concurrency}",
                           "tokenizer_backend=huggingface", f"tokenizer={tokenizer}", "tokenized_requests=False",
                           f"max_length={ENGINE['max_model_len']}", "max_retries=1", "timeout=300"])
    return [str(Path(sys.executable).with_name("lm_eval")), "run", "--model", "local-completions",
            "--model_args", model_args, "--tasks", TASK, "--include_path", TASKS, "--limit", str(rows),
            "--batch_size", "1", "--seed", "0", "--log_samples", "--output_path", out_dir]


def read_lm_eval_output(out_dir: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(results[TASK], samples) from lm_eval's --output_path directory (one model, one task)."""
    res = sorted(Path(out_dir).rglob("results_*.json"))
    samples = sorted(Path(out_dir).rglob(f"samples_{TASK}_*.jsonl"))
    if not res or not samples:
        raise RuntimeError(f"lm_eval wrote no results/samples under {out_dir}")
    task = json.loads(res[-1].read_text())["results"][TASK]
    rows = [json.loads(line) for line in samples[-1].read_text().splitlines() if line.strip()]
    rows.sort(key=lambda r: r["doc_id"])
    return task, rows


def counters_delta(after: dict[int, dict[str, int]], before: dict[int, dict[str, int]]) -> dict[str, Any] | None:
    """Per-layer counter growth during one run, and its summary (distinct experts per layer and decode batch)."""
    if not after:
        return None
    per_layer = {layer: {k: v - before.get(layer, {}).get(k, 0) for k, v in c.items()} for layer, c in after.items()}
    batches = sum(c["batches"] for c in per_layer.values())
    tokens = sum(c["tokens"] for c in per_layer.values())
    if batches == 0:
        return {"layers": {str(k): v for k, v in sorted(per_layer.items())}, "batches_per_layer": 0}
    return {"layers": {str(k): v for k, v in sorted(per_layer.items())},
            "batches_per_layer": batches / len(per_layer),
            "tokens_per_batch": tokens / batches,
            "experts_before": sum(c["distinct_experts_before"] for c in per_layer.values()) / batches,
            "experts_after": sum(c["distinct_experts_after"] for c in per_layer.values()) / batches,
            "rerouted_slots_per_token": sum(c["rerouted_slots"] for c in per_layer.values()) / max(tokens, 1)}


def run_one(url: str, model_id: str, concurrency: int, rows: int, stats_dir: Path | None,
            tokenizer: str) -> dict[str, Any]:
    from sere_dist.engine.stats import read_stats_dir

    if stats_dir is not None:
        time.sleep(1.5)                                   # the plugin's workers flush their counters every second
    before = read_stats_dir(stats_dir) if stats_dir is not None else {}
    load0 = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="sere-lm-eval-") as d:
        cmd = lm_eval_command(url, model_id, concurrency, rows, d, tokenizer)
        env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
        t0 = time.perf_counter()
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1800, env=env)
        wall = time.perf_counter() - t0
        if p.returncode != 0:
            raise RuntimeError(f"lm_eval failed ({p.returncode}) for {model_id} @ {concurrency}:\n{p.stderr[-3000:]}")
        task, samples = read_lm_eval_output(d)
    if stats_dir is not None:
        time.sleep(2.5)
    counters = counters_delta(read_stats_dir(stats_dir), before) if stats_dir is not None else None
    metrics = {m: {"value": task[f"{m},none"], "stderr": task.get(f"{m}_stderr,none")} for m in METRICS}
    return {"model_id": model_id, "concurrency": concurrency, "rows": len(samples), "metrics": metrics,
            "counters": counters, "wall_s": round(wall, 2),
            "loadavg_before": load0, "loadavg_after": os.getloadavg(),
            "command": shlex.join(_display(cmd)),
            "per_row": {m: [round(float(s[m]), 4) for s in samples] for m in METRICS},
            "generations": [s["filtered_resps"][0] if isinstance(s["filtered_resps"][0], str)
                            else s["filtered_resps"][0][0] for s in samples]}


def _display(cmd: list[str]) -> list[str]:
    """The command as a user types it from the repo root (`lm_eval`, no temporary output dir)."""
    out = ["lm_eval"] + cmd[1:]
    i = out.index("--output_path")
    return out[:i] + ["--output_path", "OUT"] + out[i + 2:]


def agreement(a: list[str], b: list[str]) -> float:
    return sum(x == y for x, y in zip(a, b)) / max(len(a), 1)


def paired_delta(a: list[float], b: list[float]) -> dict[str, float]:
    """Mean of a - b over the same rows, with the standard error of that mean (paired)."""
    d = [x - y for x, y in zip(a, b)]
    n = len(d)
    mean = sum(d) / n
    var = sum((x - mean) ** 2 for x in d) / (n - 1) if n > 1 else 0.0
    return {"value": mean, "stderr": math.sqrt(var / n)}


# --- report -------------------------------------------------------------------------------------

def _pm(m: dict[str, Any], nd: int = 3, signed: bool = False) -> str:
    v, se = m["value"], m.get("stderr")
    text = f"{v:+.{nd}f}" if signed else f"{v:.{nd}f}"
    if se is None or se == "N/A" or (isinstance(se, float) and math.isnan(se)):
        return text
    return f"{text} ± {float(se):.{nd}f}"


def _rule(sere: dict[str, Any] | None) -> str:
    if sere is None:
        return "off"
    mode = sere.get("mode", "paper")
    name = {"paper": "paper", "top_s": "naive top-S", "rank_aware": "rank-aware", "error_aware": "error-aware"}[mode]
    if mode == "error_aware":
        return (f"{name}, S {sere['select_top_k']}, gain >= {sere['gain_threshold']:g}, unmatched "
                f"{sere['unmatched']}, {sere['gain_weighting']}-weighted")
    rho = f", rho {sere['threshold']:g}" if mode != "top_s" else ""
    return f"{name}, S {sere['select_top_k']}{rho}"


def table_rows(d: dict[str, Any]) -> list[list[str]]:
    out = []
    for r in d["runs"]:
        c = r.get("counters") or {}
        experts = (f"{c['experts_before']:.2f} → {c['experts_after']:.2f}" if c.get("experts_before") is not None
                   else "–")
        same = r.get("identical_to_off")
        out.append([r["model_id"], _rule(d["models"][r["model_id"]]), str(r["concurrency"]),
                    _pm(r["metrics"]["exact_match"]), _pm(r["metrics"]["char_sim"]), _pm(r["metrics"]["chrf"]),
                    _pm(r["delta_vs_off"]["exact_match"], signed=True) if r.get("delta_vs_off") else "–",
                    _pm(r["delta_vs_off"]["char_sim"], signed=True) if r.get("delta_vs_off") else "–",
                    f"{same:.3f}" if same is not None else "–",
                    f"{r['identical_across_concurrency']:.3f}" if r.get("identical_across_concurrency") is not None
                    else "–",
                    experts, f"{c['tokens_per_batch']:.1f}" if c.get("tokens_per_batch") else "–",
                    f"{r['wall_s']:.1f}"])
    return out


HEADER = ["model id", "rule", "conc.", "exact match", "char sim", "chrF", "Δ exact match vs off", "Δ char sim vs off",
          "same as off", "same as conc. 1",
          "experts/batch before → after", "tokens/batch", "wall s"]


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def results_section(d: dict[str, Any]) -> str:
    """The Markdown section of benchmarks/RESULTS.md for a results/lm_eval.json dict."""
    example = d["runs"][-1]["command"] if d.get("runs") else ""
    la0, la1 = d["loadavg_before"], d["loadavg_after"]
    lines = [
        "## Accuracy through the served endpoint (lm-evaluation-harness)", "",
        f"Command: `{d['command']}` ({d['wall_s']:.0f} s, endpoint ready in {d['endpoint_ready_s']:.0f} s). "
        f"One Ray Serve endpoint serves the shipped trained model ({d['model']}) under {len(d['models'])} model ids "
        f"(one vLLM engine each, max_num_seqs {d['engine']['max_num_seqs']}, greedy); EleutherAI's "
        f"lm-evaluation-harness {d['lm_eval_version']} drives it through its stock OpenAI client "
        f"(`local-completions`), one run per model id and concurrency, e.g.", "",
        f"    {example}", "",
        f"Task `{TASK}` ({TASKS}/{TASK}): continue a line of held-out stdlib text (never seen in training or "
        f"calibration) from the preceding lines and the line's first half; {d['rows']} rows, generation up to the "
        f"first newline (at most {d['max_gen_toks']} tokens). *exact match*: the rest of the line exactly; "
        f"*char sim*: 1 - character edit distance / longer length; *chrF*: sentence chrF / 100; ± is lm_eval's "
        f"standard error. *Δ vs off*: paired difference to SERE off on the same rows, ± its standard error. *same as off*: share of generations identical to SERE off at the same concurrency; "
        f"*same as conc. 1*: identical to this model id's concurrency-1 run (batching noise floor). "
        f"*experts/batch*: distinct experts per MoE layer per re-routed decode batch from the vLLM plugin's "
        f"counters during that run (SERE re-routes decode tokens only). *wall s*: the whole lm_eval run, its start-up (about 15-20 s: it indexes "
        f"its built-in tasks) included; the machine is shared, so compare wall times with care. `OUT` is any "
        f"directory for lm_eval's results and samples. Load average (1/5/15 min) before/after: "
        f"{', '.join(f'{x:.2f}' for x in la0)} / {', '.join(f'{x:.2f}' for x in la1)}.", "",
        markdown_table(HEADER, table_rows(d)), ""]
    lines += findings(d)
    if not any(m and m.get("mode") == "top_s" for m in d["models"].values()):
        lines += ["Naive top-S (`mode: top_s`) was not in this checkout's SereConfig when this ran.", ""]
    return "\n".join(lines)


def findings(d: dict[str, Any]) -> list[str]:
    """What the table says, computed from it: paired differences in standard errors, and the batch-1 check."""
    out = []
    top = max(r["concurrency"] for r in d["runs"])
    rerouted = [r for r in d["runs"] if r.get("delta_vs_off")]
    if rerouted:
        z = [(abs(r["delta_vs_off"][m]["value"]) / r["delta_vs_off"][m]["stderr"], r, m)
             for r in rerouted for m in ("exact_match", "char_sim") if r["delta_vs_off"][m]["stderr"] > 0]
        changed = [1 - r["identical_to_off"] for r in rerouted if r["concurrency"] == top]
        worst = max(z, key=lambda t: t[0]) if z else None
        if worst and worst[0] < 2:
            out.append(f"- No rule moves exact match or char sim away from SERE off by 2 paired standard errors "
                       f"(largest: {worst[1]['model_id']} at concurrency {worst[1]['concurrency']}, "
                       f"{worst[2]} {worst[1]['delta_vs_off'][worst[2]]['value']:+.4f}, {worst[0]:.1f} SE), although at "
                       f"concurrency {top} they change {min(changed):.0%}-{max(changed):.0%} of the generations.")
        elif worst:
            big = sorted({f"{r['model_id']} @ {r['concurrency']} ({m} {r['delta_vs_off'][m]['value']:+.4f}, {zz:.1f} SE)"
                          for zz, r, m in z if zz >= 2})
            out.append(f"- Paired differences to SERE off beyond 2 standard errors: {'; '.join(big)}.")
    by = {(r["model_id"], r["concurrency"]): r for r in d["runs"]}
    low = min(r["concurrency"] for r in d["runs"])
    a, b = by.get(("tiny-sere-s1", low)), by.get(("tiny-top-s1", low))
    if a and b and low == 1:
        same = sum(x == y for x, y in zip(a["generations"], b["generations"]))
        out.append(f"- Check: at concurrency 1 the paper's rule at S 1, rho 0 and naive top-1 agree on {same}/{len(a['generations'])} "
                   f"generations. With one token per decode batch every secondary slot moves to that token's own top-1 "
                   f"expert, which is top-1 routing with the weights summed; the two differ only once requests share a batch.")
    if out:
        out.append("")
    return out


def headline_lines(d: dict[str, Any]) -> list[str]:
    """One line per SERE model id at the highest concurrency, for RESULTS.md's summary."""
    top = max(r["concurrency"] for r in d["runs"])
    off = next((r for r in d["runs"] if r["model_id"] == "tiny-off" and r["concurrency"] == top), None)
    if off is None:
        return []
    out = []
    for r in d["runs"]:
        if r["concurrency"] != top or r["model_id"] == "tiny-off":
            continue
        out.append(f"lm_eval `{TASK}` @ concurrency {top}: {_rule(d['models'][r['model_id']])} exact match "
                   f"{_pm(r['metrics']['exact_match'])} vs off {_pm(off['metrics']['exact_match'])}, char sim "
                   f"{r['metrics']['char_sim']['value']:.3f} vs {off['metrics']['char_sim']['value']:.3f}")
    return out


# --- main ---------------------------------------------------------------------------------------

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=200, help="lm_eval --limit: the first N rows of the task")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--models", nargs="+", default=None, help="model ids to run (default: all available)")
    ap.add_argument("--no-top-s", action="store_true", help="leave naive top-S out even when available")
    ap.add_argument("--port", type=int, default=8410)
    ap.add_argument("--metrics-port", type=int, default=8491)
    ap.add_argument("--out", type=Path, default=RESULTS / "lm_eval.json")
    a = ap.parse_args()
    t_start = time.time()
    import yaml

    from sere_dist.serve.defaults import prepare_default

    model_dir, art_dir = prepare_default()
    models = variants(top_s_available() and not a.no_top_s)
    if a.models:
        models = {k: v for k, v in models.items() if k in a.models}
    task_cfg = yaml.safe_load((ROOT / TASKS / TASK / f"{TASK}.yaml").read_text().replace("!function", ""))
    tokenizer = os.path.relpath(model_dir, ROOT) if Path(model_dir).is_relative_to(ROOT) else str(model_dir)
    print(f"model {model_dir}, artifact {art_dir}; model ids: {', '.join(models)}", flush=True)
    load_before, up_before = os.getloadavg(), _uptime()
    runs = []
    with tempfile.TemporaryDirectory(prefix="sere-lm-eval-stats-") as stats:
        stats_root = Path(stats)
        t0 = time.time()
        with endpoint(models, stats_root, port=a.port, metrics_port=a.metrics_port) as url:
            ready = time.time() - t0
            print(f"endpoint {url} ready in {ready:.1f} s", flush=True)
            for conc in a.concurrency:
                for model_id, sere in models.items():
                    r = run_one(url, model_id, conc, a.rows, stats_root / model_id if sere else None, tokenizer)
                    runs.append(r)
                    c = r["counters"] or {}
                    print(f"{model_id:<14} conc {conc:>3}: exact match {_pm(r['metrics']['exact_match'])}, "
                          f"char sim {_pm(r['metrics']['char_sim'])}, chrF {_pm(r['metrics']['chrf'])}"
                          + (f", experts/batch {c['experts_before']:.2f} -> {c['experts_after']:.2f}"
                             if c.get("experts_before") is not None else "")
                          + f" ({r['wall_s']:.1f} s)", flush=True)
            prom = scrape_sere_metrics(a.metrics_port)
    by = {(r["model_id"], r["concurrency"]): r for r in runs}
    for r in runs:
        off = by.get(("tiny-off", r["concurrency"]))
        r["identical_to_off"] = agreement(r["generations"], off["generations"]) if off and r is not off else None
        r["delta_vs_off"] = ({m: paired_delta(r["per_row"][m], off["per_row"][m]) for m in METRICS}
                             if off and r is not off else None)
        c1 = by.get((r["model_id"], min(a.concurrency)))
        r["identical_across_concurrency"] = (agreement(r["generations"], c1["generations"])
                                             if c1 and r is not c1 else None)
    out = {"benchmark": "lm_eval", "command": "python " + " ".join(["benchmarks/bench_lm_eval.py"] + sys.argv[1:]),
           "lm_eval_version": _version("lm_eval"),
           "task": TASK, "include_path": TASKS, "rows": a.rows, "max_gen_toks": task_cfg["generation_kwargs"]["max_gen_toks"],
           "model": os.path.relpath(model_dir, ROOT) if Path(model_dir).is_relative_to(ROOT) else str(model_dir),
           "artifact": str(art_dir), "engine": ENGINE, "ingress": INGRESS, "models": models,
           "concurrency": a.concurrency, "endpoint_ready_s": round(ready, 1), "wall_s": round(time.time() - t_start, 1),
           "loadavg_before": load_before, "loadavg_after": os.getloadavg(), "uptime_before": up_before,
           "uptime_after": _uptime(), "git": _git(), "prometheus_sere_totals": prom, "runs": runs,
           "time": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    print()
    print(markdown_table(HEADER, table_rows(out)))
    print(f"\nwall time {out['wall_s']:.0f} s; uptime before: {up_before}; after: {out['uptime_after']}")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(out, indent=1))
    print(f"wrote {a.out}")
    return 0


def _uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        la = os.getloadavg()
        return f"load average: {la[0]:.2f}, {la[1]:.2f}, {la[2]:.2f}"


def _git() -> dict[str, Any]:
    """The commit, and the package files that differ from it (the run measured the working tree)."""
    from bench_tpot import git_state

    commit, modified = git_state(ROOT, paths=("sere_dist", "cuda_ext"), untracked=True) or ("", [])
    return {"commit": commit, "modified": modified}


def _version(dist: str) -> str:
    from importlib.metadata import version

    return version(dist)


if __name__ == "__main__":
    sys.exit(main())
