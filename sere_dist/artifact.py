"""Similarity artifact: a directory with one safetensors file (an [E, E] matrix per MoE layer) and
JSON metadata, written atomically, and checked against the model it is loaded for.

    OUT/similarity.safetensors   tensors "layers.<i>" float32 [E, E]; metadata header {"sere": json}
    OUT/metadata.json            the same metadata, plus per-layer off-diagonal statistics

`model_fingerprint` reads the MoE facts (architecture, E, k, MoE layer indices, hidden size) from a
Hugging Face config of any supported family; the same function serves calibration and serving.
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

from . import __version__

SIM_FILE = "similarity.safetensors"
META_FILE = "metadata.json"
FINGERPRINT_KEYS = ("architecture", "num_experts", "top_k", "moe_layers", "hidden_size")


class ArtifactError(ValueError):
    """The artifact is missing, malformed, or was computed for another model."""


def _get(cfg: Any, *names: str, default: Any = None) -> Any:
    for n in names:
        v = cfg.get(n) if isinstance(cfg, Mapping) else getattr(cfg, n, None)
        if v is not None:
            return v
    return default


def model_fingerprint(cfg: Any) -> dict[str, Any]:
    """MoE facts of a Hugging Face config (object or dict); raises ArtifactError if it is not MoE."""
    archs = _get(cfg, "architectures") or [_get(cfg, "model_type", default="?")]
    arch = archs[0]
    mtype = _get(cfg, "model_type", default="")
    n_layers = int(_get(cfg, "num_hidden_layers", default=0))
    top_k = _get(cfg, "num_experts_per_tok", "moe_top_k", "top_k")
    if mtype.startswith("deepseek"):
        e = _get(cfg, "n_routed_experts")
        first_dense = int(_get(cfg, "first_k_dense_replace", default=0))
        freq = int(_get(cfg, "moe_layer_freq", default=1))
        layers = [i for i in range(n_layers) if e and i >= first_dense and i % freq == 0]
    elif mtype in ("qwen2_moe", "qwen3_moe"):
        e = _get(cfg, "num_experts")
        step = int(_get(cfg, "decoder_sparse_step", default=1))
        mlp_only = set(_get(cfg, "mlp_only_layers", default=[]) or [])
        layers = [i for i in range(n_layers) if e and i not in mlp_only and (i + 1) % step == 0]
    else:  # mixtral, olmoe, phimoe, granitemoe...: every layer is MoE
        e = _get(cfg, "num_local_experts", "num_experts", "n_routed_experts")
        layers = list(range(n_layers)) if e else []
    if not e or not top_k or not layers:
        raise ArtifactError(
            f"model {arch} (model_type={mtype!r}) is not a Mixture-of-Experts model: no routed experts / "
            f"top-k found in its config (num_experts={e}, num_experts_per_tok={top_k})")
    return {"architecture": arch, "model_type": mtype, "num_experts": int(e), "top_k": int(top_k),
            "moe_layers": layers, "hidden_size": int(_get(cfg, "hidden_size", default=0)),
            "num_hidden_layers": n_layers}


@dataclass
class SimilarityArtifact:
    """Per-layer similarity matrices with their provenance."""

    matrices: dict[int, torch.Tensor]                  # MoE layer index -> float32 [E, E]
    fingerprint: dict[str, Any]
    metric: str
    tokens: int
    data_digest: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    created: str = ""
    version: str = __version__

    def metadata(self) -> dict[str, Any]:
        from .similarity import offdiag_stats
        return {"format": "sere-similarity/1", "fingerprint": self.fingerprint, "metric": self.metric,
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
        meta = json.loads(raw)
        art = cls(matrices={i: m.float() for i, m in mats.items()}, fingerprint=meta["fingerprint"],
                  metric=meta["metric"], tokens=meta["tokens"], data_digest=meta.get("data_digest", ""),
                  extra=meta.get("extra", {}), created=meta.get("created", ""),
                  version=meta.get("sere_dist_version", "?"))
        validate_matrices(art.matrices, art.fingerprint, source=str(f))
        return art

    def check_model(self, fingerprint: Mapping[str, Any]) -> None:
        """Refuse an artifact computed for another model, naming both sides."""
        for key in FINGERPRINT_KEYS:
            mine, theirs = self.fingerprint.get(key), fingerprint.get(key)
            if key == "architecture":
                mine, theirs = _family(mine), _family(theirs)
            if mine != theirs:
                raise ArtifactError(
                    f"similarity artifact does not match the model: {key} is {self.fingerprint.get(key)!r} in "
                    f"the artifact but {fingerprint.get(key)!r} in the model; recalibrate for this model")


def _family(arch: Any) -> str:
    return str(arch).replace("ForCausalLM", "").lower()


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
