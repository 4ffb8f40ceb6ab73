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
- The hook is one native op per layer and forward (`core.native.route_fast` -> `sere_dist::route`,
  C++ on CPU, CUDA on GPU, the torch spec `core.reroute.route` where no kernel applies): it orders the
  slots by weight, applies the rule (`mode`: paper, rank_aware, top_s, or error_aware /
  error_aware_rank_aware: the paper / rank-aware table on the artifact's gain matrix, with the weights of
  moved slots scaled and unmatched ones kept, dropped or renormalised), merges duplicate slots when
  `merge_duplicates`, restores the router's slot order and returns new ids and weights. Every mode
  needs the artifact (top_s ignores the similarity but the artifact still pins the model and S <= k).
  Eager forwards call the op through the layer's `core.native.RoutePlan`, bound on its first call
  (inputs checked once instead of per call); traced code goes through `route_fast`.
- Which tokens are re-routed: a per-process bool buffer `token_mask` [max tokens], rewritten in place
  before every forward (outside any traced graph) from the model runner's request state: decode
  tokens only (phase "decode"), or every real token (phase "all"). The hook only reads it, so the
  traced / CUDA-graph code has no host syncs and no baked-in Python ints.
- Counters (distinct experts before/after, re-routed slots, batches, tokens) are int64 buffers the op
  updates in place: every step (`count_every: 1`), every Nth step (a device-side gate stored after the
  token mask and written with it) or never (`count_every: 0`). A daemon thread in each worker copies them to a JSON file in `$SERE_STATS_DIR`
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
from typing import Any

import numpy as np
import torch

from sere_dist.core import native
from sere_dist.core.config import SereConfig, SereConfigError
from sere_dist.core.native import route_fast
from sere_dist.core.reroute import COUNTS
from sere_dist.engine.stats import COUNTERS, KERNEL_COUNTERS, STATS_ENV, register_prometheus, start_writer

log = logging.getLogger("sere_dist")
assert COUNTS == COUNTERS, "core.reroute.COUNTS and engine.stats.COUNTERS must list the counters in one order"

_LAYER_RE = re.compile(r"layers\.(\d+)\.")

