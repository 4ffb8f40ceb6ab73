"""Similarity artifact: a directory with one safetensors file (an [E, E] matrix per MoE layer, and
the routed-token statistics of the error-aware rule) and JSON metadata, written atomically, and
checked against the model it is loaded for.

    OUT/similarity.safetensors   tensors "layers.<i>" float32 [E, E] (the similarity) and, from format
                                 2 on, "routed.<i>.<c|n>.<count|router>" float64 [E, E] (C and N per
                                 weighting); metadata header {"sere": json}
    OUT/metadata.json            the same metadata, plus per-layer off-diagonal statistics

Formats: `sere-similarity/1` (similarity only: the paper's, rank-aware and top-S rules) and
`sere-similarity/2` (also C and N: every rule, including the error-aware ones). A format-1 artifact
still loads; asking an error-aware mode of it stops start-up naming `sere.mode` and the fix.

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
FORMAT = "sere-similarity/2"
FORMATS = ("sere-similarity/1", FORMAT)          # what this version reads
ROUTED_WEIGHTINGS = ("count", "router")


def _routed_key(layer: int, which: str, weighting: str) -> str:
    return f"routed.{layer}.{which}.{weighting}"


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
    # layer -> weighting ("count", "router") -> (C, N) float64 [E, E]; empty in a format-1 artifact
    routed: dict[int, dict[str, tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=dict)
    loaded_format: str = ""                            # the format of the file it was loaded from

    def __post_init__(self) -> None:
        self.fingerprint = ModelFingerprint.coerce(self.fingerprint)

    @property
    def format(self) -> str:
        """The file format: as loaded, else format 2 with routed statistics and format 1 without (which
        a format-1 reader reads too)."""
        return self.loaded_format or self._written_format

    @property
    def _written_format(self) -> str:
        return FORMAT if self.routed else FORMATS[0]

    def error_aware_tables(self, layer: int, weighting: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale a [E, E], gain g [E, E]) float32 of one layer for the error-aware rule."""
        from sere_dist.core.reroute import error_aware_gain

        if layer not in self.routed:
            raise ArtifactError(f"artifact has no routed-token statistics for MoE layer {layer} "
                                f"(format {self.format}); recalibrate")
        return error_aware_gain(*self.routed[layer][weighting])

    def metadata(self) -> dict[str, Any]:
        from sere_dist.core.similarity import offdiag_stats
        return {"format": self._written_format, "fingerprint": self.fingerprint.to_dict(), "metric": self.metric,
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
        validate_routed(self.routed, self.fingerprint)
        out.parent.mkdir(parents=True, exist_ok=True)
        meta = self.metadata()
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        try:
            tensors = {f"layers.{i}": m.detach().float().contiguous().cpu() for i, m in self.matrices.items()}
            for i, per in self.routed.items():
                for weighting, (c, n) in per.items():
                    tensors[_routed_key(i, "c", weighting)] = c.detach().double().cpu().clone()
                    tensors[_routed_key(i, "n", weighting)] = n.detach().double().cpu().clone()
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
                routed_raw = {k: h.get_tensor(k) for k in h.keys() if k.startswith("routed.")}
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
        fmt = meta.get("format", FORMATS[0])
        if fmt not in FORMATS:
            raise ArtifactError(f"{f}: artifact format {fmt!r} is not one this sere-dist {__version__} reads "
                                f"({', '.join(FORMATS)}); upgrade sere-dist or recalibrate")
        try:
            fp = ModelFingerprint.coerce(meta["fingerprint"])
        except ArtifactError as exc:
            raise ArtifactError(f"{f}: {exc}; recalibrate") from None
        art = cls(matrices={i: m.float() for i, m in mats.items()}, fingerprint=fp,
                  metric=meta["metric"], tokens=meta["tokens"], data_digest=meta.get("data_digest", ""),
                  extra=meta.get("extra", {}), created=meta.get("created", ""),
                  version=meta.get("sere_dist_version", "?"), routed=_routed_from(routed_raw, f), loaded_format=fmt)
        validate_matrices(art.matrices, art.fingerprint, source=str(f))
        if fmt != FORMATS[0]:
            missing = [i for i in fp.moe_layers if i not in art.routed]
            if missing:
                raise ArtifactError(f"{f}: format {fmt} but no routed-token statistics for MoE layer(s) {missing}; "
                                    f"recalibrate")
        validate_routed(art.routed, art.fingerprint, source=str(f))
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
    if sere.enabled and sere.error_aware and not art.routed:
        raise ArtifactError(
            f"sere.mode={sere.mode} needs the routed-token statistics that artifacts of format {FORMAT} carry, but "
            f"sere.artifact {sere.artifact} is {art.format} (sere-dist {art.version}); recalibrate it with this "
            f"sere-dist (`sere calibrate` or the calibration job), or use sere.mode paper")
    return art


def _routed_from(raw: Mapping[str, torch.Tensor], source) -> dict[int, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """{"routed.<i>.<c|n>.<weighting>": tensor} -> {i: {weighting: (C, N)}}; a lone C or N is an error."""
    out: dict[int, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
    seen: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, t in raw.items():
        parts = key.split(".")
        if len(parts) != 4 or not parts[1].isdigit() or parts[2] not in ("c", "n") or parts[3] not in ROUTED_WEIGHTINGS:
            raise ArtifactError(f"{source}: unexpected tensor {key!r}; recalibrate")
        seen.setdefault((int(parts[1]), parts[3]), {})[parts[2]] = t.double()
    for (layer, weighting), cn in seen.items():
        if set(cn) != {"c", "n"}:
            raise ArtifactError(f"{source}: layer {layer} has routed statistic {sorted(cn)} without its pair; recalibrate")
        out.setdefault(layer, {})[weighting] = (cn["c"], cn["n"])
    return out


def validate_routed(routed: Mapping[int, Mapping[str, tuple[torch.Tensor, torch.Tensor]]], fp: Mapping[str, Any],
                    source: str = "artifact") -> None:
    """Routed-token statistics, where present: both weightings, finite [E, E], N >= 0, C[e, e] >= 0."""
    e = fp["num_experts"]
    for i, per in routed.items():
        if set(per) != set(ROUTED_WEIGHTINGS):
            raise ArtifactError(f"{source}: layer {i} routed statistics have weightings {sorted(per)}, expected "
                                f"{list(ROUTED_WEIGHTINGS)}")
        for weighting, (c, n) in per.items():
            for name, t in (("C", c), ("N", n)):
                if tuple(t.shape) != (e, e):
                    raise ArtifactError(f"{source}: layer {i} routed {name} ({weighting}) has shape {tuple(t.shape)}, "
                                        f"expected ({e}, {e})")
                if not torch.isfinite(t).all():
                    raise ArtifactError(f"{source}: layer {i} routed {name} ({weighting}) contains NaN or inf")
            if float(n.min()) < 0 or float(torch.diagonal(c).min()) < 0:
                raise ArtifactError(f"{source}: layer {i} routed statistics ({weighting}) have a negative energy "
                                    f"(N < 0 or C[e, e] < 0): not sums of squares; recalibrate")


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
