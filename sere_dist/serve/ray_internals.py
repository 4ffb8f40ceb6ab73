"""Everything that touches Ray Serve LLM internals (`ray.llm._internal`, Ray 2.60), in one module.

- `SereReplicaCallback`, the replica start-up callback of every LLM config:
  * skips Ray Serve LLM's per-node "download model files" tasks for a checkpoint that is already a
    local directory (each costs a fresh Ray worker that imports torch: ~16 s of a replica start on
    2 cores, again on every restart); hub ids and remote sources download as before;
  * starts the SERE metrics exporter (`sere_dist.serve.metrics`) in the replica of a SERE model.
- `SereIngress`, the OpenAI ingress with the checks Ray Serve LLM lacks: `n` above the configured cap
  is a 400; a prompt whose tokens plus `max_tokens` exceed the model's context is a 400 (vLLM would
  silently stop the completion short); an engine that died (or a replica that is gone) answers a
  retryable 503 with Retry-After instead of a 500 while Serve replaces it.
- `SereLLMServer`, Ray Serve LLM's LLMServer whose failed health check raises a builtin RuntimeError
  carrying the message: the Serve controller unpickles that exception, and vLLM's own EngineDeadError
  made it import vLLM and torch (+~460 MiB resident in the controller, kept for its lifetime).
- `RequestGuard`, ASGI middleware in front of the ingress: a POST whose Content-Type is not JSON gets
  400 (as vLLM's own server answers), a body over the size limit gets 413.
- `build_openai_app_guarded`: Ray Serve LLM's `build_openai_app`, with the ingress and middleware above.
"""

from __future__ import annotations

import json
import os
from typing import Any

from fastapi import Request
from starlette.responses import Response

from ray.llm._internal.common.callbacks.base import CallbackBase  # Ray 2.60: not re-exported publicly
from ray.llm._internal.serve.core.configs.openai_api_models import ChatCompletionRequest, CompletionRequest
from ray.llm._internal.serve.core.ingress.ingress import OpenAiIngress
from ray.llm._internal.serve.core.server.llm_server import LLMServer

# the engine process or the replica died: the request may succeed on another replica, or on this one
# once Serve has replaced it (vLLM's EngineDeadError / EngineGenerateError; Ray actor failures)
_DEAD_SIGNS = ("EngineDeadError", "EngineGenerateError", "engine is dead", "EngineCore encountered",
               "ActorDiedError", "ActorUnavailableError", "RayActorError", "actor died", "DeploymentUnavailableError")
RETRY_AFTER_S = 2


class SereReplicaCallback(CallbackBase):
    """callback_kwargs: {"sere_metrics": bool}: export SERE counters from this replica."""

    async def on_before_node_init(self) -> None:
        source = self.llm_config.model_loading_config.model_source
        mirror = getattr(self.llm_config.get_engine_config(), "mirror_config", None)
        if isinstance(source, str) and mirror is None and os.path.isdir(source):
            self.ctx.run_init_node = False

    async def on_after_node_init(self) -> None:
        if self.kwargs.get("sere_metrics"):
            from sere_dist.serve.metrics import start_exporter

            start_exporter(self.llm_config.model_id)


class SereLLMServer(LLMServer):
    async def check_health(self) -> None:
        try:
            await super().check_health()
        except Exception as exc:  # noqa: BLE001 - re-raised as a type every process can unpickle
            raise RuntimeError(f"vLLM engine health check failed: {type(exc).__name__}: {exc}") from None


def _error(status: int, message: str, kind: str, headers: dict[str, str] | None = None):
    from starlette.responses import JSONResponse

    return JSONResponse(status_code=status, headers=headers,
                        content={"error": {"message": message, "type": kind, "code": status}})


def _looks_dead(text: str) -> bool:
    return any(s in text for s in _DEAD_SIGNS)


