"""The Ray Serve wing: the application (`sere_dist.serve:build_app`, named by deploy/*.yaml), its typed
arguments, the embedded default model, local endpoints and the demo. The only code that touches Ray
Serve or `ray.llm` internals."""

from sere_dist.serve.app import build_app

__all__ = ["build_app"]
