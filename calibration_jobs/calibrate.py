"""Ray job: similarity matrices of every MoE layer of a checkpoint, computed with Ray Data.

    ray job submit --address http://HEAD:8265 --working-dir . \
        --runtime-env-json '{"excludes": [".venv", ".git"]}' -- \
        python calibration_jobs/calibrate.py --model /models/Qwen1.5-MoE-A2.7B --out /shared/sim/qwen15

This is `sere calibrate --ray` (same options, same pipeline, same outputs: the artifact, stats.csv,
stats.md, heatmaps.png). Inside `ray job submit` it joins the job's cluster ($RAY_ADDRESS); run directly
it starts a private local Ray instance, or joins --address. Every check runs before Ray starts; the
artifact appears only when the whole run succeeded.
"""

from __future__ import annotations

import sys
from pathlib import Path

# the job's working dir is the repo root; make its sere_dist the one imported, here and in workers
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sere_dist.cli import main as sere_main  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    return sere_main(["calibrate", "--ray", *[a for a in args if a != "--ray"]])


if __name__ == "__main__":
    sys.exit(main())
