"""Similarity artifact: a directory with one safetensors file (an [E, E] matrix per MoE layer) and
JSON metadata, written atomically, and checked against the model it is loaded for.

    OUT/similarity.safetensors   tensors "layers.<i>" float32 [E, E]; metadata header {"sere": json}
    OUT/metadata.json            the same metadata, plus per-layer off-diagonal statistics

`artifact_for_model` is the one artifact-vs-model check (S <= k, the artifact's fingerprint against the
model's, every MoE layer present and finite), used by the server, the vLLM plugin and its workers;
artifacts are loaded once per process.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from sere_dist import __version__
from sere_dist.core.config import SereConfig, SereConfigError
from sere_dist.core.model import MATCH_KEYS as FINGERPRINT_KEYS, ArtifactError, ModelFingerprint, model_fingerprint

__all__ = ["ArtifactError", "SimilarityArtifact", "artifact_for_model", "load_artifact", "model_fingerprint",
           "validate_matrices", "FINGERPRINT_KEYS"]

SIM_FILE = "similarity.safetensors"
META_FILE = "metadata.json"
FORMAT = "sere-similarity/1"


@dataclass
class SimilarityArtifact:
    """Per-layer similarity matrices with their provenance."""

    matrices: dict[int, torch.Tensor]                  # MoE layer index -> float32 [E, E]
    fingerprint: ModelFingerprint                      # a mapping given here is converted
    metric: str
    tokens: int
    data_digest: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    created: str = ""
    version: str = __version__

    def __post_init__(self) -> None:
        self.fingerprint = ModelFingerprint.coerce(self.fingerprint)

    def metadata(self) -> dict[str, Any]:
        from sere_dist.core.similarity import offdiag_stats
        return {"format": FORMAT, "fingerprint": self.fingerprint.to_dict(), "metric": self.metric,
                "tokens": self.tokens, "data_digest": self.data_digest,
                "created": self.created or _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                "sere_dist_version": self.version, "layers": sorted(self.matrices),
                "stats": {str(i): offdiag_stats(m) for i, m in sorted(self.matrices.items())},
                **({"extra": self.extra} if self.extra else {})}

    def save(self, out: str | os.PathLike, overwrite: bool = False,
             extra_files: Mapping[str, bytes] | None = None) -> Path:
        """Write atomically: a temporary sibling directory renamed into place; never half-written.

        extra_files: relative name -> bytes (reports, plots) written inside the same atomic directory.
        """
        out = Path(out)
        if out.exists() and not overwrite:
            raise ArtifactError(f"output {out} exists; pass --overwrite to replace it")
        validate_matrices(self.matrices, self.fingerprint)
        out.parent.mkdir(parents=True, exist_ok=True)
        meta = self.metadata()
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        try:
            tensors = {f"layers.{i}": m.detach().float().contiguous().cpu() for i, m in self.matrices.items()}
            save_file(tensors, str(tmp / SIM_FILE), metadata={"sere": json.dumps(meta)})
            (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
            for name, data in (extra_files or {}).items():
                dst = (tmp / name).resolve()
                if tmp.resolve() not in dst.parents or name in (SIM_FILE, META_FILE):
                    raise ArtifactError(f"extra file name {name!r} must be a new relative path inside the artifact")
                dst.parent.mkdir(parents=True, exist_ok=True)
                dst.write_bytes(data)
            if out.exists():
                old = out.with_name(f".{out.name}.old-{os.getpid()}")
                os.replace(out, old)
                os.replace(tmp, out)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return out

    @classmethod
    def load(cls, path: str | os.PathLike) -> "SimilarityArtifact":
        p = Path(path)
        f = p / SIM_FILE if p.is_dir() else p
        if not f.exists():
            raise ArtifactError(f"similarity artifact not found: {f} (run `sere calibrate` or the calibration job)")
        try:
            with safe_open(str(f), framework="pt") as h:
                raw = (h.metadata() or {}).get("sere")
                mats = {int(k.split(".")[1]): h.get_tensor(k) for k in h.keys() if k.startswith("layers.")}
        except Exception as exc:  # noqa: BLE001 - any read failure is a malformed artifact
            raise ArtifactError(f"cannot read similarity artifact {f}: {exc}") from exc
        if not raw:
            raise ArtifactError(f"{f} has no sere metadata; it was not written by sere-dist")
        try:
            meta = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise ArtifactError(f"{f}: the sere metadata in its header is not valid JSON ({exc}); "
                                f"recalibrate to rewrite it") from None
        if not isinstance(meta, dict):
            raise ArtifactError(f"{f}: the sere metadata in its header is a {type(meta).__name__}, not a mapping")
        missing = [k for k in ("fingerprint", "metric", "tokens") if k not in meta]
        if missing:
            raise ArtifactError(f"{f}: the sere metadata in its header lacks {missing}; it was not written by "
                                f"this sere-dist (recalibrate)")
        try:
            fp = ModelFingerprint.coerce(meta["fingerprint"])
        except ArtifactError as exc:
            raise ArtifactError(f"{f}: {exc}; recalibrate") from None
        art = cls(matrices={i: m.float() for i, m in mats.items()}, fingerprint=fp,
                  metric=meta["metric"], tokens=meta["tokens"], data_digest=meta.get("data_digest", ""),
                  extra=meta.get("extra", {}), created=meta.get("created", ""),
                  version=meta.get("sere_dist_version", "?"))
        validate_matrices(art.matrices, art.fingerprint, source=str(f))
        return art

    def check_model(self, fingerprint: Mapping[str, Any]) -> None:
        """Refuse an artifact computed for another model, naming both sides."""
        why = self.fingerprint.mismatch(fingerprint)
        if why:
            raise ArtifactError(why)


_LOADED: dict[tuple[str, float], SimilarityArtifact] = {}


def load_artifact(path: str | os.PathLike) -> SimilarityArtifact:
    """`SimilarityArtifact.load`, once per process per file version (path and modification time)."""
    p = Path(path).resolve()
    f = p / SIM_FILE if p.is_dir() else p
    key = (str(f), f.stat().st_mtime if f.exists() else -1.0)
    art = _LOADED.get(key)
    if art is None:
        art = SimilarityArtifact.load(p)
        _LOADED[key] = art
    return art


def artifact_for_model(sere: SereConfig, fingerprint: Mapping[str, Any]) -> SimilarityArtifact:
    """The one artifact-vs-model check: S and per-layer overrides against the model's k and MoE layers,
    then the artifact (loaded once per process) against the model's fingerprint. Errors name the field."""
    fp = ModelFingerprint.coerce(fingerprint)
    sere.check_top_k(fp.top_k, list(fp.moe_layers))
    if not sere.artifact:
        raise SereConfigError("sere.artifact is not set; pass the path of a similarity artifact "
                              "(`sere calibrate` or the calibration job writes one)")
    try:
        art = load_artifact(sere.artifact)
    except ArtifactError as exc:
        raise ArtifactError(f"sere.artifact: {exc}") from None
    why = art.fingerprint.mismatch(fp)
    if why:
        raise ArtifactError(f"sere.artifact {sere.artifact}: {why}")
    return art


def validate_matrices(mats: Mapping[int, torch.Tensor], fp: Mapping[str, Any], source: str = "artifact") -> None:
    """Every MoE layer has a finite [E, E] matrix with values in [0, 1]."""
    e = fp["num_experts"]
    missing = [i for i in fp["moe_layers"] if i not in mats]
    if missing:
        raise ArtifactError(f"{source}: no similarity matrix for MoE layer(s) {missing}")
    for i, m in mats.items():
        if tuple(m.shape) != (e, e):
            raise ArtifactError(f"{source}: layer {i} matrix has shape {tuple(m.shape)}, expected ({e}, {e}) "
                                f"for a model with {e} experts")
        if not torch.isfinite(m).all():
            raise ArtifactError(f"{source}: layer {i} matrix contains NaN or inf")
        lo, hi = float(m.min()), float(m.max())
        if lo < -1e-6 or hi > 1 + 1e-6 or math.isnan(lo):
            raise ArtifactError(f"{source}: layer {i} matrix has values in [{lo:.3g}, {hi:.3g}], expected [0, 1]")
