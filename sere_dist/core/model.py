"""The model facts SERE depends on, as one type: `ModelFingerprint`.

`model_fingerprint` reads them (architecture, E, k, MoE layer indices, hidden size) from a Hugging Face
config of any supported family (object or dict); calibration stores the result in the artifact, and
the server, the vLLM plugin and its workers compare an artifact with the model they serve through
`ModelFingerprint.mismatch`, the one artifact-vs-model check.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Iterator

from sere_dist.core.config import ConfigError

# the facts that must agree between an artifact and the model it is used with
MATCH_KEYS = ("architecture", "num_experts", "top_k", "moe_layers", "hidden_size")


class ArtifactError(ConfigError):
    """The artifact (or the model it is checked against) is missing, malformed, or for another model."""


@dataclass(frozen=True, eq=False)
class ModelFingerprint(Mapping):
    """MoE facts of one checkpoint. A read-only mapping too (`fp["top_k"]`), as stored in JSON."""

    architecture: str
    model_type: str
    num_experts: int
    top_k: int
    moe_layers: tuple[int, ...] = field(default=())
    hidden_size: int = 0
    num_hidden_layers: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "moe_layers", tuple(int(i) for i in self.moe_layers))

    @classmethod
    def coerce(cls, value: "ModelFingerprint | Mapping[str, Any]") -> "ModelFingerprint":
        """From a stored fingerprint (artifact metadata); missing or ill-typed keys are an ArtifactError."""
        if isinstance(value, cls):
            return value
        if not isinstance(value, Mapping):
            raise ArtifactError(f"model fingerprint must be a mapping, got {type(value).__name__}")
        names = {f.name for f in fields(cls)}
        missing = [k for k in ("architecture", "num_experts", "top_k", "moe_layers") if k not in value]
        if missing:
            raise ArtifactError(f"model fingerprint lacks {missing}")
        try:
            return cls(**{k: v for k, v in value.items() if k in names})
        except (TypeError, ValueError) as exc:
            raise ArtifactError(f"model fingerprint is malformed: {exc}") from None

    def mismatch(self, model: "ModelFingerprint | Mapping[str, Any]") -> str | None:
        """Why an artifact with this fingerprint cannot serve `model` (None when it can)."""
        model = ModelFingerprint.coerce(model)
        for key in MATCH_KEYS:
            mine, theirs = getattr(self, key), getattr(model, key)
            if key == "architecture":
                mine, theirs = _family(mine), _family(theirs)
            if mine != theirs:
                return (f"similarity artifact does not match the model: {key} is {_show(getattr(self, key))} in "
                        f"the artifact but {_show(getattr(model, key))} in the model; recalibrate for this model")
        return None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["moe_layers"] = list(self.moe_layers)
        return d

    # Mapping protocol (the JSON shape): fp["num_experts"], dict(fp), fp == {...}
    def __getitem__(self, key: str) -> Any:
        if key not in self._keys():
            raise KeyError(key)
        value = getattr(self, key)
        return list(value) if key == "moe_layers" else value

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys())

    def __len__(self) -> int:
        return len(self._keys())

    def __hash__(self) -> int:
        return hash((self.architecture, self.num_experts, self.top_k, self.moe_layers, self.hidden_size))

    @staticmethod
    def _keys() -> tuple[str, ...]:
        return tuple(f.name for f in fields(ModelFingerprint))


def _show(v: Any) -> str:
    return repr(list(v) if isinstance(v, tuple) else v)


def _family(arch: Any) -> str:
    return str(arch).replace("ForCausalLM", "").lower()


def _get(cfg: Any, *names: str, default: Any = None) -> Any:
    for n in names:
        v = cfg.get(n) if isinstance(cfg, Mapping) else getattr(cfg, n, None)
        if v is not None:
            return v
    return default


def model_fingerprint(cfg: Any) -> ModelFingerprint:
    """MoE facts of a Hugging Face config (object or dict); raises ArtifactError if it is not MoE.

    A multimodal config is reduced to its text config first.
    """
    if not isinstance(cfg, Mapping) and hasattr(cfg, "get_text_config"):
        cfg = cfg.get_text_config()
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
    return ModelFingerprint(architecture=arch, model_type=mtype, num_experts=int(e), top_k=int(top_k),
                            moe_layers=tuple(layers), hidden_size=int(_get(cfg, "hidden_size", default=0)),
                            num_hidden_layers=n_layers)


def checkpoint_fingerprint(path: str | os.PathLike) -> ModelFingerprint:
    """Fingerprint of a local checkpoint directory (reads only its config.json)."""
    from transformers import AutoConfig

    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ArtifactError(f"{path} is not a local checkpoint directory (no config.json)")
    return model_fingerprint(AutoConfig.from_pretrained(str(path)))
