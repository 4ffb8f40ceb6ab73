"""Typed arguments of the Serve application: what `sere serve --config`, `serve run` and every
`deploy/*.yaml` accept under `args:`, and how a Serve YAML is read.

    model: default | <local checkpoint dir>   default = the embedded tiny MoE model (built on first use)
    model_id: name clients send as "model" (default sere-tiny)
    sere: SereConfig fields, with artifact: default | <dir>; null = SERE off
    baseline: true also serves "<model_id>-base", the same weights with SERE off (A/B on one endpoint)
    engine: vLLM engine arguments, passed through `sere_dist.engine.engine_kwargs` (vLLM checks them)
    env: environment variables for the replica and its vLLM processes
    accelerator: cpu | gpu (default cpu); placement: Ray placement group config (default per accelerator)
    cpus_per_worker: CPU share of each engine bundle on the CPU backend (default 0.5)
    deployment: Serve options of each LLM replica; ingress: Serve options of the ingress (queue limits)
    stream_batching_ms: 0 (default) streams every token as it is generated; > 0 groups stream chunks for
        that many ms (Ray Serve LLM's own default is 50 ms: fewer, larger chunks)
    engine_metrics: export the vLLM engine metrics and the SERE counters on Ray's metrics port (default true)
    health_check_period_s / health_check_timeout_s: how fast Serve notices a dead engine (default 1 / 5)
    limits: {max_n: 8, max_body_bytes: 1048576}: `n` above max_n is a 400, a larger body a 413

A wrong type, a negative CPU share or an unknown key raises `ServingConfigError` (one line naming the
field and the fix); a bad SERE setting raises `SereConfigError`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, PrivateAttr, StrictBool, StrictFloat, StrictInt, StrictStr

from sere_dist.core.config import ConfigError, Fields, SereConfig, StrictModel

DEFAULT_MODEL_ID = "sere-tiny"
DEFAULT_SERE = {"artifact": "default", "select_top_k": 2, "threshold": 0.3}
DEFAULT_ENGINE = {"max_model_len": 512, "kv_cache_memory_bytes": 64 * 1024 ** 2}
DEFAULT_ENV = {"VLLM_CPU_OMP_THREADS_BIND": "nobind"}
# the arguments `sere serve` uses without --config (a plain dict: YAML-shaped, for callers to extend)
DEFAULT_ARGS: dict[str, Any] = {"model": "default", "model_id": DEFAULT_MODEL_ID, "sere": dict(DEFAULT_SERE),
                                "engine": dict(DEFAULT_ENGINE), "env": dict(DEFAULT_ENV)}

EnvValue = StrictStr | StrictInt | StrictFloat | StrictBool


class ServingConfigError(ConfigError):
    """A serving argument is invalid; the message names it."""


class RequestLimits(Fields):
    """What one HTTP request may ask for."""

    max_n: Annotated[StrictInt, Field(ge=1, description="completions per request, >= 1")] = 8
    max_body_bytes: Annotated[StrictInt, Field(ge=1024, description="bytes, >= 1024")] = 1024 * 1024


class ServeArgs(StrictModel):
    """The application's arguments (see the module docstring); built once by `resolve`."""

    config_name = ""
    error_type = ServingConfigError
    unknown_label = "serving argument"

    model: StrictStr = "default"
    model_id: StrictStr = DEFAULT_MODEL_ID
    sere: SereConfig | None = Field(default_factory=lambda: SereConfig(**DEFAULT_SERE))
    baseline: StrictBool = False
    engine: dict[StrictStr, Any] = Field(default_factory=lambda: dict(DEFAULT_ENGINE))
    env: dict[StrictStr, EnvValue] = Field(default_factory=lambda: dict(DEFAULT_ENV))
    accelerator: Literal["cpu", "gpu"] = "cpu"
    placement: dict[StrictStr, Any] | None = None
    cpus_per_worker: Annotated[float, Field(strict=True, gt=0, allow_inf_nan=False,
                                            description="a CPU share > 0, e.g. 0.5")] = 0.5
    deployment: dict[StrictStr, Any] = Field(default_factory=dict)
    ingress: dict[StrictStr, Any] = Field(default_factory=dict)
    stream_batching_ms: Annotated[float, Field(strict=True, ge=0, allow_inf_nan=False,
                                               description="milliseconds, 0 = every token")] = 0.0
    engine_metrics: StrictBool = True
    health_check_period_s: Annotated[float, Field(strict=True, gt=0, allow_inf_nan=False)] = 1.0
    health_check_timeout_s: Annotated[float, Field(strict=True, gt=0, allow_inf_nan=False)] = 5.0
    limits: RequestLimits = Field(default_factory=RequestLimits)
    _resolved: bool = PrivateAttr(default=False)   # set by serve.app.resolve: paths resolved, artifact checked

    def env_strings(self) -> dict[str, str]:
        return {k: (str(v).lower() if isinstance(v, bool) else str(v)) for k, v in self.env.items()}


def load_yaml_args(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any]]:
    """(builder args, http_options) of the first application in a Serve YAML config.

    A missing file, invalid YAML or a document of the wrong shape raises ServingConfigError naming the file.
    """
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ServingConfigError(f"{p}: no such config file")
    try:
        doc = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ServingConfigError(f"{p}: invalid YAML{where}: {problem}") from None
    if not isinstance(doc, dict):
        raise ServingConfigError(f"{p}: expected a Serve config (a mapping with `applications:`), "
                                 f"got {type(doc).__name__}")
    apps = doc.get("applications")
    if not apps:
        raise ServingConfigError(f"{p}: no applications")
    if not isinstance(apps, list) or not isinstance(apps[0], dict):
        raise ServingConfigError(f"{p}: applications must be a list of mappings")
    args = apps[0].get("args") or {}
    http = doc.get("http_options") or {}
    if not isinstance(args, dict):
        raise ServingConfigError(f"{p}: applications[0].args must be a mapping, got {type(args).__name__}")
    if not isinstance(http, dict):
        raise ServingConfigError(f"{p}: http_options must be a mapping, got {type(http).__name__}")
    return dict(args), dict(http)
