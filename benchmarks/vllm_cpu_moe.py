"""What the vLLM-CPU experts-kernel benchmarks share (bench_dropped_slots.py, bench_skip_gate.py): the kernel,
its prepacked bf16 expert weights, and the ABBA timing of arms."""

from __future__ import annotations

import statistics

import torch


def kernel_ops():
    """(cpu_fused_moe, cpu_prepack_moe_weight) from vLLM 0.32's CPU build; ImportError (or any error of the
    import) where they are missing, for the caller's one-line message."""
    import vllm._custom_ops  # noqa: F401  registers torch.ops._C
    from vllm._custom_ops import cpu_fused_moe, cpu_prepack_moe_weight
    return cpu_fused_moe, cpu_prepack_moe_weight


def prepacked_experts(prepack, experts: int, intermediate: int, hidden: int,
                      gen: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Random bf16 w13 [E, 2I, H] and w2 [E, H, I], prepacked for the kernel's "vec" path."""
    w13 = (torch.randn(experts, 2 * intermediate, hidden, generator=gen) * 0.02).to(torch.bfloat16)
    w2 = (torch.randn(experts, hidden, intermediate, generator=gen) * 0.02).to(torch.bfloat16)
    return prepack(w13, "vec"), prepack(w2, "vec")


def abba_medians(call, arms: tuple[str, ...], repeats: int) -> dict[str, float]:
    """One warm-up call per arm, then `repeats` rounds of A B .. B A; the median of each arm's timings."""
    for arm in arms:
        call(arm)
    res: dict[str, list[float]] = {a: [] for a in arms}
    for _ in range(repeats):
        for arm in arms + arms[::-1]:
            res[arm].append(call(arm))
    return {a: statistics.median(v) for a, v in res.items()}