class SereIngress(OpenAiIngress):
    """OpenAI ingress: caps `n`, refuses prompt + max_tokens beyond the context, and turns a dead engine or
    replica into a retryable 503.

    contexts: {model_id: {"tokenizer": dir, "max_model_len": int, "chat_template": path or None}}.
    """

    def __init__(self, llm_deployments, model_cards, *, lora_paths=None, max_n: int = 8,
                 contexts: dict[str, dict[str, Any]] | None = None, **kwargs):
        super().__init__(llm_deployments, model_cards, lora_paths=lora_paths, **kwargs)
        self._max_n = int(max_n)
        self._contexts = dict(contexts or {})
        self._tokenizers: dict[str, Any] = {}
        for model_id, ctx in self._contexts.items():
            try:
                from transformers import AutoTokenizer

                self._tokenizers[model_id] = AutoTokenizer.from_pretrained(ctx["tokenizer"])
                if ctx.get("chat_template"):
                    with open(ctx["chat_template"]) as f:
                        ctx["chat_template_text"] = f.read()
            except Exception:  # noqa: BLE001 - without a tokenizer vLLM's own checks still apply
                pass

    def _too_long(self, body) -> str | None:
        """Why prompt + max_tokens cannot fit the model's context (None when it fits or is unknown)."""
        model = getattr(body, "model", None)
        tok, ctx = self._tokenizers.get(model), self._contexts.get(model)
        max_tokens = getattr(body, "max_completion_tokens", None) or getattr(body, "max_tokens", None)
        if tok is None or ctx is None or not max_tokens or not ctx.get("max_model_len"):
            return None
        try:
            if isinstance(body, ChatCompletionRequest):
                template = ctx.get("chat_template_text")
                kw = {"chat_template": template} if template else {}
                messages = [m if isinstance(m, dict) else m.model_dump(exclude_none=True) for m in body.messages]
                if not all(isinstance(m.get("content", ""), str) for m in messages):
                    return None                        # multimodal parts: leave the count to vLLM
                text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, **kw)
                prompt = len(tok(text, add_special_tokens=False).input_ids)
            else:
                p = body.prompt
                prompts = p if isinstance(p, list) and p and not isinstance(p[0], int) else [p]
                prompt = max(len(x) if isinstance(x, list) else len(tok(x).input_ids) for x in prompts)
        except Exception:  # noqa: BLE001 - an unusual prompt shape: vLLM's own checks still apply
            return None
        limit = int(ctx["max_model_len"])
        if prompt + int(max_tokens) <= limit or prompt >= limit:      # a prompt alone too long: vLLM says so
            return None
        return (f"the prompt has {prompt} tokens and max_tokens={max_tokens}: {prompt + int(max_tokens)} tokens "
                f"exceed this model's context of {limit}; ask for at most {limit - prompt} tokens")

    async def _guarded(self, body, call):
        n = getattr(body, "n", None) or 1
        if n > self._max_n:
            return _error(400, f"n={n} exceeds this server's limit of {self._max_n} completions per request",
                          "BadRequestError")
        too_long = self._too_long(body)
        if too_long:
            return _error(400, too_long, "BadRequestError")
        try:
            response = await call()
        except Exception as exc:  # noqa: BLE001 - classify, re-raise what is not a dead engine
            status = int(getattr(exc, "status_code", 500) or 500)
            if status >= 500 and _looks_dead(f"{type(exc).__name__}: {exc}"):
                return _unavailable()
            raise
        if getattr(response, "status_code", 200) == 500 and _looks_dead(bytes(getattr(response, "body", b"")).decode(
                errors="replace")):
            return _unavailable()
        return response

    # FastAPI reads the request body's type from these annotations (the routes are built from them)
    async def completions(self, body: CompletionRequest, request: Request) -> Response:
        return await self._guarded(body, lambda: super(SereIngress, self).completions(body, request))

    async def chat(self, body: ChatCompletionRequest, request: Request) -> Response:
        return await self._guarded(body, lambda: super(SereIngress, self).chat(body, request))


