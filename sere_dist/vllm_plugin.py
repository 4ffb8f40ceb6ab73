"""The sere-dist vLLM plugin: SERE re-routing for every MoE model vLLM builds through its MoE factory.

All code that touches vLLM internals lives in this module, so a vLLM version bump touches one file.

    pip install sere-dist          # registers the `vllm.general_plugins` entry point `sere`
    LLM(model, additional_config={"sere": {"artifact": ..., "select_top_k": 2, "threshold": 0.3}})
    vllm serve MODEL --additional-config '{"sere": {...}}'

How it hooks in (vLLM 0.32):
- `register()` (run in the API process, the engine core and every worker) puts `SereMoERunner` in
  place of `MoERunner` through `PluggableLayer.register_oot`. Every model built through
  `FusedMoEFactory` (qwen2_moe, qwen3_moe, mixtral, olmoe, deepseek_v2, ...) gets it.
- When the model is built, each runner reads `additional_config["sere"]`, validates it against the
  model and the similarity artifact (errors name the field), and shadows its router's
  `_compute_routing` on the instance: logical top-k ids -> SERE -> EPLB mapping / dispatch.
- Which tokens are re-routed: a per-process bool buffer `token_mask` [max tokens], rewritten in place
  before every forward (outside any traced graph) from the model runner's request state: decode
  tokens only (phase "decode"), or every real token (phase "all"). The hook only reads it, so the
  traced / CUDA-graph code has no host syncs and no baked-in Python ints.
- Counters (distinct experts before/after, re-routed slots, batches) are int64 buffers updated in
  place in the hook. A daemon thread in each worker copies them to a JSON file in `$SERE_STATS_DIR`
  (off the hot path); the API process exposes them on `/metrics` through a Prometheus collector.
  Offline: `sere_stats(llm)`.
- CPU expert parallelism: vLLM-CPU's fused MoE kernels ignore `expert_map`; the runner maps global
  ids to local slots and zeroes the weight of non-local ones (active only on CPU with EP).
"""

from __future__ import annotations

import atexit
import functools
import json
import logging
import os
import re
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch

from .config import SereConfig, SereConfigError, _check_rho, _check_s

log = logging.getLogger("sere_dist")

STATS_ENV = "SERE_STATS_DIR"
COUNTERS = ("distinct_experts_before", "distinct_experts_after", "rerouted_slots", "batches", "tokens")
_LAYER_RE = re.compile(r"layers\.(\d+)\.")
_USE_NATIVE = True  # False: always the torch reference (sere_dist.reroute) in the hook

_state: dict[str, Any] = {"registered": False, "runners": [], "mask": None, "mask_host": None, "phase": "decode",
                          "thread": None, "artifacts": {}, "records": {}}
_lock = threading.Lock()


# --------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------

