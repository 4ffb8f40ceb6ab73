"""SERE settings: one validated object shared by the demo, the calibration jobs and the vLLM plugin.

Every check raises `SereConfigError` naming the bad field and the fix, so a wrong setting stops
start-up instead of surfacing inside a forward pass.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Mapping

METRICS = ("frobenius", "cosine", "cka_linear", "cka_rbf")
PHASES = ("decode", "all")
MODES = ("paper", "rank_aware")


class SereConfigError(ValueError):
    """A SERE setting is invalid; the message names the field."""


@dataclass(frozen=True)
class LayerOverride:
    """Per-layer S and/or rho; None keeps the global value."""

    select_top_k: int | None = None
    threshold: float | None = None


@dataclass(frozen=True)
class SereConfig:
    """SERE re-routing settings.

    select_top_k: S, the number of each token's top experts that form the batch's primary set
        (1 <= S <= k; S = k leaves routing unchanged).
    threshold: rho in [0, 1]; a secondary expert moves to its most similar primary only when that
        similarity is >= rho (rho = 0 moves every secondary).
    metric: similarity the artifact was calibrated with (informational at serve time).
    phase: "decode" re-routes decode tokens only; "all" re-routes prefill tokens too.
    mode: "paper" (the paper's rule) or "rank_aware" (prefer primaries on ranks the token visits).
    layers: per-layer overrides keyed by MoE layer index.
    artifact: path of the similarity artifact (used by the vLLM plugin and serving).
    enabled: False turns re-routing off while keeping the rest of the configuration.
    record: debug; the vLLM plugin keeps the router outputs of the first `record` batches per layer
        (eager mode only; read with `sere_dist.vllm_plugin.sere_records(llm)`). 0 = off.
    """

    select_top_k: int = 2
    threshold: float = 0.3
    metric: str = "frobenius"
    phase: str = "decode"
    mode: str = "paper"
    layers: Mapping[int, LayerOverride] = field(default_factory=dict)
    artifact: str | None = None
    enabled: bool = True
    record: int = 0

    def __post_init__(self) -> None:
        _check_s("select_top_k", self.select_top_k)
        _check_rho("threshold", self.threshold)
        if self.metric not in METRICS:
            raise SereConfigError(f"sere.metric={self.metric!r} is unknown; use one of {', '.join(METRICS)}")
        if self.phase not in PHASES:
            raise SereConfigError(f"sere.phase={self.phase!r} is unknown; use one of {', '.join(PHASES)}")
        if isinstance(self.record, bool) or not isinstance(self.record, int) or self.record < 0:
            raise SereConfigError(f"sere.record={self.record!r} must be an integer >= 0 (batches to keep per layer)")
        if self.mode not in MODES:
            raise SereConfigError(f"sere.mode={self.mode!r} is unknown; use one of {', '.join(MODES)}")
        fixed = {}
        for key, ov in dict(self.layers).items():
            try:
                idx = int(key)
            except (TypeError, ValueError):
                raise SereConfigError(f"sere.layers key {key!r} is not a layer index (an integer)") from None
            if isinstance(ov, Mapping):
                unknown = set(ov) - {"select_top_k", "threshold"}
                if unknown:
                    raise SereConfigError(
                        f"sere.layers[{idx}] has unknown field(s) {sorted(unknown)}; allowed: select_top_k, threshold")
                ov = LayerOverride(**ov)
            if not isinstance(ov, LayerOverride):
                raise SereConfigError(f"sere.layers[{idx}] must be a mapping with select_top_k and/or threshold")
            if ov.select_top_k is not None:
                _check_s(f"layers[{idx}].select_top_k", ov.select_top_k)
            if ov.threshold is not None:
                _check_rho(f"layers[{idx}].threshold", ov.threshold)
            fixed[idx] = ov
        object.__setattr__(self, "layers", fixed)

    def for_layer(self, layer: int) -> tuple[int, float]:
        """(S, rho) in force for one MoE layer index."""
        ov = self.layers.get(layer)
        s = ov.select_top_k if ov and ov.select_top_k is not None else self.select_top_k
        rho = ov.threshold if ov and ov.threshold is not None else self.threshold
        return s, rho

    def check_top_k(self, top_k: int, layers: list[int] | None = None) -> None:
        """Refuse S > k for the model being served (k is only known once the model is)."""
        if self.select_top_k > top_k:
            raise SereConfigError(
                f"sere.select_top_k={self.select_top_k} exceeds the model's top-k ({top_k}); use 1..{top_k}")
        for idx, ov in self.layers.items():
            if ov.select_top_k is not None and ov.select_top_k > top_k:
                raise SereConfigError(
                    f"sere.layers[{idx}].select_top_k={ov.select_top_k} exceeds the model's top-k ({top_k})")
            if layers is not None and idx not in layers:
                raise SereConfigError(
                    f"sere.layers has an override for layer {idx}, which is not an MoE layer of this model "
                    f"(MoE layers: {layers})")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "SereConfig":
        """Build from a plain mapping (YAML, JSON, vLLM additional_config["sere"])."""
        if not isinstance(d, Mapping):
            raise SereConfigError(f"sere config must be a mapping, got {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise SereConfigError(f"sere has unknown field(s) {sorted(unknown)}; allowed: {sorted(names)}")
        return cls(**dict(d))

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["layers"] = {str(k): {kk: vv for kk, vv in dataclasses.asdict(v).items() if vv is not None}
                         for k, v in self.layers.items()}
        return out


def _check_s(name: str, s: Any) -> None:
    if isinstance(s, bool) or not isinstance(s, int):
        raise SereConfigError(f"sere.{name}={s!r} must be an integer (S, 1..k)")
    if s < 1:
        raise SereConfigError(f"sere.{name}={s} must be >= 1 (S, 1..k)")


def _check_rho(name: str, rho: Any) -> None:
    if isinstance(rho, bool) or not isinstance(rho, (int, float)):
        raise SereConfigError(f"sere.{name}={rho!r} must be a number in [0, 1]")
    if math.isnan(rho) or not 0.0 <= rho <= 1.0:
        raise SereConfigError(f"sere.{name}={rho} is outside [0, 1]; rho is a similarity threshold")
