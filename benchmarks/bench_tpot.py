"""Offline decode TPOT on vLLM-CPU with and without SERE, measured pairwise in one eager engine.

Model: a planted Qwen3-MoE-shaped checkpoint (E experts, top-k 8) large enough that expert-weight
reads dominate decode; similarity from the planted clusters. For every batch size the settings
(plain, S=1, 2, 4) are interleaved `--repeats` times in the same engine (`sere_control`), so drift of
a shared machine hits all settings alike. TPOT = (t(max_tokens=N) - t(max_tokens=1)) / (N - 1).

    python benchmarks/bench_tpot.py [--experts 64] [--batch-sizes 1,4,16,64] [--tokens 32]
Writes benchmarks/results/tpot_cpu.json and tpot_cpu.png.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

OUT = Path(__file__).parent / "results"


def _cluster_artifact(ckpt: Path, out: Path) -> Path:
    import torch
    from transformers import AutoConfig

    from sere_dist.core.artifact import SimilarityArtifact, model_fingerprint
    from sere_dist.models.tiny import planted_clusters

    fp = model_fingerprint(AutoConfig.from_pretrained(str(ckpt)))
    mats = {i: torch.where(torch.tensor(lab)[:, None] == torch.tensor(lab)[None, :], 1.0, 0.1)
            for i, lab in planted_clusters(ckpt).items()}
    return SimilarityArtifact(matrices=mats, fingerprint=fp, metric="frobenius", tokens=0).save(out, overwrite=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch-sizes", default="1,4,16,64")
    ap.add_argument("--s-values", default="1,2,4")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--workdir", default="/tmp/sere_bench_tpot")
    args = ap.parse_args()
    t_start = time.time()

    from vllm import LLM, SamplingParams

    from sere_dist.engine.args import engine_kwargs
    from sere_dist.models.tiny import TinySpec, write_checkpoint
    from sere_dist.engine.stats import sere_control, sere_stats

    wd = Path(args.workdir)
    spec = TinySpec(family="qwen3_moe", hidden_size=args.hidden, num_layers=args.layers, num_heads=8,
                    num_experts=args.experts, top_k=args.top_k, expert_intermediate=args.hidden,
                    num_clusters=max(2, args.experts // 8))
    ckpt = wd / f"qwen3moe-e{args.experts}-k{args.top_k}-h{args.hidden}"
    if not (ckpt / "config.json").exists():
        write_checkpoint(ckpt, spec, kind="planted")
    art = _cluster_artifact(ckpt, wd / f"sim-e{args.experts}")
    llm = LLM(**engine_kwargs(str(ckpt), sere={"artifact": str(art), "select_top_k": 1, "threshold": 0.5},
                              max_model_len=256, kv_cache_memory_bytes=256 * 1024**2, seed=0))
    s_values = [int(s) for s in args.s_values.split(",")]
    settings = ["plain"] + [f"S={s}" for s in s_values]
    prompts = [f"def function_{i}(x):\n    return" for i in range(max(int(b) for b in args.batch_sizes.split(",")))]

    def timed(batch, n):
        sp = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
        t = time.perf_counter()
        llm.generate(prompts[:batch], sp, use_tqdm=False)
        return time.perf_counter() - t

    rows = []
    for b in (int(x) for x in args.batch_sizes.split(",")):
        tpots = {s: [] for s in settings}
        experts = {}
        for _ in range(args.repeats):
            for st in settings:
                if st == "plain":
                    sere_control(llm, enabled=False)
                else:
                    sere_control(llm, enabled=True, select_top_k=int(st[2:]), reset=True)
                t1 = timed(b, 1)
                tn = timed(b, args.tokens)
                tpots[st].append((tn - t1) / (args.tokens - 1) * 1e3)
                if st != "plain":
                    stats = sere_stats(llm)
                    experts[st] = {
                        "before": statistics.mean(v["distinct_experts_before"] / max(v["batches"], 1) for v in stats.values()),
                        "after": statistics.mean(v["distinct_experts_after"] / max(v["batches"], 1) for v in stats.values())}
        base = statistics.median(tpots["plain"])
        for st in settings:
            med = statistics.median(tpots[st])
            row = {"batch": b, "setting": st, "tpot_ms": med, "tpot_ratio": med / base, "runs_ms": tpots[st],
                   "distinct_experts_before": experts.get(st, {}).get("before"),
                   "distinct_experts_after": experts.get(st, {}).get("after")}
            rows.append(row)
            de = (f"{row['distinct_experts_before']:.1f} -> {row['distinct_experts_after']:.1f}"
                  if st != "plain" else "-")
            print(f"batch {b:3d}  {st:6s}  TPOT {med:8.2f} ms  ratio {med / base:5.2f}  experts/layer {de}", flush=True)
    OUT.mkdir(parents=True, exist_ok=True)
    res = {"command": "python benchmarks/bench_tpot.py " + " ".join(sys.argv[1:]),
           "wall_s": round(time.time() - t_start, 1),
           "model": {"experts": args.experts, "top_k": args.top_k, "hidden": args.hidden, "layers": args.layers,
                     "kind": "planted", "dtype": "bfloat16"},
           "engine": "vllm-cpu 0.32.0 eager, 1 process", "threshold": 0.5, "tokens": args.tokens,
           "repeats": args.repeats, "rows": rows}
    (OUT / "tpot_cpu.json").write_text(json.dumps(res, indent=1))
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(6, 4))
        for st in settings[1:]:
            pts = [(r["batch"], r["tpot_ratio"]) for r in rows if r["setting"] == st]
            ax.plot(*zip(*pts), marker="o", label=st)
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size")
        ax.set_ylabel("TPOT ratio (SERE / plain)")
        ax.set_title(f"vLLM-CPU decode, E={args.experts}, k={args.top_k}")
        ax.legend()
        fig.tight_layout()
        fig.savefig(OUT / "tpot_cpu.png", dpi=120)
    except Exception as exc:  # noqa: BLE001
        print("plot skipped:", exc)
    del llm


if __name__ == "__main__":
    main()