def register() -> None:
    """vLLM general-plugin entry point; re-entrant (vLLM calls it several times per process)."""
    with _lock:
        if _state["registered"]:
            return
        _state["registered"] = True
    from vllm.engine.arg_utils import EngineArgs
    from vllm.model_executor.layers.fused_moe.runner.moe_runner import MoERunner
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner
    from vllm.v1.worker.worker_base import WorkerBase

    global SereMoERunner
    SereMoERunner = _make_runner_class(MoERunner)
    MoERunner.register_oot(SereMoERunner)
    if not getattr(GPUModelRunner._model_forward, "_sere_wrapped", False):
        GPUModelRunner._model_forward = _wrap_model_forward(GPUModelRunner._model_forward)
    if not getattr(EngineArgs.create_engine_config, "_sere_wrapped", False):
        EngineArgs.create_engine_config = _wrap_create_engine_config(EngineArgs.create_engine_config)
    WorkerBase.sere_stats = _worker_stats            # reached through LLM.collective_rpc("sere_stats")
    WorkerBase.sere_records = _worker_records
    WorkerBase.sere_control = _worker_control
    # The first process that loads the plugin (API server, offline driver, Serve replica) owns the
    # stats directory; engine processes it spawns inherit it through the environment.
    if not os.environ.get(STATS_ENV):
        d = tempfile.mkdtemp(prefix=f"sere-stats-{os.getpid()}-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
        os.environ[STATS_ENV] = d
        atexit.register(shutil.rmtree, d, True)
        _register_prometheus(d)


SereMoERunner: Any = None


def _make_runner_class(base):
    class _SereMoERunner(base):
        """MoERunner that installs SERE (and the CPU expert-parallel fix) on its router."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            _install(self)

    _SereMoERunner.__name__ = "SereMoERunner"
    _SereMoERunner.__qualname__ = "SereMoERunner"
    return _SereMoERunner


# --------------------------------------------------------------------------------------------------
# Model build: configuration, validation, installation
# --------------------------------------------------------------------------------------------------

def sere_config_from_vllm(vllm_config) -> SereConfig | None:
    """SereConfig from `additional_config["sere"]`, or None when SERE is not configured."""
    add = getattr(vllm_config, "additional_config", None) or {}
    raw = add.get("sere") if isinstance(add, dict) else getattr(add, "sere", None)
    if raw is None:
        return None
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise SereConfigError(f"additional_config.sere is not valid JSON: {exc}") from None
    cfg = SereConfig.from_dict(raw)
    if not cfg.enabled:
        return None
    if not cfg.artifact:
        raise SereConfigError("sere.artifact is not set; pass the path of a similarity artifact "
                              "(`sere calibrate` or the calibration job writes one)")
    return cfg


def validate_vllm_config(vllm_config) -> SereConfig | None:
    """Check the SERE settings against the model and the artifact; raise naming the bad field.

    Runs in the process that builds the engine configuration (the user's process for `LLM`, the API
    server for `vllm serve`), so a bad setting fails there, before any engine process starts.
    """
    from .artifact import model_fingerprint

    cfg = sere_config_from_vllm(vllm_config)
    if cfg is None:
        return None
    hf = vllm_config.model_config.hf_config
    fp = model_fingerprint(getattr(hf, "get_text_config", lambda: hf)())
    cfg.check_top_k(fp["top_k"], fp["moe_layers"])
    _load_artifact(cfg.artifact, fp)
    return cfg


def _wrap_create_engine_config(fn):
    @functools.wraps(fn)
    def create_engine_config(self, *args, **kwargs):
        vllm_config = fn(self, *args, **kwargs)
        validate_vllm_config(vllm_config)
        return vllm_config

    create_engine_config._sere_wrapped = True
    return create_engine_config


def layer_index(layer_name: str) -> int:
    """'model.layers.12.mlp.experts' -> 12."""
    m = _LAYER_RE.search(layer_name + ".")
    if not m:
        raise SereConfigError(f"cannot find a layer index in MoE layer name {layer_name!r}")
    return int(m.group(1))


def _load_artifact(path: str, fingerprint: dict):
    from .artifact import SimilarityArtifact

    key = str(Path(path).resolve())
    art = _state["artifacts"].get(key)
    if art is None:
        art = SimilarityArtifact.load(path)
        art.check_model(fingerprint)
        _state["artifacts"][key] = art
    return art


def _install(runner) -> None:
    from vllm.config import get_current_vllm_config
    from vllm.platforms import current_platform

    vcfg = get_current_vllm_config()
    cfg = sere_config_from_vllm(vcfg)
    experts = runner.routed_experts
    ep_fix = current_platform.is_cpu() and experts.expert_map is not None
    if cfg is None and not ep_fix:
        return
    router = runner.router
    original = router._compute_routing
    runner._sere_on = False
    runner._sere_ep_fix = ep_fix
    if cfg is not None:
        _configure(runner, vcfg, cfg)
    router._compute_routing = functools.partial(_compute_routing, runner, original)
    if cfg is not None:
        _state["runners"].append(runner)
        _ensure_stats_thread()


def _configure(runner, vcfg, cfg: SereConfig) -> None:
    from .artifact import ArtifactError, model_fingerprint

    hf = vcfg.model_config.hf_config
    text_cfg = getattr(hf, "get_text_config", lambda: hf)()
    fp = model_fingerprint(text_cfg)
    moe = runner.moe_config
    k = int(moe.experts_per_token)
    num_experts = int(getattr(moe, "num_logical_experts", None) or moe.num_experts)
    cfg.check_top_k(k, fp["moe_layers"])
    art = _load_artifact(cfg.artifact, fp)
    layer = layer_index(runner.layer_name)
    sim = art.matrices.get(layer)
    if sim is None:
        raise ArtifactError(f"sere.artifact {cfg.artifact} has no similarity matrix for MoE layer {layer} "
                            f"({runner.layer_name}); it has layers {sorted(art.matrices)}")
    if sim.shape[0] != num_experts:
        raise ArtifactError(f"sere.artifact layer {layer} matrix is {tuple(sim.shape)} but the model's layer has "
                            f"{num_experts} experts; recalibrate for this model")
    s, rho = cfg.for_layer(layer)
    device = vcfg.device_config.device
    runner._sere_on = True
    _state["eager"] = bool(vcfg.model_config.enforce_eager)
    runner._sere_layer = layer
    runner._sere_s = int(s)
    runner._sere_rho = float(rho)
    runner._sere_record = int(getattr(cfg, "record", 0) or 0)
    runner.register_buffer("_sere_sim", sim.to(device=device, dtype=torch.float32).contiguous(), persistent=False)
    runner.register_buffer("_sere_counts", torch.zeros(len(COUNTERS), dtype=torch.int64, device=device),
                           persistent=False)
    runner.register_buffer("_sere_token_mask", _token_mask(vcfg, cfg.phase), persistent=False)
    if cfg.mode == "rank_aware":
        runner.register_buffer("_sere_expert_ranks", _expert_ranks(runner, num_experts).to(device), persistent=False)
    else:
        runner._sere_expert_ranks = None
    if _USE_NATIVE and cfg.mode == "paper":
        from . import native
        native.load_extension()  # build / load eagerly: nothing is built while Dynamo traces
    log.info("SERE on %s: layer %d, S=%d, rho=%.3g, phase=%s, mode=%s", runner.layer_name, layer, s, rho,
             cfg.phase, cfg.mode)


def _token_mask(vcfg, phase: str) -> torch.Tensor:
    """The per-process [N] bool buffer of tokens to re-route (shared by every layer)."""
    if _state["mask"] is None:
        n = int(vcfg.scheduler_config.max_num_batched_tokens) + 1024
        dev = torch.device(vcfg.device_config.device)
        _state["mask"] = torch.zeros(n, dtype=torch.bool, device=dev)
        _state["mask_host"] = torch.zeros(n, dtype=torch.bool, pin_memory=dev.type == "cuda")
        _state["phase"] = phase
    return _state["mask"]


def _expert_ranks(runner, num_experts: int) -> torch.Tensor:
    """[E, R] placement of this layer's experts under vLLM's expert parallelism (R = 1 without EP)."""
    from .reroute import expert_ranks_for

    experts = runner.routed_experts
    ep_size = int(experts.moe_config.moe_parallel_config.ep_size) if experts.use_ep else 1
    placement = getattr(experts, "expert_placement_strategy", "linear") or "linear"
    eplb = getattr(runner.router, "eplb_state", None)
    l2p = getattr(eplb, "logical_to_physical_map", None) if eplb is not None else None
    if l2p is not None:
        return expert_ranks_for(num_experts, ep_size, "eplb", logical_to_physical=l2p.cpu(),
                                num_physical=int(experts.moe_config.num_experts))
    return expert_ranks_for(num_experts, ep_size, placement)


# --------------------------------------------------------------------------------------------------
# Hot path (traced by Dynamo on CPU, captured in CUDA graphs on GPU): tensor ops only, no host syncs
# --------------------------------------------------------------------------------------------------

def _compute_routing(runner, original, hidden_states, router_logits, indices_type, *, input_ids=None):
    weights, ids = original(hidden_states, router_logits, indices_type, input_ids=input_ids)
    if runner._sere_on:
        ids = _sere(runner, weights, ids)
    if runner._sere_ep_fix:
        weights, ids = _localize(runner.routed_experts.expert_map, weights, ids)
    return weights, ids


def _sere(runner, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """[T, k] weights and ids -> re-routed [T, k] ids (slot order and weights unchanged)."""
    t = ids.shape[0]
    valid = runner._sere_token_mask[:t]
    order = torch.sort(weights, dim=-1, descending=True, stable=True).indices   # slots by weight
    sorted_ids = ids.gather(1, order)
    new_sorted = _reroute(runner, sorted_ids, valid)
    new_ids = torch.empty_like(ids).scatter_(1, order, new_sorted)
    _count(runner, ids, new_ids, valid)
    if runner._sere_record and not torch.compiler.is_compiling():
        _record(runner, sorted_ids, valid, new_sorted)
    return new_ids


def _reroute(runner, sorted_ids: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """The one re-routing call: native kernel (paper rule) or the torch reference."""
    sim, s, rho = runner._sere_sim, runner._sere_s, runner._sere_rho
    if runner._sere_expert_ranks is not None:
        from .reroute import reroute
        return reroute(sorted_ids, sim, s, rho, valid, expert_ranks=runner._sere_expert_ranks, with_stats=False)[0]
    if _USE_NATIVE:
        from .native import reroute_fast
        return reroute_fast(sorted_ids, sim, s, rho, valid)
    from .reroute import reroute
    return reroute(sorted_ids, sim, s, rho, valid, with_stats=False)[0]


def _count(runner, ids: torch.Tensor, new_ids: torch.Tensor, valid: torch.Tensor) -> None:
    e = runner._sere_sim.shape[0]
    t, k = ids.shape
    w = valid.to(torch.int32).unsqueeze(-1).expand(t, k)
    before = torch.zeros(e, dtype=torch.int32, device=ids.device).scatter_add_(0, ids.long().reshape(-1), w.reshape(-1))
    after = torch.zeros(e, dtype=torch.int32, device=ids.device).scatter_add_(0, new_ids.long().reshape(-1),
                                                                                w.reshape(-1))
    n_valid = valid.sum()
    runner._sere_counts += torch.stack([(before > 0).sum(), (after > 0).sum(),
                                        ((new_ids != ids) & valid.unsqueeze(-1)).sum(),
                                        (n_valid > 0).long(), n_valid]).to(torch.int64)


def _localize(expert_map: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor):
    """CPU EP fix: global ids -> local slots; non-local slots get id 0 and weight 0."""
    local = expert_map[ids.long()]
    keep = local >= 0
    return (torch.where(keep, weights, torch.zeros_like(weights)),
            torch.where(keep, local, torch.zeros_like(local)).to(ids.dtype))


def _record(runner, sorted_ids, valid, new_sorted) -> None:
    recs = _state["records"].setdefault(runner._sere_layer, [])
    if len(recs) < runner._sere_record:
        recs.append({"ids": sorted_ids.cpu().tolist(), "valid": valid.cpu().tolist(),
                     "new_ids": new_sorted.cpu().tolist()})


# --------------------------------------------------------------------------------------------------
# Before each forward (outside any graph): which tokens to re-route
# --------------------------------------------------------------------------------------------------

def _wrap_model_forward(fn):
    @functools.wraps(fn)
    def _model_forward(self, *args, **kwargs):
        if _state["mask"] is not None:
            _fill_token_mask(self, kwargs.get("input_ids"), kwargs.get("positions"))
        return fn(self, *args, **kwargs)

    _model_forward._sere_wrapped = True
    return _model_forward


def _fill_token_mask(model_runner, input_ids, positions) -> None:
    import numpy as np

    host = _state["mask_host"]
    hnp = host.numpy()
    hnp[:] = False
    batch = getattr(model_runner, "input_batch", None)
    qsl = getattr(getattr(model_runner, "query_start_loc", None), "np", None)
    n = int(getattr(batch, "num_reqs", 0) or 0)
    if batch is not None and qsl is not None and n > 0:
        lens = np.diff(qsl[:n + 1])
        if _state["phase"] == "all":
            is_tok = np.ones(n, dtype=bool)
        else:  # a request whose prompt is fully computed is decoding
            is_tok = batch.num_computed_tokens_cpu[:n] >= batch.num_prompt_tokens[:n]
        flags = np.repeat(is_tok, np.maximum(lens, 0))
        hnp[:min(len(flags), len(hnp))] = flags[:len(hnp)]
    mask = _state["mask"]
    mask.copy_(host, non_blocking=mask.device.type == "cuda")


# --------------------------------------------------------------------------------------------------
# Stats: worker side (collective_rpc + files), API side (Prometheus)
# --------------------------------------------------------------------------------------------------

def _local_stats() -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for r in _state["runners"]:
        vals = r._sere_counts.tolist()
        out[str(r._sere_layer)] = dict(zip(COUNTERS, vals))
    return out


def _worker_stats(self) -> dict[str, dict[str, int]]:
    return _local_stats()


def _worker_records(self) -> dict[str, list]:
    return {str(k): v for k, v in _state["records"].items()}


def _worker_control(self, enabled: bool | None = None, select_top_k: int | None = None,
                    threshold: float | None = None, reset: bool = False) -> int:
    """Benchmark/test control (eager engines only): switch SERE on/off, change S or rho for every
    layer, reset counters and records. Returns the number of SERE layers in this worker."""
    if (enabled, select_top_k, threshold) != (None, None, None) and not _state.get("eager", True):
        raise RuntimeError("sere_control can change settings only in eager engines (enforce_eager=True): "
                           "compiled graphs bake S and rho in")
    for r in _state["runners"]:      # arguments were checked by sere_control
        if enabled is not None:
            r._sere_on = bool(enabled)
        if select_top_k is not None:
            r._sere_s = int(select_top_k)
        if threshold is not None:
            r._sere_rho = float(threshold)
        if reset:
            r._sere_counts.zero_()
    if reset:
        _state["records"].clear()
    return len(_state["runners"])


def sere_control(llm, enabled: bool | None = None, select_top_k: int | None = None,
                 threshold: float | None = None, reset: bool = False) -> None:
    """Change SERE settings of a running eager offline engine (benchmarks and tests: pairwise runs
    in one engine). S outside 1..k or rho outside [0, 1] raises SereConfigError and changes nothing."""
    if threshold is not None:
        _check_rho("threshold", threshold)
    if select_top_k is not None:
        from .artifact import model_fingerprint
        _check_s("select_top_k", select_top_k)
        hf = llm.llm_engine.model_config.hf_config
        k = model_fingerprint(getattr(hf, "get_text_config", lambda: hf)())["top_k"]
        if select_top_k > k:
            raise SereConfigError(f"select_top_k={select_top_k} exceeds the model's top-k ({k})")
    llm.collective_rpc("sere_control", kwargs=dict(enabled=enabled, select_top_k=select_top_k,
                                                  threshold=threshold, reset=reset))


def _writer_rank() -> str | None:
    """File name for this worker's stats, or None when another rank of its TP group reports them."""
    try:
        from vllm.distributed.parallel_state import get_dp_group, get_tensor_model_parallel_rank
        if get_tensor_model_parallel_rank() != 0:
            return None
        return f"dp{get_dp_group().rank_in_group}"
    except Exception:  # noqa: BLE001 - not initialised (single process): one writer
        return "dp0"


def _ensure_stats_thread() -> None:
    if _state["thread"] is not None or not os.environ.get(STATS_ENV):
        return

    def loop(d: str) -> None:
        name = None
        while True:
            time.sleep(1.0)
            try:
                name = name or _writer_rank()
                if name is None:
                    return
                data = json.dumps({"pid": os.getpid(), "layers": _local_stats()})
                tmp = Path(d) / f".{name}.{os.getpid()}.tmp"
                tmp.write_text(data)
                os.replace(tmp, Path(d) / f"{name}.json")
            except Exception:  # noqa: BLE001 - stats export must never take the engine down
                if not os.path.isdir(d):
                    return

    th = threading.Thread(target=loop, args=(os.environ[STATS_ENV],), name="sere-stats", daemon=True)
    _state["thread"] = th
    th.start()


def read_stats_dir(d: str | os.PathLike) -> dict[int, dict[str, int]]:
    """Sum the per-rank stats files in a stats directory: {layer: {counter: value}}."""
    total: dict[int, dict[str, int]] = {}
    for f in sorted(Path(d).glob("*.json")):
        try:
            layers = json.loads(f.read_text())["layers"]
        except (OSError, ValueError, KeyError):
            continue
        for layer, vals in layers.items():
            acc = total.setdefault(int(layer), dict.fromkeys(COUNTERS, 0))
            for c in COUNTERS:
                acc[c] += int(vals.get(c, 0))
    return total


def _register_prometheus(d: str) -> None:
    try:
        from prometheus_client import REGISTRY
        from prometheus_client.core import CounterMetricFamily
    except ImportError:
        return

    class SereCollector:
        def collect(self):
            stats = read_stats_dir(d)
            helps = {"distinct_experts_before": "Distinct experts used per MoE layer before SERE, summed over batches",
                     "distinct_experts_after": "Distinct experts used per MoE layer after SERE, summed over batches",
                     "rerouted_slots": "Top-k slots SERE moved to another expert",
                     "batches": "Forward batches with at least one re-routable token",
                     "tokens": "Tokens eligible for re-routing"}
            for c in COUNTERS:
                fam = CounterMetricFamily(f"sere_{c}", helps[c], labels=["layer"])
                for layer, vals in sorted(stats.items()):
                    fam.add_metric([str(layer)], vals[c])
                yield fam

    try:
        REGISTRY.register(SereCollector())
    except ValueError:  # already registered in this process
        pass


def sere_stats(llm) -> dict[int, dict[str, int]]:
    """Offline accessor: {layer: {distinct_experts_before, distinct_experts_after, rerouted_slots,
    batches, tokens}} summed since start, from the first worker (TP ranks see the same routing)."""
    res = llm.collective_rpc("sere_stats")
    first = res[0] if res else {}
    return {int(k): v for k, v in first.items()}


def sere_records(llm) -> dict[int, list]:
    """Debug (sere.record > 0): the first recorded batches per layer, as router gave them (sorted by
    weight) with the valid mask and the re-routed ids, from the first worker."""
    res = llm.collective_rpc("sere_records")
    first = res[0] if res else {}
    return {int(k): v for k, v in first.items()}