_state: dict[str, Any] = {"registered": False, "runners": [], "mask": None, "mask_full": None, "mask_host": None,
                          "phase": "decode", "steps": 0, "artifacts": {}, "configs": {}, "records": {}}
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
    WorkerBase.sere_kernel_stats = _worker_kernel_stats
    WorkerBase.sere_control = _worker_control
    # The first process that loads the plugin (API server, offline driver, Serve replica) owns the
    # stats directory; engine processes it spawns inherit it through the environment.
    if not os.environ.get(STATS_ENV):
        d = tempfile.mkdtemp(prefix=f"sere-stats-{os.getpid()}-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
        os.environ[STATS_ENV] = d
        atexit.register(shutil.rmtree, d, True)
        register_prometheus(d)


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
    """SereConfig from `additional_config["sere"]` (parsed once per process per distinct setting), or
    None when SERE is not configured or `enabled: false`."""
    add = getattr(vllm_config, "additional_config", None) or {}
    raw = add.get("sere") if isinstance(add, dict) else getattr(add, "sere", None)
    if raw is None:
        return None
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise SereConfigError(f"additional_config.sere is not valid JSON: {exc}") from None
    try:
        key = json.dumps(raw, sort_keys=True, default=str)
    except TypeError:
        key = repr(raw)
    if key not in _state["configs"]:
        cfg = SereConfig.from_dict(raw)
        if cfg.enabled and not cfg.artifact:
            raise SereConfigError("sere.artifact is not set; pass the path of a similarity artifact "
                                  "(`sere calibrate` or the calibration job writes one)")
        _state["configs"][key] = cfg if cfg.enabled else None
    return _state["configs"][key]


def validate_vllm_config(vllm_config) -> SereConfig | None:
    """Check the SERE settings against the model and the artifact; raise naming the bad field.

    Runs in the process that builds the engine configuration (the user's process for `LLM`, the API
    server for `vllm serve`, the Serve replica), so a bad setting fails there, before any engine
    process starts.
    """
    cfg = sere_config_from_vllm(vllm_config)
    if cfg is not None:
        _artifact(vllm_config, cfg)
    return cfg


def _artifact(vllm_config, cfg: SereConfig):
    """The artifact of this engine's model, through the one artifact-vs-model check (once per process)."""
    from sere_dist.core.artifact import artifact_for_model
    from sere_dist.core.model import model_fingerprint

    fp = model_fingerprint(vllm_config.model_config.hf_config)
    key = (cfg.model_dump_json(), fp)
    art = _state["artifacts"].get(key)
    if art is None:
        art = _state["artifacts"][key] = artifact_for_model(cfg, fp)
    return art


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


def _install(runner) -> None:
    from vllm.config import get_current_vllm_config
    from vllm.platforms import current_platform

    vcfg = get_current_vllm_config()
    cfg = sere_config_from_vllm(vcfg)
    experts = runner.routed_experts
    ep_fix = current_platform.is_cpu() and experts.expert_map is not None
    if cfg is None and not ep_fix:
        return
    if cfg is not None:
        check_router_is_called(runner.layer_name, _monolithic_kernel(runner))
        if cfg.skip_zero_slots:
            check_skip_zero_slots(runner.layer_name, current_platform.is_cpu(), _experts_kernel(runner))
            _install_skip_zero_slots()
    router = runner.router
    original = router._compute_routing
    runner._sere_on = False
    runner._sere_ep_fix = ep_fix
    if cfg is not None:
        _configure(runner, vcfg, cfg)
    router._compute_routing = functools.partial(_compute_routing, runner, original)
    if cfg is not None:
        _state["runners"].append(runner)
        start_writer(_local_stats, lambda: dict(_state.get("kernel_stats") or {}))


def check_router_is_called(layer_name: str, monolithic_kernel: str | None) -> None:
    """Fail closed: a monolithic MoE kernel computes routing itself and never calls the router, so the
    SERE hook would silently do nothing on that layer; refuse to start instead."""
    if monolithic_kernel:
        raise SereConfigError(
            f"sere: MoE layer {layer_name} runs vLLM's monolithic kernel {monolithic_kernel}, which routes inside "
            f"the kernel and never calls the router, so SERE would silently do nothing; pick a modular MoE "
            f"backend (--moe-backend triton, cutlass, deep_gemm, ...) or set sere.enabled: false")


def check_skip_zero_slots(layer_name: str, on_cpu: bool, experts_kernel: type | None) -> None:
    """`skip_zero_slots` wraps vLLM-CPU's unquantized experts kernel (`cpu_fused_moe`); refuse it where
    the layer runs another kernel, where it would silently do nothing."""
    if not on_cpu:
        raise SereConfigError(
            "sere.skip_zero_slots applies to vLLM-CPU's fused MoE kernel only; on GPU, vLLM's kernels skip "
            "slots with id -1 under an expert map instead; remove sere.skip_zero_slots")
    from vllm.model_executor.layers.fused_moe.experts import cpu_moe

    name = getattr(experts_kernel, "__name__", repr(experts_kernel))
    if not (isinstance(experts_kernel, type) and issubclass(experts_kernel, cpu_moe.CPUUnquantizedExperts)):
        raise SereConfigError(
            f"sere.skip_zero_slots: MoE layer {layer_name} runs the experts kernel {name}, not vLLM-CPU's "
            f"unquantized cpu_fused_moe (CPUUnquantizedExperts), so no slot would be skipped; remove "
            f"sere.skip_zero_slots or serve the model unquantized")
    import importlib.util
    if importlib.util.find_spec("zentorch") is not None:
        raise SereConfigError(
            f"sere.skip_zero_slots: zentorch is installed, and vLLM-CPU then runs MoE layer {layer_name} "
            f"with zentorch_fused_moe where it can, which the skip does not reach; remove sere.skip_zero_slots")


def _experts_kernel(runner):
    """The experts kernel class vLLM picked for the layer (None when it cannot be told)."""
    qm = getattr(runner.routed_experts, "quant_method", None)
    return getattr(qm, "experts_cls", None)


def _install_skip_zero_slots() -> None:
    """Once per process: vLLM-CPU's experts call `cpu_fused_moe` through the custom op
    `sere_dist::cpu_fused_moe_skip_zero` (opaque to Dynamo, so compiled engines run it as it is)."""
    from vllm.model_executor.layers.fused_moe.experts import cpu_moe

    with _lock:
        if _state.get("skip_installed"):
            return
        _state["skip_installed"] = True
        _state["skip_on"] = True
        _state["kernel_stats"] = dict.fromkeys(KERNEL_COUNTERS, 0)
        kernel = cpu_moe.cpu_fused_moe
        op = _register_skip_op(kernel)

        @functools.wraps(kernel)
        def cpu_fused_moe(out, input, w13, w2, w13_bias, w2_bias, topk_weights, topk_ids, act, isa,
                          skip_weighted=False):
            op(out, input, w13, w2, w13_bias, w2_bias, topk_weights, topk_ids, act, isa, bool(skip_weighted))

        cpu_fused_moe._sere_skip = True
        cpu_moe.cpu_fused_moe = cpu_fused_moe


def _register_skip_op(kernel):
    # an explicit schema: this module's annotations are strings (from __future__ import annotations)
    schema = ("(Tensor(a!) out, Tensor input, Tensor w13, Tensor w2, Tensor? w13_bias, Tensor? w2_bias, "
              "Tensor topk_weights, Tensor topk_ids, str act, str isa, bool skip_weighted) -> ()")

    @torch.library.custom_op("sere_dist::cpu_fused_moe_skip_zero", mutates_args=("out",), schema=schema)
    def cpu_fused_moe_skip_zero(out, input, w13, w2, w13_bias, w2_bias, topk_weights, topk_ids, act, isa,
                                skip_weighted):
        if not _state["skip_on"]:                  # switched off at run time (sere_control)
            kernel(out, input, w13, w2, w13_bias, w2_bias, topk_weights, topk_ids, act, isa, skip_weighted)
            return
        skip_zero_slots_moe(kernel, out, input, w13, w2, w13_bias, w2_bias, topk_weights, topk_ids, act, isa,
                            skip_weighted, _state["kernel_stats"])

    @cpu_fused_moe_skip_zero.register_fake
    def _(out, input, w13, w2, w13_bias, w2_bias, topk_weights, topk_ids, act, isa, skip_weighted) -> None:
        return None

    return cpu_fused_moe_skip_zero


# Compacting costs a few torch ops per call and the one-slot tokens' gather and sum (0.1-0.25 ms at batch
# 1-4 on a 2-core EPYC, growing with the batch); a weight-0 slot whose expert another slot of the batch
# reads anyway (a merged duplicate, a slot the error-aware rule drops) saves only its own compute, about
# 0.08 ms at hidden 2048, intermediate 768. Measured with benchmarks/bench_skip_gate.py, compacting such
# slots pays from about one per token and at least 4 in the call; below that a call compacts only when it
# stops the kernel reading some expert at all (a dropped slot's own expert, a non-local slot's id 0).
SKIP_MIN_SLOTS = 4
_LIST_SLOTS = 256          # up to this many slots the decision reads weights and ids as Python lists


def skip_zero_slots_moe(kernel, out, x, w13, w2, w13_bias, w2_bias, weights, ids, act, isa, skip_weighted,
                        stats=None, min_slots: int = SKIP_MIN_SLOTS) -> None:
    """out[t] = sum over token t's slots j with weights[t, j] != 0 of weights[t, j] * expert_{ids[t, j]}(x[t]),
    computing only those slots: the kept (token, slot) pairs go to `kernel` (vLLM-CPU's cpu_fused_moe
    signature) as P one-slot tokens, their outputs are summed per token in float32. The kernel runs on the
    batch unchanged (computing the weight-0 slots and adding 0 times their output) where skipping cannot
    pay: no weight-0 slot, one slot per token, or fewer weight-0 slots than max(min_slots, tokens) whose
    experts other slots of the batch read anyway (so skipping them saves no weight read). min_slots = 0
    compacts every call that has a weight-0 slot."""
    t, k = ids.shape
    need = max(min_slots, t) if min_slots > 0 else 1
    zero, frees = _weight0_slots(weights, ids, need)
    compact = k > 1 and not skip_weighted and zero > 0 and (zero >= need or frees)
    if stats is not None:
        stats["calls"] += 1
        stats["slots"] += t * k
        stats["zero_slots"] += zero
        stats["skipped_slots"] += zero if compact else 0
        stats["compacted_calls"] += int(compact)
    if not compact:
        kernel(out, x, w13, w2, w13_bias, w2_bias, weights, ids, act, isa, skip_weighted)
        return
    if zero == t * k:
        out.zero_()
        return
    keep = weights != 0
    tok, slot = keep.nonzero(as_tuple=True)
    xs = x.index_select(0, tok)
    part = torch.empty_like(xs)
    kernel(part, xs, w13, w2, w13_bias, w2_bias, weights[tok, slot].unsqueeze(1).contiguous(),
           ids[tok, slot].unsqueeze(1).contiguous(), act, isa, False)
    acc = torch.zeros(out.shape, dtype=torch.float32, device=out.device)
    acc.index_add_(0, tok, part.float())
    out.copy_(acc)


def _weight0_slots(weights: torch.Tensor, ids: torch.Tensor, need: int) -> tuple[int, bool]:
    """(how many slots have weight 0, whether some expert is held only by such slots). The second is worked
    out only when it decides (0 < weight-0 slots < need; False otherwise). Small batches are read as
    Python lists: one copy per tensor costs less than the torch ops of the general path."""
    n = weights.numel()
    if n <= _LIST_SLOTS:
        w = weights.reshape(-1).tolist()
        zero = w.count(0.0)
        if not 0 < zero < need:
            return zero, False
        held = ids.reshape(-1).tolist()
        kept = {e for e, v in zip(held, w) if v != 0}
        return zero, any(e not in kept for e, v in zip(held, w) if v == 0)
    zero = n - int(torch.count_nonzero(weights))
    if not 0 < zero < need:
        return zero, False
    keep = weights != 0
    return zero, not bool(torch.isin(ids[~keep], ids[keep]).all())


def _monolithic_kernel(runner) -> str | None:
    """The class name of the layer's experts kernel when it is monolithic (None when modular)."""
    qm = getattr(runner.routed_experts, "quant_method", None)
    if not getattr(qm, "is_monolithic", False):
        return None
    kernel = getattr(qm, "moe_kernel", None) or getattr(qm, "experts_cls", None) or qm
    return getattr(kernel, "__name__", None) or type(kernel).__name__


def _configure(runner, vcfg, cfg: SereConfig) -> None:
    from sere_dist.core.artifact import ArtifactError

    art = _artifact(vcfg, cfg)                  # checked against the model once per process
    moe = runner.moe_config
    num_experts = int(getattr(moe, "num_logical_experts", None) or moe.num_experts)
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
    scale = None
    if cfg.error_aware:                         # the op's table runs on the gain, its gather also scales
        scale, sim = art.error_aware_tables(layer, cfg.gain_weighting)
    runner._sere_on = True
    _state["eager"] = bool(vcfg.model_config.enforce_eager)
    runner._sere_layer = layer
    runner._sere_s = int(s)
    runner._sere_rho = float(rho)
    runner._sere_record = int(getattr(cfg, "record", 0) or 0)
    runner._sere_rule = cfg.rule
    runner._sere_merge = bool(cfg.merge_duplicates)
    runner._sere_unmatched = cfg.unmatched
    runner._sere_keep_sum = cfg.keep_sum
    runner.register_buffer("_sere_sim", sim.to(device=device, dtype=torch.float32).contiguous(), persistent=False)
    if scale is not None:
        runner.register_buffer("_sere_scale", scale.to(device=device, dtype=torch.float32).contiguous(),
                               persistent=False)
    else:
        runner._sere_scale = None
    runner.register_buffer("_sere_counts", torch.zeros(len(COUNTERS), dtype=torch.int64, device=device),
                           persistent=False)
    runner.register_buffer("_sere_token_mask", _token_mask(vcfg, cfg.phase), persistent=False)
    # count_every: 0 = the op never counts; 1 = always; N = when the per-process gate (set before each
    # forward, like the token mask) says this step is an Nth one
    runner._sere_count_on = cfg.count_every > 0
    if cfg.count_every > 1:
        runner.register_buffer("_sere_count_gate", _count_gate(cfg.count_every), persistent=False)
    else:
        runner._sere_count_gate = None
    if cfg.rule == "rank_aware":
        runner.register_buffer("_sere_expert_ranks", _expert_ranks(runner, num_experts).to(device), persistent=False)
    else:
        runner._sere_expert_ranks = None
    native.load_extension()  # build / load eagerly: nothing is built while Dynamo traces
    log.info("SERE on %s: layer %d, S=%d, %s=%.3g, phase=%s, mode=%s%s", runner.layer_name, layer, s,
             "gain threshold" if cfg.error_aware else "rho", rho, cfg.phase, cfg.mode,
             f", unmatched={cfg.unmatched}, keep_sum={cfg.keep_sum}, weighting={cfg.gain_weighting}"
             if cfg.error_aware else "")


def _token_mask(vcfg, phase: str) -> torch.Tensor:
    """The per-process [N] bool buffer of tokens to re-route (shared by every layer). It is the head of
    one [N + 1] buffer whose last element is the count gate, so one copy per forward updates both."""
    if _state["mask"] is None:
        n = int(vcfg.scheduler_config.max_num_batched_tokens) + 1024
        dev = torch.device(vcfg.device_config.device)
        full = torch.zeros(n + 1, dtype=torch.bool, device=dev)
        # on CPU the host buffer is the device buffer: written in place, nothing to copy
        host = full if dev.type == "cpu" else torch.zeros(n + 1, dtype=torch.bool, pin_memory=dev.type == "cuda")
        _state.update(mask_full=full, mask_host=host, mask_np=host.numpy(), mask_used=0, mask=full[:n])
        _state["phase"] = phase
    return _state["mask"]


def _count_gate(every: int) -> torch.Tensor:
    """The per-process [1] bool count gate: True on every `every`-th forward step (set by _fill_token_mask)."""
    if _state.get("count_every", every) != every:
        raise SereConfigError(f"sere.count_every={every} differs from another engine's "
                              f"{_state['count_every']} in this process; use one value per process")
    _state["count_every"] = every
    return _state["mask_full"][-1:]


def _expert_ranks(runner, num_experts: int) -> torch.Tensor:
    """[E, R] placement of this layer's experts under vLLM's expert parallelism (R = 1 without EP)."""
    from sere_dist.core.reroute import expert_ranks_for

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
        new_ids, new_weights = _sere(runner, weights, ids)
        if runner._sere_record and not torch.compiler.is_compiling():
            _record(runner, weights, ids, new_weights, new_ids)
        weights, ids = new_weights, new_ids
    if runner._sere_ep_fix:
        weights, ids = _localize(runner.routed_experts.expert_map, weights, ids)
    return weights, ids


def _sere(runner, weights: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[T, k] router weights and ids (router slot order) -> new (ids, weights), same order: one native op
    (`sere_dist::route`) orders the slots by weight, applies the rule, restores the order and updates
    the counters in place (`core.native.route_fast`; the torch reference where no kernel applies). Eager
    forwards after the first call the op through the layer's `core.native.RoutePlan` (inputs checked once)."""
    eager = not torch.compiler.is_compiling()
    if eager:                                   # the layer's bound call, once its first call has checked it
        plan = runner.__dict__.get("_sere_plan")
        if plan is not None and plan.fits(ids, weights):
            return plan(ids, weights, runner._sere_s, runner._sere_rho, runner._sere_merge)
    mask = runner._sere_token_mask
    counts = runner._sere_counts if runner._sere_count_on else None
    out = route_fast(ids, weights, runner._sere_sim, runner._sere_s, runner._sere_rho, mask[:ids.shape[0]],
                     rule=runner._sere_rule, expert_ranks=runner._sere_expert_ranks,
                     merge_duplicates=runner._sere_merge, counts=counts,
                     count_gate=runner._sere_count_gate, scale=runner._sere_scale,
                     unmatched=runner._sere_unmatched, keep_sum=runner._sere_keep_sum)
    if eager and "_sere_plan" not in runner.__dict__:
        runner._sere_plan = native.RoutePlan.bind(
            ids, weights, runner._sere_sim, mask, rule=runner._sere_rule, expert_ranks=runner._sere_expert_ranks,
            counts=counts, count_gate=runner._sere_count_gate, scale=runner._sere_scale,
            unmatched=runner._sere_unmatched, keep_sum=runner._sere_keep_sum)
    return out


def _localize(expert_map: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor):
    """CPU EP fix: global ids -> local slots; non-local slots get id 0 and weight 0."""
    local = expert_map[ids.long()]
    keep = local >= 0
    return (torch.where(keep, weights, torch.zeros_like(weights)),
            torch.where(keep, local, torch.zeros_like(local)).to(ids.dtype))


def _record(runner, weights, ids, new_weights, new_ids) -> None:
    """Debug record of one batch, in weight order (as the re-routing rules see it)."""
    recs = _state["records"].setdefault(runner._sere_layer, [])
    if len(recs) < runner._sere_record:
        valid = runner._sere_token_mask[:ids.shape[0]]
        order = torch.sort(weights, dim=-1, descending=True, stable=True).indices
        recs.append({"ids": ids.gather(1, order).cpu().tolist(), "valid": valid.cpu().tolist(),
                     "new_ids": new_ids.gather(1, order).cpu().tolist(),
                     "weights": weights.gather(1, order).float().cpu().tolist(),
                     "new_weights": new_weights.gather(1, order).float().cpu().tolist()})


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
    hnp = _state["mask_np"]                         # the host buffer as numpy (on CPU the device buffer)
    used = _state["mask_used"]
    if used:                                         # the rest is still False from earlier forwards
        hnp[:used] = False
    every = _state.get("count_every", 1)
    hnp[-1] = _state["steps"] % every == 0           # the count gate (count_every > 1)
    _state["steps"] += 1
    batch = getattr(model_runner, "input_batch", None)
    qsl = getattr(getattr(model_runner, "query_start_loc", None), "np", None)
    n = int(getattr(batch, "num_reqs", 0) or 0)
    used = 0
    if batch is not None and qsl is not None and n > 0:
        if _state["phase"] == "all":
            is_tok = np.ones(n, dtype=bool)
        else:  # a request whose prompt is fully computed is decoding
            is_tok = batch.num_computed_tokens_cpu[:n] >= batch.num_prompt_tokens[:n]
        m = len(hnp) - 1
        if qsl[0] == 0 and qsl[n] == n:              # one token per request (vLLM schedules >= 1 each): decode
            flags = is_tok
        else:
            flags = np.repeat(is_tok, np.maximum(np.diff(qsl[:n + 1]), 0))
        used = min(len(flags), m)
        hnp[:used] = flags[:used]
    _state["mask_used"] = used
    mask = _state["mask_full"]
    if mask is not _state["mask_host"]:
        mask.copy_(_state["mask_host"], non_blocking=mask.device.type == "cuda")


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


def _worker_kernel_stats(self) -> dict[str, int]:
    """`skip_zero_slots` counters of this worker's experts-kernel calls (empty when the skip is off)."""
    return dict(_state.get("kernel_stats") or {})


def _worker_records(self) -> dict[str, list]:
    return {str(k): v for k, v in _state["records"].items()}


def _worker_control(self, enabled: bool | None = None, select_top_k: int | None = None,
                    threshold: float | None = None, reset: bool = False, merge_duplicates: bool | None = None,
                    skip_zero_slots: bool | None = None) -> int:
    """Benchmark/test control (eager engines only): switch SERE on/off, change S or rho for every
    layer, switch merge_duplicates and (where installed) skip_zero_slots, reset counters and records.
    Returns the number of SERE layers in this worker."""
    if (enabled, select_top_k, threshold, merge_duplicates, skip_zero_slots) != (None,) * 5 \
            and not _state.get("eager", True):
        raise RuntimeError("sere_control can change settings only in eager engines (enforce_eager=True): "
                           "compiled graphs bake S and rho in")
    if skip_zero_slots is not None:
        if not _state.get("skip_installed"):
            raise RuntimeError("sere_control(skip_zero_slots=...) needs an engine started with "
                               "sere.skip_zero_slots: true")
        _state["skip_on"] = bool(skip_zero_slots)
    if reset and _state.get("kernel_stats"):
        for key in _state["kernel_stats"]:
            _state["kernel_stats"][key] = 0
    for r in _state["runners"]:      # arguments were checked by sere_control
        if enabled is not None:
            r._sere_on = bool(enabled)
        if select_top_k is not None:
            r._sere_s = int(select_top_k)
        if threshold is not None:
            r._sere_rho = float(threshold)
        if merge_duplicates is not None:
            r._sere_merge = bool(merge_duplicates)
        if reset:
            r._sere_counts.zero_()
    if reset:
        _state["records"].clear()
    return len(_state["runners"])


