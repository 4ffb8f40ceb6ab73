"""The Ray Serve application: vLLM replicas with SERE behind Ray Serve LLM's OpenAI-compatible ingress.

`build_app(args)` is the Serve application builder named in `deploy/*.yaml`
(`import_path: sere_dist.serve:build_app`); its arguments are `ServeArgs` (`sere_dist.serve.config`).

Everything is checked before any replica starts, once: the arguments' types, the SERE settings, and
the similarity artifact against the model's Hugging Face config (`artifact_for_model`: fingerprint,
S <= k, per-layer overrides), so a bad artifact fails `serve run` / `sere serve` with a message naming
it. Inside the replica the vLLM plugin runs the same check once more, in that process, when the model is
built, so a replica never reports ready with a wrong one.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Mapping

from sere_dist.core.artifact import artifact_for_model
from sere_dist.core.config import SereConfigError
from sere_dist.core.model import checkpoint_fingerprint
from sere_dist.engine.args import engine_kwargs
from sere_dist.engine.stats import STATS_ENV
from sere_dist.serve.config import ServeArgs, ServingConfigError

# Ray Serve LLM replica start-up hook (local checkpoints, SERE metrics); see ray_internals
REPLICA_CALLBACK = "sere_dist.serve.ray_internals:SereReplicaCallback"
SERVER_CLS = "sere_dist.serve.ray_internals:SereLLMServer"


def resolve(args: Mapping[str, Any] | ServeArgs | None) -> ServeArgs:
    """Validated arguments with `default` paths resolved and the artifact checked against the model.

    Raises ServingConfigError / SereConfigError / ArtifactError naming the bad field.
    """
    if isinstance(args, ServeArgs) and args._resolved:
        return args
    cfg = args if isinstance(args, ServeArgs) else ServeArgs.from_dict(dict(args or {}))
    default_art = None
    model = cfg.model
    if model == "default":
        from sere_dist.serve.defaults import prepare_default

        model_dir, default_art = prepare_default()
        model = str(model_dir)
    elif not (Path(model) / "config.json").exists():
        raise ServingConfigError(f"model={model!r} is not a local checkpoint directory (no config.json); "
                                 f"use 'default' for the embedded tiny model or a local path")
    model = str(Path(model).resolve())
    sere = cfg.sere
    if sere is not None:
        art = sere.artifact
        if art == "default":
            if default_art is None:
                raise SereConfigError("sere.artifact=default only applies to model=default; give the path of the "
                                      "artifact calibrated for this model (`sere calibrate --model ...`)")
            art = str(default_art)
        if not art:
            raise SereConfigError("sere.artifact is missing; SERE needs the similarity artifact of this model "
                                  "(`sere calibrate --model ... --out DIR`), or set sere: null to serve without SERE")
        sere = sere.model_copy(update={"artifact": str(Path(art).resolve())})
        artifact_for_model(sere, checkpoint_fingerprint(model))
    out = cfg.model_copy(update={"model": model, "sere": sere})
    out._resolved = True
    return out


def llm_config_dicts(args: ServeArgs) -> list[dict[str, Any]]:
    """Ray Serve LLM `LLMConfig` dicts for resolved args: the SERE model, plus the baseline if asked."""
    engine = dict(args.engine)
    tp = int(engine.get("tensor_parallel_size", 1)) * int(engine.get("pipeline_parallel_size", 1))
    model = args.model
    chat = Path(model) / "chat_template.jinja"
    if chat.exists() and "chat_template" not in engine:
        engine["chat_template"] = str(chat)
    if args.placement:
        placement = dict(args.placement)
    elif args.accelerator == "cpu":
        placement = {"bundles": [{"CPU": args.cpus_per_worker}] * tp, "strategy": "PACK"}
    else:
        placement = {"bundles": [{"GPU": 1, "CPU": 1}] * tp, "strategy": "PACK"}
    deployment = dict(args.deployment)
    deployment.setdefault("health_check_period_s", args.health_check_period_s)
    deployment.setdefault("health_check_timeout_s", args.health_check_timeout_s)
    if args.accelerator == "cpu":
        deployment.setdefault("ray_actor_options", {"num_cpus": args.cpus_per_worker})
    variants = [(args.model_id, args.sere)]
    if args.baseline:
        variants.append((f"{args.model_id}-base", None))
    # data-parallel deployments use Ray Serve LLM's own DPServer
    server = {"server_cls": SERVER_CLS} if int(engine.get("data_parallel_size", 1)) == 1 else {}
    out = []
    for model_id, sere in variants:
        kw = engine_kwargs(model, sere=sere, **engine)
        kw.pop("model")
        env = args.env_strings()
        if sere is None:
            env.pop(STATS_ENV, None)  # the plugin's counters belong to the SERE model only
        out.append({
            "model_loading_config": {"model_id": model_id, "model_source": model},
            "engine_kwargs": kw,
            "placement_group_config": placement,
            "runtime_env": {"env_vars": env},
            "deployment_config": copy.deepcopy(deployment),
            "log_engine_metrics": args.engine_metrics,
            **server,
            "experimental_configs": {"stream_batching_interval_ms": args.stream_batching_ms},
            # local checkpoints skip the per-node download tasks; SERE replicas export their counters
            "callback_config": {"callback_class": REPLICA_CALLBACK,
                                "callback_kwargs": {"sere_metrics": bool(sere is not None and args.engine_metrics)}},
        })
    return out


def build_app(args: Mapping[str, Any] | ServeArgs | None = None):
    """Serve application builder (`import_path: sere_dist.serve:build_app`)."""
    from ray.serve.llm import build_dp_openai_app

    from sere_dist.serve.ray_internals import build_openai_app_guarded

    r = resolve(args)
    configs = llm_config_dicts(r)
    ingress = dict(r.ingress)
    if r.accelerator == "cpu":
        ingress.setdefault("ray_actor_options", {"num_cpus": 0})
    if int(r.engine.get("data_parallel_size", 1)) > 1:
        if len(configs) > 1:
            raise ServingConfigError("baseline: true is not supported with data_parallel_size > 1")
        return build_dp_openai_app({"llm_config": configs[0], "ingress_deployment_config": ingress})
    return build_openai_app_guarded(configs, ingress, max_n=r.limits.max_n, max_body_bytes=r.limits.max_body_bytes)
