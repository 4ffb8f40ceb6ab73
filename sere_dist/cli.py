"""`sere` command line: one entry for every sere-dist task."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path


def _demo(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    from sere_dist.calibration.capture import tokenize_texts
    from sere_dist.calibration.pipeline import calibrate
    from sere_dist.core.config import SereConfig
    from sere_dist.calibration.corpus import split_corpus, stdlib_documents
    from sere_dist.eval.fidelity import evaluate, sere_transform
    from sere_dist.models.tiny import TinySpec, build_model

    torch.manual_seed(0)
    t0 = time.time()
    if args.kind == "trained":
        from sere_dist.calibration.capture import load_model
        from sere_dist.models.train import TRAINED_DIR, TRAINED_SPEC as spec
        print(f"[1/3] loading the trained tiny {spec.family} model ({TRAINED_DIR}): {spec.num_layers} MoE layers, "
              f"{spec.num_experts} experts, top-{spec.top_k}")
        model, tok = load_model(TRAINED_DIR)
    else:
        spec = TinySpec(family=args.family, num_experts=args.experts, top_k=args.top_k)
        print(f"[1/3] building the tiny {args.kind} {spec.family} model: {spec.num_layers} MoE layers, "
              f"{spec.num_experts} experts, top-{spec.top_k}")
        model, tok = build_model(spec, args.kind)
    train_docs, held_docs = split_corpus(stdlib_documents())
    cal = tokenize_texts(tok, train_docs, args.seq_len, args.cal_samples)
    print(f"[2/3] calibrating ({args.metric}) on {cal.numel()} tokens of Python stdlib text")
    art = calibrate(model, cal, metric=args.metric, batch_size=8,
                    progress=lambda it: tqdm(it, desc="calibrate", unit="batch", leave=False))
    if args.out:
        art.save(args.out, overwrite=True)
        print(f"      artifact written to {args.out}")
    ev = tokenize_texts(tok, held_docs, args.seq_len, args.eval_samples)
    print(f"[3/3] fidelity on {ev.numel()} held-out tokens, decode batches of {args.batch} sequences, "
          f"rho={args.rho}")
    rows = []
    for s in sorted({1, 2, spec.top_k}):
        r = evaluate(model, ev, sere_transform(art.matrices, SereConfig(select_top_k=s, threshold=args.rho)),
                     batch_size=args.batch)
        rows.append({"S": s, **r})
    hdr = f"{'S':>3} {'experts/layer':>14} {'(unmodified)':>13} " + " ".join(
        f"{'L' + str(i):>6}" for i in rows[0]["experts_per_layer"]) + f" {'top-1 agree':>12} {'KL (nats)':>10} {'ppl':>9}"
    print(hdr)
    for r in rows:
        per = " ".join(f"{v:6.2f}" for v in r["experts_per_layer"].values())
        print(f"{r['S']:>3} {r['experts']:14.2f} {r['ref_experts']:13.2f} {per} {r['top1_agreement']:12.4f} "
              f"{r['kl']:10.5f} {r['ppl']:9.2f}")
    print(f"demo finished in {time.time() - t0:.1f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


def _make_model(args: argparse.Namespace) -> int:
    from sere_dist.models.tiny import TinySpec, write_checkpoint

    spec = TinySpec(family=args.family, hidden_size=args.hidden, num_layers=args.layers, num_experts=args.experts,
                    top_k=args.top_k, expert_intermediate=args.intermediate, seed=args.seed)
    out = write_checkpoint(args.out, spec, kind=args.kind)
    print(f"wrote {args.kind} {args.family} checkpoint to {out}")
    return 0


def _train_tiny(args: argparse.Namespace) -> int:
    import torch

    from sere_dist.models.tiny import TinySpec
    from sere_dist.models.train import TRAINED_DIR, TRAINED_SPEC, Recipe, train

    if args.threads:
        torch.set_num_threads(args.threads)
    family = "qwen2_moe" if args.shared_expert else args.family
    if args.shared_expert and args.family not in ("qwen3_moe", "qwen2_moe"):
        raise ValueError(f"--shared-expert uses the qwen2_moe family; it cannot be combined with --family {args.family}")
    spec = TinySpec(family=family, hidden_size=args.hidden, num_layers=args.layers, num_heads=TRAINED_SPEC.num_heads,
                    num_experts=args.experts, top_k=args.top_k, expert_intermediate=args.intermediate,
                    max_positions=TRAINED_SPEC.max_positions, seed=args.seed)
    if not 1 <= spec.top_k <= spec.num_experts:
        raise ValueError(f"--top-k must be in 1..--experts ({spec.num_experts}), got {spec.top_k}")
    if spec.hidden_size % 32:
        raise ValueError(f"--hidden must be a multiple of 32 (vLLM's CPU MoE kernel), got {spec.hidden_size}")
    recipe = Recipe(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr, seed=args.seed,
                    aux_coef=args.aux_coef, router_init_scale=args.router_init_scale, upcycle=args.upcycle,
                    dense_steps=args.dense_steps, upcycle_noise=args.upcycle_noise, split_copies=args.split_copies)
    res = train(Path(args.out) if args.out else TRAINED_DIR, spec, recipe,
                dense_out=Path(args.dense_out) if args.dense_out else None)
    if "dense_heldout_ppl" in res:
        print(f"dense model: held-out perplexity {res['dense_heldout_ppl']:.2f} after {recipe.dense_steps} steps; "
              f"upcycled before MoE training {res['upcycled_init_heldout_ppl']:.2f}")
    print(f"held-out perplexity {res['heldout_ppl']:.2f} on {res['heldout_tokens']} tokens "
          f"after {recipe.steps} steps ({res['wall_s']} s)")
    return 0


def _calibrate(args: argparse.Namespace) -> int:
    """`sere calibrate` and `calibration_jobs/calibrate.py` (= `sere calibrate --ray`): one pipeline.

    With --ray it joins --address or $RAY_ADDRESS (set inside `ray job submit`), else starts a private
    local Ray instance; without it the same stages run in this process.
    """
    import os

    from sere_dist.calibration.pipeline import CalibrationJob, is_uri, prepare, run
    from sere_dist.calibration.diagnostics import diagnostics_table
    from sere_dist.calibration.report import stats_table, summary_line

    # in this process a relative --out means the current directory; a Ray job runs elsewhere (refused there)
    out = args.out if args.ray or is_uri(args.out) else str(Path(args.out).resolve())
    job = CalibrationJob(model=str(Path(args.model).resolve()), out=out, data=args.data,
                         text_column=args.text_column, split=args.split, metric=args.metric,
                         num_samples=args.num_samples, seq_len=args.seq_len, keep_longer_only=not args.keep_short,
                         shuffle=args.shuffle, seed=args.seed, batch_size=args.batch_size,
                         num_workers=args.num_workers, cpus_per_worker=args.cpus_per_worker,
                         actor_start_timeout_s=args.actor_start_timeout_s, cka_tokens=args.cka_tokens,
                         overwrite=args.overwrite, dtype=args.dtype)
    prep = prepare(job)
    fp = prep.fingerprint
    print(f"calibrate: {prep.tokens.shape[0]} sequences x {prep.tokens.shape[1]} tokens from {prep.source}; "
          f"{len(fp.moe_layers)} MoE layers x {fp.num_experts} experts; metric {job.metric}; "
          f"{'Ray Data' if args.ray else 'this process'}", flush=True)
    if args.ray:
        import ray

        address = args.address or os.environ.get("RAY_ADDRESS")
        if address:
            ray.init(address=address)
        else:
            ray.init(address="local", num_cpus=max(2, int(2 * job.num_workers * job.cpus_per_worker + 1)),
                     object_store_memory=300 * 1024**2, include_dashboard=False)
        try:
            res = run(prep)
        finally:
            ray.shutdown()
    else:
        from tqdm import tqdm

        res = run(prep, use_ray=False, progress=lambda it: tqdm(it, desc="calibrate", unit="batch"))
    print(stats_table(res.artifact.matrices), end="")
    print("\n" + diagnostics_table(res.diagnostics), end="")
    print(summary_line(res), flush=True)
    return 0


def add_calibration_options(c: argparse.ArgumentParser) -> None:
    """The options of `sere calibrate` (also those of the Ray job script, which forwards here)."""
    from sere_dist.core.config import METRICS

    c.add_argument("--model", required=True, help="local checkpoint directory (transformers layout)")
    c.add_argument("--out", required=True, help="artifact directory to write")
    c.add_argument("--data", help=".jsonl/.json/.parquet with a text column, a datasets directory, or a hub "
                                  "dataset name (default: Python stdlib text shipped with every machine)")
    c.add_argument("--text-column", default="text")
    c.add_argument("--split", default="train")
    c.add_argument("--metric", default="frobenius", help=f"one of {', '.join(METRICS)}")
    c.add_argument("--num-samples", type=int, default=64, help="calibration sequences")
    c.add_argument("--seq-len", type=int, default=128, help="tokens per sequence")
    c.add_argument("--keep-short", action="store_true",
                   help="also use texts not longer than --seq-len (padded); the paper keeps only longer ones")
    c.add_argument("--shuffle", action="store_true", help="shuffle texts with --seed before picking")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass (per-worker memory)")
    c.add_argument("--cka-tokens", type=int, default=512, help="token sample size for the CKA metrics")
    c.add_argument("--dtype", default="float32")
    c.add_argument("--overwrite", action="store_true")
    c.add_argument("--ray", action="store_true", help="run the stages as a Ray Data job (actor pools on the cluster)")
    c.add_argument("--num-workers", type=int, default=2, help="with --ray: actors per pipeline stage")
    c.add_argument("--cpus-per-worker", type=float, default=0.5, help="with --ray: CPUs of each actor")
    c.add_argument("--actor-start-timeout-s", type=float, default=600.0,
                   help="with --ray: fail with a clear error if a stage's actors are not all up by then")
    c.add_argument("--address", help="with --ray: Ray cluster to join (default: $RAY_ADDRESS, else a private "
                                     "local instance)")


def _serve(args: argparse.Namespace) -> int:
    from sere_dist.serve.config import DEFAULT_ARGS, load_yaml_args
    from sere_dist.serve.endpoint import serve_forever

    if args.config:
        app_args, http = load_yaml_args(args.config)
        port = args.port or int(http.get("port", 8000))
    else:
        app_args, port = dict(DEFAULT_ARGS), args.port or 8000
    serve_forever(app_args, port)
    return 0


def _serve_demo(args: argparse.Namespace) -> int:
    from sere_dist.serve.config import load_yaml_args
    from sere_dist.serve.demo import run_demo

    config = load_yaml_args(args.config)[0] if args.config else None
    run_demo(port=args.port, requests=args.requests, max_tokens=args.max_tokens, rounds=args.rounds,
             json_out=args.json, config=config)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sere", description="SERE expert re-routing for MoE serving on Ray + vLLM")
    sub = p.add_subparsers(dest="cmd", required=True)

    d = sub.add_parser("demo", help="offline demo: tiny MoE model, in-process calibration, fidelity table")
    d.add_argument("--kind", choices=["planted", "random", "trained"], default="planted")
    d.add_argument("--family", default="qwen3_moe")
    d.add_argument("--experts", type=int, default=16)
    d.add_argument("--top-k", type=int, default=4)
    d.add_argument("--metric", default="frobenius")
    d.add_argument("--rho", type=float, default=0.3)
    d.add_argument("--batch", type=int, default=16, help="decode batch size (sequences per step)")
    d.add_argument("--seq-len", type=int, default=64)
    d.add_argument("--cal-samples", type=int, default=64)
    d.add_argument("--eval-samples", type=int, default=32)
    d.add_argument("--out", help="also write the similarity artifact here")
    d.add_argument("--json", help="write the table as JSON here")
    d.set_defaults(fn=_demo)

    m = sub.add_parser("make-model", help="write a tiny MoE checkpoint (random or planted)")
    m.add_argument("out")
    m.add_argument("--family", default="qwen3_moe")
    m.add_argument("--kind", choices=["random", "planted"], default="planted")
    m.add_argument("--hidden", type=int, default=128)
    m.add_argument("--layers", type=int, default=2)
    m.add_argument("--experts", type=int, default=16)
    m.add_argument("--top-k", type=int, default=4)
    m.add_argument("--intermediate", type=int, default=64)
    m.add_argument("--seed", type=int, default=0)
    m.set_defaults(fn=_make_model)

    t = sub.add_parser("train-tiny", help="train a small MoE language model on stdlib text (from scratch, or "
                                          "upcycled from a dense model trained first)")
    t.add_argument("--out", help="output directory (default: the shipped sere_dist/data/tiny-trained)")
    t.add_argument("--family", choices=["qwen3_moe", "qwen2_moe", "mixtral", "olmoe"], default="qwen3_moe")
    t.add_argument("--experts", type=int, default=16, help="routed experts per MoE layer")
    t.add_argument("--top-k", type=int, default=4, help="experts per token")
    t.add_argument("--intermediate", type=int, default=128, help="expert FFN width")
    t.add_argument("--hidden", type=int, default=128)
    t.add_argument("--layers", type=int, default=4)
    t.add_argument("--shared-expert", action="store_true", help="add a shared expert (qwen2_moe family)")
    t.add_argument("--aux-coef", type=float, default=0.01, help="router load-balancing loss weight")
    t.add_argument("--router-init-scale", type=float, default=0.1,
                   help="router weights start at this times the default init (small: near-uniform routing)")
    t.add_argument("--steps", type=int, default=600, help="MoE training steps")
    t.add_argument("--batch-size", type=int, default=16)
    t.add_argument("--seq-len", type=int, default=128)
    t.add_argument("--lr", type=float, default=3e-3)
    t.add_argument("--upcycle", choices=["copy", "split"], help="train a dense model first and turn its FFN into "
                                                                "the experts (copy: each expert = the FFN; split: slices)")
    t.add_argument("--dense-steps", type=int, default=600, help="dense training steps before upcycling")
    t.add_argument("--dense-out", help="also save the dense parent model here")
    t.add_argument("--upcycle-noise", type=float, default=0.01, help="relative noise added to each expert copy")
    t.add_argument("--split-copies", type=int, default=1, help="split: experts sharing each FFN slice")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default); results are "
                                                          "deterministic for a given thread count")
    t.set_defaults(fn=_train_tiny)

    c = sub.add_parser("calibrate", help="similarity artifact of a checkpoint (in this process, or --ray: a Ray "
                                         "Data job; calibration_jobs/calibrate.py is `sere calibrate --ray`)")
    add_calibration_options(c)
    c.set_defaults(fn=_calibrate)

    sv = sub.add_parser("serve", help="serve the OpenAI-compatible endpoint (Ray Serve LLM + vLLM + SERE) until Ctrl-C")
    sv.add_argument("--config", help="Serve YAML (deploy/cpu.yaml); default: the embedded tiny model with SERE")
    sv.add_argument("--port", type=int, help="HTTP port (default: the config's, else 8000)")
    sv.set_defaults(fn=_serve)

    sd = sub.add_parser("serve-demo", help="start the endpoint, wait for a real completion, compare SERE on/off")
    sd.add_argument("--config", help="Serve YAML whose args to use (default: the embedded tiny model)")
    sd.add_argument("--port", type=int, default=8000)
    sd.add_argument("--requests", type=int, default=8, help="concurrent requests per model and round")
    sd.add_argument("--max-tokens", type=int, default=32)
    sd.add_argument("--rounds", type=int, default=2)
    sd.add_argument("--json", help="also write the measurements here")
    sd.set_defaults(fn=_serve_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    from sere_dist.calibration.pipeline import ActorStartError
    from sere_dist.core.config import ConfigError
    try:
        return args.fn(args)
    except (ConfigError, ValueError) as exc:       # every config, artifact and input check
        print(f"sere {args.cmd}: error: {exc}", file=sys.stderr)
        return 2
    except ActorStartError as exc:
        print(f"sere {args.cmd}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        done = "; nothing was written (outputs appear only when complete)" if args.cmd == "calibrate" else ""
        print(f"sere {args.cmd}: interrupted{done}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
