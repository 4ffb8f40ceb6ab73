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

    from .capture import calibrate, tokenize_texts
    from .config import SereConfig
    from .corpus import split_corpus, stdlib_documents
    from .fidelity import evaluate, sere_transform
    from .tiny import TinySpec, build_model

    torch.manual_seed(0)
    t0 = time.time()
    if args.kind == "trained":
        from .capture import load_model
        from .train import TRAINED_DIR, TRAINED_SPEC as spec
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
    from .tiny import TinySpec, write_checkpoint

    spec = TinySpec(family=args.family, hidden_size=args.hidden, num_layers=args.layers, num_experts=args.experts,
                    top_k=args.top_k, expert_intermediate=args.intermediate, seed=args.seed)
    out = write_checkpoint(args.out, spec, kind=args.kind)
    print(f"wrote {args.kind} {args.family} checkpoint to {out}")
    return 0


def _train_tiny(args: argparse.Namespace) -> int:
    from .train import TRAINED_DIR, train

    res = train(Path(args.out) if args.out else TRAINED_DIR, steps=args.steps)
    print(f"held-out perplexity {res['heldout_ppl']:.2f} on {res['heldout_tokens']} tokens "
          f"after {res['steps']} steps ({res['wall_s']} s)")
    return 0


def _calibrate(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .artifact import ArtifactError
    from .capture import calibrate, load_model, tokenize_texts
    from .corpus import split_corpus, stdlib_documents

    if args.ray:
        return _calibrate_ray(args)
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise ArtifactError(f"output {out} exists; pass --overwrite to replace it")
    model, tok = load_model(args.model)
    texts = split_corpus(stdlib_documents())[0] if args.data is None else _read_texts(args.data)
    toks = tokenize_texts(tok, texts, args.seq_len, args.num_samples)
    art = calibrate(model, toks, metric=args.metric, batch_size=args.batch_size,
                    progress=lambda it: tqdm(it, desc="calibrate", unit="batch"))
    art.save(out, overwrite=args.overwrite)
    print(f"wrote {out} ({len(art.matrices)} layers, {art.tokens} tokens, {args.metric})")
    return 0


def _calibrate_ray(args: argparse.Namespace) -> int:
    """`sere calibrate --ray`: the Ray Data pipeline on a private local Ray instance (or --address)."""
    import ray

    from .calibration import CalibrationJob, prepare, run, stats_table, summary_line

    prep = prepare(CalibrationJob(model=str(Path(args.model).resolve()), out=str(Path(args.out).resolve()),
                                  data=args.data, metric=args.metric, num_samples=args.num_samples,
                                  seq_len=args.seq_len, batch_size=args.batch_size, num_workers=args.num_workers,
                                  actor_start_timeout_s=args.actor_start_timeout_s, overwrite=args.overwrite))
    if args.address:
        ray.init(address=args.address)
    else:
        ray.init(address="local", num_cpus=max(2, args.num_workers + 1), object_store_memory=300 * 1024**2,
                 include_dashboard=False)
    try:
        res = run(prep)
    finally:
        ray.shutdown()
    print(stats_table(res.artifact.matrices), end="")
    print(summary_line(res))
    return 0


def _read_texts(path: str) -> list[str]:
    import datasets

    p = Path(path)
    if p.suffix in (".jsonl", ".json"):
        ds = datasets.load_dataset("json", data_files=str(p), split="train")
    elif p.suffix == ".parquet":
        ds = datasets.load_dataset("parquet", data_files=str(p), split="train")
    else:
        ds = datasets.load_from_disk(str(p))
    if "text" not in ds.column_names:
        raise ValueError(f"{path} has no 'text' column (columns: {ds.column_names})")
    return list(ds["text"])


def _serve(args: argparse.Namespace) -> int:
    from .serving import DEFAULT_ARGS, load_yaml_args, serve_forever

    if args.config:
        app_args, http = load_yaml_args(args.config)
        port = args.port or int(http.get("port", 8000))
    else:
        app_args, port = dict(DEFAULT_ARGS), args.port or 8000
    serve_forever(app_args, port)
    return 0


def _serve_demo(args: argparse.Namespace) -> int:
    from .serving import load_yaml_args, run_demo

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

    t = sub.add_parser("train-tiny", help="train the small MoE language model on stdlib text")
    t.add_argument("--out")
    t.add_argument("--steps", type=int, default=600)
    t.set_defaults(fn=_train_tiny)

    c = sub.add_parser("calibrate", help="single-process calibration (see calibration_jobs/ for the Ray job)")
    c.add_argument("--model", required=True)
    c.add_argument("--data", help="jsonl/parquet with a text column, or a datasets directory (default: stdlib text)")
    c.add_argument("--out", required=True)
    c.add_argument("--metric", default="frobenius")
    c.add_argument("--num-samples", type=int, default=64)
    c.add_argument("--seq-len", type=int, default=128)
    c.add_argument("--batch-size", type=int, default=8)
    c.add_argument("--overwrite", action="store_true")
    c.add_argument("--ray", action="store_true", help="run the Ray Data pipeline (sere_dist.calibration) instead")
    c.add_argument("--num-workers", type=int, default=2, help="with --ray: actors per pipeline stage")
    c.add_argument("--actor-start-timeout-s", type=float, default=600.0,
                   help="with --ray: fail if a stage's actors are not all up by then")
    c.add_argument("--address", help="with --ray: Ray cluster to join (default: a private local instance)")
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
    from .artifact import ArtifactError
    from .calibration import ActorStartError
    from .config import SereConfigError
    try:
        return args.fn(args)
    except (ArtifactError, SereConfigError, ValueError) as exc:
        print(f"sere {args.cmd}: error: {exc}", file=sys.stderr)
        return 2
    except ActorStartError as exc:
        print(f"sere {args.cmd}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
