"""The vLLM wing: the only code that imports vLLM (the general plugin, its counters and controls) and
the one builder of vLLM engine arguments. Importing this package does not import vLLM."""

from sere_dist.engine.args import engine_kwargs

__all__ = ["engine_kwargs"]
