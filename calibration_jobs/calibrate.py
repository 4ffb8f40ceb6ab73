"""Ray job: similarity matrices of every MoE layer of a checkpoint, computed with Ray Data.

    ray job submit --address http://HEAD:8265 --working-dir . \
        --runtime-env-json '{"excludes": [".venv", ".git"]}' -- \
        python calibration_jobs/calibrate.py --model /models/Qwen1.5-MoE-A2.7B --out /shared/sim/qwen15

Run directly (no `ray job submit`) it starts a private local Ray instance, or joins --address.
Every check runs before Ray starts; the artifact appears only when the whole run succeeded.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

# the job's working dir is the repo root; make its sere_dist the one imported, here and in workers
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sere_dist.artifact import ArtifactError  # noqa: E402
from sere_dist.calibration import ActorStartError, CalibrationJob, prepare, run, stats_table, summary_line  # noqa: E402
from sere_dist.config import METRICS  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="local checkpoint directory (transformers layout)")
    p.add_argument("--out", required=True, help="artifact directory to write")
    p.add_argument("--data", help=".jsonl/.json/.parquet with a text column, a datasets directory, or a hub "
                                  "dataset name (default: Python stdlib text shipped with every machine)")
    p.add_argument("--text-column", default="text")
    p.add_argument("--split", default="train")
    p.add_argument("--metric", default="frobenius", help=f"one of {', '.join(METRICS)}")
    p.add_argument("--num-samples", type=int, default=64, help="calibration sequences")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per sequence")
    p.add_argument("--keep-short", action="store_true",
                   help="also use texts not longer than --seq-len (padded); the paper keeps only longer ones")
    p.add_argument("--shuffle", action="store_true", help="shuffle texts with --seed before picking")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass (per-worker memory)")
    p.add_argument("--num-workers", type=int, default=2, help="actors per pipeline stage")
    p.add_argument("--cpus-per-worker", type=float, default=0.5)
    p.add_argument("--actor-start-timeout-s", type=float, default=600.0,
                   help="fail with a clear error if a stage's actors are not all up by then (cluster too small)")
    p.add_argument("--cka-tokens", type=int, default=512, help="token sample size for the CKA metrics")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--address", help="Ray address to join (default: RAY_ADDRESS, else a private local instance)")
    p.add_argument("--overwrite", action="store_true")
    return p


def job_from_args(a: argparse.Namespace) -> CalibrationJob:
    return CalibrationJob(model=str(Path(a.model).resolve()), out=str(Path(a.out).resolve()), data=a.data,
                          text_column=a.text_column, split=a.split, metric=a.metric, num_samples=a.num_samples,
                          seq_len=a.seq_len, keep_longer_only=not a.keep_short, shuffle=a.shuffle, seed=a.seed,
                          batch_size=a.batch_size, num_workers=a.num_workers, cpus_per_worker=a.cpus_per_worker,
                          actor_start_timeout_s=a.actor_start_timeout_s, cka_tokens=a.cka_tokens,
                          overwrite=a.overwrite, dtype=a.dtype)


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    try:
        prep = prepare(job_from_args(a))
    except (ArtifactError, ValueError) as exc:
        print(f"calibrate: error: {exc}", file=sys.stderr)
        return 2
    print(f"calibrate: {prep.tokens.shape[0]} sequences x {prep.tokens.shape[1]} tokens from {prep.source}; "
          f"{len(prep.fingerprint['moe_layers'])} MoE layers x {prep.fingerprint['num_experts']} experts; "
          f"metric {a.metric}", flush=True)
    import ray

    address = a.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
    else:
        ray.init(address="local", num_cpus=max(2, int(2 * a.num_workers * a.cpus_per_worker + 1)),
                 object_store_memory=300 * 1024**2, include_dashboard=False)
    try:
        res = run(prep)
    except ActorStartError as exc:
        print(f"calibrate: error: {exc}", file=sys.stderr)
        return 1
    finally:
        ray.shutdown()
    print(stats_table(res.artifact.matrices), end="")
    print(summary_line(res), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
