"""The embedded default model and its calibration artifact, built once per machine and cached."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path


def sere_home() -> Path:
    return Path(os.environ.get("SERE_HOME") or Path.home() / ".cache" / "sere_dist")


def prepare_default(home: Path | None = None) -> tuple[Path, Path]:
    """(checkpoint dir, artifact dir) of the embedded default model, building them once.

    Prefers the trained tiny model shipped in sere_dist/data/tiny-trained/ when present; otherwise
    writes a planted qwen3_moe checkpoint (16 experts, top-4). Calibrates in-process on stdlib text.
    A file lock makes concurrent first uses (tests, demo, several replicas) build it once.
    """
    from sere_dist.core.artifact import FORMAT
    from sere_dist.models.tiny import DATA_DIR

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
            from sere_dist.models.tiny import TinySpec, write_checkpoint
            write_checkpoint(model_dir, TinySpec(family="qwen3_moe", num_experts=16, top_k=4), kind="planted")
        weights = max((f.stat().st_mtime for f in model_dir.glob("*.safetensors")), default=0.0)
        meta = art_dir / "metadata.json"
        if not meta.exists() or meta.stat().st_mtime < weights or _format(meta) != FORMAT:
            # (re)calibrate when the weights changed or an older sere-dist wrote it (format 1 lacks the
            # routed-token statistics of the error-aware modes)
            from sere_dist.calibration.capture import load_model, tokenize_texts
            from sere_dist.calibration.pipeline import calibrate
            from sere_dist.calibration.corpus import split_corpus, stdlib_documents
            model, tok = load_model(model_dir)
            toks = tokenize_texts(tok, split_corpus(stdlib_documents())[0], seq_len=64, num_samples=32)
            calibrate(model, toks, metric="frobenius").save(art_dir, overwrite=True)
    return model_dir, art_dir


def _format(meta: Path) -> str | None:
    import json

    try:
        return json.loads(meta.read_text()).get("format")
    except (OSError, ValueError, AttributeError):
        return None
