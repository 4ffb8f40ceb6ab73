"""Running an endpoint from Python (tests, `sere serve`, the demo): a private local Ray instance,
the app deployed with Ray Serve, readiness probed with a real completion."""

from __future__ import annotations

import contextlib
import os
import time
from typing import Any, Mapping

from sere_dist.serve.app import build_app, resolve
from sere_dist.serve.config import ServeArgs


@contextlib.contextmanager
def local_endpoint(args: Mapping[str, Any] | ServeArgs | None = None, *, port: int = 8000, num_cpus: float = 4,
                   name: str = "sere", timeout_s: float = 600, ready_model: str | None = None,
                   quiet: bool = False, metrics_port: int | None = None):
    """Start a private local Ray instance, deploy the app, wait for a real completion, yield the URL.

    metrics_port: Ray's Prometheus metrics on this port (vLLM engine metrics and the SERE counters).
    Everything started here (Serve app, Ray instance, vLLM processes) is shut down on exit.
    """
    args = resolve(args)  # raises on bad args/artifact before Ray starts; resolved once
    with serve_app(lambda: build_app(args), [ready_model or args.model_id], port=port, num_cpus=num_cpus,
                   name=name, timeout_s=timeout_s, quiet=quiet, metrics_port=metrics_port) as url:
        yield url


@contextlib.contextmanager
def serve_app(make_app, ready_models: list[str], *, port: int = 8000, num_cpus: float = 4, name: str = "sere",
              timeout_s: float = 600, quiet: bool = False, metrics_port: int | None = None):
    """The one way an endpoint is run here: a private local Ray instance, `make_app()` deployed with
    Ray Serve on `port`, a real completion from each of `ready_models`, then the URL; Serve and Ray
    are shut down on exit, even on failure."""
    import ray
    from ray import serve

    # Private instance first: building the app touches Ray, and a bare auto-init could attach to
    # another cluster on this host.
    extra = {"_metrics_export_port": metrics_port} if metrics_port else {}
    ray.init(address="local", num_cpus=num_cpus, object_store_memory=300 * 1024 ** 2,
             include_dashboard=False, log_to_driver=False, **extra)
    try:
        if quiet:
            _quiet()
        app = make_app()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        if quiet:
            _quiet()  # Serve (re)configures its loggers when it starts
        serve.run(app, name=name, route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        for model in ready_models:
            wait_ready(url, model, timeout_s=timeout_s)
        yield url
    finally:
        with contextlib.suppress(Exception):
            serve.shutdown()
        ray.shutdown()


def wait_ready(url: str, model: str, timeout_s: float = 600, interval_s: float = 1.0) -> float:
    """Poll until a real 1-token completion succeeds (/v1/models answers earlier than the engine)."""
    import httpx

    t0 = time.time()
    last = None
    while time.time() - t0 < timeout_s:
        try:
            r = httpx.post(f"{url}/v1/completions", json={"model": model, "prompt": "def", "max_tokens": 1},
                           timeout=30)
            if r.status_code == 200:
                return time.time() - t0
            last = f"HTTP {r.status_code}: {r.text[:200]}"
        except httpx.HTTPError as exc:
            last = repr(exc)
        time.sleep(interval_s)
    raise TimeoutError(f"{url} did not complete a request within {timeout_s:.0f} s (last: {last})")


def serve_forever(args: Mapping[str, Any] | ServeArgs, port: int) -> None:
    """`sere serve`: start the endpoint and block until interrupted."""
    args = resolve(args)
    with local_endpoint(args, port=port) as url:
        print(f"serving {args.model_id} at {url}/v1 (OpenAI-compatible); Ctrl-C stops", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            while True:
                time.sleep(3600)


def _quiet() -> None:
    """Keep the demo's output to what it measured: Ray/Serve/vLLM info logs off (warnings stay)."""
    import logging

    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("RAY_SERVE_LOG_TO_STDERR", "0")
    for name in ("ray", "ray.serve", "ray.llm", "ray.data", "vllm", "httpx", "sere_dist"):
        logging.getLogger(name).setLevel(logging.WARNING)
    for name in list(logging.root.manager.loggerDict):  # Serve's and Ray LLM's own named loggers
        if name.startswith(("ray.", "vllm")):
            logging.getLogger(name).setLevel(logging.WARNING)