def _unavailable():
    return _error(503, "the model's engine is restarting; retry the request", "ServiceUnavailableError",
                  {"Retry-After": str(RETRY_AFTER_S)})


class RequestGuard:
    """ASGI middleware: non-JSON POST bodies -> 400; bodies over `max_body_bytes` -> 413."""

    def __init__(self, app, max_body_bytes: int):
        self.app = app
        self.max_body_bytes = int(max_body_bytes)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("method") != "POST":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        ctype = headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype != "application/json":
            return await _send(send, 400, f"Content-Type must be application/json, got {ctype or 'none'!r}",
                               "BadRequestError")
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            return await _send(send, 413, f"request body of {int(length)} bytes exceeds the limit of "
                                          f"{self.max_body_bytes} bytes", "RequestEntityTooLarge")
        seen = 0
        chunks: list[dict] = []
        while True:                      # also without (or with a wrong) Content-Length: count what arrives
            message = await receive()
            chunks.append(message)
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body_bytes:
                    return await _send(send, 413, f"request body exceeds the limit of {self.max_body_bytes} bytes",
                                       "RequestEntityTooLarge")
                if not message.get("more_body", False):
                    break
            else:
                break
        replay = iter(chunks)

        async def replayed():
            try:
                return next(replay)
            except StopIteration:
                return await receive()

        return await self.app(scope, replayed, send)


async def _send(send, status: int, message: str, kind: str) -> None:
    body = json.dumps({"error": {"message": message, "type": kind, "code": status}}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def build_openai_app_guarded(llm_configs: list[dict[str, Any]], ingress_options: dict[str, Any], *,
                             max_n: int, max_body_bytes: int):
    """Ray Serve LLM's `build_openai_app` (one ingress in front of one LLMServer deployment per model),
    with `SereIngress` and `RequestGuard`."""
    from ray import serve
    from ray.llm._internal.common.dict_utils import maybe_apply_llm_deployment_config_defaults
    from ray.llm._internal.serve.core.configs.llm_config import LLMConfig
    from ray.llm._internal.serve.core.configs.openai_api_models import to_model_metadata
    from ray.llm._internal.serve.core.ingress.ingress import init, make_fastapi_ingress
    from ray.llm._internal.serve.core.server.builder import build_llm_deployment

    configs = [LLMConfig.model_validate(c) for c in llm_configs]
    contexts = {c.model_id: _context(c) for c in configs}
    # deployments keep Ray Serve LLM's names ("LLMServer:<model_id>") with our server class
    deployments = {c.model_id: build_llm_deployment(c, name_prefix="LLMServer:") for c in configs}
    cards = {c.model_id: to_model_metadata(c.model_id, c) for c in configs}
    options = maybe_apply_llm_deployment_config_defaults(SereIngress.get_deployment_options(configs),
                                                         ingress_options)
    app = init()
    app.add_middleware(RequestGuard, max_body_bytes=max_body_bytes)   # outermost: runs before the others
    ingress_cls = make_fastapi_ingress(SereIngress, app=app)
    return serve.deployment(ingress_cls, **options).bind(llm_deployments=deployments, model_cards=cards,
                                                         lora_paths={}, max_n=max_n, contexts=contexts)


def _context(llm_config) -> dict[str, Any]:
    """Tokenizer, context length and chat template of one model, for the ingress's length check."""
    kw = llm_config.engine_kwargs
    source = llm_config.model_loading_config.model_source
    limit = kw.get("max_model_len")
    if limit is None:
        try:
            with open(os.path.join(source, "config.json")) as f:
                limit = json.load(f).get("max_position_embeddings")
        except (OSError, ValueError):
            limit = None
    return {"tokenizer": kw.get("tokenizer") or source, "max_model_len": limit, "chat_template": kw.get("chat_template")}
