"""Calibration wall time and peak memory: the Ray Data job (1 and 2 workers per stage) against a
faithful re-implementation of the paper's all-in-memory method, on the same tokens.

The paper's method: one forward pass over all calibration text with every MoE layer's input kept,
then for each layer every expert's output for every token held at once ([E, N, H]) and the pairwise
Frobenius distances computed from it. Ours streams shards through two actor pools (sere_dist.calibration.pipeline).

Each case runs in a fresh subprocess so its peak RSS is its own. Usage:

    python benchmarks/bench_calibration.py                 # full sweep, writes benchmarks/results/calibration.json
    python benchmarks/bench_calibration.py --quick         # smaller model and token counts
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
RESULTS = REPO / "benchmarks" / "results"


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def paper_method(model_dir: str, num_samples: int, seq_len: int) -> dict:
    """All calibration tokens in one forward; all expert outputs of a layer in memory at once."""
    import torch

    from sere_dist.calibration.capture import expert_outputs, layer_inputs, load_model, moe_blocks, tokenize_texts
    from sere_dist.calibration.corpus import split_corpus, stdlib_documents
    from sere_dist.core.similarity import _finish

    t0 = time.time()
    model, tok = load_model(model_dir)
    toks = tokenize_texts(tok, split_corpus(stdlib_documents())[0], seq_len, num_samples)
    t1 = time.time()
    with torch.no_grad():
        hidden = layer_inputs(model, toks)                       # every layer's input for every token
        mats = {}
        for i, blk in moe_blocks(model).items():
            y = expert_outputs(blk.experts, hidden[i], chunk=hidden[i].shape[0])   # [E, N, H], all at once
            flat = y.reshape(y.shape[0], -1).double()
            d = torch.cdist(flat, flat)
            d.fill_diagonal_(0)
            mats[i] = _finish(1 - d / d.max())
            del y, flat, d
    return {"wall_s": time.time() - t1, "load_s": t1 - t0, "tokens": int(toks.numel()),
            "peak_rss_mb": _rss_mb(), "matrices": {str(i): m.tolist() for i, m in mats.items()}}


def ray_method(model_dir: str, num_samples: int, seq_len: int, workers: int, out: str) -> dict:
    import ray

    from sere_dist.calibration.pipeline import CalibrationJob, prepare, run

    prep = prepare(CalibrationJob(model=model_dir, out=out, num_samples=num_samples, seq_len=seq_len,
                                  batch_size=8, num_workers=workers, cpus_per_worker=0.5, overwrite=True))
    ray.init(address="local", num_cpus=2 * workers, object_store_memory=300 * 1024**2, include_dashboard=False,
             log_to_driver=False)
    try:
        res = run(prep)
    finally:
        ray.shutdown()
    r = res.report
    return {"wall_s": r["wall_s"], "tokens": r["tokens"], "worker_peak_rss_mb": r["worker_peak_rss_mb"],
            "driver_peak_rss_mb": _rss_mb(), "nodes": len(r["nodes"]),
            "matrices": {str(i): m.tolist() for i, m in res.artifact.matrices.items()}}


def _case(argv: list[str]) -> dict:
    out = subprocess.run([sys.executable, __file__, "--case", *argv], capture_output=True, text=True,
                         cwd=REPO, timeout=900)
    if out.returncode != 0:
        raise RuntimeError(f"case {argv} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--case", nargs="*")
    a = ap.parse_args()
    if a.case:
        kind, model_dir, ns, sl, *rest = a.case
        if kind == "paper":
            res = paper_method(model_dir, int(ns), int(sl))
        else:
            res = ray_method(model_dir, int(ns), int(sl), int(rest[0]), rest[1])
        print(json.dumps(res))
        return 0

    import torch

    from sere_dist.calibration.report import line_plot
    from sere_dist.models.tiny import TinySpec, write_checkpoint

    spec = (TinySpec(family="qwen3_moe", hidden_size=128, num_layers=2, num_experts=16, top_k=4)
            if a.quick else
            TinySpec(family="qwen3_moe", hidden_size=256, num_layers=4, num_experts=32, top_k=4,
                     expert_intermediate=128))
    seq_len = 64 if a.quick else 128
    sample_counts = [16, 48] if a.quick else [32, 128]
    tmp = Path(tempfile.mkdtemp(prefix="bench_cal_"))
    model_dir = str(write_checkpoint(tmp / "model", spec, kind="planted"))
    rows = []
    plan = [("paper", n, None) for n in sample_counts] + [("ray", n, 2) for n in sample_counts] + \
           [("ray", sample_counts[-1], 1)]
    for kind, n, w in plan:
        argv = [kind, model_dir, str(n), str(seq_len)] + ([str(w), str(tmp / f"out-{n}-{w}")] if w else [])
        print(f"running {kind} workers={w or '-'} samples={n} ...", flush=True)
        r = _case(argv)
        rows.append({"method": "paper all-in-memory" if kind == "paper" else f"ray data, {w} worker(s)/stage",
                     "workers": w or 0, "samples": n, "seq_len": seq_len, **r})
    # fidelity: Ray job vs paper method on the same tokens
    for r in rows:
        ref = next(p for p in rows if p["workers"] == 0 and p["samples"] == r["samples"])
        r["max_abs_diff_vs_paper"] = max(
            float((torch.tensor(r["matrices"][k]) - torch.tensor(ref["matrices"][k])).abs().max())
            for k in ref["matrices"])
    for r in rows:
        r.pop("matrices")
        r["tokens_per_s"] = round(r["tokens"] / r["wall_s"], 1)
        r["peak_rss_mb"] = r.get("peak_rss_mb") or r["worker_peak_rss_mb"]
    hdr = (f"{'method':<28} {'samples':>7} {'tokens':>7} {'wall s':>8} {'tok/s':>8} {'peak RSS MiB (per worker)':>26} "
           f"{'driver MiB':>10} {'max|diff|':>10}")
    print(f"\nmodel: {spec.family} H={spec.hidden_size} layers={spec.num_layers} E={spec.num_experts} "
          f"top-{spec.top_k}, seq_len {seq_len}; machine: 2 CPU cores (shared)")
    print(hdr)
    for r in rows:
        print(f"{r['method']:<28} {r['samples']:>7} {r['tokens']:>7} {r['wall_s']:8.1f} {r['tokens_per_s']:8.1f} "
              f"{r['peak_rss_mb']:26.0f} {r.get('driver_peak_rss_mb', float('nan')):10.0f} "
              f"{r['max_abs_diff_vs_paper']:10.2e}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = "calibration_quick" if a.quick else "calibration"
    (RESULTS / f"{name}.json").write_text(json.dumps(
        {"spec": spec.__dict__, "seq_len": seq_len, "rows": rows,
         "note": "peak_rss_mb: whole process for the paper method; the largest Ray worker's for the Ray job "
                 "(each stage's actors load the model once). Wall time excludes model load for the paper "
                 "method and includes actor start-up for the Ray job."}, indent=1))
    toks = sorted({r["tokens"] for r in rows})
    series = {"paper all-in-memory": [next(r["peak_rss_mb"] for r in rows if r["workers"] == 0 and r["tokens"] == t)
                                      for t in toks],
              "ray data, per worker (2/stage)": [next(r["peak_rss_mb"] for r in rows if r["workers"] == 2
                                                      and r["tokens"] == t) for t in toks]}
    (RESULTS / f"{name}_memory.png").write_bytes(
        line_plot(toks, series, "calibration tokens", "peak RSS (MiB)", "calibration peak memory vs tokens"))
    print(f"wrote {RESULTS / (name + '.json')} and {name}_memory.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
