"""The one place that builds vLLM engine arguments, for offline `LLM`, `vllm serve` and Ray Serve LLM.

SERE settings travel in vLLM's `additional_config["sere"]` (part of vLLM's compile-cache key, and
delivered to every worker), where the sere-dist plugin reads them when the model is built.
"""

from __future__ import annotations

from typing import Any

from sere_dist.core.config import SereConfig


def engine_kwargs(model: str, sere: SereConfig | dict | None = None, *, dtype: str = "bfloat16",
                  max_model_len: int = 512, enforce_eager: bool = True, tensor_parallel_size: int = 1,
                  enable_expert_parallel: bool = False, **extra: Any) -> dict[str, Any]:
    """vLLM engine keyword arguments (valid for `vllm.LLM`, `AsyncEngineArgs` and Ray Serve's
    `LLMConfig.engine_kwargs`). `sere=None` leaves SERE off."""
    kw: dict[str, Any] = dict(model=model, dtype=dtype, max_model_len=max_model_len, enforce_eager=enforce_eager,
                              tensor_parallel_size=tensor_parallel_size)
    if enable_expert_parallel:
        kw["enable_expert_parallel"] = True
    if sere is not None:
        cfg = sere if isinstance(sere, SereConfig) else SereConfig.from_dict(sere)
        add = dict(extra.pop("additional_config", None) or {})
        add["sere"] = cfg.to_dict()
        kw["additional_config"] = add
    kw.update(extra)
    return kw
